"""A VM's configuration: the request that creates it and the record kept beside its disks.

The record (``vm.json`` in the VM's folder on its datastore, as a .vmx is) is what any host needs
to run the VM: a destination host starts the same devices from it. Names, MACs and sizes are
validated here, at the boundary, so nothing downstream sees bad input.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
MAX_VCPUS = 64
MAX_MEMORY_MIB = 1024 * 1024
MAX_DISK_MIB = 16 * 1024 * 1024
# Kernel arguments are appended to a command line: keep them printable and short.
KERNEL_ARGS_RE = re.compile(r"^[\x20-\x7e]{0,1024}$")


def check_name(value: str, what: str = "name") -> str:
    """A VM, datastore or network name: letters, digits, '.', '_', '-'; no '/', '..' or controls."""
    if not NAME_RE.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid {what} {value[:80]!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit (no '/', '..', spaces or control characters)"
        )
    return value


def check_mac(value: str) -> str:
    mac = value.lower()
    if not MAC_RE.fullmatch(mac):
        raise ValueError(f"invalid MAC {value[:40]!r}: write six hex pairs, e.g. 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"invalid MAC {value}: a multicast address cannot be a NIC's address")
    return mac


def mac_for(vm_uuid: str, index: int) -> str:
    """A stable, locally administered MAC derived from the VM's uuid and NIC index."""
    raw = uuidlib.UUID(vm_uuid).bytes
    return f"52:54:00:{raw[0]:02x}:{raw[1]:02x}:{(raw[2] + index) % 256:02x}"


class DiskRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    size_mib: int = Field(64, ge=1, le=MAX_DISK_MIB)
    datastore: str | None = None  # default: the VM's datastore

    _name = field_validator("datastore")(
        lambda v: None if v is None else check_name(v, "datastore")
    )


class NicRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    network: str
    mac: str | None = None

    _net = field_validator("network")(lambda v: check_name(v, "network"))
    _mac = field_validator("mac")(lambda v: None if v is None else check_mac(v))


class VmCreateRequest(BaseModel):
    """What a user asks for. Defaults make a small guest that boots the lab image."""

    model_config = ConfigDict(extra="forbid")

    name: str
    datastore: str
    vcpus: int = Field(1, ge=1, le=MAX_VCPUS)
    memory_mib: int = Field(256, ge=16, le=MAX_MEMORY_MIB)
    disks: list[DiskRequest] = Field(default_factory=lambda: [DiskRequest()], max_length=8)
    nics: list[NicRequest] = Field(default_factory=list, max_length=8)
    cpu_model: str | None = None
    # Its hardware version, e.g. "pc-q35-7.2"; None: the host's (its config's machine_type)
    machine_type: str | None = None
    boot_image: str | None = "kvmotion-guest"
    kernel_args: str = ""

    _name = field_validator("name")(lambda v: check_name(v, "VM name"))
    _ds = field_validator("datastore")(lambda v: check_name(v, "datastore"))
    _img = field_validator("boot_image")(lambda v: None if v is None else check_name(v, "image"))

    @field_validator("cpu_model", "machine_type")
    @classmethod
    def _qemu_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            raise ValueError(f"invalid CPU model or machine type {value[:40]!r}")
        return value

    @field_validator("kernel_args")
    @classmethod
    def _args(cls, value: str) -> str:
        if not KERNEL_ARGS_RE.fullmatch(value):
            raise ValueError("kernel_args must be printable ASCII, at most 1024 characters")
        return value


class DiskConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    datastore: str
    path: str  # relative to the datastore's root, e.g. "vm-a/vm-a.qcow2"
    size_mib: int
    format: str = "qcow2"


class NicConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    network: str
    mac: str


class VmConfig(BaseModel):
    """The record on the datastore. Everything a host needs to run (or receive) the VM."""

    model_config = ConfigDict(frozen=True)

    uuid: str
    name: str
    datastore: str  # where this record lives: <datastore>/<name>/vm.json
    vcpus: int
    memory_mib: int
    disks: tuple[DiskConfig, ...]
    nics: tuple[NicConfig, ...]
    cpu_model: str
    machine_type: str
    boot_image: str | None
    kernel_args: str
    created_at: datetime

    @classmethod
    def from_request(cls, req: VmCreateRequest, *, cpu_model: str, machine_type: str) -> VmConfig:
        vm_uuid = str(uuidlib.uuid4())
        disks = tuple(
            DiskConfig(
                datastore=d.datastore or req.datastore,
                path=f"{req.name}/{req.name}{'' if i == 0 else f'_{i}'}.qcow2",
                size_mib=d.size_mib,
            )
            for i, d in enumerate(req.disks)
        )
        nics = tuple(
            NicConfig(network=n.network, mac=n.mac or mac_for(vm_uuid, i))
            for i, n in enumerate(req.nics)
        )
        return cls(
            uuid=vm_uuid,
            name=req.name,
            datastore=req.datastore,
            vcpus=req.vcpus,
            memory_mib=req.memory_mib,
            disks=disks,
            nics=nics,
            cpu_model=req.cpu_model or cpu_model,
            machine_type=req.machine_type or machine_type,
            boot_image=req.boot_image,
            kernel_args=req.kernel_args,
            created_at=datetime.now(UTC),
        )

    def moved_to(self, datastore: str) -> VmConfig:
        """This VM with its record and every disk on ``datastore`` (same relative paths)."""
        disks = tuple(d.model_copy(update={"datastore": datastore}) for d in self.disks)
        return self.model_copy(update={"datastore": datastore, "disks": disks})
