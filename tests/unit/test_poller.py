"""The refresh's poller process (center/poller.py) against simulated agents over real HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmotion.center import poller as poller_module
from kvmotion.center.poller import Poller, PollerStopped, digest
from kvmotion.center.service import Center, CenterConfig
from kvmotion.errors import HostUnreachable, KvmotionError
from kvmotion.host.client import AgentClient

TOKEN = "poller-test-token"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[list[str]]:
    """Two simulated hosts of three VMs each, over HTTP (kvmotion.lab.simserve): their URLs."""
    ready = tmp_path / "sim.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmotion.lab.simserve", "--hosts", "2", "--vms-per-host", "3",
         "--token", TOKEN, "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "simserve did not start"
            time.sleep(0.1)
        yield [f"http://127.0.0.1:{h['port']}" for h in json.loads(ready.read_text())["hosts"]]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def test_the_poller_asks_in_its_own_process_and_sends_a_list_only_when_it_changed(
    fleet: list[str],
) -> None:
    poller = Poller()
    try:
        first = await poller.poll(fleet[0], TOKEN)
        pid = poller.pid
        assert pid is not None and pid != os.getpid()
        async with AgentClient(fleet[0], TOKEN) as agent:  # what the center would have read
            names = sorted(vm.name for vm in await agent.list_vms())
        assert first.vms is not None and sorted(vm["name"] for vm in first.vms) == names
        assert first.vms_digest == digest(first.vms) and first.facts["memory"]["total_bytes"] > 0
        assert first.listed_at <= time.monotonic()  # one clock for the machine's processes

        again = await poller.poll(fleet[0], TOKEN, first.vms_digest)
        assert again.vms is None and again.vms_digest == first.vms_digest  # known: not sent
        other = await poller.poll(fleet[1], TOKEN, first.vms_digest)
        assert other.vms is not None and other.vms_digest != first.vms_digest

        # The agent client's errors arrive as themselves.
        with pytest.raises(HostUnreachable):
            await poller.poll(f"http://127.0.0.1:{closed_port()}", TOKEN)
        with pytest.raises(KvmotionError) as refused:
            await poller.poll(fleet[0], "not-the-token")
        async with AgentClient(fleet[0], "not-the-token") as agent:
            with pytest.raises(KvmotionError) as direct:
                await agent.facts()
        assert (type(refused.value), refused.value.code) == (type(direct.value), direct.value.code)
        assert poller.starts == 1
    finally:
        await poller.close()
    assert ended(pid)


async def test_a_dead_poller_fails_the_questions_it_held_and_is_started_again(
    fleet: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(poller_module, "RESTART_GAP_S", 0.0)
    poller = Poller()
    try:
        await poller.poll(fleet[0], TOKEN)
        pid = poller.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # the question below is held, unanswered
        held = asyncio.create_task(poller.poll(fleet[0], TOKEN))
        await asyncio.sleep(0.2)
        assert not held.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(PollerStopped):
            await asyncio.wait_for(held, 10)
        answer = await poller.poll(fleet[1], TOKEN)  # a new process
        assert answer.vms is not None and poller.starts == 2 and poller.pid != pid

        # A poller that is alive but does not answer is killed after ANSWER_TIMEOUT_S.
        monkeypatch.setattr(poller_module, "ANSWER_TIMEOUT_S", 0.5)
        stuck = poller.pid
        assert stuck is not None
        os.kill(stuck, signal.SIGSTOP)
        with pytest.raises(PollerStopped):
            await poller.poll(fleet[0], TOKEN)
        for _ in range(100):  # bounded: until it is gone
            if ended(stuck):
                break
            await asyncio.sleep(0.05)
        assert ended(stuck)
        monkeypatch.setattr(poller_module, "ANSWER_TIMEOUT_S", 75.0)  # a start takes ~1 s
        assert (await poller.poll(fleet[0], TOKEN)).facts and poller.starts == 3
    finally:
        await poller.close()
    with pytest.raises(PollerStopped):  # closed: no process is started again
        await poller.poll(fleet[0], TOKEN)


async def test_a_round_whose_poller_died_marks_no_host_disconnected(
    fleet: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A center refreshing two hosts over HTTP, through its poller process: when the poller
    dies, the hosts are not taken for silent; once it is started again, they are refreshed."""
    config = CenterConfig(db_url=f"sqlite+aiosqlite:///{tmp_path}/c.db", token="t",
                          refresh_interval_s=3600, tls_dir=tmp_path / "no-tls")  # fmt: skip
    center = Center(config)
    await center.start()
    try:
        for url in fleet:
            await center.inventory.add_host("127.0.0.1", TOKEN, int(url.rsplit(":", 1)[1]))
        await center.inventory.refresh_all()
        poller = center.inventory.poller
        assert poller.pid is not None and poller.starts == 1
        assert len(await center.inventory.vms()) == 6

        monkeypatch.setattr(poller_module, "RESTART_GAP_S", 3600.0)  # not started again yet
        os.kill(poller.pid, signal.SIGKILL)
        for _ in range(100):  # bounded: until the center has seen it end
            try:
                await poller.poll(fleet[0], TOKEN)
            except PollerStopped:
                break
            await asyncio.sleep(0.05)
        await center.inventory.refresh_all()
        assert {h.connection for h in await center.inventory.hosts()} == {"connected"}

        monkeypatch.setattr(poller_module, "RESTART_GAP_S", 0.0)
        before = {h.name: center.inventory.seen[h.id] for h in await center.inventory.hosts()}
        await center.inventory.refresh_all()
        assert poller.starts == 2
        for host in await center.inventory.hosts():
            assert (
                host.connection == "connected"
                and center.inventory.seen[host.id] > before[host.name]
            )
    finally:
        await center.close()
