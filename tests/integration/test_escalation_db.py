"""The alembic migration creates exactly the schema the models describe, on both backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from escalation.config import AcklineConfig
from escalation.crud import list_recipients, sync_config
from escalation.db import Database
from escalation.engine import _PG_RESULT_ROWS, _WorkerTx
from escalation.models import IdempotencyKey, Job

pytest_plugins = ["tests.conftest_escalation"]


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
            assert job.due_at == due and job.due_at.tzinfo is not None
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


async def test_worker_transactions_do_not_reuse_plans_made_on_young_tables(pg_url: str) -> None:
    """A generic plan cached while the tables were empty scans them whole for the life of
    the connection; inside a worker transaction each statement is planned afresh."""
    db = Database(pg_url)
    await db.migrate()
    await db.dispose()
    conn = await asyncpg.connect(pg_url)
    try:
        # After five runs on the empty tables PostgreSQL settles on a generic plan.
        await conn.execute(f"PREPARE result_rows(int[], int[]) AS {_PG_RESULT_ROWS}")
        run = "EXECUTE result_rows('{1, 2}', '{1, 2}')"
        for _ in range(8):
            await conn.fetch(run)
        await conn.execute(
            "INSERT INTO notification_attempts (company, alert_id, notification_id, attempt, "
            "channel, recipient_id, round, step, status, scheduled_for) "
            "SELECT 'c', 'a', 'n' || g, 1, 'sms', 'r', 0, 0, 'sending', now() "
            "FROM generate_series(1, 20000) g"
        )

        async def plan() -> str:
            return "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {run}"))

        assert "Seq Scan on notification_attempts" in await plan()  # the stale plan
        async with _WorkerTx(conn):
            fresh = await plan()
        assert "Seq Scan on notification_attempts" not in fresh
        assert "notification_attempts_pkey" in fresh
    finally:
        await conn.close()


async def test_orm_connections_plan_each_statement_afresh(pg_url: str) -> None:
    db = Database(pg_url)
    try:
        async with db.session() as s:
            assert await s.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
    finally:
        await db.dispose()
