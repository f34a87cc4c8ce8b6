"""The center's repair of a broken post-copy stream (against stub agents); the steps on a host
are in test_vm.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from kvmotion.center.postcopy import PostcopyRepair
from kvmotion.errors import KvmotionError
from kvmotion.host.migrationview import MigrationView


# -- the center's repair -------------------------------------------------------------------------
class StubAgent:
    def __init__(self, name: str, calls: list[tuple[str, str, str | None]], down: bool) -> None:
        self.name, self.calls, self.down = name, calls, down

    async def postcopy_step(self, vm: str, step: str, uri: str | None = None) -> Any:
        if self.down:
            raise KvmotionError("no route", code="host_unreachable")
        self.calls.append((self.name, step, uri))
        uri = "tcp:10.99.0.173:49153" if step == "recover" else None
        return SimpleNamespace(uri=uri)  # a PostcopyStep, as far as the repair reads it


def stub_run(*, down: bool = False, recovery_s: float = 600.0) -> Any:
    calls: list[tuple[str, str, str | None]] = []

    @contextlib.asynccontextmanager
    async def agent(host: Any) -> AsyncIterator[StubAgent]:
        yield StubAgent(host.name, calls, down and host.name == "dst")

    ex = SimpleNamespace(
        inventory=SimpleNamespace(agent=agent), stall_timeout_s=20.0, postcopy_recovery_s=recovery_s
    )
    return SimpleNamespace(
        ex=ex, source=SimpleNamespace(name="src"), dest=SimpleNamespace(name="dst"),
        vm=SimpleNamespace(name="vm-a"), log=logging.getLogger("test"), calls=calls,
    )  # fmt: skip


def dest_info(phase: str, resumed: float | None = None) -> Any:
    marks = {"resumed": resumed} if resumed else {}
    return SimpleNamespace(migration=MigrationView(side="destination", phase=phase, marks=marks))


async def test_the_center_breaks_a_stalled_stream_then_mends_it_when_the_link_returns() -> None:
    run = stub_run()
    marks: list[tuple[str, float | None]] = []
    repair = PostcopyRepair(run, lambda step, when: marks.append((step, when)))
    repair.acted_at -= 60  # the post-copy began a minute ago
    await repair.look("postcopy-active", 1.0, dest_info("postcopy-active", resumed=12.5))
    assert run.calls == [] and ("resumed", 12.5) in marks  # moving: nothing to do
    await repair.look("postcopy-active", 5.0, dest_info("postcopy-active"))
    assert run.calls == [("src", "pause", None), ("dst", "pause", None)]
    run.calls.clear()
    await repair.look("postcopy-paused", 6.0, dest_info("postcopy-paused"))
    # The destination listens again, then the source resumes to where it listens.
    assert run.calls == [("dst", "recover", None), ("src", "resume", "tcp:10.99.0.173:49153")]
    # Resumed: no byte has moved yet, but the stream is judged over the time since the resume.
    await repair.look("postcopy-active", 9.0, dest_info("postcopy-active"))
    assert len(run.calls) == 2  # not broken again
    assert repair.summary() == {"postcopy_breaks": 1, "postcopy_recoveries": 1}
    assert [m for m, _ in marks].count("postcopy_paused") == 1
    assert ("postcopy_recovered", None) in marks


async def test_recovery_is_retried_while_the_destination_is_unreachable_then_given_up() -> None:
    run = stub_run(down=True, recovery_s=0.2)
    repair = PostcopyRepair(run, lambda step, when: None)
    await repair.look("postcopy-paused", 0.0, dest_info("postcopy-paused"))
    assert repair.last_error == "no route" and run.calls == []
    await asyncio.sleep(0.25)
    with pytest.raises(KvmotionError) as info:
        await repair.look("postcopy-paused", 0.0, dest_info("postcopy-paused"))
    assert info.value.code == "postcopy_lost" and "no route" in info.value.message
    assert time.monotonic() - (repair.broken_at or 0) > 0.2


@pytest.mark.parametrize(
    ("code", "lost"), [("postcopy_lost", True), ("destination_failed", True), (None, False)]
)
async def test_a_run_that_fails_in_post_copy_undoes_nothing(
    code: str | None, lost: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost: the source's stale copy is ended and the user told to power the VM off and on.
    Otherwise (the center stopping) both QEMUs are left to finish alone. The VM is recorded on
    the destination either way, and nothing is resumed on the source."""
    run = stub_run()
    done: list[Any] = []

    async def finish_source() -> list[str]:
        done.append("finish_source")
        return []

    async def set_vm(uuid: str, **fields: Any) -> None:
        done.append(("set_vm", fields))

    async def enter(phase: Any, **fields: Any) -> None:
        done.append(("enter", phase, fields))

    events: list[tuple[str, str]] = []

    async def record_event(db: Any, message: str, *, severity: str, **_: Any) -> None:
        events.append((severity, message))

    monkeypatch.setattr("kvmotion.center.postcopy.record_event", record_event)
    run.finish_source, run.enter = finish_source, enter
    run.ex.inventory.set_vm, run.ex.db = set_vm, None
    run.vm.uuid, run.dest.id, run.task_id = "u-1", 7, 1
    await PostcopyRepair(run, lambda step, when: None).give_up("the link stayed down", code)
    assert ("finish_source" in done) == lost
    assert ("set_vm", {"host_id": 7}) in done
    _, phase, fields = done[-1]
    assert phase.value == "done" and fields["state"].value == "error"
    assert ("is lost" in fields["error"]) == lost
    assert ("Power it off and on" in fields["error"]) == lost
    assert "the link stayed down" in fields["error"]
    assert events[0][0] == ("alarm" if lost else "warning")
    assert run.calls == []  # no post-copy step asked of anyone
