"""One transaction of the engine, on either store.

The engine's transactions are written once against the `UnitOfWork` protocol (and a
decision against its `Staging` part). `SessionUnit` runs them on SQLAlchemy, for SQLite
and PostgreSQL alike; `DriverUnit` is the optional PostgreSQL fast path on the asyncpg
pool, used only where prepared SQL measurably speeds things up: closes and results,
batched into few statements. The ingest and the claim have one-statement fast paths
of their own (`StagedRows` with pg_sql.PG_INGEST, and pg_sql.PG_CLAIM); everything else
takes the session on either path.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Collection, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import insert, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from escalation import crud, pg_sql
from escalation.channels.base import DeliveryResult
from escalation.core import CancelScope
from escalation.effects import Effects, NewJob
from escalation.records import (
    ATTEMPTS,
    OPEN_STATES,
    AlertRecord,
    AlertRow,
    AttemptRecord,
    JobRecord,
)
from escalation.schedules import Override, Schedule
from storage.db import Database
from storage.models import Alert, IdempotencyKey, Job, JobKind, NotificationAttempt

_JOBS = Job.__table__  # type: ignore[attr-defined]

OnCallSources = dict[str, tuple[Schedule, list[Override]]]


class StorePath(enum.Enum):
    """How the engine reaches PostgreSQL (SQLite always takes the session)."""

    FAST = "fast"  # asyncpg prepared statements where they apply, the session elsewhere
    SESSION = "session"  # SQLAlchemy only


class Staging(Protocol):
    """What a decision needs from its transaction: somewhere to put the rows it makes,
    a way to cancel an alert's chain, and the schedules' on-call sources."""

    async def insert(
        self, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: Effects
    ) -> None:
        """Write the staged rows (and empty the lists); new jobs go into `fx`."""

    async def cancel_all(
        self, alert_id: str, now: datetime, scope: CancelScope
    ) -> list[tuple[str, str]]:
        """Cancel every job and open attempt of the alert except the sends in flight on
        a live lease, which are returned (notification id, channel) to be hung up."""

    async def oncall_sources(
        self, company: str, names: Collection[str], now: datetime
    ) -> OnCallSources: ...


class UnitOfWork(Staging, Protocol):
    """A transaction that locks alerts, records results and writes decisions back."""

    async def lock_alert(self, alert_id: str) -> Alert | None: ...

    async def lock_alerts(self, alert_ids: Collection[str]) -> dict[str, AlertRecord]:
        """Lock the alerts in id order (one lock order everywhere: no deadlocks)."""

    async def result_rows(
        self, job_ids: Collection[int], attempt_ids: Collection[int]
    ) -> tuple[dict[int, JobRecord], dict[int, AttemptRecord]]: ...

    async def record_result(
        self, job: JobRecord, row: AttemptRecord, result: DeliveryResult, now: datetime
    ) -> None:
        """The job done (unless cancelled meanwhile: that outcome stays), the result on
        the attempt."""

    async def save_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        """Write back what decisions changed on locked alerts."""


class SessionUnit:
    """The transaction on a SQLAlchemy session (both dialects)."""

    def __init__(self, session: AsyncSession, is_sqlite: bool) -> None:
        self.session = session
        self.is_sqlite = is_sqlite

    @classmethod
    @asynccontextmanager
    async def begin(cls, db: Database) -> AsyncIterator[SessionUnit]:
        async with db.session() as s, s.begin():
            yield cls(s, db.is_sqlite)

    async def lock_alert(self, alert_id: str) -> Alert | None:
        result = await self.session.execute(
            select(Alert).where(col(Alert.id) == alert_id).with_for_update()
        )
        return result.scalar_one_or_none()

    async def lock_alerts(self, alert_ids: Collection[str]) -> dict[str, AlertRecord]:
        res = await self.session.execute(
            select(Alert)
            .where(col(Alert.id).in_(alert_ids))
            .order_by(col(Alert.id))
            .with_for_update()
        )
        return {a.id: a for a in res.scalars()}

    async def result_rows(
        self, job_ids: Collection[int], attempt_ids: Collection[int]
    ) -> tuple[dict[int, JobRecord], dict[int, AttemptRecord]]:
        s = self.session
        jobs = await s.execute(
            select(col(Job.id), col(Job.owner), col(Job.done)).where(col(Job.id).in_(job_ids))
        )
        rows = await s.execute(
            select(
                col(NotificationAttempt.id), col(NotificationAttempt.notification_id),
                col(NotificationAttempt.attempt), col(NotificationAttempt.channel),
                col(NotificationAttempt.recipient_id), col(NotificationAttempt.status),
            ).where(col(NotificationAttempt.id).in_(attempt_ids))
        )  # fmt: skip
        return (
            {j.id: JobRecord(j.id, j.owner, j.done) for j in jobs},
            {
                r.id: AttemptRecord(
                    r.id, r.notification_id, r.attempt, r.channel, r.recipient_id, r.status
                )
                for r in rows
            },
        )

    async def record_result(
        self, job: JobRecord, row: AttemptRecord, result: DeliveryResult, now: datetime
    ) -> None:
        s = self.session
        if not job.done:
            await s.execute(
                update(Job).where(col(Job.id) == job.id).values(done=True, outcome="done")
                .execution_options(synchronize_session=False)
            )  # fmt: skip
        await s.execute(
            update(NotificationAttempt)
            .where(col(NotificationAttempt.id) == row.id)
            .values(status=result.status.value, reason=result.reason,
                    provider_id=result.provider_id, finished_at=now)
            .execution_options(synchronize_session=False)
        )  # fmt: skip

    async def save_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        """Nothing to do: the session's alerts are ORM instances, flushed at commit."""

    async def insert(
        self, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: Effects
    ) -> None:
        """Bulk Core inserts: building ORM objects for new attempts and jobs was most of
        the CPU cost of an ingest."""
        if attempts:
            await self.session.execute(insert(ATTEMPTS), attempts)
            attempts.clear()
        if jobs:
            res = await self.session.execute(
                insert(_JOBS).returning(_JOBS.c.id, sort_by_parameter_order=True), jobs
            )
            for job_id, row in zip(res.scalars(), jobs, strict=True):
                assert job_id is not None
                fx.jobs.append(NewJob(job_id, row["alert_id"], row["kind"], row["due_at"]))
            jobs.clear()

    async def cancel_all(
        self, alert_id: str, now: datetime, scope: CancelScope
    ) -> list[tuple[str, str]]:
        """(See pg_sql.PG_CANCEL_ALL for why live sends are left to their workers.)"""
        s = self.session
        await s.flush()
        undone = (
            await s.scalars(select(Job).where(col(Job.alert_id) == alert_id, ~col(Job.done)))
        ).all()
        live = {
            (job.payload["nid"], job.payload["attempt"])
            for job in undone
            if job.kind == JobKind.SEND.value
            and job.owner is not None
            and job.lease_until is not None
            and job.lease_until >= now
        }
        keep_cap = scope is CancelScope.SNOOZE  # a snooze is no way around max_duration
        for job in undone:
            if keep_cap and job.kind == JobKind.CAP.value:
                continue
            if (job.payload.get("nid"), job.payload.get("attempt")) not in live:
                job.done, job.outcome = True, "cancelled"
        inflight = []
        for row in await s.scalars(
            select(NotificationAttempt).where(
                col(NotificationAttempt.alert_id) == alert_id,
                col(NotificationAttempt.status).in_(OPEN_STATES),
            )
        ):
            if (row.notification_id, row.attempt) in live:
                inflight.append((row.notification_id, row.channel))
            else:
                row.status, row.reason, row.finished_at = "cancelled", scope.value, now
        return inflight

    async def oncall_sources(
        self, company: str, names: Collection[str], now: datetime
    ) -> OnCallSources:
        return await crud.oncall_sources(self.session, company, names, now)

    # -------------------------------------------------------------- dialect specifics

    def insert_ignore(self, table: type[IdempotencyKey]) -> Any:
        """INSERT .. ON CONFLICT DO NOTHING for the database in use."""
        if self.is_sqlite:
            return sqlite_insert(table).on_conflict_do_nothing()
        return pg_insert(table).on_conflict_do_nothing()

    async def commit_without_flush(self) -> None:
        """Let bookkeeping that a crash would only make happen again commit without the
        WAL flush wait on PostgreSQL (see pg_sql.PG_ASYNC_COMMIT)."""
        if not self.is_sqlite:
            await self.session.execute(text(pg_sql.PG_ASYNC_COMMIT))

    async def plan_claim_by_index(self) -> None:
        """PostgreSQL: the claim's joins by index lookups (see pg_sql.PG_CLAIM_JOINS)."""
        if not self.is_sqlite:
            for setting in pg_sql.PG_CLAIM_JOINS:
                await self.session.execute(text(setting))


