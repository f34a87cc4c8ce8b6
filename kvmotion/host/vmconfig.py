"""A VM's configuration: the request that creates it and the record kept beside its disks.

The record (``vm.json`` in the VM's folder on its datastore, as a .vmx is) is what any host needs
to run the VM: a destination host starts the same devices from it. Names, MACs and sizes are
validated here, at the boundary, so nothing downstream sees bad input.
"""

from __future__ import annotations

import re
import uuid as uuidlib
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
MAX_VCPUS = 64
MAX_MEMORY_MIB = 1024 * 1024
MAX_DISK_MIB = 16 * 1024 * 1024
# Kernel arguments are appended to a command line: keep them printable and short.
KERNEL_ARGS_RE = re.compile(r"^[\x20-\x7e]{0,1024}$")
# An SSH public key as authorized_keys has it: one printable line, a key type first.
SSH_KEY_RE = re.compile(r"^(ssh-|ecdsa-|sk-)[A-Za-z0-9@.-]+ [A-Za-z0-9+/=]+( [\x20-\x7e]*)?$")
MAX_SSH_KEYS, MAX_SSH_KEY_CHARS = 16, 8192
MAX_USER_DATA_CHARS = 64 * 1024
HOSTNAME_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
DEFAULT_BOOT_IMAGE = "kvmotion-guest"
SEED_FILE = "cidata.iso"
DEFAULT_DISK_MIB = 64


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

    # None: 64 MiB, or for a disk made from an image, the image's size
    size_mib: int | None = Field(None, ge=1, le=MAX_DISK_MIB)
    datastore: str | None = None  # default: the VM's datastore

    _name = field_validator("datastore")(
        lambda v: None if v is None else check_name(v, "datastore")
    )


def check_ssh_key(value: str) -> str:
    key = value.strip()
    if len(key) > MAX_SSH_KEY_CHARS or not SSH_KEY_RE.fullmatch(key):
        raise ValueError(
            f"invalid SSH public key {key[:40]!r}...: give one line of an authorized_keys file, "
            "e.g. the contents of ~/.ssh/id_ed25519.pub"
        )
    return key


class FirstBoot(BaseModel):
    """What the guest is told at its first boot, through a NoCloud seed (a small ISO labelled
    ``cidata`` that cloud-init reads): its hostname, who may log in, and the user's own
    cloud-config. The agent writes the seed from this, wherever the VM's record is made."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    hostname: str
    ssh_keys: tuple[str, ...] = ()
    user_data: str | None = None  # a "#cloud-config" document or a script; None: keys only

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not HOSTNAME_RE.fullmatch(value):
            raise ValueError(
                f"invalid hostname {value[:70]!r}: 1-63 letters, digits or '-', "
                "not starting or ending with '-'"
            )
        return value

    @field_validator("ssh_keys")
    @classmethod
    def _keys(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(value) > MAX_SSH_KEYS:
            raise ValueError(f"at most {MAX_SSH_KEYS} SSH keys")
        return tuple(check_ssh_key(k) for k in value)

    @field_validator("user_data")
    @classmethod
    def _user_data(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) > MAX_USER_DATA_CHARS or "\x00" in value:
            raise ValueError(f"user data must be text of at most {MAX_USER_DATA_CHARS} characters")
        if not value.startswith(("#cloud-config", "#!")):
            raise ValueError(
                "user data must be a cloud-config document (first line '#cloud-config') "
                "or a script (first line '#!...')"
            )
        return value


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
    # The lab's test guest, booted directly (-kernel); None with ``image``: the disk boots
    boot_image: str | None = DEFAULT_BOOT_IMAGE
    kernel_args: str = ""
    # An OS image on a datastore (`kvmotion image import`) the first disk is made from, booted
    # by the firmware (SeaBIOS); ``image_datastore``: where it is (default: the VM's datastore)
    image: str | None = None
    image_datastore: str | None = None
    first_boot: FirstBoot | None = None  # written to a NoCloud seed the guest reads
    guest_agent: bool | None = None  # a channel for qemu-guest-agent; default: with an image
    # A screen (a VGA card, shown through VNC in the console); default: with an image
    graphics: bool | None = None
    # "bios" (SeaBIOS) or "uefi" (OVMF, with the VM's own variable store: host/firmware.py)
    firmware: Literal["bios", "uefi"] = "bios"

    _name = field_validator("name")(lambda v: check_name(v, "VM name"))
    _ds = field_validator("datastore")(lambda v: check_name(v, "datastore"))
    _img = field_validator("boot_image", "image", "image_datastore")(
        lambda v: None if v is None else check_name(v, "image or datastore")
    )

    @model_validator(mode="after")
    def _boot(self) -> VmCreateRequest:
        if self.image is not None:
            if "boot_image" not in self.model_fields_set:
                self.boot_image = None  # the image's own bootloader boots it
            elif self.boot_image is not None:
                raise ValueError("give an image or a boot_image, not both")
            if self.kernel_args:
                raise ValueError(
                    "kernel_args apply only to the test guest's direct boot: an image boots "
                    "its own kernel (set its arguments inside the guest)"
                )
        if self.guest_agent is None:
            self.guest_agent = self.image is not None
        if self.graphics is None:
            self.graphics = self.image is not None
        return self

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
    # A disk cloned from an image as a qcow2 overlay: the image it reads through, relative to
    # the same datastore's root (e.g. ".images/debian-12.qcow2"), and that image's format. A
    # storage move copies the whole chain into one file, so a moved disk has none.
    backing: str | None = None
    backing_format: str | None = None


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
    image: str | None = None  # the OS image its first disk was made from (for the record)
    first_boot: FirstBoot | None = None
    guest_agent: bool = False
    graphics: bool = False  # a VGA card and a VNC server on the host's run directory
    firmware: Literal["bios", "uefi"] = "bios"

    @property
    def vars_path(self) -> str | None:
        """A UEFI VM's variable store beside the record (relative to ``datastore``)."""
        return f"{self.name}/{self.name}_VARS.fd" if self.firmware == "uefi" else None

    @property
    def seed_path(self) -> str | None:
        """The NoCloud seed beside the record (relative to ``datastore``), if it has one."""
        return f"{self.name}/{SEED_FILE}" if self.first_boot is not None else None

    @classmethod
    def from_request(
        cls,
        req: VmCreateRequest,
        *,
        cpu_model: str,
        machine_type: str,
        first_disk: DiskConfig | None = None,
    ) -> VmConfig:
        """The record of a new VM; ``first_disk``: its first disk as made from an image."""
        vm_uuid = str(uuidlib.uuid4())
        disks = tuple(
            DiskConfig(
                datastore=d.datastore or req.datastore,
                path=f"{req.name}/{req.name}{'' if i == 0 else f'_{i}'}.qcow2",
                size_mib=d.size_mib or DEFAULT_DISK_MIB,
            )
            for i, d in enumerate(req.disks)
        )
        if first_disk is not None:
            disks = (first_disk, *disks[1:])
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
            image=req.image,
            first_boot=req.first_boot,
            guest_agent=bool(req.guest_agent),
            graphics=bool(req.graphics),
            firmware=req.firmware,
        )

    def moved_to(self, datastore: str) -> VmConfig:
        """This VM with its record and every disk on ``datastore`` (same relative paths)."""
        disks = tuple(
            d.model_copy(update={"datastore": datastore, "backing": None, "backing_format": None})
            for d in self.disks
        )
        return self.model_copy(update={"datastore": datastore, "disks": disks})
