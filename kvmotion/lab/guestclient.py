"""A synchronous client for guestd, the lab guest program (protocol: docs/guest.md).

One request line in, one response line out. Every ``OK`` response carries the guest's global
response counter ``n``, its CLOCK_MONOTONIC ``t`` and CLOCK_REALTIME ``rt`` (nanoseconds), then
command fields as ``key=value``. Responses are parsed here, once, into frozen dataclasses.

:class:`PingLoop` runs a PING every 10 ms on one connection in a thread and summarises what a
user would have seen during a migration: answers lost, the longest silence, and whether the
connection survived (it never reconnects, so a drop is reported, not hidden).

Raises :class:`kvmotion.errors.LabError` with code ``guest_error`` (guestd answered ``ERR``),
``guest_protocol`` (an answer that does not parse) or ``guest_unreachable`` (connect, send,
receive failed or timed out).
"""

from __future__ import annotations

import itertools
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

from kvmotion.errors import LabError

DEFAULT_PORT = 7000
MAX_LINE = 65536


@dataclass(frozen=True)
class Reply:
    """One ``OK`` response: counter, guest clocks, and the command's own fields."""

    n: int
    t_ns: int
    rt_ns: int
    fields: dict[str, str] = field(default_factory=dict)

    def get_int(self, key: str) -> int:
        try:
            return int(self.fields[key], 0 if self.fields[key].startswith("0x") else 10)
        except (KeyError, ValueError) as exc:
            raise _protocol(f"field {key!r} missing or not an integer in {self}") from exc

    def get_float(self, key: str) -> float:
        try:
            return float(self.fields[key])
        except (KeyError, ValueError) as exc:
            raise _protocol(f"field {key!r} missing or not a number in {self}") from exc

    def get_str(self, key: str) -> str:
        try:
            return self.fields[key]
        except KeyError as exc:
            raise _protocol(f"field {key!r} missing in {self}") from exc


@dataclass(frozen=True)
class DirtyState:
    rate_mib_s: int  # target; 0 with running=True means as fast as possible
    wss_mib: int
    running: bool
    reply: Reply


@dataclass(frozen=True)
class DirtyStat:
    pages: int  # 4 KiB page writes since guestd started
    rate_mib_s: float  # achieved over about the last second
    target_mib_s: int
    wss_mib: int
    running: bool
    reply: Reply


@dataclass(frozen=True)
class DirtyVerify:
    """The writer stopped, memory checked: every page still names its index and the pages'
    counters add up to the writes made (a write lost by a migration leaves the sum short)."""

    intact: bool
    writes: int
    sum: int
    misplaced: int
    pages: int
    reply: Reply


@dataclass(frozen=True)
class DiskStatus:
    acked: int  # last sequence number whose write and flush returned
    running: bool
    errors: int
    full: bool  # stopped at the end of the disk
    size_bytes: int
    reply: Reply


@dataclass(frozen=True)
class DiskVerify:
    ok: int
    bad: int  # first bad sequence number, 0 if none
    acked: int
    reply: Reply

    @property
    def passed(self) -> bool:
        return self.bad == 0 and self.ok == self.acked


@dataclass(frozen=True)
class GuestInfo:
    uptime_s: float
    mem_total_kib: int
    mem_avail_kib: int
    cpus: int
    kernel: str
    flags: frozenset[str]
    reply: Reply

    @property
    def fields(self) -> dict[str, str]:
        """Every raw field of the INFO answer."""
        return self.reply.fields


@dataclass(frozen=True)
class HttpReply:
    status: int
    body: str


def _protocol(message: str) -> LabError:
    return LabError(message, code="guest_protocol")


def _unreachable(message: str) -> LabError:
    return LabError(message, code="guest_unreachable")


def parse_reply(line: str) -> Reply:
    """Parse one response line (without its newline). ``ERR`` raises LabError(guest_error)."""
    if line.startswith("ERR"):
        raise LabError(f"guestd: {line[4:].strip() or 'error'}", code="guest_error")
    if not line.startswith("OK "):
        raise _protocol(f"guestd sent an unexpected line: {line[:200]!r}")
    fields: dict[str, str] = {}
    for token in line[3:].split():
        key, sep, value = token.partition("=")
        if not sep or not key:
            raise _protocol(f"guestd sent a field without '=': {token[:100]!r}")
        fields[key] = value
    try:
        n, t_ns, rt_ns = int(fields.pop("n")), int(fields.pop("t")), int(fields.pop("rt"))
    except (KeyError, ValueError) as exc:
        raise _protocol(f"guestd reply lacks n, t or rt: {line[:200]!r}") from exc
    return Reply(n, t_ns, rt_ns, fields)


