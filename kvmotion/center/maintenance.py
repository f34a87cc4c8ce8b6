"""Maintenance mode: a host emptied of running VMs by live migration, so it can be patched.

As in vSphere: entering, the host takes nothing new (migrations and placements onto it are
refused: the precheck's ``host_in_maintenance``; VMs are not created or powered on there), and
each of its running VMs is moved to the host :mod:`~kvmotion.migration.placement` chooses, as
ordinary migration tasks, admitted by the cost model (queued, never failed for concurrency). The
"maintenance" task runs until the host is empty, then the host is **in maintenance**. A VM that
cannot move (no host fits, its disks on a local datastore, a migration that failed three times)
blocks the host: the task shows each blocker with its reason and goes on looking every few
seconds, so that a blocker the admin resolves (powering the VM off, adding room) lets it finish.
A cancel stops new moves and leaves moved VMs where they are; the host stays entering until
``exit``. Exiting ends the mode (and a running evacuation); VMs are not moved back.

A center restart fails the running task (as every task); the host stays "entering", and entering
again resumes the evacuation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select

from kvmotion.center.db import Database, Host, Task, Vm
from kvmotion.center.executor import Executor
from kvmotion.center.inventory import Inventory, vm_view
from kvmotion.center.placing import cluster_now
from kvmotion.center.relocation import relocate
from kvmotion.center.rules import Rules
from kvmotion.center.tasks import TaskState, TaskStore, record_event
from kvmotion.errors import Conflict, KvmotionError
from kvmotion.migration.placement import Cluster, Overcommit, plan
from kvmotion.migration.request import MigrationRequest

log = logging.getLogger(__name__)

ENTERING, IN_MAINTENANCE = "entering", "in"
ROUND_S = 3.0  # between two looks at the host while VMs block it
SETTLE_POLL_S = 0.1  # how often the moves under way are looked at (one ending starts a round)
EXIT_WAIT_S = 10.0  # exit waits this long (past a round) for the evacuation to stop
MAX_ATTEMPTS = 3  # migrations of one VM that may fail before it blocks the host


@dataclass
class _PoweredOff:
    """What became of the host's powered-off VMs (``--evacuate-powered-off``)."""

    moved: list[str] = field(default_factory=list)
    stayed: dict[str, str] = field(default_factory=dict)  # VM -> why


