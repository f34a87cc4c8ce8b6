"""The host agent's HTTP API (FastAPI; OpenAPI at /openapi.json).

A thin shell over :class:`~kvmotion.host.agent.HostAgent`. Every route but ``/v1/health`` needs the
center's token (``Authorization: Bearer ...``). Domain errors become responses in one table
(:func:`error_response`), as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from kvmotion import __version__
from kvmotion.errors import KvmotionError, Unauthorized
from kvmotion.host.agent import HostAgent, HostFacts
from kvmotion.host.vm import VmInfo
from kvmotion.host.vmconfig import VmCreateRequest

log = logging.getLogger(__name__)


class ShutdownRequest(BaseModel):
    timeout_s: float = Field(60.0, ge=0, le=3600)


class ShutdownResult(BaseModel):
    vm: VmInfo
    how: str  # "guest" (ACPI) or "hard"


class ErrorBody(BaseModel):
    code: str
    message: str


def error_response(exc: KvmotionError) -> JSONResponse:
    """The one table from domain errors to HTTP: each error class carries its status."""
    return JSONResponse(status_code=exc.http_status, content={"error": exc.to_dict()})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request"


def create_app(agent: HostAgent) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await agent.start()
        try:
            yield
        finally:
            await agent.close()

    app = FastAPI(
        title="kvmotion host agent",
        version=__version__,
        lifespan=lifespan,
        responses={401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
    )

    async def require_token(authorization: Annotated[str | None, Header()] = None) -> None:
        expected = f"Bearer {agent.config.token}"
        if authorization is None or not secrets.compare_digest(authorization, expected):
            raise Unauthorized("missing or wrong token: this host accepts only its center")

    @app.exception_handler(KvmotionError)
    async def _domain_error(_: Request, exc: KvmotionError) -> JSONResponse:
        if exc.http_status >= 500:
            log.error("%s: %s", exc.code, exc.message)
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        content = {"error": {"code": "invalid_input", "message": _validation_message(exc)}}
        return JSONResponse(status_code=422, content=content)

    auth = [Depends(require_token)]

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "host": agent.config.name}

    @app.get("/v1/host", dependencies=auth)
    async def host_facts() -> HostFacts:
        return await agent.facts()

    @app.get("/v1/vms", dependencies=auth)
    async def list_vms() -> list[VmInfo]:
        return await agent.list()

    @app.post("/v1/vms", dependencies=auth, status_code=201)
    async def create_vm(req: VmCreateRequest) -> VmInfo:
        return await agent.create(req)

    @app.get("/v1/vms/{vm}", dependencies=auth)
    async def get_vm(vm: str) -> VmInfo:
        return await agent.get(vm).info()

    @app.delete("/v1/vms/{vm}", dependencies=auth, status_code=204)
    async def delete_vm(vm: str) -> None:
        await agent.delete(vm)

    @app.post("/v1/vms/{vm}/power-on", dependencies=auth)
    async def power_on(vm: str) -> VmInfo:
        return await agent.power_on(vm)

    @app.post("/v1/vms/{vm}/shutdown", dependencies=auth)
    async def shutdown(vm: str, req: ShutdownRequest | None = None) -> ShutdownResult:
        info, how = await agent.shutdown(vm, (req or ShutdownRequest()).timeout_s)
        return ShutdownResult(vm=info, how=how)

    @app.post("/v1/vms/{vm}/power-off", dependencies=auth)
    async def power_off(vm: str) -> VmInfo:
        return await agent.power_off(vm)

    @app.post("/v1/vms/{vm}/reset", dependencies=auth)
    async def reset(vm: str) -> VmInfo:
        return await agent.reset(vm)

    return app


async def serve(agent: HostAgent, host: str, port: int) -> None:
    """Run the agent's HTTP service until cancelled or signalled."""
    import uvicorn

    from kvmotion.qemu.process import become_subreaper

    become_subreaper()
    config = uvicorn.Config(
        create_app(agent), host=host, port=port, log_level="info", access_log=False
    )
    await uvicorn.Server(config).serve()
