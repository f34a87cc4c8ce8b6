"""What a host knows about one VM, apart from running it: its power states and their transition
table, its part in a migration, what the host gives it (:class:`VmEnvironment`), how it is
reported (:class:`VmInfo`), and the QEMU launch its configuration describes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from kvmotion.errors import NotFound
from kvmotion.host import firmware, taps
from kvmotion.host.cpu import VmCpu
from kvmotion.host.datastores import Datastores
from kvmotion.host.migrationview import MigrationView
from kvmotion.host.storage import StorageView
from kvmotion.host.tls import MigrationTls
from kvmotion.host.vmconfig import VmConfig
from kvmotion.qemu.cmdline import DiskLaunch, NicLaunch, QemuLaunch
from kvmotion.qemu.process import QemuHandle

BASE_KERNEL_ARGS = "console=ttyS0 panic=-1"


class PowerState(StrEnum):
    POWERED_OFF = "poweredOff"
    POWERING_ON = "poweringOn"
    POWERED_ON = "poweredOn"
    POWERING_OFF = "poweringOff"
    # Destination of a live migration: QEMU runs paused, receiving; not yet the VM's owner.
    INCOMING = "incoming"


TRANSITIONS: dict[PowerState, set[PowerState]] = {
    # POWERED_ON from POWERED_OFF: an agent (re)started and found the VM's QEMU running.
    PowerState.POWERED_OFF: {PowerState.POWERING_ON, PowerState.INCOMING, PowerState.POWERED_ON},
    PowerState.INCOMING: {PowerState.POWERED_ON, PowerState.POWERED_OFF},
    PowerState.POWERING_ON: {PowerState.POWERED_ON, PowerState.POWERED_OFF},
    PowerState.POWERED_ON: {PowerState.POWERING_OFF, PowerState.POWERED_OFF},
    PowerState.POWERING_OFF: {PowerState.POWERED_OFF, PowerState.POWERED_ON},
}


class MigrationRole(StrEnum):
    """This host's part in a VM's (last) live migration, as an abort must see it."""

    NONE = "none"  # no migration, and no QEMU to ask
    SOURCE = "source"  # this agent sends (or sent) the VM
    DESTINATION = "destination"  # receiving: not yet the VM's owner
    RECEIVED = "received"  # received and resumed here: the owner
    # This agent watches no migration of a running VM: there was none, or an earlier agent
    # (before a restart) started one; QEMU says which.
    UNWATCHED = "unwatched"


async def _none() -> None:
    return None


@dataclass(frozen=True)
class VmEnvironment:
    """What a host gives its VMs.

    The last five act on the host itself (they need root or a real QEMU): the agent passes
    ``QemuProcess.start``/``find`` and ``taps.create_tap``/``delete_tap``; unit tests pass fakes.
    """

    datastores: Datastores
    bridges: dict[str, str]  # network name -> bridge
    image_dir: Path | None
    accel: str
    qemu_binary: str
    ram_pad_kib: int  # what VMs powered on here get (qemu.cmdline.ram_pad_kib)
    tls: MigrationTls  # how streams to and from other hosts are encrypted
    start_qemu: Callable[[QemuLaunch], Awaitable[QemuHandle]]  # raises QemuError
    find_qemu: Callable[[Path, str], QemuHandle | None]  # by pidfile and the VM's uuid
    create_tap: Callable[[str, str], Awaitable[None]]  # tap name, bridge
    delete_tap: Callable[[str], Awaitable[None]]  # tap name; one that is gone is fine
    # When the VM network learned a MAC on a tap (taps.wait_learned); None: it did not
    learned: Callable[[str, str], Awaitable[float | None]] = lambda _tap, _mac: _none()
    dhcp_leases: dict[str, Path] = field(default_factory=dict)  # network -> its lease file


@dataclass(frozen=True)
class VmInfo:
    uuid: str
    name: str
    power_state: str
    qemu_status: str | None
    pid: int | None
    config_path: str
    config: VmConfig
    migration: MigrationView | None
    cpu: VmCpu | None  # the CPU it runs (or last ran) with on this host
    storage: StorageView | None  # its disks' copy, while one runs (or how the last ended)
    incoming: bool  # registered as a migration's destination, not (yet) the VM's owner
    # KiB of RAM past its size it runs with (kept for its life: see qemu.cmdline.ram_pad_kib);
    # None from an agent that does not say
    ram_pad_kib: int | None = None
    # Its IP addresses and where they were learned ("guest-agent", "dhcp"); () while unknown
    addresses: tuple[str, ...] = ()
    addresses_source: str | None = None


@dataclass(frozen=True)
class RunFiles:
    """Where a VM's running QEMU keeps its files on this host."""

    run_dir: Path

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def console_log(self) -> Path:
        return self.run_dir / "console.log"

    @property
    def console_socket(self) -> Path:
        return self.run_dir / "console.sock"

    @property
    def vnc_socket(self) -> Path:
        return self.run_dir / "vnc.sock"

    @property
    def guest_agent_socket(self) -> Path:
        return self.run_dir / "qga.sock"


