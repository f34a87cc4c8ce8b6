"""What the center's and the agents' HTTP APIs share: the error table and token checking.

Domain errors become responses in one place: each error class carries its status, and the body is
always ``{"error": {"code", "message"}}``. Request bodies that do not parse are 422
``invalid_input`` with a message naming the field.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvmotion.errors import (
    Conflict,
    ExecutionError,
    Forbidden,
    HostUnreachable,
    InsufficientResources,
    InvalidInput,
    KvmotionError,
    NotActive,
    NotFound,
    Unauthorized,
)

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    code: str
    message: str


# The one error table, both ways: a domain error is answered with its class's status, and a
# status read back (by the agent's and the center's clients) is raised as that class again, with
# the code and message of the body. 500s (QEMU, the lab) come back as ExecutionError.
ERRORS_BY_STATUS: dict[int, type[KvmotionError]] = {
    cls.http_status: cls
    for cls in (
        InvalidInput, NotFound, Conflict, InsufficientResources, Unauthorized, Forbidden,
        HostUnreachable, NotActive,
    )
}  # fmt: skip
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in sorted(ERRORS_BY_STATUS)
}
# The framework's own refusals (no route, wrong method), in the same codes.
HTTP_CODES = {
    400: InvalidInput.code,
    401: Unauthorized.code,
    404: NotFound.code,
    405: "method_not_allowed",
}


def error_response(exc: KvmotionError) -> JSONResponse:
    return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})


def error_from_response(response: httpx.Response, what: str) -> KvmotionError:
    """The domain error an error response stands for (the reverse of ``error_response``)."""
    details: dict[str, Any] = {}
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
        if isinstance(body.get("details"), dict):
            given = body["details"].items()
            details = {str(k): v for k, v in given if k not in ("code", "message")}
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"{what}: HTTP {response.status_code} {response.text[:200]}"
    cls = ERRORS_BY_STATUS.get(response.status_code, ExecutionError)
    return cls(message, code=code, **details)


def validation_message(exc: RequestValidationError | ValidationError) -> str:
    """What a user reads of a request that broke a model's rules (at most five faults)."""
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(KvmotionError)
    async def _domain_error(_: Request, exc: KvmotionError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (no such route, wrong method, a body that does not
        parse) in the same shape as ours."""
        code = HTTP_CODES.get(
            exc.status_code, "invalid_input" if exc.status_code < 500 else "error"
        )
        message = str(exc.detail)
        if exc.status_code == 405:
            message = f"{message}: see /docs for the methods this path accepts"
        content = {"error": {"code": code, "message": message}}
        return JSONResponse(status_code=exc.status_code, content=content, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        content = {"error": {"code": "invalid_input", "message": validation_message(exc)}}
        return JSONResponse(status_code=422, content=content)


@functools.cache
def tls_context() -> ssl.SSLContext:
    """One TLS context for every client: building one loads the CA store (~40 ms each)."""
    return ssl.create_default_context()


def api_client(
    base_url: str,
    token: str,
    timeout: float,
    transport: httpx.AsyncBaseTransport | None = None,
    keepalive_expiry_s: float = 5.0,
    verify: ssl.SSLContext | None = None,
) -> httpx.AsyncClient:
    """An HTTP client of a kvmotion API: bearer token, no proxy from the environment (lab and
    host traffic must never leave for one), a shared TLS context (the system's store, or
    ``verify``: the cluster CA's); tests plug fakes in through ``transport``."""
    return httpx.AsyncClient(
        base_url=base_url,
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
        trust_env=False,
        transport=transport,
        verify=verify or tls_context(),
        limits=httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=keepalive_expiry_s
        ),
    )


READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def role_checker(
    tokens: dict[str, tuple[str, str]], who: str, read_paths: tuple[str, ...] = ()
) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency for an API with roles. ``tokens``: token -> (name, role), role
    "admin" (everything) or "read-only" (GET, and POSTs whose path ends with one of
    ``read_paths``, such as a precheck that changes nothing). Raises Unauthorized (no or an
    unknown token) or Forbidden (a read-only token asking for a change); never echoes a token."""

    async def check(request: Request) -> None:
        match = check_bearer((request.headers.get("authorization") or "").encode(), tokens)
        if match is None:
            raise Unauthorized(f"missing or wrong token: {who}")
        name, role = match
        reads = request.method in READ_METHODS or request.url.path.endswith(read_paths)
        if role != "admin" and not reads:
            raise Forbidden(
                f"{name!r} may only look (role {role}): ask an administrator to do this"
            )

    return check


def bearer_checker(token: str, who: str) -> Callable[[Request], Awaitable[None]]:
    """A FastAPI dependency accepting only ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}"

    async def check(request: Request) -> None:
        given = request.headers.get("authorization") or ""
        if not secrets.compare_digest(given.encode(), expected.encode()):
            raise Unauthorized(f"missing or wrong token: {who}")

    return check


# -- websockets (the consoles) ------------------------------------------------------------------
# Close codes a console's websocket ends with (the reason is a sentence for the user): a domain
# error's class decides it as its status decides an HTTP answer (4000 + the HTTP status).
WS_NORMAL = 1000
WS_SERVER_ERROR = 1011
WS_REASON_MAX = 120  # bytes: a close frame's reason is at most 123


def ws_close_code(exc: KvmotionError) -> int:
    """4401 unauthorized, 4403 forbidden, 4404 not found, 4409 conflict, ...: 4000 + status."""
    return 4000 + exc.http_status


def ws_reason(text: str) -> str:
    """``text`` cut to what a close frame carries, on a character boundary."""
    raw = text.encode()
    if len(raw) <= WS_REASON_MAX:
        return text
    return raw[: WS_REASON_MAX - 3].decode(errors="ignore") + "..."


def check_bearer(given: bytes, tokens: dict[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(name, role) of the token ``given`` (``Bearer <token>``) matches, compared with every
    known token (no timing hint); None if none does."""
    match = None
    for token, (name, role) in tokens.items():
        if secrets.compare_digest(given, f"Bearer {token}".encode()):
            match = (name, role)
    return match


class WsEnds:
    """A server-side websocket (Starlette's) as ``send`` and ``receive`` of bytes; ``receive``
    gives None once the peer left (text frames are taken as their UTF-8)."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws
        self.gone = False

    async def send(self, data: bytes) -> None:
        if self.gone:
            raise ConnectionError("the viewer left")
        try:
            await self.ws.send_bytes(data)
        except (RuntimeError, WebSocketDisconnect, OSError) as exc:
            self.gone = True
            raise ConnectionError("the viewer left") from exc

    async def receive(self) -> bytes | None:
        if self.gone:
            return None
        try:
            message = await self.ws.receive()
        except (RuntimeError, WebSocketDisconnect, OSError):
            message = {"type": "websocket.disconnect"}
        if message["type"] == "websocket.disconnect":
            self.gone = True
            return None
        if message.get("bytes") is not None:
            return bytes(message["bytes"])
        return str(message.get("text") or "").encode()

    async def close(self, code: int = WS_NORMAL, reason: str = "") -> None:
        if self.gone:
            return
        self.gone = True
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await self.ws.close(code, ws_reason(reason))