class _LineReader:
    """Buffered line reading over a socket whose timeout is already set."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = bytearray()

    def pending(self) -> bool:
        return b"\n" in self._buf

    def feed(self) -> bool:
        """One recv into the buffer; False on EOF."""
        chunk = self._sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        if len(self._buf) > MAX_LINE and b"\n" not in self._buf:
            raise _protocol(f"guestd sent a line longer than {MAX_LINE} bytes")
        return True

    def pop(self) -> str | None:
        idx = self._buf.find(b"\n")
        if idx < 0:
            return None
        line = bytes(self._buf[:idx]).decode("utf-8", errors="replace").rstrip("\r")
        del self._buf[: idx + 1]
        return line


class GuestClient:
    """guestd over one connected socket (the caller's, e.g. made inside a namespace)."""

    def __init__(self, sock: socket.socket, *, timeout: float = 10.0) -> None:
        self._sock = sock
        self._sock.settimeout(timeout)
        self._reader = _LineReader(sock)

    @classmethod
    def connect(cls, host: str, port: int = DEFAULT_PORT, timeout: float = 10.0) -> GuestClient:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise _unreachable(f"cannot connect to guestd at {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, timeout=timeout)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestClient:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def request(self, line: str) -> Reply:
        """Send one request line and parse the one response line."""
        if "\n" in line or "\r" in line:
            raise LabError("a guestd request is one line", code="invalid_input")
        try:
            self._sock.sendall(line.encode() + b"\n")
            while not self._reader.pending():
                if not self._reader.feed():
                    raise _unreachable(f"guestd closed the connection (request {line!r})")
        except OSError as exc:  # includes socket timeouts
            raise _unreachable(f"guestd did not answer {line!r}: {exc}") from exc
        answer = self._reader.pop()
        assert answer is not None
        return parse_reply(answer)

    def ping(self) -> Reply:
        return self.request("PING")

    def dirty(self, rate_mib_s: int, wss_mib: int) -> DirtyState:
        """Dirty ``wss_mib`` MiB at ``rate_mib_s`` MiB/s (0 = as fast as possible)."""
        if rate_mib_s < 0 or wss_mib < 0:
            raise LabError("DIRTY rate and working set must be >= 0", code="invalid_input")
        return _dirty_state(self.request(f"DIRTY {rate_mib_s} {wss_mib}"))

    def dirty_stop(self) -> DirtyState:
        return _dirty_state(self.request("DIRTY STOP"))

    def dirty_verify(self) -> DirtyVerify:
        """Stop the writer and check that the guest's memory holds every write it made."""
        r = self.request("DIRTY VERIFY")
        return DirtyVerify(
            r.get_int("intact") == 1,
            r.get_int("writes"),
            r.get_int("sum"),
            r.get_int("misplaced"),
            r.get_int("pages"),
            r,
        )

    def dirty_stat(self) -> DirtyStat:
        r = self.request("DIRTYSTAT")
        return DirtyStat(
            r.get_int("pages"),
            r.get_float("rate"),
            r.get_int("target"),
            r.get_int("wss"),
            r.get_int("running") == 1,
            r,
        )

    def checksum(self) -> str:
        """FNV-1a 64 of the working set, as 16 hex digits."""
        return self.request("CHECKSUM").get_str("sum")

    def disk_start(self, interval_ms: int = 0) -> DiskStatus:
        if interval_ms < 0:
            raise LabError("DISK START interval must be >= 0", code="invalid_input")
        return _disk_status(self.request(f"DISK START {interval_ms}"))

    def disk_stop(self) -> int:
        """Stop the record writer; return the last acknowledged sequence number."""
        return self.request("DISK STOP").get_int("acked")

    def disk_status(self) -> DiskStatus:
        return _disk_status(self.request("DISK STATUS"))

    def disk_verify(self) -> DiskVerify:
        r = self.request("DISK VERIFY")
        return DiskVerify(r.get_int("ok"), r.get_int("bad"), r.get_int("acked"), r)

    def info(self) -> GuestInfo:
        r = self.request("INFO")
        flags = r.fields.get("flags", "-")
        return GuestInfo(
            r.get_float("uptime"),
            r.get_int("mem_total_kib"),
            r.get_int("mem_avail_kib"),
            r.get_int("cpus"),
            r.get_str("kernel"),
            frozenset() if flags == "-" else frozenset(flags.split(",")),
            r,
        )

    def quit(self) -> None:
        self.request("QUIT")
        self.close()

    @staticmethod
    def http_get(host: str, port: int = DEFAULT_PORT, timeout: float = 5.0) -> HttpReply:
        return http_get(host, port, timeout=timeout)


def _dirty_state(r: Reply) -> DirtyState:
    return DirtyState(r.get_int("rate"), r.get_int("wss"), r.get_int("running") == 1, r)


def _disk_status(r: Reply) -> DiskStatus:
    return DiskStatus(
        r.get_int("acked"),
        r.get_int("running") == 1,
        r.get_int("errors"),
        r.get_int("full") == 1,
        r.get_int("size"),
        r,
    )


def http_request(
    sock: socket.socket, host: str, path: str = "/", timeout: float = 5.0
) -> HttpReply:
    """``GET path`` over a connected socket; read until the server closes (bounded)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    data = bytearray()
    try:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        while time.monotonic() < deadline and len(data) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise _unreachable(f"HTTP GET {path} from {host} failed: {exc}") from exc
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode(errors="replace")
    parts = status_line.split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise _protocol(f"not an HTTP response from {host}: {status_line[:100]!r}")
    return HttpReply(int(parts[1]), body.decode(errors="replace"))


def http_get(
    host: str, port: int = DEFAULT_PORT, path: str = "/", timeout: float = 5.0
) -> HttpReply:
    """Is the VM's service reachable? One HTTP/1.0 GET to guestd."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise _unreachable(f"cannot connect to {host}:{port} for HTTP: {exc}") from exc
    with sock:
        return http_request(sock, host, path, timeout)


# ---------------------------------------------------------------------------------------------
# PingLoop


@dataclass(frozen=True)
class PingSample:
    sent_ns: int  # host CLOCK_MONOTONIC when the PING was sent
    reply_ns: int | None  # when its answer arrived; None if it never did
    n: int | None  # guestd's response counter in the answer
    guest_t_ns: int | None  # guestd's CLOCK_MONOTONIC in the answer


@dataclass(frozen=True)
class PingSummary:
    sent: int
    answered: int
    lost: int  # sent but never answered
    max_gap_ms: float  # longest time between two consecutive answers (host clock)
    max_guest_gap_ms: float  # the same on the guest's monotonic clock
    max_rtt_ms: float
    mean_rtt_ms: float
    duration_s: float
    same_connection: bool  # False if the connection dropped (there are no reconnects)
    n_monotonic: bool  # guestd's counter only grew (no guestd restart or VM reset)
    error: str | None


def summarize(samples: list[PingSample], *, dropped: bool, error: str | None) -> PingSummary:
    """The summary of a ping run (pure)."""
    answered = [s for s in samples if s.reply_ns is not None]
    replies = [s.reply_ns for s in answered if s.reply_ns is not None]
    rtts = [(s.reply_ns - s.sent_ns) / 1e6 for s in answered if s.reply_ns is not None]
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(replies)]
    guest = [s.guest_t_ns for s in answered if s.guest_t_ns is not None]
    guest_gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(guest)]
    ns = [s.n for s in answered if s.n is not None]
    end = max([*replies, *(s.sent_ns for s in samples)], default=0)
    start = min((s.sent_ns for s in samples), default=0)
    return PingSummary(
        sent=len(samples),
        answered=len(answered),
        lost=len(samples) - len(answered),
        max_gap_ms=max(gaps, default=0.0),
        max_guest_gap_ms=max(guest_gaps, default=0.0),
        max_rtt_ms=max(rtts, default=0.0),
        mean_rtt_ms=sum(rtts) / len(rtts) if rtts else 0.0,
        duration_s=(end - start) / 1e9,
        same_connection=not dropped,
        n_monotonic=all(b > a for a, b in itertools.pairwise(ns)),
        error=error,
    )


