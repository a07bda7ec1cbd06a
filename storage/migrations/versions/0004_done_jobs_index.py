"""done jobs index: done jobs in due order, for the bounded cleanup of old ones

Revision ID: 0004
Revises: 0003

Done jobs were never deleted: the table (and every index on it) grew by two rows per
notification forever, and servers that run without autovacuum kept every dead version of
them too. Workers now delete done jobs older than a retention in small batches
(`Engine.purge_done_jobs`); ix_jobs_done_due lets each batch find the oldest done jobs
without scanning the ones it keeps. Undone jobs are not in it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_done_due",
        "jobs",
        ["due_at"],
        unique=False,
        postgresql_where=sa.text("done"),
        sqlite_where=sa.text("done = 1"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_done_due", table_name="jobs")
