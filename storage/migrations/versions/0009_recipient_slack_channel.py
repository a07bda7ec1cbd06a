"""recipients slack_channel: where the slack channel posts a recipient's pages

Revision ID: 0009
Revises: 0008

A nullable column: the previous release neither reads nor writes it, so it keeps working
on this schema during a rolling deploy.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("recipients", sa.Column("slack_channel", sa.String(length=64), nullable=True))


def downgrade() -> None:
    op.drop_column("recipients", "slack_channel")
