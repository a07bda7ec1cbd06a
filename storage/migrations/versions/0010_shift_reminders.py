"""shift reminders: one row per (schedule, recipient, shift start), claimed before sending

Revision ID: 0010
Revises: 0009

A new table, nothing else touched: the previous release never reads it. Its primary key
is the claim: of several workers seeing the same shift coming, only the one whose
INSERT .. ON CONFLICT DO NOTHING adds the row sends the reminder.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "shift_reminders",
        sa.Column("company", sa.String(length=64), primary_key=True),
        sa.Column("schedule", sa.String(length=64), primary_key=True),
        sa.Column("recipient", sa.String(length=64), primary_key=True),
        sa.Column("shift_start", UTCDateTime(), primary_key=True),
        sa.Column("channel", sa.String(length=32), nullable=False, server_default=""),
        sa.Column("status", sa.String(length=32), nullable=False, server_default="claimed"),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("claimed_by", sa.String(length=100), nullable=False, server_default=""),
        sa.Column("claimed_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("shift_reminders")
