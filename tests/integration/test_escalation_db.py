"""The alembic migration creates exactly the schema the models describe, on both backends."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import event, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from api.app import start_runtime, stop_runtime
from api.settings import Settings
from escalation import pg_sql
from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus
from escalation.config import AcklineConfig
from escalation.crud import list_recipients, sync_config
from storage.db import Database
from storage.models import AlertState, IdempotencyKey, Job, PolicyRow
from tests.conftest_escalation import Store, make_harness, reply

pytest_plugins = ["tests.conftest_escalation"]
S = DeliveryStatus


def _diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, SQLModel.metadata))


async def test_migration_matches_models_and_is_rerunnable(db_url: str) -> None:
    db = Database(db_url)
    try:
        await asyncio.gather(db.migrate(), db.migrate())  # concurrent starters
        await db.migrate()
        async with db.engine.connect() as conn:
            assert await conn.run_sync(_diff) == []
    finally:
        await db.dispose()


async def test_a_release_starts_on_a_schema_its_successor_migrated(
    db_url: str, caplog: Any
) -> None:
    """Rolling back, or an old node restarting mid-deploy: a schema past this release's
    head (expand-only migrations) is used as it is, not refused and not touched."""
    db = Database(db_url)
    try:
        await db.migrate()
        async with db.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '9001'"))
        with caplog.at_level(logging.WARNING, logger="storage.db"):
            await db.migrate()
        assert "newer than this release knows" in caplog.text
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT version_num FROM alembic_version"))).all() \
                == [("9001",)]  # fmt: skip
    finally:
        await db.dispose()


async def test_times_round_trip_as_utc_and_idempotency_is_unique(db_url: str) -> None:
    db = Database(db_url)
    await db.migrate()
    try:
        due = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC) + timedelta(microseconds=7)
        async with db.session() as s, s.begin():
            s.add(Job(alert_id="a", kind="step", due_at=due, created_at=due))
            s.add(
                IdempotencyKey(api_key_hash="h", idempotency_key="k", alert_id="a", created_at=due)
            )
        async with db.session() as s:
            job = (await s.execute(select(Job))).scalar_one()
            assert job.due_at == due
            assert job.due_at.tzinfo is not None
        dup = IdempotencyKey(api_key_hash="h", idempotency_key="k", alert_id="b", created_at=due)
        async with db.session() as s:
            s.add(dup)
            try:
                await s.commit()
            except IntegrityError:
                await s.rollback()
            else:
                raise AssertionError("duplicate idempotency key was accepted")
    finally:
        await db.dispose()


async def test_processes_starting_together_sync_one_config_file(db_url: str) -> None:
    """`--role api` and `--role worker` start at once and both load ackline.yaml: the first
    to write must not make the other fail on the recipient it just inserted."""
    cfg = AcklineConfig.model_validate(
        {
            "company": "acme",
            "recipients": [
                {"id": f"r{i}", "name": f"R{i}", "phone": f"+1415555{i:04d}"}
                for i in range(100, 130)
            ],
            "groups": [{"name": "ops", "members": ["r100", "r101"]}],
            "policies": [{"name": "p", "steps": [{"groups": ["ops"], "channels": ["sms"]}]}],
        }
    )
    starters = [Database(db_url) for _ in range(4)]  # separate pools, like processes
    try:
        await starters[0].migrate()
        await asyncio.gather(*(sync_config(db, cfg) for db in starters))
        assert [r.id for r in await list_recipients(starters[0], "acme")] == [
            r.id for r in cfg.recipients
        ]
    finally:
        for db in starters:
            await db.dispose()


def _driver_statements() -> dict[str, str]:
    """Every prepared statement the engine runs on the driver pool (pg_sql's `PG_*`)."""
    found = {
        name: sql
        for name, sql in vars(pg_sql).items()
        if name.startswith("PG_")
        and isinstance(sql, str)
        and sql.lstrip().upper().startswith(("WITH", "SELECT", "INSERT", "UPDATE", "DELETE"))
    }
    found |= {f"PG_INGEST[{keyed}]": sql for keyed, sql in pg_sql.PG_INGEST.items()}
    return found


def _plan_nodes(node: dict[str, Any]) -> list[dict[str, Any]]:
    return [node, *(n for child in node.get("Plans", []) for n in _plan_nodes(child))]


# The first column of an index, the one a scan must constrain to seek rather than walk it.
_LEADING_COLUMN = (
    "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indexrelid = $1::regclass"
)


async def test_driver_statements_plan_once_by_index_even_on_empty_tables(pg_url: str) -> None:
    """The driver pool keeps one generic plan per statement for the connection's life.
    Planned on empty tables without statistics, each must still seek its rows by index:
    a sequential scan, a hash join, or an index walked whole (a condition on its second
    column only) would grow with every alert stored; a bitmap scan revisits every dead
    row version its index still lists until a VACUUM (it never marks them dead), which
    without autovacuum is forever: the claim grew from 0.6 to 3.6 ms in a 60 s bench."""
    db = Database(pg_url, pool_size=2)
    await db.migrate()
    try:
        pool = await db.driver_pool()
        assert pool.get_size() == 2  # opened up front, not by the first alert
        statements = _driver_statements()
        assert {"PG_CLAIM", "PG_RECORD_RESULTS", "PG_CANCEL_ALL"} <= statements.keys()
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            for name, sql in statements.items():
                params = len((await conn.prepare(sql)).get_parameters())
                await conn.execute(f"PREPARE probe AS {sql}")
                args = f"({', '.join(['NULL'] * params)})" if params else ""
                # (the pool decodes json itself)
                [plan] = await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE probe{args}")
                await conn.execute("DEALLOCATE probe")
                bad = [
                    (n["Node Type"], n.get("Relation Name"))
                    for n in _plan_nodes(plan["Plan"])
                    if n["Node Type"] in ("Seq Scan", "Bitmap Heap Scan", "Hash Join", "Merge Join")
                ]
                assert bad == [], f"{name}: {bad}"
                for n in _plan_nodes(plan["Plan"]):
                    if n["Node Type"] in ("Index Scan", "Index Only Scan"):
                        leading = await conn.fetchval(_LEADING_COLUMN, n["Index Name"])
                        assert re.search(rf"\b{leading}\b", n.get("Index Cond", "")), (
                            f"{name}: walks all of {n['Index Name']} ({n.get('Index Cond')})"
                        )
    finally:
        await db.dispose()


async def test_orm_connections_plan_each_statement_afresh(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        async with db.session() as s:
            assert await s.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
    finally:
        await db.dispose()


async def _timed(coro: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    result = await coro
    return result, time.perf_counter() - start


async def test_commits_before_side_effects_wait_for_the_wal_flush_whatever_the_server_says(
    pg_store: Store, tmp_path: Path
) -> None:
    """The server is tuned the way many are, `synchronous_commit = off` (here for this
    database), and told to wait 100 ms before each WAL flush (commit_delay): a commit
    that waits for durability takes those 100 ms, one that does not takes none of them.
    An ingest (the 202 promises the alert survives a crash), a claim (lost, the same
    notification would be handed out again), a delivery result (lost, the job would be
    sent again when its lease runs out), a person's answer and an ack all wait; only lease
    renewals and the cleanup of old jobs, which a crash would simply repeat, do not."""
    name = pg_store.url.rsplit("/", 1)[1]
    admin = Database(pg_store.url.rsplit("/", 1)[0] + "/test")
    try:
        async with admin.engine.connect() as conn:
            await conn.execute(text("COMMIT"))
            for setting in ("synchronous_commit = off", "commit_delay = 100000",
                            "commit_siblings = 0"):  # fmt: skip
                await conn.execute(text(f'ALTER DATABASE "{name}" SET {setting}'))
    finally:
        await admin.dispose()
    cfg = {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "policies": [{"name": "p", "steps": [
            {"recipients": ["alice"], "channels": ["sms"], "delay": 600},
            {"recipients": ["alice"], "channels": ["sms"], "delay": 600},
        ]}],
    }  # fmt: skip
    h = await make_harness(
        pg_store, tmp_path / "audit", cfg, {"sms": reply(S.DELIVERED)}, done_job_retention=0
    )
    try:
        async with h.db.every_driver_connection() as held:
            assert await held[0].fetchval("SHOW synchronous_commit") == "on"
        delay = 0.1

        first, waited = await _timed(h.ingest())
        assert waited >= delay, "the ingest answered before its commit was flushed"
        [task], waited = await _timed(h.engine.claim("w", 10))
        assert waited >= delay, "the claim handed a notification out before it was flushed"
        _, waited = await _timed(h.engine.renew("w", [task.job_id]))
        assert waited < delay / 2, "a lease renewal waited for the WAL flush"
        delivered = DeliveryResult(S.DELIVERED, "accepted")
        _, waited = await _timed(h.engine.complete(task, delivered, "w"))
        assert waited >= delay, "a delivery result was recorded without waiting for the flush"

        second = await h.ingest()
        [task] = await h.engine.claim("w", 10)
        pressed_2 = DeliveryResult(S.ESCALATE, "digit_2")
        _, waited = await _timed(h.engine.complete(task, pressed_2, "w"))
        assert waited >= delay, "a pressed 2 was recorded without waiting for the flush"
        got = await h.engine.get_alert(second.id)
        assert got is not None
        assert {a.step for a in got[1]} == {0, 1}  # the next step fired
        _, waited = await _timed(
            h.engine.close(first.id, AlertState.ACKNOWLEDGED, RequestContext("api:u"))
        )
        assert waited >= delay, "an ack answered before its commit was flushed"
        _, waited = await _timed(h.engine.purge_done_jobs())
        assert waited < delay / 2, "the cleanup of done jobs waited for the WAL flush"
    finally:
        await h.stop()


async def test_warm_up_primes_every_driver_connection_and_writes_nothing(
    pg_url: str, tmp_path: Path
) -> None:
    """Each pooled connection has run every driver statement once (its server process
    holds it prepared) before the first alert, and the tables are as empty as before."""
    h = await make_harness(pg_url, tmp_path / "audit", {"recipients": []}, {})
    try:
        await h.engine.warm_up()
        async with h.db.every_driver_connection() as held:
            for conn in held:
                prepared = {r[0] for r in await conn.fetch(
                    "SELECT statement FROM pg_prepared_statements"
                )}  # fmt: skip
                missing = [n for n, sql in _driver_statements().items() if sql not in prepared]
                assert missing == []
            counts = await held[0].fetchrow(
                "SELECT (SELECT count(*) FROM alerts) a, (SELECT count(*) FROM jobs) j, "
                "(SELECT count(*) FROM notification_attempts) n, "
                "(SELECT count(*) FROM idempotency_keys) k"
            )
            assert tuple(counts) == (0, 0, 0, 0)
    finally:
        await h.stop()


def _count_policy_loads(db: Database) -> list[str]:
    """Every statement that reads the policies table, as the database sees them."""
    seen: list[str] = []

    @event.listens_for(db.engine.sync_engine, "before_cursor_execute")
    def _seen(_c: Any, _cur: Any, statement: str, *_args: Any) -> None:
        if "FROM policies" in statement:
            seen.append(statement)

    return seen


# This test and the next are about the fast path's ingest, which resolves policies outside
# its transaction (PlanCache.resolved); the session's ingest loads them inside it.
async def test_a_burst_of_alerts_loads_its_policy_once_and_edits_still_apply(
    pg_url: str, tmp_path: Path
) -> None:
    """Thirty alerts arriving together on a cold cache share one load of their policy;
    a steady stream keeps the cached plan fresh in the background (it never expires
    under the stream's feet), and another process's edit reaches new alerts within
    about `plan_ttl`."""
    ttl = 0.4
    cfg = {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101",
                        "email": "alice@example.com"}],
        "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["sms"]}]}],
    }  # fmt: skip
    h = await make_harness(pg_url, tmp_path / "audit", cfg, {}, plan_ttl=ttl)
    try:
        loads = _count_policy_loads(h.db)
        burst = await asyncio.gather(*(h.ingest() for _ in range(30)))
        assert len({a.id for a in burst}) == 30
        assert len(loads) == 1

        other = Database(pg_url)  # another process edits the policy
        try:
            async with other.session() as s, s.begin():
                row = await s.get(PolicyRow, ("acme", "p"))
                assert row is not None
                row.spec = {**row.spec, "steps": [{"recipients": ["alice"], "channels": ["email"]}]}
        finally:
            await other.dispose()
        edited = time.monotonic()
        channels: list[tuple[float, str]] = []
        while time.monotonic() - edited < 3 * ttl:
            start = time.perf_counter()
            alert = await h.ingest()
            assert time.perf_counter() - start < ttl / 2  # none waited out a reload
            got = await h.engine.get_alert(alert.id)
            assert got is not None
            channels.append((time.monotonic() - edited, got[1][0].channel))
            await asyncio.sleep(0.02)
        assert {ch for t, ch in channels if t > ttl * 1.25} == {"email"}
        assert channels[0][1] == "sms"  # cached: the edit is not seen at once
        # the stream was served by background reloads: about one per 3/4 ttl
        assert 2 <= len(loads) <= 1 + 3 * ttl / (0.75 * ttl) + 2
    finally:
        await h.stop()


async def test_shutdown_ends_a_background_policy_refresh(
    pg_url: str, tmp_path: Path, caplog: Any
) -> None:
    """A plan refresh started by the last alert before shutdown ends with the engine
    (here it is stuck behind another session's lock): no task outlives the stop, and
    nothing is logged as a failed load."""
    ttl = 2.0
    cfg = {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["sms"]}]}],
    }  # fmt: skip
    h = await make_harness(pg_url, tmp_path / "audit", cfg, {}, plan_ttl=ttl)
    other = Database(pg_url)  # another process holds the policies table
    stopped = False
    try:
        await h.ingest()
        await asyncio.sleep(ttl * 0.8)  # into the last quarter: the next alert refreshes
        async with other.session() as s, s.begin():
            await s.execute(text("LOCK TABLE policies IN ACCESS EXCLUSIVE MODE"))
            # served from the cache (it never waits on the lock); the refresh does wait
            await asyncio.wait_for(h.ingest(), 1.0)
            refreshing = [t for t in asyncio.all_tasks() if t.get_name().startswith("plan-")]
            assert len(refreshing) == 1
            await asyncio.sleep(0.1)
            assert not refreshing[0].done()
            await asyncio.wait_for(h.stop(), 5)
            stopped = True
            assert refreshing[0].done()
    finally:
        if not stopped:
            await h.stop()
        await other.dispose()
    assert [r.getMessage() for r in caplog.records if "loading policy" in r.getMessage()] == []


