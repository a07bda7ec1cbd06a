"""Claimed sends and the recording of their results.

A worker owns a claimed send until its result is recorded. Recording is written once,
against the unit-of-work protocol, so the session and the driver path cannot drift: the
same stale-lease and already-recorded checks, the same audit line, the same decision.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

from escalation import metrics
from escalation.audit_records import ENGINE, RequestContext
from escalation.channels.base import DeliveryResult, Notification
from escalation.core import Event, Outcome
from escalation.effects import Effects
from escalation.records import INFLIGHT, AlertRecord, AttemptRecord
from escalation.unit_of_work import Staging, UnitOfWork

log = logging.getLogger(__name__)


@dataclass
class SendTask:
    """A claimed notification attempt, owned by one worker until its result is recorded."""

    job_id: int
    attempt_row: int
    company: str
    due_at: datetime
    notification: Notification
    bundled: list[SendTask] = field(default_factory=list)
    # A worker lost this attempt after the person picked up: it is recorded as answered
    # without a key instead of being placed again (see NotificationAttempt.answered_at).
    interrupted: bool = False


# A result of a bundle's member: (member, its result, the task that carried it).
Member = tuple[SendTask, DeliveryResult, SendTask]
Decide = Callable[[Staging, AlertRecord, Event, datetime, RequestContext, Effects], Awaitable[None]]


def members(results: Sequence[tuple[SendTask, DeliveryResult]]) -> list[Member]:
    """Each result once per notification it answers (a bundle answers for its members)."""
    return [(m, result, task) for task, result in results for m in (task, *task.bundled)]


def already_recorded(row: AttemptRecord, member: SendTask, result: DeliveryResult) -> bool:
    """A result for an attempt that is no longer in flight was committed before: the
    worker retried a batch whose commit it could not confirm (the connection broke on the
    way back). Recording it again would write a second audit line for one event."""
    if row.status == INFLIGHT:
        return False
    log.info("result %s of %s attempt %s was recorded already", result.status.value,
             member.notification.notification_id, member.notification.attempt)  # fmt: skip
    return True


async def record_results(
    unit: UnitOfWork,
    results: Sequence[Member],
    owner: str,
    now: datetime,
    fx: Effects,
    decide: Decide,
) -> None:
    """Record several results in one transaction: one lock statement for all their
    alerts (in id order, like every other multi-alert lock), one read of their jobs and
    attempts, then each result is decided in the order given."""
    alerts = await unit.lock_alerts({m.notification.alert_id for m, _, _ in results})
    jobs, rows = await unit.result_rows(
        {m.job_id for m, _, _ in results}, {m.attempt_row for m, _, _ in results}
    )
    decided: set[str] = set()
    for m, result, task in results:
        alert = alerts[m.notification.alert_id]
        job = jobs.get(m.job_id)
        row = rows.get(m.attempt_row)
        if job is None or row is None or job.owner != owner:
            fx.record(
                alert, ENGINE, now, event="stale_result", status=result.status.value,
                reason="lease_lost", notification_uuid=m.notification.notification_id,
                channel=m.notification.channel, attempt=m.notification.attempt,
            )  # fmt: skip
            continue
        if already_recorded(row, m, result):
            continue
        await unit.record_result(job, row, result, now)  # a job cancelled meanwhile stays so
        rows[row.id] = replace(row, status=result.status.value, reason=result.reason)
        fx.record(
            alert, ENGINE, now, event="result", status=result.status.value,
            reason=result.reason, notification_uuid=row.notification_id, channel=row.channel,
            attempt=row.attempt, recipient_id=row.recipient_id, provider_id=result.provider_id,
            bundled_into=None if m is task else task.notification.notification_id,
            details=dict(result.details) or None,  # e.g. trunk used, trunks tried
        )  # fmt: skip
        metrics.NOTIFICATIONS.labels(row.channel, result.status.value).inc()
        outcome = Outcome(row.notification_id, row.attempt, result.status, result.reason)
        await decide(unit, alert, outcome, now, ENGINE, fx)
        decided.add(alert.id)
    await unit.save_alerts([a for a in alerts.values() if a.id in decided])
