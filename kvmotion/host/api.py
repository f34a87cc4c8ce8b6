"""The host agent's HTTP API (FastAPI; OpenAPI at /openapi.json).

A thin shell over :class:`~kvmotion.host.agent.HostAgent`. Every route but ``/v1/health`` needs the
center's token (``Authorization: Bearer ...``). Domain errors become responses in one table
(:func:`error_response`), as ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import logging
import re
import uuid as uuidlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI
from pydantic import BaseModel, ConfigDict, Field, IPvAnyAddress, field_validator

from kvmotion import __version__
from kvmotion.host.agent import HostAgent
from kvmotion.host.cpu import VmCpu
from kvmotion.host.facts import HostFacts
from kvmotion.host.vmconfig import (
    KERNEL_ARGS_RE,
    MAX_DISK_MIB,
    MAX_MEMORY_MIB,
    MAX_VCPUS,
    VmConfig,
    VmCreateRequest,
    check_mac,
    check_name,
)
from kvmotion.host.vmfiles import RECORD
from kvmotion.host.vmstate import VmInfo
from kvmotion.httpapi import ERROR_RESPONSES, bearer_checker, install_error_handlers

log = logging.getLogger(__name__)


class ShutdownRequest(BaseModel):
    timeout_s: float = Field(60.0, ge=0, le=3600)


class ShutdownResult(BaseModel):
    vm: VmInfo
    how: str  # "guest" (ACPI) or "hard"


_QEMU_WORD_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a CPU model, machine type, format


def check_record(config: VmConfig) -> VmConfig:
    """A VM's record as a migration's source sends it. It names paths on this host (the run dir
    by its uuid, its folder by its name, its disks) and QEMU's arguments, so it keeps the rules a
    new VM's request keeps: a canonical uuid, names, relative disk paths of names, sizes."""
    try:
        canonical = str(uuidlib.UUID(config.uuid)) == config.uuid
    except ValueError:
        canonical = False
    if not canonical:
        raise ValueError(
            f"invalid VM uuid {config.uuid[:80]!r}: send the record's own uuid, in its "
            "canonical form (e.g. 12345678-1234-5678-1234-567812345678)"
        )
    check_name(config.name, "VM name")
    check_name(config.datastore, "datastore")
    if config.boot_image is not None:
        check_name(config.boot_image, "image")
    for value, what in ((config.cpu_model, "CPU model"), (config.machine_type, "machine type")):
        if not _QEMU_WORD_RE.fullmatch(value):
            raise ValueError(f"invalid {what} {value[:40]!r}")
    if not 1 <= config.vcpus <= MAX_VCPUS or not 16 <= config.memory_mib <= MAX_MEMORY_MIB:
        raise ValueError(
            f"{config.vcpus} vCPUs and {config.memory_mib} MiB: a VM has 1-{MAX_VCPUS} vCPUs "
            f"and 16-{MAX_MEMORY_MIB} MiB of memory"
        )
    if not KERNEL_ARGS_RE.fullmatch(config.kernel_args):
        raise ValueError("kernel_args must be printable ASCII, at most 1024 characters")
    for disk in config.disks:
        check_name(disk.datastore, "datastore")
        for part in disk.path.split("/"):
            check_name(part, "disk path part")
        if not _QEMU_WORD_RE.fullmatch(disk.format) or not 1 <= disk.size_mib <= MAX_DISK_MIB:
            raise ValueError(
                f"disk {disk.path}: {disk.size_mib} MiB in format {disk.format[:20]!r}; a disk "
                f"has 1-{MAX_DISK_MIB} MiB in a format such as qcow2"
            )
    for nic in config.nics:
        check_name(nic.network, "network")
        check_mac(nic.mac)
    return config


def check_record_path(value: str) -> str:
    """Where the record is: an absolute path to a record file (``.../vm.json``), printable."""
    path = Path(value)
    if not KERNEL_ARGS_RE.fullmatch(value) or not path.is_absolute() or path.name != RECORD:
        raise ValueError(
            f"invalid config_path {value[:80]!r}: the absolute path of the VM's {RECORD}"
        )
    if ".." in path.parts:
        raise ValueError(f"invalid config_path {value[:80]!r}: no '..' in it")
    return value