async def test_start_up_warns_when_nothing_vacuums_the_tables(
    pg_url: str, tmp_path: Path, caplog: Any
) -> None:
    """Without autovacuum the dead rows every sent notification leaves pile up: the
    server's setting and a table's own opt-out are both reported at start-up."""
    db = Database(pg_url)
    try:
        await db.migrate()
        async with db.engine.connect() as conn:
            server_on = (await conn.execute(text("SHOW autovacuum"))).scalar_one() == "on"
        warned = await db.vacuum_warnings()
        assert len(warned) == (0 if server_on else 1)
        assert all("autovacuum is off on this PostgreSQL server" in w for w in warned)
        async with db.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE jobs SET (autovacuum_enabled = false)"))
            await conn.execute(text("ALTER TABLE alerts SET (autovacuum_enabled = off)"))
            await conn.execute(text("ALTER TABLE recipients SET (autovacuum_enabled = on)"))
    finally:
        await db.dispose()
    settings = Settings(database_url=pg_url, audit_dir=tmp_path / "audit")
    with caplog.at_level(logging.WARNING, logger="api.app"):
        runtime = await start_runtime(settings)
        await stop_runtime(runtime)
    logged = [r.getMessage() for r in caplog.records if r.name == "api.app"]
    assert "autovacuum is disabled on table(s) alerts, jobs" in logged
    assert any("nothing reclaims the dead rows" in m for m in logged) is not server_on
