"""Concurrent migrations counted as vCenter counts them (kvmotion/migration/costs.py)."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmotion.migration.costs import Budget, CostLimits, demand

GBIT, TEN_GBIT = 1e9 / 8, 10e9 / 8
LIMITS = CostLimits()


def compute(
    src: str = "a", dst: str = "b", link: float | None = GBIT
) -> dict[str, tuple[int, int]]:
    return demand("compute", {src: link, dst: link}, {"shared"}, LIMITS)


def test_what_each_kind_costs() -> None:
    assert compute() == {
        "host:a": (1, 8), "link:a": (1, 4), "host:b": (1, 8), "link:b": (1, 4),
        "datastore:shared": (1, 128),
    }  # fmt: skip
    assert compute(link=TEN_GBIT)["link:a"] == (1, 8)
    assert compute(link=None)["link:a"] == (1, 4)  # unknown: as the slower link
    storage = demand("storage", {"a": GBIT}, {"local-a", "shared"}, LIMITS)
    assert storage == {
        "host:a": (4, 8),
        "datastore:local-a": (16, 128),
        "datastore:shared": (16, 128),
    }
    both = demand("both", {"a": GBIT, "b": GBIT}, {"local-a", "local-b"}, LIMITS)
    assert both["host:a"] == (4, 8) and both["link:b"] == (1, 4)
    assert both["datastore:local-b"] == (16, 128)
    capped = demand("compute", {"a": GBIT}, set(), CostLimits(migrations_per_host=2))
    assert capped["count:a"] == (1, 2)


async def test_a_1gbit_link_carries_four_vmotions_and_the_fifth_queues() -> None:
    budget = Budget()
    for _ in range(4):
        await asyncio.wait_for(budget.acquire(compute()), 1)
    fifth = asyncio.create_task(budget.acquire(compute()))
    await asyncio.sleep(0.05)
    assert not fifth.done(), "a fifth vMotion on a 1 Gbit/s link must wait"
    other_pair = compute("c", "d")  # other hosts, same datastore: not held up
    await asyncio.wait_for(budget.acquire(other_pair), 1)
    await budget.release(compute())
    await asyncio.wait_for(fifth, 1)
    assert budget.busy["link:a"] == 4 and budget.busy["datastore:shared"] == 5


async def test_two_storage_vmotions_per_host() -> None:
    budget = Budget()
    one = demand("storage", {"a": GBIT}, {"ds1", "ds2"}, LIMITS)
    await budget.acquire(one)
    await budget.acquire(one)
    assert not budget.fits(one)  # host cost 4 + 4 = 8 of 8
    assert budget.fits(compute("b", "c"))
    await budget.release(one)
    assert budget.fits(one)


async def test_an_oversized_migration_runs_when_its_resources_are_idle() -> None:
    tiny = CostLimits(host=2, datastore=8)
    big = demand("storage", {"a": GBIT}, {"ds"}, tiny)  # host 4 of 2, datastore 16 of 8
    budget = Budget()
    await asyncio.wait_for(budget.acquire(big), 1)
    assert not budget.fits(big)
    await budget.release(big)
    assert budget.busy == {}


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.sampled_from(["compute", "storage", "both"]), min_size=1, max_size=30))
def test_never_over_capacity_unless_alone(kinds: list[str]) -> None:
    """Admit greedily what fits: no resource ever holds more than its capacity, except one
    migration alone on it."""
    budget, held = Budget(), []
    for kind in kinds:
        hosts = {"a": GBIT, "b": TEN_GBIT} if kind != "storage" else {"a": GBIT}
        need = demand(kind, hosts, {"shared"}, LIMITS)
        if budget.fits(need):
            asyncio.run(budget.acquire(need))
            held.append(need)
    for key, used in budget.busy.items():
        capacities = {n[key][1] for n in held if key in n}
        users = sum(1 for n in held if key in n)
        assert used <= max(capacities) or users == 1, (key, used)
