"""Post-copy, seen from the center: the moment neither host holds the whole VM.

Once the source switches to post-copy the guest runs on the destination, and every page it has
not received yet is still only on the source. Nothing can be undone from here: the source's copy
is stale and must never run again, and the destination cannot run without the source's pages.
So a broken stream is repaired, never aborted:

- a stream that moves nothing for ``STALL_S`` (a cut link leaves TCP retrying for minutes) is
  broken on purpose on both hosts (``migrate-pause``): QEMU moves to ``postcopy-paused``;
- while paused, every ``RETRY_S`` the destination listens again (``migrate-recover``) and the
  source reconnects to it (``migrate`` with ``resume``); once the link is back, the copy goes on
  from where it broke, and the guest, which waited on each missing page, runs on;
- if the link does not come back within the executor's ``postcopy_recovery_s``, the VM is lost:
  its newest state is split between two hosts. The center says so, ends the source's copy (its
  memory is stale) and leaves the destination's: the user powers the VM off and on, and it
  restarts from its disks (every write the guest's disks acknowledged is there).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmotion.center.db import Host
from kvmotion.center.tasks import TaskState, record_event
from kvmotion.errors import KvmotionError
from kvmotion.host.migrationview import POSTCOPY_PAUSED, PREEMPT_SINCE, MigrationMode
from kvmotion.host.vmstate import VmInfo
from kvmotion.migration.phases import ComputePhase
from kvmotion.migration.request import MigrationRequest
from kvmotion.qemu.cmdline import parse_version

if TYPE_CHECKING:
    from kvmotion.center.compute_run import ComputeMigration

STALL_S = 3.0  # a post-copy stream still this long is broken on purpose, to be recovered
RETRY_S = 2.0  # between recovery attempts while the stream is paused
DEFAULT_RECOVERY_S = 600.0  # give up (the VM is lost) after the stream stays broken this long


def memory_mode(req: MigrationRequest, source: Host, dest: Host, link_bps: float) -> MigrationMode:
    """How memory travels, told alike to both hosts: over how many streams, whether post-copy
    may start, and with it preempt (the pages the guest waits for jump the queue) where both
    hosts' QEMU has it as it is now."""
    versions = [parse_version(str((h.facts or {}).get("qemu_version"))) for h in (source, dest)]
    preempt = req.allow_postcopy and all(v and v >= PREEMPT_SINCE for v in versions)
    return MigrationMode(req.allow_postcopy, req.memory_streams(link_bps), preempt)


def mode_fields(mode: MigrationMode) -> dict[str, object]:
    """The mode as the agents' requests name it (IncomingRequest, MigrateRequest)."""
    return {"postcopy": mode.postcopy, "streams": mode.streams, "postcopy_preempt": mode.preempt}


