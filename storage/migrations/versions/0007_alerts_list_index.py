"""alerts list index: a company's alerts in creation order, for GET /v1/alerts

Revision ID: 0007
Revises: 0006

The alert list pages through a company's alerts newest (or oldest) first with a keyset
cursor on (created_at, id). Without an index each page sorted every alert the company
ever had; with it a page is a range scan of `limit` rows, however deep the cursor.
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_alerts_company_created", "alerts", ["company", "created_at", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_alerts_company_created", table_name="alerts")
