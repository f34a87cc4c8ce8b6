"""kvmotion/qemu/qga.py against a fake qemu-ga behind a unix socket, as QEMU's chardev presents it:
stale output, answers split across writes, refusals, an agent that never answers, no socket."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmotion.errors import QemuError
from kvmotion.qemu.qga import (
    MAX_LINE,
    GuestAddress,
    GuestAgent,
    GuestAgentError,
    GuestAgentUnavailable,
    GuestInterface,
    guest_addresses,
    sync_guest_clock,
)

pytestmark = pytest.mark.timeout(15)

Handler = Callable[[dict[str, Any]], Any]
PARSE_ERROR = {"error": {"class": "GenericError", "desc": "JSON parse error, stray '\\xff'"}}


class FakeAgent:
    """qemu-ga as the host sees it: JSON lines in, JSON lines out; a 0xFF before the answer to
    guest-sync-delimited. A 0xFF before a request resets its parser and, as qemu-ga's lexer does,
    earns a parse error. ``handler`` answers the other requests: an object (may be a coroutine),
    raw bytes, or None to keep quiet; ``silent``: no agent at all, nothing is ever answered."""

    def __init__(
        self,
        path: Path,
        handler: Handler | None = None,
        *,
        stale: bytes = b"",
        chunk: int = 0,
        silent: bool = False,
        flush_error: bool = True,
    ) -> None:
        self.path = path
        self.handler: Handler = handler or (lambda request: {"return": {}})
        self.stale = stale  # left in the channel by an earlier client
        self.chunk = chunk  # write answers this many bytes at a time
        self.silent = silent
        self.flush_error = flush_error  # older agents answer a stray 0xFF with nothing
        self.requests: list[dict[str, Any]] = []
        self.flushes = 0
        self.hung_up = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeAgent:
        self._server = await asyncio.start_unix_server(self._accept, str(self.path))
        return self

    async def __aexit__(self, *_: object) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def commands(self) -> list[str]:
        return [r["execute"] for r in self.requests]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(self.stale)
            while line := await reader.readline():
                if self.silent:
                    continue
                if line.startswith(b"\xff"):
                    self.flushes += 1
                    line = line.lstrip(b"\xff")
                    if self.flush_error:
                        await self._send(writer, PARSE_ERROR)
                request = json.loads(line)
                self.requests.append(request)
                if request["execute"] == "guest-sync-delimited":
                    await self._send(writer, {"return": request["arguments"]["id"]}, b"\xff")
                    continue
                answer = self.handler(request)
                if inspect.isawaitable(answer):
                    answer = await answer
                if answer is not None:
                    await self._send(writer, answer)
            self.hung_up.set()
        except ConnectionError:  # the client left before an answer
            self.hung_up.set()
        finally:
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, answer: Any, prefix: bytes = b"") -> None:
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode() + b"\n"
        data = prefix + data
        step = self.chunk or len(data)
        for i in range(0, len(data), step):
            writer.write(data[i : i + step])
            await writer.drain()
            if self.chunk:
                await asyncio.sleep(0.001)  # so that the client reads it in pieces


STALE = {  # what an earlier client left in the channel, and whether the 0xFF earns an error
    "clean": (b"", True),
    "answers and half a line for an earlier client": (b'{"return": 1234}\n{"retu', True),
    "an earlier client's sync answer": (b'\xff{"return": 99}\n', True),
    "a sync answer cut short, the parse error next": (b'{"return": 5}\n\xff{"retu', True),
    "a sync answer cut short, ours next": (b'{"return": 5}\n\xff{"retu', False),
    "more junk than a line may hold": (
        b"x" * (2 * MAX_LINE) + b'\xff{"return": "' + b"y" * (2 * MAX_LINE) + b'"}\n',
        True,
    ),
}


@pytest.mark.parametrize(("stale", "flush_error"), STALE.values(), ids=STALE.keys())
async def test_sync_skips_stale_output_and_answers_come_in_pieces(
    tmp_path: Path, stale: bytes, flush_error: bool
) -> None:
    fake = FakeAgent(
        tmp_path / "qga.sock",
        lambda r: {"return": 42_000_000_000},
        stale=stale,
        chunk=3,
        flush_error=flush_error,
    )
    async with fake, GuestAgent(fake.path, timeout=3) as ga:
        assert await ga.get_time() == 42_000_000_000
        assert await ga.get_time() == 42_000_000_000
    assert fake.commands == ["guest-sync-delimited", "guest-get-time", "guest-get-time"]
    assert fake.flushes == 1  # the client reset the agent's parser before its sync


async def test_a_refusal_names_the_agent_error_and_keeps_the_session(tmp_path: Path) -> None:
    def handler(request: dict[str, Any]) -> Any:
        if request["execute"] == "guest-set-time":
            return {"error": {"class": "GenericError", "desc": "hwclock failed"}}
        return {"return": {}}

    async with FakeAgent(tmp_path / "qga.sock", handler) as fake, GuestAgent(fake.path) as ga:
        with pytest.raises(
            GuestAgentError, match="guest-set-time: GenericError: hwclock failed"
        ) as e:
            await ga.set_time(1)
        assert isinstance(e.value, QemuError) and e.value.code == "guest_agent_error"
        assert not ga.closed
        await ga.ping()  # the next call is answered


async def test_a_guest_without_an_agent_is_unavailable_within_the_timeout(tmp_path: Path) -> None:
    loop = asyncio.get_running_loop()
    async with FakeAgent(tmp_path / "qga.sock", silent=True) as fake:
        with pytest.raises(GuestAgentUnavailable, match="no answer to guest-sync-delimited"):
            async with GuestAgent(fake.path, timeout=0.2):
                pass
        start = loop.time()
        assert await sync_guest_clock(fake.path, timeout=0.5) is None
        took = loop.time() - start
        assert await guest_addresses(fake.path, timeout=0.2) is None
    assert 0.45 < took < 1.5


async def test_a_call_that_timed_out_closes_the_session(tmp_path: Path) -> None:
    async def slowly(request: dict[str, Any]) -> Any:
        await asyncio.sleep(0.5)
        return {"return": 1}

    async with FakeAgent(tmp_path / "qga.sock", slowly) as fake, GuestAgent(fake.path) as ga:
        with pytest.raises(GuestAgentUnavailable, match=r"no answer to guest-get-time .* 0\.1 s"):
            await ga.execute("guest-get-time", timeout=0.1)
        assert ga.closed
        await asyncio.wait_for(fake.hung_up.wait(), 1)
        with pytest.raises(GuestAgentUnavailable, match="closed"):
            await ga.ping()  # not answered with the late answer meant for the call before


async def test_the_socket_is_closed_on_exit(tmp_path: Path) -> None:
    async with FakeAgent(tmp_path / "qga.sock") as fake:
        async with GuestAgent(fake.path) as ga:
            await ga.ping()
        assert ga.closed
        await asyncio.wait_for(fake.hung_up.wait(), 1)


async def test_no_socket_or_nobody_listening_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(GuestAgentUnavailable, match="cannot connect"):
        async with GuestAgent(tmp_path / "absent.sock", timeout=1):
            pass
    left = tmp_path / "left.sock"  # a QEMU that died leaves its socket file behind
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(left))
    with pytest.raises(GuestAgentUnavailable, match="cannot connect"):
        async with GuestAgent(left, timeout=1):
            pass
    assert await sync_guest_clock(left, timeout=1) is None
    assert await guest_addresses(tmp_path / "absent.sock", timeout=1) is None


async def test_calls_from_several_tasks_take_turns(tmp_path: Path) -> None:
    async def echo(request: dict[str, Any]) -> Any:
        await asyncio.sleep(0.01)
        return {"return": request["arguments"]["n"]}

    async with FakeAgent(tmp_path / "qga.sock", echo) as fake, GuestAgent(fake.path) as ga:
        calls = [ga.execute("guest-echo", {"n": n}) for n in range(8)]
        assert await asyncio.gather(*calls) == list(range(8))


@pytest.mark.parametrize("behind_s", [2.5, -0.75])
async def test_the_clock_step_is_measured_then_the_host_time_set(
    tmp_path: Path, behind_s: float, caplog: pytest.LogCaptureFixture
) -> None:
    host = [1_700_000_000_000_000_000]
    set_to: list[int] = []

    def now_ns() -> int:
        host[0] += 2_000_000  # 2 ms pass between two looks
        return host[0]

    def handler(request: dict[str, Any]) -> Any:
        if request["execute"] == "guest-get-time":
            # read half way through the round trip, as the client assumes: 1 ms after its look
            return {"return": host[0] + 1_000_000 - int(behind_s * 1e9)}
        if request["execute"] == "guest-set-time":
            set_to.append(request["arguments"]["time"])
            return {"return": {}}
        return {"error": {"class": "CommandNotFound", "desc": request["execute"]}}

    caplog.set_level(logging.INFO, logger="kvmotion.qemu.qga")
    async with FakeAgent(tmp_path / "qga.sock", handler) as fake:
        synced = await sync_guest_clock(fake.path, timeout=2, now_ns=now_ns)
    assert synced is not None
    assert synced.step_s == pytest.approx(behind_s, abs=1e-9)
    assert synced.round_trip_s == pytest.approx(0.002, abs=1e-9)
    assert set_to == [host[0]]  # the host's time as the set left, not the guest's plus the step
    assert fake.commands == ["guest-sync-delimited", "guest-get-time", "guest-set-time"]
    assert f"it was {behind_s:+.3f} s off" in caplog.text


async def test_a_refused_clock_set_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(request: dict[str, Any]) -> Any:
        if request["execute"] == "guest-get-time":
            return {"return": 1_000}
        return {"error": {"class": "GenericError", "desc": "hwclock failed"}}

    caplog.set_level(logging.WARNING, logger="kvmotion.qemu.qga")  # whatever an earlier test set
    async with FakeAgent(tmp_path / "qga.sock", handler) as fake:
        assert await sync_guest_clock(fake.path, timeout=2) is None
    assert "not confirmed" in caplog.text and "hwclock failed" in caplog.text


async def test_set_time_without_a_time_sends_no_arguments(tmp_path: Path) -> None:
    async with FakeAgent(tmp_path / "qga.sock") as fake, GuestAgent(fake.path) as ga:
        await ga.set_time(None)
    assert fake.requests[-1] == {"execute": "guest-set-time"}


async def test_interfaces_are_typed_and_loopback_left_out(tmp_path: Path) -> None:
    lo = [{"ip-address": "127.0.0.1", "ip-address-type": "ipv4", "prefix": 8}]
    interfaces = [
        {"name": "lo", "hardware-address": "00:00:00:00:00:00", "ip-addresses": lo},
        {"name": "Loopback Pseudo-Interface 1", "ip-addresses": lo},
        {
            "name": "ens3",
            "hardware-address": "52:54:00:aa:bb:01",
            "ip-addresses": [
                {"ip-address": "172.16.2.101", "ip-address-type": "ipv4", "prefix": 24},
                {"ip-address": "fe80::1", "ip-address-type": "ipv6", "prefix": 64},
            ],
            "statistics": {"rx-bytes": 1},
        },
        {"name": "tun0"},
    ]
    async with FakeAgent(tmp_path / "qga.sock", lambda r: {"return": interfaces}) as fake:
        found = await guest_addresses(fake.path, timeout=2)
    assert found == [
        GuestInterface(
            "ens3",
            "52:54:00:aa:bb:01",
            (GuestAddress("172.16.2.101", "ipv4", 24), GuestAddress("fe80::1", "ipv6", 64)),
        ),
        GuestInterface("tun0", None, ()),
    ]
    assert found[0].addresses == ("172.16.2.101", "fe80::1")


async def test_os_info_keeps_the_strings(tmp_path: Path) -> None:
    info = {"id": "debian", "pretty-name": "Debian GNU/Linux 12 (bookworm)", "bogus": 3}
    fake = FakeAgent(tmp_path / "qga.sock", lambda r: {"return": info})
    async with fake, GuestAgent(fake.path) as ga:
        assert await ga.os_info() == {"id": "debian", "pretty-name": info["pretty-name"]}


async def test_unreadable_answers_are_guest_agent_errors(tmp_path: Path) -> None:
    answers: dict[str, Any] = {
        "guest-get-time": {"return": "soon"},
        "guest-network-get-interfaces": {"return": [{"name": "eth0", "ip-addresses": [{}]}]},
        "guest-ping": b"not json\n",
    }
    async with FakeAgent(tmp_path / "qga.sock", lambda r: answers[r["execute"]]) as fake:
        async with GuestAgent(fake.path) as ga:
            with pytest.raises(GuestAgentError, match="cannot read the answer to guest-get-time"):
                await ga.get_time()
            with pytest.raises(GuestAgentError, match="guest-network-get-interfaces"):
                await ga.network_interfaces()
            assert not ga.closed  # a whole answer was read: the stream is still in step
            with pytest.raises(GuestAgentError, match="unreadable"):
                await ga.ping()
            assert ga.closed  # where the next answer starts is unknown
        assert await guest_addresses(fake.path, timeout=2) is None


async def test_a_cancelled_call_closes_the_session_and_stays_cancelled(tmp_path: Path) -> None:
    async def never(request: dict[str, Any]) -> Any:
        await asyncio.sleep(10)

    async with FakeAgent(tmp_path / "qga.sock", never) as fake, GuestAgent(fake.path) as ga:
        call = asyncio.create_task(ga.ping())
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert ga.closed


async def test_a_slow_clock_set_is_waited_for_longer_than_a_read(tmp_path: Path) -> None:
    """qemu-ga's guest-set-time writes the RTC too: under TCG it took over 5 s (the lab's
    "both" move), so the set has a timeout of its own, longer than a read's."""

    async def handler(request: dict[str, Any]) -> Any:
        if request["execute"] == "guest-get-time":
            return {"return": time.time_ns()}
        await asyncio.sleep(1.0)  # hwclock -w, slowly
        return {"return": {}}

    async with FakeAgent(tmp_path / "qga.sock", handler) as fake:
        assert await sync_guest_clock(fake.path, timeout=0.5, set_timeout=0.2) is None
    async with FakeAgent(tmp_path / "qga2.sock", handler) as fake:
        synced = await sync_guest_clock(fake.path, timeout=0.5, set_timeout=3)
    assert synced is not None
