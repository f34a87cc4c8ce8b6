"""Fault injection holds (kvmotion/faults.py): off by default, one shot when armed, bounded."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from kvmotion import faults


async def test_no_hold_without_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(faults.DIR_ENV, raising=False)
    faults.arm(tmp_path, "resume", 5)
    started = time.monotonic()
    await faults.hold("resume")
    assert time.monotonic() - started < 0.1


async def test_an_armed_hold_waits_once_and_shows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(faults.DIR_ENV, str(tmp_path))
    faults.arm(tmp_path, "prepare", 0.3)
    task = asyncio.create_task(faults.hold("prepare"))
    await asyncio.sleep(0.1)
    assert faults.holding(tmp_path, "prepare")
    await task
    assert not faults.holding(tmp_path, "prepare")
    started = time.monotonic()
    await faults.hold("prepare")  # one shot: not armed any more
    assert time.monotonic() - started < 0.1


def test_arm_refuses_unknown_steps_and_long_holds(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        faults.arm(tmp_path, "everywhere", 1)
    with pytest.raises(ValueError):
        faults.arm(tmp_path, "resume", faults.MAX_HOLD_S + 1)
