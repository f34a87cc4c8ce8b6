"""The compute migration as the center drives it, against fake agents (tests/unit/fake_agent.py).

Each test runs a real :class:`~kvmotion.center.service.Center` (on SQLite, then on PostgreSQL)
whose agents are :class:`FakeAgents`; what the fake recorded shows what the center asked of each
host, and the inventory and the task show what the center concluded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import event, select
from sqlalchemy.util import await_only

from kvmotion.center import runs
from kvmotion.center.compute_run import ComputeMigration
from kvmotion.center.db import Database, Event, Task
from kvmotion.center.executor import Executor
from kvmotion.center.service import Center, CenterConfig
from kvmotion.center.tasks import TaskState, TaskStore
from kvmotion.errors import (
    Conflict,
    HostUnreachable,
    InvalidInput,
    NotFound,
    PreconditionError,
    Unauthorized,
)
from kvmotion.host.client import AgentClient
from kvmotion.host.protocol import vm_json
from kvmotion.migration.costs import CostLimits
from kvmotion.migration.request import MigrationRequest
from tests.databases import DatabaseServer
from tests.unit.fake_agent import PORT, TOKEN, Call, FakeAgents, wait_until

SRC, DST = "172.16.0.172", "172.16.0.173"


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "POLL_INTERVAL", 0.002)


def standard_fake() -> FakeAgents:
    # Every VM exists before the center starts: a refresh that finds a new VM races any other
    # refresh of that host (see test_concurrent_refreshes_of_a_new_vm).
    agents = FakeAgents(SRC, DST)
    agents.add_vm(SRC, "vm-a")
    agents.add_vm(SRC, "vm-b")
    agents.add_vm(SRC, "vm-off", power_state="poweredOff")
    return agents


@pytest.fixture
def fake() -> FakeAgents:
    return standard_fake()


def center_config(url: str, limit: int = 2) -> CenterConfig:
    return CenterConfig(db_url=url, token="t", refresh_interval_s=3600, migrations_per_host=limit)


@pytest.fixture(scope="session")
def template_db(database_server: DatabaseServer) -> Iterator[str]:
    """A center database that has added both hosts (and found their VMs), built once per kind of
    database; each test starts from a copy of it."""
    url = database_server.fresh()

    async def build() -> None:
        center = Center(center_config(url), transport=standard_fake())
        await center.db.migrate()
        await center.inventory.ensure_defaults()
        for address in (SRC, DST):
            await center.inventory.add_host(address, TOKEN, PORT)
        await center.close()

    asyncio.run(build())
    yield url
    database_server.drop(url)


@pytest.fixture
def center_db(template_db: str, database_server: DatabaseServer) -> Iterator[str]:
    """A copy of the template: the URL of this test's center database (SQLite, then PostgreSQL)."""
    url = database_server.fresh(template_db)
    try:
        yield url
    finally:
        database_server.drop(url)


async def start_center(
    center_db: str, fake: FakeAgents, limit: int = 2, *, start: bool = True
) -> Center:
    """A center on a copy of the template: both hosts are in its inventory, with their VMs."""
    center = Center(center_config(center_db, limit), transport=fake)
    if start:
        await center.start()
    return center


@pytest.fixture
async def center(center_db: str, fake: FakeAgents) -> AsyncIterator[Center]:
    c = await start_center(center_db, fake)
    await wait_until(lambda: c.inventory.rounds > 0)  # its first refresh calls the hosts
    fake.calls.clear()
    yield c
    await c.close()


@pytest.fixture
async def center1(center_db: str, fake: FakeAgents) -> AsyncIterator[Center]:
    """A center that runs one migration per host at a time."""
    c = await start_center(center_db, fake, limit=1)
    await wait_until(lambda: c.inventory.rounds > 0)
    fake.calls.clear()
    yield c
    await c.close()


async def wait_task(
    center: Center, task_id: int, check: Callable[[Task], bool], timeout: float = 5.0
) -> Task:
    deadline = time.monotonic() + timeout
    while True:
        task = await center.tasks.get(task_id)
        if check(task):
            return task
        assert time.monotonic() < deadline, f"task {task_id} stayed {task.state}/{task.phase}"
        await asyncio.sleep(0.005)


async def migrate(center: Center, vm: str = "vm-a", dest: str = DST) -> Task:
    task_id = await center.executor.submit(MigrationRequest(vm, dest))
    await asyncio.wait_for(center.executor.wait(task_id), 10)
    return await center.tasks.get(task_id)


async def vm_host(center: Center, vm: str = "vm-a") -> str | None:
    record = await center.inventory.vm(vm)
    return record.host.name if record.host else None


async def events(center: Center, task_id: int) -> list[Event]:
    async with center.db.session() as s:
        return list(await s.scalars(select(Event).where(Event.task_id == task_id)))


def aborts(fake: FakeAgents, host: str) -> list[Call]:
    return fake.called(host, "abort")


def source_runs(fake: FakeAgents) -> bool:
    vm = fake.vm(SRC, "vm-a")
    return vm is not None and vm.power_state == "poweredOn" and vm.qemu_status == "running"


def assert_rolled_back(fake: FakeAgents) -> None:
    """The VM runs on the source only; the destination forgot it; nothing was finished."""
    assert source_runs(fake)
    assert fake.vm(DST, "vm-a") is None
    assert fake.called(SRC, "finish") == []


# -- success ----------------------------------------------------------------------------------


