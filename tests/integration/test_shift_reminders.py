"""Shift reminders against real databases: two workers racing send one reminder per shift
(PostgreSQL), a reminder goes through the real webhook channel to a local receiver, a
failing channel is retried a bounded number of times and audited, a late pass sends only
before the shift starts, and a running worker sends them on its own timer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from escalation.audit import AuditLog
from escalation.channels.base import DeliveryResult, DeliveryStatus, Notification
from escalation.channels.signing import verify_webhook
from escalation.channels.webhook import WebhookChannel
from escalation.config import parse_config
from escalation.crud import sync_config
from escalation.engine import Engine, EngineConfig
from escalation.reminders import ReminderStatus, ShiftReminders
from escalation.runner import InProcessBus, Worker
from storage.db import Database
from storage.models import ShiftReminderRow
from tests.conftest_escalation import ScriptedChannel, reply
from tests.integration.test_channel_webhook import Receiver

pytestmark = pytest.mark.timeout(60)
pytest_plugins = ["tests.conftest_escalation"]

SECRET = "whsec_reminders"
# Alice's first daily shift starts 16 March 2026 09:00 Berlin (08:00 UTC), Bob's the next
# day 09:00, and so on (09:00 CEST, 07:00 UTC, from 29 March).
BERLIN = ZoneInfo("Europe/Berlin")
FIRST = datetime(2026, 3, 16, 8, tzinfo=UTC)
DAY = timedelta(days=1)


def handoff(day: int) -> datetime:
    """Shift `day`'s start: 09:00 Berlin time, whatever the offset."""
    return datetime(2026, 3, 16, 9, tzinfo=BERLIN) + day * DAY  # wall-clock arithmetic


def config(reminder: dict[str, Any], **alice: str) -> dict[str, Any]:
    return {
        "company": "acme",
        "recipients": [
            {"id": "alice", "name": "Alice", "phone": "+14155550101", **alice},
            {"id": "bob", "name": "Bob", "phone": "+14155550102"},
        ],
        "schedules": [{
            "name": "payments", "time_zone": "Europe/Berlin", "reminder": reminder,
            "layers": [{"name": "daily", "rotation": "daily", "handoff": "09:00",
                        "start": "2026-03-16", "participants": ["alice", "bob"]}],
        }],
    }  # fmt: skip


async def database(url: str, cfg: dict[str, Any]) -> Database:
    db = Database(url)
    await db.migrate()
    await sync_config(db, parse_config(cfg))
    return db


def audit_lines(audit_dir: Path) -> list[dict[str, Any]]:
    path = audit_dir / "acme.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


async def rows(db: Database) -> list[ShiftReminderRow]:
    async with db.session() as s:
        return list((await s.execute(select(ShiftReminderRow))).scalars())


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


async def test_two_workers_racing_send_each_reminder_once(pg_url: str, tmp_path: Path) -> None:
    """Two workers, each with its own connections, pass at the same instants: each shift
    start of 20 days (across the change to summer time) is claimed by one and sent once."""
    cfg = config({"before": "15m", "channel": "sms"})
    dbs = [await database(pg_url, cfg), Database(pg_url)]
    audit = AuditLog(tmp_path / "audit")
    channels = [ScriptedChannel("sms", reply(DeliveryStatus.DELIVERED)) for _ in dbs]
    workers = [
        ShiftReminders(db, audit, {"sms": ch}, worker_id=f"w{i}")
        for i, (db, ch) in enumerate(zip(dbs, channels, strict=True))
    ]
    try:
        for day in range(20):
            now = handoff(day) - timedelta(minutes=10)
            # gather starts its coroutines in order and the first usually claims first: swap
            # who starts each day so both sides of the race are exercised
            racers = workers if day % 2 == 0 else workers[::-1]
            got = await asyncio.gather(*(w.run_once(now) for w in racers))
            assert sorted(len(g) for g in got) == [0, 1], (day, got)
            again = await asyncio.gather(*(w.run_once(now + timedelta(minutes=5)) for w in workers))
            assert again == [[], []]
        sent = [s.notification for ch in channels for s in ch.sent]
        assert len(sent) == 20
        assert {(n.contact.recipient_id, n.details["shift_start"]) for n in sent} == {
            ("alice" if day % 2 == 0 else "bob", handoff(day).astimezone(UTC).isoformat())
            for day in range(20)
        }
        assert all(ch.sent for ch in channels), "one worker won every race: not a race"
        stored = await rows(dbs[0])
        assert len(stored) == 20
        assert {r.status for r in stored} == {ReminderStatus.SENT.value}
        lines = [x for x in audit_lines(tmp_path / "audit") if x["event"] == "shift_reminder"]
        assert len(lines) == 20
        assert {x["status"] for x in lines} == {"sent"}
        assert lines[0]["alert_id"] is None
        assert lines[0]["schedule"] == "payments"
    finally:
        for db in dbs:
            await db.dispose()
        audit.close()


