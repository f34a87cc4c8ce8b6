"""One exception tree for kvmotion.

Every error carries a stable ``code`` (for scripts and the REST layer) and a message a user can act
on. Two families never mix: a :class:`PreconditionError` means the request was refused and nothing
changed; an :class:`ExecutionError` means work started and failed partway (and says whether it was
rolled back).

::

    KvmotionError
     ├── PreconditionError            refused, nothing changed
     │    ├── InvalidInput            bad name, size, MAC, body ...          (HTTP 422)
     │    ├── NotFound                unknown VM, host, datastore, network  (HTTP 404)
     │    ├── Conflict                duplicate name, wrong power state      (HTTP 409)
     │    ├── InsufficientResources   not enough memory or space             (HTTP 507)
     │    └── Unauthorized            missing or wrong token                 (HTTP 401)
     └── ExecutionError               failed partway
          ├── QemuError               QEMU failed to start, or QMP failed    (HTTP 500)
          ├── HostUnreachable         an agent did not answer                (HTTP 502)
          └── LabError                building or tearing down the lab failed

Foreign exceptions (OSError, QMP errors, HTTP errors) are converted once, at the edge of the layer
that meets them, with ``raise ... from exc``.
"""

from __future__ import annotations

from typing import Any


class KvmotionError(Exception):
    """Root of every kvmotion error."""

    code: str = "error"
    http_status: int = 500

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class PreconditionError(KvmotionError):
    """The request was refused before anything changed."""

    code = "precondition_failed"
    http_status = 409


class InvalidInput(PreconditionError):
    code = "invalid_input"
    http_status = 422


class NotFound(PreconditionError):
    code = "not_found"
    http_status = 404


class Conflict(PreconditionError):
    code = "conflict"
    http_status = 409


class InsufficientResources(PreconditionError):
    code = "insufficient_resources"
    http_status = 507


class Unauthorized(PreconditionError):
    code = "unauthorized"
    http_status = 401


class Forbidden(PreconditionError):
    code = "forbidden"
    http_status = 403


class ExecutionError(KvmotionError):
    """Work started and failed partway."""

    code = "execution_failed"
    http_status = 500


class QemuError(ExecutionError):
    code = "qemu_failed"
    http_status = 500


class QmpTimeout(QemuError):
    """QEMU did not answer in time: its main loop is busy (in post-copy, blocked on a page the
    source has not sent), not necessarily gone."""


class HostUnreachable(ExecutionError):
    code = "host_unreachable"
    http_status = 502


class NotActive(KvmotionError):
    """A standby center was asked (center/leader.py): the active one answers, at
    ``details["active_url"]`` when one is known."""

    code = "standby"
    http_status = 503


class LabError(ExecutionError):
    code = "lab_failed"
    http_status = 500
