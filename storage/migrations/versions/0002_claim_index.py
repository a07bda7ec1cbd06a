"""claim index: a partial index on undone jobs; room for HOT updates

Revision ID: 0002
Revises: 0001

The claim (`NOT done AND due_at <= now ORDER BY due_at, id`) ran on ix_jobs_pending
(done, due_at): an index of every job ever written, done ones included, in an order that
still needed a sort by id; on a young table the planner took a sequential scan of all
jobs (every pending timer included) instead. ix_jobs_due holds only undone jobs, in claim
order; a job leaves it when it is done. Lease updates on jobs touch no indexed column, so
with free space on the page (fillfactor) they are HOT and pruned on the page, which
matters on servers that run without autovacuum. ix_notification_attempts_notification_id
duplicated the leading column of uq_attempt.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_jobs_pending", table_name="jobs")
    op.create_index(
        "ix_jobs_due",
        "jobs",
        ["due_at", "id"],
        unique=False,
        postgresql_where=sa.text("NOT done"),
        sqlite_where=sa.text("done = 0"),
    )
    op.drop_index(
        op.f("ix_notification_attempts_notification_id"), table_name="notification_attempts"
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE jobs SET (fillfactor = 70)")
        op.execute("ALTER TABLE notification_attempts SET (fillfactor = 80)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE notification_attempts RESET (fillfactor)")
        op.execute("ALTER TABLE jobs RESET (fillfactor)")
    op.create_index(
        op.f("ix_notification_attempts_notification_id"),
        "notification_attempts",
        ["notification_id"],
        unique=False,
    )
    op.drop_index("ix_jobs_due", table_name="jobs")
    op.create_index("ix_jobs_pending", "jobs", ["done", "due_at"], unique=False)