def qemu_launch(
    cfg: VmConfig,
    env: VmEnvironment,
    files: RunFiles,
    cpu_model: str,
    ram_pad_kib: int,
    incoming: bool,
) -> QemuLaunch:
    """The QEMU that runs ``cfg`` on this host. Raises NotFound for a boot image or network
    the host lacks."""
    kernel = initrd = None
    if cfg.boot_image is not None:
        if env.image_dir is None:
            raise NotFound("this host has no image directory", code="image_not_found")
        kernel = env.image_dir / cfg.boot_image / "vmlinuz"
        initrd = env.image_dir / cfg.boot_image / "initrd.img"
        if not kernel.exists() or not initrd.exists():
            raise NotFound(
                f"boot image {cfg.boot_image!r} is not in {env.image_dir} on this host "
                "(run `kvmotion image build` and install it there)",
                code="image_not_found",
            )
    disks = tuple(
        DiskLaunch(f"disk{i}", env.datastores.resolve(d.datastore, d.path), d.format)
        for i, d in enumerate(cfg.disks)
    )
    nics = []
    for i, nic in enumerate(cfg.nics):
        if nic.network not in env.bridges:
            raise NotFound(
                f"network {nic.network!r} does not exist on this host", code="network_not_found"
            )
        nics.append(NicLaunch(f"net{i}", taps.tap_name(cfg.uuid, i), nic.mac))
    return QemuLaunch(
        name=cfg.name,
        uuid=cfg.uuid,
        vcpus=cfg.vcpus,
        memory_mib=cfg.memory_mib,
        machine_type=cfg.machine_type,
        accel=env.accel,
        cpu_model=cpu_model,
        qmp_socket=files.qmp_socket,
        pidfile=files.pidfile,
        console_log=files.console_log,
        console_socket=files.console_socket,
        kernel=kernel,
        initrd=initrd,
        append=f"{BASE_KERNEL_ARGS} {cfg.kernel_args}".strip() if kernel is not None else "",
        disks=disks,
        nics=tuple(nics),
        seed=(
            env.datastores.resolve(cfg.datastore, cfg.seed_path)
            if cfg.seed_path is not None
            else None
        ),
        guest_agent_socket=files.guest_agent_socket if cfg.guest_agent else None,
        vnc_socket=files.vnc_socket if cfg.graphics else None,
        uefi=(
            (
                firmware.ovmf_file(firmware.OVMF_CODE),
                env.datastores.resolve(cfg.datastore, cfg.vars_path),
            )
            if cfg.vars_path is not None
            else None
        ),
        incoming=incoming,
        ram_pad_kib=ram_pad_kib,
        binary=env.qemu_binary,
    )
