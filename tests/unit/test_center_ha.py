"""Centers that share one database (center/leader.py, center/orphans.py): one active, the others
standbys that send clients to it; a standby takes over when the active one loses its hold, and
settles the migration it left. Real centers (on SQLite, then PostgreSQL) over fake agents.

"Losing its hold" is what a dead center's database sees: on PostgreSQL its session is ended
(``pg_terminate_backend``, as PostgreSQL does to a killed process's or a silent machine's
session); on SQLite its lock file is closed. The lab's test (tests/lab/test_center_failover.py)
kills real center processes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack

import asyncpg
import httpx
import pytest

from kvmotion.center import runs
from kvmotion.center.api import create_app
from kvmotion.center.leader import PostgresLock
from kvmotion.center.service import Center, CenterConfig
from kvmotion.center.tasks import TaskState
from kvmotion.migration.request import MigrationRequest
from tests.databases import DatabaseServer
from tests.unit.fake_agent import PORT, TOKEN, Call, FakeAgents, wait_until

SRC, DST = "172.16.0.172", "172.16.0.173"
CHECK_S = 0.1
AUTH = {"Authorization": "Bearer t"}


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runs, "POLL_INTERVAL", 0.002)


@pytest.fixture
def fake() -> FakeAgents:
    agents = FakeAgents(SRC, DST)
    agents.add_vm(SRC, "vm-a")
    return agents


@pytest.fixture
def shared_db(database_server: DatabaseServer) -> Iterator[str]:
    url = database_server.fresh()
    try:
        yield url
    finally:
        database_server.drop(url)


def config(db_url: str, name: str) -> CenterConfig:
    return CenterConfig(
        db_url=db_url, token="t", refresh_interval_s=3600, name=name,
        advertise_url=f"https://{name}.example:8600", leader_check_s=CHECK_S,
    )  # fmt: skip


@pytest.fixture
async def centers(
    shared_db: str, fake: FakeAgents
) -> AsyncIterator[tuple[Center, Center, AsyncExitStack]]:
    """Center one (active, with both hosts added) and center two (its standby)."""
    async with AsyncExitStack() as stack:
        one = Center(config(shared_db, "one"), transport=fake)
        await one.start()
        stack.push_async_callback(one.close)
        for host in (SRC, DST):
            await one.inventory.add_host(host, TOKEN, PORT)
        two = Center(config(shared_db, "two"), transport=fake)
        await two.start()
        stack.push_async_callback(two.close)
        yield one, two, stack


def api(center: Center) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(center))
    return httpx.AsyncClient(transport=transport, base_url="http://center", headers=AUTH)


async def cut_hold(center: Center) -> None:
    """What the database sees when this center dies: its leadership's session (PostgreSQL) or
    lock file (SQLite) is gone."""
    lock = center.leadership.lock
    if isinstance(lock, PostgresLock):
        conn = await asyncpg.connect(lock.dsn)
        try:
            ended = await conn.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_locks "
                "WHERE locktype = 'advisory' AND objid = $1 AND granted",
                0x6B766D61,
            )
        finally:
            await conn.close()
        assert ended == 1
    else:
        await lock.release()


async def lose_one_mid_migration(
    one: Center,
    two: Center,
    fake: FakeAgents,
    reserved: list[bool] | None = None,
    **script: object,
) -> int:
    """Center one migrates vm-a and dies at its run's second look at the source (the run waits
    there forever, as if its process ended); the agents go on (each later look, center two's,
    moves QEMU on along ``script``; ``reserved`` gets, at each, whether center two holds vm-a
    against new moves). Returns the task's id once center two is active."""
    two.orphans.poll_s = 0.01
    frozen = asyncio.Event()

    async def freeze_once(poll: int, _phase: str) -> None:
        if poll == 2 and not frozen.is_set():
            frozen.set()
            await asyncio.Event().wait()
        elif poll > 2 and reserved is not None:
            reserved.append(two.executor.migrating("vm-a"))

    fake.script("vm-a", on_poll=freeze_once, **script)
    task_id = await one.executor.submit(MigrationRequest("vm-a", DST))
    await asyncio.wait_for(frozen.wait(), 10)
    await cut_hold(one)
    await wait_until(lambda: two.role == "active", timeout=20 * CHECK_S + 5)
    return task_id


async def test_one_center_is_active_and_the_standby_sends_clients_to_it(
    centers: tuple[Center, Center, AsyncExitStack],
) -> None:
    one, two, _ = centers
    assert (one.role, two.role) == ("active", "standby")
    async with api(one) as a, api(two) as b:
        answer = await b.get("/v1/health")
        assert answer.headers["access-control-allow-origin"] == "*"  # the others' web clients
        health = answer.json()
        assert health["role"] == "standby"
        assert health["active"] == {"name": "one", "url": "https://one.example:8600"}
        refused = await b.get("/v1/vms")
        assert refused.status_code == 503
        error = refused.json()["error"]
        assert error["code"] == "standby"
        assert error["details"]["active_url"] == "https://one.example:8600"
        assert "one" in error["message"] and "two" in error["message"]
        page = await b.get("/vms/vm-a", follow_redirects=False)  # the web client
        assert page.status_code == 307
        assert page.headers["location"] == "https://one.example:8600/vms/vm-a"
        assert (await a.get("/v1/active")).status_code == 200
        assert (await b.get("/v1/active")).status_code == 503
        assert [v["name"] for v in (await a.get("/v1/vms")).json()] == ["vm-a"]
        listed = {c["name"]: c["role"] for c in (await a.get("/v1/centers")).json()}
        assert listed == {"one": "active", "two": "standby"}


