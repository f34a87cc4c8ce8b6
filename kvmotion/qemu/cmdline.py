"""QEMU command lines, built as a pure function of a launch description.

Device ids and order are a function of the VM's config alone, so that a destination QEMU started
from the same config has the same device tree as the source: a migration requirement.
"""

from __future__ import annotations

import re
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
    # The serial port: a unix socket the agent's console attaches to, everything the guest
    # writes also kept in ``console_log`` (attached or not)
    console_socket: Path
    kernel: Path | None = None
    initrd: Path | None = None
    append: str = ""
    disks: tuple[DiskLaunch, ...] = ()
    nics: tuple[NicLaunch, ...] = ()
    seed: Path | None = None  # a read-only NoCloud seed (ISO), after the disks
    guest_agent_socket: Path | None = None  # the qemu-guest-agent channel's socket
    vnc_socket: Path | None = None  # a VGA card, its screen served by VNC on this unix socket
    # UEFI: OVMF's code (read-only) and the VM's variable store, as flash (host/firmware.py)
    uefi: tuple[Path, Path] | None = None
    # Destination of a migration: wait for `migrate-incoming`, stay paused until `cont`.
    incoming: bool = False
    # KiB past the RAM size (see ``TCG_RAM_PAD_KIB``): fixed for the VM's life, since a
    # migration's destination must have exactly the source's RAM.
    ram_pad_kib: int = 0
    binary: str = QEMU_BINARY  # this host's QEMU
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
# past a 256 KiB boundary sends the sync down QEMU's per-page path, which resets the TLB. That path
# costs the guest a freeze of about 0.45 ms per MiB at each migration's start, so a VM is padded
# only where it needs to be (:func:`ram_pad_kib`).
TCG_RAM_PAD_KIB = 8
FIXED_IN = (9, 0)


def parse_version(version: str) -> tuple[int, int] | None:
    """(major, minor) of a QEMU version string such as "7.2.22" or "10.0.2"; None if unknown."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def ram_pad_kib(qemu_version: str, accel: str) -> int:
    """The pad a VM powered on under ``accel`` by QEMU ``qemu_version`` gets: 8 KiB under TCG
    before QEMU 9.0 (or an unknown version), else none."""
    if accel != "tcg":
        return 0
    parsed = parse_version(qemu_version)
    return TCG_RAM_PAD_KIB if parsed is None or parsed < FIXED_IN else 0


def unpadded_refusal(vm: str, host: str, qemu_version: str) -> str:
    """Why a VM without the pad must not move to a host whose QEMU needs it, and what to do."""
    return (
        f"host {host} runs QEMU {qemu_version} under TCG, which loses guest writes when it "
        f"migrates a VM without an 8 KiB RAM pad, and VM {vm} was started without one (by a "
        f"QEMU 9.0 or newer): power it off and on at {host} to move it there, or upgrade "
        f"{host}'s QEMU to 9.0 or newer"
    )


def memory_option(memory_mib: int, pad_kib: int = 0) -> str:
    """``-m`` for a VM of ``memory_mib`` padded by ``pad_kib`` (see ``TCG_RAM_PAD_KIB``)."""
    if pad_kib:
        return f"{memory_mib * 1024 + pad_kib}k"
    return f"{memory_mib}M"


def build_command(launch: QemuLaunch) -> list[str]:
    """Return the argv that starts ``launch`` daemonized, with QMP on a unix socket."""
    argv = [
        launch.binary,
        "-name", f"guest={launch.name},debug-threads=on",
        "-uuid", launch.uuid,
        "-machine", launch.machine_type + (
            ",pflash0=pflash0,pflash1=pflash1" if launch.uefi is not None else ""
        ),
        "-accel", accel_option(launch.accel),
        "-cpu", launch.cpu_model,
        "-smp", str(launch.vcpus),
        "-m", memory_option(launch.memory_mib, launch.ram_pad_kib),
        "-nodefaults", "-no-user-config",
        "-display", "none",
        "-chardev", f"socket,id=console0,path={launch.console_socket},server=on,wait=off,"
        f"logfile={launch.console_log}",
        "-serial", "chardev:console0",
        "-chardev", f"socket,id=qmp0,path={launch.qmp_socket},server=on,wait=off",
        "-mon", "chardev=qmp0,mode=control",
        "-pidfile", str(launch.pidfile),
        "-daemonize",
        "-msg", "timestamp=on",
    ]  # fmt: skip
    if launch.uefi is not None:
        code, variables = launch.uefi
        argv += [
            "-blockdev", f"driver=file,filename={code},node-name=pflash0-file,read-only=on",
            "-blockdev", "driver=raw,file=pflash0-file,node-name=pflash0,read-only=on",
            "-blockdev", f"driver=file,filename={variables},node-name=pflash1-file",
            "-blockdev", "driver=raw,file=pflash1-file,node-name=pflash1",
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
    if launch.seed is not None:
        argv += [
            "-blockdev",
            f"driver=file,filename={launch.seed},node-name=seed-file,read-only=on",
            "-blockdev", "driver=raw,file=seed-file,node-name=seed,read-only=on",
            "-device", "virtio-blk-pci,drive=seed,id=virtio-seed",
        ]  # fmt: skip
    if launch.guest_agent_socket is not None:
        argv += [
            "-chardev", f"socket,id=qga0,path={launch.guest_agent_socket},server=on,wait=off",
            "-device", "virtio-serial-pci,id=virtio-serial0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0,id=qga-port",
        ]  # fmt: skip
    if launch.vnc_socket is not None:
        argv += ["-device", "VGA,id=video0", "-vnc", f"unix:{launch.vnc_socket}"]
    for nic in launch.nics:
        argv += [
            "-netdev", f"tap,id={nic.ident},ifname={nic.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev={nic.ident},mac={nic.mac},id={nic.ident}-dev",
        ]  # fmt: skip
    if launch.incoming:
        argv += ["-incoming", "defer", "-S"]
    argv += list(launch.extra)
    return argv
