"""The host agent's HTTP API (FastAPI; OpenAPI at /openapi.json).

A thin shell over :class:`~kvmotion.host.agent.HostAgent`. Every route but ``/v1/health`` needs the
center's token (``Authorization: Bearer ...``). Domain errors become responses in one table
(:func:`error_response`), as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response, WebSocket

from kvmotion import __version__
from kvmotion.errors import KvmotionError, NotFound, Unauthorized
from kvmotion.host import watch
from kvmotion.host.agent import HostAgent
from kvmotion.host.images import ImageInfo
from kvmotion.host.incoming import Incoming
from kvmotion.host.migration import postcopy_step
from kvmotion.host.protocol import (
    AbortResult,
    DirtyRate,
    DirtyRateRequest,
    DiskMirrorRequest,
    FinishRequest,
    FinishResult,
    HaHeartbeatIn,
    HaReportOut,
    HostFacts,
    HostLoadOut,
    IncomingRequest,
    IncomingResult,
    MemoryProfileOut,
    MigrateRequest,
    PostcopyResume,
    PostcopyStep,
    PowerOnRequest,
    RegisterRequest,
    ShutdownRequest,
    ShutdownResult,
    StorageMoveRequest,
    TuneRequest,
    VmCreateRequest,
    VmInfo,
)
from kvmotion.httpapi import (
    ERROR_RESPONSES,
    WS_NORMAL,
    WsEnds,
    bearer_checker,
    check_bearer,
    install_error_handlers,
    ws_close_code,
)
from kvmotion.mgmttls import server_tls

# The header tell_destination sends (host/switchover.py TOKEN_HEADER)
SwitchoverToken = Annotated[str, Header(alias="X-Switchover-Token", max_length=100)]
NO_TOKEN = ""

log = logging.getLogger(__name__)


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
        responses=ERROR_RESPONSES,
    )

    install_error_handlers(app)
    require_token = bearer_checker(agent.config.token, "this host accepts only its center")
    auth = [Depends(require_token)]

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "host": agent.config.name}

    @app.get("/v1/images", dependencies=auth)
    async def list_images(datastore: str | None = None) -> list[ImageInfo]:
        return agent.images.list_images(datastore)

    @app.put("/v1/datastores/{datastore}/images/{name}", dependencies=auth, status_code=201)
    async def import_image(
        datastore: str,
        name: str,
        request: Request,
        format: str | None = Query(None, pattern="^(qcow2|raw)$"),
        filename: str = Query("", max_length=255),
    ) -> ImageInfo:
        """The request's body is the image, streamed to the datastore and checked there."""
        length = request.headers.get("content-length")
        return await agent.images.import_stream(
            datastore, name, request.stream(),
            length=int(length) if length and length.isdigit() else None,
            declared_format=format, filename=filename,
        )  # fmt: skip

    @app.delete("/v1/datastores/{datastore}/images/{name}", dependencies=auth, status_code=204)
    async def delete_image(datastore: str, name: str) -> None:
        agent.images.delete(datastore, name)

    @app.get("/v1/host", dependencies=auth)
    async def host_facts() -> HostFacts:
        return await agent.facts()

    @app.get("/v1/load", dependencies=auth)
    async def host_load(window: float = Query(300.0, ge=5.0, le=900.0)) -> HostLoadOut:
        """What each running VM used, averaged over the last ``window`` seconds."""
        return agent.load_report(window)

    @app.post("/v1/ha", dependencies=auth)
    async def ha_heartbeat(req: HaHeartbeatIn) -> HaReportOut:
        """The center's HA heartbeat: this host's HA report (host/ha.py)."""
        return agent.ha.heartbeat(req.settings, req.released_done)

    @app.get("/v1/vms", dependencies=auth)
    async def list_vms() -> list[VmInfo]:
        return await agent.list()

    @app.post("/v1/vms", dependencies=auth, status_code=201)
    async def create_vm(req: VmCreateRequest) -> VmInfo:
        return await agent.create(req)

    @app.get("/v1/vms/{vm}", dependencies=auth)
    async def get_vm(
        vm: str,
        response: Response,
        after: str | None = Query(None, max_length=64),
        wait: float = Query(0.0, ge=0.0, le=watch.MAX_WAIT_S),
    ) -> VmInfo:
        """The VM's record, tagged (``ETag``). With ``after`` (a tag) and ``wait``, a long-poll:
        answered once the record differs from that one, or after ``wait`` seconds."""
        tag, info = await watch.watch_vm(agent, vm, after, wait)
        response.headers["ETag"] = f'"{tag}"'
        return info

    @app.post("/v1/vms/register", dependencies=auth, status_code=201)
    async def register_vm(req: RegisterRequest) -> VmInfo:
        return await agent.register(req.config, Path(req.config_path))

    @app.post("/v1/vms/{vm}/unregister", dependencies=auth, status_code=204)
    async def unregister_vm(vm: str) -> None:
        await agent.unregister(vm)

    @app.delete("/v1/vms/{vm}", dependencies=auth, status_code=204)
    async def delete_vm(vm: str) -> None:
        await agent.delete(vm)

    @app.post("/v1/vms/{vm}/power-on", dependencies=auth)
    async def power_on(vm: str, req: PowerOnRequest | None = None) -> VmInfo:
        return await agent.power_on(vm, (req or PowerOnRequest()).evc_mode)

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

    @app.post("/v1/migrations/incoming", dependencies=auth, status_code=201)
    async def prepare_incoming(req: IncomingRequest) -> IncomingResult:
        info, uri, port = await agent.prepare_incoming(
            req.config, Path(req.config_path), req.cpu, mode=req.mode(),
            datastore=req.datastore, ram_pad_kib=req.ram_pad_kib,
        )  # fmt: skip
        nbd_host = agent.config.migration_address if port is not None else None
        incoming = agent.vms[info.uuid].migration
        token = incoming.switchover_token if isinstance(incoming, Incoming) else None
        return IncomingResult(
            vm=info, uri=uri, nbd_host=nbd_host, nbd_port=port, switchover_token=token
        )

    @app.post("/v1/migrations/{uuid}/switchover", status_code=204)
    async def switchover(uuid: str, token: SwitchoverToken = NO_TOKEN) -> None:
        """The source's agent: the guest just stopped there. Authenticated by the one-time
        token this host gave for the migration (not the agent token, which the source lacks)."""
        await agent.take_switchover(uuid, token)

    @app.post("/v1/vms/{vm}/migrate", dependencies=auth, status_code=202)
    async def migrate(vm: str, req: MigrateRequest) -> VmInfo:
        return await agent.migrate(vm, req)

    @app.post("/v1/vms/{vm}/migration/tune", dependencies=auth)
    async def tune_migration(vm: str, req: TuneRequest) -> VmInfo:
        return await agent.tune_migration(
            vm, req.downtime_limit_ms, req.max_bandwidth_bps, req.throttle_pct
        )

    async def postcopy(vm: str, step: str, uri: str | None = None) -> PostcopyStep:
        machine, address = agent.get(vm), agent.config.migration_address
        uri = await postcopy_step(machine.migration, step, uri=uri, address=address)
        return PostcopyStep(vm=await machine.info(), uri=uri)

    @app.post("/v1/vms/{vm}/migration/postcopy", dependencies=auth)
    async def start_postcopy(vm: str) -> VmInfo:
        return (await postcopy(vm, "start")).vm

    @app.post("/v1/vms/{vm}/migration/postcopy/pause", dependencies=auth)
    async def pause_postcopy(vm: str) -> PostcopyStep:
        """Break a stalled post-copy stream (either side), so that it can be recovered."""
        return await postcopy(vm, "pause")

    @app.post("/v1/vms/{vm}/migration/postcopy/recover", dependencies=auth)
    async def recover_postcopy(vm: str) -> PostcopyStep:
        """Destination: listen again for a broken post-copy stream; answers where."""
        return await postcopy(vm, "recover")

    @app.post("/v1/vms/{vm}/migration/postcopy/resume", dependencies=auth)
    async def resume_postcopy(vm: str, req: PostcopyResume) -> PostcopyStep:
        """Source: reconnect a broken post-copy stream to the destination's recovery URI."""
        return await postcopy(vm, "resume", req.uri)

    @app.post("/v1/vms/{vm}/dirty-rate", dependencies=auth)
    async def dirty_rate(vm: str, req: DirtyRateRequest) -> DirtyRate:
        """QEMU's measurement of how fast the guest dirties memory (for predictions)."""
        return DirtyRate(dirty_rate_bps=await agent.dirty_rate(vm, req.seconds))

    @app.post("/v1/vms/{vm}/memory-profile", dependencies=auth)
    async def memory_profile(vm: str) -> MemoryProfileOut:
        """Non-zero RAM, dirty rate and working set: a prediction's inputs (about 4.5 s)."""
        return MemoryProfileOut(**asdict(await agent.memory_profile(vm)))

    @app.post("/v1/vms/{vm}/migration/cancel", dependencies=auth)
    async def cancel_migration(vm: str) -> VmInfo:
        return await agent.cancel_migration(vm)

    @app.post("/v1/vms/{vm}/migration/finish", dependencies=auth)
    async def finish_migration(vm: str, req: FinishRequest | None = None) -> FinishResult:
        remove = (req or FinishRequest()).remove_files
        return FinishResult(problems=list(await agent.finish_migration(vm, remove_files=remove)))

    @app.post("/v1/vms/{vm}/storage/move", dependencies=auth, status_code=202)
    async def move_storage(vm: str, req: StorageMoveRequest) -> VmInfo:
        """Start copying the VM's disks to another datastore of this host (it keeps running);
        it switches to the copies by itself when they are ready. Follow ``storage`` on the VM."""
        return await agent.move_storage(vm, req.datastore, req.max_bandwidth_bps)

    @app.post("/v1/vms/{vm}/storage/mirror", dependencies=auth, status_code=202)
    async def mirror_disks(vm: str, req: DiskMirrorRequest) -> VmInfo:
        return await agent.mirror_disks(
            vm, str(req.host), req.port, req.datastore, req.max_bandwidth_bps
        )

    @app.post("/v1/vms/{vm}/storage/cancel", dependencies=auth)
    async def cancel_storage(vm: str) -> AbortResult:
        return AbortResult(done=await agent.cancel_storage(vm))

    @app.post("/v1/vms/{vm}/migration/abort", dependencies=auth)
    async def abort_migration(vm: str, destination_gone: bool = False) -> AbortResult:
        return AbortResult(done=await agent.abort_migration(vm, destination_gone=destination_gone))

    @app.websocket("/v1/vms/{vm}/console/{kind}")
    async def console(
        ws: WebSocket,
        vm: str,
        kind: str,
        offset: int | None = Query(None, ge=0),
    ) -> None:
        """A VM's serial console (``kind`` serial: its bytes, replayed from the log's
        ``offset`` or its last few KiB) or screen (vnc: RFB), as binary frames both ways."""
        await console_session(agent, ws, vm, kind, offset)

    return app


