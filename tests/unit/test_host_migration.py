"""kvmotion/host/migration.py against the fake QEMU (fake_qmp.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from kvmotion.host.migration import Outgoing
from kvmotion.qemu.qmp import QmpSession
from tests.unit.fake_qmp import FakeQemu


async def test_a_cancelled_watcher_stops(tmp_path: Path) -> None:
    """Cancelled while a MIGRATION event is queued, the watcher stops (Python 3.11's wait_for
    returned the ready event and dropped the cancel: it polled on until the migration ended)."""
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
