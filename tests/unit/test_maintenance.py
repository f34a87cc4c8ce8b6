"""Maintenance mode through the center with fake hosts: a host emptied by live migrations to the
hosts the placement chooses, then held (nothing created, powered on or migrated onto it); a VM
that cannot move blocks it with its reason until cancelled; exit. With real guests:
tests/lab/test_maintenance.py."""

# ruff: noqa: F811 (the fixtures imported below are the tests' parameters)
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest

from kvmotion.center import maintenance
from kvmotion.center.placing import place_new_vm
from kvmotion.center.service import Center
from kvmotion.center.tasks import TaskState
from kvmotion.errors import Conflict, InsufficientResources, NotFound, PreconditionError
from kvmotion.host.vmconfig import NicRequest, VmCreateRequest
from kvmotion.migration.request import MigrationRequest
from kvmotion.migration.rules import Rule
from tests.unit.fake_agent import FakeAgents, wait_until
from tests.unit.test_executor import (  # noqa: F401 (fixtures used as parameters)
    DST,
    SRC,
    center,
    center_db,
    fake,
    fast,
    template_db,
    vm_host,
)


@pytest.fixture(autouse=True)
def quick_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maintenance, "ROUND_S", 0.02)


async def test_entering_moves_every_running_vm_then_holds_the_host(
    center: Center, fake: FakeAgents
) -> None:
    task_id = await center.maintenance.enter(SRC)
    await center.maintenance.wait(task_id)
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.SUCCESS and task.phase == "in maintenance", task.error
    assert sorted(task.summary["moved"]) == ["vm-a", "vm-b"] and task.summary["blockers"] == []
    assert await vm_host(center, "vm-a") == await vm_host(center, "vm-b") == DST
    assert await vm_host(center, "vm-off") == SRC  # powered off: it stays (not asked to move)
    assert (await center.inventory.host(SRC)).maintenance == "in"
    # Nothing new comes: a migration onto it is refused by the precheck.
    with pytest.raises(PreconditionError) as info:
        await center.executor.submit(MigrationRequest("vm-a", SRC))
    assert info.value.code == "host_in_maintenance"
    with pytest.raises(Conflict):
        await center.maintenance.enter(SRC)
    await center.maintenance.exit(SRC)
    assert (await center.inventory.host(SRC)).maintenance is None
    moved = await center.executor.submit(MigrationRequest("vm-a", SRC))
    await center.executor.wait(moved)
    assert (await center.tasks.get(moved)).state == TaskState.SUCCESS


async def test_a_vm_that_cannot_move_blocks_the_host_saying_why(
    center: Center, fake: FakeAgents
) -> None:
    fake.add_vm(SRC, "vm-local", datastore="local-172")
    await center.inventory.refresh_all()
    task_id = await center.maintenance.enter(SRC)

    async def blocked() -> bool:
        task = await center.tasks.get(task_id)
        return task.phase == "blocked"

    await wait_until_async(blocked)
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.RUNNING
    [blocker] = task.summary["blockers"]
    assert blocker["vm"] == "vm-local" and "local-172" in blocker["reason"], blocker
    assert blocker["hosts"] == [
        {"host": DST, "code": "datastore_not_shared", "message": blocker["hosts"][0]["message"]}
    ]
    assert (await center.maintenance.latest_tasks()) == {SRC: task_id}
    assert sorted(task.summary["moved"]) == ["vm-a", "vm-b"]  # the others moved meanwhile
    await center.executor.request_cancel(task_id)
    await center.maintenance.wait(task_id)
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.CANCELLED and task.error_code == "cancelled"
    assert "stays entering" in (task.error or "")
    assert (await center.inventory.host(SRC)).maintenance == "entering"
    assert await vm_host(center, "vm-local") == SRC
    await center.maintenance.exit(SRC)
    assert (await center.inventory.host(SRC)).maintenance is None


