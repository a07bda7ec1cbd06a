"""console users: who signs in to the web console, their role and recipient

Revision ID: 0011
Revises: 0009

One new table, nothing else touched: the previous release never reads it. Required
columns carry a server default so the expand-only check holds for them as for any column.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_table(
        "console_users",
        sa.Column("username", sa.String(length=64), primary_key=True),
        sa.Column("company", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("password_hash", sa.String(length=255), nullable=False, server_default=""),
        sa.Column("role", sa.String(length=20), nullable=False, server_default="viewer"),
        sa.Column("recipient_id", sa.String(length=64), nullable=True),
        sa.Column("disabled", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("session_version", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("updated_by", sa.String(length=200), nullable=False, server_default=""),
    )
    op.create_index("ix_console_users_company", "console_users", ["company"])


def downgrade() -> None:
    op.drop_index("ix_console_users_company", table_name="console_users")
    op.drop_table("console_users")
