"""The protocol between a center and a host agent: every request and reply, defined once.

The agent's routes (:mod:`kvmotion.host.api`) take and return these; :class:`~kvmotion.host.
client.AgentClient` builds its requests from them and validates every reply against them, so a
center gets typed values (and a clear error when an agent answers in another shape); the unit
tests' fake agent answers with them too. A reply that is an agent's own record (a VM's
:class:`~kvmotion.host.vmstate.VmInfo`, the host's :class:`~kvmotion.host.facts.HostFacts`) is
that dataclass, validated by pydantic as it is.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from kvmotion.errors import InvalidInput
from kvmotion.host.cpu import VmCpu
from kvmotion.host.facts import HostFacts
from kvmotion.host.migrationview import MAX_STREAMS, MigrationMode
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
from kvmotion.httpapi import validation_message

__all__ = [
    "HOST_FACTS",
    "VM_INFO",
    "VM_LIST",
    "AbortResult",
    "DirtyRate",
    "DirtyRateRequest",
    "DiskMirrorRequest",
    "FinishRequest",
    "FinishResult",
    "HostFacts",
    "HostLoadOut",
    "IncomingRequest",
    "IncomingResult",
    "MemoryProfileOut",
    "MigrateRequest",
    "PowerOnRequest",
    "RegisterRequest",
    "ShutdownRequest",
    "ShutdownResult",
    "StorageMoveRequest",
    "TuneRequest",
    "VmCreateRequest",
    "VmInfo",
    "VmLoadOut",
    "build",
    "facts_json",
    "vm_json",
]


class ShutdownRequest(BaseModel):
    timeout_s: float = Field(60.0, ge=0, le=3600)


class ShutdownResult(BaseModel):
    vm: VmInfo
    how: str  # "guest" (ACPI) or "hard"


_QEMU_WORD_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # a CPU model, machine type, format
_BACKING_RE = re.compile(r"\.images/[A-Za-z0-9][A-Za-z0-9._-]{0,62}\.(qcow2|raw)")


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
        if disk.backing is not None and not _BACKING_RE.fullmatch(disk.backing):
            raise ValueError(
                f"disk {disk.path}: backing {disk.backing[:80]!r} is not an image of its "
                "datastore (.images/<name>.qcow2 or .raw)"
            )
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


class ModeFields(BaseModel):
    """How memory travels (host/migrationview.py MigrationMode), told alike to both hosts."""

    postcopy: bool = False  # the source may switch to post-copy
    streams: int = Field(1, ge=1, le=MAX_STREAMS)  # TCP streams the memory goes over (multifd)
    postcopy_preempt: bool = False  # with postcopy: the pages the guest waits for come first

    @model_validator(mode="after")
    def _check_mode(self) -> ModeFields:
        self.mode()  # post-copy over several streams raises ValueError
        return self

    def mode(self) -> MigrationMode:
        return MigrationMode(self.postcopy, self.streams, self.postcopy_preempt)


class IncomingRequest(ModeFields):
    """Destination: receive this VM (its record, read from the shared datastore by the center)."""

    config: VmConfig
    config_path: str
    cpu: VmCpu | None = None  # the CPU the VM runs with on the source
    ram_pad_kib: int = Field(0, ge=0, le=1024)  # and its RAM pad (qemu.cmdline.ram_pad_kib)
    # "Change both": make new disks on this datastore and serve them over NBD for the copy.
    datastore: str | None = None

    _config = field_validator("config")(check_record)
    _path = field_validator("config_path")(check_record_path)
    _ds = field_validator("datastore")(lambda v: None if v is None else check_name(v, "datastore"))


class RegisterRequest(BaseModel):
    """Register a powered-off VM here from its record on a datastore this host sees (the
    center moving it off another host: center/relocation.py)."""

    config: VmConfig
    config_path: str

    _config = field_validator("config")(check_record)
    _path = field_validator("config_path")(check_record_path)


class PowerOnRequest(BaseModel):
    evc_mode: str | None = Field(None, pattern=r"^[a-z0-9-]{1,40}$")


class IncomingResult(BaseModel):
    vm: VmInfo
    uri: str  # where the source sends: tcp:<this host's migration address>:<port>
    # Given to the source: it says with it when the guest stopped there (host/switchover.py)
    switchover_token: str | None = None
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


class MigrateRequest(ModeFields):
    """Source: stream to the destination's ``uri``, in the mode the destination was told."""

    uri: str = Field(pattern=r"^tcp:[0-9.]{7,15}:[0-9]{1,5}$")
    downtime_limit_ms: int = Field(100, ge=1, le=60_000)
    max_bandwidth_bps: int | None = Field(None, ge=1_000_000)
    brake: bool = False  # allow the convergence engine to throttle the guest's CPU
    auto_converge: bool = False  # or QEMU's own throttle, its defaults (other managers' way)
    # Where to say the guest stopped here, so that the destination takes its traffic at once
    # (host/switchover.py): the destination's route and its one-time token for this migration.
    switchover_url: str | None = Field(
        None, pattern=r"^https?://[A-Za-z0-9.:\[\]-]{1,100}/v1/[A-Za-z0-9/_.-]{1,200}$"
    )
    switchover_token: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,100}$")


