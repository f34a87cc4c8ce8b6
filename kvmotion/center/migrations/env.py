"""Alembic's environment for the center's schema (kvmotion/center/db.py).

The center runs the migrations itself at start (`Database.migrate`), on a connection it opened and
passes in as `config.attributes["connection"]`; nothing here opens a database of its own.
"""

from __future__ import annotations

from typing import Any, Literal

from alembic import context
from alembic.autogenerate.api import AutogenContext

from kvmotion.center.db import Base, UtcDateTime


def render_item(kind: str, obj: Any, autogen: AutogenContext) -> str | Literal[False]:
    """Revisions name plain SQLAlchemy types: a UtcDateTime column is a zoned DateTime there
    (the zone handling is the model's, at run time), so a revision never imports kvmotion."""
    if kind == "type" and isinstance(obj, UtcDateTime):
        return "sa.DateTime(timezone=True)"
    return False


connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters a table by copying it; Alembic's batch mode does that
    compare_type=True,
    render_item=render_item,
)
with context.begin_transaction():
    context.run_migrations()