class IncomingRequest(BaseModel):
    """Destination: receive this VM (its record, read from the shared datastore by the center)."""

    config: VmConfig
    config_path: str
    cpu: VmCpu | None = None  # the CPU the VM runs with on the source
    postcopy: bool = False  # the source may switch to post-copy
    # "Change both": make new disks on this datastore and serve them over NBD for the copy.
    datastore: str | None = None

    _config = field_validator("config")(check_record)
    _path = field_validator("config_path")(check_record_path)
    _ds = field_validator("datastore")(lambda v: None if v is None else check_name(v, "datastore"))


class PowerOnRequest(BaseModel):
    evc_mode: str | None = Field(None, pattern=r"^[a-z0-9-]{1,40}$")


class IncomingResult(BaseModel):
    vm: VmInfo
    uri: str  # where the source sends: tcp:<this host's migration address>:<port>
    nbd_host: str | None = None  # with a datastore: where the new disks are served
    nbd_port: int | None = None


class StorageMoveRequest(BaseModel):
    """Storage vMotion on this host: every disk of the VM to ``datastore``."""

    model_config = ConfigDict(extra="forbid")

    datastore: str
    max_bandwidth_bps: int | None = Field(None, ge=1_000_000)  # cap the copy (per disk)

    _ds = field_validator("datastore")(lambda v: check_name(v, "datastore"))


class DiskMirrorRequest(BaseModel):
    """ "Change both", source: copy every disk into the destination's NBD exports."""

    model_config = ConfigDict(extra="forbid")

    host: IPvAnyAddress  # the destination's migration address
    port: int = Field(ge=1, le=65535)
    datastore: str
    max_bandwidth_bps: int | None = Field(None, ge=1_000_000)

    _ds = field_validator("datastore")(lambda v: check_name(v, "datastore"))


class FinishRequest(BaseModel):
    remove_files: bool = False  # the disks were copied: delete the source's old files


class FinishResult(BaseModel):
    problems: list[str]  # files that could not be removed


class MigrateRequest(BaseModel):
    uri: str = Field(pattern=r"^tcp:[0-9.]{7,15}:[0-9]{1,5}$")
    downtime_limit_ms: int = Field(100, ge=1, le=60_000)
    max_bandwidth_bps: int | None = Field(None, ge=1_000_000)
    brake: bool = False  # allow the convergence engine to throttle the guest's CPU
    postcopy: bool = False  # allow a switch to post-copy (the destination must allow it too)


class TuneRequest(BaseModel):
    downtime_limit_ms: int | None = Field(None, ge=1, le=60_000)
    max_bandwidth_bps: int | None = Field(None, ge=1_000_000)
    throttle_pct: int | None = Field(None, ge=0, le=99)


class DirtyRateRequest(BaseModel):
    seconds: int = Field(1, ge=1, le=60)


class DirtyRate(BaseModel):
    dirty_rate_bps: float


class MemoryProfileOut(BaseModel):
    ram_bytes: int
    nonzero_bytes: int
    dirty_rate_bps: float
    working_set_bytes: int


class AbortResult(BaseModel):
    done: str


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
            req.config, Path(req.config_path), req.cpu, postcopy=req.postcopy,
            datastore=req.datastore,
        )  # fmt: skip
        nbd_host = agent.config.migration_address if port is not None else None
        return IncomingResult(vm=info, uri=uri, nbd_host=nbd_host, nbd_port=port)

    @app.post("/v1/vms/{vm}/migrate", dependencies=auth, status_code=202)
    async def migrate(vm: str, req: MigrateRequest) -> VmInfo:
        return await agent.migrate(
            vm,
            req.uri,
            req.downtime_limit_ms,
            req.max_bandwidth_bps,
            brake=req.brake,
            postcopy=req.postcopy,
        )

    @app.post("/v1/vms/{vm}/migration/tune", dependencies=auth)
    async def tune_migration(vm: str, req: TuneRequest) -> VmInfo:
        return await agent.tune_migration(
            vm, req.downtime_limit_ms, req.max_bandwidth_bps, req.throttle_pct
        )

    @app.post("/v1/vms/{vm}/migration/postcopy", dependencies=auth)
    async def start_postcopy(vm: str) -> VmInfo:
        return await agent.start_postcopy(vm)

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
