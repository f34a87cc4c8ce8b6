"""Tap devices that join a VM's NICs to a network's bridge on this host.

Names are derived from the VM's uuid and NIC index (``kt`` + 8 hex + index, within Linux's 15
characters), so an agent that restarts finds and removes the taps of VMs that ended meanwhile.
"""

from __future__ import annotations

import asyncio
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