async def console_session(
    agent: HostAgent, ws: WebSocket, vm: str, kind: str, offset: int | None
) -> None:
    """Check the center's token, relay, and close with the reason it ended (or was refused)."""
    ends = WsEnds(ws)
    center_only = {agent.config.token: ("center", "admin")}
    if check_bearer(ws.headers.get("authorization", "").encode(), center_only) is None:
        await ends.close(ws_close_code(Unauthorized("")), "this host accepts only its center")
        return
    if kind not in ("serial", "vnc"):
        await ends.close(ws_close_code(NotFound("")), f"no console {kind[:20]!r}: serial or vnc")
        return
    await ws.accept(subprotocol="binary" if "binary" in ws.scope.get("subprotocols", ()) else None)
    try:
        why = await agent.console(
            vm, kind, ends.send, ends.receive, offset=offset,
            started=lambda at: ws.send_text(json.dumps({"offset": at})),
        )  # fmt: skip
    except KvmotionError as exc:
        await ends.close(ws_close_code(exc), exc.message)
    except ConnectionError:
        pass  # the viewer left
    else:
        await ends.close(WS_NORMAL, why)


async def serve(agent: HostAgent, host: str, port: int) -> None:
    """Run the agent's HTTPS service (HTTP if its config says api_plaintext) until cancelled or
    signalled. Raises InvalidInput, before listening, when its certificates are missing."""
    import uvicorn

    from kvmotion.qemu.process import become_subreaper

    cfg = agent.config
    hint = f"kvmotion tls issue --host {cfg.name} --address {cfg.management_address} ..."
    tls = server_tls(cfg.tls_dir, cfg.api_plaintext, hint)
    become_subreaper()
    config = uvicorn.Config(
        create_app(agent), host=host, port=port, log_level="info", access_log=False, **tls
    )
    await uvicorn.Server(config).serve()
