"""The compute migration, driven by the center across two agents, as named steps.

precheck → (queue for a slot) → prepare (destination listens) → migrate (source streams over the
migration network) → watch (passes, progress, cancel) → switchover (source agent continues at
pre-switchover; destination resumes and announces) → finalize (the inventory records the new host
only once the destination runs; the source QEMU is ended).

Every failure goes through one idempotent :meth:`ComputeMigration.abort`: the destination QEMU is
ended, the source keeps (or resumes) running, the task fails with the reason, the inventory is
unchanged. Once the destination has resumed the VM it is the owner, and abort is no longer
possible: the migration is finalized instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

from kvmotion import faults
from kvmotion.center.db import Database, Host, Vm
from kvmotion.center.inventory import Inventory, host_view, vm_view
from kvmotion.center.tasks import TaskState, TaskStore, record_event
from kvmotion.errors import (
    Conflict,
    HostUnreachable,
    InvalidInput,
    KvmotionError,
    NotFound,
    PreconditionError,
)
from kvmotion.host.client import AgentClient
from kvmotion.migration.convergence import Convergence, Strategy
from kvmotion.migration.costs import Budget, CostLimits, Demand, demand
from kvmotion.migration.policy import SATURATION_FACTOR, ConvergenceRequest, Priority
from kvmotion.migration.precheck import PrecheckResult, precheck_migration
from kvmotion.migration.predictor import predict

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.05
RESUME_TIMEOUT = 60.0
LOST_VIEW_TIMEOUT = 10.0
DEFAULT_STALL_TIMEOUT = 20.0  # no byte copied for this long: the link is gone, abort
KINDS = ("compute", "storage", "both")


@dataclass(frozen=True)
class PairHistory:
    """A host pair's recent migrations: what QEMU achieved while copying (bytes/s; on TCG, or a
    busy host, far below the link) and its setup time per GiB of RAM (the first bitmap sync)."""

    throughput_bps: float | None
    setup_s_per_gib: float | None
    count: int


# An abort, and a finish after the switchover, keep asking an unreachable (restarting) source
# agent this long: its copy must be resumed, or removed, not forgotten.
SOURCE_RETRY_S = 60.0
HISTORY_SCAN, HISTORY_USED = 200, 10  # tasks looked at, measurements used (the newest)
MIN_COPY_MS = 200  # shorter copies are mostly QEMU's first 100 ms bandwidth measurement
SATURATED_SHARE = 0.85  # a 1 s sample this close to the working set is only a lower bound


@dataclass(frozen=True)
class MigrationRequest:
    vm: str
    dest: str
    kind: str = "compute"
    downtime_ms: int = 100
    max_bandwidth_bps: int | None = None
    deadline_s: float | None = None  # None: the policy's default for the VM's RAM and link
    priority: Priority = "normal"
    allow_postcopy: bool = False
    strategy: Strategy = "kvmotion"  # or "qemu-defaults" (for comparisons)
    predict: bool = False  # sample the guest's memory first (about 4.5 s) and predict
    datastore: str | None = None  # storage and both: where the disks go

    def convergence(self) -> ConvergenceRequest:
        return ConvergenceRequest(
            max_downtime_ms=self.downtime_ms,
            deadline_s=self.deadline_s,
            priority=self.priority,
            allow_postcopy=self.allow_postcopy,
        )


class Cancelled(Exception):
    """The user cancelled the task."""


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

    def migrating(self, vm_name: str) -> bool:
        """A migration of this VM runs, or a request for one is being checked."""
        return vm_name in self.active or vm_name in self._reserved

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
        return req, vm, source, dest, result

    async def predict(
        self, req: MigrationRequest, vm: Vm, source: Host, dest: Host
    ) -> dict[str, Any]:
        """A prediction without migrating, from a sample of the guest's memory (about 4.5 s)."""
        return await ComputeMigration(self, 0, vm, source, dest, req).sample_and_predict()

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
        self._runs[task.id] = asyncio.create_task(run.run(), name=f"migrate-{vm.name}")
        return task.id

    async def wait(self, task_id: int) -> None:
        if task_id in self._runs:
            await asyncio.shield(self._runs[task_id])

    async def close(self) -> None:
        for run in self._runs.values():
            run.cancel()
        for run in self._runs.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await run


def link_of(host: Host) -> float | None:
    """What a host's migration link carries (bytes/s), from its facts."""
    value = (host.facts or {}).get("migration_link_bps")
    return float(value) if value else None


def vm_datastores(vm: Vm) -> set[str]:
    return {str(d["datastore"]) for d in vm.config.get("disks", []) if d.get("datastore")}


