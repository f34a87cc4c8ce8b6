"""The guestd client against a tiny fake guestd on 127.0.0.1 (no VM, no root)."""

from __future__ import annotations

import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvmotion.errors import LabError
from kvmotion.lab.guestclient import (
    GuestClient,
    PingLoop,
    PingSample,
    http_get,
    parse_reply,
    summarize,
)

# (request line, connection's line index) -> response line, or None to close the connection
Script = Callable[[str, int], str | None]


class FakeGuestd:
    """A thread that answers like guestd: one line per request, a global counter ``n``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.counter = itertools.count(1)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.accepted = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def ok(self, extra: str = "") -> str:
        now = time.monotonic_ns()
        return f"OK n={next(self.counter)} t={now} rt={time.time_ns()}{extra}"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            self.accepted += 1
            th = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            th.start()
            self.threads.append(th)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.2)
        buf = b""
        index = 0
        with conn:
            while not self.stopping.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    answer = self.script(line.decode(), index)
                    index += 1
                    if answer is None:
                        return
                    try:
                        conn.sendall(answer.encode() + b"\n")
                    except OSError:
                        return

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(2)
        for th in self.threads:
            th.join(2)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Script], FakeGuestd]]:
    servers: list[FakeGuestd] = []

    def start(script: Script) -> FakeGuestd:
        server = FakeGuestd(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def guestd_like(fake: list[FakeGuestd]) -> Script:
    answers = {
        "PING": "",
        "DIRTY 50 32": " rate=50 wss=32 running=1",
        "DIRTY STOP": " rate=0 wss=32 running=0",
        "DIRTYSTAT": " pages=12800 rate=49.87 target=50 wss=32 running=1",
        "CHECKSUM": " sum=00ab00cd00ef0012 wss=32 running=0",
        "DISK START 0": " interval=0 direct=1 acked=0 running=1 errors=0 full=0 size=67108864",
        "DISK STOP": " acked=812 running=0 errors=0 full=0 size=67108864 last_errno=0",
        "DISK STATUS": " acked=812 running=0 errors=2 full=1 size=67108864 last_errno=5",
        "DISK VERIFY": " ok=812 bad=0 nbad=0 acked=812",
        "INFO": " uptime=6.5 mem_total_kib=223620 mem_avail_kib=196028 cpus=1 kernel=6.1.0"
        " port=7000 nflags=3 flags=fpu,sse2,lm",
    }

    def script(line: str, _index: int) -> str | None:
        if line in answers:
            return fake[0].ok(answers[line])
        return "ERR unknown command"

    return script


def test_parse_reply() -> None:
    r = parse_reply("OK n=3 t=100 rt=200 sum=ff acked=7")
    assert (r.n, r.t_ns, r.rt_ns) == (3, 100, 200)
    assert r.fields == {"sum": "ff", "acked": "7"}
    assert r.get_int("acked") == 7
    with pytest.raises(LabError) as err:
        r.get_int("missing")
    assert err.value.code == "guest_protocol"


@pytest.mark.parametrize(
    ("line", "code"),
    [
        ("ERR bad number", "guest_error"),
        ("HELLO", "guest_protocol"),
        ("OK t=1 rt=2", "guest_protocol"),
        ("OK n=1 t=x rt=2", "guest_protocol"),
        ("OK n=1 t=1 rt=2 junk", "guest_protocol"),
    ],
)
def test_parse_reply_errors(line: str, code: str) -> None:
    with pytest.raises(LabError) as err:
        parse_reply(line)
    assert err.value.code == code


def test_client_commands(serve: Callable[[Script], FakeGuestd]) -> None:
    holder: list[FakeGuestd] = []
    holder.append(serve(guestd_like(holder)))
    with GuestClient.connect("127.0.0.1", holder[0].port, timeout=2) as client:
        first, second = client.ping(), client.ping()
        assert second.n == first.n + 1 and second.t_ns >= first.t_ns
        state = client.dirty(50, 32)
        assert (state.rate_mib_s, state.wss_mib, state.running) == (50, 32, True)
        stat = client.dirty_stat()
        assert stat.pages == 12800 and stat.rate_mib_s == pytest.approx(49.87) and stat.running
        assert not client.dirty_stop().running
        assert client.checksum() == "00ab00cd00ef0012"
        assert client.disk_start(0).running
        assert client.disk_stop() == 812
        status = client.disk_status()
        assert (status.acked, status.errors, status.full, status.running) == (812, 2, True, False)
        verify = client.disk_verify()
        assert verify.passed and verify.ok == 812
        info = client.info()
        assert info.flags == frozenset({"fpu", "sse2", "lm"}) and info.cpus == 1
        assert info.uptime_s == pytest.approx(6.5) and info.fields["port"] == "7000"
        with pytest.raises(LabError) as err:
            client.request("BOGUS")
        assert err.value.code == "guest_error"
        assert client.ping().n > second.n  # the connection stays usable after ERR
        with pytest.raises(LabError):
            client.request("PING\nPING")
        with pytest.raises(LabError):
            client.dirty(-1, 3)


def test_client_reports_a_closed_connection(serve: Callable[[Script], FakeGuestd]) -> None:
    server = serve(lambda line, i: None if i == 1 else "OK n=1 t=1 rt=1")
    with GuestClient.connect("127.0.0.1", server.port, timeout=2) as client:
        client.ping()
        with pytest.raises(LabError) as err:
            client.ping()
        assert err.value.code == "guest_unreachable"


def test_client_times_out(serve: Callable[[Script], FakeGuestd]) -> None:
    def slow(_line: str, _i: int) -> str:
        time.sleep(0.6)
        return "OK n=1 t=1 rt=1"

    server = serve(slow)
    with GuestClient.connect("127.0.0.1", server.port, timeout=0.2) as client:
        started = time.monotonic()
        with pytest.raises(LabError) as err:
            client.ping()
        assert err.value.code == "guest_unreachable"
        assert time.monotonic() - started < 0.5


def test_connect_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LabError) as err:
        GuestClient.connect("127.0.0.1", port, timeout=1)
    assert err.value.code == "guest_unreachable"


def test_http_get() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def answer() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(2)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(1024)
            body = b"kvmotion guestd n=1 t=2 rt=3\n"
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    try:
        reply = http_get("127.0.0.1", port, timeout=2)
    finally:
        th.join(2)
        listener.close()
    assert reply.status == 200 and reply.body.startswith("kvmotion guestd n=1")


# ---------------------------------------------------------------------------------------------
# PingLoop


def sample(sent_ms: float, reply_ms: float | None, n: int | None) -> PingSample:
    def ns(ms: float | None) -> int | None:
        return None if ms is None else int(ms * 1e6)

    return PingSample(int(sent_ms * 1e6), ns(reply_ms), n, ns(reply_ms))


def test_summarize_math() -> None:
    samples = [
        sample(0, 1, 1),
        sample(10, 11, 2),
        sample(20, 321, 3),  # a 300 ms pause (a switchover)
        sample(30, 321.5, 4),
        sample(40, 41, 5),  # answered before, but here after: gap measured on reply times
        sample(50, None, None),
    ]
    s = summarize(samples, dropped=True, error="guestd closed the connection")
    assert (s.sent, s.answered, s.lost) == (6, 5, 1)
    assert s.max_gap_ms == pytest.approx(310.0)
    assert s.max_rtt_ms == pytest.approx(301.0)
    assert s.mean_rtt_ms == pytest.approx((1 + 1 + 301 + 291.5 + 1) / 5)
    assert s.duration_s == pytest.approx(0.3215)
    assert not s.same_connection and s.n_monotonic
    assert s.error == "guestd closed the connection"


def test_summarize_counter_going_back() -> None:
    s = summarize([sample(0, 1, 5), sample(10, 11, 1)], dropped=False, error=None)
    assert not s.n_monotonic and s.same_connection and s.lost == 0


def test_summarize_empty() -> None:
    s = summarize([], dropped=False, error=None)
    assert (s.sent, s.answered, s.lost, s.max_gap_ms, s.duration_s) == (0, 0, 0, 0.0, 0.0)


def test_ping_loop_clean(serve: Callable[[Script], FakeGuestd]) -> None:
    holder: list[FakeGuestd] = []
    holder.append(serve(lambda line, i: holder[0].ok()))
    loop = PingLoop.connect("127.0.0.1", holder[0].port, interval=0.005, max_count=60)
    summary = loop.start().join(timeout=10)
    assert (summary.sent, summary.answered, summary.lost) == (60, 60, 0)
    assert summary.same_connection and summary.n_monotonic and summary.error is None
    assert summary.max_gap_ms < 200
    assert 0.2 < summary.duration_s < 5
    assert holder[0].accepted == 1


def test_ping_loop_sees_a_pause(serve: Callable[[Script], FakeGuestd]) -> None:
    holder: list[FakeGuestd] = []

    def pausing(_line: str, index: int) -> str:
        if index == 20:
            time.sleep(0.3)  # the guest is stunned; pings keep being sent meanwhile
        return holder[0].ok()

    holder.append(serve(pausing))
    with socket.create_connection(("127.0.0.1", holder[0].port)) as sock:
        loop = PingLoop(sock, interval=0.01, max_duration=0.8)
        summary = loop.start().join(timeout=10)
    assert summary.lost == 0 and summary.same_connection
    assert 250 <= summary.max_gap_ms < 1000
    assert 50 <= summary.sent <= 85  # about 0.8 s / 10 ms, bounded by max_duration
    waits = loop.waits_ns()
    assert len(waits) == summary.answered
    assert all(answered >= sent for sent, answered in waits)
    assert (waits[20][1] - waits[20][0]) / 1e6 >= 250  # the request the pause held
    assert (waits[-1][1] - waits[-1][0]) / 1e6 < 250  # and the ones after it did not wait


def test_ping_loop_reports_a_drop(serve: Callable[[Script], FakeGuestd]) -> None:
    holder: list[FakeGuestd] = []
    holder.append(serve(lambda line, i: None if i == 15 else holder[0].ok()))
    loop = PingLoop.connect("127.0.0.1", holder[0].port, interval=0.005, max_count=1000)
    summary = loop.start().join(timeout=10)
    assert not summary.same_connection
    assert summary.answered == 15 and summary.lost == summary.sent - 15 >= 1
    assert summary.error is not None
    assert summary.sent < 1000


def test_ping_loop_stop_and_context(serve: Callable[[Script], FakeGuestd]) -> None:
    holder: list[FakeGuestd] = []
    holder.append(serve(lambda line, i: holder[0].ok()))
    with socket.create_connection(("127.0.0.1", holder[0].port)) as sock:
        with PingLoop(sock, interval=0.01, max_duration=30) as loop:
            time.sleep(0.2)
        summary = loop.join(timeout=1)
    assert 5 <= summary.sent <= 40 and summary.lost == 0


def test_ping_loop_bounds_are_checked() -> None:
    with socket.socket() as sock, pytest.raises(LabError):
        PingLoop(sock, interval=0)
