"""Datastores as a host sees them: named directories, capacity and free space, safe paths.

A path inside a datastore is always resolved here, and must stay inside the datastore's root:
names were validated already, this is the second lock on the door.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from kvmotion.errors import InvalidInput, NotFound
from kvmotion.host.config import DatastoreConfig


@dataclass(frozen=True)
class DatastoreInfo:
    name: str
    path: str
    shared: bool
    capacity_bytes: int
    free_bytes: int
    accessible: bool


T = TypeVar("T")

PROBE_TIMEOUT_S = 5.0  # a datastore whose statvfs takes longer is reported inaccessible


class Datastores:
    def __init__(self, configs: list[DatastoreConfig]) -> None:
        self._by_name = {ds.name: ds for ds in configs}
        # the last statvfs of each datastore, and when it began
        self._probes: dict[str, tuple[Future[os.statvfs_result], float]] = {}

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def get(self, name: str) -> DatastoreConfig:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise NotFound(
                f"datastore {name!r} is not mounted on this host (it has: {known})",
                code="datastore_not_found",
            ) from None

    def resolve(self, name: str, relative: str) -> Path:
        """The absolute path of ``relative`` inside datastore ``name``."""
        root = self.get(name).path.resolve()
        path = (root / relative).resolve()
        if path != root and root not in path.parents:
            raise InvalidInput(f"path {relative!r} leaves datastore {name!r}", code="invalid_path")
        return path

    async def info(self, name: str, timeout: float = PROBE_TIMEOUT_S) -> DatastoreInfo:
        """Capacity and free space, read in a thread of the datastores' own: a hung NFS mount
        never blocks the agent's event loop (which sends ``migrate-continue`` while a guest is
        stunned). A datastore that does not answer in ``timeout`` is inaccessible. A probe
        still running is shared: waited for (what is left of ``timeout``) if it is younger than
        ``timeout``, taken as hung if older, and never queued again while it hangs."""
        ds = self.get(name)
        inaccessible = DatastoreInfo(ds.name, str(ds.path), ds.shared, 0, 0, False)
        pending, began = self._probes.get(name, (None, 0.0))
        left = timeout
        if pending is not None and not pending.done():
            left = timeout - (time.monotonic() - began)
            if left <= 0:
                return inaccessible
        else:
            pending = _statvfs_in_thread(ds.path)
            self._probes[name] = (pending, time.monotonic())
        try:
            st = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(pending)), left)
        except (OSError, TimeoutError):
            return inaccessible
        return DatastoreInfo(
            ds.name, str(ds.path), ds.shared, st.f_blocks * st.f_frsize,
            st.f_bavail * st.f_frsize, True,
        )  # fmt: skip

    async def all_info(self) -> list[DatastoreInfo]:
        return list(await asyncio.gather(*(self.info(name) for name in self.names())))


def _statvfs_in_thread(path: Path) -> Future[os.statvfs_result]:
    return in_daemon_thread(lambda: os.statvfs(path), f"statvfs {path}")


def in_daemon_thread(work: Callable[[], T], name: str) -> Future[T]:
    """``work()`` in a daemon thread of its own: one that never returns (a hung mount) must not
    hold the agent's exit, as a worker of a thread pool would. Its OSError is the future's."""
    result: Future[T] = Future()

    def run() -> None:
        try:
            result.set_result(work())
        except OSError as exc:
            result.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return result