class Maintenance:
    """Enters and exits hosts' maintenance mode; one evacuation task per host at a time."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        executor: Executor,
        tasks: TaskStore,
        rules: Rules,
        overcommit: Overcommit | None = None,
    ) -> None:
        self.db, self.inventory, self.executor, self.tasks = db, inventory, executor, tasks
        self.rules = rules
        self.overcommit = overcommit or Overcommit()
        self._runs: dict[str, tuple[int, asyncio.Task[None]]] = {}  # host -> (task, runner)
        self._latest: tuple[int, dict[str, int]] | None = None  # (tasks made, latest_tasks)

    async def latest_tasks(self) -> dict[str, int]:
        """Each host's latest maintenance task (from the task store: it outlives a restart);
        kept until this center creates another (every web client's host list asks)."""
        made = self.tasks.made("maintenance")
        if self._latest is not None and self._latest[0] == made:
            return dict(self._latest[1])
        async with self.db.session() as s:
            rows = await s.execute(
                select(Task.target, func.max(Task.id))
                .where(Task.kind == "maintenance")
                .group_by(Task.target)
            )
            latest = {str(target): int(task_id) for target, task_id in rows}
        self._latest = (made, latest)
        return dict(latest)

    async def enter(self, host_name: str, *, evacuate_powered_off: bool = False) -> int:
        """Start emptying the host; returns the maintenance task's id. With
        ``evacuate_powered_off``, its powered-off VMs are registered on other hosts too (those
        that cannot go stay, listed, and do not block). Raises NotFound, or Conflict if the
        host is already in maintenance or being emptied."""
        host = await self.inventory.host(host_name)
        if host.maintenance == IN_MAINTENANCE:
            raise Conflict(
                f"host {host.name} is already in maintenance mode", code="in_maintenance"
            )
        if host.name in self._runs:
            task_id = self._runs[host.name][0]
            raise Conflict(
                f"host {host.name} is already entering maintenance mode (task {task_id})",
                code="entering_maintenance",
            )
        await self._set(host.name, ENTERING)
        task = await self.tasks.create(
            "maintenance", host.name,
            {"host": host.name, "evacuate_powered_off": evacuate_powered_off},
        )  # fmt: skip
        await self.tasks.update(task.id, state=TaskState.RUNNING, phase="evacuating")
        await record_event(self.db, f"host {host.name} entering maintenance mode", host=host.name)
        runner = asyncio.create_task(
            self._evacuate(task.id, host.name, evacuate_powered_off), name=f"evac-{host.name}"
        )
        self._runs[host.name] = (task.id, runner)
        runner.add_done_callback(lambda _: self._runs.pop(host.name, None))
        return task.id

    async def exit(self, host_name: str) -> Host:
        """End maintenance mode (and an evacuation still running: its moves stay)."""
        host = await self.inventory.host(host_name)
        if host.maintenance is None:
            raise Conflict(
                f"host {host.name} is not in maintenance mode", code="not_in_maintenance"
            )
        run = self._runs.get(host.name)
        if run is not None:
            with contextlib.suppress(KvmotionError):
                await self.tasks.request_cancel(run[0])
            await asyncio.wait({run[1]}, timeout=ROUND_S + EXIT_WAIT_S)
        host = await self._set(host.name, None)
        await record_event(self.db, f"host {host.name} exited maintenance mode", host=host.name)
        return host

    async def move_back(self, host_name: str) -> list[dict[str, Any]]:
        """Move back what the host's latest evacuation moved off it and is still away: running
        VMs by live migration (queued by the cost model), powered-off ones by registering them
        here again. One entry per VM: its task, or why it stays."""
        host = await self.inventory.host(host_name)
        if host.maintenance is not None:
            raise Conflict(
                f"host {host.name} is in maintenance mode: exit it first", code="in_maintenance"
            )
        latest = (await self.latest_tasks()).get(host.name)
        summary = (await self.tasks.get(latest)).summary or {} if latest is not None else {}
        results: list[dict[str, Any]] = []
        for name in [*summary.get("moved", []), *summary.get("powered_off_moved", [])]:
            try:
                vm = await self.inventory.vm(name)
                if vm.host is None or vm.host.name == host.name:
                    continue  # back already (or gone)
                if vm.power_state == "poweredOn":
                    task_id = await self.executor.submit(MigrationRequest(vm.name, host.name))
                elif vm.power_state == "poweredOff":
                    task_id = await relocate(
                        self.db, self.inventory, self.executor, self.tasks, self.rules,
                        vm.name, host.name,
                    )  # fmt: skip
                else:
                    results.append({"vm": name, "error": f"it is {vm.power_state}"})
                    continue
                results.append({"vm": name, "task": task_id})
            except KvmotionError as exc:
                results.append({"vm": name, "error": f"{exc.message} ({exc.code})"})
        return results

    async def wait(self, task_id: int) -> None:
        for tid, runner in list(self._runs.values()):
            if tid == task_id:
                await asyncio.shield(runner)

    async def close(self) -> None:
        runners = [runner for _, runner in self._runs.values()]
        for runner in runners:
            runner.cancel()
        for runner in runners:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner

    async def _set(self, host_name: str, state: str | None) -> Host:
        async with self.db.session() as s:
            host = await s.scalar(select(Host).where(Host.name == host_name))
            assert host is not None
            host.maintenance = state
            await s.commit()
            return host

    # -- the evacuation ----------------------------------------------------------------------
    async def _evacuate(self, task_id: int, host_name: str, powered_off: bool = False) -> None:
        moves: dict[str, int] = {}  # VM -> its migration task
        failures: dict[str, list[str]] = {}  # VM -> why its migrations failed
        moved: list[str] = []
        off = _PoweredOff()
        try:
            while True:
                if powered_off:
                    await self._relocate_powered_off(host_name, off)
                task = await self.tasks.get(task_id)
                if task.cancel_requested:
                    await self.tasks.update(
                        task_id, state=TaskState.CANCELLED, phase="cancelled",
                        summary=self._summary(moved, moves, {}, failures, off),
                        error=f"VMs moved stay moved; host {host_name} stays entering "
                        "maintenance until it exits maintenance mode",
                        error_code="cancelled",
                    )  # fmt: skip
                    return
                await self._settle(moves, failures, moved)
                running = await self._running_vms(host_name)
                if not running and not moves:
                    await self._set(host_name, IN_MAINTENANCE)
                    await self.tasks.update(
                        task_id, state=TaskState.SUCCESS, phase="in maintenance", progress=100.0,
                        summary=self._summary(moved, moves, {}, failures, off),
                    )  # fmt: skip
                    await record_event(
                        self.db, f"host {host_name} is in maintenance mode ({len(moved)} VMs "
                        "moved)", host=host_name,
                    )  # fmt: skip
                    return
                blockers = await self._move(host_name, running, moves, failures)
                total = len(moved) + len(running)
                await self.tasks.update(
                    task_id,
                    phase="blocked" if blockers and not moves else "evacuating",
                    progress=round(100.0 * len(moved) / total, 1) if total else 0.0,
                    summary=self._summary(moved, moves, blockers, failures, off),
                )
                await self._next_round(moves)
        except Exception as exc:
            log.exception("evacuating %s failed", host_name)
            with contextlib.suppress(KvmotionError):
                await self.tasks.update(
                    task_id, state=TaskState.ERROR, error=f"the evacuation failed: {exc}",
                    error_code="evacuation_failed",
                )  # fmt: skip

    async def _relocate_powered_off(self, host_name: str, off: _PoweredOff) -> None:
        """Register each powered-off VM of the host (not tried yet) where the placement says;
        one that cannot go stays, with its reason (it does not block: it does not run)."""
        waiting = [
            v for v in await self.inventory.vms()
            if v.host is not None and v.host.name == host_name and v.power_state == "poweredOff"
            and v.name not in off.moved and v.name not in off.stayed
        ]  # fmt: skip
        if not waiting:
            return
        cluster = await cluster_now(self.inventory, self.rules, self.overcommit)
        for placement in plan([vm_view(v, False) for v in waiting], cluster):
            if placement.host is None:
                off.stayed[placement.vm] = placement.explain()
                continue
            try:
                await relocate(self.db, self.inventory, self.executor, self.tasks, self.rules,
                               placement.vm, placement.host)  # fmt: skip
                off.moved.append(placement.vm)
            except KvmotionError as exc:
                off.stayed[placement.vm] = f"{exc.message} ({exc.code})"

    async def _next_round(self, moves: dict[str, int]) -> None:
        """Until one of the moves ends (the next VM may go at once), or ``ROUND_S``."""
        deadline = time.monotonic() + ROUND_S
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(SETTLE_POLL_S, left))
            for task_id in moves.values():
                if TaskState((await self.tasks.get(task_id)).state).final:
                    return

    async def _running_vms(self, host_name: str) -> list[Vm]:
        return [
            v
            for v in await self.inventory.vms()
            if v.host is not None and v.host.name == host_name and v.power_state == "poweredOn"
        ]

    async def _settle(
        self, moves: dict[str, int], failures: dict[str, list[str]], moved: list[str]
    ) -> None:
        """Forget the migrations that ended: moved, or failed (counted against the VM)."""
        for vm, task_id in list(moves.items()):
            task = await self.tasks.get(task_id)
            if not TaskState(task.state).final:
                continue
            del moves[vm]
            if task.state == TaskState.SUCCESS:
                moved.append(vm)
            else:
                failures.setdefault(vm, []).append(f"task {task_id}: {task.error or task.state}")

    async def _move(
        self,
        host_name: str,
        running: list[Vm],
        moves: dict[str, int],
        failures: dict[str, list[str]],
    ) -> dict[str, dict[str, Any]]:
        """Start a migration for each running VM not moving yet, where the placement says;
        returns the blockers: VM -> why it cannot move (a sentence, and each host's reason)."""
        blockers: dict[str, dict[str, Any]] = {}
        waiting = []
        for vm in running:
            if vm.name in moves or self.executor.migrating(vm.name):
                continue
            if len(failures.get(vm.name, [])) >= MAX_ATTEMPTS:
                blockers[vm.name] = {
                    "reason": f"its last {MAX_ATTEMPTS} migrations failed "
                    f"({failures[vm.name][-1]}): move or power it off by hand",
                    "hosts": [],
                }
                continue
            waiting.append(vm)
        if not waiting:
            return blockers
        cluster = await self._cluster(host_name, moves)
        for vm in waiting:  # not placed yet: a rule binds the others to where the plan puts it
            cluster.where.pop(vm.name, None)
        placed = []
        for placement in plan([vm_view(v, False) for v in waiting], cluster):
            if placement.host is None:
                blockers[placement.vm] = {
                    "reason": placement.explain(),
                    "hosts": [
                        {"host": c.host, "code": c.reasons[0].code, "message": c.reasons[0].message}
                        for c in placement.candidates
                        if c.reasons
                    ],
                }
                continue
            placed.append(placement)
        # One after the other: submitted together, their prechecks (fresh facts from both
        # hosts each) competed for the same two CPUs, and the evacuation got slower
        # (bench.maintenance: median ratio 1.86 against 1.28 one after the other).
        for placement in placed:
            try:
                moves[placement.vm] = await self.executor.submit(
                    MigrationRequest(placement.vm, str(placement.host))
                )
                log.info("evacuating %s: %s", host_name, placement.explain())
            except KvmotionError as exc:
                failures.setdefault(placement.vm, []).append(exc.message)
                blockers[placement.vm] = {"reason": f"{exc.message} ({exc.code})", "hosts": []}
        return blockers

    async def _cluster(self, host_name: str, moves: dict[str, int]) -> Cluster:
        """Every host's view and capacity, counting the VMs already on their way."""
        cluster = await cluster_now(self.inventory, self.rules, self.overcommit)
        by_name = {v.name: v for v in await self.inventory.vms()}
        for vm_name, task_id in moves.items():
            dest = (await self.tasks.get(task_id)).request.get("dest")
            vm = by_name.get(vm_name)
            if vm is not None and dest in cluster.capacity and dest != host_name:
                cluster.capacity[dest] = cluster.capacity[dest].plus(
                    int(vm.config.get("vcpus", 1)), int(vm.config.get("memory_mib", 0))
                )
                cluster.where[vm_name] = dest
        return cluster

    @staticmethod
    def _summary(
        moved: list[str],
        moves: dict[str, int],
        blockers: dict[str, dict[str, Any]],
        failures: dict[str, list[str]],
        off: _PoweredOff,
    ) -> dict[str, Any]:
        return {
            "moved": list(moved),
            "moving": [{"vm": vm, "task": task_id} for vm, task_id in moves.items()],
            "blockers": [{"vm": vm, **why} for vm, why in blockers.items()],
            "failed_attempts": {vm: why for vm, why in failures.items()},
            "powered_off_moved": list(off.moved),
            "powered_off_stayed": [{"vm": vm, "reason": why} for vm, why in off.stayed.items()],
        }
