"""The VM network at switchover: the destination takes the VM's traffic while the guest is
stopped, so that nothing the user sends in the stun is lost.

Until the destination resumes the guest and QEMU announces it, the VM network's switches send
the VM's frames to the source, whose stopped QEMU never reads them: they die with the source's
QEMU, and the user's TCP connection waits for a retransmission. So the moment the source stops
the guest (pre-switchover), its agent tells the destination's agent (:func:`tell_destination`,
with a one-time token the destination made for this migration), which
(:func:`take_traffic`) pins the VM's MAC to its tap on its bridge and sends a RARP from that MAC:
the switches learn the new place, and frames queue in the destination's tap, read by the guest
as soon as it resumes. The pin goes with the tap (when the VM leaves this host, or the migration
fails here); while the VM runs here it is right anyway.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections.abc import Callable, Coroutine, Sequence
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ndmsg import NTF_MASTER, NUD_REACHABLE

from kvmotion.host.migrationview import ANNOUNCE
from kvmotion.host.taps import tap_name
from kvmotion.host.vmconfig import NicConfig
from kvmotion.mgmttls import client_context
from kvmotion.qemu.qmp import QmpSession

log = logging.getLogger(__name__)

NOTIFY_TIMEOUT_S = 2.0
TOKEN_HEADER = "X-Switchover-Token"


def nic_taps(
    uuid: str, nics: Sequence[NicConfig], bridges: dict[str, str]
) -> dict[str, list[tuple[str, str]]]:
    """The (tap, MAC) of each of a VM's NICs, by the bridge of its network on this host."""
    found: dict[str, list[tuple[str, str]]] = {}
    for index, nic in enumerate(nics):
        if nic.network in bridges:
            found.setdefault(bridges[nic.network], []).append((tap_name(uuid, index), nic.mac))
    return found


def rarp_frame(mac: str) -> bytes:
    """A RARP request from ``mac`` (what QEMU's announce-self sends), broadcast."""
    raw = bytes.fromhex(mac.replace(":", ""))
    # hardware type 1, protocol IPv4, lengths 6 and 4, opcode 3 (reverse request)
    body = bytes.fromhex("0001080006040003") + raw + bytes(4) + raw + bytes(4)
    return b"\xff" * 6 + raw + b"\x80\x35" + body + bytes(18)


async def _pin(ipr: AsyncIPRoute, tap: str, mac: str) -> None:
    """Point ``mac`` at ``tap`` on its bridge: a learned (dynamic) entry, not a static one, so
    that it ages and moves like any other. A static entry moves too (to the uplink, when the VM
    runs elsewhere later) but never ages out: every VM that ever left a host stayed in its
    bridge's table for good."""
    index = socket.if_nametoindex(tap)
    await ipr.fdb("replace", ifindex=index, lladdr=mac, state=NUD_REACHABLE, flags=NTF_MASTER)


async def take_traffic(bridges: dict[str, list[tuple[str, str]]]) -> float | None:
    """Pin each (tap, MAC) to its tap on its bridge and announce the MAC from there; return
    when (wall clock) the last announce left. None (and logged) where it cannot: a bridge that
    is not a Linux bridge (Open vSwitch) keeps what it has, and QEMU's announce after the
    resume teaches the network as before.

    In the stun, so in this process and in this event loop: one netlink request and one frame
    per NIC (a ``bridge`` command and a thread cost 5-30 ms here under a migration's load,
    during which the user's frames still went to the stopped source and were lost)."""
    announced = None
    try:
        async with AsyncIPRoute() as ipr:
            for bridge, taps_macs in bridges.items():
                with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
                    sock.bind((bridge, 0))
                    for tap, mac in taps_macs:
                        await _pin(ipr, tap, mac)
                        sock.send(rarp_frame(mac))
                        announced = time.time()
    except (OSError, NetlinkError) as exc:
        log.warning("cannot take the VM's traffic at the switchover: %s", exc)
        return None
    return announced


async def resume_here(qmp: QmpSession) -> None:
    """Run the guest here and announce it: a source after a failed migration (the destination
    may have taken its traffic at the stun), or a destination's copy resumed after a restart."""
    await qmp.execute("cont")
    await qmp.execute("announce-self", ANNOUNCE)


def teller(
    url: str | None, token: str | None, tls_dir: Path
) -> Callable[[], Coroutine[Any, Any, None]] | None:
    """What the source calls at the stun (None when the center gave no destination to tell).
    An https URL gets its TLS context (the cluster CA and this host's client certificate from
    ``tls_dir``) made here, before the stun: loading it is not the guest's downtime."""
    if not (url and token):
        return None
    tls = None
    if url.startswith("https://"):
        try:
            tls = client_context(tls_dir)
        except (OSError, ssl.SSLError) as exc:
            log.warning("cannot tell the destination at %s: no TLS credentials: %s", url, exc)
            return None
    return partial(tell_destination, url, token, tls)


async def tell_destination(url: str, token: str, tls: ssl.SSLContext | None = None) -> None:
    """The source: the guest just stopped here; the destination takes its traffic. Best
    effort: without it the user's traffic still finds the VM once QEMU announces it there.

    Called inside the stun, so it costs the event loop next to nothing: one HTTP/1.1 request
    on a fresh connection (no client library to set up; over TLS with ``tls`` for an https
    URL), its answer read after."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        log.warning("cannot tell the destination at %s: http:// or https:// only", url)
        return
    if parts.scheme == "https" and tls is None:
        log.warning("cannot tell the destination at %s: https without a TLS context", url)
        return
    request = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n{TOKEN_HEADER}: {token}\r\n"
        "Content-Length: 0\r\nConnection: close\r\n\r\n"
    ).encode()
    port = parts.port or (443 if tls else 80)
    try:
        async with asyncio.timeout(NOTIFY_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(
                parts.hostname, port, ssl=tls if parts.scheme == "https" else None
            )
            try:
                writer.write(request)
                status = (await reader.readline()).decode(errors="replace").split()
            finally:
                writer.close()
        if status[1:2] != ["204"]:
            log.warning("the destination did not take the traffic: %s", " ".join(status))
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        log.warning("could not tell the destination to take the traffic: %s", exc)