class _TaskRun:
    """What every migration run shares: its task and timeline, its guard (every failure goes
    through :meth:`abort`), and the watch of a disk copy."""

    def __init__(self, ex: Executor, task_id: int, vm: Vm, need: Demand) -> None:
        self.ex = ex
        self.task_id = task_id
        self.vm = vm
        self.need = need  # what it costs on hosts, links and datastores while it runs
        self.log = log.getChild(vm.name)
        self._kept_summary: dict[str, Any] = {}  # kept through progress updates
        # The task's timeline, kept here and written with the next update (one commit, not two).
        self.timeline: list[dict[str, Any]] = []
        self._timeline_dirty = False

    def _mark(self, step: str, when: float | None = None, **extra: Any) -> None:
        if any(t["step"] == step for t in self.timeline):
            return
        self.timeline.append({"step": step, "time": when or time.time(), **extra})
        self.timeline.sort(key=lambda t: float(t["time"]))
        self._timeline_dirty = True

    async def _update(self, **fields: Any) -> None:
        if self._timeline_dirty:
            fields["timeline"] = list(self.timeline)
            self._timeline_dirty = False
        await self.ex.tasks.update(self.task_id, **fields)

    async def _check_cancel(self) -> None:
        if (await self.ex.tasks.get(self.task_id)).cancel_requested:
            raise Cancelled()

    async def run(self) -> None:
        self.timeline = list((await self.ex.tasks.get(self.task_id)).timeline)
        try:
            await self._update(phase="queued")
            await self.ex.slots.acquire(self.need)
            try:
                await self._guarded()
            finally:
                await self.ex.slots.release(self.need)
        finally:
            self.ex.active.pop(self.vm.name, None)

    async def _guarded(self) -> None:
        try:
            await self._check_cancel()
            await self._update(state=TaskState.RUNNING, phase="prepare")
            await self.steps()
        except asyncio.CancelledError:
            await self.abort("the center stopped during the migration", TaskState.ERROR)
            raise
        except Cancelled:
            await self.abort("cancelled by the user", TaskState.CANCELLED)
        except KvmotionError as exc:
            await self.abort(exc.message, TaskState.ERROR, exc.code)
        except Exception as exc:  # a bug must still leave the VM running somewhere
            self.log.exception("migration failed")
            await self.abort(f"internal error: {exc!r}", TaskState.ERROR, "internal")

    async def steps(self) -> None:
        raise NotImplementedError

    async def abort(self, reason: str, state: TaskState, code: str | None = None) -> None:
        raise NotImplementedError

    async def _aborted(
        self, state: TaskState, reason: str, code: str | None, notes: list[str], what: str
    ) -> None:
        """Record how an abort ended: the task's final state and reason, and an event."""
        with contextlib.suppress(KvmotionError):
            await self._update(
                state=state,
                phase="aborted",
                error=reason + (f" ({'; '.join(notes)})" if notes else ""),
                error_code=code or ("cancelled" if state is TaskState.CANCELLED else "failed"),
            )
        await record_event(
            self.ex.db,
            f"{what} of VM {self.vm.name} {state}: {reason}",
            severity="warning",
            vm=self.vm.name,
            task_id=self.task_id,
        )

    async def _watch_disk_copy(
        self,
        agent: AgentClient,
        datastore: str,
        until: str,
        span: tuple[float, float],
        also: Callable[[], Awaitable[None]] | None = None,
    ) -> dict[str, Any]:
        """Follow the VM's disk copy on ``agent`` until its phase is ``until``; progress (within
        ``span`` percent) and per-disk bytes flow into the task. Raises KvmotionError if the
        copy fails or stalls (no byte copied for the stall timeout: a cut link), Cancelled."""
        self._mark("disk_copy")
        last_copied, last_move = -1, time.monotonic()
        seen_at = time.monotonic()
        while True:
            info = await agent.get_vm(self.vm.name)
            if info.get("storage") is None:
                # The agent restarted and forgot the copy: it settled it from its records.
                if until == "completed" and self._disks_on(info, datastore):
                    return {"phase": "completed", "marks": {}, "error": None}
                if time.monotonic() - seen_at > LOST_VIEW_TIMEOUT:
                    raise KvmotionError(
                        "the host no longer reports this disk copy (its agent restarted)",
                        code="migration_lost",
                    )
                await asyncio.sleep(POLL_INTERVAL * 2)
                continue
            seen_at = time.monotonic()
            view = info.get("storage") or {}
            phase = str(view.get("phase", "copying"))
            disks = view.get("disks") or []
            copied = sum(int(d.get("offset", 0)) for d in disks)
            total = sum(int(d.get("length", 0)) for d in disks)
            await self._disk_progress(view, copied, total, span)
            if phase == until:
                return dict(view)
            if phase in ("failed", "cancelled"):
                raise KvmotionError(
                    f"the disk copy {phase}: {view.get('error') or 'no reason given'}",
                    code=f"disk_copy_{phase}",
                )
            stalled = time.monotonic() - last_move > self.ex.stall_timeout_s
            if copied != last_copied:
                last_copied, last_move = copied, time.monotonic()
            elif phase == "copying" and view.get("mode") == "nbd" and stalled:
                # Over the migration link only: a copy between local disks is slow, never cut.
                raise KvmotionError(
                    f"no disk data copied for {self.ex.stall_timeout_s:.0f} s: the migration "
                    "link may be down",
                    code="copy_stalled",
                )
            if phase in ("copying", "ready"):
                await self._check_cancel()
            if also is not None:
                await also()
            await asyncio.sleep(POLL_INTERVAL * 2)

    @staticmethod
    def _disks_on(info: dict[str, Any], datastore: str) -> bool:
        disks = (info.get("config") or {}).get("disks") or []
        return bool(disks) and all(d.get("datastore") == datastore for d in disks)

    async def _disk_progress(
        self, view: dict[str, Any], copied: int, total: int, span: tuple[float, float]
    ) -> None:
        marks = view.get("marks") or {}
        if "ready" in marks:
            self._mark("disks_ready", marks["ready"])
        started = marks.get("started")
        elapsed = (marks.get("ready") or time.time()) - started if started else None
        self._kept_summary["disk_copy"] = {
            "datastore": view.get("datastore"),
            "copied_bytes": copied,
            "total_bytes": total,
            "copy_time_ms": round(elapsed * 1000) if elapsed is not None else None,
            "throughput_bps": round(copied / elapsed) if elapsed else None,
            "disks": [
                {"disk": d.get("index"), "copied_bytes": d.get("offset"),
                 "total_bytes": d.get("length"), "status": d.get("status")}
                for d in view.get("disks") or []
            ],
        }  # fmt: skip
        share = copied / total if total else 0.0
        task = await self.ex.tasks.get(self.task_id)
        await self._update(
            phase="disk_copy" if view.get("phase") == "copying" else "disk_switch",
            progress=round(span[0] + (span[1] - span[0]) * share, 1),
            summary=task.summary | self._kept_summary,
        )


