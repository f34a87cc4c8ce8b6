"""The center's database: a newer kvmotion opens an older center's database."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from kvmotion.center.db import Database, Vm


async def test_columns_a_newer_kvmotion_added_are_added_to_an_older_database(
    tmp_path: Path,
) -> None:
    path = tmp_path / "center.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.create_all()
    await db.close()
    with sqlite3.connect(path) as conn:  # the table as a center before RAM pads made it
        conn.execute("ALTER TABLE vms DROP COLUMN ram_pad_kib")
        conn.execute("INSERT INTO vms (uuid, name, power_state, config, config_path) "
                     "VALUES ('u-1', 'vm-old', 'poweredOn', '{}', '/x/vm.json')")  # fmt: skip
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.create_all()
    async with db.session() as s:
        vm = await s.get(Vm, 1)
        assert vm is not None and (vm.name, vm.ram_pad_kib) == ("vm-old", None)
        vm.ram_pad_kib = 8
        await s.commit()
    await db.create_all()  # a second start changes nothing
    async with db.session() as s:
        assert (await s.get(Vm, 1)).ram_pad_kib == 8  # type: ignore[union-attr]
    await db.close()
