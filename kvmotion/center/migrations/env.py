"""Alembic's environment for the center's schema (kvmotion/center/db.py).

The center runs the migrations itself at start (`Database.migrate`), on a connection it opened and
passes in as `config.attributes["connection"]`; nothing here opens a database of its own.
"""

from __future__ import annotations

from alembic import context

from kvmotion.center.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite alters a table by copying it; Alembic's batch mode does that
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
