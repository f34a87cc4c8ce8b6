"""The lifecycles of a migration run: a phase enum per kind, the moves each allows, and what an
abort in each phase undoes.

Pure data and one check. The center's compute and storage runs move only through
:meth:`PhaseTable.check` and decide their abort from the phase alone.

A run's phase is not the task's stored ``phase`` (what the CLI, the web client and tests read):
``shown`` names the task phase written on entering a phase; the others show the run's finer
progress (see the center's ``runs`` module).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Generic, TypeVar

from kvmotion.errors import Conflict

P = TypeVar("P", bound=StrEnum)


@dataclass(frozen=True)
class PhaseTable(Generic[P]):
    """A run kind's lifecycle: its first phase, the moves allowed from each phase, the phase an
    abort ends in, the task phase stored on entering a phase (where it has one), and the phases
    in which a user's cancel can no longer undo anything, with why (the API refuses it)."""

    start: P
    aborted: P
    next: Mapping[P, frozenset[P]]
    shown: Mapping[P, str]
    too_late: Mapping[P, str]

    def check(self, old: P, new: P) -> None:
        """Raises Conflict if the table does not allow ``old`` → ``new`` (staying is allowed)."""
        if new is not old and new not in self.next.get(old, frozenset()):
            raise Conflict(f"a run in phase {old} cannot move to {new}", code="illegal_phase")


class ComputePhase(StrEnum):
    """A compute (or "change both") run, named by what has been asked of the hosts."""

    START = "start"  # nothing asked of any host yet (queued, or sampling the guest's memory)
    PREPARING = "preparing"  # the destination was asked to listen
    COPYING_DISKS = "copying_disks"  # change both: the source mirrors into the new disks
    MIGRATING = "migrating"  # the source was asked to stream memory
    STREAMING = "streaming"  # the source was seen migrating
    SWITCHOVER = "switchover"  # the guest is stunned (pre-switchover): finishing beats undoing
    # The guest runs on the destination, pages still come from the source: nothing can be
    # undone (center/postcopy.py)
    POSTCOPY = "postcopy"
    RESUMING = "resuming"  # QEMU completed; the destination resumes the guest
    RESUMED = "resumed"  # the destination runs the guest: it is the owner
    DONE = "done"
    ABORTED = "aborted"


_C = ComputePhase
COMPUTE_PHASES = PhaseTable(
    start=_C.START,
    aborted=_C.ABORTED,
    next={
        _C.START: frozenset({_C.PREPARING, _C.ABORTED}),
        _C.PREPARING: frozenset({_C.COPYING_DISKS, _C.MIGRATING, _C.ABORTED}),
        _C.COPYING_DISKS: frozenset({_C.MIGRATING, _C.ABORTED}),
        _C.MIGRATING: frozenset({_C.STREAMING, _C.ABORTED}),
        _C.STREAMING: frozenset({_C.SWITCHOVER, _C.POSTCOPY, _C.RESUMING, _C.ABORTED}),
        _C.SWITCHOVER: frozenset({_C.POSTCOPY, _C.RESUMING, _C.ABORTED}),
        _C.POSTCOPY: frozenset({_C.RESUMING, _C.DONE}),  # never aborted, and DONE if lost
        _C.RESUMING: frozenset({_C.RESUMED, _C.ABORTED}),
        _C.RESUMED: frozenset({_C.DONE}),  # never aborted: the VM stays where it runs
    },
    shown={_C.MIGRATING: "precopy", _C.RESUMING: "resume", _C.DONE: "done", _C.ABORTED: "aborted"},
    too_late={
        _C.SWITCHOVER: "the guest is stunned for its switchover: finishing is quicker than undoing",
        _C.POSTCOPY: "the guest runs on the destination in post-copy, part of its memory still on "
        "the source: nothing can be undone, the migration finishes (or the VM is lost if a host "
        "fails)",
        _C.RESUMING: "the destination has the whole VM and is resuming it",
        _C.RESUMED: "the guest runs on the destination",
    },
)


@dataclass(frozen=True)
class Undo:
    """What an abort of a compute run undoes."""

    destination: bool  # end the destination's copy (it was asked to listen)
    source: bool  # stop the source's copy (it was asked to mirror disks or stream memory)
    # Keep asking an unreachable source (for the executor's ``source_retry_s``) once the
    # destination's copy is ended: only a source seen migrating can have a stunned guest (the
    # last view the center got may be older than the moment the stream completed).
    insist: bool


# Every phase an abort can meet; in POSTCOPY it cannot undo (center/postcopy.py), after RESUMED
# the run finishes instead, DONE and ABORTED ended.
UNDO: Mapping[ComputePhase, Undo] = {
    _C.START: Undo(destination=False, source=False, insist=False),
    _C.PREPARING: Undo(destination=True, source=False, insist=False),
    _C.COPYING_DISKS: Undo(destination=True, source=True, insist=False),
    _C.MIGRATING: Undo(destination=True, source=True, insist=False),
    _C.STREAMING: Undo(destination=True, source=True, insist=True),
    _C.SWITCHOVER: Undo(destination=True, source=True, insist=True),
    _C.RESUMING: Undo(destination=True, source=True, insist=True),
}


class StoragePhase(StrEnum):
    """A storage run (the disks to another datastore of the VM's host)."""

    START = "start"  # nothing asked of the host yet
    COPYING = "copying"  # the host was asked to copy (it pivots on its own once all are ready)
    PIVOTED = "pivoted"  # the center saw the VM on its copies: they are its disks now
    DONE = "done"
    ABORTED = "aborted"


_S = StoragePhase
STORAGE_PHASES = PhaseTable(
    start=_S.START,
    aborted=_S.ABORTED,
    next={
        _S.START: frozenset({_S.COPYING, _S.ABORTED}),
        _S.COPYING: frozenset({_S.PIVOTED, _S.ABORTED}),
        # Aborted only if the host cannot be asked for the finished copy (its agent is gone).
        _S.PIVOTED: frozenset({_S.DONE, _S.ABORTED}),
    },
    shown={_S.DONE: "done", _S.ABORTED: "aborted"},
    too_late={_S.PIVOTED: "the VM runs on its new disks"},
)