class StorageMigration(_TaskRun):
    """Storage vMotion: the VM's disks to another datastore of its host, while it runs.

    move (the agent copies every disk and pivots to the copies once all are ready) → watch →
    finalize (the inventory records the new datastore). Abort cancels the copy before the
    pivot; the VM keeps its disks. After the pivot the copies are the VM's: it finishes.
    """

    def __init__(
        self, ex: Executor, task_id: int, vm: Vm, host: Host, req: MigrationRequest
    ) -> None:
        datastores = {*vm_datastores(vm), req.datastore or ""} - {""}
        need = demand("storage", {host.name: link_of(host)}, datastores, ex.limits)
        super().__init__(ex, task_id, vm, need)
        self.host = host
        self.req = req
        self.started = False

    async def steps(self) -> None:
        assert self.req.datastore is not None
        async with self.ex.inventory.agent(self.host) as agent:
            self.started = True
            await agent.move_storage(self.vm.name, self.req.datastore, self.req.max_bandwidth_bps)
            view = await self._watch_disk_copy(agent, self.req.datastore, "completed", (0.0, 95.0))
            info = await agent.get_vm(self.vm.name)
        await self.finalize(info, view)

    async def finalize(self, info: dict[str, Any], view: dict[str, Any]) -> None:
        await self.ex.inventory.set_vm(
            self.vm.uuid, config=info["config"], config_path=info["config_path"]
        )
        self._mark("disks_switched", (view.get("marks") or {}).get("completed"))
        old = sorted({d["datastore"] for d in self.vm.config.get("disks", [])})
        summary = (await self.ex.tasks.get(self.task_id)).summary | self._kept_summary
        summary["disk_copy"] = summary.get("disk_copy", {}) | {
            "from": old,
            "old_files_left": view.get("error"),
        }
        await self._update(state=TaskState.SUCCESS, phase="done", progress=100.0, summary=summary)
        await record_event(
            self.ex.db,
            f"VM {self.vm.name}'s disks moved from {', '.join(old)} to {self.req.datastore} "
            f"on {self.host.name} "
            + ("while it ran" if self.vm.power_state == "poweredOn" else "(powered off)"),
            severity="warning" if view.get("error") else "info",
            vm=self.vm.name,
            host=self.host.name,
            task_id=self.task_id,
        )
        self.log.info("disks moved to %s", self.req.datastore)

    async def abort(self, reason: str, state: TaskState, code: str | None = None) -> None:
        if TaskState((await self.ex.tasks.get(self.task_id)).state).final:
            return
        self.log.warning("aborting storage migration: %s", reason)
        note = ""
        if self.started:
            try:
                async with self.ex.inventory.agent(self.host) as agent:
                    note = (await agent.cancel_storage(self.vm.name))["done"]
            except Conflict as exc:
                if exc.code == "too_late" and await self._finish_after_pivot():
                    return
                note = exc.message
            except KvmotionError as exc:
                note = exc.message
        await self._aborted(
            state,
            reason,
            code,
            [note] if note else [],
            f"storage migration to {self.req.datastore}",
        )

    async def _finish_after_pivot(self) -> bool:
        """The VM switched to its copies already: record that rather than undo it."""
        deadline = time.monotonic() + RESUME_TIMEOUT
        async with self.ex.inventory.agent(self.host) as agent:
            while time.monotonic() < deadline:
                info = await agent.get_vm(self.vm.name)
                view = info.get("storage") or {}
                if view.get("phase") == "completed":
                    await self.finalize(info, view)
                    return True
                if view.get("phase") in ("failed", "cancelled"):
                    return False
                await asyncio.sleep(POLL_INTERVAL * 2)
        return False


