"""Shift reminders: tell the incoming person shortly before their on-call shift starts.

The decisions are pure functions of the schedule, its overrides and an instant
(`upcoming_starts`, `pick_channel`, `reminder_text`); `ShiftReminders` runs them for a
worker. Each reminder is claimed in the database first (`shift_reminders`, keyed by
company, schedule, recipient and shift start, INSERT .. ON CONFLICT DO NOTHING), so
however many workers see the same shift coming, one of them sends it, once. A worker
that was down when a reminder fell due leaves it to the next pass of any worker, which
sends it late as long as the shift has not started; after that it is never sent.
Delivery goes through the ordinary channels; a failure is audited, retried a bounded
number of times within the pass, then logged, and never touches the alert path.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import col

from escalation import crud
from escalation.audit import AuditLog
from escalation.channels.base import (
    Channel,
    DeliveryResult,
    DeliveryStatus,
    Notification,
    NotificationKind,
)
from escalation.config import REMINDER_CHANNELS, Recipient
from escalation.core import contact_point
from escalation.schedules import MAX_REMINDER, Override, Reminder, Schedule, shifts
from storage.db import Database
from storage.models import ShiftReminderRow, utcnow

__all__ = [
    "ReminderOutcome",
    "ReminderStatus",
    "ShiftReminders",
    "ShiftStart",
    "pick_channel",
    "reminder_text",
    "upcoming_starts",
]

log = logging.getLogger(__name__)

_INSTANT = timedelta(microseconds=1)
AUDIT_EVENT = "shift_reminder"  # not an alert event: escalation.timeline never sees it
_REMINDER_IDS = uuid.UUID("6f1d3c52-8f0a-4d47-9a39-1b8a0c0e5d21")  # uuid5 namespace


class ReminderStatus(enum.StrEnum):
    """Where a claimed reminder ended (the row's `status`, the audit line's `status`)."""

    CLAIMED = "claimed"  # being sent (or the worker was lost while sending)
    SENT = "sent"
    FAILED = "failed"  # every attempt failed, or a permanent failure
    NO_CHANNEL = "no_channel"  # the recipient has no contact a worker can deliver to


@dataclass(frozen=True)
class ShiftStart:
    """Someone takes over a schedule at `start` (they were not on call just before)."""

    schedule: str
    recipient: str
    start: datetime


@dataclass(frozen=True)
class ReminderOutcome:
    """What one pass did for one claimed shift start."""

    company: str
    shift: ShiftStart
    status: ReminderStatus
    channel: str | None
    reason: str
    attempts: int


def upcoming_starts(
    schedule: Schedule, overrides: Sequence[Override], now: datetime, before: float
) -> list[ShiftStart]:
    """The shift starts in (now, now + before]: the reminders due at `now`.

    A start is where the person on call changes to someone (overrides included); the
    same person carrying on under another layer or an override is no new shift. A shift
    already under way at `now` is not in the list: a late reminder is sent only while it
    still comes before the shift."""
    until = now + timedelta(seconds=before) + _INSTANT
    found = shifts(schedule, overrides, now, until)
    return [
        ShiftStart(schedule.name, cur.recipient, cur.start)
        for prev, cur in itertools.pairwise(found)
        if cur.recipient is not None and cur.recipient != prev.recipient
    ]


def pick_channel(
    reminder: Reminder, recipient: Recipient | None, available: Collection[str]
) -> tuple[str | None, str]:
    """(channel, why): the schedule's channel, or the recipient's first contact a worker
    has a channel for, in REMINDER_CHANNELS order; None with the reason otherwise."""
    if recipient is None:
        return None, "unknown_recipient"
    if reminder.channel is not None:
        if reminder.channel not in available:
            return None, f"channel_unavailable:{reminder.channel}"
        if not recipient.reachable_on(reminder.channel):
            return None, f"no_contact:{reminder.channel}"
        return reminder.channel, "configured"
    for channel in REMINDER_CHANNELS:
        if channel in available and recipient.reachable_on(channel):
            return channel, "first_available"
    return None, "no_reachable_channel"


def reminder_text(schedule: Schedule, start: datetime) -> tuple[str, str]:
    """(title, summary): when the shift starts, in the schedule's own time zone."""
    local = start.astimezone(schedule.tz)
    when = f"{local:%a %d %b %H:%M} {local.tzname()} ({schedule.time_zone})"
    return (
        f"On call soon: {schedule.name}",
        f"Your on-call shift for {schedule.name} starts {when}.",
    )


def reminder_id(company: str, shift: ShiftStart) -> str:
    """Stable per reminder, so a receiver can drop a duplicate delivery."""
    key = f"{company}/{shift.schedule}/{shift.recipient}/{shift.start.isoformat()}"
    return str(uuid.uuid5(_REMINDER_IDS, key))


