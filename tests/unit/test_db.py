"""The center's database, on SQLite and on PostgreSQL: Alembic's migrations make exactly the
schema the models describe, upgrade a database an older kvmotion made, and let centers that start
together on one database upgrade it once."""

from __future__ import annotations

import asyncio
import sys

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from kvmotion.center.db import BASELINE, Base, Database, Vm, head_revision


def _differences(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), Base.metadata))


async def test_migrations_make_the_schema_the_models_describe(db_url: str) -> None:
    db = Database(db_url)
    assert await db.revision() is None
    await db.migrate()
    assert await db.revision() == head_revision()
    async with db.engine.connect() as conn:
        # a model changed without a migration (or the reverse) shows here
        assert await conn.run_sync(_differences) == []
    await db.migrate()  # a second start changes nothing
    assert await db.revision() == head_revision()
    await db.close()


async def test_a_database_an_older_kvmotion_made_is_upgraded_in_place(db_url: str) -> None:
    db = Database(db_url)
    async with db.engine.begin() as conn:  # as kvmotion made it before migrations (create_all)
        # the tables of then: the centers table came with revision 0002
        then = [t for t in Base.metadata.sorted_tables if t.name != "centers"]
        await conn.run_sync(lambda sync: Base.metadata.create_all(sync, tables=then))
        await conn.execute(text("ALTER TABLE vms DROP COLUMN ram_pad_kib"))  # before RAM pads
        await conn.execute(
            text("INSERT INTO vms (uuid, name, power_state, config, config_path) "
                 "VALUES ('u-1', 'vm-old', 'poweredOn', '{}', '/x/vm.json')")
        )  # fmt: skip
    assert await db.revision() is None
    await db.migrate()
    assert await db.revision() == head_revision() != BASELINE
    async with db.session() as s:
        vm = await s.get(Vm, 1)
        assert vm is not None and (vm.name, vm.ram_pad_kib) == ("vm-old", None)
        vm.ram_pad_kib = 8
        await s.commit()
    await db.migrate()  # a second start changes nothing
    async with db.session() as s:
        assert (await s.get(Vm, 1)).ram_pad_kib == 8  # type: ignore[union-attr]
    async with db.engine.connect() as conn:
        assert await conn.run_sync(_differences) == []
    await db.close()


MIGRATE = (
    "import asyncio, sys; from kvmotion.center.db import Database; "
    "asyncio.run(Database(sys.argv[1]).migrate())"
)


async def test_centers_that_start_together_upgrade_the_database_once(db_url: str) -> None:
    """Three centers (processes) start at once on one new database: each finds it at the newest
    schema, made once (PostgreSQL: an advisory lock; SQLite: its write lock)."""
    centers = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", MIGRATE, db_url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    for center in centers:
        _, err = await asyncio.wait_for(center.communicate(), 60)
        assert center.returncode == 0, err.decode()[-2000:]
    db = Database(db_url)
    assert await db.revision() == head_revision()
    async with db.engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        assert await conn.run_sync(_differences) == []
    assert [v for (v,) in versions] == [head_revision()]
    await db.close()