async def test_success(center: Center, fake: FakeAgents) -> None:
    seen: list[tuple[str, str, str | None, bool]] = []

    async def look(call: Call) -> None:
        dest_vm = fake.vm(DST, "vm-a")
        resumed = dest_vm is not None and dest_vm.power_state == "poweredOn"
        seen.append((call.host, call.route, await vm_host(center), resumed))

    fake.on_call = look
    task = await migrate(center)

    assert task.state == TaskState.SUCCESS and task.phase == "done"
    assert task.progress == 100.0 and task.error is None and task.finished_at is not None
    steps = [t["step"] for t in task.timeline]
    assert steps == ["requested", "prepared", "precopy", "stunned", "resumed", "source_removed"]
    t = {e["step"]: float(e["time"]) for e in task.timeline}
    assert t["requested"] < t["prepared"] < t["precopy"]
    assert t["precopy"] <= t["stunned"] <= t["resumed"] <= t["source_removed"]
    assert task.summary["downtime_ms"] == 42
    assert task.summary["ram_total_bytes"] == 256 * 2**20
    for key in ("task_time_ms", "stun_to_resume_ms", "request_to_first_byte_ms"):
        assert isinstance(task.summary[key], int) and task.summary[key] >= 0
    assert task.samples and task.samples[0]["pass_no"] == 1

    # The order of the protocol: prepare the destination, then stream from the source.
    order = [(c.host, c.route) for c in fake.calls if c.route not in ("facts", "list")]
    assert order.index((DST, "incoming")) < order.index((SRC, "migrate"))
    # The source is ended last, then the destination is asked when the VM network learned it.
    assert order[-2:] == [(SRC, "finish"), (DST, "get")]
    migrate_call = fake.called(SRC, "migrate")[0]
    assert migrate_call.body["uri"].startswith("tcp:10.99.0.173:")  # the migration network
    assert fake.called(DST, "incoming")[0].body["config"]["name"] == "vm-a"
    assert aborts(fake, SRC) == aborts(fake, DST) == []

    # The inventory moved the VM only once the destination ran it.
    assert all(host == SRC for _, _, host, resumed in seen if not resumed)
    finish = next(s for s in seen if s[:2] == (SRC, "finish"))
    assert finish[2] == DST and finish[3]
    assert await vm_host(center) == DST
    assert (await center.inventory.vm("vm-a")).power_state == "poweredOn"
    assert fake.vm(SRC, "vm-a") is None
    dest_vm = fake.vm(DST, "vm-a")
    assert dest_vm is not None and dest_vm.qemu_status == "running"

    recorded = await events(center, task.id)
    assert [e.severity for e in recorded] == ["info"]
    assert "migrated from 172.16.0.172 to 172.16.0.173" in recorded[0].message
    assert not center.executor.active and not any(center.executor.slots.busy.values())


@pytest.mark.parametrize(
    ("asked", "streams"),
    [
        ({}, 2),  # the default on a 10 Gbit/s link: QEMU's multifd with two streams
        ({"max_bandwidth_bps": 125_000_000}, 1),  # one stream fills 1 Gbit/s
        ({"streams": 4}, 4),
        ({"streams": 1}, 1),
        ({"allow_postcopy": True}, 1),  # QEMU cannot combine post-copy with multifd
        ({"strategy": "qemu-defaults"}, 1),  # QEMU's own default: one stream
    ],
)
async def test_both_ends_are_told_the_same_memory_streams(
    center: Center, fake: FakeAgents, asked: dict[str, Any], streams: int
) -> None:
    task_id = await center.executor.submit(MigrationRequest("vm-a", DST, **asked))
    await asyncio.wait_for(center.executor.wait(task_id), 10)
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.SUCCESS, task.error
    assert fake.called(DST, "incoming")[0].body["streams"] == streams
    assert fake.called(SRC, "migrate")[0].body["streams"] == streams
    assert task.summary["streams"] == streams


async def test_success_then_refresh_keeps_the_vm_on_the_destination(
    center: Center, fake: FakeAgents
) -> None:
    await migrate(center)
    await center.inventory.refresh_all()
    assert await vm_host(center) == DST
    vm = await center.inventory.vm("vm-a")
    assert vm.power_state == "poweredOn"


# -- failures roll back -----------------------------------------------------------------------


async def test_qemu_fails_during_precopy(center: Center, fake: FakeAgents) -> None:
    fake.script(
        "vm-a",
        phases=("active", "active", "failed"),
        error="Connection reset by peer",
        dest_notices_failure=False,
    )
    task = await migrate(center)

    assert task.state == TaskState.ERROR and task.phase == "aborted"
    assert task.error_code == "migration_failed"
    assert task.error is not None and "Connection reset by peer" in task.error
    assert len(aborts(fake, DST)) >= 1
    assert all(c.status in (200, 404) for c in aborts(fake, DST))
    assert_rolled_back(fake)
    assert await vm_host(center) == SRC
    recorded = await events(center, task.id)
    assert [e.severity for e in recorded] == ["warning"]


async def test_qemu_failure_reason_survives_the_destination_failing_too(
    center: Center, fake: FakeAgents
) -> None:
    fake.script("vm-a", phases=("active", "failed"), error="Connection reset by peer")
    task = await migrate(center)

    assert task.state == TaskState.ERROR
    assert task.error is not None and "Connection reset by peer" in task.error
    assert_rolled_back(fake)


async def test_destination_dies_after_prepare(center: Center, fake: FakeAgents) -> None:
    fake.host(DST).kill_after("incoming")
    task = await migrate(center)

    assert task.state == TaskState.ERROR and task.error_code == "host_unreachable"
    assert task.error is not None and DST in task.error and "did not answer" in task.error
    assert [c.status for c in aborts(fake, DST)] == [None]  # tried, in spite of it all
    source_abort = aborts(fake, SRC)
    assert len(source_abort) == 1 and source_abort[0].query == {}  # not told "destination gone"
    assert source_runs(fake) and fake.called(SRC, "finish") == []
    assert await vm_host(center) == SRC


async def test_destination_agent_dies_as_the_stream_completes(
    center: Center, fake: FakeAgents
) -> None:
    """The destination may run the VM now: the source must not resume it (never two copies);
    once the destination answers again, a refresh finds where the VM runs."""

    async def kill_destination(poll: int, phase: str) -> None:
        if phase == "completed":
            fake.host(DST).dead = True

    fake.script("vm-a", on_poll=kill_destination)
    task = await migrate(center)

    assert task.state == TaskState.ERROR
    assert task.error is not None and DST in task.error
    assert [(c.query, c.status) for c in aborts(fake, SRC)] == [({}, 409)]
    source = fake.vm(SRC, "vm-a")
    assert source is not None and source.qemu_status == "postmigrate"  # paused, not resumed
    assert fake.called(SRC, "finish") == []
    assert await vm_host(center) == SRC

    fake.host(DST).dead = False
    await center.inventory.refresh_all()
    assert await vm_host(center) == DST
    assert fake.vm(SRC, "vm-a") is None  # the paused copy was finished
    assert len(fake.called(SRC, "finish")) == 1


