"""trunk overrides: API/CLI changes to carrier trunks, shared by every process

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.models

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "trunk_overrides",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("changes", sa.JSON(), nullable=True),
        sa.Column("updated_at", storage.models.UTCDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("trunk_overrides")