class ComputeMigration(_TaskRun):
    """Compute vMotion, or "change both" (``req.kind == "both"``): the destination makes new
    disks and serves them over NBD, the source copies its disks into them first, and they end
    consistent at switchover, with the guest stunned."""

    def __init__(
        self, ex: Executor, task_id: int, vm: Vm, source: Host, dest: Host, req: MigrationRequest
    ) -> None:
        kind = "both" if req.kind == "both" else "compute"
        hosts = {source.name: link_of(source), dest.name: link_of(dest)}
        datastores = {*vm_datastores(vm), req.datastore or ""} - {""}
        super().__init__(ex, task_id, vm, demand(kind, hosts, datastores, ex.limits))
        self.source = source
        self.dest = dest
        self.req = req
        self.both = req.kind == "both"
        self.dest_prepared = False
        self.disks_started = False
        self.migrate_started = False
        self.resumed = False
        self.last_view: dict[str, Any] = {}
        self.nbd: tuple[str, int] | None = None
        self.conv = Convergence(
            req.convergence(),
            link_bps=self._link_bps(),
            ram_bytes=int(vm.config.get("memory_mib", 0)) * 2**20,
            strategy=req.strategy,
        )
        self._t0 = time.monotonic()

    async def steps(self) -> None:
        if self.req.predict:
            await self.predict()
        uri = await self.prepare()
        await self._check_cancel()
        if self.both:
            await self.copy_disks()
        await self.migrate(uri)
        await self.watch()
        await self.confirm_resumed()
        await self.finalize()

    def _link_bps(self) -> float:
        """What the migration link carries: the slower host's link, or the user's cap."""
        if self.req.max_bandwidth_bps:
            return float(self.req.max_bandwidth_bps)
        rates = [
            float((h.facts or {}).get("migration_link_bps") or 0) for h in (self.source, self.dest)
        ]
        known = [r for r in rates if r > 0]
        return min(known) if known else 10e9 / 8

    async def sample_and_predict(self) -> dict[str, Any]:
        """Sample the guest's memory (non-zero RAM, dirty rate, working set: about 4.5 s) and
        predict time, downtime and the brake."""
        async with self.ex.inventory.agent(self.source) as agent:
            profile = await agent.memory_profile(self.vm.name)
        ram = self.conv.ram_bytes
        nonzero = min(ram, max(1, int(profile["nonzero_bytes"])))
        sampled = float(profile["dirty_rate_bps"])
        working_set = min(nonzero, int(profile["working_set_bytes"]))
        # QEMU counts the pages that changed in its 1 s window: a guest that rewrites its whole
        # working set within it shows only a lower bound, taken at the policy's own factor.
        saturated = sampled > 0 and sampled * 1.0 >= SATURATED_SHARE * working_set
        dirty = sampled * SATURATION_FACTOR if saturated else sampled
        history = await self._pair_history()
        link = min(self.conv.link_bps, history.throughput_bps or self.conv.link_bps)
        setup_s = history.setup_s_per_gib * ram / 2**30 if history.setup_s_per_gib else 0.0
        prediction = predict(ram, nonzero, dirty, working_set, link, self.conv.req, setup_s)
        notes = [prediction.reason.rstrip(".") + "."]
        if saturated:
            notes.append(
                f"The guest rewrote its whole working set ({working_set / 2**20:.0f} MiB) within "
                f"the 1 s sample, so it dirties at least {sampled / 2**20:.0f} MiB/s; predicted "
                f"with {dirty / 2**20:.0f} MiB/s."
            )
        if history.count:
            notes.append(
                f"From this host pair's last {history.count} migrations: QEMU copies at "
                f"{link * 8 / 1e6:.0f} Mbit/s (the link: {self.conv.link_bps * 8 / 1e6:.0f}), "
                f"and its setup takes {setup_s:.2f} s for this VM's RAM."
            )
        prediction = dataclasses.replace(prediction, reason=" ".join(notes))
        return asdict(prediction) | {
            "sampled_dirty_bps": sampled,
            "dirty_rate_saturated": saturated,
            "nonzero_bytes": nonzero,
            "working_set_bytes": working_set,
            "link_bps": self.conv.link_bps,
            "effective_link_bps": link,
            "setup_s": setup_s,
            "history_migrations": history.count,
        }

    async def _pair_history(self) -> PairHistory:
        """What this host pair's latest successful migrations measured (either direction; the
        copy rate only over the link as it is now)."""
        pair = {self.source.name, self.dest.name}
        rates: list[float] = []
        setups: list[float] = []
        for task in await self.ex.tasks.recent("migrate", TaskState.SUCCESS, HISTORY_SCAN):
            request, summary = task.request or {}, task.summary or {}
            if request.get("type") == "storage":
                continue
            if {request.get("source"), request.get("dest")} != pair:
                continue
            total, setup = summary.get("total_time_ms"), summary.get("setup_time_ms")
            copy_ms = (total or 0) - (setup or 0) - (summary.get("downtime_ms") or 0)
            sent = summary.get("transferred_bytes") or 0
            # Over the link as shaped now, with QEMU's rate set to it (not capped by a strategy).
            same_link = summary.get("link_bps") == self.conv.link_bps
            uncapped = summary.get("strategy", "kvmotion") == "kvmotion"
            usable = sent and same_link and uncapped and copy_ms >= MIN_COPY_MS
            if usable and len(rates) < HISTORY_USED:
                rates.append(sent * 1000 / copy_ms)
            ram_total = summary.get("ram_total_bytes") or 0
            if setup is not None and ram_total and len(setups) < HISTORY_USED:
                setups.append(setup / 1000 / (ram_total / 2**30))
        return PairHistory(
            statistics.median(rates) if rates else None,
            statistics.median(setups) if setups else None,
            max(len(rates), len(setups)),
        )

    async def predict(self) -> None:
        """Predict before migrating; the task keeps it beside the actual figures. A prediction
        that cannot be made (an agent without memory profiles, QEMU busy measuring) is noted,
        and the migration goes on."""
        try:
            sampled = await self.sample_and_predict()
        except KvmotionError as exc:
            self._kept_summary["prediction_unavailable"] = exc.message
            self.log.warning("no prediction: %s", exc.message)
            return
        task = await self.ex.tasks.get(self.task_id)
        self._kept_summary["predicted"] = {
            k: v for k, v in sampled.items() if k not in ("sampled_dirty_bps", "link_bps")
        }
        self._kept_summary["sampled_dirty_bps"] = sampled["sampled_dirty_bps"]
        await self._update(summary=task.summary | self._kept_summary)

    async def prepare(self) -> str:
        async with self.ex.inventory.agent(self.dest) as agent:
            self.dest_prepared = True  # from here on, abort must clean the destination
            result = await agent.prepare_incoming(
                self.vm.config,
                self.vm.config_path,
                self.vm.cpu,
                postcopy=self.req.allow_postcopy,
                datastore=self.req.datastore if self.both else None,
            )
        detail = f"listening at {result['uri']}"
        if self.both:
            self.nbd = (str(result["nbd_host"]), int(result["nbd_port"]))
            detail += f"; new disks on {self.req.datastore} served at {self.nbd[0]}:{self.nbd[1]}"
        self._mark("prepared", detail=detail)
        return str(result["uri"])

    async def copy_disks(self) -> None:
        """Change both: the source copies every disk into the destination's new ones, until
        every copy is ready (tracking the guest's writes); memory follows."""
        assert self.nbd is not None and self.req.datastore is not None
        async with (
            self.ex.inventory.agent(self.source) as agent,
            self.ex.inventory.agent(self.dest) as dest_agent,
        ):
            self.disks_started = True
            await agent.mirror_disks(
                self.vm.name, *self.nbd, self.req.datastore, self.req.max_bandwidth_bps
            )
            await self._watch_disk_copy(
                agent,
                self.req.datastore,
                "ready",
                (0.0, 50.0),
                also=lambda: self._check_destination(dest_agent),
            )

    async def migrate(self, uri: str) -> None:
        await self._update(phase="precopy")
        async with self.ex.inventory.agent(self.source) as agent:
            self.migrate_started = True
            knobs = self.conv.knobs
            self._t0 = time.monotonic()
            await agent.migrate(
                self.vm.name,
                uri,
                knobs.downtime_limit_ms,
                knobs.max_bandwidth_bps,
                brake=self.conv.brake,
                postcopy=self.req.allow_postcopy,
            )

    async def watch(self) -> None:
        """Follow the source until QEMU completes; progress and samples flow into the task."""
        async with (
            self.ex.inventory.agent(self.source) as agent,
            self.ex.inventory.agent(self.dest) as dest_agent,
        ):
            no_view_since = time.monotonic()
            sent, moved_at = -1, time.monotonic()
            while True:
                info = await agent.get_vm(self.vm.name)
                view = info.get("migration") or {}
                stats_now = view.get("stats") or {}
                if int(stats_now.get("transferred_bytes") or 0) != sent:
                    sent, moved_at = int(stats_now.get("transferred_bytes") or 0), time.monotonic()
                elif (
                    view.get("phase") == "active"
                    and time.monotonic() - moved_at > self.ex.stall_timeout_s
                ):
                    raise KvmotionError(
                        f"no memory sent for {self.ex.stall_timeout_s:.0f} s: the migration "
                        "link may be down",
                        code="migration_stalled",
                    )
                if view.get("side") != "source":
                    # The source agent forgot this migration (it restarted): nothing to follow.
                    if time.monotonic() - no_view_since > LOST_VIEW_TIMEOUT:
                        raise KvmotionError(
                            f"the source {self.source.name} no longer reports this migration",
                            code="migration_lost",
                        )
                    await asyncio.sleep(POLL_INTERVAL)
                    continue
                no_view_since = time.monotonic()
                self.last_view = view
                stats = view.get("stats") or {}
                phase = view.get("phase", "setup")
                await self._progress(view, stats, phase)
                if phase == "completed":
                    return
                if phase == "active":
                    await self._converge(agent, stats)
                if phase in ("failed", "cancelled"):
                    dest_view = await self._destination_view(dest_agent)
                    also = f"; destination: {dest_view}" if dest_view else ""
                    raise KvmotionError(
                        f"QEMU migration {phase}: {view.get('error') or 'no reason given'}{also}",
                        code=f"migration_{phase}",
                    )
                await self._check_destination(dest_agent)
                # Past pre-switchover the guest is stunned: finishing beats undoing.
                cancel = (await self.ex.tasks.get(self.task_id)).cancel_requested
                if cancel and phase not in ("pre-switchover", "device"):
                    raise Cancelled()
                await asyncio.sleep(POLL_INTERVAL)

    async def _converge(self, agent: AgentClient, stats: dict[str, Any]) -> None:
        """Ask the convergence engine; apply and record what it decides."""
        decision = self.conv.observe(time.monotonic() - self._t0, stats)
        if decision is None:
            return
        self.log.info("convergence: %s (%s)", decision.action, decision.reason)
        if decision.action == "abort":
            raise KvmotionError(
                f"the migration did not converge in time: {decision.reason}",
                code="deadline_passed",
            )
        if decision.action == "start_postcopy":
            await agent.start_postcopy(self.vm.name)
            return
        knobs = decision.knobs
        await agent.tune_migration(
            self.vm.name,
            downtime_limit_ms=knobs.downtime_limit_ms,
            max_bandwidth_bps=knobs.max_bandwidth_bps,
            throttle_pct=knobs.throttle_pct if self.conv.brake else None,
        )

    async def _destination_view(self, dest_agent: AgentClient) -> str | None:
        with contextlib.suppress(KvmotionError):
            view = (await dest_agent.get_vm(self.vm.name)).get("migration") or {}
            return str(view.get("error") or view.get("phase") or "") or None
        return None

    async def _check_destination(self, dest_agent: AgentClient) -> None:
        """The destination must stay alive while we copy to it (HostUnreachable if its agent
        died: the migration is aborted rather than completed into a host nobody drives)."""
        info = await dest_agent.get_vm(self.vm.name)
        view = info.get("migration") or {}
        if info["power_state"] == "poweredOff" or view.get("phase") in ("failed", "cancelled"):
            why = view.get("error") or "its QEMU ended"
            raise KvmotionError(
                f"the destination {self.dest.name} stopped receiving: {why}",
                code="destination_failed",
            )

    async def _progress(self, view: dict[str, Any], stats: dict[str, Any], phase: str) -> None:
        transferred = int(stats.get("transferred_bytes", 0))
        remaining = int(stats.get("remaining_bytes", 0))
        total = transferred + remaining
        progress = 100.0 * transferred / total if total and phase != "completed" else 0.0
        if phase == "completed":
            progress = 95.0
        if self.both:  # the disks took the first half
            progress = 50.0 + progress * 45.0 / 95.0
        marks = view.get("marks", {})
        if "first_byte" in marks:
            self._mark("precopy", marks["first_byte"])
        if "stunned" in marks:
            self._mark("stunned", marks["stunned"])
        await self._update(
            phase="switchover" if phase in ("pre-switchover", "device") else phase,
            progress=min(progress, 95.0),
            samples=view.get("samples", []),
            summary=self._summary(stats),
        )

    def _summary(self, stats: dict[str, Any]) -> dict[str, Any]:
        return self._kept_summary | {
            "strategy": self.req.strategy,
            "link_bps": self.conv.link_bps,
            "decisions": self.conv.decisions,
            "status": stats.get("status"),
            "total_time_ms": stats.get("total_time_ms"),
            "setup_time_ms": stats.get("setup_time_ms"),
            "downtime_ms": stats.get("downtime_ms"),
            "expected_downtime_ms": stats.get("expected_downtime_ms"),
            "transferred_bytes": stats.get("transferred_bytes"),
            "remaining_bytes": stats.get("remaining_bytes"),
            "ram_total_bytes": stats.get("total_bytes"),
            "throughput_mbps": stats.get("mbps"),
            "passes": stats.get("passes"),
            "dirty_rate_bps": (stats.get("dirty_pages_rate") or 0)
            * (stats.get("page_size") or 4096),
        }

    async def confirm_resumed(self) -> None:
        """The destination resumes the guest itself on completion; wait until it says so."""
        await self._update(phase="resume")
        deadline = time.monotonic() + RESUME_TIMEOUT
        async with self.ex.inventory.agent(self.dest) as agent:
            while time.monotonic() < deadline:
                info = await agent.get_vm(self.vm.name)
                view = info.get("migration") or {}
                if info["power_state"] == "poweredOn" and info.get("qemu_status") == "running":
                    self.resumed = True
                    self._mark("resumed", view.get("marks", {}).get("resumed"))
                    return
                if (
                    view.get("phase") in ("failed", "cancelled")
                    or info["power_state"] == "poweredOff"
                ):
                    why = view.get("error") or view.get("phase")
                    raise KvmotionError(
                        f"the destination did not resume the VM: {why}", code="resume_failed"
                    )
                await asyncio.sleep(POLL_INTERVAL / 2.5)
        raise KvmotionError(
            f"the destination did not resume the VM in {RESUME_TIMEOUT:.0f} s",
            code="resume_timeout",
        )

    async def finalize(self) -> None:
        """Record the new host (the destination runs the VM), then end the source's copy (and
        with "change both", remove its old disks)."""
        await faults.hold("finalize")
        fields: dict[str, Any] = {"host_id": self.dest.id, "power_state": "poweredOn"}
        if self.both:
            async with self.ex.inventory.agent(self.dest) as agent:
                info = await agent.get_vm(self.vm.name)
            fields |= {"config": info["config"], "config_path": info["config_path"]}
        await self.ex.inventory.set_vm(self.vm.uuid, **fields)
        problems = await self._finish_source()
        if problems:
            self._kept_summary["old_files_left"] = problems
        self._mark("source_removed")
        summary = dict((await self.ex.tasks.get(self.task_id)).summary) | self._kept_summary
        summary.update(timeline_summary({t["step"]: float(t["time"]) for t in self.timeline}))
        await self._update(state=TaskState.SUCCESS, phase="done", progress=100.0, summary=summary)
        await record_event(
            self.ex.db,
            f"VM {self.vm.name} migrated from {self.source.name} to {self.dest.name} "
            f"(downtime {summary.get('downtime_ms')} ms)",
            vm=self.vm.name,
            host=self.dest.name,
            task_id=self.task_id,
        )
        self.log.info("migrated to %s", self.dest.name)

    async def _finish_source(self) -> Any:
        """End the source's paused copy. The guest runs on the destination, so that copy is
        stale: if the source's agent is unreachable (restarting), keep asking for
        ``source_retry_s`` rather than leave it behind."""
        deadline = time.monotonic() + self.ex.source_retry_s
        while True:
            try:
                async with self.ex.inventory.agent(self.source) as agent:
                    return await agent.finish_migration(self.vm.name, remove_files=self.both)
            except HostUnreachable:
                if time.monotonic() >= deadline:
                    raise
                self.log.warning("source unreachable after the switchover; asking again")
                await asyncio.sleep(min(2.0, self.ex.source_retry_s))

    async def _finish_after_resume(self, reason: str) -> None:
        """The VM runs on the destination; whatever failed after that, it stays there."""
        try:
            await self.finalize()
        except KvmotionError as exc:
            await self.ex.inventory.set_vm(
                self.vm.uuid, host_id=self.dest.id, power_state="poweredOn"
            )
            await self._update(
                state=TaskState.ERROR,
                phase="done",
                error=f"VM {self.vm.name} moved to {self.dest.name}, but removing its copy on "
                f"{self.source.name} failed: {exc.message} (after: {reason})",
                error_code="source_cleanup_failed",
            )
            await record_event(
                self.ex.db,
                f"VM {self.vm.name} runs on {self.dest.name}; its paused copy on "
                f"{self.source.name} could not be removed: {exc.message}",
                severity="warning",
                vm=self.vm.name,
                task_id=self.task_id,
            )

    async def _abort_source(self, dest_gone: bool) -> str:
        """The source's side of an abort. Once the destination's copy is gone, the source's is
        the only one left, and once streaming possibly paused: if its agent is unreachable
        (restarting), keep asking for ``SOURCE_RETRY_S`` rather than leave the guest stunned
        with no one to resume it."""
        # Only a source seen migrating can have a stunned guest (the last view the center got
        # may be older than the moment the stream completed).
        streamed = bool(self.last_view)
        deadline = time.monotonic() + (self.ex.source_retry_s if dest_gone and streamed else 0.0)
        while True:
            try:
                async with self.ex.inventory.agent(self.source) as agent:
                    answer = await agent.abort_migration(self.vm.name, destination_gone=dest_gone)
                return str(answer["done"])
            except HostUnreachable as exc:
                if time.monotonic() >= deadline:
                    return exc.message
                self.log.warning("source unreachable during the abort; asking again")
                await asyncio.sleep(2.0)
            except KvmotionError as exc:
                return exc.message

    async def abort(self, reason: str, state: TaskState, code: str | None = None) -> None:
        """Undo what was done, idempotently; the VM keeps running on the source."""
        if TaskState((await self.ex.tasks.get(self.task_id)).state).final:
            return  # already ended: keep the first reason
        self.log.warning("aborting migration: %s", reason)
        if self.resumed:
            # The destination runs the VM: it is the owner now. Finish instead of undoing.
            await self._finish_after_resume(reason)
            return
        notes = []
        dest_gone = not self.dest_prepared
        if self.dest_prepared:
            # The destination first: once its copy is ended, the source may safely resume.
            try:
                async with self.ex.inventory.agent(self.dest) as agent:
                    done = (await agent.abort_migration(self.vm.name))["done"]
                # Only an ended copy is gone; any other answer may come from a destination
                # that runs the guest (after its agent restarted), and the source must not.
                dest_gone = done.startswith("destination ended")
                notes.append(f"destination: {done}")
            except NotFound:
                dest_gone = True
                notes.append("destination: nothing left")
            except KvmotionError as exc:
                notes.append(f"destination: {exc.message}")
        if self.migrate_started or self.disks_started:
            notes.append(f"source: {await self._abort_source(dest_gone)}")
        await self._aborted(
            state, reason, code, notes, f"{self.req.kind} migration to {self.dest.name}"
        )


def timeline_summary(times: dict[str, float]) -> dict[str, int]:
    """Durations between the seed's steps, in ms (those whose steps are known)."""
    spans = {
        "task_time_ms": ("requested", "source_removed"),
        "stun_to_resume_ms": ("stunned", "resumed"),
        "request_to_first_byte_ms": ("requested", "precopy"),
        "resume_to_done_ms": ("resumed", "source_removed"),
    }
    return {
        name: round((times[b] - times[a]) * 1000)
        for name, (a, b) in spans.items()
        if a in times and b in times
    }
