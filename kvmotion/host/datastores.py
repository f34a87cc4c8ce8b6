"""Datastores as a host sees them: named directories, capacity and free space, safe paths.

A path inside a datastore is always resolved here, and must stay inside the datastore's root:
names were validated already, this is the second lock on the door.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


class Datastores:
    def __init__(self, configs: list[DatastoreConfig]) -> None:
        self._by_name = {ds.name: ds for ds in configs}

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

    def info(self, name: str) -> DatastoreInfo:
        ds = self.get(name)
        try:
            st = os.statvfs(ds.path)
            return DatastoreInfo(
                ds.name, str(ds.path), ds.shared, st.f_blocks * st.f_frsize,
                st.f_bavail * st.f_frsize, True,
            )  # fmt: skip
        except OSError:
            return DatastoreInfo(ds.name, str(ds.path), ds.shared, 0, 0, False)

    def all_info(self) -> list[DatastoreInfo]:
        return [self.info(name) for name in self.names()]
