"""A policy step that pages a schedule pages whoever is on call when the step fires."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from escalation import crud
from escalation.channels.base import DeliveryStatus
from escalation.schedules import Override
from tests.conftest_escalation import Store, make_harness, reply

pytest_plugins = ["tests.conftest_escalation"]

PEOPLE = [
    {"id": "alice", "name": "Alice", "phone": "+14155550101"},
    {"id": "bob", "name": "Bob", "phone": "+14155550102"},
    {"id": "carol", "name": "Carol", "phone": "+14155550103"},
]


async def test_schedule_step_pages_who_is_on_call_at_fire_time_and_audits_it(
    store: Store, tmp_path: Path
) -> None:
    today = datetime.now(UTC).date()
    cfg = {
        "recipients": PEOPLE,
        # alice's week starts today at 00:00 UTC; bob's is next
        "schedules": [{"name": "payments", "time_zone": "UTC", "layers": [
            {"name": "primary", "rotation": "weekly", "handoff": "00:00",
             "start": today.isoformat(), "participants": ["alice", "bob"]},
        ]}],
        "policies": [{"name": "p", "steps": [
            {"schedules": ["payments"], "recipients": ["carol"], "channels": ["sms"],
             "delay": 0.5},
            {"schedules": ["payments"], "channels": ["sms"], "delay": 30},
        ]}],
    }  # fmt: skip
    h = await make_harness(store, tmp_path / "audit", cfg, {"sms": reply(DeliveryStatus.DELIVERED)})
    h.start()
    try:
        alert = await h.ingest()  # step 0 fires now: alice is on call
        now = datetime.now(UTC)
        cover = Override(
            schedule="payments",
            recipient="bob",
            replaces="alice",
            start=now - timedelta(minutes=1),
            end=now + timedelta(hours=1),
        )
        stored = await crud.add_override(h.db, "acme", cover, "test")  # fmt: skip
        for _ in range(200):
            if len(h.channels["sms"].sent) >= 3:
                break
            await asyncio.sleep(0.02)
        # a hotline bridging to this policy's first step reaches who is on call now
        bridged = await h.engine.first_responders("acme", "p")
        assert [c.recipient_id for c in bridged] == ["carol", "bob"]
        paged = [(s.notification.contact.recipient_id) for s in h.channels["sms"].sent]
        assert sorted(paged[:2]) == ["alice", "carol"]
        assert paged[2:] == ["bob"]
        chosen = [
            (r["step"], r["recipient_id"], r["schedule"], r["layer"], r["override"])
            for r in h.audit.read("acme", alert_id=alert.id)
            if r["event"] == "oncall"
        ]
        assert chosen == [
            (0, "alice", "payments", "primary", None),
            (1, "bob", "payments", "primary", stored.id),
        ]
    finally:
        await h.stop()


async def test_nobody_on_call_is_audited_and_the_chain_goes_on(
    store: Store, tmp_path: Path
) -> None:
    later = (datetime.now(UTC) + timedelta(days=3)).date()  # the rota has not begun
    cfg = {
        "recipients": PEOPLE,
        "schedules": [{"name": "payments", "time_zone": "Europe/Berlin", "layers": [
            {"name": "primary", "rotation": "daily", "start": later.isoformat(),
             "participants": ["alice"]},
        ]}],
        "policies": [{"name": "p", "steps": [
            {"schedules": ["payments"], "channels": ["sms"], "delay": 0.1},
            {"recipients": ["carol"], "channels": ["sms"], "delay": 30},
        ]}],
    }  # fmt: skip
    h = await make_harness(store, tmp_path / "audit", cfg, {"sms": reply(DeliveryStatus.DELIVERED)})
    h.start()
    try:
        alert = await h.ingest()
        for _ in range(200):
            if h.channels["sms"].sent:
                break
            await asyncio.sleep(0.02)
        assert [s.notification.contact.recipient_id for s in h.channels["sms"].sent] == ["carol"]
        [line] = [r for r in h.audit.read("acme", alert_id=alert.id) if r["event"] == "oncall"]
        assert (line["status"], line["schedule"], line["layer"]) == ("nobody", "payments", None)
    finally:
        await h.stop()
