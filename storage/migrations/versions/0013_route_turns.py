"""route turns: round-robin position of each carrier route, shared by the workers and the
CLI when no Redis keeps it

Revision ID: 0013
Revises: 0012

A new table, nothing else touched: the previous release never reads it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "route_turns",
        sa.Column("route", sa.String(length=64), primary_key=True),
        sa.Column("turn", sa.Integer(), nullable=False, server_default="0"),
        sa.Column(
            "updated_at", UTCDateTime(), nullable=False, server_default=sa.text("CURRENT_TIMESTAMP")
        ),
    )


def downgrade() -> None:
    op.drop_table("route_turns")
