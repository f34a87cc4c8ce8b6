"""The user's view from the network: ICMP echo to a guest every 10 ms, from the lab's client.

A TCP client (guestclient.PingLoop) shows what an application sees, retransmissions included; ICMP
shows when the guest answered at all, with nothing resent. Together they tell a migration's pause
(the guest did not run, or frames went to the host it left) from TCP's recovery after it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import threading
import time

from kvmotion.lab import netns

PAYLOAD = b"kvmotion-icmp-probe"


def longest_gap_ms(replies_ns: list[int], since_ns: int = 0, until_ns: int | None = None) -> float:
    """The longest time between consecutive replies (ns timestamps, ascending) that end after
    ``since_ns`` and start before ``until_ns``, in ms; the time from ``since_ns`` to the first
    reply and from the last to ``until_ns`` count too (a guest that stopped answering)."""
    end = until_ns if until_ns is not None else (replies_ns[-1] if replies_ns else since_ns)
    inside = [r for r in replies_ns if since_ns <= r <= end]
    points = [since_ns, *inside, end] if since_ns else [*inside, end]
    return max((b - a for a, b in itertools.pairwise(points)), default=0) / 1e6


class IcmpProbe:
    """Echo requests every ``interval`` s from namespace ``ns`` to ``address``, in a thread,
    for at most ``max_duration`` s; replies are kept with their arrival times."""

    def __init__(
        self, ns: str, address: str, *, interval: float = 0.01, max_duration: float = 600.0
    ) -> None:
        self.address = address
        self._interval, self._max_duration = interval, max_duration
        self._sock = netns.socket_in_netns(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        self._ident = (os.getpid() ^ id(self)) & 0xFFFF
        self.sent = 0
        self.replies_ns: list[int] = []  # arrival times of answered requests, ascending
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="icmp-probe", daemon=True)

    def start(self) -> IcmpProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._sock.close()

    def longest_gap_ms(self, since_ns: int = 0, until_ns: int | None = None) -> float:
        return longest_gap_ms(list(self.replies_ns), since_ns, until_ns)

    def _packet(self, seq: int) -> bytes:
        header = struct.pack("!BBHHH", 8, 0, 0, self._ident, seq)
        checksum = netns._icmp_checksum(header + PAYLOAD)
        return struct.pack("!BBHHH", 8, 0, checksum, self._ident, seq) + PAYLOAD

    def _run(self) -> None:
        step = int(self._interval * 1e9)
        start = next_send = time.monotonic_ns()
        stop_at = start + int(self._max_duration * 1e9)
        while not self._stop.is_set() and (now := time.monotonic_ns()) < stop_at:
            if now >= next_send:
                self.sent += 1
                with contextlib.suppress(OSError):  # a route that comes and goes: the gap shows
                    self._sock.sendto(self._packet(self.sent & 0xFFFF), (self.address, 0))
                next_send = max(next_send + step, now - step)
                continue
            readable, _, _ = select.select([self._sock], [], [], (next_send - now) / 1e9)
            if not readable:
                continue
            data, peer = self._sock.recvfrom(2048)
            ihl = (data[0] & 0x0F) * 4
            if peer[0] != self.address or len(data) < ihl + 8:
                continue
            kind, _, _, ident, _ = struct.unpack("!BBHHH", data[ihl : ihl + 8])
            if kind == 0 and ident == self._ident:
                self.replies_ns.append(time.monotonic_ns())
