"""the public status page: component samples, incidents and their updates, maintenance
windows, subscribers; an index for each channel's recent delivery outcomes

Revision ID: 0012
Revises: 0009

New tables and one new index, nothing else touched: the previous release never reads
them. Required columns carry a server default, as in 0008.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

_NOW = sa.text("CURRENT_TIMESTAMP")


def upgrade() -> None:
    op.create_index("ix_attempts_finished", "notification_attempts", ["finished_at"])
    op.create_table(
        "status_samples",
        sa.Column("component", sa.String(length=80), primary_key=True),
        sa.Column("at", UTCDateTime(), primary_key=True),
        sa.Column("day", sa.String(length=10), nullable=False, server_default=""),
        sa.Column("seconds", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("state", sa.String(length=20), nullable=False, server_default=""),
    )
    op.create_index("ix_status_samples_day", "status_samples", ["day", "component"])
    op.create_table(
        "status_incidents",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("company", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("title", sa.String(length=300), nullable=False, server_default=""),
        sa.Column("impact", sa.String(length=20), nullable=False, server_default=""),
        sa.Column("status", sa.String(length=20), nullable=False, server_default=""),
        sa.Column("components", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("updated_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("resolved_at", UTCDateTime(), nullable=True),
        sa.Column("created_by", sa.String(length=200), nullable=False, server_default=""),
        sa.Column("open_auto_key", sa.String(length=80), nullable=True),
        sa.UniqueConstraint("company", "open_auto_key", name="uq_status_incidents_auto"),
    )
    op.create_index(
        "ix_status_incidents_company_created", "status_incidents", ["company", "created_at"]
    )
    op.create_table(
        "status_incident_updates",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("incident_id", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("status", sa.String(length=20), nullable=False, server_default=""),
        sa.Column("body", sa.Text(), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("created_by", sa.String(length=200), nullable=False, server_default=""),
    )
    op.create_index(
        "ix_status_incident_updates_incident_id", "status_incident_updates", ["incident_id"]
    )
    op.create_table(
        "status_maintenances",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("company", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("title", sa.String(length=300), nullable=False, server_default=""),
        sa.Column("body", sa.Text(), nullable=False, server_default=""),
        sa.Column("components", sa.JSON(), nullable=True),
        sa.Column("starts_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("ends_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("created_by", sa.String(length=200), nullable=False, server_default=""),
        sa.Column("cancelled_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_status_maintenances_window", "status_maintenances", ["company", "ends_at"])
    op.create_table(
        "status_subscribers",
        sa.Column("id", sa.String(length=36), primary_key=True),
        sa.Column("company", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("kind", sa.String(length=16), nullable=False, server_default=""),
        sa.Column("address", sa.String(length=2000), nullable=False, server_default=""),
        sa.Column("token_sha256", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("created_at", UTCDateTime(), nullable=False, server_default=_NOW),
        sa.Column("confirmed_at", UTCDateTime(), nullable=True),
        sa.Column("unsubscribed_at", UTCDateTime(), nullable=True),
        sa.UniqueConstraint("company", "kind", "address", name="uq_status_subscribers"),
        sa.UniqueConstraint("token_sha256"),
    )


def downgrade() -> None:
    op.drop_table("status_subscribers")
    op.drop_index("ix_status_maintenances_window", table_name="status_maintenances")
    op.drop_table("status_maintenances")
    op.drop_index("ix_status_incident_updates_incident_id", table_name="status_incident_updates")
    op.drop_table("status_incident_updates")
    op.drop_index("ix_status_incidents_company_created", table_name="status_incidents")
    op.drop_table("status_incidents")
    op.drop_index("ix_status_samples_day", table_name="status_samples")
    op.drop_table("status_samples")
    op.drop_index("ix_attempts_finished", table_name="notification_attempts")
