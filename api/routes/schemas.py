"""Response models of the HTTP API (request bodies reuse the engine's validated models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel

from escalation.models import Alert, NotificationAttempt


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


class AlertOut(BaseModel):
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
    attempts: list[AttemptOut] = []

    @classmethod
    def of(cls, alert: Alert, attempts: list[NotificationAttempt] | None = None) -> AlertOut:
        data = alert.model_dump()
        data["attempts"] = [AttemptOut.model_validate(a.model_dump()) for a in attempts or []]
        return cls.model_validate(data)


class Error(BaseModel):
    detail: str | list[str]