async def test_source_dies_before_migrate(center: Center, fake: FakeAgents) -> None:
    fake.host(SRC).kill_before("migrate")
    task = await migrate(center)

    assert task.state == TaskState.ERROR and task.error_code == "host_unreachable"
    assert task.error is not None and SRC in task.error
    assert [c.status for c in aborts(fake, DST)] == [200]
    assert fake.vm(DST, "vm-a") is None
    assert await vm_host(center) == SRC


async def test_migrate_refused_by_the_source(center: Center, fake: FakeAgents) -> None:
    fake.host(SRC).fail("migrate", 409, "already_migrating", "VM vm-a is already migrating")
    task = await migrate(center)

    assert task.state == TaskState.ERROR and task.error_code == "already_migrating"
    assert fake.vm(DST, "vm-a") is None and source_runs(fake)


async def test_destination_fails_to_load(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", dest="fail")
    task = await migrate(center)

    assert task.state == TaskState.ERROR
    assert task.error_code in ("destination_failed", "resume_failed")
    assert task.error is not None and "loading state" in task.error
    assert [c.status for c in aborts(fake, DST)] == [200]
    # The destination's copy was ended, so the completed source may run the guest again.
    assert [c.query for c in aborts(fake, SRC)] == [{"destination_gone": "true"}]
    assert source_runs(fake)
    assert await vm_host(center) == SRC


@pytest.mark.parametrize("dest_abort", ["succeeds", "dies", "fails"])
async def test_destination_never_resumes(
    center: Center, fake: FakeAgents, monkeypatch: pytest.MonkeyPatch, dest_abort: str
) -> None:
    monkeypatch.setattr(runs, "RESUME_TIMEOUT", 0.05)
    fake.script("vm-a", dest="hang")
    if dest_abort == "dies":
        fake.host(DST).kill_before("abort")
    elif dest_abort == "fails":
        fake.host(DST).fail("abort", 500, "qemu_failed", "QEMU did not die")
    task = await migrate(center)

    assert task.state == TaskState.ERROR and task.error_code == "resume_timeout"
    source_abort = aborts(fake, SRC)
    assert len(source_abort) == 1
    source = fake.vm(SRC, "vm-a")
    assert source is not None
    if dest_abort == "succeeds":
        assert source_abort[0].query == {"destination_gone": "true"}
        assert source_runs(fake)
    else:
        # Nobody knows whether the destination runs the guest: the source must stay paused.
        assert source_abort[0].query == {}
        assert source_abort[0].status == 409 and source.qemu_status == "postmigrate"
    assert await vm_host(center) == SRC


# -- cancel -----------------------------------------------------------------------------------


async def test_cancel_during_precopy(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", phases=("active",))  # pre-copy never converges
    task_id = await center.executor.submit(MigrationRequest("vm-a", DST))
    running = await wait_task(center, task_id, lambda t: t.phase == "active")
    assert running.state == TaskState.RUNNING

    await center.executor.request_cancel(task_id)
    await asyncio.wait_for(center.executor.wait(task_id), 5)
    task = await center.tasks.get(task_id)

    assert task.state == TaskState.CANCELLED and task.error_code == "cancelled"
    assert task.error is not None and "cancelled by the user" in task.error
    routes = [(c.host, c.route) for c in fake.calls if c.route in ("abort", "cancel")]
    assert routes == [(DST, "abort"), (SRC, "abort")]  # the destination first, once each
    assert_rolled_back(fake)
    assert await vm_host(center) == SRC
    with pytest.raises(Conflict):
        await center.executor.request_cancel(task_id)


async def test_cancel_while_preparing(center: Center, fake: FakeAgents) -> None:
    task_ids: list[int] = []

    async def cancel_on_prepare(call: Call) -> None:
        if call.route == "incoming":
            await center.executor.request_cancel(task_ids[0])

    fake.on_call = cancel_on_prepare
    task_ids.append(await center.executor.submit(MigrationRequest("vm-a", DST)))
    await center.executor.wait(task_ids[0])
    task = await center.tasks.get(task_ids[0])

    assert task.state == TaskState.CANCELLED
    assert fake.called(SRC, "migrate") == [] and aborts(fake, SRC) == []
    assert [c.status for c in aborts(fake, DST)] == [200]
    assert_rolled_back(fake)


async def test_cancel_during_switchover_is_too_late(center: Center, fake: FakeAgents) -> None:
    """Past pre-switchover the guest is stunned and finishing beats undoing. A cancel that came
    as QEMU stunned it, before the run saw that, is recorded and dropped; one after is refused,
    saying why."""
    task_ids: list[int] = []
    refused: list[Conflict] = []

    async def cancel_at_device(poll: int, phase: str) -> None:
        if phase == "device" and poll in (2, 3):  # the run sees the switchover after poll 2
            try:
                await center.executor.request_cancel(task_ids[0])
            except Conflict as exc:
                refused.append(exc)

    fake.script(
        "vm-a",
        phases=("active", "device", "device", "device", "completed"),
        on_poll=cancel_at_device,
    )
    task_ids.append(await center.executor.submit(MigrationRequest("vm-a", DST)))
    await center.executor.wait(task_ids[0])
    task = await center.tasks.get(task_ids[0])

    assert [e.code for e in refused] == ["too_late_to_cancel"]
    assert "stunned for its switchover" in refused[0].message
    assert task.cancel_requested and task.state == TaskState.SUCCESS
    assert aborts(fake, DST) == [] and aborts(fake, SRC) == []
    assert await vm_host(center) == DST


async def test_center_shutdown_aborts_a_running_migration(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", phases=("active",))
    task_id = await center.executor.submit(MigrationRequest("vm-a", DST))
    await wait_until(lambda: len(fake.called(SRC, "get")) >= 2)
    await center.executor.close()
    task = await center.tasks.get(task_id)

    assert task.state == TaskState.ERROR
    assert task.error is not None and "center stopped" in task.error
    assert_rolled_back(fake)
    assert await vm_host(center) == SRC


# -- refusals: nothing changes ----------------------------------------------------------------


async def assert_refused(
    center: Center, fake: FakeAgents, req: MigrationRequest, error: type[Exception], code: str
) -> PreconditionError:
    before = len(await center.tasks.list())
    with pytest.raises(error) as info:
        await center.executor.submit(req)
    assert isinstance(info.value, PreconditionError) and info.value.code == code
    assert len(await center.tasks.list()) == before
    assert fake.called(route="incoming") == fake.called(route="migrate") == []
    assert not center.executor.active and not center.executor.migrating(req.vm)
    return info.value


async def test_refused_same_host(center: Center, fake: FakeAgents) -> None:
    await assert_refused(
        center, fake, MigrationRequest("vm-a", SRC), PreconditionError, "same_host"
    )


async def test_refused_stopped_vm(center: Center, fake: FakeAgents) -> None:
    err = await assert_refused(
        center, fake, MigrationRequest("vm-off", DST), PreconditionError, "not_running"
    )
    assert "power it on" in err.message


async def test_refused_unknown_host(center: Center, fake: FakeAgents) -> None:
    err = await assert_refused(
        center, fake, MigrationRequest("vm-a", "172.16.0.199"), NotFound, "host_not_found"
    )
    assert SRC in err.message and DST in err.message  # the known hosts


async def test_refused_unknown_vm(center: Center, fake: FakeAgents) -> None:
    await assert_refused(center, fake, MigrationRequest("vm-zz", DST), NotFound, "vm_not_found")


@pytest.mark.parametrize(
    ("req", "message"),
    [
        (MigrationRequest("vm-a", DST, kind="teleport"), "use one of compute, storage, both"),
        (MigrationRequest("vm-a", DST, kind="storage"), "needs a target datastore"),
        (MigrationRequest("vm-a", DST, kind="both"), "needs a target datastore"),
        (MigrationRequest("vm-a", "", kind="both", datastore="shared"), "needs a destination"),
        (MigrationRequest("vm-a", DST, datastore="shared"), "leaves the disks where they are"),
        (
            MigrationRequest("vm-a", DST, kind="storage", datastore="shared"),
            "use type 'both'",
        ),
        (MigrationRequest("vm-a", SRC, kind="both", datastore="local-172"), "use type 'storage'"),
        (
            MigrationRequest("vm-a", DST, kind="both", datastore="local-173", allow_postcopy=True),
            "post-copy cannot be combined",
        ),
        (
            MigrationRequest("vm-a", DST, allow_postcopy=True, streams=2),
            "post-copy runs over one stream",
        ),
    ],
)
async def test_refused_inconsistent_request(
    center: Center, fake: FakeAgents, req: MigrationRequest, message: str
) -> None:
    err = await assert_refused(center, fake, req, InvalidInput, "invalid_input")
    assert message in err.message


async def test_refused_unknown_datastore(center: Center, fake: FakeAgents) -> None:
    req = MigrationRequest("vm-a", SRC, kind="storage", datastore="nosuch")
    err = await assert_refused(center, fake, req, NotFound, "datastore_not_found")
    assert "nosuch" in err.message


async def test_refused_datastore_not_shared(center: Center, fake: FakeAgents) -> None:
    fake.host(DST).facts["datastores"] = []
    err = await assert_refused(
        center, fake, MigrationRequest("vm-a", DST), PreconditionError, "datastore_not_shared"
    )
    assert "type 'both'" in err.message
    assert err.details["errors"][0]["code"] == "datastore_not_shared"


async def test_refused_while_already_migrating(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", phases=("active",))
    first = await center.executor.submit(MigrationRequest("vm-a", DST))
    await wait_until(lambda: bool(fake.called(SRC, "migrate")))
    calls = len(fake.calls)
    with pytest.raises(Conflict) as info:
        await center.executor.submit(MigrationRequest("vm-a", DST))
    assert info.value.code == "already_migrating"
    assert len(await center.tasks.list()) == 1
    # Refused before any agent was asked to do anything (reads by the running one aside).
    assert {c.route for c in fake.calls[calls:]} <= {"get", "facts", "list"}
    assert len(fake.called(route="incoming")) == len(fake.called(route="migrate")) == 1

    fake.scripts["vm-a"].phases = ("completed",)
    await center.executor.wait(first)
    assert (await center.tasks.get(first)).state == TaskState.SUCCESS


class BarrierTasks(TaskStore):
    """Tasks whose create() waits (up to 0.15 s) until ``parties`` callers are inside it."""

    def __init__(self, db: Database, parties: int) -> None:
        super().__init__(db)
        self.parties, self.arrived, self.all_in = parties, 0, asyncio.Event()

    async def create(self, kind: str, target: str, request: dict[str, Any], **kw: Any) -> Task:
        self.arrived += 1
        if self.arrived >= self.parties:
            self.all_in.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), 0.15)
        return await super().create(kind, target, request, **kw)


async def test_two_concurrent_submits_start_one_migration(center: Center, fake: FakeAgents) -> None:
    # Were both submits let through the precheck, the barrier would hold them until both create
    # a task; claimed before any await, the VM lets only the first one through.
    tasks = BarrierTasks(center.db, parties=2)
    ex = Executor(center.db, center.inventory, tasks, limit=2)
    req = MigrationRequest("vm-a", DST)
    try:
        results = await asyncio.gather(ex.submit(req), ex.submit(req), return_exceptions=True)
        started = [r for r in results if isinstance(r, int)]
        for task_id in started:
            await ex.wait(task_id)
    finally:
        await ex.close()
    assert len(started) == 1, results
    refused = [r for r in results if not isinstance(r, int)]
    assert isinstance(refused[0], Conflict) and refused[0].code == "already_migrating"
    assert len(await center.tasks.list()) == 1
    assert len(fake.called(DST, "incoming")) == 1


async def test_refused_destination_unreachable(center: Center, fake: FakeAgents) -> None:
    fake.host(DST).dead = True
    await assert_refused(
        center, fake, MigrationRequest("vm-a", DST), PreconditionError, "host_disconnected"
    )


# -- concurrency ------------------------------------------------------------------------------


async def test_a_second_migration_from_a_busy_host_queues(
    center1: Center, fake: FakeAgents
) -> None:
    center = center1
    busiest: list[int] = []

    async def watch_slots(call: Call) -> None:
        busiest.append(max(center.executor.slots.busy.values(), default=0))

    fake.on_call = watch_slots
    fake.script("vm-a", phases=("active",))  # holds its slot until released below
    first = await center.executor.submit(MigrationRequest("vm-a", DST))
    second = await center.executor.submit(MigrationRequest("vm-b", DST))
    await wait_task(center, second, lambda t: t.phase == "queued")
    await wait_until(lambda: len(fake.called(SRC, "get")) >= 3)

    queued = await center.tasks.get(second)
    assert queued.state == TaskState.QUEUED and queued.phase == "queued"
    assert (await center.tasks.get(first)).state == TaskState.RUNNING
    assert [c.vm for c in fake.called(SRC, "migrate")] == ["vm-a"]

    fake.scripts["vm-a"].phases = ("completed",)
    await asyncio.wait_for(center.executor.wait(first), 5)
    await asyncio.wait_for(center.executor.wait(second), 5)
    for task_id in (first, second):
        assert (await center.tasks.get(task_id)).state == TaskState.SUCCESS
    assert await vm_host(center, "vm-a") == await vm_host(center, "vm-b") == DST
    assert max(busiest) == 1
    finish_a = fake.calls.index(fake.called(SRC, "finish")[0])
    incoming_b = [c for c in fake.called(DST, "incoming") if c.body["config"]["name"] == "vm-b"]
    assert fake.calls.index(incoming_b[0]) > finish_a


async def test_cancel_while_queued(center1: Center, fake: FakeAgents) -> None:
    center = center1
    fake.script("vm-a", phases=("active",))
    first = await center.executor.submit(MigrationRequest("vm-a", DST))
    second = await center.executor.submit(MigrationRequest("vm-b", DST))
    await wait_task(center, second, lambda t: t.phase == "queued")
    await center.executor.request_cancel(second)
    fake.scripts["vm-a"].phases = ("completed",)
    await asyncio.wait_for(center.executor.wait(first), 5)
    await asyncio.wait_for(center.executor.wait(second), 5)

    assert (await center.tasks.get(first)).state == TaskState.SUCCESS
    assert (await center.tasks.get(second)).state == TaskState.CANCELLED
    assert [c.vm for c in fake.called(SRC, "migrate")] == ["vm-a"]
    assert fake.called(route="incoming")[-1].body["config"]["name"] == "vm-a"
    assert await vm_host(center, "vm-b") == SRC


async def test_migrations_between_other_hosts_do_not_wait(center_db: str, fake: FakeAgents) -> None:
    """The limit is per host: vm-c (.174 → .175) does not wait for vm-a (.172 → .173)."""
    for name in ("172.16.0.174", "172.16.0.175"):
        fake.add_host(name)
    fake.add_vm("172.16.0.174", "vm-c")
    center = await start_center(center_db, fake, limit=1)
    try:
        for name in ("172.16.0.174", "172.16.0.175"):
            await center.inventory.add_host(name, TOKEN, PORT)
        fake.script("vm-a", phases=("active",))
        first = await center.executor.submit(MigrationRequest("vm-a", DST))
        other = await center.executor.submit(MigrationRequest("vm-c", "172.16.0.175"))
        await asyncio.wait_for(center.executor.wait(other), 5)
        assert (await center.tasks.get(other)).state == TaskState.SUCCESS
        assert (await center.tasks.get(first)).state == TaskState.RUNNING
        fake.scripts["vm-a"].phases = ("completed",)
        await asyncio.wait_for(center.executor.wait(first), 5)
    finally:
        await center.close()


def hold_inserts(center: Center, table: str, parties: int, timeout: float = 0.3) -> list[str]:
    """Hold each INSERT INTO ``table`` until ``parties`` of them are waiting (or ``timeout``).

    SQLAlchemy runs cursor events in the event loop's thread, inside the greenlet that bridges
    to the async driver, so the hook may await (``await_only``) without blocking the loop. Only
    the database's order of work changes; the code under test is the real one."""
    arrived: list[str] = []
    all_in = asyncio.Event()

    async def barrier() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_in.wait(), timeout)

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith(f"INSERT INTO {table} "):
            arrived.append(statement)
            if len(arrived) >= parties:
                all_in.set()
            await_only(barrier())

    event.listen(center.db.engine.sync_engine, "before_cursor_execute", hook)
    return arrived


async def test_concurrent_refreshes_of_a_new_vm(center_db: str, fake: FakeAgents) -> None:
    # The refresh loop, a user's refresh and the REST API may all read one host at once. (No
    # refresh loop here: its own first pass would make a third, unscheduled party.)
    center = await start_center(center_db, fake, start=False)
    try:
        fake.add_vm(SRC, "vm-new")
        hold_inserts(center, "vms", parties=2)
        await asyncio.gather(*(center.inventory.refresh_host(SRC) for _ in range(2)))
        assert await vm_host(center, "vm-new") == SRC
    finally:
        await center.close()


async def test_a_refresh_never_undoes_what_happened_after_it_read_the_host(
    center_db: str, fake: FakeAgents, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A refresh reads a host's VMs; meanwhile a user powers one on and creates another: the
    refresh's older list must not turn the first back off, nor call the second missing. (No
    refresh loop: its own pass would read the host again.)"""
    center = await start_center(center_db, fake, start=False)
    listed = AgentClient.list_vms
    host = await center.inventory.host(SRC)
    late: list[str] = []

    async def list_then_act(self: AgentClient) -> list[Any]:
        vms = await listed(self)
        if not late and SRC in self.base_url:
            late.append("done")
            on = await self.power_on((await center.inventory.vm("vm-off")).uuid)
            await center.inventory.upsert_vm(vm_json(on), host)
            made = await self.create_vm(
                {"name": "vm-late", "datastore": "shared", "nics": [{"network": "vm-network"}]}
            )
            await center.inventory.upsert_vm(vm_json(made), host)
        return vms

    try:
        monkeypatch.setattr(AgentClient, "list_vms", list_then_act)
        await center.inventory.refresh_host(SRC)
        assert late == ["done"]
        assert (await center.inventory.vm("vm-off")).power_state == "poweredOn"
        assert (await center.inventory.vm("vm-late")).power_state == "poweredOff"  # not missing
        monkeypatch.undo()
        await center.inventory.refresh_host(SRC)  # a list read after them agrees
        assert (await center.inventory.vm("vm-off")).power_state == "poweredOn"
    finally:
        await center.close()


# -- abort ------------------------------------------------------------------------------------


async def started_migration(center: Center) -> ComputeMigration:
    """A migration in pre-copy, driven step by step (no executor task)."""
    vm = await center.inventory.vm("vm-a")
    source, dest = await center.inventory.host(SRC), await center.inventory.host(DST)
    task = await center.tasks.create("migrate", vm.name, {})
    req = MigrationRequest("vm-a", DST)
    run = ComputeMigration(center.executor, task.id, vm, source, dest, req)
    await run.migrate(await run.prepare())
    return run


async def test_abort_is_idempotent(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", phases=("active",))
    run = await started_migration(center)
    await run.abort("first", TaskState.ERROR, "first_code")
    first = await center.tasks.get(run.task_id)
    await run.abort("second", TaskState.CANCELLED)
    await run.abort("third", TaskState.ERROR)
    task = await center.tasks.get(run.task_id)

    assert first.state == task.state == TaskState.ERROR and task.phase == "aborted"
    assert task.finished_at is not None
    # Later aborts of an ended task change nothing and call nobody.
    assert [c.status for c in aborts(fake, DST)] == [200]
    assert all(c.status == 200 for c in aborts(fake, SRC))
    assert_rolled_back(fake)
    assert await vm_host(center) == SRC


async def test_a_second_abort_keeps_the_first_reason(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", phases=("active",))
    run = await started_migration(center)
    await run.abort("QEMU migration failed: boom", TaskState.ERROR, "migration_failed")
    first = await center.tasks.get(run.task_id)
    await run.abort("the center stopped during the migration", TaskState.ERROR)
    task = await center.tasks.get(run.task_id)

    assert (task.error, task.error_code) == (first.error, first.error_code)
    assert len(await events(center, run.task_id)) == 1


async def test_after_resume_a_failed_finalize_never_undoes(
    center: Center, fake: FakeAgents
) -> None:
    center.executor.source_retry_s = 0.3  # the source's agent never comes back
    fake.host(SRC).kill_before("finish")
    task = await migrate(center)

    assert await vm_host(center) == DST
    dest_vm = fake.vm(DST, "vm-a")
    assert dest_vm is not None and dest_vm.qemu_status == "running"
    assert aborts(fake, DST) == [] and aborts(fake, SRC) == []
    assert task.phase != "aborted"  # it was not undone: the VM moved
    assert task.state == TaskState.ERROR and task.error_code == "source_cleanup_failed"
    assert len(fake.called(SRC, "finish")) >= 2  # asked again before giving up


async def test_finalize_keeps_asking_a_source_that_is_restarting(
    center: Center, fake: FakeAgents
) -> None:
    """The guest runs on the destination and the source's agent is restarting: the center asks
    again until it answers, so the paused copy on the source is removed, not left behind."""
    fake.host(SRC).kill_before("finish")

    async def revive() -> None:
        await wait_until(lambda: bool(fake.called(SRC, "finish")), timeout=10)
        await asyncio.sleep(0.5)
        fake.host(SRC).die_before.clear()
        fake.host(SRC).dead = False  # the agent is back

    reviving = asyncio.create_task(revive())
    task = await migrate(center)
    await reviving
    assert task.state == TaskState.SUCCESS, task.error
    assert await vm_host(center) == DST
    refused, *_, answered = fake.called(SRC, "finish")
    assert refused.status is None and answered.status == 200
    assert fake.vm(SRC, "vm-a") is None  # the paused copy is gone


async def test_internal_error_still_rolls_back(center: Center, fake: FakeAgents) -> None:
    # Something no layer expects (a bug's stand-in): the run must still abort cleanly.
    async def explode(poll: int, phase: str) -> None:
        if poll == 2:
            raise ValueError("unexpected")

    fake.script("vm-a", phases=("active",), on_poll=explode)
    task = await migrate(center)

    assert task.state == TaskState.ERROR and task.error_code == "internal"
    assert task.error is not None and "unexpected" in task.error
    assert_rolled_back(fake)
    assert await vm_host(center) == SRC


# -- the fake itself --------------------------------------------------------------------------


async def test_the_fake_agent_answers_like_an_agent(fake: FakeAgents) -> None:
    """Routes the executor does not use, through the real client: create, power on, errors."""
    async with AgentClient(f"http://{SRC}:{PORT}", TOKEN, transport=fake) as agent:
        created = await agent.create_vm(
            {"name": "vm-n", "datastore": "shared", "nics": [{"network": "vm-network"}]}
        )
        assert created.power_state == "poweredOff" and created.migration is None
        assert (await agent.power_on("vm-n")).qemu_status == "running"
        assert (await agent.get_vm(created.uuid)).name == "vm-n"
        with pytest.raises(NotFound):
            await agent.get_vm("vm-zz")
        with pytest.raises(Conflict) as info:
            await agent.cancel_migration("vm-n")
        assert info.value.code == "no_migration"
        assert await agent.abort_migration("vm-n") == "nothing to abort"
        facts = await agent.facts()
        assert facts.vms == 4 and facts.vms_powered_on == 3
    async with AgentClient(f"http://{DST}:{PORT}", "wrong", transport=fake) as agent:
        with pytest.raises(Unauthorized):
            await agent.list_vms()
    async with AgentClient(f"http://172.16.0.9:{PORT}", TOKEN, transport=fake) as agent:
        with pytest.raises(HostUnreachable):
            await agent.facts()
    assert [c.route for c in fake.called(SRC)][:3] == ["create", "power_on", "get"]


# -- storage vMotion and change both ----------------------------------------------------------


async def run_to_end(center: Center, req: MigrationRequest) -> Task:
    task_id = await center.executor.submit(req)
    await center.executor.wait(task_id)
    return await center.tasks.get(task_id)


def datastores_of(record: Any) -> list[str]:
    return [d["datastore"] for d in record.config["disks"]]


async def test_storage_move_records_the_new_datastore(center: Center, fake: FakeAgents) -> None:
    task = await run_to_end(
        center, MigrationRequest("vm-a", "", kind="storage", datastore="local-172")
    )
    assert task.state == TaskState.SUCCESS, task.error
    assert task.request["dest"] == SRC and task.request["datastore"] == "local-172"
    [move] = fake.called(SRC, "storage_move")
    assert move.body == {"datastore": "local-172", "max_bandwidth_bps": None}
    # The other host is asked nothing (beyond the center's own refresh).
    assert set(fake.routes(DST)) <= {"facts", "list"}
    record = await center.inventory.vm("vm-a")
    assert record.host is not None and record.host.name == SRC
    assert datastores_of(record) == ["local-172"] and "local-172" in record.config_path
    steps = [t["step"] for t in task.timeline]
    assert steps.index("disk_copy") < steps.index("disks_ready") < steps.index("disks_switched")
    copy = task.summary["disk_copy"]
    assert copy["copied_bytes"] == copy["total_bytes"] == 2**30 and copy["from"] == ["shared"]
    assert task.progress == 100.0


async def test_storage_move_cancelled_mid_copy(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", disk_phases=("copying",))

    async def cancel_on_copy(call: Call) -> None:
        if call.route == "get" and call.host == SRC and fake.called(SRC, "storage_move"):
            await center.executor.request_cancel(center.executor.active["vm-a"])

    fake.on_call = cancel_on_copy
    task = await run_to_end(
        center, MigrationRequest("vm-a", "", kind="storage", datastore="local-172")
    )
    assert task.state == TaskState.CANCELLED and task.error is not None
    assert "keeps its disks" in task.error
    assert len(fake.called(SRC, "storage_cancel")) == 1
    assert datastores_of(await center.inventory.vm("vm-a")) == ["shared"]


async def test_storage_move_that_pivoted_is_finished_not_undone(
    center: Center, fake: FakeAgents
) -> None:
    """The user cancels just as the agent switches the VM to its copies: the cancel comes too
    late (the agent says so), and the task records the move instead of pretending to undo it."""
    fake.script("vm-a", disk_phases=("copying", "completed"))
    fake.host(SRC).fail("storage_cancel", 409, "too_late", "the disks have switched: too late")

    async def cancel_on_copy(call: Call) -> None:
        if call.route == "get" and call.host == SRC and fake.called(SRC, "storage_move"):
            await center.executor.request_cancel(center.executor.active["vm-a"])

    fake.on_call = cancel_on_copy
    task = await run_to_end(
        center, MigrationRequest("vm-a", "", kind="storage", datastore="local-172")
    )
    assert fake.called(SRC, "storage_cancel"), "abort tried to cancel"
    assert task.state == TaskState.SUCCESS, task.error
    assert datastores_of(await center.inventory.vm("vm-a")) == ["local-172"]


async def test_copy_over_a_stalled_link_is_aborted(center: Center, fake: FakeAgents) -> None:
    center.executor.stall_timeout_s = 0.05
    fake.script("vm-a", disk_phases=("copying",), disk_offsets=(2**20,))
    task = await run_to_end(
        center, MigrationRequest("vm-a", DST, kind="both", datastore="local-173")
    )
    assert task.state == TaskState.ERROR and task.error_code == "copy_stalled"
    assert "link" in (task.error or "")
    assert_rolled_back(fake)
    vm = fake.vm(SRC, "vm-a")
    assert vm is not None and vm.storage is not None and vm.storage["phase"] == "cancelled"
    assert datastores_of(await center.inventory.vm("vm-a")) == ["shared"]


async def test_change_both_moves_disks_then_memory(center: Center, fake: FakeAgents) -> None:
    task = await run_to_end(
        center, MigrationRequest("vm-a", DST, kind="both", datastore="local-173")
    )
    assert task.state == TaskState.SUCCESS, task.error
    src = fake.routes(SRC)
    # The center follows the disk copy on the source until it is ready, and only then sends memory.
    watching = src[src.index("storage_mirror") + 1 : src.index("migrate")]
    assert watching and set(watching) == {"get"}, src
    order = [c.route for c in fake.calls if c.route in ("incoming", "storage_mirror", "migrate")]
    assert order == ["incoming", "storage_mirror", "migrate"]
    [incoming] = fake.called(DST, "incoming")
    assert incoming.body["datastore"] == "local-173"
    [mirror] = fake.called(SRC, "storage_mirror")
    assert mirror.body["host"] == "10.99.0.173" and mirror.body["datastore"] == "local-173"
    [finish] = fake.called(SRC, "finish")
    assert finish.body == {"remove_files": True}
    record = await center.inventory.vm("vm-a")
    assert record.host is not None and record.host.name == DST
    assert datastores_of(record) == ["local-173"] and "local-173" in record.config_path
    steps = [t["step"] for t in task.timeline]
    assert steps.index("disks_ready") < steps.index("precopy") < steps.index("resumed")
    assert task.summary["disk_copy"]["copied_bytes"] == 2**30
    assert task.summary["downtime_ms"] == 42


async def test_change_both_failed_copy_rolls_back(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", disk_phases=("copying", "failed"))
    task = await run_to_end(
        center, MigrationRequest("vm-a", DST, kind="both", datastore="local-173")
    )
    assert task.state == TaskState.ERROR and task.error_code == "disk_copy_failed"
    assert "write error" in (task.error or "")
    assert "partial disk copies removed" in (task.error or "")
    assert fake.called(SRC, "migrate") == []
    assert_rolled_back(fake)
    assert datastores_of(await center.inventory.vm("vm-a")) == ["shared"]


async def test_change_both_destination_dies_mid_copy(center: Center, fake: FakeAgents) -> None:
    fake.script("vm-a", disk_phases=("copying",) * 3 + ("ready",))
    fake.host(DST).kill_after("get", 1)
    task = await run_to_end(
        center, MigrationRequest("vm-a", DST, kind="both", datastore="local-173")
    )
    assert task.state == TaskState.ERROR
    assert fake.called(SRC, "migrate") == []
    assert len(aborts(fake, SRC)) == 1
    assert source_runs(fake)
    vm = fake.vm(SRC, "vm-a")
    assert vm is not None and vm.storage is not None and vm.storage["phase"] == "cancelled"
    assert await vm_host(center) == SRC


async def test_refresh_leaves_an_incoming_copy_its_source_still_feeds(
    center: Center, fake: FakeAgents
) -> None:
    """A center restarted mid-migration must not end a destination the source still migrates
    to (it may be about to resume)."""
    source = fake.vm(SRC, "vm-a")
    assert source is not None
    source.migration = {"side": "source", "phase": "active", "marks": {}, "samples": []}
    incoming = fake.add_vm(DST, "vm-a", power_state="incoming")
    incoming.migration = None
    await center.inventory.refresh_host(DST)
    assert aborts(fake, DST) == []
    assert fake.vm(DST, "vm-a") is not None


async def test_refresh_ends_an_orphaned_incoming_copy(center: Center, fake: FakeAgents) -> None:
    """A destination whose agent was down when its migration was aborted still has a paused,
    receiving QEMU: the next refresh ends it (and the partial disks made for it)."""
    orphan = fake.add_vm(DST, "vm-a", power_state="incoming")
    orphan.created = True
    orphan.migration = None
    await center.inventory.refresh_host(DST)
    [abort] = aborts(fake, DST)
    assert abort.vm in ("vm-a", orphan.uuid)
    assert fake.vm(DST, "vm-a") is None
    assert await vm_host(center) == SRC  # the inventory never moved the VM


async def test_prediction_learns_from_the_host_pair(center: Center, fake: FakeAgents) -> None:
    """The prediction's inputs: the agent's memory profile, and what this pair's earlier
    migrations measured (QEMU's setup per GiB; its copy rate once copies lasted long enough)."""

    async def predicted(dest: str) -> dict[str, Any]:
        task_id = await center.executor.submit(MigrationRequest("vm-a", dest, predict=True))
        await asyncio.wait_for(center.executor.wait(task_id), 10)
        task = await center.tasks.get(task_id)
        assert task.state == TaskState.SUCCESS, task.error
        prediction: dict[str, Any] = task.summary["predicted"]
        return prediction | {"link_bps": task.summary["link_bps"]}

    first = await predicted(DST)
    assert first["history_migrations"] == 0 and first["setup_s"] == 0.0
    assert first["nonzero_bytes"] == 64 * 2**20 and first["working_set_bytes"] == 8 * 2**20
    assert not first["dirty_rate_saturated"]
    assert "host pair" not in first["reason"]
    # The guest now rewrites its whole working set within QEMU's 1 s sample: a lower bound.
    fake.hosts[DST].profile = {
        "nonzero_bytes": 128 * 2**20, "dirty_rate_bps": 40 * 2**20, "working_set_bytes": 40 * 2**20
    }  # fmt: skip
    back = await predicted(SRC)
    assert back["history_migrations"] == 1
    # The fake's QEMU took 3 ms of setup for 256 MiB: 12 ms per GiB, so 3 ms for this VM.
    assert back["setup_s"] == pytest.approx(0.003)
    assert back["dirty_rate_saturated"] and "at least 40 MiB/s" in back["reason"]
    assert "predicted with 80 MiB/s" in back["reason"]
    # The fake's QEMU moved 256 MiB in its copy time: slower than the link, so that rate counts.
    assert 0 < back["effective_link_bps"] < back["link_bps"]
    assert f"copies at {back['effective_link_bps'] * 8 / 1e6:.0f} Mbit/s" in back["reason"]
    assert "last 1 migrations" in back["reason"]


async def test_a_full_migration_link_queues_the_next(center_db: str, fake: FakeAgents) -> None:
    """The cost model, not a count: with a link that carries one vMotion, the second waits."""
    center = await start_center(center_db, fake, limit=8)
    center.executor.limits = CostLimits(link_1g=1, link_10g=1)
    try:
        fake.script("vm-a", phases=("active",))  # holds its costs until released below
        first = await center.executor.submit(MigrationRequest("vm-a", DST))
        second = await center.executor.submit(MigrationRequest("vm-b", DST))
        await wait_task(center, second, lambda t: t.phase == "queued")
        await wait_until(lambda: len(fake.called(SRC, "get")) >= 3)
        assert (await center.tasks.get(second)).state == TaskState.QUEUED
        busy = center.executor.slots.busy
        assert busy[f"link:{SRC}"] == busy[f"link:{DST}"] == 1
        assert busy[f"host:{SRC}"] == 1 and busy["datastore:shared"] == 1
        fake.scripts["vm-a"].phases = ("completed",)
        for task_id in (first, second):
            await asyncio.wait_for(center.executor.wait(task_id), 5)
            assert (await center.tasks.get(task_id)).state == TaskState.SUCCESS
        assert center.executor.slots.busy == {}
    finally:
        await center.close()


async def test_an_abort_keeps_asking_a_source_that_is_restarting(
    center: Center, fake: FakeAgents
) -> None:
    """The destination's copy is ended, the source's agent does not answer for a moment: the
    abort asks again until it does, so the source's guest is never left stunned."""
    fake.script("vm-a", phases=("active",))
    task_id = await center.executor.submit(MigrationRequest("vm-a", DST))
    # The center saw the source stream (only then may its guest be stunned, and the abort
    # insists): waiting for the migrate call alone raced the first look, and CI once saw a
    # single ask, rightly, of a source never seen migrating.
    await wait_task(center, task_id, lambda t: t.phase == "active")
    fake.host(SRC).dead = True  # the source's agent dies mid-migration...
    await wait_until(lambda: bool(aborts(fake, DST)), timeout=10)

    async def revive() -> None:
        # ... and is back once the abort asked it at least once (on a busy machine a fixed
        # delay could outlast the abort's first ask, and nothing would be refused)
        await wait_until(lambda: bool(aborts(fake, SRC)), timeout=10)
        fake.host(SRC).dead = False

    reviving = asyncio.create_task(revive())
    await asyncio.wait_for(center.executor.wait(task_id), 15)
    await reviving
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.ERROR
    asked = aborts(fake, SRC)  # refused while dead, then answered
    assert len(asked) >= 2 and all(c.query.get("destination_gone") == "true" for c in asked)
    assert await vm_host(center) == SRC and source_runs(fake)
