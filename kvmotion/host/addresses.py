"""Where a VM can be reached: its IP addresses, as its host learns them.

Two sources, best first, as vCenter shows a VM's addresses from VMware Tools:
1. the QEMU guest agent in the guest (``guest-network-get-interfaces``), for a VM with its
   channel: the guest's own view, every address of every NIC;
2. the DHCP leases of the VM's networks (``NetworkConfig.dhcp_leases``, dnsmasq's format), by
   the VM's MACs: what the network's DHCP server gave it.

A running VM's addresses are refreshed in the background every :data:`REFRESH_S` (a guest agent
that does not answer costs its timeout, never a request's time); a VM's info reports what was
learned last.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from kvmotion.host.vmconfig import VmConfig
from kvmotion.host.vmstate import RunFiles, VmEnvironment
from kvmotion.qemu.qga import guest_addresses

log = logging.getLogger(__name__)

REFRESH_S = 10.0
FIRST_REFRESH_S = 2.0  # a guest just started or moved here: look soon
GUEST_TIMEOUT_S = 3.0

GuestQuery = Callable[[], Awaitable[list[str] | None]]  # None: no guest agent answered


def parse_leases(text: str, now: float | None = None) -> dict[str, str]:
    """MAC -> IP address from a dnsmasq lease file (``expiry mac ip hostname client-id`` per
    line; expiry 0 means never), skipping expired leases and lines it cannot read. The last
    lease of a MAC wins (dnsmasq appends renewals)."""
    now = time.time() if now is None else now
    leases: dict[str, str] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3:
            continue
        try:
            expiry = int(words[0])
            address = str(ipaddress.ip_address(words[2]))
        except ValueError:
            continue
        if expiry != 0 and expiry < now:
            continue
        leases[words[1].lower()] = address
    return leases


def lease_addresses(files: Iterable[Path], macs: Iterable[str]) -> list[str]:
    """The leased addresses of ``macs`` in ``files`` (unreadable files are skipped)."""
    wanted = [m.lower() for m in macs]
    found: list[str] = []
    for path in files:
        try:
            leases = parse_leases(path.read_text())
        except OSError:
            continue
        found += [leases[m] for m in wanted if m in leases and leases[m] not in found]
    return found


class AddressWatch:
    """A running VM's addresses, refreshed in a background task until :meth:`stop`."""

    def __init__(self, name: str, query_guest: GuestQuery | None, leases: Callable[[], list[str]]):
        self.name = name
        self._query_guest = query_guest
        self._leases = leases
        self.addresses: tuple[str, ...] = ()
        self.source: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name=f"addresses {self.name}")

    def stop(self) -> None:
        """Forget the addresses (the VM stopped or left) and end the refresh."""
        task, self._task = self._task, None
        self.addresses, self.source = (), None
        if task is not None:
            task.cancel()

    async def refresh(self) -> None:
        """Ask the guest agent, else the leases; keep what was known if neither says."""
        if self._query_guest is not None:
            found = await self._query_guest()
            if found:
                self.addresses, self.source = tuple(found), "guest-agent"
                return
        leased = self._leases()
        if leased:
            self.addresses, self.source = tuple(leased), "dhcp"

    async def _run(self) -> None:
        await asyncio.sleep(FIRST_REFRESH_S)
        while True:
            try:
                await self.refresh()
            except Exception:  # a bad answer must not end the watch
                log.exception("VM %s: refreshing its addresses failed", self.name)
            await asyncio.sleep(REFRESH_S)


def watch_addresses(config: VmConfig, env: VmEnvironment, files: RunFiles) -> AddressWatch:
    """The address watch of a VM: its guest agent's channel if it has one, and the lease files
    of the networks its NICs are on."""
    lease_files = [env.dhcp_leases[n.network] for n in config.nics if n.network in env.dhcp_leases]
    macs = [n.mac for n in config.nics]
    socket = files.guest_agent_socket

    async def query_guest() -> list[str] | None:
        found = await guest_addresses(socket, timeout=GUEST_TIMEOUT_S)
        if found is None:
            return None
        return [a for iface in found for a in iface.addresses if not _link_local(a)]

    return AddressWatch(
        config.name,
        query_guest if config.guest_agent else None,
        lambda: lease_addresses(lease_files, macs) if lease_files else [],
    )


def _link_local(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("/")[0])
    return ip.is_link_local or ip.is_loopback
