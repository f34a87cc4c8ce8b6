"""The QEMU guest agent (qemu-ga in the guest), reached through its virtio-serial channel.

QEMU exposes the guest's port ``org.qemu.guest_agent.0`` as a unix socket on the host
(``RunFiles.guest_agent_socket``). The protocol is QMP's JSON, one object a line, with no greeting
and no capabilities: a request is answered ``{"return": ...}`` (``{}`` when a command returns
nothing) or ``{"error": {"class": ..., "desc": ...}}``.

The channel outlives its clients: the agent may hold answers for a client that went away, or half
of an earlier client's request. So a session begins with :meth:`GuestAgent.sync`: a 0xFF byte
resets the agent's parser, the agent puts a 0xFF before its answer to ``guest-sync-delimited``, and
everything up to the answer carrying our random id is skipped.

A guest without an agent accepts writes and never answers, and QEMU serves one client at a time
(a second one's connect() and requests wait until the first leaves): connecting and every call
are bounded by a timeout. A call that timed out (or was cancelled) closes the session, since its
answer may still come and would be read as the next call's; open a new :class:`GuestAgent` to
try again.

Errors: :class:`GuestAgentUnavailable` (no socket, no answer in time, channel closed) and
:class:`GuestAgentError` (the agent refused a command, or answered something unreadable), both
:class:`~kvmotion.errors.QemuError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from kvmotion.errors import QemuError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
MAX_LINE = 1 << 20  # the longest answer read; longer stale output is skipped unread
SENTINEL = b"\xff"  # never part of UTF-8 JSON
T = TypeVar("T")


class GuestAgentUnavailable(QemuError):
    """No guest agent answered: no socket, no answer in time, or the channel closed."""

    code = "guest_agent_unavailable"


class GuestAgentError(QemuError):
    """The guest agent refused a command, or answered something this client cannot read."""

    code = "guest_agent_error"


@dataclass(frozen=True)
class GuestAddress:
    address: str
    family: Literal["ipv4", "ipv6"]
    prefix: int

    @classmethod
    def parse(cls, raw: Any) -> GuestAddress:
        family = raw["ip-address-type"]
        if family not in ("ipv4", "ipv6"):
            raise ValueError(family)
        address = str(raw["ip-address"])
        ipaddress.ip_address(address)  # ValueError when it is none
        return cls(address, family, int(raw["prefix"]))


@dataclass(frozen=True)
class GuestInterface:
    name: str
    mac: str | None  # none on interfaces without one (tunnels)
    ip_addresses: tuple[GuestAddress, ...]

    @classmethod
    def parse(cls, raw: Any) -> GuestInterface:
        mac = raw.get("hardware-address")
        ips = tuple(GuestAddress.parse(a) for a in raw.get("ip-addresses", []))
        return cls(str(raw["name"]), None if mac is None else str(mac), ips)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The bare addresses (no prefix length), IPv4 and IPv6."""
        return tuple(a.address for a in self.ip_addresses)

    @property
    def loopback(self) -> bool:
        """Linux's ``lo``, or loopback addresses only (Windows' "Loopback Pseudo-Interface 1")."""
        ips = [ipaddress.ip_address(a) for a in self.addresses]
        return self.name == "lo" or (bool(ips) and all(ip.is_loopback for ip in ips))


@dataclass(frozen=True)
class ClockSync:
    step_s: float  # this host's time minus the guest's, before the correction
    round_trip_s: float  # how long reading the guest's clock took


