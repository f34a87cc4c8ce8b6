"""Write the next schema revision from the models (a developer's tool):

    python -m kvmotion.center.migrations "what changed"

It upgrades a scratch SQLite database to the current head, compares it with the models in
kvmotion/center/db.py (Alembic's autogenerate), and writes versions/NNNN_what_changed.py. Read it
before committing: autogenerate misses renames and server defaults.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from pathlib import Path

from alembic import command

from kvmotion.center.db import MIGRATIONS, Database, _alembic, head_revision


async def _new_revision(message: str) -> None:
    with tempfile.TemporaryDirectory(prefix="kvmotion-revision-") as scratch:
        db = Database(f"sqlite+aiosqlite:///{Path(scratch) / 'head.db'}")
        try:
            await db.migrate()
            number = f"{int(head_revision()) + 1:04d}"

            def write(conn: object) -> None:
                config = _alembic(conn)  # type: ignore[arg-type]
                script = command.revision(
                    config, message, autogenerate=True, rev_id=number,
                    version_path=str(MIGRATIONS / "versions"),
                )  # fmt: skip
                print(f"wrote {getattr(script, 'path', number)}")

            async with db.engine.begin() as conn:
                await conn.run_sync(write)
        finally:
            await db.close()


def main() -> None:
    if len(sys.argv) != 2 or not sys.argv[1].strip():
        sys.exit('usage: python -m kvmotion.center.migrations "what changed"')
    asyncio.run(_new_revision(sys.argv[1]))


if __name__ == "__main__":
    main()
