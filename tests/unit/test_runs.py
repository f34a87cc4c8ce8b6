"""Abort decided by the run's phase (kvmotion/center/compute_run.py, storage_run.py), against
fake agents: each run is driven step by step to a phase, stopped there, and aborted; what the
fake recorded shows what the abort asked of each host."""

# The center and fake-agent fixtures come from test_executor.py; as parameters they redefine the
# imported names, which is how pytest fixtures are shared without a conftest.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from kvmotion.center import runs
from kvmotion.center.compute_run import ComputeMigration
from kvmotion.center.service import Center
from kvmotion.center.storage_run import StorageMigration
from kvmotion.center.tasks import TaskState
from kvmotion.errors import Conflict, HostUnreachable
from kvmotion.migration.phases import ComputePhase, StoragePhase
from kvmotion.migration.request import MigrationRequest
from tests.unit.fake_agent import FakeAgents, wait_until
from tests.unit.test_executor import (  # noqa: F401 (fixtures used as parameters)
    DST,
    SRC,
    aborts,
    assert_rolled_back,
    center,
    center_db,
    datastores_of,
    fake,
    fast,
    source_runs,
    template_db,
    vm_host,
)

P = ComputePhase


async def running_task(center: Center) -> int:
    task = await center.tasks.create("migrate", "vm-a", {})
    await center.tasks.update(task.id, state=TaskState.RUNNING)
    return task.id


async def stop_when(step: Coroutine[Any, Any, Any], reached: Callable[[], bool]) -> None:
    """Run ``step`` until ``reached``, then stop it there (as a center that stops would)."""
    stepping = asyncio.ensure_future(step)
    await wait_until(lambda: reached() or stepping.done())
    stepping.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stepping
    assert reached()


async def compute_run_at(center: Center, fake: FakeAgents, phase: ComputePhase) -> ComputeMigration:
    """A compute run of vm-a (change both, to reach COPYING_DISKS), taken to ``phase``."""
    both = phase is P.COPYING_DISKS
    req = MigrationRequest(
        "vm-a", DST, kind="both" if both else "compute", datastore="local-173" if both else None
    )
    fake.script(
        "vm-a",
        phases={P.STREAMING: ("active",), P.SWITCHOVER: ("active", "device")}.get(
            phase, ("active", "device", "completed")
        ),
        disk_phases=("copying",),
        dest="hang" if phase is P.RESUMING else "resume",
    )
    vm = await center.inventory.vm("vm-a")
    source, dest = await center.inventory.host(SRC), await center.inventory.host(DST)
    run = ComputeMigration(center.executor, await running_task(center), vm, source, dest, req)
    if phase is not P.START:
        uri = await run.prepare()
        if phase is P.COPYING_DISKS:
            await stop_when(run.copy_disks(), lambda: bool(fake.called(SRC, "get")))
        elif phase is not P.PREPARING:
            await run.migrate(uri)
            async with run.watches() as (agent, src, dst):
                if phase in (P.STREAMING, P.SWITCHOVER):
                    await stop_when(run.watch(agent, src, dst), lambda: run.phase is phase)
                elif phase is not P.MIGRATING:
                    await run.watch(agent, src, dst)
                    if phase is P.RESUMING:
                        await stop_when(run.confirm_resumed(dst), lambda: run.phase is phase)
                    else:
                        await run.confirm_resumed(dst)
    assert run.phase is phase
    return run


# What the abort asks of the destination and of the source, by phase: before prepare nothing,
# once prepared the destination only, once the source was asked to copy both (the destination
# first, so that the source is told its copy is gone).
@pytest.mark.parametrize(
    "phase, asks_destination, asks_source",
    [
        (P.START, False, False),
        (P.PREPARING, True, False),
        (P.COPYING_DISKS, True, True),
        (P.MIGRATING, True, True),
        (P.STREAMING, True, True),
        (P.SWITCHOVER, True, True),
        (P.RESUMING, True, True),
    ],
)
async def test_compute_abort_by_phase(
    center: Center,
    fake: FakeAgents,
    phase: ComputePhase,
    asks_destination: bool,
    asks_source: bool,
) -> None:
    run = await compute_run_at(center, fake, phase)
    fake.calls.clear()
    await run.abort("boom", TaskState.ERROR, "boom")
    task = await center.tasks.get(run.task_id)

    assert (task.state, task.phase, task.error_code) == (TaskState.ERROR, "aborted", "boom")
    assert run.phase is P.ABORTED
    assert [c.status for c in aborts(fake, DST)] == ([200] if asks_destination else [])
    source_asked = [(c.status, c.query) for c in aborts(fake, SRC)]
    assert source_asked == ([(200, {"destination_gone": "true"})] if asks_source else [])
    order = [c.host for c in fake.called(route="abort")]
    assert order == sorted(order, key=lambda host: host != DST)  # the destination first
    assert_rolled_back(fake)
    assert await vm_host(center) == SRC


