"""integrations: inbound alert sources (Alertmanager, Grafana, generic JSON)

Revision ID: 0006
Revises: 0005

A new table only: a release without integrations never reads it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "integrations",
        sa.Column("company", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("token_sha256", sa.String(length=64), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("company", "name"),
    )
    op.create_index(op.f("ix_integrations_name"), "integrations", ["name"])


def downgrade() -> None:
    op.drop_index(op.f("ix_integrations_name"), table_name="integrations")
    op.drop_table("integrations")
