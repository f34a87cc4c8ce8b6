"""Host facts: what a center needs to know about a host to place and move VMs.

Read from /proc and QEMU; parsed once into frozen records.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmotion.host.datastores import DatastoreInfo
from kvmotion.qemu.cmdline import QEMU_BINARY


@dataclass(frozen=True)
class CpuFacts:
    vendor: str
    model_name: str
    count: int
    flags: tuple[str, ...]


@dataclass(frozen=True)
class MemoryFacts:
    total_bytes: int
    available_bytes: int


def read_cpu(cpuinfo: str | None = None) -> CpuFacts:
    text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    first = text.split("\n\n", 1)[0]
    fields = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return CpuFacts(
        vendor=fields.get("vendor_id", "unknown"),
        model_name=fields.get("model name", "unknown"),
        count=len(re.findall(r"^processor\s*:", text, re.M)) or (os.cpu_count() or 1),
        flags=tuple(sorted(fields.get("flags", "").split())),
    )


def read_memory(meminfo: str | None = None) -> MemoryFacts:
    text = meminfo if meminfo is not None else Path("/proc/meminfo").read_text()
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    return MemoryFacts(values.get("MemTotal", 0), values.get("MemAvailable", 0))


async def _qemu_says(binary: str, *args: str) -> str:
    """What ``binary`` prints for ``args``; empty when it cannot run."""
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except (OSError, TimeoutError):
        return ""
    return out.decode(errors="replace")


async def qemu_version(binary: str = QEMU_BINARY) -> str:
    match = re.search(r"version (\S+)", await _qemu_says(binary, "--version"))
    return match.group(1) if match else "unknown"


def parse_machine_types(text: str) -> tuple[str, ...]:
    """Machine types in ``-machine help``'s answer (first word of each line after its header),
    sorted."""
    lines = text.splitlines()[1:]
    names = {line.split()[0] for line in lines if line.strip() and not line.startswith(" ")}
    return tuple(sorted(n for n in names if n != "none"))


async def machine_types(binary: str = QEMU_BINARY) -> tuple[str, ...]:
    """The machine types (a VM's hardware version) ``binary`` can run: a VM started with one
    can move only to a host whose QEMU has it."""
    return parse_machine_types(await _qemu_says(binary, "-machine", "help"))


def hostname() -> str:
    return socket.gethostname()


def link_speed_mbps(address: str | None) -> float | None:
    """What the interface holding ``address`` carries, in Mbit/s: its speed (from /sys), or a
    lower rate shaped on it with tc (tbf or htb root); None when unknown."""
    if not address:
        return None
    import json
    import subprocess

    try:
        out = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
        for link in json.loads(out):
            if any(a.get("local") == address for a in link.get("addr_info", [])):
                speed = int(Path(f"/sys/class/net/{link['ifname']}/speed").read_text())
                shaped = _shaped_mbps(link["ifname"])
                rates = [r for r in (float(speed) if speed > 0 else None, shaped) if r]
                return min(rates) if rates else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return None


def _shaped_mbps(ifname: str) -> float | None:
    import json
    import subprocess

    out = subprocess.run(
        ["tc", "-j", "qdisc", "show", "dev", ifname],
        capture_output=True, text=True, timeout=5, check=False,
    ).stdout  # fmt: skip
    try:
        for qdisc in json.loads(out or "[]"):
            rate = (qdisc.get("options") or {}).get("rate")
            if qdisc.get("root") and isinstance(rate, int | float) and rate > 0:
                return float(rate) * 8 / 1e6  # tc -j reports bytes/s
    except ValueError:
        return None
    return None


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    bridge: str
    present: bool


@dataclass(frozen=True)
class HostFacts:
    name: str
    hostname: str
    management_address: str
    migration_address: str | None
    cpu: CpuFacts
    cpu_model: dict[str, Any]  # what VMs get here: features, EVC modes (see host/cpu.py)
    # What the migration link carries (its speed, or tc's shaping); None: unknown (a NIC that
    # reports no speed), which the center costs as the slower link.
    migration_link_bps: int | None
    migration_tls: dict[str, Any]  # {"mode": "required" | "off", "ready": bool}
    memory: MemoryFacts
    accel: str
    accel_reason: str
    qemu_version: str
    machine_type: str  # the one new VMs get here
    default_cpu_model: str
    datastores: list[DatastoreInfo]
    networks: list[NetworkInfo]
    vms: int
    vms_powered_on: int
    machine_types: tuple[str, ...] = ()  # every one this host's QEMU runs (empty: unknown)
    # KiB of RAM pad VMs powered on here get (qemu.cmdline.ram_pad_kib): a VM without it must
    # not come here
    ram_pad_kib: int = 0
    # HA is on here, as the center last said (host/ha.py): a center whose cluster has it off
    # tells the host so
    ha_enabled: bool = False
