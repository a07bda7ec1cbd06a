"""Two engines (two processes' pools) on one PostgreSQL racing for the same alerts.

Every transaction on an alert's chain locks the alert row first, so an ack, a delivery
result and a claim on one alert serialise whichever store path runs them: exactly one
ack wins, none is lost, and no notification is handed out twice or after the ack.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlmodel import col

from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus
from escalation.engine import Engine
from escalation.runner import InProcessBus
from escalation.sends import SendTask
from storage.db import Database
from storage.models import Alert, AlertState, Job, NotificationAttempt
from tests.conftest_escalation import Harness, Store, make_harness

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus
ALERTS = 12
CONFIG = {
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
    # a failed send is retried almost at once: a retry the ack missed would be claimable
    "channel_defaults": {"sms": {"attempts": 3, "backoff": "linear", "base": 0.05,
                                 "factor": 0, "max": 1}},
    "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["sms"],
                                          "delay": "1h"}]}],
}  # fmt: skip


@dataclass
class Pair:
    a: Harness  # its engine: one process
    b: Engine  # another process: its own pool and audit log
    b_audit: AuditLog

    def audit(self, alert_id: str) -> list[dict[str, Any]]:
        lines = [*self.a.audit.read("acme"), *self.b_audit.read("acme")]
        return [r for r in lines if r["alert_id"] == alert_id]


@pytest.fixture
async def pair(pg_store: Store, tmp_path: Path) -> AsyncIterator[Pair]:
    h = await make_harness(pg_store, tmp_path / "a", CONFIG, {})
    db = Database(pg_store.url)
    audit = AuditLog(tmp_path / "b")
    other = Engine(db, audit, InProcessBus(), replace(h.engine.config))
    yield Pair(h, other, audit)
    await other.shutdown()
    await db.dispose()
    audit.close()
    await h.stop()


async def _rows(db: Database, alert_ids: list[str]) -> tuple[dict[str, Alert], list[Any]]:
    async with db.session() as s:
        alerts = await s.scalars(select(Alert).where(col(Alert.id).in_(alert_ids)))
        attempts = await s.scalars(
            select(NotificationAttempt).where(col(NotificationAttempt.alert_id).in_(alert_ids))
        )
        return {a.id: a for a in alerts}, list(attempts)


async def _open_jobs(db: Database, alert_ids: list[str]) -> list[Job]:
    async with db.session() as s:
        jobs = await s.scalars(select(Job).where(col(Job.alert_id).in_(alert_ids), ~col(Job.done)))
        return list(jobs)


async def test_an_ack_racing_a_delivery_result_wins_once_and_nothing_is_sent_after(
    pair: Pair,
) -> None:
    """Each alert's first send is in flight on engine A's worker; engine B acks the alert
    while A records the call's result: the callee's own ack (half of them) or a failure
    that schedules a retry. Whichever commits first, the alert ends acknowledged with one
    `ack` line, the result is recorded once, and no retry survives the ack."""
    h, other = pair.a, pair.b
    alerts = [await h.ingest(title=f"race {i}") for i in range(ALERTS)]
    tasks = {t.notification.alert_id: t for t in await h.engine.claim("worker-a", ALERTS)}
    assert tasks.keys() == {a.id for a in alerts}

    async def race(i: int, alert_id: str) -> None:
        result = (
            DeliveryResult(S.ACKNOWLEDGED, "digit_1")
            if i % 2
            else DeliveryResult(S.FAILED_RETRYABLE, "no_answer")
        )
        ack = other.close(alert_id, AlertState.ACKNOWLEDGED, RequestContext("carol"))
        done = h.engine.complete(tasks[alert_id], result, "worker-a")
        pair_ = [ack, done] if random.random() < 0.5 else [done, ack]
        await asyncio.gather(*pair_)

    await asyncio.gather(*(race(i, a.id) for i, a in enumerate(alerts)))
    await asyncio.sleep(0.2)  # past any retry's due time
    assert await other.claim("worker-b", 100) == []
    assert await h.engine.claim("worker-a", 100) == []

    ids = [a.id for a in alerts]
    found, attempts = await _rows(h.db, ids)
    assert {a.state for a in found.values()} == {AlertState.ACKNOWLEDGED.value}
    assert all(a.acked_by in ("carol", "sms:alice") for a in found.values())
    assert await _open_jobs(h.db, ids) == []
    assert [a for a in attempts if a.status in ("scheduled", "held", "sending")] == []
    for alert_id in ids:
        events = Counter(r["event"] for r in pair.audit(alert_id))
        assert events["ack"] == 1, (alert_id, events)
        assert events["result"] == 1, (alert_id, events)
        first = [a for a in attempts if a.alert_id == alert_id and a.attempt == 1]
        assert len(first) == 1
        assert first[0].status != "scheduled"


async def test_claims_racing_acks_hand_each_send_out_once_and_none_after_its_ack(
    pair: Pair,
) -> None:
    """Both engines claim in a loop while engine B acks the alerts one by one: no
    notification is handed out twice, none after its alert's ack committed, and every
    attempt ends either in flight (claimed before the ack: its worker hangs up) or
    cancelled by the ack."""
    h, other = pair.a, pair.b
    alerts = [await h.ingest(title=f"race {i}") for i in range(ALERTS)]
    ids = [a.id for a in alerts]
    claimed: list[SendTask] = []
    acked = asyncio.Event()

    async def claimer(engine: Engine, owner: str) -> None:
        while not acked.is_set():
            claimed.extend(await engine.claim(owner, 2))
            await asyncio.sleep(random.random() * 0.003)

    async def acker() -> None:
        for alert_id in random.sample(ids, len(ids)):
            await other.close(alert_id, AlertState.ACKNOWLEDGED, RequestContext("carol"))
            await asyncio.sleep(random.random() * 0.003)
        acked.set()

    await asyncio.gather(claimer(h.engine, "worker-a"), claimer(other, "worker-b"), acker())
    assert await h.engine.claim("worker-a", 100) == []

    handed = Counter((t.notification.notification_id, t.notification.attempt) for t in claimed)
    assert [k for k, n in handed.items() if n > 1] == []
    found, attempts = await _rows(h.db, ids)
    assert {a.state for a in found.values()} == {AlertState.ACKNOWLEDGED.value}
    by_nid = {(a.notification_id, a.attempt): a for a in attempts}
    for nid, attempt in handed:
        row = by_nid[(nid, attempt)]
        acked_at = found[row.alert_id].acknowledged_at
        assert row.status == "sending"
        assert row.sent_at is not None
        assert acked_at is not None
        assert row.sent_at <= acked_at
    unclaimed = [a for key, a in by_nid.items() if key not in handed]
    assert {(a.status, a.reason) for a in unclaimed} <= {("cancelled", "alert_closed")}
    assert len(handed) + len(unclaimed) == ALERTS
    # the claimed sends' jobs stay leased to their workers, nothing else is open
    assert {j.alert_id for j in await _open_jobs(h.db, ids)} <= {
        t.notification.alert_id for t in claimed
    }
