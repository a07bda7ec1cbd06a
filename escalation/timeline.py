"""An alert's path as the audit trail tells it, one typed entry per line (for a console).

The audit trail is the record of what happened (the database only keeps where things
stand): every line the engine writes for the alert becomes an entry, in time order. A
kind this release does not know (a newer release wrote it) passes through with its
fields in `raw`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, assert_never

from pydantic import BaseModel

from escalation.channels.base import DeliveryStatus
from escalation.config import CHANNEL_CONTACT_FIELD


class AuditEvent(enum.StrEnum):
    """The `event` of the audit lines the engine and the decision core write."""

    CREATED = "created"  # ingest: the alert and its first step committed
    DEDUPLICATED = "deduplicated"  # a repeat of an open alert's dedup_key
    STEP = "step"  # a policy step fired (start, timer, escalate, reassign)
    POLICY_END = "policy_end"  # the last step's delay (and every repeat) elapsed
    SCHEDULED = "scheduled"  # an attempt was planned
    SKIPPED = "skipped"  # a target without the contact its channel needs
    SEND = "send"  # a worker handed the attempt to its channel
    HELD = "held"  # a rate limit moved the attempt to a later slot
    BUNDLED = "bundled"  # a rate limit folded the attempt into another send
    RESULT = "result"  # the channel's verdict (trunk and SIP code in details for voice)
    PROVIDER_STATUS = "provider_status"  # a carrier's later report
    STALE_RESULT = "stale_result"  # a verdict from a worker that had lost the lease
    RETRY = "retry"
    FALLBACK = "fallback"
    FALLBACK_SKIPPED = "fallback_skipped"
    CHANNEL_EXHAUSTED = "channel_exhausted"
    ESCALATE = "escalate"  # pressed 2, or POST .../escalate
    REASSIGNED = "reassigned"
    ONCALL = "oncall"  # a step paging a schedule found who is on call (or nobody)
    SNOOZED = "snoozed"  # pressed 4: the chain paused until `until`
    ACK = "ack"
    RESOLVE = "resolve"
    EXHAUSTED = "exhausted"
    IGNORED = "ignored"  # an ack/resolve of an alert already past it


class EntryKind(enum.StrEnum):
    """What an entry is about, for grouping and icons."""

    LIFECYCLE = "lifecycle"  # the alert's state: created, acked, resolved, exhausted
    CHAIN = "chain"  # steps, escalations, reassignments
    DELIVERY = "delivery"  # one attempt's way to a person
    DECISION = "decision"  # what the policy made of a failed attempt
    RATE_LIMIT = "rate_limit"
    UNKNOWN = "unknown"


def kind_of(event: AuditEvent) -> EntryKind:
    match event:
        case (AuditEvent.CREATED | AuditEvent.DEDUPLICATED | AuditEvent.ACK | AuditEvent.RESOLVE
              | AuditEvent.EXHAUSTED | AuditEvent.IGNORED):  # fmt: skip
            return EntryKind.LIFECYCLE
        case (AuditEvent.STEP | AuditEvent.POLICY_END | AuditEvent.ESCALATE
              | AuditEvent.REASSIGNED | AuditEvent.ONCALL | AuditEvent.SNOOZED):  # fmt: skip
            return EntryKind.CHAIN
        case (AuditEvent.SCHEDULED | AuditEvent.SKIPPED | AuditEvent.SEND | AuditEvent.RESULT
              | AuditEvent.PROVIDER_STATUS | AuditEvent.STALE_RESULT):  # fmt: skip
            return EntryKind.DELIVERY
        case (AuditEvent.RETRY | AuditEvent.FALLBACK | AuditEvent.FALLBACK_SKIPPED
              | AuditEvent.CHANNEL_EXHAUSTED):  # fmt: skip
            return EntryKind.DECISION
        case AuditEvent.HELD | AuditEvent.BUNDLED:
            return EntryKind.RATE_LIMIT
        case _:
            assert_never(event)


class TimelineEntry(BaseModel):
    ts: datetime
    event: str  # an AuditEvent value, or a kind this release does not know
    kind: EntryKind
    status: str | None = None  # the attempt's delivery state, or the alert's
    reason: str | None = None
    actor: str | None = None  # who acked, resolved, escalated, reassigned
    ip: str | None = None
    request_id: str | None = None
    notification_id: str | None = None
    channel: str | None = None  # for an ack: the channel it came through, when known
    recipient_id: str | None = None
    attempt: int | None = None
    round: int | None = None
    step: int | None = None
    provider_id: str | None = None
    trunk: str | None = None
    trunks_tried: str | None = None
    sip_code: int | None = None
    bundled_into: str | None = None
    released_at: datetime | None = None  # held: when the rate limit lets it go
    snoozed_until: datetime | None = None  # snoozed: when the step fires again
    reassigned_from: list[str] | None = None
    reassigned_to: list[str] | None = None
    groups: list[str] | None = None
    schedule: str | None = None  # oncall: the schedule, its layer and override that chose
    layer: str | None = None
    override: int | None = None
    raw: dict[str, Any] | None = None  # every field of a line of an unknown kind


class Timeline(BaseModel):
    alert_id: str
    entries: list[TimelineEntry]


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


def _sip_code(value: Any) -> int | None:
    text = _text(value)
    return int(text) if text is not None and text.isdigit() else None


def _entry(rec: Mapping[str, Any], acked_through: Mapping[str, Any] | None) -> TimelineEntry:
    try:
        event = AuditEvent(str(rec.get("event")))
    except ValueError:
        return TimelineEntry(ts=rec["ts"], event=str(rec.get("event")), kind=EntryKind.UNKNOWN,
                             raw=dict(rec))  # fmt: skip
    found = rec.get("details")
    details: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    channel = rec.get("channel")
    recipient = rec.get("recipient_id")
    if event in _CLOSED_BY_PERSON and channel is None:
        channel, recipient = _ack_channel(rec, acked_through)
    return TimelineEntry(
        ts=rec["ts"], event=event.value, kind=kind_of(event), status=_text(rec.get("status")),
        reason=_text(rec.get("reason")), actor=rec.get("actor"), ip=rec.get("ip"),
        request_id=rec.get("request_id"), notification_id=rec.get("notification_uuid"),
        channel=channel, recipient_id=recipient, attempt=rec.get("attempt"),
        round=rec.get("round"), step=rec.get("step"), provider_id=rec.get("provider_id"),
        trunk=_text(details.get("trunk")), trunks_tried=_text(details.get("trunks_tried")),
        sip_code=_sip_code(details.get("sip_code")), bundled_into=rec.get("bundled_into"),
        released_at=rec.get("released_at"), snoozed_until=rec.get("until"),
        reassigned_from=rec.get("from"), reassigned_to=rec.get("to"), groups=rec.get("groups"),
        schedule=rec.get("schedule"), layer=rec.get("layer"), override=rec.get("override"),
    )  # fmt: skip


_CLOSED_BY_PERSON = {AuditEvent.ACK, AuditEvent.RESOLVE}
_CLOSING_RESULTS = {DeliveryStatus.ACKNOWLEDGED.value, DeliveryStatus.RESOLVED.value}


def _ack_channel(
    rec: Mapping[str, Any], acked_through: Mapping[str, Any] | None
) -> tuple[str | None, str | None]:
    """An ack or resolve within an attempt (pressed 1 or 3) follows that attempt's result;
    a reply or a
    button names its channel in the actor ("sms:+1415...", "telegram:alice")."""
    if acked_through is not None:
        return acked_through.get("channel"), acked_through.get("recipient_id")
    prefix = str(rec.get("actor") or "").partition(":")[0]
    return (prefix if prefix in CHANNEL_CONTACT_FIELD else None), None


def build_timeline(alert_id: str, records: Iterable[Mapping[str, Any]]) -> Timeline:
    """The alert's lines in time order (lines of one moment keep the order written)."""
    entries = []
    acked_through: Mapping[str, Any] | None = None
    for rec in records:
        if rec.get("alert_id") != alert_id or rec.get("ts") is None:
            continue
        entries.append(_entry(rec, acked_through))
        acked = (rec.get("event") == AuditEvent.RESULT.value
                 and rec.get("status") in _CLOSING_RESULTS)  # fmt: skip
        acked_through = rec if acked else None
    entries.sort(key=lambda e: e.ts)
    return Timeline(alert_id=alert_id, entries=entries)
