"""Database tables. The database is the source of truth for alerts, attempts and timers.

Every change to an alert's chain (its jobs, its attempts, its state) happens in a
transaction that first locks the alert row, so the alert row serialises ack, claim and
result recording without deadlocks (one lock order: alert, then its jobs and attempts).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Timezone-aware UTC on every backend (SQLite has no timezone type)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


def _ts(nullable: bool = False, index: bool = False) -> Any:
    return Field(default=None, sa_column=sa.Column(UTCDateTime(), nullable=nullable, index=index))


class AlertState(enum.StrEnum):
    TRIGGERED = "triggered"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"
    EXHAUSTED = "exhausted"


class JobKind(enum.StrEnum):
    STEP = "step"  # fire step (round, step) of the policy
    SEND = "send"  # deliver one notification attempt
    CAP = "cap"  # the chain's max_duration elapsed


class Alert(SQLModel, table=True):
    __tablename__ = "alerts"
    __table_args__ = (
        # An open incident per dedup key: NULL once closed, so a new one can start.
        sa.UniqueConstraint("company", "open_dedup_key", name="uq_alerts_open_dedup"),
        sa.Index("ix_alerts_company_short_id", "company", "short_id"),
        # GET /v1/alerts: a keyset cursor on (created_at, id) within a company
        sa.Index("ix_alerts_company_created", "company", "created_at", "id"),
    )

    id: str = Field(primary_key=True, max_length=36)
    company: str = Field(max_length=64)
    short_id: str = Field(max_length=12)
    title: str = Field(max_length=300)
    summary: str = Field(default="", sa_column=sa.Column(sa.Text(), nullable=False))
    severity: str = Field(max_length=20)
    policy: str = Field(max_length=64)
    dedup_key: str | None = Field(default=None, max_length=255)
    open_dedup_key: str | None = Field(default=None, max_length=255)
    details: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    state: str = Field(default=AlertState.TRIGGERED.value, max_length=20, index=True)
    # Snapshot of the resolved policy and the decision core's chain state (see core.py).
    plan: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    chain: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    dup_count: int = 0
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    acknowledged_at: datetime | None = _ts(nullable=True)
    resolved_at: datetime | None = _ts(nullable=True)
    exhausted_at: datetime | None = _ts(nullable=True)
    acked_by: str | None = Field(default=None, max_length=200)
    resolved_by: str | None = Field(default=None, max_length=200)
    close_reason: str | None = Field(default=None, max_length=100)


class IdempotencyKey(SQLModel, table=True):
    """(api key, Idempotency-Key) -> the alert it created; the PK makes duplicates collide."""

    __tablename__ = "idempotency_keys"

    api_key_hash: str = Field(primary_key=True, max_length=64)
    idempotency_key: str = Field(primary_key=True, max_length=255)
    alert_id: str = Field(max_length=36)
    created_at: datetime = _ts()


class NotificationAttempt(SQLModel, table=True):
    __tablename__ = "notification_attempts"
    __table_args__ = (
        sa.UniqueConstraint("notification_id", "attempt", name="uq_attempt"),
        sa.Index("ix_attempts_rate", "company", "recipient_id", "channel", "sent_at"),
        sa.Index("ix_attempts_address", "address", "channel"),
        # The status page: each channel's recent delivery outcomes (escalation.statuspage).
        sa.Index("ix_attempts_finished", "finished_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    company: str = Field(max_length=64)
    alert_id: str = Field(max_length=36, index=True)
    notification_id: str = Field(max_length=36)  # looked up through uq_attempt
    attempt: int
    channel: str = Field(max_length=32)
    recipient_id: str = Field(max_length=64)
    address: str | None = Field(default=None, max_length=320)
    round: int = 0
    step: int = 0
    # scheduled | held | sending | <DeliveryStatus value> | bundled
    status: str = Field(max_length=32)
    reason: str | None = Field(default=None, max_length=200)
    provider_id: str | None = Field(default=None, max_length=200, index=True)
    scheduled_for: datetime = _ts()
    sent_at: datetime | None = _ts(nullable=True)
    finished_at: datetime | None = _ts(nullable=True)
    # A person picked up this attempt's call: a worker lost mid-call does not place it
    # again (Engine.claim hands it out as interrupted instead).
    answered_at: datetime | None = _ts(nullable=True)


class Job(SQLModel, table=True):
    """A durable timer/dispatch unit. Claimed by one worker at a time through its lease."""

    __tablename__ = "jobs"
    __table_args__ = (
        # Undone jobs in claim order; the claim and next_due must say `NOT done` (SQLite:
        # `done = 0`), as `~col(Job.done)` renders, for the planner to use it.
        sa.Index(
            "ix_jobs_due",
            "due_at",
            "id",
            postgresql_where=sa.text("NOT done"),
            sqlite_where=sa.text("done = 0"),
        ),
        # Done jobs in due order: the cleanup deletes the oldest (Engine.purge_done_jobs).
        sa.Index(
            "ix_jobs_done_due",
            "due_at",
            postgresql_where=sa.text("done"),
            sqlite_where=sa.text("done = 1"),
        ),
    )

    id: int | None = Field(default=None, primary_key=True)
    alert_id: str = Field(max_length=36, index=True)
    kind: str = Field(max_length=16)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    due_at: datetime = _ts()
    owner: str | None = Field(default=None, max_length=100)
    lease_until: datetime | None = _ts(nullable=True)
    attempts: int = 0
    done: bool = False
    outcome: str | None = Field(default=None, max_length=32)  # done | cancelled | stale
    created_at: datetime = _ts()


class RecipientRow(SQLModel, table=True):
    __tablename__ = "recipients"

    company: str = Field(primary_key=True, max_length=64)
    id: str = Field(primary_key=True, max_length=64)
    name: str = Field(max_length=200)
    phone: str | None = Field(default=None, max_length=32)
    telegram_chat_id: str | None = Field(default=None, max_length=64)
    email: str | None = Field(default=None, max_length=320)
    webhook_url: str | None = Field(default=None, max_length=2000)
    slack_channel: str | None = Field(default=None, max_length=64)
    updated_at: datetime = _ts()


class GroupRow(SQLModel, table=True):
    __tablename__ = "recipient_groups"

    company: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    members: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON()))
    updated_at: datetime = _ts()


class PolicyRow(SQLModel, table=True):
    __tablename__ = "policies"

    company: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    updated_at: datetime = _ts()


class IntegrationRow(SQLModel, table=True):
    """An inbound alert source. Its token is kept only as a SHA-256 digest; an integration
    from ackline.yaml names an environment variable instead (``spec.token_env``)."""

    __tablename__ = "integrations"

    company: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64, index=True)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    token_sha256: str | None = Field(default=None, max_length=64)
    updated_at: datetime = _ts()


class TrunkOverrideRow(SQLModel, table=True):
    """Operational changes to a carrier trunk made through the API or CLI (enable/disable,
    priority, weight, budgets) on top of its ackline.yaml definition, shared by every
    process: workers pick them up without a restart."""

    __tablename__ = "trunk_overrides"

    name: str = Field(primary_key=True, max_length=64)
    changes: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    updated_at: datetime = _ts()
    updated_by: str = Field(default="", max_length=200)


class RouteTurnRow(SQLModel, table=True):
    """Whose turn it is in a round-robin route, shared by the workers and `ackline call`
    when there is no Redis to keep it (carriers.turns)."""

    __tablename__ = "route_turns"

    route: str = Field(primary_key=True, max_length=64)
    turn: int = 0
    updated_at: datetime = _ts()


class ScheduleRow(SQLModel, table=True):
    """An on-call schedule (escalation.schedules.Schedule as JSON), per company."""

    __tablename__ = "schedules"

    company: str = Field(primary_key=True, max_length=64)
    name: str = Field(primary_key=True, max_length=64)
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=sa.Column(sa.JSON()))
    updated_at: datetime = _ts()


class ScheduleOverrideRow(SQLModel, table=True):
    """Someone else on call for a while; the id orders overrides by creation (the later
    one wins where they overlap)."""

    __tablename__ = "schedule_overrides"
    __table_args__ = (sa.Index("ix_overrides_window", "company", "schedule", "ends_at"),)

    id: int | None = Field(default=None, primary_key=True)
    company: str = Field(max_length=64)
    schedule: str = Field(max_length=64)
    recipient: str = Field(max_length=64)
    replaces: str | None = Field(default=None, max_length=64)
    starts_at: datetime = _ts()
    ends_at: datetime = _ts()
    created_at: datetime = _ts()
    created_by: str = Field(default="", max_length=200)


class ShiftReminderRow(SQLModel, table=True):
    """One shift reminder, claimed before it is sent: the key is what makes it one per
    (schedule, recipient, shift start) however many workers see the shift coming."""

    __tablename__ = "shift_reminders"

    company: str = Field(primary_key=True, max_length=64)
    schedule: str = Field(primary_key=True, max_length=64)
    recipient: str = Field(primary_key=True, max_length=64)
    shift_start: datetime = Field(sa_column=sa.Column(UTCDateTime(), primary_key=True))
    channel: str = Field(default="", max_length=32)
    status: str = Field(default="claimed", max_length=32)  # claimed | sent | failed
    reason: str | None = Field(default=None, max_length=200)
    attempts: int = 0
    claimed_by: str = Field(default="", max_length=100)
    claimed_at: datetime = _ts()
    finished_at: datetime | None = _ts(nullable=True)


class ConsoleUserRow(SQLModel, table=True):
    """A person who signs in to the web console (escalation.users). The username is unique
    across companies because the login form asks for nothing else; `session_version` goes
    up when the user is disabled or their password or role changes, which ends their
    signed-cookie sessions on the next request."""

    __tablename__ = "console_users"

    username: str = Field(primary_key=True, max_length=64)
    company: str = Field(max_length=64, index=True)
    password_hash: str = Field(max_length=255)
    role: str = Field(max_length=20)  # an escalation.users.Role value
    recipient_id: str | None = Field(default=None, max_length=64)
    disabled: bool = False
    session_version: int = 0
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    updated_by: str = Field(default="", max_length=200)


# -- status page (escalation.status, escalation.statuspage) -----------------------------------


class StatusSampleRow(SQLModel, table=True):
    """A component's state for one sampler interval. The key (component, bucket start)
    makes every node's sampler write the same row: the first one wins, so several nodes
    never count one interval twice."""

    __tablename__ = "status_samples"
    __table_args__ = (sa.Index("ix_status_samples_day", "day", "component"),)

    component: str = Field(primary_key=True, max_length=80)
    at: datetime = Field(sa_column=sa.Column(UTCDateTime(), primary_key=True))
    day: str = Field(max_length=10)  # UTC YYYY-MM-DD: daily bars group on it
    seconds: int
    state: str = Field(max_length=20)


class StatusIncidentRow(SQLModel, table=True):
    __tablename__ = "status_incidents"
    __table_args__ = (
        # One open automatic incident per component, across nodes (NULL once resolved).
        sa.UniqueConstraint("company", "open_auto_key", name="uq_status_incidents_auto"),
        sa.Index("ix_status_incidents_company_created", "company", "created_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    company: str = Field(max_length=64)
    title: str = Field(max_length=300)
    impact: str = Field(max_length=20)
    status: str = Field(max_length=20)
    components: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON()))
    created_at: datetime = _ts()
    updated_at: datetime = _ts()
    resolved_at: datetime | None = _ts(nullable=True)
    created_by: str = Field(default="", max_length=200)
    open_auto_key: str | None = Field(default=None, max_length=80)


class StatusIncidentUpdateRow(SQLModel, table=True):
    __tablename__ = "status_incident_updates"

    id: int | None = Field(default=None, primary_key=True)
    incident_id: int = Field(index=True)
    status: str = Field(max_length=20)
    body: str = Field(default="", sa_column=sa.Column(sa.Text(), nullable=False))
    created_at: datetime = _ts()
    created_by: str = Field(default="", max_length=200)


class StatusMaintenanceRow(SQLModel, table=True):
    __tablename__ = "status_maintenances"
    __table_args__ = (sa.Index("ix_status_maintenances_window", "company", "ends_at"),)

    id: int | None = Field(default=None, primary_key=True)
    company: str = Field(max_length=64)
    title: str = Field(max_length=300)
    body: str = Field(default="", sa_column=sa.Column(sa.Text(), nullable=False))
    components: list[str] = Field(default_factory=list, sa_column=sa.Column(sa.JSON()))
    starts_at: datetime = _ts()
    ends_at: datetime = _ts()
    created_at: datetime = _ts()
    created_by: str = Field(default="", max_length=200)
    cancelled_at: datetime | None = _ts(nullable=True)


class StatusSubscriberRow(SQLModel, table=True):
    """Someone told of incident updates. The token of their confirm and unsubscribe links
    is kept only as a SHA-256 digest."""

    __tablename__ = "status_subscribers"
    __table_args__ = (
        sa.UniqueConstraint("company", "kind", "address", name="uq_status_subscribers"),
    )

    id: str = Field(primary_key=True, max_length=36)
    company: str = Field(max_length=64)
    kind: str = Field(max_length=16)
    address: str = Field(max_length=2000)
    token_sha256: str = Field(max_length=64, unique=True)
    created_at: datetime = _ts()
    confirmed_at: datetime | None = _ts(nullable=True)
    unsubscribed_at: datetime | None = _ts(nullable=True)