async def test_a_standby_takes_over_when_the_active_center_loses_its_hold(
    centers: tuple[Center, Center, AsyncExitStack],
) -> None:
    one, two, _ = centers
    cut_at = time.monotonic()
    await cut_hold(one)
    await wait_until(lambda: two.role == "active", timeout=20 * CHECK_S + 5)
    took = time.monotonic() - cut_at
    assert one.lost.is_set() and one.role == "lost"  # it stopped acting
    assert one._refresher is None
    async with api(one) as a, api(two) as b:
        refused = await a.get("/v1/vms")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "standby"
        assert refused.json()["error"]["details"]["active_url"] == "https://two.example:8600"
        assert [v["name"] for v in (await b.get("/v1/vms")).json()] == ["vm-a"]
        listed = {c["name"]: c["role"] for c in (await b.get("/v1/centers")).json()}
        assert listed == {"one": "lost", "two": "active"}
    assert took < 10  # the bound; with checks every 0.1 s it is well under


async def test_a_center_that_stops_hands_over_to_its_standby(
    centers: tuple[Center, Center, AsyncExitStack],
) -> None:
    one, two, _ = centers
    await one.close()
    await wait_until(lambda: two.role == "active", timeout=20 * CHECK_S + 5)
    async with api(two) as b:
        listed = {c["name"]: c["role"] for c in (await b.get("/v1/centers")).json()}
    assert listed == {"one": "stopped", "two": "active"}


async def test_the_new_active_center_finishes_the_migration_the_lost_one_left(
    centers: tuple[Center, Center, AsyncExitStack], fake: FakeAgents
) -> None:
    """Center one dies mid-copy (its run waits forever at the second poll); the agents go on
    (each look at the source moves QEMU on); center two settles the task as the hosts say."""
    one, two, _ = centers
    reserved: list[bool] = []
    task_id = await lose_one_mid_migration(one, two, fake, reserved)
    await two.orphans.wait()
    assert reserved and all(reserved)  # no new move of it while it settles
    task = await two.tasks.get(task_id)
    assert task.state == TaskState.SUCCESS, task.error
    assert task.summary["finished_by"] == "agents"
    assert "the active center one was lost" in task.summary["settled_because"]
    assert fake.vm(SRC, "vm-a") is None  # the source's copy ended (step 5)
    assert fake.vm(DST, "vm-a") is not None and fake.vm(DST, "vm-a").power_state == "poweredOn"  # type: ignore[union-attr]
    assert (await two.inventory.vm("vm-a")).host.name == DST  # type: ignore[union-attr]
    assert not two.executor.migrating("vm-a")


async def test_a_migration_that_failed_without_its_center_is_recorded_so(
    centers: tuple[Center, Center, AsyncExitStack], fake: FakeAgents
) -> None:
    one, two, _ = centers
    task_id = await lose_one_mid_migration(one, two, fake, phases=("active", "active", "failed"))
    await two.orphans.wait()
    task = await two.tasks.get(task_id)
    assert task.state == TaskState.ERROR and task.error_code == "center_failover"
    assert task.error is not None and f"runs on {SRC}" in task.error
    assert (await two.inventory.vm("vm-a")).host.name == SRC  # type: ignore[union-attr]


async def test_a_migration_still_under_way_after_the_settle_time_is_aborted(
    centers: tuple[Center, Center, AsyncExitStack], fake: FakeAgents
) -> None:
    one, two, _ = centers
    two.orphans.settle_s = 0.5
    task_id = await lose_one_mid_migration(one, two, fake, phases=("active",))  # pre-copy forever
    await two.orphans.wait()
    task = await two.tasks.get(task_id)
    assert task.state == TaskState.ERROR and task.error_code == "center_failover"
    assert task.error is not None and "aborted" in task.error
    assert [c.route for c in fake.called(SRC) if c.route.endswith("abort")]
    vm = fake.vm(SRC, "vm-a")
    assert vm is not None and vm.qemu_status == "running"  # the guest runs on where it was


async def test_a_lone_center_on_its_database_is_active_at_once(
    shared_db: str, fake: FakeAgents
) -> None:
    center = Center(config(shared_db, "alone"), transport=fake)
    await center.start()
    try:
        assert center.role == "active"
        async with api(center) as a:
            assert (await a.get("/v1/health")).json()["active"]["name"] == "alone"
    finally:
        await center.close()
    assert center.role == "stopped"


async def test_a_destination_prepared_for_a_migration_that_never_started_is_ended(
    centers: tuple[Center, Center, AsyncExitStack], fake: FakeAgents
) -> None:
    """Center one dies between preparing the destination and starting the source: nothing will
    feed the destination's copy, and its VM is reserved while it settles (the refresh leaves it),
    so center two ends that copy itself."""
    one, two, _ = centers
    two.orphans.poll_s = 0.01
    frozen = asyncio.Event()

    async def freeze_the_start(call: Call) -> None:
        if call.route == "migrate" and not frozen.is_set():
            frozen.set()
            await asyncio.Event().wait()

    fake.on_call = freeze_the_start
    task_id = await one.executor.submit(MigrationRequest("vm-a", DST))
    await asyncio.wait_for(frozen.wait(), 10)
    incoming = fake.vm(DST, "vm-a")
    assert incoming is not None and incoming.power_state == "incoming"
    await cut_hold(one)
    await wait_until(lambda: two.role == "active", timeout=20 * CHECK_S + 5)
    await two.orphans.wait()
    task = await two.tasks.get(task_id)
    assert task.state == TaskState.ERROR and task.error_code == "center_failover", task.error
    assert task.error is not None and f"runs on {SRC}" in task.error
    gone = fake.vm(DST, "vm-a")
    assert gone is None or gone.power_state == "poweredOff"  # the copy no stream fed, ended
    assert fake.called(DST, "abort")
