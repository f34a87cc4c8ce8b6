"""The center's inventory schema (SQLAlchemy 2, async): SQLite (aiosqlite) for one center,
PostgreSQL (asyncpg) for centers that fail over (docs/center-ha.md). Alembic migrations
(center/migrations/) make and upgrade the schema; the center runs them at start.

Datacenter → cluster → hosts; datastores and networks seen by hosts; VMs on hosts; tasks and
events. JSON columns hold what agents report (host facts, VM config) and what tasks record
(timeline, per-pass samples, summary): documents read whole, never queried inside.
"""

from __future__ import annotations

import asyncio
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    event,
    inspect,
    text,
)
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
    relationship,
)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A UTC timestamp that comes back aware from every database (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Datacenter(Base):
    __tablename__ = "datacenters"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)


class Cluster(Base):
    __tablename__ = "clusters"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    datacenter_id: Mapped[int] = mapped_column(ForeignKey("datacenters.id"))
    evc_mode: Mapped[str | None] = mapped_column(String(80), default=None)
    # Balancing (center/balancing.py); None: the default
    drs_mode: Mapped[str | None] = mapped_column(String(20), default=None)  # off/manual/automatic
    drs_threshold: Mapped[int | None] = mapped_column(Integer, default=None)  # 1-5
    drs_window_s: Mapped[float | None] = mapped_column(Float, default=None)
    drs_hold_s: Mapped[float | None] = mapped_column(Float, default=None)
    # HA (center/ha.py); None: the default
    ha_enabled: Mapped[bool | None] = mapped_column(Boolean, default=None)
    ha_failure_s: Mapped[float | None] = mapped_column(Float, default=None)
    ha_isolation_response: Mapped[str | None] = mapped_column(String(20), default=None)
    ha_failures: Mapped[int | None] = mapped_column(Integer, default=None)  # to tolerate


class HostDatastore(Base):
    __tablename__ = "host_datastores"
    host_id: Mapped[int] = mapped_column(
        ForeignKey("hosts.id", ondelete="CASCADE"), primary_key=True
    )
    datastore_id: Mapped[int] = mapped_column(
        ForeignKey("datastores.id", ondelete="CASCADE"), primary_key=True
    )


class Host(Base):
    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    url: Mapped[str] = mapped_column(String(255))
    token: Mapped[str] = mapped_column(String(255))
    cluster_id: Mapped[int | None] = mapped_column(ForeignKey("clusters.id"), default=None)
    connection: Mapped[str] = mapped_column(String(20), default="connected")
    facts: Mapped[dict[str, Any]] = mapped_column(default=dict)
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    # Maintenance mode (center/maintenance.py): None, "entering" or "in"
    maintenance: Mapped[str | None] = mapped_column(String(20), default=None)
    # Loaded only when asked for (selectinload): every VM loads its host, and hosts are read
    # per API call; a fleet's hosts' datastores would be read with each.
    datastores: Mapped[list[Datastore]] = relationship(secondary="host_datastores", lazy="raise")


class Datastore(Base):
    __tablename__ = "datastores"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    shared: Mapped[bool] = mapped_column(Boolean, default=False)
    capacity_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    free_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # Read-only and never loaded with a datastore (hosts load their datastores; loading back
    # from here would recurse through the whole graph on every query).
    hosts: Mapped[list[Host]] = relationship(
        secondary="host_datastores", viewonly=True, lazy="raise"
    )


class Network(Base):
    __tablename__ = "networks"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)


