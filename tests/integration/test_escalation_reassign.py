"""A reassign across processes: the API's engine and a worker's talk over Redis."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from escalation.alert_input import AlertIn
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus, Notification
from escalation.config import parse_config
from escalation.core import CancelScope
from escalation.crud import sync_config
from escalation.effects import CancelRequest
from escalation.engine import Engine, EngineConfig
from escalation.runner import RedisBus, Worker
from storage.db import Database
from tests.conftest_escalation import REDIS_URL, ScriptedChannel, Store, make_harness, reply

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus
CONFIG = {
    "company": "acme",
    "recipients": [
        {"id": "alice", "name": "Alice", "phone": "+14155550101"},
        {"id": "bob", "name": "Bob", "phone": "+14155550102"},
    ],
    "policies": [{"name": "ring", "steps": [
        {"recipients": ["alice"], "channels": ["voice"], "delay": "1h"}]}],
}  # fmt: skip
SLOW_POLL = 30.0  # a send that starts in time was found by a wake-up, not the poll


def alice_rings(n: Notification) -> DeliveryResult | None:
    if n.contact.recipient_id == "alice":
        return None
    return DeliveryResult(S.DELIVERED, "answered")


async def _until(cond: object, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


async def test_reassign_over_redis_hangs_up_the_old_call_and_the_worker_pages_the_new_target(
    pg_store: Store, redis_prefix: str, tmp_path: Path
) -> None:
    """The worker's engine cached the alert's plan when it placed Alice's call: the
    reassigned plan (a new revision) must replace it, and the chain's cancel must hang
    up only her call, not Bob's that follows at once."""
    cfg = parse_config(CONFIG)
    db = Database(pg_store.url)
    await db.migrate()
    await sync_config(db, cfg)
    audit = AuditLog(tmp_path / "audit")
    api_bus, worker_bus = RedisBus(REDIS_URL, redis_prefix), RedisBus(REDIS_URL, redis_prefix)
    api = Engine(db, audit, api_bus, EngineConfig(store_path=pg_store.path))
    voice = ScriptedChannel("voice", alice_rings, ring_for=3600.0)
    worker = Worker(Engine(db, audit, worker_bus, EngineConfig(store_path=pg_store.path)),
                    worker_bus, {"voice": voice}, poll_interval=SLOW_POLL)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace=1.0))
    try:
        await asyncio.sleep(0.5)  # subscribed, first pass over
        body = AlertIn(title="disk full", policy="ring")
        alert = (await api.ingest("acme", "key-1", None, body, RequestContext("t"))).alert
        await _until(lambda: len(voice.sent) == 1, "alice's call")
        alice = voice.sent[0].notification.notification_id
        moved = await api.reassign(alert.id, ["bob"], [], RequestContext("carol", "192.0.2.1"),
                                   company="acme")  # fmt: skip
        assert moved is not None
        assert moved.state == "triggered"
        await _until(lambda: alice in voice.cancelled, "alice's call hung up")
        await _until(lambda: len(voice.sent) == 2, "bob's call")
        bob = voice.sent[1].notification
        assert (bob.contact.recipient_id, bob.contact.phone) == ("bob", "+14155550102")
        got = None
        for _ in range(200):
            got = await api.get_alert(alert.id)
            assert got is not None
            if [a.status for a in got[1]] == ["cancelled", "delivered"]:
                break
            await asyncio.sleep(0.02)
        assert got is not None
        assert [(a.recipient_id, a.status) for a in got[1]] == [
            ("alice", "cancelled"), ("bob", "delivered")
        ]  # fmt: skip
        assert bob.notification_id not in voice.cancelled
        records = list(audit.read("acme", alert_id=alert.id))
        [rec] = [r for r in records if r["event"] == "reassigned"]
        assert (rec["from"], rec["to"], rec["actor"], rec["ip"]) == (
            ["alice"], ["bob"], "carol", "192.0.2.1"
        )  # fmt: skip
    finally:
        stop.set()
        await task
        await api_bus.redis.delete(api_bus.due_key)
        for bus in (api_bus, worker_bus):
            await bus.close()
        await db.dispose()
        audit.close()


async def test_a_withdrawn_call_whose_cancel_came_first_is_not_placed(
    store: Store, tmp_path: Path
) -> None:
    """The chain's cancel can reach a worker before the send it stops has started there:
    that send ends cancelled unplaced; the alert's other sends go out."""
    config = {**CONFIG, "policies": [{"name": "both", "steps": [
        {"recipients": ["alice", "bob"], "channels": ["voice"], "delay": "1h"}]}]}  # fmt: skip
    h = await make_harness(store, tmp_path / "audit", config,
                           {"voice": reply(S.DELIVERED, "answered")})  # fmt: skip
    try:
        alert = await h.ingest(policy="both")
        got = await h.engine.get_alert(alert.id)
        assert got is not None
        by_person = {a.recipient_id: a.notification_id for a in got[1]}
        withdrawn = CancelRequest(alert.id, ((by_person["alice"], "voice"),), None,
                                  CancelScope.CHAIN)  # fmt: skip
        await h.worker.cancel(withdrawn)
        assert await h.worker.run_once() == 2
        await h.worker.idle()
        assert [s.notification.contact.recipient_id for s in h.channels["voice"].sent] == ["bob"]
        got = await h.engine.get_alert(alert.id)
        assert got is not None
        assert sorted((a.recipient_id, a.status, a.reason) for a in got[1]) == [
            ("alice", "cancelled", "reassigned_before_send"), ("bob", "delivered", "answered")
        ]  # fmt: skip
    finally:
        await h.stop()
