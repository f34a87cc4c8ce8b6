"""Tap devices that join a VM's NICs to a network's bridge on this host.

Names are derived from the VM's uuid and NIC index (``kt`` + 8 hex + index, within Linux's 15
characters), so an agent that restarts finds and removes the taps of VMs that ended meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from kvmotion.errors import ExecutionError, NotFound


def tap_name(vm_uuid: str, index: int) -> str:
    return f"kt{vm_uuid.replace('-', '')[:8]}{index}"


def bridge_exists(bridge: str) -> bool:
    return Path(f"/sys/class/net/{bridge}/bridge").is_dir()


async def _ip(*args: str, check: bool = True) -> None:
    proc = await asyncio.create_subprocess_exec(
        "ip", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if check and proc.returncode != 0:
        raise ExecutionError(
            f"ip {' '.join(args)} failed: {err.decode().strip()}", code="tap_failed"
        )


async def create_tap(name: str, bridge: str) -> None:
    """Create tap ``name`` on ``bridge`` (replacing a stale one of the same name)."""
    if not bridge_exists(bridge):
        raise NotFound(f"bridge {bridge!r} does not exist on this host", code="network_not_found")
    await delete_tap(name)
    await _ip("tuntap", "add", "dev", name, "mode", "tap")
    await _ip("link", "set", "dev", name, "master", bridge)
    await _ip("link", "set", "dev", name, "up")


async def delete_tap(name: str) -> None:
    if Path(f"/sys/class/net/{name}").exists():
        await _ip("link", "del", "dev", name, check=False)


def learned_on(tap: str, mac: str, sys_net: Path = Path("/sys/class/net")) -> bool | None:
    """Whether ``tap``'s bridge has learned ``mac`` on ``tap``'s port (its forwarding table in
    sysfs: 16-byte entries of MAC, port number low byte, is-local, ageing (4), port number high
    byte). None when it cannot be told: the tap is on no Linux bridge (Open vSwitch)."""
    try:
        port = int((sys_net / tap / "brport" / "port_no").read_text().strip(), 0)
        bridge = (sys_net / tap / "brport" / "bridge").resolve().name
        table = (sys_net / bridge / "brforward").read_bytes()
    except (OSError, ValueError):
        return None
    want = bytes.fromhex(mac.replace(":", ""))
    for offset in range(0, len(table) - 15, 16):
        entry = table[offset : offset + 16]
        if entry[:6] == want and (entry[12] << 8 | entry[6]) == port and not entry[7]:
            return True
    return False


async def wait_learned(
    tap: str, mac: str, timeout: float = 2.0, step: float = 0.002
) -> float | None:
    """When (wall clock) ``tap``'s bridge learned ``mac`` on its port, polled every ``step`` s
    for at most ``timeout`` s; None if it did not, or cannot be told (asked once then)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        learned = learned_on(tap, mac)
        if learned is None:
            return None
        if learned:
            return time.time()
        await asyncio.sleep(step)
    return None
