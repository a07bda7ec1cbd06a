"""The worker's fault paths: nothing it holds is open-ended, nothing is sent or recorded
twice that need not be, and a stop hands work on at once instead of after a lease."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from escalation.alert_input import AlertIn
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus, Notification
from escalation.config import parse_config
from escalation.crud import sync_config
from escalation.engine import Engine, EngineConfig
from escalation.runner import RedisBus, Worker
from storage.db import Database
from storage.models import AlertState
from tests.conftest_escalation import (
    REDIS_URL,
    Harness,
    ScriptedChannel,
    Store,
    make_harness,
    reply,
)
from tests.integration.fault_proxy import FaultProxy

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus
RING = None  # a ScriptedChannel script answer: the call rings until hung up


def ring(_n: Notification) -> DeliveryResult | None:
    return RING


def config(**policy: Any) -> dict[str, Any]:
    return {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "channel_defaults": {
            "voice": {"attempts": 3, "backoff": "linear", "base": 0.2, "factor": 0, "max": 1},
        },
        "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["voice"],
                                              "delay": 600}], **policy}],
    }  # fmt: skip


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def attempts(h: Harness, alert_id: str) -> list[tuple[int, str, str | None]]:
    got = await h.engine.get_alert(alert_id)
    assert got is not None
    return [(a.attempt, a.status, a.reason) for a in got[1]]


@contextlib.asynccontextmanager
async def another_worker(h: Harness) -> AsyncIterator[ScriptedChannel]:
    """A second worker on the harness's engine whose voice channel is answered with 1."""
    voice = ScriptedChannel("voice", reply(S.ACKNOWLEDGED, "pressed_1"))
    worker = Worker(h.engine, h.worker.bus, {"voice": voice}, poll_interval=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace=1.0))
    try:
        yield voice
    finally:
        stop.set()
        await task


def audit_events(h: Harness, event: str) -> list[dict[str, Any]]:
    return [r for r in h.audit.read("acme") if r["event"] == event]


async def test_a_send_that_never_ends_is_hung_up_at_its_deadline(
    store: Store, tmp_path: Path
) -> None:
    """A call that would ring forever (a carrier that died mid-call) ends at the channel's
    deadline: hung up, recorded as a retryable failure, and the chain goes on."""
    h = await make_harness(store, tmp_path / "audit", config(), {"voice": ring})
    voice = h.channels["voice"]
    voice.ring_for = 3600.0
    voice.max_seconds = 0.5
    h.worker.check_interval = 0.1
    h.start()
    try:
        alert = await h.ingest()

        async def retried() -> bool:
            return any(a[0] == 2 for a in await attempts(h, alert.id))

        await until(retried, 10, "the second attempt")
        first = (await attempts(h, alert.id))[0]
        assert first == (1, "failed_retryable", "deadline_exceeded")
        assert voice.sent[0].notification.notification_id in voice.cancelled  # hung up
    finally:
        await h.stop()


async def test_max_duration_exhausts_an_alert_whose_channel_never_reports(
    store: Store, tmp_path: Path
) -> None:
    h = await make_harness(store, tmp_path / "audit", config(max_duration=0.5), {"voice": ring})
    h.channels["voice"].ring_for = 3600.0
    h.start()
    try:
        alert = await h.ingest()
        assert await h.wait_state(alert.id, "exhausted") == "exhausted"
        nid = h.channels["voice"].sent[0].notification.notification_id
        await until(lambda: _true(nid in h.channels["voice"].cancelled), 5, "the hang-up")
    finally:
        await h.stop()


async def _true(value: bool) -> bool:
    return value


async def test_a_result_recorded_twice_is_one_audit_line(store: Store, tmp_path: Path) -> None:
    """A batch whose commit could not be confirmed is retried result by result; a result
    already committed is not recorded (nor audited) again."""
    h = await make_harness(store, tmp_path / "audit", config(), {})
    try:
        alert = await h.ingest()
        [task] = await h.engine.claim("w", 10)
        result = DeliveryResult(S.NOT_ACKNOWLEDGED, "no_digit")
        await h.engine.complete_many([(task, result)], "w")
        await h.engine.complete(task, result, "w")
        results = [r for r in audit_events(h, "result") if r["alert_id"] == alert.id]
        assert len(results) == 1
        retries = [r for r in audit_events(h, "retry") if r["alert_id"] == alert.id]
        assert len(retries) == 1
    finally:
        await h.stop()


