"""The center's migrations: a request resolved and prechecked, admitted by its costs, and run as a
task (one asyncio task per migration: :mod:`~kvmotion.center.compute_run`,
:mod:`~kvmotion.center.storage_run`); and a prediction without migrating.

A refused request (:class:`~kvmotion.errors.PreconditionError`) changes nothing; once a task
exists, every failure is the run's to undo.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from kvmotion.center import postcopy
from kvmotion.center.compute_run import ComputeMigration
from kvmotion.center.db import Database, Host, Task, Vm
from kvmotion.center.inventory import Inventory, host_view, vm_view
from kvmotion.center.prediction import link_of, sample_and_predict
from kvmotion.center.rules import Rules
from kvmotion.center.storage_run import StorageMigration
from kvmotion.center.tasks import TaskStore
from kvmotion.errors import Conflict, InvalidInput, PreconditionError
from kvmotion.migration.costs import Budget, CostLimits, Demand, demand
from kvmotion.migration.precheck import PrecheckResult, precheck_migration
from kvmotion.migration.request import KINDS, MigrationRequest
from kvmotion.migration.rules import findings

DEFAULT_STALL_TIMEOUT = 20.0  # no byte copied for this long: the link is gone, abort
# An abort, and a finish after the switchover, keep asking an unreachable (restarting) source
# agent this long: its copy must be resumed, or removed, not forgotten.
SOURCE_RETRY_S = 60.0


def vm_datastores(vm: Vm) -> set[str]:
    return {str(d["datastore"]) for d in vm.config.get("disks", []) if d.get("datastore")}


class Executor:
    """Starts and tracks migrations; one asyncio task per migration."""

    def __init__(
        self,
        db: Database,
        inventory: Inventory,
        tasks: TaskStore,
        limit: int | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT,
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        self.postcopy_recovery_s = postcopy.DEFAULT_RECOVERY_S  # then a broken post-copy is lost
        self.source_retry_s = SOURCE_RETRY_S
        self.db = db
        self.inventory = inventory
        self.tasks = tasks
        # What runs at once: vCenter's costs per host, link and datastore (costs.py), and
        # ``limit`` migrations per host at most, if set.
        self.limits = CostLimits(migrations_per_host=limit)
        self.slots = Budget()
        self.active: dict[str, int] = {}  # VM name -> task id
        self._reserved: set[str] = set()  # VMs whose migration request is in its precheck
        self._runs: dict[int, asyncio.Task[None]] = {}
        self._running: dict[int, ComputeMigration | StorageMigration] = {}  # task id -> run
        self.rules: Rules | None = None  # the center's placement rules, once it has them
        self.abandoned = False  # leadership lost: runs end without a word (center/orphans.py)

    def migrating(self, vm_name: str) -> bool:
        """A migration of this VM runs, or a request for one is being checked."""
        return vm_name in self.active or vm_name in self._reserved

    @contextlib.contextmanager
    def reserved(self, vm_name: str) -> Iterator[None]:
        """The VM counts as migrating while this lasts (a powered-off VM's relocation:
        center/relocation.py); Conflict if it already does."""
        if self.migrating(vm_name):
            raise Conflict(f"VM {vm_name} is already being moved", code="already_migrating")
        self._reserved.add(vm_name)
        try:
            yield
        finally:
            self._reserved.discard(vm_name)

    def costs(self, req: MigrationRequest, vm: Vm, *hosts: Host) -> Demand:
        """What a migration takes while it runs: each of ``hosts`` and its link, and the
        datastores its disks leave and go to."""
        datastores = {*vm_datastores(vm), req.datastore or ""} - {""}
        links = {host.name: link_of(host) for host in hosts}
        return demand(req.kind, links, datastores, self.limits)

    async def resolve(self, req: MigrationRequest) -> tuple[MigrationRequest, Vm]:
        """The request made whole (a storage move's host is the VM's), or InvalidInput."""
        vm = await self.inventory.vm(req.vm)
        if vm.host is None:
            raise Conflict(f"VM {vm.name} is on no known host", code="no_host")
        if req.kind not in KINDS:
            raise InvalidInput(f"migration type {req.kind!r}: use one of {', '.join(KINDS)}")
        if req.kind == "compute" and req.datastore is not None:
            raise InvalidInput(
                "a compute migration leaves the disks where they are: drop the datastore, "
                "or use type 'both' to move them too"
            )
        if req.kind != "compute":
            if req.datastore is None:
                raise InvalidInput(f"a {req.kind} migration needs a target datastore")
            await self.inventory.datastore(req.datastore)  # NotFound if nobody has it
        if req.kind == "storage":
            if req.dest and req.dest != vm.host.name:
                dest = await self.inventory.host(req.dest)
                if dest.name != vm.host.name:
                    raise InvalidInput(
                        f"a storage migration keeps VM {vm.name} on its host {vm.host.name}: "
                        "use type 'both' to change host and datastore together"
                    )
            req = dataclasses.replace(req, dest=vm.host.name)
        elif not req.dest:
            raise InvalidInput(f"a {req.kind} migration needs a destination host")
        elif req.kind == "both" and req.dest == vm.host.name:
            raise InvalidInput(
                f"VM {vm.name} already runs on {req.dest}: to move only its disks, use type "
                "'storage'"
            )
        if req.kind == "both" and req.allow_postcopy:
            raise InvalidInput(
                "post-copy cannot be combined with a disk copy (the disks must be consistent "
                "at switchover): drop allow_postcopy"
            )
        if req.allow_postcopy and (req.streams or 1) > 1:
            raise InvalidInput(
                f"post-copy runs over one stream (QEMU cannot combine it with multifd): drop "
                f"allow_postcopy or streams={req.streams}"
            )
        return req, vm

    async def precheck(
        self, req: MigrationRequest
    ) -> tuple[MigrationRequest, Vm, Host, Host, PrecheckResult]:
        """Fresh facts from both hosts and the VM's state from its host (asked at once), then
        the pure precheck."""
        req, vm = await self.resolve(req)
        assert vm.host is not None
        dest = await self.inventory.host(req.dest)
        source, dest, vm = await asyncio.gather(
            self.inventory.fresh_facts(vm.host.name, unreachable_ok=True),
            self.inventory.fresh_facts(dest.name, unreachable_ok=True),
            self.inventory.fresh_vm(vm),
        )
        result = precheck_migration(
            vm_view(vm, vm.name in self.active), host_view(source), host_view(dest), req.datastore
        )
        if (
            self.rules is not None
            and dest.name != source.name
            and (rules := await self.rules.all())
        ):
            # The placement rules (center/rules.py): a must rule refuses, a should rule warns.
            # (Where every VM runs is read only if there is a rule: 10,000 VMs a migration.)
            hard, soft = findings(vm.name, dest.name, rules, await self.rules.where())
            result = PrecheckResult((*result.errors, *hard), (*result.warnings, *soft))
        return req, vm, source, dest, result

    async def predict(
        self, req: MigrationRequest, vm: Vm, source: Host, dest: Host
    ) -> dict[str, Any]:
        """A prediction without migrating, from a sample of the guest's memory (about 4.5 s).
        Raises KvmotionError if the source cannot sample it."""
        return await sample_and_predict(self.inventory, self.tasks, req, vm, source, dest)

    async def submit(self, req: MigrationRequest) -> int:
        """Precheck and start; returns the task id. Raises PreconditionError, changing nothing."""
        requested = time.time()
        name = (await self.inventory.vm(req.vm)).name
        # Check and reserve with no await in between: of two requests at once, one goes on.
        if self.migrating(name):
            raise Conflict(f"VM {name} is already being migrated", code="already_migrating")
        self._reserved.add(name)
        try:
            return await self._submit(req, requested)
        finally:
            self._reserved.discard(name)

    async def _submit(self, req: MigrationRequest, requested: float) -> int:
        req, vm, source, dest, result = await self.precheck(req)
        if not result.ok:
            first = result.errors[0]
            raise PreconditionError(
                "; ".join(e.message for e in result.errors),
                code=first.code,
                errors=[e.__dict__ for e in result.errors],
            )
        task = await self.tasks.create(
            "migrate",
            vm.name,
            {"type": req.kind, "vm": vm.name, "source": source.name, "dest": dest.name,
             "downtime_ms": req.downtime_ms, "datastore": req.datastore},
            requested=requested,
            warnings=[w.__dict__ for w in result.warnings],
        )  # fmt: skip
        self.active[vm.name] = task.id
        run: ComputeMigration | StorageMigration
        if req.kind == "storage":
            run = StorageMigration(self, task.id, vm, source, req)
        else:
            run = ComputeMigration(self, task.id, vm, source, dest, req)
        self._running[task.id] = run
        self._runs[task.id] = asyncio.create_task(self._drive(run), name=f"migrate-{vm.name}")
        return task.id

    async def _drive(self, run: ComputeMigration | StorageMigration) -> None:
        try:
            await run.run()
        finally:
            self._running.pop(run.task_id, None)

    async def request_cancel(self, task_id: int) -> Task:
        """Record the user's cancel and tell the task's run at once. Raises NotFound, or
        Conflict if the task ended or its run is past undoing (saying why)."""
        run = self._running.get(task_id)
        if run is not None:
            run.check_cancel()
        task = await self.tasks.request_cancel(task_id)
        if run is not None:
            run.request_cancel()
        return task

    async def wait(self, task_id: int) -> None:
        if task_id in self._runs:
            await asyncio.shield(self._runs[task_id])

    async def abandon(self) -> None:
        """Another center is active now: stop every run at once, neither aborting it nor
        writing its task; the agents finish or end each, and the new active center records
        how (center/orphans.py)."""
        self.abandoned = True
        await self.close()

    async def close(self) -> None:
        for run in self._runs.values():
            run.cancel()
        for run in self._runs.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run
