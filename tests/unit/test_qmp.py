"""kvmotion/qemu/qmp.py against the fake QEMU: a plain QmpSession connects, runs commands, gets
events, and QMP's errors come back as QemuError (which also proves the fake speaks QMP)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmotion.errors import QemuError
from kvmotion.qemu.qmp import QmpSession, VmStatus
from tests.unit.fake_qmp import FakeQemu, failing


async def test_a_plain_session_queries_and_hears_events(tmp_path: Path) -> None:
    async with FakeQemu(tmp_path / "qmp.sock", status="paused") as qemu:
        qmp = QmpSession(qemu.socket_path, "vm-a")
        await qmp.connect(timeout=2)
        try:
            assert await qmp.query_status() == VmStatus("paused", running=False)
            events = qmp.listener(["MIGRATION"])
            qemu.set_migration("active")
            event = await asyncio.wait_for(events.get(), 2)
            qmp.remove_listener(events)
            assert event["data"] == {"status": "active"}
            assert await qmp.execute("query-migrate") == {"status": "active"}
        finally:
            await qmp.close()
    assert qemu.commands == ["qmp_capabilities", "query-status", "query-migrate"]


async def test_qemu_errors_become_qemu_error(tmp_path: Path) -> None:
    async with FakeQemu(tmp_path / "qmp.sock") as qemu:
        qemu.reply("migrate", failing("no route to host"))
        qmp = QmpSession(qemu.socket_path, "vm-a")
        await qmp.connect(timeout=2)
        try:
            with pytest.raises(QemuError, match="QMP migrate failed: no route to host"):
                await qmp.execute("migrate", {"uri": "tcp:10.0.0.2:4444"})
            with pytest.raises(QemuError, match="has not been found"):
                await qmp.execute("no-such-command")
            await qmp.execute("quit")
            with pytest.raises(QemuError):  # QEMU is gone
                await qmp.execute("query-status", timeout=1)
        finally:
            await qmp.close()
    assert qemu.process.alive() is False


async def test_connect_to_nothing_is_a_qemu_error(tmp_path: Path) -> None:
    qmp = QmpSession(tmp_path / "absent.sock", "vm-a")
    with pytest.raises(QemuError, match="did not answer"):
        await qmp.connect(timeout=0.2)
