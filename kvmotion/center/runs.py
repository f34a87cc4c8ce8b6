"""What every migration run shares: its task and timeline, its phase, its guard (every failure
goes through the run's one idempotent ``abort``), and the watch of a disk copy.

A run's phase is an enum of its kind with a :class:`~kvmotion.migration.phases.PhaseTable`:
where it starts, the moves allowed, and the task phase a user sees on entering a phase.
:meth:`TaskRun.enter` is the only way to move, and refuses a move the table does not allow;
``abort`` decides from the phase alone.

The task's stored ``phase`` (read by the CLI, the web client and tests) is the user's view of a
run: "queued" until the run has its slot, then "prepare"; each kind's table names what entering
a phase shows ("precopy", "resume", "done", "aborted", ...); while memory or disks are copied,
the agent's finer steps show instead (setup, active, switchover, completed; disk_copy,
disk_switch).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic

from kvmotion.center.db import Vm
from kvmotion.center.tasks import TaskState, record_event
from kvmotion.center.watch import HostWatch
from kvmotion.errors import Conflict, KvmotionError
from kvmotion.host.protocol import VmInfo
from kvmotion.host.storage import StorageView
from kvmotion.migration.costs import Demand
from kvmotion.migration.phases import P, PhaseTable

if TYPE_CHECKING:
    from kvmotion.center.executor import Executor

log = logging.getLogger(__name__)

# Tunables, read at each use as ``runs.NAME`` (tests shorten them).
POLL_INTERVAL = 0.05
RESUME_TIMEOUT = 60.0
LOST_VIEW_TIMEOUT = 10.0
RETRY_PAUSE_S = 2.0  # between two requests to an unreachable (restarting) source agent
TICK_S = 1.0  # a run waiting on its watches looks again this often (stalls, deadlines)
PERSIST_EVERY_S = 5.0  # live figures reach the database at least this often
# A run's live figures: kept in memory (and streamed) until a phase or state change is written.
LIVE_FIELDS = frozenset({"progress", "samples", "summary"})


class Cancelled(Exception):
    """The user cancelled the task."""


class TaskRun(Generic[P]):
    """One migration: its task, its phase, and the guard that sends every failure to
    :meth:`abort`. One coroutine drives a run (its :meth:`run`, or a test step by step)."""

    def __init__(
        self, ex: Executor, task_id: int, vm: Vm, need: Demand, phases: PhaseTable[P]
    ) -> None:
        self.ex = ex
        self.task_id = task_id
        self.vm = vm
        self.need = need  # what it costs on hosts, links and datastores while it runs
        self.phases = phases
        self.phase = phases.start
        self.log = log.getChild(vm.name)
        self._kept_summary: dict[str, Any] = {}  # kept through progress updates
        # The task's timeline, kept here and written with the next update (one commit, not two).
        self.timeline: list[dict[str, Any]] = []
        self._timeline_dirty = False
        # What was last set of each task field (as JSON): an update that changes nothing is
        # not made, and samples are rewritten only when a pass adds one.
        self._written: dict[str, str] = {}
        self._persisted_at = time.monotonic()
        # Set by each answer of the run's watches and by a cancel: the run looks again.
        self.wake = asyncio.Event()
        self.cancel_requested = False

    def check_cancel(self) -> None:
        """Raises Conflict, saying why, where a cancel can no longer undo anything."""
        why = self.phases.too_late.get(self.phase)
        if why is not None:
            raise Conflict(f"too late to cancel: {why}", code="too_late_to_cancel")

    def request_cancel(self) -> None:
        """The user asked to cancel: the run sees it at its next look (at once if waiting)."""
        self.cancel_requested = True
        self.wake.set()

    async def _next(self, timeout: float | None = None) -> None:
        """Wait for the next change a watch reports, a cancel, or ``timeout`` (``TICK_S``)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TICK_S if timeout is None else timeout):
                await self.wake.wait()
        self.wake.clear()

    async def enter(self, phase: P, **fields: Any) -> None:
        """Move to ``phase``; ``fields`` (and the task phase the table shows for it) are written
        to the task first, in one update. Raises Conflict for a move the table does not allow
        (nothing changes)."""
        self.phases.check(self.phase, phase)
        if phase in self.phases.shown:
            fields["phase"] = self.phases.shown[phase]
        if fields:
            await self._update(**fields)
        self.phase = phase

    def _mark(self, step: str, when: float | None = None, **extra: Any) -> None:
        if any(t["step"] == step for t in self.timeline):
            return
        self.timeline.append({"step": step, "time": when or time.time(), **extra})
        self.timeline.sort(key=lambda t: float(t["time"]))
        self._timeline_dirty = True

    async def _update(self, **fields: Any) -> None:
        """Set the fields that changed (none: nothing happens). Live figures alone are
        published from memory; anything else (a phase, a state, the timeline) writes them all
        to the database, as does a live change ``PERSIST_EVERY_S`` after the last write."""
        if self._timeline_dirty:
            fields["timeline"] = list(self.timeline)
            self._timeline_dirty = False
        seen = {k: json.dumps(v, sort_keys=True, default=str) for k, v in fields.items()}
        changed = {k: v for k, v in fields.items() if self._written.get(k) != seen[k]}
        if not changed:
            return
        due = time.monotonic() - self._persisted_at >= PERSIST_EVERY_S
        if changed.keys() <= LIVE_FIELDS and not due:
            self.ex.tasks.publish(self.task_id, **changed)
        else:
            await self.ex.tasks.update(self.task_id, **changed)
            self._persisted_at = time.monotonic()
        self._written |= {k: seen[k] for k in changed}

    async def _check_cancel(self) -> None:
        if self.cancel_requested:
            raise Cancelled()

    async def _ended(self) -> bool:
        """The task ended already (an abort after that keeps the first reason)."""
        return TaskState((await self.ex.tasks.get(self.task_id)).state).final

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
            if not self.ex.abandoned:  # a center that lost leadership leaves it to the next
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
            await self.enter(
                self.phases.aborted,
                state=state,
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
        watch: HostWatch,
        datastore: str,
        until: str,
        span: tuple[float, float],
        also: Callable[[], None] | None = None,
    ) -> StorageView:
        """Follow the VM's disk copy (``watch``: the VM on the copying host) until its phase is
        ``until``; progress (within ``span`` percent) and per-disk bytes flow into the task;
        ``also`` checks something else at each look. Raises KvmotionError if the copy fails or
        stalls (no byte copied for the stall timeout: a cut link), Cancelled."""
        self._mark("disk_copy")
        last_copied, last_move = -1, time.monotonic()
        seen_at = time.monotonic()
        while True:
            info = watch.latest()
            view = info.storage
            if view is None:
                # The agent restarted and forgot the copy: it settled it from its records.
                if until == "completed" and self._disks_on(info, datastore):
                    return StorageView(mode="local", phase="completed", datastore=datastore)
                if time.monotonic() - seen_at > LOST_VIEW_TIMEOUT:
                    raise KvmotionError(
                        "the host no longer reports this disk copy (its agent restarted)",
                        code="migration_lost",
                    )
                await self._next()
                continue
            seen_at = time.monotonic()
            copied = view.copied_bytes
            await self._disk_progress(view, span)
            if view.phase == until:
                return view
            if view.phase in ("failed", "cancelled"):
                raise KvmotionError(
                    f"the disk copy {view.phase}: {view.error or 'no reason given'}",
                    code=f"disk_copy_{view.phase}",
                )
            stalled = time.monotonic() - last_move > self.ex.stall_timeout_s
            if copied != last_copied:
                last_copied, last_move = copied, time.monotonic()
            elif view.phase == "copying" and view.mode == "nbd" and stalled:
                # Over the migration link only: a copy between local disks is slow, never cut.
                raise KvmotionError(
                    f"no disk data copied for {self.ex.stall_timeout_s:.0f} s: the migration "
                    "link may be down",
                    code="copy_stalled",
                )
            if view.phase in ("copying", "ready"):
                await self._check_cancel()
            if also is not None:
                also()
            await self._next()

    @staticmethod
    def _disks_on(info: VmInfo, datastore: str) -> bool:
        disks = info.config.disks
        return bool(disks) and all(d.datastore == datastore for d in disks)

    async def _disk_progress(self, view: StorageView, span: tuple[float, float]) -> None:
        marks = view.marks
        if "ready" in marks:
            self._mark("disks_ready", marks["ready"])
        started = marks.get("started")
        elapsed = (marks.get("ready") or time.time()) - started if started else None
        copied, total = view.copied_bytes, view.total_bytes
        self._kept_summary["disk_copy"] = {
            "datastore": view.datastore,
            "copied_bytes": copied,
            "total_bytes": total,
            "copy_time_ms": round(elapsed * 1000) if elapsed is not None else None,
            "throughput_bps": round(copied / elapsed) if elapsed else None,
            "disks": [
                {"disk": d.index, "copied_bytes": d.offset, "total_bytes": d.length,
                 "status": d.status}
                for d in view.disks
            ],
        }  # fmt: skip
        share = copied / total if total else 0.0
        await self._update(
            phase="disk_copy" if view.phase == "copying" else "disk_switch",
            progress=round(span[0] + (span[1] - span[0]) * share, 1),
            summary=dict(self._kept_summary),
        )
