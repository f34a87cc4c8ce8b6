"""Pushed progress: the agent's long-poll of a VM, the center's task store with live figures,
and the server-sent events the CLI reads."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
from sqlalchemy import select

from kvmotion.center import api
from kvmotion.center.client import sse_events
from kvmotion.center.db import Database, Task
from kvmotion.center.tasks import TaskStore
from kvmotion.errors import NotFound
from kvmotion.host import watch
from kvmotion.host.migrationview import MigrationStats, MigrationView
from kvmotion.host.vmconfig import VmConfig, VmCreateRequest
from kvmotion.host.vmstate import VmInfo
from kvmotion.pulse import Pulse, wait_beat


class StubVm:
    """What the long-poll reads of a VM: its record and its pulse."""

    def __init__(self) -> None:
        config = VmConfig.from_request(
            VmCreateRequest(name="vm-a", datastore="shared"), cpu_model="qemu64",
            machine_type="pc-q35-7.2",
        )  # fmt: skip
        self.record = VmInfo(
            uuid=config.uuid, name="vm-a", power_state="poweredOn", qemu_status="running",
            pid=1, config_path="/x/vm.json", config=config, migration=None, cpu=None,
            storage=None, incoming=False,
        )  # fmt: skip
        self.changed = Pulse()
        self.reads = 0

    async def info(self) -> VmInfo:
        self.reads += 1
        return self.record

    def migrating(self, phase: str, sent: int) -> None:
        view = MigrationView(
            side="source", phase=phase, stats=MigrationStats(phase, transferred_bytes=sent)
        )
        self.record = dataclasses.replace(self.record, migration=view)


class StubAgent:
    def __init__(self) -> None:
        self.vms = {"vm-a": StubVm()}

    def get(self, ref: str) -> StubVm:
        if ref not in self.vms:
            raise NotFound(f"no VM {ref}", code="vm_not_found")
        return self.vms[ref]


async def long_poll(agent: StubAgent, after: str | None, wait_s: float) -> tuple[str, float]:
    started = time.monotonic()
    tag, _ = await watch.watch_vm(agent, "vm-a", after, wait_s)  # type: ignore[arg-type]
    return tag, time.monotonic() - started


async def test_a_first_look_is_answered_at_once_and_an_unchanged_vm_after_the_wait() -> None:
    agent = StubAgent()
    tag, took = await long_poll(agent, None, 5.0)
    assert took < 0.1
    same, took = await long_poll(agent, tag, 0.5)
    assert same == tag and 0.5 <= took < 3.0
    # It looked again while waiting, in case something changed without a beat.
    assert agent.vms["vm-a"].reads >= 3


async def test_a_step_is_answered_as_soon_as_the_vm_beats(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "RECHECK_S", 5.0)  # only the beat can answer it in time
    agent = StubAgent()
    vm = agent.vms["vm-a"]
    tag, _ = await long_poll(agent, None, 0)

    async def step() -> None:
        await asyncio.sleep(0.05)
        vm.migrating("active", 0)
        vm.changed.beat()

    stepping = asyncio.create_task(step())
    new, took = await long_poll(agent, tag, 5.0)
    await stepping
    assert new.split("-")[0] != tag.split("-")[0]
    assert 0.05 <= took < watch.RECHECK_S  # the beat, not the periodic look


async def test_progress_alone_is_answered_at_most_every_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watch, "RECHECK_S", 0.5)
    agent = StubAgent()
    vm = agent.vms["vm-a"]
    vm.migrating("active", 1000)
    tag, _ = await long_poll(agent, None, 0)
    vm.migrating("active", 2000)  # bytes sent: the same step
    vm.changed.beat()
    new, took = await long_poll(agent, tag, 5.0)
    assert new != tag and new.split("-")[0] == tag.split("-")[0]
    assert watch.RECHECK_S <= took < 4.0  # not at the beat: once the recheck time passed


async def test_a_vm_that_goes_away_during_the_wait_is_not_found() -> None:
    agent = StubAgent()
    tag, _ = await long_poll(agent, None, 0)

    async def remove() -> None:
        await asyncio.sleep(0.05)
        del agent.vms["vm-a"]

    removing = asyncio.create_task(remove())
    with pytest.raises(NotFound):
        await long_poll(agent, tag, 5.0)
    await removing


async def test_a_pulse_wakes_only_those_who_took_its_event_before() -> None:
    pulse = Pulse()
    before = pulse.next()
    pulse.beat()
    assert await wait_beat(before, 0.01)
    assert not await wait_beat(pulse.next(), 0.01)


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[TaskStore]:
    db = Database(db_url)
    await db.migrate()
    yield TaskStore(db)
    await db.close()


async def stored(store: TaskStore, task_id: int) -> Task:
    """The task as the database has it (no live figures)."""
    async with store.db.session() as s:
        row = (await s.scalars(select(Task).where(Task.id == task_id))).one()
        return row


async def test_live_figures_are_read_but_written_only_with_the_next_update(
    store: TaskStore,
) -> None:
    task = await store.create("migrate", "vm-a", {})
    beat = store.changed.next()
    store.publish(task.id, progress=42.0, samples=[{"pass_no": 1}])
    assert beat.is_set()
    seen = await store.get(task.id)
    assert seen.progress == 42.0 and seen.samples == [{"pass_no": 1}]
    assert [t.progress for t in await store.list()] == [42.0]
    assert (await stored(store, task.id)).samples == []  # in memory only

    await store.update(task.id, phase="switchover")
    row = await stored(store, task.id)
    assert (row.phase, row.progress, row.samples) == ("switchover", 42.0, [{"pass_no": 1}])
    store.publish(task.id, progress=50.0)
    await store.update(task.id, progress=60.0)  # what is written last wins
    assert (await stored(store, task.id)).progress == 60.0


async def test_server_sent_events_are_read_as_the_center_writes_them() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in (": keep-alive", "", "event: task", 'data: {"id": 1}', "", "data: x",
                     "data: y", "", "event: task", "data: {\"id\": 2}", ""):  # fmt: skip
            yield line

    assert [e async for e in sse_events(lines())] == [
        ("task", '{"id": 1}'),
        ("message", "x\ny"),
        ("task", '{"id": 2}'),
    ]


def count_reads(store: TaskStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The ids of the tasks ``store`` reads from now on, in order."""
    reads: list[int] = []
    real_get = store.get

    async def counted_get(task_id: int) -> Task:
        reads.append(task_id)
        return await real_get(task_id)

    monkeypatch.setattr(store, "get", counted_get)
    return reads


