"""Which of the centers that share one database is the active one (docs/center-ha.md).

Several centers on one PostgreSQL: one is active (it refreshes hosts, runs migrations, HA and
balancing, and answers the API), the others are standbys that answer ``/v1/health`` and send every
other request to the active one. Leadership is a PostgreSQL session-level advisory lock, held on a
connection of the active center's own: a center that dies (its process, its machine, or its link to
the database) loses its session, so the lock is free for a standby, which takes it at its next try
(every :data:`CHECK_S`).

Two rules keep two centers from acting at once:

- The active center checks its hold every :data:`CHECK_S`; if the check fails or takes longer than
  :data:`CHECK_TIMEOUT_S` (the database is gone, or the session was ended), it has lost the lock and
  stops acting at once (``kvmotion center serve`` exits, and its service manager restarts it as a
  standby).
- PostgreSQL ends a silent center's session only after its TCP keepalives go unanswered
  (:data:`KEEPALIVES`: about 5 s), longer than the active center takes to notice it lost its
  database (:data:`CHECK_TIMEOUT_S` + :data:`CHECK_S`). A process that is killed closes its socket,
  and the lock is free at once.

On SQLite (one machine, one database file) the same holds with an ``flock`` of a file beside the
database: a second center on that file waits as a standby, and takes over when the first one's
process ends. An in-memory database has no one to share with: its center is active.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, Protocol

import asyncpg
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

LEADER_LOCK = 0x6B766D61  # "kvma", beside db.MIGRATION_LOCK ("kvmo")
CHECK_S = 1.0
CHECK_TIMEOUT_S = 2.0
# The server's keepalives on the lock's connection: idle 2 s, then 3 probes 1 s apart.
KEEPALIVES = {"tcp_keepalives_idle": "2", "tcp_keepalives_interval": "1",
              "tcp_keepalives_count": "3"}  # fmt: skip

Role = Literal["starting", "standby", "activating", "active", "lost", "stopped"]


class Lock(Protocol):
    """The one thing only the active center holds."""

    async def try_acquire(self) -> bool: ...

    async def held(self) -> bool: ...

    async def release(self) -> None: ...


# What a lost, refused or silent database connection raises.
UNREACHABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


class PostgresLock:
    """A session-level advisory lock on a connection of its own (not the pool's: a pooled
    connection would carry the lock to whichever request used it next)."""

    def __init__(self, db_url: str) -> None:
        url = make_url(db_url).set(drivername="postgresql")
        self.dsn = url.render_as_string(hide_password=False)
        self._conn: asyncpg.Connection | None = None

    async def try_acquire(self) -> bool:
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(
                    self.dsn, timeout=CHECK_TIMEOUT_S, server_settings=KEEPALIVES
                )
            got = await self._conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", LEADER_LOCK, timeout=CHECK_TIMEOUT_S
            )
        except UNREACHABLE as exc:
            log.warning("cannot reach the database to take leadership: %s", exc)
            await self._drop()
            return False
        return bool(got)

    async def held(self) -> bool:
        if self._conn is None or self._conn.is_closed():
            return False
        try:
            count = await self._conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND pid = pg_backend_pid() AND objid = $1",
                LEADER_LOCK,
                timeout=CHECK_TIMEOUT_S,
            )
        except UNREACHABLE as exc:
            log.error("lost the database connection that holds leadership: %s", exc)
            await self._drop()
            return False
        return bool(count)

    async def release(self) -> None:
        await self._drop()  # the session's end frees the lock

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), CHECK_TIMEOUT_S)
            if not conn.is_closed():
                conn.terminate()


class FileLock:
    """``flock`` of a file: held while this process keeps it open (SQLite's one machine)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    async def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def held(self) -> bool:
        return self._fd is not None

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the file releases the lock


class AlwaysHeld:
    """An in-memory database: nobody else can share it."""

    async def try_acquire(self) -> bool:
        return True

    async def held(self) -> bool:
        return True

    async def release(self) -> None:
        pass


def lock_for(db_url: str) -> Lock:
    url = make_url(db_url)
    if url.get_backend_name() == "postgresql":
        return PostgresLock(db_url)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        return FileLock(Path(f"{url.database}.leader"))
    return AlwaysHeld()


class Leadership:
    """Campaigns for the lock, and says when this center becomes active or loses it.

    ``activate`` runs once, when the lock is taken; ``lost`` once, if it is lost afterwards (the
    center must stop acting then: it is no longer the only one)."""

    def __init__(
        self,
        lock: Lock,
        activate: Callable[[], Awaitable[None]],
        lost: Callable[[], Awaitable[None]],
        check_s: float = CHECK_S,
    ) -> None:
        self.lock = lock
        self._activate = activate
        self._lost = lost
        self.check_s = check_s
        self.role: Role = "starting"
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """One try now (a lone center is active when this returns), then the loop."""
        if await self.lock.try_acquire():
            await self._become_active()
        else:
            self.role = "standby"
            log.info("another center is active: this one is a standby")
        self._loop = asyncio.create_task(self._campaign(), name="leadership")

    async def _become_active(self) -> None:
        self.role = "activating"  # holding the lock, not yet answering
        try:
            await self._activate()
        except BaseException:  # half-active is worse than standby: let another one try
            self.role = "standby"
            await self.lock.release()
            raise
        self.role = "active"
        log.info("this center is the active one")

    async def _campaign(self) -> None:
        while self.role in ("standby", "active"):
            await asyncio.sleep(self.check_s)
            try:
                if self.role == "active":
                    if not await self.lock.held():
                        self.role = "lost"
                        log.error("this center lost leadership: it stops acting now")
                        await self._lost()
                elif await self.lock.try_acquire():
                    await self._become_active()
            except Exception:  # the loop is the center's only way to take over: it goes on
                log.exception("leadership check failed; trying again")

    async def close(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        self.role = "stopped"
        await self.lock.release()