async def test_a_host_entering_maintenance_takes_no_new_vm(
    center: Center, fake: FakeAgents
) -> None:
    fake.add_vm(SRC, "vm-local", datastore="local-172")
    await center.inventory.refresh_all()
    task_id = await center.maintenance.enter(SRC)
    with pytest.raises(Conflict) as info:
        await center.maintenance.enter(SRC)
    assert info.value.code == "entering_maintenance"
    await wait_until(lambda: bool(fake.called(SRC, "migrate")))
    await center.maintenance.exit(SRC)  # ends the evacuation too
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.CANCELLED


async def wait_until_async(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.01)


async def test_a_new_vm_given_no_host_goes_where_there_is_most_room(
    center: Center, fake: FakeAgents
) -> None:
    spec = VmCreateRequest(name="vm-new", datastore="shared", memory_mib=512,
                           nics=[NicRequest(network="vm-network")])  # fmt: skip
    placed = await place_new_vm(center.inventory, center.rules, spec)
    assert placed.host == DST  # .172 runs vm-a and vm-b
    assert placed.explain().startswith(f"vm-new -> {DST} (")
    await center.maintenance.enter(DST)  # nothing new goes to a host in maintenance
    assert (await place_new_vm(center.inventory, center.rules, spec)).host == SRC
    lost = spec.model_copy(update={"nics": [NicRequest(network="nowhere")]})
    with pytest.raises(InsufficientResources) as info:
        await place_new_vm(center.inventory, center.rules, lost)
    assert info.value.code == "no_host_fits"
    assert "has no network nowhere" in info.value.message  # each host's reason


async def test_rules_are_checked_when_added_and_kept_by_moves(
    center: Center, fake: FakeAgents
) -> None:
    await center.rules.add(Rule("pin-a", "vm-host", frozenset({"vm-a"}), frozenset({SRC})))
    with pytest.raises(Conflict) as info:
        await center.rules.add(Rule("pin-a-too", "vm-host", frozenset({"vm-a"}), frozenset({DST})))
    assert info.value.code == "rule_conflict" and "rule pin-a" in info.value.message
    with pytest.raises(NotFound):
        await center.rules.add(Rule("ghost", "affinity", frozenset({"vm-a", "nobody"})))
    # A migration that breaks a must rule is refused by the precheck, naming the rule.
    with pytest.raises(PreconditionError) as refused:
        await center.executor.submit(MigrationRequest("vm-a", DST))
    assert refused.value.code == "rule_violation" and "rule pin-a" in refused.value.message
    # A should rule only warns.
    await center.rules.add(
        Rule("b-home", "vm-host", frozenset({"vm-b"}), frozenset({SRC}), must=False)
    )
    task_id = await center.executor.submit(MigrationRequest("vm-b", DST))
    await center.executor.wait(task_id)
    task = await center.tasks.get(task_id)
    assert task.state == TaskState.SUCCESS
    assert any("rule b-home" in w["message"] for w in task.warnings)
    [state] = [r for r in await center.rules.states() if r["name"] == "b-home"]
    assert not state["kept"] and "not on 172.16.0.173" in state["broken"][0]


async def test_a_vm_pinned_by_a_must_rule_blocks_maintenance_naming_it(
    center: Center, fake: FakeAgents
) -> None:
    await center.rules.add(Rule("pin-a", "vm-host", frozenset({"vm-a"}), frozenset({SRC})))
    task_id = await center.maintenance.enter(SRC)

    async def blocked() -> bool:
        return (await center.tasks.get(task_id)).phase == "blocked"

    await wait_until_async(blocked)
    task = await center.tasks.get(task_id)
    [blocker] = task.summary["blockers"]
    assert (
        blocker["vm"] == "vm-a"
        and "rule pin-a: vm-a must run on 172.16.0.172" in (blocker["reason"])
    )
    assert task.summary["moved"] == ["vm-b"]
    await center.maintenance.exit(SRC)
