"""on-call schedules and their overrides

Revision ID: 0008
Revises: 0007

Two new tables, nothing else touched: the previous release never reads them. Required
columns carry a server default so the expand-only check holds for them as for any column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("company", sa.String(length=64), primary_key=True),
        sa.Column("name", sa.String(length=64), primary_key=True),
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=_NOW),
    )
    op.create_table(
        "schedule_overrides",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("company", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("schedule", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("recipient", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("replaces", sa.String(length=64), nullable=True),
        sa.Column("starts_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("ends_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("created_by", sa.String(length=200), nullable=False, server_default=""),
    )
    op.create_index("ix_overrides_window", "schedule_overrides", ["company", "schedule", "ends_at"])


def downgrade() -> None:
    op.drop_index("ix_overrides_window", table_name="schedule_overrides")
    op.drop_table("schedule_overrides")
    op.drop_table("schedules")