class PostcopyRepair:
    """Watches one migration's post-copy from the center and repairs a broken stream."""

    def __init__(self, run: ComputeMigration, mark: Callable[[str, float | None], None]) -> None:
        self.run = run
        self.mark = mark  # a step on the task's timeline
        self.broken_at: float | None = None  # monotonic, while the stream is broken
        # Monotonic: the last time the stream was asked to break, or to resume; a stream is
        # judged still only over the time since (bytes take a moment to move after a resume).
        self.acted_at = time.monotonic()
        self.tried_at = 0.0
        self.pauses = 0  # streams broken (by us or by QEMU)
        self.recoveries = 0  # streams mended
        self.last_error: str | None = None

    def summary(self) -> dict[str, object]:
        return {"postcopy_breaks": self.pauses, "postcopy_recoveries": self.recoveries}

    async def look(self, phase: str, still_s: float, dest: VmInfo) -> None:
        """One look at the source's ``phase``, ``still_s`` seconds after its last byte moved,
        and at the destination's latest report. Raises KvmotionError (``postcopy_lost``) once
        the stream stayed broken too long."""
        run = self.run
        resumed = dest.migration.marks.get("resumed") if dest.migration is not None else None
        if resumed is not None:  # the guest runs on the destination, its memory still coming
            self.mark("resumed", resumed)
        if phase == "postcopy-active":
            if self.broken_at is not None:
                self.broken_at = None
                self.recoveries += 1
                self.mark("postcopy_recovered", None)
                run.log.info("post-copy stream recovered")
            still_s = min(still_s, time.monotonic() - self.acted_at)
            if still_s > min(STALL_S, run.ex.stall_timeout_s):
                self.acted_at = time.monotonic()
                await self._pause(f"the stream moved nothing for {still_s:.0f} s")
            return
        if phase not in POSTCOPY_PAUSED:
            return
        now = time.monotonic()
        if self.broken_at is None:
            self.broken_at = now
            self.pauses += 1
            self.mark("postcopy_paused", None)
            run.log.warning("post-copy stream broken: recovering it")
        if now - self.broken_at > run.ex.postcopy_recovery_s:
            why = f" (last try: {self.last_error})" if self.last_error else ""
            raise KvmotionError(
                f"the post-copy stream stayed broken for {run.ex.postcopy_recovery_s:.0f} s{why}",
                code="postcopy_lost",
            )
        if phase == "postcopy-paused" and now - self.tried_at >= RETRY_S:
            self.tried_at = self.acted_at = now
            try:
                await self._recover(dest)
            except KvmotionError as exc:
                self.last_error = exc.message
                run.log.info("post-copy recovery not yet: %s", exc.message)

    async def _pause(self, why: str) -> None:
        """Break the stalled stream on both hosts (the destination may never notice a cut)."""
        run = self.run
        run.log.warning("post-copy: %s; breaking it to recover it", why)
        for host in (run.source, run.dest):
            with contextlib.suppress(KvmotionError):
                async with run.ex.inventory.agent(host) as agent:
                    await agent.postcopy_step(run.vm.name, "pause")

    async def _recover(self, dest: VmInfo) -> None:
        run = self.run
        async with run.ex.inventory.agent(run.dest) as agent:
            view = dest.migration
            if view is not None and view.phase == "postcopy-active":
                await agent.postcopy_step(run.vm.name, "pause")  # it has not noticed yet
            uri = (await agent.postcopy_step(run.vm.name, "recover")).uri
        assert uri is not None
        async with run.ex.inventory.agent(run.source) as agent:
            await agent.postcopy_step(run.vm.name, "resume", uri)

    async def give_up(self, reason: str, code: str | None) -> None:
        """The run failed during post-copy: nothing can be undone. Where the VM is lost (the
        stream stayed broken, or the destination's QEMU ended) the source's stale copy is
        ended; otherwise (the center is stopping) both are left to QEMU, which goes on alone."""
        run = self.run
        lost = code in ("postcopy_lost", "destination_failed")
        source = "left as it is"
        if lost:
            try:
                await run.finish_source()
                source = "ended (its memory is stale)"
            except KvmotionError as exc:
                source = f"could not be ended: {exc.message}"
        await run.ex.inventory.set_vm(run.vm.uuid, host_id=run.dest.id)
        what = (
            f"VM {run.vm.name} is lost: its newest memory was split between {run.source.name} "
            f"and {run.dest.name}. Power it off and on (it restarts on {run.dest.name} from its "
            "disks, which hold every write they acknowledged)"
            if lost
            else f"VM {run.vm.name} runs on {run.dest.name} in post-copy, still fetching memory "
            f"from {run.source.name}; QEMU finishes it without the center"
        )
        error = f"{reason}. {what}; the source's copy was {source}."
        await run.enter(
            ComputePhase.DONE, state=TaskState.ERROR, error=error, error_code=code or "postcopy"
        )
        severity = "alarm" if lost else "warning"
        await record_event(run.ex.db, error, severity=severity, vm=run.vm.name, task_id=run.task_id)
