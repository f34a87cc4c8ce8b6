"""The schema as kvmotion 0.1 made it before migrations (the baseline).

Revision ID: 0001
Revises: (none)
Create Date: 2026-12-05 02:33:21.260399
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "datacenters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "datastores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("shared", sa.Boolean(), nullable=False),
        sa.Column("capacity_bytes", sa.BigInteger(), nullable=False),
        sa.Column("free_bytes", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("severity", sa.String(length=10), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("vm", sa.String(length=80), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("task_id", sa.Integer(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "networks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "rules",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("vms", sa.JSON(), nullable=False),
        sa.Column("hosts", sa.JSON(), nullable=False),
        sa.Column("must", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("target", sa.String(length=80), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("phase", sa.String(length=40), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("request", sa.JSON(), nullable=False),
        sa.Column("timeline", sa.JSON(), nullable=False),
        sa.Column("samples", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("warnings", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("error_code", sa.String(length=80), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "clusters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("datacenter_id", sa.Integer(), nullable=False),
        sa.Column("evc_mode", sa.String(length=80), nullable=True),
        sa.Column("drs_mode", sa.String(length=20), nullable=True),
        sa.Column("drs_threshold", sa.Integer(), nullable=True),
        sa.Column("drs_window_s", sa.Float(), nullable=True),
        sa.Column("drs_hold_s", sa.Float(), nullable=True),
        sa.Column("ha_enabled", sa.Boolean(), nullable=True),
        sa.Column("ha_failure_s", sa.Float(), nullable=True),
        sa.Column("ha_isolation_response", sa.String(length=20), nullable=True),
        sa.Column("ha_failures", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["datacenter_id"],
            ["datacenters.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("url", sa.String(length=255), nullable=False),
        sa.Column("token", sa.String(length=255), nullable=False),
        sa.Column("cluster_id", sa.Integer(), nullable=True),
        sa.Column("connection", sa.String(length=20), nullable=False),
        sa.Column("facts", sa.JSON(), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("maintenance", sa.String(length=20), nullable=True),
        sa.ForeignKeyConstraint(
            ["cluster_id"],
            ["clusters.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "host_datastores",
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("datastore_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["datastore_id"], ["datastores.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["host_id"], ["hosts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("host_id", "datastore_id"),
    )
    op.create_table(
        "vms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("uuid", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=80), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=True),
        sa.Column("power_state", sa.String(length=20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("config_path", sa.Text(), nullable=False),
        sa.Column("cpu", sa.JSON(), nullable=True),
        sa.Column("evc_mode", sa.String(length=40), nullable=True),
        sa.Column("ram_pad_kib", sa.Integer(), nullable=True),
        sa.Column("addresses", sa.JSON(), nullable=True),
        sa.Column("addresses_source", sa.String(length=20), nullable=True),
        sa.Column("ha_priority", sa.String(length=10), nullable=True),
        sa.ForeignKeyConstraint(
            ["host_id"],
            ["hosts.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("uuid"),
    )


def downgrade() -> None:
    op.drop_table("vms")
    op.drop_table("host_datastores")
    op.drop_table("hosts")
    op.drop_table("clusters")
    op.drop_table("tasks")
    op.drop_table("rules")
    op.drop_table("networks")
    op.drop_table("events")
    op.drop_table("datastores")
    op.drop_table("datacenters")