class GuestAgent:
    """A session with a guest's agent: ``async with GuestAgent(path) as ga: await ga.ping()``.

    Entering connects and syncs; leaving closes the socket. Calls from several tasks take turns,
    one request on the channel at a time. ``timeout`` bounds connecting, the sync and each call.
    """

    def __init__(self, path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.path = path
        self.timeout = timeout
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> GuestAgent:
        opening = asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
        try:  # connect() waits while QEMU's listen backlog is full
            self._reader, self._writer = await asyncio.wait_for(opening, self.timeout)
        except (OSError, TimeoutError) as exc:
            raise GuestAgentUnavailable(f"cannot connect to {self.path}: {exc!r}") from exc
        await self.sync()  # closes the session when it fails
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._writer is None

    def close(self) -> None:
        """Close the socket (again is harmless); later calls raise GuestAgentUnavailable."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def sync(self) -> None:
        """Skip what the channel holds, up to the answer to a fresh ``guest-sync-delimited``
        (the agent may answer our leading 0xFF with a parse error: skipped with the rest)."""
        ident = secrets.randbits(52)
        request = {"execute": "guest-sync-delimited", "arguments": {"id": ident}}

        async def answer(reader: asyncio.StreamReader) -> None:
            while True:
                await _skip_past_sentinel(reader)
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError:
                    continue  # a stale answer too long to be ours
                try:  # a stale answer cut short runs into our sentinel: take what follows it
                    reply = json.loads(line.rsplit(SENTINEL, 1)[-1])
                except ValueError:
                    continue
                if isinstance(reply, dict) and reply.get("return") == ident:
                    return

        await self._call("guest-sync-delimited", SENTINEL + _encode(request), answer, self.timeout)

    async def execute(
        self, command: str, args: dict[str, Any] | None = None, timeout: float | None = None
    ) -> Any:
        """Run ``command``: its ``return`` value (JSON; ``{}`` when it returns nothing).

        Raises GuestAgentError when the agent refuses (the session stays usable), and
        GuestAgentUnavailable without an answer within ``timeout`` (default: the session's).
        Commands that never answer on success (guest-shutdown, guest-suspend-*) would time out.
        """
        request: dict[str, Any] = {"execute": command}
        if args is not None:
            request["arguments"] = args
        limit = self.timeout if timeout is None else timeout
        reply = await self._call(command, _encode(request), _read_reply, limit)
        if "error" in reply:
            kind, desc = reply["error"].get("class"), reply["error"].get("desc")
            raise GuestAgentError(
                f"the guest agent refused {command}: {kind}: {desc}", command=command, qga=kind
            )
        return reply["return"]

    async def ping(self) -> None:
        await self.execute("guest-ping")

    async def get_time(self) -> int:
        """The guest's system time, in nanoseconds since the epoch."""
        return await self._query("guest-get-time", _nanoseconds)

    async def set_time(self, ns: int | None, timeout: float | None = None) -> None:
        """Set the guest's system time to ``ns`` since the epoch (None: from its RTC); the agent
        then writes the RTC with ``hwclock``, slow under TCG."""
        await self.execute("guest-set-time", None if ns is None else {"time": ns}, timeout)

    async def network_interfaces(self) -> list[GuestInterface]:
        return await self._query("guest-network-get-interfaces", _interfaces)

    async def os_info(self) -> dict[str, str]:
        """``guest-get-osinfo``: id, pretty-name, version-id, kernel-release... as the guest
        says (os-release and uname), each only when it knows it."""
        return await self._query("guest-get-osinfo", _strings)

    async def _query(self, command: str, parse: Callable[[Any], T]) -> T:
        raw = await self.execute(command)
        try:
            return parse(raw)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise GuestAgentError(f"cannot read the answer to {command}: {raw!r:.200}") from exc

    async def _call(
        self, what: str, request: bytes, answer: Callable[[asyncio.StreamReader], Awaitable[T]],
        timeout: float,
    ) -> T:  # fmt: skip
        """Send ``request`` and read its answer within ``timeout``, one call at a time. A failure
        on the way leaves the stream at an unknown place: it closes the session."""
        async with self._lock:
            reader, writer = self._reader, self._writer
            if reader is None or writer is None:
                raise GuestAgentUnavailable(f"the guest agent session at {self.path} is closed")

            async def exchange() -> T:
                writer.write(request)
                await writer.drain()  # waits while QEMU reads nothing from the socket
                return await answer(reader)

            try:
                return await asyncio.wait_for(exchange(), timeout)
            except BaseException as exc:  # cancelled or unreadable too: the place is lost
                self.close()
                if isinstance(exc, TimeoutError):
                    raise GuestAgentUnavailable(
                        f"no answer to {what} from a guest agent at {self.path} in {timeout:g} s"
                        " (is qemu-guest-agent running in the guest?)"
                    ) from exc
                if isinstance(exc, OSError | EOFError):
                    raise GuestAgentUnavailable(
                        f"the guest agent channel at {self.path} failed during {what}: {exc!r}"
                    ) from exc
                raise


# qemu-ga's guest-set-time also writes the guest's RTC (hwclock), which waits for a second's
# edge and, in a loaded guest under TCG, was seen to take over 5 s: the set gets this long.
SET_TIME_TIMEOUT_S = 30.0


async def sync_guest_clock(
    path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT_S,
    set_timeout: float = SET_TIME_TIMEOUT_S,
    now_ns: Callable[[], int] = time.time_ns,
) -> ClockSync | None:
    """Step the guest's clock to this host's, as VMware Tools does after a vMotion; the step.

    The step is this host's time at the middle of the guest's read minus the guest's time; the
    guest is then set to this host's time as the request leaves. ``timeout`` bounds each answer
    but the set's (``set_timeout``), so a guest without an agent costs about ``timeout``. Never
    raises for the agent: None when none answers, or it refuses, or the set is not confirmed
    (the last two logged at warning).
    """
    measured: ClockSync | None = None
    try:
        async with GuestAgent(path, timeout=timeout) as ga:
            before = now_ns()
            guest = await ga.get_time()
            after = now_ns()
            step_ns = before - guest + (after - before) // 2
            measured = ClockSync(step_s=step_ns / 1e9, round_trip_s=(after - before) / 1e9)
            await ga.set_time(now_ns(), timeout=set_timeout)
    except QemuError as exc:
        if measured is not None:
            log.warning("setting the guest clock at %s (%+.3f s off) was not confirmed: %s",
                        path, measured.step_s, exc.message)  # fmt: skip
        elif isinstance(exc, GuestAgentUnavailable):  # a guest without an agent: normal
            log.debug("guest clock at %s left as it was: %s", path, exc.message)
        else:
            log.warning("guest clock at %s not read: %s", path, exc.message)
        return None
    log.info(
        "guest clock at %s set to this host's: it was %+.3f s off (read in %.1f ms)",
        path, measured.step_s, measured.round_trip_s * 1e3,
    )  # fmt: skip
    return measured


async def guest_addresses(
    path: Path, timeout: float = DEFAULT_TIMEOUT_S
) -> list[GuestInterface] | None:
    """The guest's interfaces and addresses, loopback left out; None when no agent answers (or
    it refuses)."""
    try:
        async with GuestAgent(path, timeout=timeout) as ga:
            interfaces = await ga.network_interfaces()
    except QemuError as exc:
        log.debug("no addresses from the guest agent at %s: %s", path, exc.message)
        return None
    return [i for i in interfaces if not i.loopback]


def _encode(request: dict[str, Any]) -> bytes:
    return json.dumps(request).encode() + b"\n"


async def _skip_past_sentinel(reader: asyncio.StreamReader) -> None:
    while True:
        try:
            await reader.readuntil(SENTINEL)
            return
        except asyncio.LimitOverrunError as exc:
            await reader.readexactly(exc.consumed)  # stale output longer than MAX_LINE: drop it


async def _read_reply(reader: asyncio.StreamReader) -> dict[str, Any]:
    try:
        line = await reader.readuntil(b"\n")
        reply = json.loads(line)
    except (asyncio.LimitOverrunError, ValueError) as exc:
        raise GuestAgentError(f"unreadable guest agent answer: {exc}") from exc
    if isinstance(reply, dict) and ("return" in reply or isinstance(reply.get("error"), dict)):
        return reply
    raise GuestAgentError(f"unexpected guest agent answer {line[:200]!r}")


def _nanoseconds(raw: Any) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise TypeError(raw)
    return raw


def _interfaces(raw: Any) -> list[GuestInterface]:
    return [GuestInterface.parse(i) for i in raw]


def _strings(raw: Any) -> dict[str, str]:
    return {str(k): v for k, v in raw.items() if isinstance(v, str)}
