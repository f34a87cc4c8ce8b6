"""QEMU command lines, built as a pure function of a launch description.

Device ids and order are a function of the VM's config alone, so that a destination QEMU started
from the same config has the same device tree as the source: a migration requirement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QEMU_BINARY = "qemu-system-x86_64"


@dataclass(frozen=True)
class DiskLaunch:
    node: str  # block node name, e.g. "disk0"
    path: Path
    fmt: str = "qcow2"


@dataclass(frozen=True)
class NicLaunch:
    ident: str  # e.g. "net0"
    tap: str
    mac: str


@dataclass(frozen=True)
class QemuLaunch:
    """Everything that decides a QEMU command line."""

    name: str
    uuid: str
    vcpus: int
    memory_mib: int
    machine_type: str
    accel: str
    cpu_model: str
    qmp_socket: Path
    pidfile: Path
    console_log: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[DiskLaunch, ...] = ()
    nics: tuple[NicLaunch, ...] = ()
    # Destination of a migration: wait for `migrate-incoming`, stay paused until `cont`.
    incoming: bool = False
    extra: tuple[str, ...] = field(default_factory=tuple)


def accel_option(accel: str) -> str:
    """``-accel`` for ``accel``. TCG runs single-threaded: with multi-threaded TCG, QEMU 7.2
    lost guest writes during migration (a busy guest's kernel crashed after a few migrations,
    `bench/soak.py`); single-threaded, 70 busy migrations in a row kept every guest intact."""
    return "tcg,thread=single" if accel == "tcg" else accel


# QEMU before 9.0 forgets, under TCG, to reset the vCPUs' TLB dirty state when it syncs the
# migration bitmap in whole 64-page words (its fast path, taken when the RAM block's length is a
# multiple of 256 KiB): a guest store through a cached TLB entry then marks nothing dirty, and the
# page's new contents never reach the destination (fixed upstream by "physmem: Fix migration dirty
# bitmap coherency with TCG memory access", QEMU 9.0; Debian 12's 7.2 lacks it). A RAM size 8 KiB
# past a 256 KiB boundary sends the sync down QEMU's per-page path, which resets the TLB.
TCG_RAM_PAD_KIB = 8


def memory_option(memory_mib: int, accel: str) -> str:
    """``-m`` for a VM of ``memory_mib`` under ``accel`` (see ``TCG_RAM_PAD_KIB``)."""
    if accel == "tcg":
        return f"{memory_mib * 1024 + TCG_RAM_PAD_KIB}k"
    return f"{memory_mib}M"


def build_command(launch: QemuLaunch, binary: str = QEMU_BINARY) -> list[str]:
    """Return the argv that starts ``launch`` daemonized, with QMP on a unix socket."""
    argv = [
        binary,
        "-name", f"guest={launch.name},debug-threads=on",
        "-uuid", launch.uuid,
        "-machine", launch.machine_type,
        "-accel", accel_option(launch.accel),
        "-cpu", launch.cpu_model,
        "-smp", str(launch.vcpus),
        "-m", memory_option(launch.memory_mib, launch.accel),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-chardev", f"file,id=console0,path={launch.console_log}",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=qmp0,path={launch.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-pidfile", str(launch.pidfile),
        "-daemonize",
        "-msg", "timestamp=on",
    ]  # fmt: skip
    if launch.kernel is not None:
        argv += ["-kernel", str(launch.kernel)]
        if launch.initrd is not None:
            argv += ["-initrd", str(launch.initrd)]
        argv += ["-append", launch.append]
    for index, disk in enumerate(launch.disks):
        argv += [
            "-blockdev",
            f"driver=file,filename={disk.path},node-name={disk.node}-file,"
            "cache.direct=off,aio=threads",
            "-blockdev",
            f"driver={disk.fmt},file={disk.node}-file,node-name={disk.node}",
            "-device",
            f"virtio-blk-pci,drive={disk.node},id=virtio-{disk.node}"
            + (",bootindex=1" if index == 0 else ""),
        ]
    for nic in launch.nics:
        argv += [
            "-netdev", f"tap,id={nic.ident},ifname={nic.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev={nic.ident},mac={nic.mac},id={nic.ident}-dev",
        ]  # fmt: skip
    if launch.incoming:
        argv += ["-incoming", "defer", "-S"]
    argv += list(launch.extra)
    return argv
