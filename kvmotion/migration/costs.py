"""How many migrations run at once, counted as vCenter counts them.

Each migration costs something on every resource it uses: each host it touches, each host's
migration link, each datastore it reads or writes. It starts only when every one of them has
room; beyond that it waits, queued, and never fails for it. The numbers are vSphere's ("Limits on
Simultaneous Migrations"): a host carries 8, a migration link 4 on 1 Gbit/s or 8 on 10 Gbit/s, a
datastore 128; a vMotion (compute) costs 1 of each, a Storage vMotion 4 of its host and 16 of each
datastore, a "change both" 4 of each host, 1 of each link and 16 of each datastore.

``migrations_per_host`` (the center's config) can cap the count of migrations per host on top,
for small labs. A single migration that costs more than a resource's capacity still runs when that
resource is otherwise idle, rather than waiting forever.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

TEN_GBIT_BPS = 10e9 / 8


@dataclass(frozen=True)
class CostLimits:
    host: int = 8
    link_1g: int = 4  # a migration link below 10 Gbit/s
    link_10g: int = 8
    datastore: int = 128
    migrations_per_host: int | None = None  # an extra cap on the count, None: none

    def link(self, link_bps: float | None) -> int:
        return self.link_10g if (link_bps or 0) >= 0.99 * TEN_GBIT_BPS else self.link_1g


@dataclass(frozen=True)
class Cost:
    host: int
    link: int
    datastore: int


COSTS = {
    "compute": Cost(host=1, link=1, datastore=1),
    "storage": Cost(host=4, link=0, datastore=16),
    "both": Cost(host=4, link=1, datastore=16),
}

# resource key ("host:NAME", "link:NAME", "datastore:NAME", "count:NAME") -> (cost, capacity)
Demand = dict[str, tuple[int, int]]


def demand(
    kind: str,
    hosts: dict[str, float | None],
    datastores: set[str],
    limits: CostLimits,
) -> Demand:
    """What a migration of ``kind`` takes: ``hosts`` maps each host it touches to its migration
    link's speed (bytes/s, None when unknown); ``datastores`` are those it reads or writes."""
    cost = COSTS[kind]
    need: Demand = {}
    for host, link_bps in hosts.items():
        need[f"host:{host}"] = (cost.host, limits.host)
        if cost.link:
            need[f"link:{host}"] = (cost.link, limits.link(link_bps))
        if limits.migrations_per_host is not None:
            need[f"count:{host}"] = (1, limits.migrations_per_host)
    for datastore in datastores:
        need[f"datastore:{datastore}"] = (cost.datastore, limits.datastore)
    return need


class Budget:
    """The resources in use; :meth:`acquire` waits until a demand fits."""

    def __init__(self) -> None:
        self.busy: dict[str, int] = {}  # resource key -> cost in use
        self._cond = asyncio.Condition()

    def fits(self, need: Demand) -> bool:
        return all(
            self.busy.get(key, 0) == 0 or self.busy.get(key, 0) + cost <= capacity
            for key, (cost, capacity) in need.items()
        )

    async def acquire(self, need: Demand) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.fits(need))
            for key, (cost, _) in need.items():
                self.busy[key] = self.busy.get(key, 0) + cost

    async def release(self, need: Demand) -> None:
        async with self._cond:
            for key, (cost, _) in need.items():
                self.busy[key] -= cost
                if not self.busy[key]:
                    del self.busy[key]
            self._cond.notify_all()
