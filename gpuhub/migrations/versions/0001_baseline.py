"""gpuhub 0.1.0: leases, runtime environments, group quotas, actions and the GPU queue.

Written out here, not taken from the models, so that it stays the 0.1.0 schema whatever the models
become. A store made by gpuhub 0.1.0 (`create_all`, no version table) already has these tables:
each is created only where it is missing, and the store is then marked as at this revision.

Revision ID: 0001
Revises:
Created: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _missing(name: str) -> bool:
    return not sa.inspect(op.get_bind()).has_table(name)


def upgrade() -> None:
    if _missing("gpu_leases"):
        op.create_table(
            "gpu_leases",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("user", sa.String(length=255), nullable=False),
            sa.Column("server", sa.String(length=255), nullable=False),
            sa.Column("gpu_type", sa.String(length=255), nullable=False),
            sa.Column("device", sa.String(length=255), nullable=True),
            sa.Column("leased_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("device", name="uq_gpu_leases_device"),
        )
        op.create_index("ix_gpu_leases_user", "gpu_leases", ["user"])
    if _missing("catalog_environments"):
        op.create_table(
            "catalog_environments",
            sa.Column("id", sa.String(length=63), nullable=False),
            sa.Column("data", sa.Text(), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_by", sa.String(length=255), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        )
    if _missing("group_quotas"):
        op.create_table(
            "group_quotas",
            sa.Column("group", sa.String(length=255), nullable=False),
            sa.Column("max_gpus", sa.String(length=32), nullable=True),
            sa.Column("max_servers", sa.String(length=32), nullable=True),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_by", sa.String(length=255), nullable=False),
            sa.PrimaryKeyConstraint("group"),
        )
    if _missing("gpuhub_actions"):
        op.create_table(
            "gpuhub_actions",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("user", sa.String(length=255), nullable=False),
            sa.Column("server", sa.String(length=255), nullable=False),
            sa.Column("server_started", sa.String(length=64), nullable=True),
            sa.Column("kind", sa.String(length=16), nullable=False),
            sa.Column("rule", sa.String(length=64), nullable=False),
            sa.Column("reason", sa.Text(), nullable=False),
            sa.Column("actor", sa.String(length=255), nullable=False),
            sa.Column("status", sa.String(length=32), nullable=False),
            sa.Column("gpus", sa.Integer(), nullable=False),
            sa.Column("gpu_type", sa.String(length=255), nullable=True),
            sa.Column("user_options", sa.Text(), nullable=True),
            sa.Column("snapshots", sa.Text(), nullable=True),
            sa.Column("error", sa.Text(), nullable=True),
            sa.Column("notified_at", sa.DateTime(timezone=True), nullable=True),
            sa.PrimaryKeyConstraint("id"),
        )
        op.create_index("ix_gpuhub_actions_status", "gpuhub_actions", ["status"])
        op.create_index("ix_gpuhub_actions_user", "gpuhub_actions", ["user"])
    if _missing("gpu_queue"):
        op.create_table(
            "gpu_queue",
            sa.Column("id", sa.Integer(), nullable=False),
            sa.Column("user", sa.String(length=255), nullable=False),
            sa.Column("server", sa.String(length=255), nullable=False),
            sa.Column("gpu_type", sa.String(length=255), nullable=False),
            sa.Column("gpus", sa.Integer(), nullable=False),
            sa.Column("priority", sa.Integer(), nullable=False),
            sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("user_options", sa.Text(), nullable=False),
            sa.PrimaryKeyConstraint("id"),
            sa.UniqueConstraint("user", "server", name="uq_gpu_queue_server"),
        )
        op.create_index("ix_gpu_queue_gpu_type", "gpu_queue", ["gpu_type"])


def downgrade() -> None:
    for table in ("gpu_queue", "gpuhub_actions", "group_quotas", "catalog_environments"):
        op.drop_table(table)
    op.drop_table("gpu_leases")