async def test_a_reminder_goes_through_the_webhook_channel_to_a_local_receiver(
    sqlite_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    # no channel configured: Alice's first reachable one (she has only a webhook)
    cfg = config({"before": "1h"})
    cfg["recipients"][0] = {"id": "alice", "name": "Alice",
                            "webhook_url": f"{receiver.url}/hooks/oncall"}  # fmt: skip
    db = await database(sqlite_url, cfg)
    audit = AuditLog(tmp_path / "audit")
    webhook = WebhookChannel(SECRET, timeout_s=2)
    reminders = ShiftReminders(db, audit, {"webhook": webhook}, worker_id="w")
    try:
        [outcome] = await reminders.run_once(FIRST - timedelta(minutes=30))
        assert (outcome.status, outcome.channel, outcome.reason) == (
            ReminderStatus.SENT, "webhook", "http_204",
        )  # fmt: skip
        [request] = receiver.requests
        assert request.path == "/hooks/oncall"
        signature = request.headers["x-ackline-signature"]
        assert verify_webhook(signature, request.body, SECRET, now=time.time())
        body = json.loads(request.body)
        assert body["kind"] == "shift_reminder"
        assert body["recipient_id"] == "alice"
        assert body["alert_id"] == ""
        assert body["ack_url"] is None
        assert body["summary"] == (
            "Your on-call shift for payments starts Mon 16 Mar 09:00 CET (Europe/Berlin)."
        )
        assert body["details"] == {"schedule": "payments", "shift_start": FIRST.isoformat()}
        # Bob has only a phone and no channel here can reach him: claimed, said, not sent
        [none] = await reminders.run_once(FIRST + DAY - timedelta(minutes=30))
        assert (none.status, none.reason) == (ReminderStatus.NO_CHANNEL, "no_reachable_channel")
        assert len(receiver.requests) == 1
    finally:
        await webhook.aclose()
        await db.dispose()
        audit.close()


async def test_a_failing_channel_is_retried_a_bounded_number_of_times_and_audited(
    sqlite_url: str, tmp_path: Path
) -> None:
    db = await database(sqlite_url, config({"before": "15m", "channel": "sms"}))
    audit = AuditLog(tmp_path / "audit")
    results = iter([
        DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "twilio_503"),
        DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "twilio_503"),
        DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "twilio_503"),
        DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "twilio_21211"),
    ])  # fmt: skip
    sms = ScriptedChannel("sms", lambda _n: next(results))
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    now = FIRST - timedelta(minutes=10)
    reminders = ShiftReminders(db, audit, {"sms": sms}, worker_id="w", attempts=3,
                               retry_delay=7.0, sleep=sleep, clock=lambda: now)  # fmt: skip
    try:
        [outcome] = await reminders.run_once(now)
        assert (outcome.status, outcome.reason, outcome.attempts) == (
            ReminderStatus.FAILED, "twilio_503", 3,
        )  # fmt: skip
        assert slept == [7.0, 7.0]
        assert [s.notification.attempt for s in sms.sent] == [1, 2, 3]
        lines = audit_lines(tmp_path / "audit")
        assert [(x["status"], x["attempt"], x["reason"]) for x in lines] == [
            ("failed", 1, "twilio_503"), ("failed", 2, "twilio_503"), ("failed", 3, "twilio_503"),
        ]  # fmt: skip
        # the claim stands: no other pass sends it again
        assert await reminders.run_once(now + timedelta(minutes=1)) == []
        [row] = await rows(db)
        assert (row.status, row.attempts, row.reason) == ("failed", 3, "twilio_503")
        # a permanent failure is not retried
        [outcome] = await reminders.run_once(now + DAY)
        assert (outcome.status, outcome.attempts) == (ReminderStatus.FAILED, 1)
    finally:
        await db.dispose()
        audit.close()


async def test_a_late_pass_sends_only_before_the_shift_starts(
    sqlite_url: str, tmp_path: Path
) -> None:
    """No worker ran at 08:45 (15 minutes before): one at 08:59 still sends it; had the
    first pass come at 09:00 or later, the reminder would never be sent."""
    db = await database(sqlite_url, config({"before": "15m", "channel": "sms"}))
    audit = AuditLog(tmp_path / "audit")
    sms = ScriptedChannel("sms", reply(DeliveryStatus.DELIVERED))
    reminders = ShiftReminders(db, audit, {"sms": sms}, worker_id="w")
    try:
        assert await reminders.run_once(FIRST + DAY) == []  # Bob's shift has begun
        assert await reminders.run_once(FIRST + DAY + timedelta(hours=1)) == []
        [late] = await reminders.run_once(FIRST + 2 * DAY - timedelta(minutes=1))
        assert (late.shift.recipient, late.shift.start) == ("alice", FIRST + 2 * DAY)
        assert [s.notification.contact.recipient_id for s in sms.sent] == ["alice"]
    finally:
        await db.dispose()
        audit.close()


async def test_a_running_worker_sends_reminders_on_its_own_timer(
    sqlite_url: str, tmp_path: Path
) -> None:
    db = await database(sqlite_url, config({"before": "15m", "channel": "sms"}))
    audit = AuditLog(tmp_path / "audit")
    got = asyncio.Event()
    sent: list[Notification] = []

    def deliver(n: Notification) -> DeliveryResult:
        sent.append(n)
        got.set()
        return DeliveryResult(DeliveryStatus.DELIVERED, "queued")

    bus = InProcessBus()
    engine = Engine(db, audit, bus, EngineConfig(), clock=lambda: FIRST - timedelta(minutes=5))
    worker = Worker(engine, bus, {"sms": ScriptedChannel("sms", deliver)}, poll_interval=0.2,
                    drain_timeout=1.0, reminder_interval=0.05)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await asyncio.wait_for(got.wait(), 10)
        [n] = sent
        assert (n.contact.recipient_id, n.contact.phone) == ("alice", "+14155550101")
        assert n.title == "On call soon: payments"
    finally:
        stop.set()
        await task
        await engine.shutdown()
        await db.dispose()
        audit.close()
    assert len(sent) == 1  # later passes found it claimed