class Vm(Base):
    __tablename__ = "vms"
    id: Mapped[int] = mapped_column(primary_key=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"), default=None)
    power_state: Mapped[str] = mapped_column(String(20), default="poweredOff")
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config_path: Mapped[str] = mapped_column(Text, default="")
    # The CPU it runs with (from its host: -cpu argument, EVC mode, features), while it runs.
    cpu: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    evc_mode: Mapped[str | None] = mapped_column(String(40), default=None)  # per-VM EVC
    # KiB of RAM pad it runs with (qemu.cmdline.ram_pad_kib), while it runs; None: not known
    ram_pad_kib: Mapped[int | None] = mapped_column(default=None)
    # Its IP addresses as its host last saw them (guest agent or DHCP leases), while it runs
    addresses: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    addresses_source: Mapped[str | None] = mapped_column(String(20), default=None)
    ha_priority: Mapped[str | None] = mapped_column(String(10), default=None)  # None: medium
    host: Mapped[Host | None] = relationship(lazy="selectin")


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(40))
    target: Mapped[str] = mapped_column(String(80))
    state: Mapped[str] = mapped_column(String(20), default="queued")
    phase: Mapped[str] = mapped_column(String(40), default="")
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    timeline: Mapped[list[Any]] = mapped_column(default=list)
    samples: Mapped[list[Any]] = mapped_column(default=list)
    summary: Mapped[dict[str, Any]] = mapped_column(default=dict)
    warnings: Mapped[list[Any]] = mapped_column(default=list)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    error_code: Mapped[str | None] = mapped_column(String(80), default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)


class PlacementRule(Base):
    """A DRS-style rule (migration/rules.py): VMs together, apart, or on some hosts."""

    __tablename__ = "rules"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    kind: Mapped[str] = mapped_column(String(20))
    vms: Mapped[list[str]] = mapped_column(JSON, default=list)
    hosts: Mapped[list[str]] = mapped_column(JSON, default=list)
    must: Mapped[bool] = mapped_column(Boolean, default=True)


class Event(Base):
    __tablename__ = "events"
    id: Mapped[int] = mapped_column(primary_key=True)
    time: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    severity: Mapped[str] = mapped_column(String(10), default="info")  # info, warning, alarm
    message: Mapped[str] = mapped_column(Text)
    vm: Mapped[str | None] = mapped_column(String(80), default=None)
    host: Mapped[str | None] = mapped_column(String(255), default=None)
    task_id: Mapped[int | None] = mapped_column(Integer, default=None)


class CenterNode(Base):
    """A center process on this database (center/leader.py): the active one and its standbys,
    each as it last said; the standbys send clients to the active one's URL."""

    __tablename__ = "centers"
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    url: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20), default="standby")  # active, standby, stopped
    started_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    active_since: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema as kvmotion made it before migrations (create_all + new columns)
_MIGRATING: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)
MIGRATION_LOCK = 0x6B766D6F  # "kvmo": one center at a time upgrades a shared PostgreSQL


class Changes:
    """Records of one table written since their reader last took the changes: ids, or all."""

    def __init__(self) -> None:
        self.everything = True  # nothing read yet
        self.ids: set[int] = set()

    def add(self, ids: set[int | None]) -> None:
        if None in ids:
            self.everything = True
        self.ids |= {i for i in ids if i is not None}

    def pending(self) -> bool:
        """Was any record written since the changes were last taken?"""
        return self.everything or bool(self.ids)

    def take(self) -> tuple[bool, set[int]]:
        """(everything changed, else the ids that did), and forget them."""
        taken = self.everything, self.ids
        self.everything, self.ids = False, set()
        return taken


