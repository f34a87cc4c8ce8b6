"""Balancing through the center with fake hosts: settings checked, a pass reads the agents'
loads and recommends with reasons and the predictor's cost, applying starts the migration and
the moved VM is then held; automatic mode moves by itself; hosts outside the cluster are not
touched. With real guests burning CPU: tests/lab/test_balancing.py."""

# ruff: noqa: F811 (the fixtures imported below are the tests' parameters)
from __future__ import annotations

import asyncio

import pytest

from kvmotion.center.service import Center
from kvmotion.center.tasks import TaskState
from kvmotion.errors import InvalidInput, NotFound
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
    wait_task,
)


async def cluster_of_both(center: Center, fake: FakeAgents, cpu: float = 3.0) -> None:
    for name in ("vm-a", "vm-b"):
        vm = fake.vm(SRC, name)
        assert vm is not None
        vm.cpu = cpu  # of the host's 8 CPUs: 75 % on SRC, none on DST
    await center.clusters.create("drs")
    for host in (SRC, DST):
        await center.clusters.add_host("drs", host)


async def test_settings_default_to_off_and_are_checked(center: Center) -> None:
    await center.clusters.create("drs")
    assert await center.balancer.settings("drs") == {
        "mode": "off", "threshold": 3, "window_s": 300.0, "hold_s": 600.0
    }  # fmt: skip
    changed = await center.balancer.configure("drs", mode="manual", threshold=5, hold_s=0)
    assert changed == {"mode": "manual", "threshold": 5, "window_s": 300.0, "hold_s": 0.0}
    for bad in ({"mode": "sometimes"}, {"threshold": 6}, {"window_s": 1}, {"hold_s": -1}):
        with pytest.raises(InvalidInput):
            await center.balancer.configure("drs", **bad)
    with pytest.raises(NotFound):
        await center.balancer.settings("nope")


async def test_a_recommendation_says_why_and_what_it_costs_and_applying_moves_the_vm(
    center: Center, fake: FakeAgents
) -> None:
    await cluster_of_both(center, fake)
    await center.balancer.configure("drs", mode="manual")
    done = await center.balancer.run_pass("drs", predict_moves=True)
    assert {h: s.cpu for h, s in done.result.loads.items()} == {SRC: 0.75, DST: 0.0}
    [rec] = done.recommendations
    assert (rec.source, rec.dest, rec.state) == (SRC, DST, "pending")
    assert rec.vm in ("vm-a", "vm-b") and rec.cpu == 3.0
    assert f"{SRC} CPU 75%" in rec.reason and rec.imbalance_after < rec.imbalance_before
    assert rec.move_s > 0  # the estimate from its memory over the link
    assert rec.prediction is not None and rec.prediction["converges"], rec.prediction
    as_json = done.as_dict()
    assert as_json["recommendations"][0]["id"] == rec.id and as_json["settings"]["mode"] == "manual"

    with pytest.raises(NotFound):
        await center.balancer.apply("drs", [rec.id + 100])
    # A pass of the loop's replaces the latest meanwhile: the one the user was shown stays
    # appliable by its number.
    newer = await center.balancer.run_pass("drs")
    assert [r.id for r in newer.recommendations] != [rec.id]
    [applied] = await center.balancer.apply("drs", [rec.id])
    assert applied["state"] == "applied" and applied["task"] is not None
    task = await wait_task(center, applied["task"], lambda t: TaskState(t.state).final)
    assert task.state == TaskState.SUCCESS, task.error
    assert await vm_host(center, rec.vm) == DST
    # The newer pass recommended the same move: its VM has moved since, so it is stale.
    [stale] = await center.balancer.apply("drs")
    assert stale["state"] == "stale" and "no longer on" in stale["error"], stale
    assert await center.balancer.apply("drs") == []  # nothing pending is left
    # The next pass: the moved VM is held, the other one would only swap the imbalance.
    again = await center.balancer.run_pass("drs")
    assert again.recommendations == [] and rec.vm in again.result.held


async def test_automatic_mode_moves_by_itself(center: Center, fake: FakeAgents) -> None:
    await cluster_of_both(center, fake)
    await center.balancer.configure("drs", mode="automatic")
    center.balancer.interval_s = 0.05
    center.balancer.start()
    await wait_until(lambda: any(fake.vm(DST, n) is not None for n in ("vm-a", "vm-b")), 30)
    latest = center.balancer.latest("drs")
    assert latest is not None and latest.recommendations[0].state == "applied"
    task = await wait_task(
        center, int(latest.recommendations[0].task or 0), lambda t: TaskState(t.state).final
    )
    assert task.state == TaskState.SUCCESS, task.error


async def test_off_does_nothing_and_hosts_outside_the_cluster_are_not_counted(
    center: Center, fake: FakeAgents
) -> None:
    await cluster_of_both(center, fake)
    center.balancer.interval_s = 0.05
    center.balancer.start()
    await asyncio.sleep(0.3)  # several intervals
    assert center.balancer.latest("drs") is None  # off: no pass ran
    await center.clusters.create("alone")
    done = await center.balancer.run_pass("alone")
    assert done.result.loads == {} and done.recommendations == []
