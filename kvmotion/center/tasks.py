"""Tasks: the center's record of long work (a migration), with its lifecycle and timeline.

States move only forward: queued → running → success | error | cancelled. The timeline keeps the
seed's five steps with wall-clock times; progress and per-pass samples are updated as work goes.

A run's live figures (progress, samples, summary) are kept in memory (:meth:`TaskStore.publish`)
and written to the database with its next phase or state change (:meth:`TaskStore.update`);
every read here sees them, and every change beats :attr:`TaskStore.changed` for the streams.
:meth:`TaskStore.update` is also the one place a task ends: it tells :attr:`TaskStore.on_end`'s
listeners (the center's metrics) of each task that reached a final state.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select

from kvmotion.center.db import Database, Event, Task
from kvmotion.errors import Conflict, NotFound
from kvmotion.pulse import Pulse

log = logging.getLogger(__name__)


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (TaskState.SUCCESS, TaskState.ERROR, TaskState.CANCELLED)


_NEXT = {
    TaskState.QUEUED: {TaskState.RUNNING, TaskState.ERROR, TaskState.CANCELLED},
    TaskState.RUNNING: {TaskState.SUCCESS, TaskState.ERROR, TaskState.CANCELLED},
}

# The seed's five steps, as timeline step names.
STEPS = (
    ("requested", "1. migration requested; the VM runs, its user connected, on the source"),
    ("precopy", "2. memory pre-copied to the destination; dirty pages re-sent in passes"),
    ("stunned", "3. VM stunned on the source; last dirty pages and device state sent"),
    ("resumed", "4. VM resumed on the destination and announced on the VM network"),
    ("source_removed", "5. VM removed from the source host"),
)


SHOWN_KEPT = 256  # tasks whose stream form is kept (the streams show the newest 100 at most)


@dataclass(frozen=True)
class Shown:
    """A task as a stream shows it: its id, whether it ended, its ``task_dict`` as JSON."""

    id: int
    final: bool
    body: str


def task_dict(task: Task) -> dict[str, Any]:
    return {
        "id": task.id,
        "kind": task.kind,
        "target": task.target,
        "state": task.state,
        "phase": task.phase,
        "progress": round(task.progress, 1),
        "request": task.request,
        "timeline": task.timeline,
        "samples": task.samples,
        "summary": task.summary,
        "warnings": task.warnings,
        "error": task.error,
        "error_code": task.error_code,
        "cancel_requested": task.cancel_requested,
        "created_at": task.created_at.isoformat() if task.created_at else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }


class TaskStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._live: dict[int, dict[str, Any]] = {}  # task id -> fields not written yet
        self.changed = Pulse()  # beats when any task changes
        # Every change has a number: a stream asks what changed since the last one it saw
        # (:meth:`changes`) and reads only those tasks.
        self._seq = 0
        self._changed_at: dict[int, int] = {}  # task id -> the number of its last change
        # Each changed task read and encoded once, however many task streams show it (every
        # open web client holds one): by task id, the number of the change it was read after
        # and the read (shared by the streams that ask meanwhile). See :meth:`shown`.
        self._shown: dict[int, tuple[int, asyncio.Future[Shown]]] = {}
        self._made: dict[str, int] = {}  # tasks created by this process, by kind
        # Told of each task that reached a final state, once, after it was written.
        self.on_end: list[Callable[[Task], None]] = []

    def _touch(self, task_id: int) -> None:
        self._seq += 1
        self._changed_at[task_id] = self._seq
        self.changed.beat()

    def changes(self, since: int) -> tuple[int, list[int]]:
        """The number of the latest change, and the tasks changed after change ``since``
        (oldest first)."""
        ids = sorted((n, t) for t, n in self._changed_at.items() if n > since)
        return self._seq, [t for _, t in ids]

    def _seen(self, task: Task) -> Task:
        """``task`` (detached from its session) with the live fields not written yet."""
        for key, value in self._live.get(task.id, {}).items():
            setattr(task, key, value)
        return task

    def publish(self, task_id: int, **fields: Any) -> None:
        """Live figures of a running task, kept in memory until its next :meth:`update`."""
        self._live.setdefault(task_id, {}).update(fields)
        self._touch(task_id)

    async def create(
        self,
        kind: str,
        target: str,
        request: dict[str, Any],
        *,
        requested: float | None = None,
        warnings: list[Any] | None = None,
    ) -> Task:
        """A queued task; ``requested`` is when the request arrived (before its precheck)."""
        async with self.db.session() as s:
            task = Task(kind=kind, target=target, request=request, state=TaskState.QUEUED)
            when = requested if requested is not None else datetime.now(UTC).timestamp()
            task.timeline = [{"step": "requested", "time": when}]
            task.warnings = warnings or []
            s.add(task)
            await s.commit()
        self._made[kind] = self._made.get(kind, 0) + 1
        self._touch(task.id)
        return task

    def made(self, kind: str) -> int:
        """How many tasks of ``kind`` this process has created (the active center creates
        them all): what is read of them may be kept while this stays the same."""
        return self._made.get(kind, 0)

    async def get(self, task_id: int) -> Task:
        async with self.db.session() as s:
            task = await s.get(Task, task_id)
            if task is None:
                raise NotFound(f"no task {task_id}", code="task_not_found")
        return self._seen(task)

    async def shown(self, task_id: int) -> Shown:
        """The task as of its latest change, as a task stream shows it: read and encoded once
        per change, whatever the number of streams (50 migrations' figures, each change read
        by each of 20 open web clients, were a thousand reads a second of the same rows).
        Raises NotFound."""
        seq = self._changed_at.get(task_id, 0)
        kept = self._shown.pop(task_id, None)  # put back last: the dict is oldest first
        if kept is None or kept[0] != seq or (kept[1].done() and kept[1].exception()):
            kept = (seq, asyncio.ensure_future(self._show(task_id)))
        self._keep_shown(task_id, kept)
        # A stream that stops waiting must not cancel the read the others wait for.
        return await asyncio.shield(kept[1])

    async def newest_shown(self, limit: int) -> list[int]:
        """The ids of the ``limit`` newest tasks, oldest first, read in one query: what
        :meth:`shown` keeps of them is from this read when no task changed meanwhile."""
        seq = self._seq
        tasks = list(reversed(await self.list(limit)))
        if self._seq == seq:
            for task in tasks:
                if task.id not in self._shown:
                    done = asyncio.get_running_loop().create_future()
                    done.set_result(self._shown_of(task))
                    self._keep_shown(task.id, (self._changed_at.get(task.id, 0), done))
        return [t.id for t in tasks]

    def _keep_shown(self, task_id: int, kept: tuple[int, asyncio.Future[Shown]]) -> None:
        """Keep what :meth:`shown` read of a task, newest last, the oldest dropped past
        ``SHOWN_KEPT``."""
        self._shown[task_id] = kept
        while len(self._shown) > SHOWN_KEPT:
            del self._shown[next(iter(self._shown))]

    @staticmethod
    def _shown_of(task: Task) -> Shown:
        return Shown(task.id, TaskState(task.state).final, json.dumps(task_dict(task), default=str))

    async def _show(self, task_id: int) -> Shown:
        return self._shown_of(await self.get(task_id))

    async def list(self, limit: int = 50) -> list[Task]:
        async with self.db.session() as s:
            rows = list(await s.scalars(select(Task).order_by(Task.id.desc()).limit(limit)))
        return [self._seen(t) for t in rows]

    async def recent(self, kind: str, state: str, limit: int) -> Sequence[Task]:
        """The newest ``limit`` tasks of ``kind`` that ended in ``state``, newest first."""
        async with self.db.session() as s:
            query = (
                select(Task)
                .where(Task.kind == kind, Task.state == state)
                .order_by(Task.id.desc())
                .limit(limit)
            )
            return [*await s.scalars(query)]

    async def update(self, task_id: int, **fields: Any) -> Task:
        """Write fields, with the live ones not written yet; a ``state`` change is checked
        against the lifecycle."""
        fields = self._live.get(task_id, {}) | fields
        ended = False
        async with self.db.session() as s:
            task = await s.get(Task, task_id)
            if task is None:
                raise NotFound(f"no task {task_id}", code="task_not_found")
            if "state" in fields:
                old, new = TaskState(task.state), TaskState(fields["state"])
                if new is not old and new not in _NEXT.get(old, set()):
                    raise Conflict(f"task {task_id} is {old}; it cannot become {new}")
                if new.final:
                    fields.setdefault("finished_at", datetime.now(UTC))
                ended = new.final and not old.final
            for key, value in fields.items():
                setattr(task, key, value)
            await s.commit()
        self._live.pop(task_id, None)
        self._touch(task_id)
        if ended:
            self._tell_ended(task)
        return task

    def _tell_ended(self, task: Task) -> None:
        for listener in self.on_end:
            # The task is written: a listener's failure must not look like the update's (a run
            # would abort a migration that succeeded).
            try:
                listener(task)
            except Exception:
                log.exception("a listener failed on task %s's end", task.id)

    async def request_cancel(self, task_id: int) -> Task:
        task = await self.get(task_id)
        if TaskState(task.state).final:
            raise Conflict(f"task {task_id} already ended ({task.state})", code="task_ended")
        return await self.update(task_id, cancel_requested=True)


async def record_event(
    db: Database,
    message: str,
    *,
    severity: str = "info",
    vm: str | None = None,
    host: str | None = None,
    task_id: int | None = None,
) -> None:
    async with db.session() as s:
        s.add(Event(message=message, severity=severity, vm=vm, host=host, task_id=task_id))
        await s.commit()
