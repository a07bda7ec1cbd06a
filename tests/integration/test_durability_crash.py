"""An answered 202 survives a PostgreSQL crash, even on a server tuned to lose commits.

The test owns a PostgreSQL cluster (initdb, its own port and data directory) configured
the way many are tuned, `synchronous_commit = off`, with the WAL writer made slow so that
what is not flushed at commit is certainly still in memory when the server crashes
(`pg_ctl stop -m immediate`: no checkpoint, no flush, crash recovery at the next start).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from bench.ports import free_port
from bench.services import Postgres
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus
from storage.models import AlertState
from tests.conftest_escalation import make_harness

pytest_plugins = ["tests.conftest_escalation"]

CONFIG = {
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
    "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["sms"],
                                          "delay": 600}]}],
}  # fmt: skip


@pytest.fixture
def lossy_postgres(tmp_path: Path) -> Iterator[Postgres]:
    pg = Postgres(
        free_port(),
        tmp_path / "postgres.log",
        {"synchronous_commit": "off", "wal_writer_delay": "10000ms",
         "wal_writer_flush_after": "0", "autovacuum": "off"},
    )  # fmt: skip
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        pg.close()


async def _create_database(pg: Postgres) -> str:
    conn = await asyncpg.connect(pg.url("postgres"))
    try:
        await conn.execute("CREATE DATABASE ackline")
    finally:
        await conn.close()
    return pg.url("ackline")


async def test_what_was_answered_survives_a_crash_of_a_server_set_to_lose_commits(
    lossy_postgres: Postgres, tmp_path: Path
) -> None:
    """Everything that was answered or acted on before the crash is there after it: an
    ack, a pressed 1, a claim (a send handed to a channel) and ten alerts answered 202."""
    url = await _create_database(lossy_postgres)
    h = await make_harness(url, tmp_path / "audit", CONFIG, {})
    try:
        closed = await h.ingest(key="closed")
        await h.engine.close(closed.id, AlertState.ACKNOWLEDGED, RequestContext("api:u"))
        pressed, claimed = await h.ingest(key="pressed"), await h.ingest(key="claimed")
        [task] = await h.engine.claim("w", 1)
        assert task.notification.alert_id == pressed.id
        result = DeliveryResult(DeliveryStatus.ACKNOWLEDGED, "pressed_1")
        await h.engine.complete(task, result, "w")
        [handed_out] = await h.engine.claim("w", 1)
        assert handed_out.notification.alert_id == claimed.id
        answered = [await h.ingest(key=f"late-{i}") for i in range(10)]
    finally:
        await h.engine.shutdown()
        await h.db.dispose()
        h.audit.close()
    await asyncio.to_thread(lossy_postgres.crash)
    await asyncio.to_thread(lossy_postgres.start)

    conn = await asyncpg.connect(url)
    try:
        states = {r["id"]: r["state"] for r in await conn.fetch("SELECT id, state FROM alerts")}
        owner = await conn.fetchval("SELECT owner FROM jobs WHERE id = $1", handed_out.job_id)
    finally:
        await conn.close()
    lost = {a.id for a in answered} - set(states)
    assert not lost, f"{len(lost)} of 10 alerts answered 202 were lost"
    assert owner == "w", "a claim was lost: its send would be handed out twice"
    assert (states[closed.id], states[pressed.id]) == ("acknowledged", "acknowledged")
