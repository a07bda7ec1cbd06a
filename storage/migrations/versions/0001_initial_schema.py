"""initial schema

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import storage.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "alerts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("company", sa.String(length=64), nullable=False),
        sa.Column("short_id", sa.String(length=12), nullable=False),
        sa.Column("title", sa.String(length=300), nullable=False),
        sa.Column("summary", sa.Text(), nullable=False),
        sa.Column("severity", sa.String(length=20), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=False),
        sa.Column("dedup_key", sa.String(length=255), nullable=True),
        sa.Column("open_dedup_key", sa.String(length=255), nullable=True),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("plan", sa.JSON(), nullable=True),
        sa.Column("chain", sa.JSON(), nullable=True),
        sa.Column("dup_count", sa.Integer(), nullable=False),
        sa.Column("created_at", storage.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", storage.models.UTCDateTime(), nullable=False),
        sa.Column("acknowledged_at", storage.models.UTCDateTime(), nullable=True),
        sa.Column("resolved_at", storage.models.UTCDateTime(), nullable=True),
        sa.Column("exhausted_at", storage.models.UTCDateTime(), nullable=True),
        sa.Column("acked_by", sa.String(length=200), nullable=True),
        sa.Column("resolved_by", sa.String(length=200), nullable=True),
        sa.Column("close_reason", sa.String(length=100), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("company", "open_dedup_key", name="uq_alerts_open_dedup"),
    )
    op.create_index("ix_alerts_company_short_id", "alerts", ["company", "short_id"], unique=False)
    op.create_index(op.f("ix_alerts_state"), "alerts", ["state"], unique=False)
    op.create_table(
        "idempotency_keys",
        sa.Column("api_key_hash", sa.String(length=64), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", storage.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("api_key_hash", "idempotency_key"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=True),
        sa.Column("due_at", storage.models.UTCDateTime(), nullable=False),
        sa.Column("owner", sa.String(length=100), nullable=True),
        sa.Column("lease_until", storage.models.UTCDateTime(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("created_at", storage.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_jobs_alert_id"), "jobs", ["alert_id"], unique=False)
    op.create_index("ix_jobs_pending", "jobs", ["done", "due_at"], unique=False)
    op.create_table(
        "notification_attempts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("company", sa.String(length=64), nullable=False),
        sa.Column("alert_id", sa.String(length=36), nullable=False),
        sa.Column("notification_id", sa.String(length=36), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=32), nullable=False),
        sa.Column("recipient_id", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=320), nullable=True),
        sa.Column("round", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.Column("provider_id", sa.String(length=200), nullable=True),
        sa.Column("scheduled_for", storage.models.UTCDateTime(), nullable=False),
        sa.Column("sent_at", storage.models.UTCDateTime(), nullable=True),
        sa.Column("finished_at", storage.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("notification_id", "attempt", name="uq_attempt"),
    )
    op.create_index(
        "ix_attempts_address", "notification_attempts", ["address", "channel"], unique=False
    )
    op.create_index(
        "ix_attempts_rate",
        "notification_attempts",
        ["company", "recipient_id", "channel", "sent_at"],
        unique=False,
    )
    op.create_index(
        op.f("ix_notification_attempts_alert_id"),
        "notification_attempts",
        ["alert_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_notification_attempts_notification_id"),
        "notification_attempts",
        ["notification_id"],
        unique=False,
    )
    op.create_index(
        op.f("ix_notification_attempts_provider_id"),
        "notification_attempts",
        ["provider_id"],
        unique=False,
    )
    op.create_table(
        "policies",
        sa.Column("company", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=True),
        sa.Column("updated_at", storage.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("company", "name"),
    )
    op.create_table(
        "recipient_groups",
        sa.Column("company", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("members", sa.JSON(), nullable=True),
        sa.Column("updated_at", storage.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("company", "name"),
    )
    op.create_table(
        "recipients",
        sa.Column("company", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("phone", sa.String(length=32), nullable=True),
        sa.Column("telegram_chat_id", sa.String(length=64), nullable=True),
        sa.Column("email", sa.String(length=320), nullable=True),
        sa.Column("webhook_url", sa.String(length=2000), nullable=True),
        sa.Column("updated_at", storage.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("company", "id"),
    )


def downgrade() -> None:

    op.drop_table("recipients")
    op.drop_table("recipient_groups")
    op.drop_table("policies")
    op.drop_index(op.f("ix_notification_attempts_provider_id"), table_name="notification_attempts")
    op.drop_index(
        op.f("ix_notification_attempts_notification_id"), table_name="notification_attempts"
    )
    op.drop_index(op.f("ix_notification_attempts_alert_id"), table_name="notification_attempts")
    op.drop_index("ix_attempts_rate", table_name="notification_attempts")
    op.drop_index("ix_attempts_address", table_name="notification_attempts")
    op.drop_table("notification_attempts")
    op.drop_index("ix_jobs_pending", table_name="jobs")
    op.drop_index(op.f("ix_jobs_alert_id"), table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("idempotency_keys")
    op.drop_index(op.f("ix_alerts_state"), table_name="alerts")
    op.drop_index("ix_alerts_company_short_id", table_name="alerts")
    op.drop_table("alerts")
