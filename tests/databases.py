"""The databases the center's tests run on: each center test runs once on SQLite and once on
PostgreSQL (issue 19), through the `database_server` fixture.

PostgreSQL is a throwaway server (kvmotion/lab/postgres.py) started once per session, listening
on a Unix socket only; each test gets a database of its own, made from a template in ~0.1 s and
dropped after. `KVMOTION_TEST_DATABASES=sqlite` (or `postgresql`) runs one kind only, for a quick
local run; CI runs both. A machine without PostgreSQL fails these tests, naming the fix, rather
than skipping them: `./run setup` installs it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Awaitable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.engine import make_url

from kvmotion.center.db import Database
from kvmotion.lab.postgres import Postgres

KINDS = [k for k in os.environ.get("KVMOTION_TEST_DATABASES", "sqlite,postgresql").split(",") if k]


def scratch_dir(prefix: str = "kvmotion-test-") -> Path:
    """A folder for SQLite files: memory-backed when the machine has it (fast)."""
    shm = Path("/dev/shm")
    where = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=where))


class DatabaseServer:
    """Where a test's center database lives: fresh ones, copies of a template, dropped after."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.postgres: Postgres | None = None
        self.folder = scratch_dir("kvmotion-dbs-")
        self._names = itertools.count()
        if kind == "postgresql":
            self.postgres = Postgres().start()
        elif kind != "sqlite":
            raise ValueError(f"unknown test database kind {kind!r}")

    def fresh(self, template: str | None = None) -> str:
        """The URL of a new database: empty, or holding what `template` (a URL this server gave)
        holds; the template must have no open connection."""
        name = f"t{next(self._names)}"
        if self.postgres is not None:
            copied = make_url(template).database if template else None
            return self.postgres.create_database(name, template=copied)
        folder = self.folder / name
        if template:
            shutil.copytree(Path(str(make_url(template).database)).parent, folder)
        else:
            folder.mkdir()
        return f"sqlite+aiosqlite:///{folder}/c.db"

    def drop(self, url: str) -> None:
        where = str(make_url(url).database)
        if self.postgres is not None:
            self.postgres.drop_database(where)
        else:
            shutil.rmtree(Path(where).parent, ignore_errors=True)

    def close(self) -> None:
        if self.postgres is not None:
            self.postgres.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session", params=KINDS)
def database_server(request: pytest.FixtureRequest) -> Iterator[DatabaseServer]:
    server = DatabaseServer(request.param)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def db_url(database_server: DatabaseServer) -> Iterator[str]:
    """A fresh, empty center database, on each kind of database in turn."""
    url = database_server.fresh()
    try:
        yield url
    finally:
        database_server.drop(url)


async def statements_during(db: Database, work: Awaitable[object]) -> list[str]:
    """The SQL statements ``db`` sent while ``work`` ran, as sent."""
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        statements.append(statement)

    engine = db.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        await work
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    return statements