class PostcopyResume(BaseModel):
    uri: str = Field(pattern=r"^tcp:[0-9.]{7,15}:[0-9]{1,5}$")  # the destination's recovery URI


class PostcopyStep(BaseModel):
    vm: VmInfo
    uri: str | None = None  # recover: where the source resumes to


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


class VmLoadOut(BaseModel):
    """A VM's load averaged over a window (host/load.py)."""

    cpu: float  # CPU cores its QEMU used
    memory_mib: float  # its resident memory
    seconds: float  # how much of the window its samples cover
    samples: int


class HostLoadOut(BaseModel):
    window_s: float
    interval_s: float
    cpus: int
    host_cpu_busy: float | None  # the share of all CPUs busy (None: not sampled yet)
    memory_available_mib: int
    vms: dict[str, VmLoadOut]  # by name; a VM sampled fewer than twice is absent


class HaSettingsIn(BaseModel):
    """HA as the center's cluster sets it, sent with every heartbeat (host/ha.py)."""

    enabled: bool = False
    failure_s: float = Field(15.0, ge=8.0, le=600.0)  # silent this long on both channels: failed
    isolation_response: Literal["leave-on", "power-off", "shutdown"] = "leave-on"
    peers: list[str] = Field(default_factory=list, max_length=1000)  # the others' agent URLs

    @field_validator("peers")
    @classmethod
    def _urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if not re.fullmatch(r"https?://[\w.:\[\]-]{1,300}", url):
                raise ValueError(f"not an agent URL: {url[:80]!r}")
        return value


class HaHeartbeatIn(BaseModel):
    """The center's heartbeat: the settings, and the released VMs it has restarted since."""

    settings: HaSettingsIn
    released_done: list[str] = Field(default_factory=list, max_length=10000)


class HaPeerOut(BaseModel):
    """Another host's heartbeat file on a datastore, as this host reads it."""

    age_s: float  # since this host last saw it change (or began watching, if it never did)
    vms: list[str]  # the uuids it says it runs with a disk here
    released: list[str]  # the uuids it stopped as its isolation response
    isolated: bool


class HaDatastoreOut(BaseModel):
    written_age_s: float | None  # since this host last renewed its own heartbeat here
    watching_s: float  # how long this host has been reading the others' heartbeats here
    peers: dict[str, HaPeerOut]  # by host name


class HaFenceOut(BaseModel):
    vm: str
    uuid: str
    reason: str
    at: float  # Unix time


class HaReportOut(BaseModel):
    host: str
    incarnation: str  # changes at every agent start
    enabled: bool
    isolated: bool
    datastores: dict[str, HaDatastoreOut]  # the shared ones, by name
    fenced: list[HaFenceOut]  # the VMs this host stopped itself, latest last
    released: list[str]


VM_INFO = TypeAdapter(VmInfo)
VM_LIST = TypeAdapter(list[VmInfo])
HOST_FACTS = TypeAdapter(HostFacts)
POSTCOPY_STEP = TypeAdapter(PostcopyStep)


def vm_json(info: VmInfo) -> dict[str, Any]:
    """A VM's record as JSON (what the center keeps of it)."""
    result: dict[str, Any] = VM_INFO.dump_python(info, mode="json")
    return result


def facts_json(facts: HostFacts) -> dict[str, Any]:
    """A host's facts as JSON (what the center keeps of them)."""
    result: dict[str, Any] = HOST_FACTS.dump_python(facts, mode="json")
    return result


M = TypeVar("M", bound=BaseModel)


def build(model: type[M], **fields: Any) -> M:
    """A request, checked by its sender as the agent checks it: one that breaks the protocol's
    rules raises InvalidInput, as the agent's answer (422) would."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput(f"{model.__name__}: {validation_message(exc)}") from exc
