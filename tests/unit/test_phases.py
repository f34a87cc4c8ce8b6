"""The run lifecycles (kvmotion/migration/phases.py): tables that say where a run may go, and
what an abort undoes in each phase."""

from __future__ import annotations

from typing import Any

import pytest

from kvmotion.errors import Conflict
from kvmotion.migration.phases import (
    COMPUTE_PHASES,
    STORAGE_PHASES,
    UNDO,
    ComputePhase,
    PhaseTable,
)


@pytest.mark.parametrize("table", [COMPUTE_PHASES, STORAGE_PHASES], ids=["compute", "storage"])
def test_every_phase_is_reachable_and_only_the_ends_are_final(table: PhaseTable[Any]) -> None:
    reached, frontier = {table.start}, [table.start]
    while frontier:
        for new in table.next.get(frontier.pop(), frozenset()):
            if new not in reached:
                reached.add(new)
                frontier.append(new)
    assert reached == set(type(table.start))
    assert {p for p in reached if p not in table.next} == {table.aborted, type(table.start)("done")}


def test_a_resumed_compute_run_can_only_finish() -> None:
    with pytest.raises(Conflict) as info:
        COMPUTE_PHASES.check(ComputePhase.RESUMED, ComputePhase.ABORTED)
    assert info.value.code == "illegal_phase"
    COMPUTE_PHASES.check(ComputePhase.RESUMED, ComputePhase.DONE)
    COMPUTE_PHASES.check(ComputePhase.RESUMED, ComputePhase.RESUMED)  # staying is no move


def test_a_compute_run_in_post_copy_is_never_aborted() -> None:
    """The guest runs on the destination and needs the source's pages: nothing can be undone;
    the run finishes, or ends lost (center/postcopy.py)."""
    with pytest.raises(Conflict):
        COMPUTE_PHASES.check(ComputePhase.POSTCOPY, ComputePhase.ABORTED)
    COMPUTE_PHASES.check(ComputePhase.SWITCHOVER, ComputePhase.POSTCOPY)
    COMPUTE_PHASES.check(ComputePhase.POSTCOPY, ComputePhase.RESUMING)
    COMPUTE_PHASES.check(ComputePhase.POSTCOPY, ComputePhase.DONE)


def test_undo_covers_every_phase_an_abort_can_meet() -> None:
    # In post-copy nothing is undone; after the resume the run finishes instead.
    ended = {ComputePhase.POSTCOPY, ComputePhase.RESUMED, ComputePhase.DONE, ComputePhase.ABORTED}
    assert set(UNDO) == set(ComputePhase) - ended
    # Nothing is asked of the source before the destination listens.
    assert all(undo.destination for undo in UNDO.values() if undo.source)
