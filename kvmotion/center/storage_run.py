"""Storage vMotion: the VM's disks to another datastore of its host, while it runs.

move (the agent copies every disk and pivots to the copies once all are ready) → watch →
finalize (the inventory records the new datastore). Abort cancels the copy before the pivot;
the VM keeps its disks. After the pivot the copies are the VM's: the run finishes instead.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from kvmotion.center import runs
from kvmotion.center.db import Host, Vm
from kvmotion.center.runs import TaskRun
from kvmotion.center.tasks import TaskState, record_event
from kvmotion.center.watch import watching
from kvmotion.errors import Conflict, KvmotionError
from kvmotion.host.protocol import StorageMoveRequest, VmInfo, build
from kvmotion.host.storage import StorageView
from kvmotion.migration.phases import STORAGE_PHASES, StoragePhase
from kvmotion.migration.request import MigrationRequest

if TYPE_CHECKING:
    from kvmotion.center.executor import Executor


class StorageMigration(TaskRun[StoragePhase]):
    """Storage vMotion of one VM on ``host``, to ``req.datastore``."""

    def __init__(
        self, ex: Executor, task_id: int, vm: Vm, host: Host, req: MigrationRequest
    ) -> None:
        super().__init__(ex, task_id, vm, ex.costs(req, vm, host), STORAGE_PHASES)
        self.host = host
        self.req = req

    async def steps(self) -> None:
        assert self.req.datastore is not None
        async with self.ex.inventory.agent(self.host) as agent:
            await self.enter(StoragePhase.COPYING)
            req = build(
                StorageMoveRequest,
                datastore=self.req.datastore,
                max_bandwidth_bps=self.req.max_bandwidth_bps,
            )
            await agent.move_storage(self.vm.name, req)
            async with watching(agent, self.vm.name, self.wake) as watch:
                view = await self._watch_disk_copy(
                    watch, self.req.datastore, "completed", (0.0, 95.0)
                )
            await self.enter(StoragePhase.PIVOTED)
            info = await agent.get_vm(self.vm.name)
        await self.finalize(info, view)

    async def finalize(self, info: VmInfo, view: StorageView) -> None:
        await self.ex.inventory.set_vm(
            self.vm.uuid,
            config=info.config.model_dump(mode="json"),
            config_path=info.config_path,
        )
        self._mark("disks_switched", view.marks.get("completed"))
        old = sorted({d["datastore"] for d in self.vm.config.get("disks", [])})
        summary = (await self.ex.tasks.get(self.task_id)).summary | self._kept_summary
        summary["disk_copy"] = summary.get("disk_copy", {}) | {
            "from": old,
            "old_files_left": view.error,
        }
        await self.enter(
            StoragePhase.DONE, state=TaskState.SUCCESS, progress=100.0, summary=summary
        )
        await record_event(
            self.ex.db,
            f"VM {self.vm.name}'s disks moved from {', '.join(old)} to {self.req.datastore} "
            f"on {self.host.name} "
            + ("while it ran" if self.vm.power_state == "poweredOn" else "(powered off)"),
            severity="warning" if view.error else "info",
            vm=self.vm.name,
            host=self.host.name,
            task_id=self.task_id,
        )
        self.log.info("disks moved to %s", self.req.datastore)

    async def abort(self, reason: str, state: TaskState, code: str | None = None) -> None:
        """Before the pivot, cancel the copy (the VM keeps its disks); after it, record the move
        instead. Idempotent: an ended task keeps its first reason."""
        if await self._ended():
            return
        self.log.warning("aborting storage migration: %s", reason)
        note = ""
        if self.phase is StoragePhase.COPYING:
            try:
                async with self.ex.inventory.agent(self.host) as agent:
                    note = await agent.cancel_storage(self.vm.name)
            except Conflict as exc:
                # The agent pivoted before the cancel arrived.
                if exc.code == "too_late" and await self._finish_after_pivot():
                    return
                note = exc.message
            except KvmotionError as exc:
                note = exc.message
        elif self.phase is StoragePhase.PIVOTED:
            try:
                if await self._finish_after_pivot():
                    return
                note = "the host no longer reports the finished copy"
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
        deadline = time.monotonic() + runs.RESUME_TIMEOUT
        async with self.ex.inventory.agent(self.host) as agent:
            while time.monotonic() < deadline:
                info = await agent.get_vm(self.vm.name)
                view = info.storage
                if view is not None and view.phase == "completed":
                    await self.enter(StoragePhase.PIVOTED)
                    await self.finalize(info, view)
                    return True
                if view is not None and view.phase in ("failed", "cancelled"):
                    return False
                await asyncio.sleep(runs.POLL_INTERVAL * 2)
        return False
