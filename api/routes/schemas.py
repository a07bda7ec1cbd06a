"""Response models of the HTTP API (request bodies reuse the engine's validated models)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.models import Alert, NotificationAttempt


class AlertAccepted(BaseModel):
    id: str
    short_id: str
    state: str
    deduplicated: bool = False


class AttemptOut(BaseModel):
    notification_id: str
    attempt: int
    channel: str
    recipient_id: str
    round: int
    step: int
    status: str
    reason: str | None
    provider_id: str | None
    scheduled_for: datetime
    sent_at: datetime | None
    finished_at: datetime | None


class AlertSummary(BaseModel):
    """An alert without its attempts (the list endpoint's rows)."""

    id: str
    short_id: str
    title: str
    summary: str
    severity: str
    policy: str
    dedup_key: str | None
    details: dict[str, Any]
    state: str
    dup_count: int
    created_at: datetime
    acknowledged_at: datetime | None
    resolved_at: datetime | None
    exhausted_at: datetime | None
    acked_by: str | None
    resolved_by: str | None
    close_reason: str | None

    @classmethod
    def of_alert(cls, alert: Alert) -> AlertSummary:
        return cls.model_validate(alert.model_dump())


class AlertOut(AlertSummary):
    attempts: list[AttemptOut] = []

    @classmethod
    def of(cls, alert: Alert, attempts: list[NotificationAttempt] | None = None) -> AlertOut:
        data = alert.model_dump()
        data["attempts"] = [AttemptOut.model_validate(a.model_dump()) for a in attempts or []]
        return cls.model_validate(data)


class Error(BaseModel):
    detail: str | list[str]


class AlertPage(BaseModel):
    alerts: list[AlertSummary]
    next_cursor: str | None  # pass as `cursor` for the next page; null on the last one
    counts: dict[str, int]  # per state, for the same filters except `state`


class ReassignIn(BaseModel):
    """Body of POST /v1/alerts/{id}/reassign: who takes the alert over."""

    model_config = ConfigDict(extra="forbid")

    recipients: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )
    groups: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=100
    )

    @model_validator(mode="after")
    def _someone(self) -> ReassignIn:
        if not self.recipients and not self.groups:
            raise ValueError("give at least one recipient or group")
        return self