WATCHED = (Vm, Host, Datastore)  # the tables whose readers may keep records (watch)
WRITTEN = "kvmotion_written"  # session.info: {table: ids written} until its commit (None: all)


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        options: dict[str, Any] = {}
        if url.startswith("postgresql"):
            # pre_ping: a center that outlives a PostgreSQL failover or restart reconnects
            options = {"pool_size": 10, "max_overflow": 10, "pool_pre_ping": True}
        self.engine: AsyncEngine = create_async_engine(url, **options)
        if url.startswith("sqlite"):
            # Tasks are written at each phase change of a migration: WAL with NORMAL sync keeps
            # each commit cheap and stays crash-safe (a power cut may lose the last ones).
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)

        class _Session(Session):  # this database's own, for its change listeners alone
            pass

        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False, sync_session_class=_Session
        )
        # Who keeps records of a watched table, and must know which this process writes
        self._watchers: dict[type[Base], weakref.WeakSet[Changes]] = {
            t: weakref.WeakSet() for t in WATCHED
        }
        event.listen(_Session, "after_flush", self._flushed)
        event.listen(_Session, "do_orm_execute", self._executed)
        event.listen(_Session, "after_commit", self._ended)
        event.listen(_Session, "after_rollback", self._ended)

    @staticmethod
    def _flushed(session: Session, _context: Any) -> None:
        """Note, in the session, the records a flush wrote (told at its commit: a reader
        between the flush and the commit would still find the old records)."""
        written: dict[type[Base], set[int | None]] = session.info.setdefault(WRITTEN, {})
        for o in (*session.new, *session.dirty, *session.deleted):
            if isinstance(o, WATCHED):
                written.setdefault(type(o), set()).add(o.id)
            if isinstance(o, Host) and (
                o in session.deleted or inspect(o).attrs.name.history.has_changes()
            ):
                written.setdefault(Vm, set()).add(None)  # a VM's record names its host

    @staticmethod
    def _executed(state: ORMExecuteState) -> None:
        if state.is_update or state.is_delete:  # rows unknown: all of the table
            written = state.session.info.setdefault(WRITTEN, {})
            for table in {m.class_ for m in state.all_mappers} & set(WATCHED):
                written.setdefault(table, set()).add(None)
                if table is Host:
                    written.setdefault(Vm, set()).add(None)

    def _ended(self, session: Session) -> None:
        """At a commit, or a rollback (a flushed change may be in either: to read again is
        harmless), the records the session wrote are changed for their readers."""
        for table, ids in session.info.pop(WRITTEN, {}).items():
            for watcher in self._watchers[table]:
                watcher.add(ids)

    def watch(self, table: type[Base]) -> Changes:
        """The records of ``table`` (one of ``WATCHED``) this process writes from now on, for
        a reader that keeps them (center/inventory.py Kept); each watcher takes its own."""
        changes = Changes()
        self._watchers[table].add(changes)
        return changes

    async def migrate(self) -> None:
        """Make the schema, or upgrade it to this kvmotion's (Alembic, center/migrations/).
        Alembic keeps its running migration in module globals: one at a time per process (and
        per database, by a lock in PostgreSQL, across centers)."""
        loop = asyncio.get_running_loop()
        async with _MIGRATING.setdefault(loop, asyncio.Lock()), self.engine.begin() as conn:
            await conn.run_sync(_migrate)

    async def revision(self) -> str | None:
        """The schema revision the database is at (None: no schema yet)."""
        async with self.engine.connect() as conn:
            return await conn.run_sync(_current_revision)

    async def close(self) -> None:
        await self.engine.dispose()


def _alembic(conn: Connection | None = None) -> AlembicConfig:
    """Alembic's settings: our migrations, run on the center's own connection (env.py)."""
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(_alembic()).get_current_head()
    assert head is not None
    return head


def _current_revision(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


def _migrate(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # Centers that start together on one database: the first upgrades, the others wait
        # and then find nothing to do. Released with the transaction.
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
    elif conn.dialect.name == "sqlite":
        conn.exec_driver_sql("BEGIN IMMEDIATE")  # the write lock now, not at the first write
    config = _alembic(conn)
    tables = set(inspect(conn).get_table_names())
    if "alembic_version" not in tables and "tasks" in tables:
        # A database an older kvmotion made without migrations: bring it to the baseline the
        # way that kvmotion did (new nullable columns), then record it as the baseline.
        _add_new_columns(conn)
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")


def _add_new_columns(conn: Connection) -> None:
    have = inspect(conn)
    tables = set(have.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in tables:
            continue  # a table a later revision makes
        present = {c["name"] for c in have.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present and column.nullable:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