async def test_a_stop_hands_ringing_calls_to_another_worker_at_once(
    pg_store: Store, tmp_path: Path
) -> None:
    """Draining, the worker hangs up the call still ringing and releases its job, so the
    next worker places it again at once: not after the 30 s lease."""
    h = await make_harness(pg_store, tmp_path / "audit", config(), {"voice": ring})
    voice = h.channels["voice"]
    voice.ring_for = 3600.0
    h.start()
    alert = await h.ingest()
    await until(lambda: _true(bool(voice.sent)), 10, "the first call")
    stopped = time.monotonic()
    await h.stop_worker(grace=1.0)
    assert time.monotonic() - stopped < 1.0 + 2.5  # the drain ends within its grace
    nid = voice.sent[0].notification.notification_id
    assert nid in voice.cancelled  # hung up

    try:
        async with another_worker(h) as second:
            assert await h.wait_state(alert.id, "acknowledged", timeout=8) == "acknowledged"
        assert [s.notification.notification_id for s in second.sent] == [nid]
        assert [s.notification.attempt for s in second.sent] == [1]
        assert time.monotonic() - stopped < 8
    finally:
        await h.stop()


async def test_a_call_someone_answered_is_not_placed_again_after_its_worker_is_lost(
    pg_store: Store, tmp_path: Path
) -> None:
    """Alice picked up; then her call's worker went away. The next worker does not ring
    her a second time for the same attempt: it records the attempt as answered without a
    key (interrupted), and the policy's retry follows as for any call without a key."""
    h = await make_harness(pg_store, tmp_path / "audit", config(), {"voice": ring})
    voice = h.channels["voice"]
    voice.ring_for = 3600.0
    voice.answer = True
    h.start()
    alert = await h.ingest()

    async def answered() -> bool:
        got = await h.engine.get_alert(alert.id)
        return got is not None and got[1][0].answered_at is not None

    await until(answered, 10, "the answer to be recorded")
    await h.stop_worker(grace=0.5)

    try:
        async with another_worker(h) as second:
            assert await h.wait_state(alert.id, "acknowledged", timeout=10) == "acknowledged"
        placed = Counter((s.notification.notification_id, s.notification.attempt)
                         for s in [*voice.sent, *second.sent])  # fmt: skip
        assert set(placed.values()) == {1}  # no attempt rang twice
        assert [s.notification.attempt for s in second.sent] == [2]  # the policy's retry
        first = (await attempts(h, alert.id))[0]
        assert first == (1, "not_acknowledged", "call_interrupted")
    finally:
        await h.stop()


async def test_with_redis_away_the_worker_polls_and_still_hangs_up_after_an_ack(
    pg_store: Store, redis_prefix: str, tmp_path: Path
) -> None:
    """Redis down: the API's wake-ups and cancels never arrive. The worker still finds new
    work by polling the database and notices the ack on its own check of its calls."""
    cfg = parse_config({"company": "acme", **config()})
    db = Database(pg_store.url)
    await db.migrate()
    await sync_config(db, cfg)
    audit = AuditLog(tmp_path / "audit")
    host, port = REDIS_URL.split("://", 1)[1].split("/")[0].split(":")
    proxy = FaultProxy(host, int(port))
    await proxy.restore()
    url = f"redis://127.0.0.1:{proxy.port}/0"
    api_bus, worker_bus = RedisBus(url, redis_prefix), RedisBus(url, redis_prefix)
    api = Engine(db, audit, api_bus, EngineConfig(cfg.channel_defaults, store_path=pg_store.path))
    voice = ScriptedChannel("voice", ring, ring_for=3600.0)
    engine_config = EngineConfig(cfg.channel_defaults, store_path=pg_store.path)
    worker = Worker(Engine(db, audit, worker_bus, engine_config),
                    worker_bus, {"voice": voice}, poll_interval=0.3,
                    check_interval=0.3)  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace=1.0))
    try:
        await proxy.cut()
        body = AlertIn(title="disk full", policy="p")
        created = await api.ingest("acme", "key-1", None, body, RequestContext("t"))
        await until(lambda: _true(bool(voice.sent)), 5, "the call (found by polling)")
        acked = time.time()
        closed = await api.close(created.alert.id, AlertState.ACKNOWLEDGED, RequestContext("u"))
        assert closed is not None
        assert closed.state == "acknowledged"
        nid = voice.sent[0].notification.notification_id
        await until(lambda: _true(nid in voice.cancelled), 5, "the hang-up after the ack")
        assert voice.cancelled[nid] - acked < 3.0
    finally:
        stop.set()
        await task
        for bus in (api_bus, worker_bus):
            await bus.close()
        await proxy.cut()
        await db.dispose()
        audit.close()
