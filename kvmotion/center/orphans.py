"""Tasks a center left unfinished (it was stopped, it crashed, or it lost leadership to another
center: center/leader.py): the center that is active next settles each from what the hosts say.

A migration goes on without its center: the source's agent drives QEMU through the switchover,
the destination's agent resumes the guest (host/migration.py, host/switchover.py), and a disk
copy runs in its host's agent. So the new center waits for the hosts, at most :data:`SETTLE_S`,
while the VM counts as being moved (no new migration of it starts), then:

- the VM runs where the task wanted it: the center ends the source's copy (the seed's step 5) and
  records success, saying the agents finished the move while no center watched;
- the VM runs where it was: the task failed, and says so;
- still under way after :data:`SETTLE_S`: the center asks the source to abort, and records that.

Tasks of other kinds (power operations, evacuations, HA restarts) and migrations that were still
queued end as failed at once: their callers (a user, maintenance mode, HA) see why and ask again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from kvmotion.center.db import Task
from kvmotion.center.executor import Executor, vm_datastores
from kvmotion.center.inventory import Inventory
from kvmotion.center.tasks import TaskState, TaskStore, record_event
from kvmotion.errors import KvmotionError, NotFound
from kvmotion.host.migrationview import ACTIVE, POSTCOPY_PAUSED
from kvmotion.host.vmstate import VmInfo

log = logging.getLogger(__name__)

SETTLE_S = 180.0  # a migration the agents have not finished or ended by then is aborted
POLL_S = 1.0
STORAGE_UNDER_WAY = ("copying", "ready", "pivoting", "pivoted", "switching")


def under_way(info: VmInfo) -> bool:
    """The host is still moving the VM (memory, or disks), or holds a copy not yet resumed."""
    return (
        info.incoming
        or (info.migration is not None and info.migration.phase in (*ACTIVE, *POSTCOPY_PAUSED))
        or (info.storage is not None and info.storage.phase in STORAGE_UNDER_WAY)
    )


def orphaned_incoming(source: VmInfo | None, dest: VmInfo | None) -> bool:
    """The destination waits for a stream the source is not sending, and will not send."""
    feeding = (*ACTIVE, *POSTCOPY_PAUSED, "completed")
    sends = source is not None and source.migration is not None
    return (
        dest is not None and dest.incoming and not (sends and source.migration.phase in feeding)  # type: ignore[union-attr]
    )


def runs(info: VmInfo) -> bool:
    return info.power_state == "poweredOn" and info.qemu_status == "running" and not info.incoming


def on_datastore(datastores: set[str], datastore: str | None) -> bool:
    """Whether disks on ``datastores`` are where a migration asked (None: it moved none)."""
    return datastore is None or datastores <= {datastore}


class Orphans:
    """Settles the unfinished tasks of the center before this one."""

    def __init__(
        self, inventory: Inventory, executor: Executor, tasks: TaskStore, settle_s: float = SETTLE_S
    ) -> None:
        self.inventory = inventory
        self.executor = executor
        self.tasks = tasks
        self.settle_s = settle_s
        self.poll_s = POLL_S
        self._settling: list[asyncio.Task[None]] = []

    async def settle(self, reason: str, code: str) -> None:
        """``reason`` says what happened to the last center ("the center restarted"); ``code``
        is the failed tasks' error code. Migrations under way are settled in the background."""
        for task in await self.tasks.list(limit=500):
            if task.state == TaskState.RUNNING and task.kind == "migrate":
                self._settling.append(
                    asyncio.create_task(
                        self._settle_migration(task, reason, code), name=f"settle-{task.id}"
                    )
                )
            elif task.state in (TaskState.QUEUED, TaskState.RUNNING):
                await self._fail(task, f"{reason} during this task; hosts were re-read", code)

    async def wait(self) -> None:
        """Every migration settled (tests, and a center that stops)."""
        await asyncio.gather(*self._settling, return_exceptions=True)

    async def close(self) -> None:
        for run in self._settling:
            run.cancel()
        await self.wait()

    async def _settle_migration(self, task: Task, reason: str, code: str) -> None:
        req = task.request
        source, dest, vm = str(req["source"]), str(req["dest"]), str(req["vm"])
        try:
            with self.executor.reserved(vm):  # no new move of it until this one is settled
                where, notes = await self._settle(task, req, reason, code)
            if where is None:
                return  # aborted, and recorded
            for name in dict.fromkeys((source, dest)):  # the inventory as the hosts say now
                with contextlib.suppress(KvmotionError):
                    await self.inventory.refresh_host(name)
            moved = vm_datastores(await self.inventory.vm(vm))
            if where == dest and on_datastore(moved, req.get("datastore")):
                await self.tasks.update(
                    task.id, state=TaskState.SUCCESS, phase="done", progress=100.0,
                    summary=task.summary | {"finished_by": "agents", "settled_because": reason},
                )  # fmt: skip
                await record_event(
                    self.inventory.db,
                    f"task {task.id}: {reason} during the migration of VM {vm}; its hosts "
                    f"finished it, and VM {vm} runs on {dest}{notes}",
                    severity="warning", vm=vm, task_id=task.id,
                )  # fmt: skip
            else:
                await self._fail(
                    task, f"{reason} during this migration; the hosts ended it, and VM {vm} "
                    f"runs on {where}{notes}", code,
                )  # fmt: skip
        except Exception as exc:  # the task must still end, with what is known
            log.exception("settling task %s failed", task.id)
            with contextlib.suppress(Exception):
                await self._fail(task, f"{reason} during this migration; settling it: {exc}", code)

    async def _settle(
        self, task: Task, req: dict[str, Any], reason: str, code: str
    ) -> tuple[str | None, str]:
        """Wait for the hosts; returns where the VM runs, and notes on the source's copy (None:
        still under way after the settle time, so aborted)."""
        source, dest, vm = str(req["source"]), str(req["dest"]), str(req["vm"])
        deadline = time.monotonic() + self.settle_s
        while True:
            seen = await self._sightings(vm, list(dict.fromkeys((source, dest))))
            if seen is None:
                pass  # a host does not answer: ask again
            elif source != dest and orphaned_incoming(seen[source], seen[dest]):
                await self._end_incoming(vm, dest)  # nothing feeds it (a prepare, then the loss)
            elif not any(i is not None and under_way(i) for i in seen.values()):
                running = [h for h, i in seen.items() if i is not None and runs(i)]
                if len(running) == 1:
                    break
            if time.monotonic() > deadline:
                await self._abort(task, vm, source, reason, code)
                return None, ""
            await asyncio.sleep(self.poll_s)
        [where] = running
        info = seen[where]
        assert info is not None
        if (
            where == dest != source
            and seen[source] is not None
            and on_datastore({d.datastore for d in info.config.disks}, req.get("datastore"))
        ):
            return where, await self._end_source_copy(vm, source, req.get("type") == "both")
        return where, ""

    async def _sightings(self, vm: str, hosts: list[str]) -> dict[str, VmInfo | None] | None:
        """What each host says about the VM now; None if one of them does not answer."""
        seen: dict[str, VmInfo | None] = {}
        for name in hosts:
            try:
                host = await self.inventory.host(name)
                async with self.inventory.agent(host) as agent:
                    seen[name] = await agent.get_vm(vm)
            except NotFound:
                seen[name] = None
            except KvmotionError:
                return None
        return seen

    async def _end_source_copy(self, vm: str, source: str, remove_files: bool) -> str:
        try:
            host = await self.inventory.host(source)
            async with self.inventory.agent(host) as agent:
                problems = await agent.finish_migration(vm, remove_files=remove_files)
        except KvmotionError as exc:
            return f" (its copy on {source} was not ended: {exc.message}; the next refresh does)"
        return f" (left on {source}: {', '.join(problems)})" if problems else ""

    async def _end_incoming(self, vm: str, dest: str) -> None:
        with contextlib.suppress(KvmotionError):
            host = await self.inventory.host(dest)
            async with self.inventory.agent(host) as agent:
                await agent.abort_migration(vm)

    async def _abort(self, task: Task, vm: str, source: str, reason: str, code: str) -> None:
        try:
            host = await self.inventory.host(source)
            async with self.inventory.agent(host) as agent:
                done = await agent.abort_migration(vm)
        except KvmotionError as exc:
            done = f"the abort failed: {exc.message}"
        await self._fail(
            task, f"{reason} during this migration, and its hosts had not finished it "
            f"{self.settle_s:.0f} s later: it was aborted ({done})", code,
        )  # fmt: skip

    async def _fail(self, task: Task, message: str, code: str) -> None:
        await self.tasks.update(task.id, state=TaskState.ERROR, error=message, error_code=code)
        await record_event(
            self.inventory.db, f"task {task.id} ended: {message}", severity="warning",
            vm=task.target, task_id=task.id,
        )  # fmt: skip