class DriverUnit:
    """The transaction as prepared SQL on one driver connection (PostgreSQL). Results are
    batched: written before an alert's cancel-all reads them (as the ORM's flush does)
    and when the alerts are saved."""

    def __init__(self, raw: Any, db: Database) -> None:
        self.raw = raw
        self.db = db
        self._done: list[int] = []
        self._recorded: dict[int, tuple[str, str | None, str | None]] = {}  # by attempt row
        self._now: datetime | None = None

    @classmethod
    @asynccontextmanager
    async def begin(cls, db: Database) -> AsyncIterator[DriverUnit]:
        async with db.driver_connection() as raw, raw.transaction():
            yield cls(raw, db)

    async def lock_alert(self, alert_id: str) -> Alert | None:
        row = await self.raw.fetchrow(pg_sql.PG_LOCK_ALERT, alert_id)
        return None if row is None else Alert(**dict(row))

    async def lock_alerts(self, alert_ids: Collection[str]) -> dict[str, AlertRecord]:
        rows = await self.raw.fetch(pg_sql.PG_LOCK_ALERTS, list(alert_ids))
        return {r["id"]: AlertRow(r) for r in rows}

    async def result_rows(
        self, job_ids: Collection[int], attempt_ids: Collection[int]
    ) -> tuple[dict[int, JobRecord], dict[int, AttemptRecord]]:
        jobs: dict[int, JobRecord] = {}
        rows: dict[int, AttemptRecord] = {}
        for r in await self.raw.fetch(pg_sql.PG_RESULT_ROWS, list(job_ids), list(attempt_ids)):
            if r["is_job"]:
                jobs[r["id"]] = JobRecord(r["id"], r["owner"], r["done"])
            else:
                rows[r["id"]] = AttemptRecord(
                    r["id"], r["notification_id"], r["attempt"], r["channel"],
                    r["recipient_id"], r["status"],
                )  # fmt: skip
        return jobs, rows

    async def record_result(
        self, job: JobRecord, row: AttemptRecord, result: DeliveryResult, now: datetime
    ) -> None:
        self._done.append(job.id)
        self._recorded[row.id] = (result.status.value, result.reason, result.provider_id)
        self._now = now

    async def _flush(self) -> None:
        if not self._done and not self._recorded:
            return
        results = list(self._recorded.values())
        await self.raw.execute(
            pg_sql.PG_RECORD_RESULTS, self._done, list(self._recorded),
            [r[0] for r in results], [r[1] for r in results], [r[2] for r in results],
            self._now,
        )  # fmt: skip
        self._done.clear()
        self._recorded.clear()

    async def save_alerts(self, alerts: Sequence[AlertRecord]) -> None:
        await self._flush()
        if alerts:
            await pg_sql.update_alerts(self.raw, alerts)

    async def insert(
        self, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: Effects
    ) -> None:
        await pg_sql.insert_rows(self.raw, attempts, jobs, fx)

    async def cancel_all(
        self, alert_id: str, now: datetime, scope: CancelScope
    ) -> list[tuple[str, str]]:
        await self._flush()
        return await pg_sql.cancel_all(self.raw, alert_id, now, scope)

    async def oncall_sources(
        self, company: str, names: Collection[str], now: datetime
    ) -> OnCallSources:
        async with self.db.session() as s:  # a read needs no lock
            return await crud.oncall_sources(s, company, names, now)


class StagedRows:
    """The first decision of a new alert on the fast path: it needs nothing from the
    database, so its rows are only collected, to go in with the alert in one statement
    (see pg_sql.PG_INGEST)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.attempts: list[dict[str, Any]] = []
        self.jobs: list[dict[str, Any]] = []

    async def insert(
        self, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: Effects
    ) -> None:
        self.attempts.extend(attempts)
        self.jobs.extend(jobs)
        attempts.clear()
        jobs.clear()

    async def cancel_all(
        self, alert_id: str, now: datetime, scope: CancelScope
    ) -> list[tuple[str, str]]:
        raise AssertionError("a new alert's first decision cancels nothing")

    async def oncall_sources(
        self, company: str, names: Collection[str], now: datetime
    ) -> OnCallSources:
        async with self.db.session() as s:
            return await crud.oncall_sources(s, company, names, now)