class PingLoop:
    """PINGs every ``interval`` seconds on one connection, in a thread, bounded in time and count.

    Requests are pipelined (sent on schedule whatever the answers do) and matched to answers in
    order, so a paused guest shows up as a gap, not as a slower schedule.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        interval: float = 0.01,
        max_duration: float = 600.0,
        max_count: int = 100_000,
        drain_timeout: float = 3.0,
        owns_socket: bool = False,
    ) -> None:
        if interval <= 0 or max_duration <= 0 or max_count <= 0 or drain_timeout < 0:
            raise LabError("PingLoop bounds must be positive", code="invalid_input")
        self._sock = sock
        # Requests are small and frequent: without NODELAY, Nagle holds them back while one is
        # unacknowledged, and a segment lost in a switchover waits for a 200 ms retransmit
        # timeout instead of a fast retransmit.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._interval = interval
        self._max_duration = max_duration
        self._max_count = max_count
        self._drain_timeout = drain_timeout
        self._owns_socket = owns_socket
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guest-ping", daemon=True)
        self._sent: list[int] = []
        self._answers: list[tuple[int, int, int]] = []  # (reply_ns, n, guest_t_ns)
        self._dropped = False
        self._error: str | None = None
        self._summary: PingSummary | None = None

    @classmethod
    def connect(
        cls,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        interval: float = 0.01,
        max_duration: float = 600.0,
        max_count: int = 100_000,
    ) -> PingLoop:
        """A loop on its own new connection, closed when the loop ends."""
        try:
            sock = socket.create_connection((host, port), timeout=10.0)
        except OSError as exc:
            raise _unreachable(f"cannot connect to guestd at {host}:{port}: {exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(
            sock,
            interval=interval,
            max_duration=max_duration,
            max_count=max_count,
            owns_socket=True,
        )

    def start(self) -> PingLoop:
        self._thread.start()
        return self

    def replies_ns(self) -> list[int]:
        """When each answer so far arrived (host CLOCK_MONOTONIC, ns), ascending."""
        return [received for received, _, _ in list(self._answers)]

    def waits_ns(self) -> list[tuple[int, int]]:
        """(sent, answered) of each request answered so far (host CLOCK_MONOTONIC, ns): how
        long each one waited, which is what a user who sends little (a keystroke) notices."""
        answers = list(self._answers)
        return [(sent, answers[i][0]) for i, sent in enumerate(list(self._sent)[: len(answers)])]

    def stop(self) -> None:
        """Stop sending; answers still in flight are awaited for up to ``drain_timeout``."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> PingSummary:
        """Wait for the loop to finish; raises LabError if it is still running at ``timeout``."""
        self._thread.join(timeout)
        if self._thread.is_alive() or self._summary is None:
            raise LabError("the ping loop did not finish in time", code="guest_unreachable")
        return self._summary

    def __enter__(self) -> PingLoop:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._thread.join(self._drain_timeout + 5.0)

    def _run(self) -> None:
        try:
            self._loop()
        except LabError as exc:
            self._error = exc.message
        except OSError as exc:
            self._dropped, self._error = True, f"connection failed: {exc}"
        finally:
            if self._owns_socket:
                self._sock.close()
            self._summary = self._summarize()

    def _summarize(self) -> PingSummary:
        samples = [
            PingSample(sent, *(self._answers[i] if i < len(self._answers) else (None, None, None)))
            for i, sent in enumerate(self._sent)
        ]
        return summarize(samples, dropped=self._dropped, error=self._error)

    def _loop(self) -> None:
        sock, reader = self._sock, _LineReader(self._sock)
        sock.settimeout(2.0)  # bounds a send into a full buffer; reads wait in select
        step = int(self._interval * 1e9)
        start = time.monotonic_ns()
        stop_sending = start + int(self._max_duration * 1e9)
        next_send = start
        drain_until: int | None = None
        while True:
            pending = len(self._sent) - len(self._answers)
            now = time.monotonic_ns()
            sending = not self._stop.is_set() and now < stop_sending
            sending = sending and len(self._sent) < self._max_count
            if not sending:
                if drain_until is None:
                    drain_until = now + int(self._drain_timeout * 1e9)
                if not pending or now >= drain_until:
                    return
            elif now >= next_send:
                sock.sendall(b"PING\n")
                self._sent.append(now)
                next_send += step
                if next_send < now - step:  # fell behind (a stalled host): no burst
                    next_send = now
                continue
            wake = drain_until if drain_until is not None else next_send
            readable, _, _ = select.select([sock], [], [], max(0, wake - now) / 1e9)
            if not readable:
                continue
            if not reader.feed():
                self._dropped, self._error = True, "guestd closed the connection"
                return
            received = time.monotonic_ns()
            while (line := reader.pop()) is not None:
                if len(self._answers) >= len(self._sent):
                    raise _protocol(f"guestd answered a PING never sent: {line[:100]!r}")
                reply = parse_reply(line)
                self._answers.append((received, reply.n, reply.t_ns))
