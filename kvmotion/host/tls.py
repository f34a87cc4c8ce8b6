"""Encrypted migration streams: QEMU's TLS credentials, from the host's certificate directory.

With ``migration_tls: required`` (the default) every stream between hosts is TLS: the memory
stream (migration parameter ``tls-creds``; the source also sets ``tls-hostname`` to the address
it connects to, which the destination's certificate must name) and a "change both"'s disk copies
(``nbd-server-start`` and the NBD client's ``tls-creds``). The destination verifies the source's
client certificate (``verify-peer``), so only hosts with a certificate from the cluster's CA can
send it a VM. The certificates come from ``kvmotion tls`` (``kvmotion/pki.py``). ``off`` sends
plaintext: only for a migration network nobody else can reach (the lab's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvmotion import pki
from kvmotion.errors import PreconditionError
from kvmotion.qemu.qmp import QmpSession

Endpoint = Literal["server", "client"]


@dataclass(frozen=True)
class MigrationTls:
    mode: Literal["required", "off"]
    directory: Path

    @property
    def enabled(self) -> bool:
        return self.mode == "required"

    def missing(self) -> list[str]:
        return pki.missing_files(self.directory) if self.enabled else []

    def facts(self) -> dict[str, object]:
        """What the center's precheck compares between two hosts."""
        return {"mode": self.mode, "ready": not self.missing()}

    def check(self) -> None:
        """Raise PreconditionError (``tls_not_ready``) when TLS is required but not set up."""
        missing = self.missing()
        if missing:
            raise PreconditionError(
                f"migration TLS is required on this host, but {self.directory} lacks "
                f"{', '.join(missing)}: issue the host's certificates with `kvmotion tls issue` "
                "(or set migration_tls: off, for a migration network nobody else can reach)",
                code="tls_not_ready",
            )

    async def creds(self, qmp: QmpSession, endpoint: Endpoint) -> str | None:
        """The id of QEMU's ``tls-creds-x509`` object for ``endpoint`` (added on first use);
        None when TLS is off."""
        if not self.enabled:
            return None
        self.check()
        ident = f"kvmotion-tls-{endpoint}"
        objects = await qmp.execute("qom-list", {"path": "/objects"})
        if not any(o.get("name") == ident for o in objects):
            await qmp.execute(
                "object-add",
                {"qom-type": "tls-creds-x509", "id": ident, "dir": str(self.directory),
                 "endpoint": endpoint, "verify-peer": True},
            )  # fmt: skip
        return ident