@pytest.mark.parametrize(
    "phase, insists",
    [
        (P.COPYING_DISKS, False),
        (P.MIGRATING, False),
        (P.STREAMING, True),
        (P.SWITCHOVER, True),
        (P.RESUMING, True),
    ],
)
async def test_compute_abort_insists_on_a_dead_source_once_it_was_seen_streaming(
    center: Center,
    fake: FakeAgents,
    monkeypatch: pytest.MonkeyPatch,
    phase: ComputePhase,
    insists: bool,
) -> None:
    """Only a source seen migrating can have a stunned guest: then an unreachable source is
    asked again until it answers; before that, once."""
    monkeypatch.setattr(runs, "RETRY_PAUSE_S", 0.005)
    center.executor.source_retry_s = 10.0
    run = await compute_run_at(center, fake, phase)
    fake.calls.clear()
    fake.host(SRC).dead = True

    async def revive() -> None:
        await wait_until(lambda: len(aborts(fake, SRC)) >= 3)
        fake.host(SRC).dead = False

    reviving = asyncio.create_task(revive())
    await run.abort("boom", TaskState.ERROR)
    statuses = [c.status for c in aborts(fake, SRC)]
    if insists:
        await reviving
        assert statuses[:3] == [None] * 3 and statuses[-1] == 200
        assert source_runs(fake)
    else:
        reviving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reviving
        assert statuses == [None]
    assert [c.status for c in aborts(fake, DST)] == [200]
    assert (await center.tasks.get(run.task_id)).phase == "aborted"


async def test_compute_abort_after_resume_finishes(center: Center, fake: FakeAgents) -> None:
    run = await compute_run_at(center, fake, P.RESUMED)
    fake.calls.clear()
    await run.abort("the center stopped during the migration", TaskState.ERROR)
    task = await center.tasks.get(run.task_id)

    assert (task.state, task.phase) == (TaskState.SUCCESS, "done") and run.phase is P.DONE
    assert fake.called(route="abort") == []
    assert [c.status for c in fake.called(SRC, "finish")] == [200]
    assert await vm_host(center) == DST and fake.vm(SRC, "vm-a") is None


async def test_a_run_refuses_a_move_its_table_does_not_allow(
    center: Center, fake: FakeAgents
) -> None:
    run = await compute_run_at(center, fake, P.START)
    before = await center.tasks.get(run.task_id)
    with pytest.raises(Conflict) as info:
        await run.enter(P.RESUMED)  # a run never asked anything of a host cannot own the VM
    assert info.value.code == "illegal_phase"
    assert run.phase is P.START
    assert (await center.tasks.get(run.task_id)).phase == before.phase  # nothing was written
    await run.abort("refused", TaskState.ERROR)
    assert fake.called(route="abort") == []  # and the abort still knows nothing was asked


# -- storage ----------------------------------------------------------------------------------


async def storage_run(center: Center) -> StorageMigration:
    vm = await center.inventory.vm("vm-a")
    host = await center.inventory.host(SRC)
    req = MigrationRequest("vm-a", SRC, kind="storage", datastore="local-172")
    return StorageMigration(center.executor, await running_task(center), vm, host, req)


async def test_storage_abort_before_the_copy_asks_nothing(center: Center, fake: FakeAgents) -> None:
    run = await storage_run(center)
    fake.calls.clear()
    await run.abort("boom", TaskState.CANCELLED)
    task = await center.tasks.get(run.task_id)
    assert (task.state, task.phase) == (TaskState.CANCELLED, "aborted")
    assert fake.calls == []


async def test_storage_abort_before_the_pivot_cancels_the_copy(
    center: Center, fake: FakeAgents
) -> None:
    fake.script("vm-a", disk_phases=("copying",))
    run = await storage_run(center)
    await stop_when(run.steps(), lambda: bool(fake.called(SRC, "get")))
    assert run.phase is StoragePhase.COPYING
    await run.abort("boom", TaskState.ERROR)
    task = await center.tasks.get(run.task_id)

    assert (task.state, task.phase) == (TaskState.ERROR, "aborted")
    assert [c.status for c in fake.called(SRC, "storage_cancel")] == [200]
    assert "keeps its disks" in (task.error or "")
    assert datastores_of(await center.inventory.vm("vm-a")) == ["shared"]


@pytest.mark.parametrize("host_back", [True, False])
async def test_storage_abort_after_the_pivot_records_the_move(
    center: Center, fake: FakeAgents, host_back: bool
) -> None:
    """The center saw the VM switch to its copies, then lost the host: an abort never cancels
    the copy; it records the move once the host answers, and says why if it does not."""
    fake.host(SRC).kill_after("get", 4)  # the 4th poll shows the copy completed
    run = await storage_run(center)
    with pytest.raises(HostUnreachable):
        await run.steps()
    assert run.phase is StoragePhase.PIVOTED
    fake.host(SRC).dead = not host_back
    await run.abort("the host did not answer", TaskState.ERROR)
    task = await center.tasks.get(run.task_id)

    assert fake.called(SRC, "storage_cancel") == []
    if host_back:
        assert (task.state, task.phase) == (TaskState.SUCCESS, "done")
        assert datastores_of(await center.inventory.vm("vm-a")) == ["local-172"]
    else:
        assert (task.state, task.phase) == (TaskState.ERROR, "aborted")
        assert task.error is not None and "did not answer" in task.error
