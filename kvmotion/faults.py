"""Fault injection, for the fault matrix (tests/lab/test_faults.py): hold a process at a named
step of a migration for a few seconds, so that a test can kill something exactly there.

Off unless the environment says ``KVMOTION_FAULT_DIR=DIR`` when the agent or center starts;
nothing in a normal install sets it. Then a file ``DIR/arm-STEP`` holding a number of seconds arms
one hold: the next process to reach STEP removes it, keeps a marker ``DIR/hold-STEP`` while it
waits (the test waits for that marker), and logs a warning, so a held migration is never a
mystery. The steps:

- ``prepare``: the destination agent, its QEMU started and listening, before it answers;
- ``pre-switchover``: the source agent, the guest stunned, before ``migrate-continue``;
- ``resume``: the destination agent, the stream complete, before ``cont``;
- ``finalize``: the center, the guest running on the destination, before it records that.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

DIR_ENV = "KVMOTION_FAULT_DIR"
STEPS = ("prepare", "pre-switchover", "resume", "finalize")
MAX_HOLD_S = 30.0

log = logging.getLogger(__name__)


def arm(directory: Path, step: str, seconds: float) -> None:
    """Arm one hold at ``step`` (for the process that reaches it next)."""
    if step not in STEPS or not 0 < seconds <= MAX_HOLD_S:
        raise ValueError(f"cannot hold at {step!r} for {seconds} s")
    (directory / f"arm-{step}").write_text(f"{seconds}\n")


def holding(directory: Path, step: str) -> bool:
    return (directory / f"hold-{step}").exists()


async def hold(step: str) -> None:
    """Wait here if a hold at ``step`` is armed (else return at once)."""
    directory = os.environ.get(DIR_ENV)
    if not directory:
        return
    armed = Path(directory) / f"arm-{step}"
    try:
        seconds = min(MAX_HOLD_S, max(0.0, float(armed.read_text())))
        armed.unlink()
    except (OSError, ValueError):
        return
    marker = Path(directory) / f"hold-{step}"
    log.warning("fault injection: holding at %s for %.1f s", step, seconds)
    marker.touch()
    try:
        await asyncio.sleep(seconds)
    finally:
        marker.unlink(missing_ok=True)