class ShiftReminders:
    """Sends the reminders due at an instant; `run_once(now)` is one bounded pass.

    `attempts` tries per reminder on a retryable failure, `retry_delay` apart, each bounded
    by the channel's deadline, and none once the shift has started (by `clock`); at most
    `batch` reminders per pass (the rest are still due on the next pass, if their shift
    has not started)."""

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        channels: Mapping[str, Channel],
        *,
        worker_id: str,
        attempts: int = 3,
        retry_delay: float = 5.0,
        batch: int = 100,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.audit = audit
        self.channels = channels
        self.worker_id = worker_id
        self.attempts = max(1, attempts)
        self.retry_delay = retry_delay
        self.batch = batch
        self._sleep = sleep
        self._clock = clock

    async def run_once(self, now: datetime) -> list[ReminderOutcome]:
        """Claim and send every reminder due at `now` that no worker has claimed yet."""
        sources = await crud.reminder_sources(
            self.db, now, now + timedelta(seconds=MAX_REMINDER) + _INSTANT
        )
        due: list[tuple[crud.ReminderSource, ShiftStart]] = []
        for src in sources:
            assert src.schedule.reminder is not None
            before = src.schedule.reminder.before
            due += [(src, s) for s in upcoming_starts(src.schedule, src.overrides, now, before)]
        claimed = []
        for src, shift in due[: self.batch]:
            reminder = src.schedule.reminder
            assert reminder is not None
            recipient = src.recipients.get(shift.recipient)
            channel, why = pick_channel(reminder, recipient, self.channels)
            if await self._claim(src.company, shift, channel or "", now):
                claimed.append((src, shift, recipient, channel, why))
        return list(
            await asyncio.gather(
                *(self._remind(src, shift, r, ch, why) for src, shift, r, ch, why in claimed)
            )
        )

    async def _claim(self, company: str, shift: ShiftStart, channel: str, now: datetime) -> bool:
        """True when this worker's row went in; False when another worker has it already."""
        values = {
            "company": company, "schedule": shift.schedule, "recipient": shift.recipient,
            "shift_start": shift.start, "channel": channel,
            "status": ReminderStatus.CLAIMED.value, "attempts": 0,
            "claimed_by": self.worker_id, "claimed_at": now,
        }  # fmt: skip
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        stmt = (
            insert(ShiftReminderRow)
            .values(**values)
            .on_conflict_do_nothing()
            .returning(col(ShiftReminderRow.company))
        )
        async with self.db.session() as s, s.begin():
            return (await s.execute(stmt)).first() is not None

    async def _remind(
        self,
        src: crud.ReminderSource,
        shift: ShiftStart,
        recipient: Recipient | None,
        channel: str | None,
        why: str,
    ) -> ReminderOutcome:
        company = src.company
        if channel is None or recipient is None:
            log.warning("no shift reminder for %s on %s (%s): %s",
                        shift.recipient, shift.schedule, company, why)  # fmt: skip
            outcome = ReminderOutcome(company, shift, ReminderStatus.NO_CHANNEL, None, why, 0)
            self._audit(outcome, attempt=0)
            await self._finish(outcome)
            return outcome
        title, summary = reminder_text(src.schedule, shift.start)
        notification = Notification(
            notification_id=reminder_id(company, shift), alert_id="", alert_short_id="",
            channel=channel, contact=contact_point(recipient), title=title, summary=summary,
            severity="info", attempt=1, kind=NotificationKind.SHIFT_REMINDER,
            details={"schedule": shift.schedule, "shift_start": shift.start.isoformat()},
        )  # fmt: skip
        result = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "not_sent")
        attempt = 0
        for attempt in range(1, self.attempts + 1):
            result = await self._send(notification, attempt)
            ok = result.status is DeliveryStatus.DELIVERED
            status = ReminderStatus.SENT if ok else ReminderStatus.FAILED
            self._audit(
                ReminderOutcome(company, shift, status, channel, result.reason, attempt), attempt
            )
            if ok or result.status is not DeliveryStatus.FAILED_RETRYABLE:
                break
            if attempt < self.attempts:
                await self._sleep(self.retry_delay)
                if self._clock() >= shift.start:  # too late to be a reminder now
                    break
        ok = result.status is DeliveryStatus.DELIVERED
        outcome = ReminderOutcome(
            company, shift, ReminderStatus.SENT if ok else ReminderStatus.FAILED,
            channel, result.reason, attempt,
        )  # fmt: skip
        if not ok:
            log.warning("shift reminder for %s on %s (%s) via %s failed after %d attempt(s): %s",
                        shift.recipient, shift.schedule, company, channel, attempt,
                        result.reason)  # fmt: skip
        await self._finish(outcome)
        return outcome

    async def _send(self, notification: Notification, attempt: int) -> DeliveryResult:
        """The channel's verdict, bounded by its deadline; a channel that raises (the
        contract says it must not) or overruns counts as a retryable failure."""
        channel = self.channels[notification.channel]
        n = replace(notification, attempt=attempt)
        try:
            return await asyncio.wait_for(channel.send(n), channel.deadline(n))
        except TimeoutError:
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "deadline_exceeded")
        except Exception as exc:
            log.exception("channel %s raised sending a shift reminder", notification.channel)
            return DeliveryResult(
                DeliveryStatus.FAILED_RETRYABLE, f"channel_error:{type(exc).__name__}"
            )

    def _audit(self, outcome: ReminderOutcome, attempt: int) -> None:
        shift = outcome.shift
        self.audit.write(
            outcome.company,
            [
                {
                    "event": AUDIT_EVENT,
                    "channel": outcome.channel,
                    "status": outcome.status.value,
                    "attempt": attempt,
                    "reason": outcome.reason,
                    "actor": f"worker:{self.worker_id}",
                    "schedule": shift.schedule,
                    "recipient": shift.recipient,
                    "shift_start": shift.start.isoformat(),
                }
            ],
        )

    async def _finish(self, outcome: ReminderOutcome) -> None:
        t = ShiftReminderRow
        shift = outcome.shift
        stmt = (
            update(t)
            .where(
                col(t.company) == outcome.company,
                col(t.schedule) == shift.schedule,
                col(t.recipient) == shift.recipient,
                col(t.shift_start) == shift.start,
            )
            .values(
                status=outcome.status.value, reason=outcome.reason[:200],
                attempts=outcome.attempts, finished_at=utcnow(),
            )
        )  # fmt: skip
        try:
            async with self.db.session() as s, s.begin():
                await s.execute(stmt)
        except Exception as exc:  # the reminder went (or not) either way; the row says claimed
            log.warning("recording the shift reminder for %s on %s failed: %r",
                        shift.recipient, shift.schedule, exc, exc_info=True)  # fmt: skip
