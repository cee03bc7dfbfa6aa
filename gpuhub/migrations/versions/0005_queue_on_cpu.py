"""queue entries of servers started without a GPU while they wait for one

Revision ID: 0005
Revises: 0004
Created: 2026-11-30 01:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("gpu_queue", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("on_cpu", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(
            sa.Column("not_now_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch_op.add_column(sa.Column("offered_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("gpu_queue", schema=None) as batch_op:
        batch_op.drop_column("offered_at")
        batch_op.drop_column("not_now_count")
        batch_op.drop_column("not_before")
        batch_op.drop_column("on_cpu")
