"""Fixtures for escalation and API tests: throwaway real databases on 127.0.0.1.

Load with `pytest_plugins = ["tests.conftest_escalation"]` in a test module.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from escalation.alert_input import AlertIn
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    Progress,
    ProgressSink,
    ignore_progress,
)
from escalation.config import parse_config
from escalation.crud import sync_config
from escalation.engine import Engine, EngineConfig
from escalation.records import AlertRow
from escalation.runner import InProcessBus, Worker
from escalation.unit_of_work import StorePath
from storage.db import Database
from storage.models import Alert

PG_ADMIN = os.environ.get("ACKLINE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ACKLINE_TEST_REDIS", "redis://127.0.0.1:6379/0")


async def create_pg_database() -> str:
    """A fresh database per test so tests never see each other's rows."""
    name = f"ackline_t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


async def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    url = await create_pg_database()
    yield url
    await drop_pg_database(url)


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    return f"sqlite:///{tmp_path}/ackline.db"


@pytest.fixture(params=["sqlite", "postgresql"])
async def db_url(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[str]:
    """Run a test once on the embedded default and once on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/ackline.db"
        return
    url = await create_pg_database()
    yield url
    await drop_pg_database(url)


@dataclass(frozen=True)
class Store:
    """Where an engine test runs: a database, and how the engine reaches it."""

    url: str
    path: StorePath = StorePath.FAST  # SQLite takes the session whatever this says


async def _store(param: str, tmp_path: object) -> AsyncIterator[Store]:
    if param == "sqlite":
        yield Store(f"sqlite:///{tmp_path}/ackline.db", StorePath.SESSION)
        return
    url = await create_pg_database()
    yield Store(url, StorePath(param.removeprefix("pg-")))
    await drop_pg_database(url)


@pytest.fixture(params=["sqlite", "pg-fast", "pg-session"])
async def store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Store]:
    """Run an engine test on every store: SQLite, and PostgreSQL both through the asyncpg
    fast path and through the SQLAlchemy session alone."""
    async for found in _store(request.param, tmp_path):
        yield found


@pytest.fixture(params=["pg-fast", "pg-session"])
async def pg_store(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Store]:
    """An engine test that needs PostgreSQL, on both of its store paths."""
    async for found in _store(request.param, tmp_path):
        yield found


@pytest.fixture
def redis_prefix() -> str:
    """Keys of one test live under their own prefix; nothing else on the server is touched."""
    return f"ackline-test-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------- scripted channel


@dataclass
class Sent:
    at: float  # time.time() when send() was called: the hand-off
    notification: Notification


Script = Callable[[Notification], DeliveryResult | None]


class ScriptedChannel:
    """Test double of an external carrier: answers each send from a script.

    The script returns a DeliveryResult, or None to "ring" until cancel() hangs up (then
    CANCELLED) or `ring_for` seconds pass (then NOT_ACKNOWLEDGED).
    """

    def __init__(
        self, name: str, script: Script, ring_for: float = 5.0, deadline: float = 60.0
    ) -> None:
        self.name = name
        self.script = script
        self.ring_for = ring_for
        self.max_seconds = deadline
        self.progress: dict[str, list[Progress]] = {}
        self.answer = False  # report the "call" as answered before ringing on
        self.sent: list[Sent] = []
        self.cancelled: dict[str, float] = {}
        self._ringing: dict[str, asyncio.Event] = {}

    def deadline(self, notification: Notification) -> float:
        return self.max_seconds

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        self.sent.append(Sent(time.time(), notification))
        if self.answer:
            progress(Progress.ANSWERED)
            self.progress.setdefault(notification.notification_id, []).append(Progress.ANSWERED)
        result = self.script(notification)
        if result is not None:
            return result
        hangup = self._ringing.setdefault(notification.notification_id, asyncio.Event())
        try:
            await asyncio.wait_for(hangup.wait(), self.ring_for)
        except TimeoutError:
            return DeliveryResult(DeliveryStatus.NOT_ACKNOWLEDGED, "no_digit")
        return DeliveryResult(DeliveryStatus.CANCELLED, "hung_up")

    async def cancel(self, notification_id: str) -> None:
        self.cancelled[notification_id] = time.time()
        self._ringing.setdefault(notification_id, asyncio.Event()).set()


def reply(status: DeliveryStatus, reason: str = "scripted") -> Script:
    return lambda _n: DeliveryResult(status, reason, provider_id="p-" + _n.notification_id[:8])


# --------------------------------------------------------------------- engine harness


@dataclass
class Harness:
    db: Database
    engine: Engine
    worker: Worker
    audit: AuditLog
    channels: dict[str, ScriptedChannel]
    company: str = "acme"
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.run(self._stop))

    async def stop_worker(self, grace: float | None = None) -> None:
        """Stop the worker (draining for `grace` s), leaving the database to the test."""
        if grace is not None:
            self.worker.drain_timeout = grace
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    async def stop(self) -> None:
        await self.stop_worker()
        await self.engine.shutdown()
        await self.db.dispose()
        self.audit.close()

    async def ingest(
        self, policy: str = "p", key: str | None = None, **kw: Any
    ) -> Alert | AlertRow:
        body = AlertIn(title=kw.pop("title", "disk full"), policy=policy, **kw)
        result = await self.engine.ingest(self.company, "key-1", key, body, RequestContext("t"))
        return result.alert

    async def state(self, alert_id: str) -> str:
        got = await self.engine.get_alert(alert_id)
        assert got is not None
        return got[0].state

    async def wait_state(self, alert_id: str, *states: str, timeout: float = 10.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = await self.state(alert_id)
            if state in states:
                return state
            await asyncio.sleep(0.02)
        raise AssertionError(f"alert {alert_id} stayed {await self.state(alert_id)}")


async def make_harness(
    where: str | Store,
    audit_dir: Path,
    config: dict[str, Any],
    scripts: dict[str, Script],
    **engine_kw: Any,
) -> Harness:
    """A migrated database with `config` synced, an engine and a worker (not started).
    `where`: a Store, or a database URL (the default store path)."""
    store = where if isinstance(where, Store) else Store(where)
    cfg = parse_config({"company": "acme", **config})
    db = Database(store.url)
    await db.migrate()
    await sync_config(db, cfg)
    audit = AuditLog(audit_dir)
    bus = InProcessBus()
    engine = Engine(
        db, audit, bus,
        EngineConfig(channel_defaults=cfg.channel_defaults, rate_limits=cfg.rate_limits,
                     store_path=store.path, **engine_kw),
    )  # fmt: skip
    channels = {name: ScriptedChannel(name, script) for name, script in scripts.items()}
    worker = Worker(engine, bus, channels, poll_interval=0.2, drain_timeout=2.0)
    return Harness(db, engine, worker, audit, channels)
