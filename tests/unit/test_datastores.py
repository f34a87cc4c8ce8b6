"""A datastore that hangs (a dead NFS server) never blocks the agent's event loop."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kvmotion.host.config import DatastoreConfig
from kvmotion.host.datastores import Datastores


async def test_a_hung_statvfs_is_inaccessible_and_not_queued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "nfs").mkdir()
    (tmp_path / "local").mkdir()
    stores = Datastores([
        DatastoreConfig(name="nfs", path=tmp_path / "nfs", shared=True),
        DatastoreConfig(name="local", path=tmp_path / "local", shared=False),
    ])  # fmt: skip
    server_back = threading.Event()
    calls: list[str] = []
    real_statvfs = os.statvfs

    def statvfs(path: Any) -> os.statvfs_result:
        calls.append(Path(path).name)
        if Path(path).name == "nfs":
            server_back.wait(10)  # the mount hangs until its server is back
        return real_statvfs(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    try:
        ticks = 0

        async def loop_runs() -> None:  # the event loop keeps turning meanwhile
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(loop_runs())
        started = time.monotonic()
        nfs, local = await asyncio.gather(
            stores.info("nfs", timeout=0.3), stores.info("local", timeout=0.3)
        )
        assert time.monotonic() - started < 2.0
        assert not nfs.accessible and nfs.capacity_bytes == 0
        assert local.accessible and local.capacity_bytes > 0
        assert ticks >= 10  # the loop was never blocked

        again = await stores.info("nfs", timeout=0.3)  # its probe still hangs: not queued again
        assert not again.accessible and calls.count("nfs") == 1
        ticker.cancel()
    finally:
        server_back.set()
    await asyncio.sleep(0.05)
    back = await stores.info("nfs")
    assert back.accessible and calls.count("nfs") == 2
