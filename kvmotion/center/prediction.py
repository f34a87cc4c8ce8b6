"""A migration's prediction as the center makes it: a sample of the guest's memory from the
source's agent and the host pair's finished migrations from the task store, given to the pure
:func:`~kvmotion.migration.predictor.predict_sampled`.

Used by a precheck asked to predict (``POST /v1/vms/{vm}/migrate/precheck``) and by a migration
asked to predict first; neither changes anything on a host.
"""

from __future__ import annotations

from typing import Any

from kvmotion.center.db import Host, Vm
from kvmotion.center.inventory import Inventory
from kvmotion.center.tasks import TaskState, TaskStore
from kvmotion.migration.history import HISTORY_SCAN, pair_history
from kvmotion.migration.predictor import predict_sampled
from kvmotion.migration.request import MigrationRequest

DEFAULT_LINK_BPS = 10e9 / 8  # neither host knows its migration link


def link_of(host: Host) -> float | None:
    """What a host's migration link carries (bytes/s), from its facts."""
    value = (host.facts or {}).get("migration_link_bps")
    return float(value) if value else None


def link_bps(req: MigrationRequest, source: Host, dest: Host) -> float:
    """What the migration link carries: the slower host's link, or the user's cap."""
    if req.max_bandwidth_bps:
        return float(req.max_bandwidth_bps)
    known = [rate for rate in (link_of(source), link_of(dest)) if rate]
    return min(known) if known else DEFAULT_LINK_BPS


def ram_bytes(vm: Vm) -> int:
    return int(vm.config.get("memory_mib", 0)) * 2**20


async def sample_and_predict(
    inventory: Inventory,
    tasks: TaskStore,
    req: MigrationRequest,
    vm: Vm,
    source: Host,
    dest: Host,
) -> dict[str, Any]:
    """Sample the guest's memory (non-zero RAM, dirty rate, working set: about 4.5 s) and
    predict time, downtime and the brake. Raises KvmotionError if the source's agent cannot
    sample (an agent without memory profiles, QEMU busy measuring), InvalidInput for impossible
    sizes."""
    async with inventory.agent(source) as agent:
        profile = await agent.memory_profile(vm.name)
    link = link_bps(req, source, dest)
    finished = await tasks.recent("migrate", TaskState.SUCCESS, HISTORY_SCAN)
    history = pair_history(
        ((task.request or {}, task.summary or {}) for task in finished),
        {source.name, dest.name},
        link,
    )
    return predict_sampled(
        ram_bytes(vm),
        profile.nonzero_bytes,
        profile.dirty_rate_bps,
        profile.working_set_bytes,
        link,
        history,
        req.convergence(),
    )
