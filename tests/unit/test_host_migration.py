"""kvmotion/host/migration.py against the fake QEMU (fake_qmp.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmotion.host.migration import Outgoing
from kvmotion.qemu.qmp import QmpSession
from tests.unit.fake_qmp import FakeQemu


@pytest.mark.xfail(
    strict=True,
    reason="Python 3.11's asyncio.wait_for returns a result that is ready when the cancel "
    "arrives and drops the cancel: the watcher polls on until the migration ends by itself",
)
async def test_a_cancelled_watcher_stops(tmp_path: Path) -> None:
    async with FakeQemu(tmp_path / "qmp.sock") as qemu:
        qmp = QmpSession(qemu.socket_path, "vm-a")
        await qmp.connect(timeout=2)
        outgoing = Outgoing(qmp, "vm-a")
        try:
            await outgoing.start("tcp:10.0.0.2:4444", 10**9, 300)
            await asyncio.sleep(0)  # the watcher waits on a MIGRATION event that is queued
            assert outgoing._task is not None
            outgoing._task.cancel()
            await asyncio.wait({outgoing._task}, timeout=0.3)
            assert outgoing._task.done()
        finally:
            qemu.set_migration("failed")  # a watcher that did not stop ends here
            await outgoing.close()
            await qmp.close()
