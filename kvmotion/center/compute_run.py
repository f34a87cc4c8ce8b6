"""The compute migration, driven by the center across two agents, as named steps.

(queue for a slot) → prepare (destination listens) → migrate (source streams over the migration
network) → watch (passes, progress, cancel) → switchover (source agent continues at
pre-switchover; destination resumes and announces) → finalize (the inventory records the new host
only once the destination runs; the source QEMU is ended). "Change both" copies the disks into
the destination's new ones between prepare and migrate.

Every failure goes through one idempotent :meth:`ComputeMigration.abort`, which undoes what the
run's phase says was done (:data:`~kvmotion.migration.phases.UNDO`): the destination QEMU is
ended, the source keeps (or resumes) running, the task fails with the reason, the inventory is
unchanged. Once the destination has resumed the VM it is the owner, and abort is no longer
possible: the migration is finalized instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from kvmotion import faults
from kvmotion.center import runs
from kvmotion.center.db import Host, Vm
from kvmotion.center.postcopy import PostcopyRepair, memory_mode, mode_fields
from kvmotion.center.prediction import link_bps, ram_bytes, sample_and_predict
from kvmotion.center.runs import Cancelled, TaskRun
from kvmotion.center.tasks import TaskState, record_event
from kvmotion.center.watch import HostWatch, watching
from kvmotion.errors import HostUnreachable, KvmotionError, NotFound
from kvmotion.host.client import AgentClient
from kvmotion.host.migrationview import POSTCOPY_PAUSED, MigrationStats, MigrationView
from kvmotion.host.protocol import (
    DiskMirrorRequest,
    IncomingRequest,
    MigrateRequest,
    TuneRequest,
    build,
)
from kvmotion.migration.convergence import Convergence
from kvmotion.migration.history import timeline_summary
from kvmotion.migration.phases import COMPUTE_PHASES, UNDO, ComputePhase
from kvmotion.migration.request import MigrationRequest

if TYPE_CHECKING:
    from kvmotion.center.executor import Executor


# How long the center waits, after a move, for the destination to say by how much it set the
# guest's clock: host/guesttime.py gives the guest agent 5 s an answer, and 30 s for the set
# (qemu-ga writes the RTC too, slow in a loaded TCG guest); the VM runs meanwhile.
CLOCK_WAIT_S = 40.0


class ComputeMigration(TaskRun[ComputePhase]):
    """Compute vMotion, or "change both" (``req.kind == "both"``): the destination makes new
    disks and serves them over NBD, the source copies its disks into them first, and they end
    consistent at switchover, with the guest stunned."""

    def __init__(
        self, ex: Executor, task_id: int, vm: Vm, source: Host, dest: Host, req: MigrationRequest
    ) -> None:
        super().__init__(ex, task_id, vm, ex.costs(req, vm, source, dest), COMPUTE_PHASES)
        self.source = source
        self.dest = dest
        self.req = req
        self.both = req.kind == "both"
        self.nbd: tuple[str, int] | None = None
        self.switchover_token: str | None = None  # the destination's, for the source (prepare)
        self.conv = Convergence(
            req.convergence(),
            link_bps=link_bps(req, source, dest),
            ram_bytes=ram_bytes(vm),
            strategy=req.strategy,
        )
        self._t0 = time.monotonic()
        self.mode = memory_mode(req, source, dest, self.conv.link_bps)  # set alike on both ends
        self.postcopy = PostcopyRepair(self, self._mark)

    async def steps(self) -> None:
        if self.req.predict:
            await self.predict()
        uri = await self.prepare()
        await self._check_cancel()
        if self.both:
            await self.copy_disks()
        await self.migrate(uri)
        async with self.watches() as (agent, src, dst):
            await self.watch(agent, src, dst)
            await self.confirm_resumed(dst)
        await self.finalize()

    @contextlib.asynccontextmanager
    async def watches(self) -> AsyncIterator[tuple[AgentClient, HostWatch, HostWatch]]:
        """The source's agent, and a watch of the VM on each host, while memory moves."""
        async with (
            self.ex.inventory.agent(self.source) as agent,
            self.ex.inventory.agent(self.dest) as dest_agent,
            watching(agent, self.vm.name, self.wake) as src,
            watching(dest_agent, self.vm.name, self.wake) as dst,
        ):
            yield agent, src, dst

    async def predict(self) -> None:
        """Predict before migrating; the task keeps it beside the actual figures. A prediction
        that cannot be made (an agent without memory profiles, QEMU busy measuring) is noted,
        and the migration goes on."""
        try:
            sampled = await sample_and_predict(
                self.ex.inventory, self.ex.tasks, self.req, self.vm, self.source, self.dest
            )
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
            # From here on, abort must clean the destination.
            await self.enter(ComputePhase.PREPARING)
            result = await agent.prepare_incoming(
                build(
                    IncomingRequest,
                    config=self.vm.config,
                    config_path=self.vm.config_path,
                    cpu=self.vm.cpu,
                    ram_pad_kib=self.vm.ram_pad_kib or 0,
                    **mode_fields(self.mode),
                    datastore=self.req.datastore if self.both else None,
                )
            )
        self.switchover_token = result.switchover_token
        detail = f"listening at {result.uri}"
        if self.both:
            if result.nbd_host is None or result.nbd_port is None:
                raise KvmotionError(
                    f"{self.dest.name} made the new disks but serves them nowhere",
                    code="protocol_mismatch",
                )
            self.nbd = (result.nbd_host, result.nbd_port)
            detail += f"; new disks on {self.req.datastore} served at {self.nbd[0]}:{self.nbd[1]}"
        self._mark("prepared", detail=detail)
        return result.uri

    async def copy_disks(self) -> None:
        """Change both: the source copies every disk into the destination's new ones, until
        every copy is ready (tracking the guest's writes); memory follows."""
        assert self.nbd is not None and self.req.datastore is not None
        async with (
            self.ex.inventory.agent(self.source) as agent,
            self.ex.inventory.agent(self.dest) as dest_agent,
        ):
            await self.enter(ComputePhase.COPYING_DISKS)
            await agent.mirror_disks(
                self.vm.name,
                build(
                    DiskMirrorRequest,
                    host=self.nbd[0],
                    port=self.nbd[1],
                    datastore=self.req.datastore,
                    max_bandwidth_bps=self.req.max_bandwidth_bps,
                ),
            )
            async with (
                watching(agent, self.vm.name, self.wake) as src,
                watching(dest_agent, self.vm.name, self.wake) as dst,
            ):
                await self._watch_disk_copy(
                    src,
                    self.req.datastore,
                    "ready",
                    (0.0, 50.0),
                    also=lambda: dst.check_receiving(self.dest.name),
                )

    async def migrate(self, uri: str) -> None:
        await self.enter(ComputePhase.MIGRATING)
        async with self.ex.inventory.agent(self.source) as agent:
            knobs = self.conv.knobs
            self._t0 = time.monotonic()
            await agent.migrate(
                self.vm.name,
                build(
                    MigrateRequest,
                    uri=uri,
                    downtime_limit_ms=knobs.downtime_limit_ms,
                    max_bandwidth_bps=knobs.max_bandwidth_bps,
                    brake=self.conv.brake,
                    auto_converge=self.conv.auto_converge,
                    **mode_fields(self.mode),
                    switchover_url=f"{self.ex.inventory.agent_url(self.dest)}/v1/migrations/{self.vm.uuid}/switchover",
                    switchover_token=self.switchover_token if self.req.handover else None,
                ),
            )

    async def watch(self, agent: AgentClient, src: HostWatch, dst: HostWatch) -> None:
        """Follow the source until QEMU completes; progress and samples flow into the task.
        Each look follows a change either host reports (or a cancel, or ``TICK_S``)."""
        no_view_since = time.monotonic()
        sent, moved_at = -1, time.monotonic()
        while True:
            view = src.latest().migration
            stats = view.stats if view is not None else None
            if stats is not None and stats.transferred_bytes != sent:
                sent, moved_at = stats.transferred_bytes, time.monotonic()
            elif (
                view is not None
                and view.phase == "active"
                and time.monotonic() - moved_at > self.ex.stall_timeout_s
            ):
                raise KvmotionError(
                    f"no memory sent for {self.ex.stall_timeout_s:.0f} s: the migration "
                    "link may be down",
                    code="migration_stalled",
                )
            if view is None or view.side != "source":
                # The source agent forgot this migration (it restarted): nothing to follow.
                if time.monotonic() - no_view_since > runs.LOST_VIEW_TIMEOUT:
                    raise KvmotionError(
                        f"the source {self.source.name} no longer reports this migration",
                        code="migration_lost",
                    )
                await self._next()
                continue
            no_view_since = time.monotonic()
            stats = stats or MigrationStats(status="setup")
            phase = view.phase
            await self._seen(phase)
            await self._progress(view, stats, phase)
            if phase == "completed":
                return
            if phase == "active":
                await self._converge(agent, stats)
            if self.phase is ComputePhase.POSTCOPY:
                await self.postcopy.look(phase, time.monotonic() - moved_at, dst.latest())
            if phase in ("failed", "cancelled"):
                dest_view = dst.migration_said()
                also = f"; destination: {dest_view}" if dest_view else ""
                raise KvmotionError(
                    f"QEMU migration {phase}: {view.error or 'no reason given'}{also}",
                    code=f"migration_{phase}",
                )
            dst.check_receiving(self.dest.name)
            # Past pre-switchover the guest is stunned: finishing beats undoing; in post-copy
            # nothing can be undone (a cancel that came just before is dropped).
            if self.cancel_requested and self.phase not in self.phases.too_late:
                raise Cancelled()
            await self._next()

    async def _seen(self, qemu_phase: str) -> None:
        """The source reports its migration: it streams, and from pre-switchover on its guest
        is stunned."""
        if self.phase is ComputePhase.MIGRATING:
            await self.enter(ComputePhase.STREAMING)
        if self.phase is ComputePhase.STREAMING and qemu_phase in ("pre-switchover", "device"):
            await self.enter(ComputePhase.SWITCHOVER)
        if qemu_phase in ("postcopy-active", *POSTCOPY_PAUSED) and self.phase in (
            ComputePhase.STREAMING,
            ComputePhase.SWITCHOVER,
        ):
            await self.enter(ComputePhase.POSTCOPY)

    async def _converge(self, agent: AgentClient, stats: MigrationStats) -> None:
        """Ask the convergence engine; apply and record what it decides."""
        decision = self.conv.observe(time.monotonic() - self._t0, asdict(stats))
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
            build(
                TuneRequest,
                downtime_limit_ms=knobs.downtime_limit_ms,
                max_bandwidth_bps=knobs.max_bandwidth_bps,
                throttle_pct=knobs.throttle_pct if self.conv.brake else None,
            ),
        )

    async def _progress(self, view: MigrationView, stats: MigrationStats, phase: str) -> None:
        transferred, remaining = stats.transferred_bytes, stats.remaining_bytes
        total = transferred + remaining
        progress = 100.0 * transferred / total if total and phase != "completed" else 0.0
        if phase == "completed":
            progress = 95.0
        if self.both:  # the disks took the first half
            progress = 50.0 + progress * 45.0 / 95.0
        marks = view.marks
        if "first_byte" in marks:
            self._mark("precopy", marks["first_byte"])
        if "stunned" in marks:
            self._mark("stunned", marks["stunned"])
        if "postcopy" in marks:
            self._mark("postcopy", marks["postcopy"])
        await self._update(
            phase="switchover" if phase in ("pre-switchover", "device") else phase,
            progress=min(progress, 95.0),
            samples=[asdict(sample) for sample in view.samples],
            summary=self._summary(stats),
        )

    def _summary(self, stats: MigrationStats) -> dict[str, Any]:
        return (
            self._kept_summary
            | {
                "strategy": self.req.strategy,
                "streams": self.mode.streams,
                "link_bps": self.conv.link_bps,
                "decisions": self.conv.decisions,
                "status": stats.status,
                "total_time_ms": stats.total_time_ms,
                "setup_time_ms": stats.setup_time_ms,
                "downtime_ms": stats.downtime_ms,
                "expected_downtime_ms": stats.expected_downtime_ms,
                "transferred_bytes": stats.transferred_bytes,
                "multifd_bytes": stats.multifd_bytes,
                "remaining_bytes": stats.remaining_bytes,
                "ram_total_bytes": stats.total_bytes,
                "throughput_mbps": stats.mbps,
                "passes": stats.passes,
                "dirty_rate_bps": stats.dirty_rate_bps,
            }
            | (self.postcopy.summary() if self.req.allow_postcopy else {})
        )

    async def confirm_resumed(self, dst: HostWatch) -> None:
        """The destination resumes the guest itself on completion; wait until it says so."""
        await self.enter(ComputePhase.RESUMING)
        deadline = time.monotonic() + runs.RESUME_TIMEOUT
        while time.monotonic() < deadline:
            info = dst.latest()
            view = info.migration
            if info.power_state == "poweredOn" and info.qemu_status == "running":
                await self.enter(ComputePhase.RESUMED)
                self._mark("resumed", view.marks.get("resumed") if view else None)
                return
            failed = view is not None and view.phase in ("failed", "cancelled")
            if failed or info.power_state == "poweredOff":
                why = (view.error or view.phase) if view is not None else "its QEMU ended"
                raise KvmotionError(
                    f"the destination did not resume the VM: {why}", code="resume_failed"
                )
            await self._next(min(runs.TICK_S, max(deadline - time.monotonic(), 0.0)))
        raise KvmotionError(
            f"the destination did not resume the VM in {runs.RESUME_TIMEOUT:.0f} s",
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
            fields |= {
                "config": info.config.model_dump(mode="json"),
                "config_path": info.config_path,
            }
        await self.ex.inventory.set_vm(self.vm.uuid, **fields)
        problems = await self.finish_source()
        if problems:
            self._kept_summary["old_files_left"] = problems
        self._mark("source_removed")
        await self._note_network()
        summary = dict((await self.ex.tasks.get(self.task_id)).summary) | self._kept_summary
        summary.update(timeline_summary({t["step"]: float(t["time"]) for t in self.timeline}))
        await self.enter(
            ComputePhase.DONE, state=TaskState.SUCCESS, progress=100.0, summary=summary
        )
        await record_event(
            self.ex.db,
            f"VM {self.vm.name} migrated from {self.source.name} to {self.dest.name} "
            f"(downtime {summary.get('downtime_ms')} ms)",
            vm=self.vm.name,
            host=self.dest.name,
            task_id=self.task_id,
        )
        self.log.info("migrated to %s", self.dest.name)

    async def _note_network(self) -> None:
        """When the destination took the VM's traffic (told by the source at the stun), and
        when its bridge saw the VM after the resume: the user's traffic reaches it there. And
        the step by which the destination set the guest's clock right, if it had a guest agent
        (in the summary as ``guest_clock_step_ms``)."""
        with contextlib.suppress(KvmotionError):
            # A guest agent answers within seconds of the resume (the destination waits up to
            # CLOCK_WAIT_S for it); without one, or with the step noted, one look is enough.
            deadline = time.monotonic() + (CLOCK_WAIT_S if self.vm.config.get("guest_agent") else 0)
            async with self.ex.inventory.agent(self.dest) as agent:
                while True:
                    view = (await agent.get_vm(self.vm.name)).migration
                    noted = view is None or "clock_checked" in view.marks
                    if noted or time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(0.2)
            for step in ("traffic_taken", "mac_learned"):
                if view is not None and step in view.marks:
                    self._mark(step, view.marks[step])
            if view is not None and view.guest_clock_step_s is not None:
                self._kept_summary["guest_clock_step_ms"] = round(view.guest_clock_step_s * 1000, 1)

    async def finish_source(self) -> Any:
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
                await asyncio.sleep(min(runs.RETRY_PAUSE_S, self.ex.source_retry_s))

    async def _finish_after_resume(self, reason: str) -> None:
        """The VM runs on the destination; whatever failed after that, it stays there."""
        try:
            await self.finalize()
        except KvmotionError as exc:
            await self.ex.inventory.set_vm(
                self.vm.uuid, host_id=self.dest.id, power_state="poweredOn"
            )
            await self.enter(
                ComputePhase.DONE,
                state=TaskState.ERROR,
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

    async def _abort_destination(self) -> tuple[bool, str]:
        """End the destination's copy, first: once it is ended, the source may safely resume.
        Returns whether the copy is gone, and a note for the task's error."""
        try:
            async with self.ex.inventory.agent(self.dest) as agent:
                done = await agent.abort_migration(self.vm.name)
        except NotFound:
            return True, "destination: nothing left"
        except KvmotionError as exc:
            return False, f"destination: {exc.message}"
        # Only an ended copy is gone; any other answer may come from a destination that runs
        # the guest (after its agent restarted), and the source must not.
        return done.startswith("destination ended"), f"destination: {done}"

    async def _abort_source(self, dest_gone: bool, insist: bool) -> str:
        """The source's side of an abort. Once the destination's copy is gone, the source's is
        the only one left, and once streaming possibly paused: if its agent is unreachable
        (restarting), keep asking for ``source_retry_s`` (``insist``) rather than leave the
        guest stunned with no one to resume it."""
        deadline = time.monotonic() + (self.ex.source_retry_s if dest_gone and insist else 0.0)
        while True:
            try:
                async with self.ex.inventory.agent(self.source) as agent:
                    return await agent.abort_migration(self.vm.name, destination_gone=dest_gone)
            except HostUnreachable as exc:
                if time.monotonic() >= deadline:
                    return exc.message
                self.log.warning("source unreachable during the abort; asking again")
                await asyncio.sleep(runs.RETRY_PAUSE_S)
            except KvmotionError as exc:
                return exc.message

    async def abort(self, reason: str, state: TaskState, code: str | None = None) -> None:
        """Undo what the phase says was done (``UNDO``), idempotently; the VM keeps running
        on the source. Once resumed on the destination, the run finishes instead."""
        if self.phase in (ComputePhase.DONE, ComputePhase.ABORTED) or await self._ended():
            return  # already ended: keep the first reason
        self.log.warning("aborting migration: %s", reason)
        if self.phase is ComputePhase.RESUMED:
            # The destination runs the VM: it is the owner now. Finish instead of undoing.
            await self._finish_after_resume(reason)
            return
        if self.phase is ComputePhase.POSTCOPY:
            await self.postcopy.give_up(reason, code)
            return
        undo = UNDO[self.phase]
        notes = []
        dest_gone = True  # nothing was made there
        if undo.destination:
            dest_gone, note = await self._abort_destination()
            notes.append(note)
        if undo.source:
            notes.append(f"source: {await self._abort_source(dest_gone, undo.insist)}")
        await self._aborted(
            state, reason, code, notes, f"{self.req.kind} migration to {self.dest.name}"
        )
