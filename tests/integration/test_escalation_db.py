"""The alembic migration creates exactly the schema the models describe, on both backends."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from escalation.config import AcklineConfig
from escalation.crud import list_recipients, sync_config
from escalation.db import Database
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
