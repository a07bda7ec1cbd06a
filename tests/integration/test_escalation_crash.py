"""Redis-backed workers on PostgreSQL: one owner per job, and SIGKILL loses nothing.

The worker runs as a real subprocess (this module's `__main__`) with a carrier double
that logs every hand-off to a file, so the log survives the kill.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from escalation.alert_input import AlertIn
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.channels.base import (
    Channel,
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    ignore_progress,
)
from escalation.config import parse_config
from escalation.crud import sync_config
from escalation.engine import Engine, EngineConfig
from escalation.runner import RedisBus, Worker
from escalation.unit_of_work import StorePath
from storage.db import Database
from storage.models import AlertState
from tests.conftest_escalation import REDIS_URL, Store
from tests.waiting import wait_until

pytest_plugins = ["tests.conftest_escalation"]

ROOT = Path(__file__).resolve().parents[2]
LEASE = 1.0
CONFIG: dict[str, Any] = {
    "company": "acme",
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
    "channel_defaults": {
        "voice": {"attempts": 3, "backoff": "exponential", "base": 0.15, "factor": 2,
                  "max": 1, "fallback_channel": "sms"},
        "sms": {"attempts": 2, "backoff": "linear", "base": 0.15, "factor": 0, "max": 1},
    },
    "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["voice"],
                                          "delay": 30}]}],
}  # fmt: skip


class LoggingCarrier:
    """Voice is always busy; SMS fails once, then the person replies (ack)."""

    def __init__(self, name: str, log: Path, hold: float) -> None:
        self.name = name
        self.log = log
        self.hold = hold

    def deadline(self, n: Notification) -> float:
        return 60.0

    async def send(
        self, n: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        line = {"nid": n.notification_id, "attempt": n.attempt, "channel": n.channel,
                "alert": n.alert_id, "pid": os.getpid(), "at": time.time()}  # fmt: skip
        with self.log.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        await asyncio.sleep(self.hold)  # the call is ringing: a kill can land here
        if n.channel == "sms" and n.attempt == 2:
            return DeliveryResult(DeliveryStatus.ACKNOWLEDGED, "sms_reply")
        return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "busy")

    async def cancel(self, notification_id: str) -> None:
        return None


def engine_for(db: Database, audit: AuditLog, bus: RedisBus, path: StorePath) -> Engine:
    cfg = parse_config(CONFIG)
    config = EngineConfig(cfg.channel_defaults, lease_seconds=LEASE, store_path=path)
    return Engine(db, audit, bus, config)


async def worker_main(db_url: str, prefix: str, log: str, audit_dir: str, path: str) -> None:
    db = Database(db_url)
    bus = RedisBus(REDIS_URL, prefix)
    channels: dict[str, Channel] = {
        ch: LoggingCarrier(ch, Path(log), hold=0.05) for ch in ("voice", "sms")
    }
    engine = engine_for(db, AuditLog(audit_dir), bus, StorePath(path))
    worker = Worker(engine, bus, channels, poll_interval=0.2)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await worker.run(stop)
    await bus.close()


def spawn(store: Store, prefix: str, log: Path, audit: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.integration.test_escalation_crash",
         store.url, prefix, str(log), str(audit), store.path.value],
        cwd=ROOT,
    )  # fmt: skip


def read_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(x) for x in log.read_text().splitlines() if x.strip()]


async def setup(store: Store, prefix: str, audit: Path) -> tuple[Database, RedisBus, Engine]:
    db = Database(store.url)
    await db.migrate()
    await sync_config(db, parse_config(CONFIG))
    bus = RedisBus(REDIS_URL, prefix)
    return db, bus, engine_for(db, AuditLog(audit), bus, store.path)


async def wait_all(engine: Engine, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [(await engine.get_alert(i)) for i in ids]
        if all(s is not None and s[0].state == "acknowledged" for s in states):
            return
        await asyncio.sleep(0.1)
    raise AssertionError("not every alert finished its chain")


async def test_sigkill_mid_chain_resumes_without_loss_or_duplicates(
    pg_store: Store, redis_prefix: str, tmp_path: Path
) -> None:
    log, audit = tmp_path / "sends.jsonl", tmp_path / "audit"
    db, bus, engine = await setup(pg_store, redis_prefix, audit)
    first = spawn(pg_store, redis_prefix, log, audit)
    second = None
    try:
        ids = []
        for i in range(6):
            result = await engine.ingest(
                "acme", "k", f"crash-{i}", AlertIn(title=f"t{i}", policy="p"), RequestContext("t")
            )
            ids.append(result.alert.id)
        await wait_until(lambda: len(read_log(log)) >= 10, 20, "10 lines of the send log")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = read_log(log)
        assert 10 <= len(before) < 30, "the kill must land mid-chain"
        completed = set()
        inflight = set()
        for alert_id in ids:
            got = await engine.get_alert(alert_id)
            assert got is not None
            for a in got[1]:
                if a.status == "sending":
                    inflight.add((a.notification_id, a.attempt))
                elif a.finished_at is not None and a.status != "cancelled":
                    completed.add((a.notification_id, a.attempt))

        second = spawn(pg_store, redis_prefix, log, audit)
        await wait_all(engine, ids, timeout=30)
        sends = read_log(log)
        counts = Counter((s["nid"], s["attempt"]) for s in sends)
        for key in completed:
            assert counts[key] == 1, f"completed attempt {key} was sent again after the crash"
        for key, n in counts.items():
            assert n == 1 or (key in inflight and n == 2), f"{key} sent {n} times"
        for alert_id in ids:
            path = [(s["channel"], s["attempt"]) for s in sends if s["alert"] == alert_id]
            assert sorted(set(path)) == [("sms", 1), ("sms", 2), ("voice", 1), ("voice", 2),
                                         ("voice", 3)]  # fmt: skip
        assert {s["pid"] for s in sends} == {first.pid, second.pid}
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(15)
        await bus.redis.delete(bus.due_key)
        await bus.close()
        await db.dispose()


async def test_several_workers_each_job_owned_once(
    pg_store: Store, redis_prefix: str, tmp_path: Path
) -> None:
    log, audit = tmp_path / "sends.jsonl", tmp_path / "audit"
    db, bus, engine = await setup(pg_store, redis_prefix, audit)
    workers = []
    stop = asyncio.Event()
    try:
        for _ in range(3):
            wdb = Database(pg_store.url)
            wbus = RedisBus(REDIS_URL, redis_prefix)
            channels: dict[str, Channel] = {
                ch: LoggingCarrier(ch, log, hold=0.0) for ch in ("voice", "sms")
            }
            wengine = engine_for(wdb, AuditLog(audit), wbus, pg_store.path)
            w = Worker(wengine, wbus, channels, poll_interval=0.2)
            workers.append((wdb, wbus, asyncio.create_task(w.run(stop))))
        ids = []
        for i in range(40):
            result = await engine.ingest(
                "acme", "k", None, AlertIn(title=f"t{i}", policy="p"), RequestContext("t")
            )
            ids.append(result.alert.id)
        await wait_all(engine, ids, timeout=30)
        counts = Counter((s["nid"], s["attempt"]) for s in read_log(log))
        assert len(counts) == 40 * 5
        assert set(counts.values()) == {1}
        owners = Counter(r["worker"] for r in AuditLog(audit).read("acme") if r["event"] == "send")
        assert len(owners) >= 2  # the work really was shared
        closed = await engine.close(ids[0], AlertState.RESOLVED, RequestContext("t"))
        assert closed is not None
        assert closed.state == "resolved"
    finally:
        stop.set()
        for wdb, wbus, task in workers:
            await task
            await wbus.close()
            await wdb.dispose()
        await bus.redis.delete(bus.due_key)
        await bus.close()
        await db.dispose()


if __name__ == "__main__":
    asyncio.run(worker_main(*sys.argv[1:6]))