async def test_a_stream_reads_only_the_tasks_changed_since_its_last_look(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "STREAM_GAP_S", 0.0)
    first = await store.create("migrate", "vm-a", {})
    second = await store.create("migrate", "vm-b", {})
    reads = count_reads(store, monkeypatch)
    stream = api._task_events(SimpleNamespace(tasks=store), 10, None)  # type: ignore[arg-type]
    said = [json.loads(e.split("data: ", 1)[1])["id"] for e in [await anext(stream) for _ in "ab"]]
    assert said == [first.id, second.id]
    store.publish(first.id, progress=10.0)
    event = await asyncio.wait_for(anext(stream), 2)
    assert json.loads(event.split("data: ", 1)[1])["progress"] == 10.0
    assert reads == [first.id]  # the other task was not read again
    await stream.aclose()


async def test_streams_share_one_read_of_each_change(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every open web client holds a task stream: twenty streams read a changed task once."""
    monkeypatch.setattr(api, "STREAM_GAP_S", 0.0)
    task = await store.create("migrate", "vm-a", {})
    reads = count_reads(store, monkeypatch)
    center = SimpleNamespace(tasks=store)
    streams = [api._task_events(center, 10, None) for _ in range(20)]  # type: ignore[arg-type]
    first = await asyncio.gather(*(anext(s) for s in streams))
    assert {json.loads(e.split("data: ", 1)[1])["id"] for e in first} == {task.id}
    assert reads == []  # the newest tasks' list read them
    for n in (10.0, 20.0):
        store.publish(task.id, progress=n)
        events = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), 5)
        assert {json.loads(e.split("data: ", 1)[1])["progress"] for e in events} == {n}
    assert reads == [task.id, task.id]  # once a change, not once a stream
    for stream in streams:
        await stream.aclose()


async def test_a_task_stream_keeps_alive_while_only_other_tasks_change_and_ends_with_its_task(
    store: TaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "STREAM_KEEPALIVE_S", 0.3)
    mine = await store.create("migrate", "vm-a", {})
    other = await store.create("migrate", "vm-b", {})
    stream = api._task_events(SimpleNamespace(tasks=store), 1, mine.id)  # type: ignore[arg-type]
    assert json.loads((await anext(stream)).split("data: ", 1)[1])["id"] == mine.id

    async def busy_other() -> None:
        for n in range(40):  # bounded: 2 s of changes to another task
            store.publish(other.id, progress=float(n))
            await asyncio.sleep(0.05)

    busy = asyncio.create_task(busy_other())
    try:
        assert await asyncio.wait_for(anext(stream), 1.5) == ": keep-alive\n\n"
    finally:
        busy.cancel()
    await store.update(mine.id, state="running")
    await store.update(mine.id, state="success")
    events = [e async for e in stream]  # the stream ends after its task ends
    assert json.loads(events[-1].split("data: ", 1)[1])["state"] == "success"
