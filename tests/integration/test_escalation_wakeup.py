"""Workers learn about new work from the bus, not the poll; done jobs are cleaned up."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlmodel import col

from escalation.alert_input import AlertIn
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryStatus
from escalation.config import parse_config
from escalation.crud import sync_config
from escalation.engine import Engine, EngineConfig
from escalation.runner import RedisBus, Worker
from storage.db import Database
from storage.models import Job, utcnow
from tests.conftest_escalation import REDIS_URL, ScriptedChannel, Store, make_harness, reply

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus

CONFIG = {
    "recipients": [{"id": "svc", "name": "Hook", "webhook_url": "http://127.0.0.1:9/h"}],
    "policies": [
        {"name": "p", "steps": [{"recipients": ["svc"], "channels": ["webhook"], "delay": "1h"}]}
    ],
}
# Far longer than the test may take: a job handed off in time was found by a wake-up.
SLOW_POLL = 30.0


async def _sent_within(channel: ScriptedChannel, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if channel.sent:
            return True
        await asyncio.sleep(0.01)
    return False


async def test_in_process_wake_up_hands_off_before_the_poll(store: Store, tmp_path: Path) -> None:
    h = await make_harness(store, tmp_path / "audit", CONFIG, {"webhook": reply(S.DELIVERED)})
    h.worker.poll_interval = SLOW_POLL
    h.start()
    try:
        await asyncio.sleep(0.3)  # the first (empty) pass is over: the worker waits
        await h.ingest()
        assert await _sent_within(h.channels["webhook"], 2.0)
    finally:
        await h.stop()


async def test_redis_wake_up_hands_off_before_the_poll(
    pg_store: Store, redis_prefix: str, tmp_path: Path
) -> None:
    """API and worker as separate engines (separate processes in production)."""
    cfg = parse_config({"company": "acme", **CONFIG})
    db = Database(pg_store.url)
    await db.migrate()
    await sync_config(db, cfg)
    audit = AuditLog(tmp_path / "audit")
    api_bus, worker_bus = RedisBus(REDIS_URL, redis_prefix), RedisBus(REDIS_URL, redis_prefix)
    api = Engine(db, audit, api_bus, EngineConfig(store_path=pg_store.path))
    channel = ScriptedChannel("webhook", reply(S.DELIVERED))
    worker = Worker(
        Engine(db, audit, worker_bus, EngineConfig(store_path=pg_store.path)), worker_bus,
        {"webhook": channel}, poll_interval=SLOW_POLL,
    )  # fmt: skip
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop, grace=1.0))
    try:
        await asyncio.sleep(0.5)  # subscribed, first pass over
        body = AlertIn(title="disk full", policy="p")
        await api.ingest("acme", "key-1", None, body, RequestContext("t"))
        assert await _sent_within(channel, 2.0)
    finally:
        stop.set()
        await task
        await api_bus.redis.delete(api_bus.due_key)
        for bus in (api_bus, worker_bus):
            await bus.close()
        await db.dispose()
        audit.close()


async def _add_jobs(db: Database, specs: list[tuple[str, bool, timedelta]]) -> dict[str, int]:
    """Jobs named by alert id: (name, done, age of the due time)."""
    now = utcnow()
    async with db.session() as s, s.begin():
        jobs = {
            name: Job(alert_id=name, kind="step", due_at=now - age, created_at=now - age,
                      done=done, outcome="done" if done else None)
            for name, done, age in specs
        }  # fmt: skip
        s.add_all(jobs.values())
    return {name: j.id or 0 for name, j in jobs.items()}


async def _job_names(db: Database) -> set[str]:
    async with db.session() as s:
        return set((await s.execute(select(col(Job.alert_id)))).scalars())


async def test_purge_deletes_only_done_jobs_older_than_the_retention(
    store: Store, tmp_path: Path
) -> None:
    h = await make_harness(store, tmp_path / "audit", CONFIG, {}, done_job_retention=86400.0)
    try:
        day, hour = timedelta(days=1), timedelta(hours=1)
        await _add_jobs(h.db, [
            ("old-done-1", True, 3 * day), ("old-done-2", True, 2 * day + hour),
            ("old-done-3", True, day + hour), ("recent-done", True, hour),
            ("old-undone", False, 5 * day), ("future-undone", False, -hour),
        ])  # fmt: skip
        # bounded: at most `limit` per call, oldest first
        assert await h.engine.purge_done_jobs(limit=2) == 2
        assert await _job_names(h.db) == {"old-done-3", "recent-done", "old-undone",
                                          "future-undone"}  # fmt: skip
        assert await h.engine.purge_done_jobs(limit=2) == 1
        assert await h.engine.purge_done_jobs(limit=2) == 0
        assert await _job_names(h.db) == {"recent-done", "old-undone", "future-undone"}
    finally:
        await h.stop()


async def test_worker_purges_done_jobs_and_keeps_pending_ones(store: Store, tmp_path: Path) -> None:
    """With no retention, the worker's cleanup removes the delivered send's job; the
    alert's next-step timer (due in an hour) stays, and so does the attempt row."""
    h = await make_harness(
        store, tmp_path / "audit", {**CONFIG, "policies": [{"name": "p", "steps": [
            {"recipients": ["svc"], "channels": ["webhook"], "delay": "1h"},
            {"recipients": ["svc"], "channels": ["webhook"], "delay": "1h"},
        ]}]}, {"webhook": reply(S.DELIVERED)}, done_job_retention=0.0,
    )  # fmt: skip
    h.worker.purge_interval = 0.05
    h.start()
    try:
        alert = await h.ingest()
        assert await _sent_within(h.channels["webhook"], 5.0)
        await h.worker.idle()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            async with h.db.session() as s:
                jobs = list((await s.execute(select(Job))).scalars())
            if all(not j.done for j in jobs):
                break
            await asyncio.sleep(0.05)
        assert jobs, [(j.kind, j.done) for j in jobs]
        assert all(not j.done for j in jobs), [(j.kind, j.done) for j in jobs]
        kinds = {j.kind for j in jobs}
        assert "step" in kinds
        assert kinds <= {"step", "cap"}  # the next step, still pending
        got = await h.engine.get_alert(alert.id)
        assert got is not None
        assert [a.status for a in got[1]] == ["delivered"]
    finally:
        await h.stop()
