"""The engine's transactions: ingest, timers and claims, results, ack/resolve.

Every transaction that touches an alert's chain first locks the alert row, runs the
decision core and applies its actions before committing; side effects that cannot be
rolled back (audit lines, wake-ups, hanging up calls) happen only after the commit
(effects.py). The transactions are written against a unit of work (unit_of_work.py):
the SQLAlchemy session on either database, or on PostgreSQL the asyncpg fast path
where it measurably helps (`StorePath`).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from escalation import metrics, pg_sql, schedules
from escalation.alert_input import AlertIn, api_key_hash, short_id
from escalation.audit import AuditLog
from escalation.audit_records import ENGINE, RequestContext
from escalation.channels.base import ContactPoint, DeliveryResult, DeliveryStatus, Notification
from escalation.channels.signing import sign_ack
from escalation.config import RateLimit, RetryPolicy
from escalation.core import (
    Audit,
    CancelAll,
    CapTimer,
    Chain,
    Close,
    Dispatch,
    EscalateNow,
    Event,
    Outcome,
    Plan,
    Reassign,
    ScheduleCap,
    ScheduleStep,
    Start,
    StepTimer,
    Transition,
    contact_point,
    decide,
    may_fire_step,
    step_targets,
)
from escalation.effects import AfterCommit, Bus, CancelRequest, Effects, NewJob
from escalation.plan_cache import PlanCache, recipient
from escalation.rate_limits import BatchLimiter, Verdict, bundle
from escalation.records import (
    ALERT_COLUMNS,
    ALERTS,
    INFLIGHT,
    OPEN_STATES,
    AlertRecord,
    AlertRow,
    AlertView,
    AttemptRecord,
    SendAlert,
)
from escalation.sends import SendTask, members, record_results
from escalation.unit_of_work import (
    DriverUnit,
    SessionUnit,
    StagedRows,
    Staging,
    StorePath,
    UnitOfWork,
)
from storage.db import Database
from storage.models import (
    Alert,
    AlertState,
    GroupRow,
    IdempotencyKey,
    Job,
    JobKind,
    NotificationAttempt,
    RecipientRow,
    utcnow,
)


class AlertClosed(Exception):
    """Escalate or reassign asked of an alert no longer triggered (args[0]: its state)."""


class BadTarget(ValueError):
    """A reassign named recipients or groups the company does not have (or nobody)."""


class _Retry(Exception):
    """Roll the transaction back and run it again."""


@dataclass
class EngineConfig:
    channel_defaults: Mapping[str, RetryPolicy] = field(default_factory=dict)
    rate_limits: Mapping[str, RateLimit] = field(default_factory=dict)
    public_url: str | None = None  # base for signed one-click ack links
    ack_secret: str | None = None
    ack_link_ttl: float = 7 * 86400.0
    lease_seconds: float = 30.0
    plan_ttl: float = 2.0  # how long a resolved policy is reused for new alerts
    # Done jobs whose due time is longer ago than this are deleted by the workers, a
    # bounded batch at a time (`Engine.purge_done_jobs`); the attempts and the audit log
    # keep the history. Far longer than any lease: a result for a job that is gone is
    # recorded as stale.
    done_job_retention: float = 86400.0
    # PostgreSQL: prepared asyncpg statements where they apply (FAST), or SQLAlchemy
    # only (SESSION: the same transactions, slower). SQLite always takes the session.
    store_path: StorePath = StorePath.FAST

    def rate_limit_for(self, channel: str) -> RateLimit | None:
        return self.rate_limits.get(channel) or self.rate_limits.get("default")


@dataclass
class IngestResult:
    alert: AlertRecord
    created: bool
    deduplicated: bool = False


# Built once: the claim runs several times a second per worker.
_CLAIM = (
    select(Job, Alert)
    .join(Alert, col(Alert.id) == col(Job.alert_id))
    .where(
        ~col(Job.done),
        col(Job.due_at) <= bindparam("now"),
        or_(col(Job.lease_until).is_(None), col(Job.lease_until) < bindparam("now")),
    )
    .order_by(col(Job.due_at), col(Job.id))
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)


def _job_row(
    alert_id: str, kind: JobKind, payload: dict[str, Any], due: datetime, now: datetime
) -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": kind.value, "payload": payload, "due_at": due,
            "created_at": now, "attempts": 0, "done": False}  # fmt: skip


class Engine:
    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        bus: Bus,
        config: EngineConfig | None = None,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.audit = audit
        self.bus = bus
        self.config = config or EngineConfig()
        self.clock = clock
        self.plans = PlanCache(db, clock, self.config.channel_defaults, self.config.plan_ttl)
        self._after_commit = AfterCommit(audit, bus).run
        # the asyncpg fast path: PostgreSQL, unless the session path is asked for
        self._fast = self.config.store_path is StorePath.FAST and not db.is_sqlite

    # ------------------------------------------------------------------ plumbing

    def _unit(self) -> AbstractAsyncContextManager[UnitOfWork]:
        """A transaction on the store in use."""
        if self._fast:
            return DriverUnit.begin(self.db)
        return SessionUnit.begin(self.db)

    async def _decide(
        self,
        unit: Staging,
        alert: AlertRecord,
        event: Event,
        now: datetime,
        ctx: RequestContext,
        fx: Effects,
    ) -> None:
        """Run the core on a locked alert and stage its actions in the transaction.

        New attempts and jobs go in as bulk inserts (`unit.insert`): building ORM objects
        for them was most of the CPU cost of an ingest."""
        plan = self.plans.parsed(alert)
        oncall = await self._oncall(unit, alert.company, plan, event, now)
        decision = decide(
            AlertState(alert.state),
            plan,
            Chain.from_json(alert.chain),
            event,
            now,
            lambda: str(uuid.uuid4()),
            oncall,
        )
        alert.chain = decision.chain.to_json()
        alert.updated_at = now
        if decision.plan is not None:
            alert.plan = decision.plan.to_json()
            plan = decision.plan
            self.plans.replaced(alert.id, plan)
        attempts: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        for a in decision.actions:
            if isinstance(a, Dispatch):
                attempts.append({
                    "company": alert.company, "alert_id": alert.id,
                    "notification_id": a.notification_id, "attempt": a.attempt,
                    "channel": a.channel, "recipient_id": a.recipient_id,
                    "address": plan.address(a.recipient_id, a.channel), "round": a.round,
                    "step": a.step, "status": "scheduled", "reason": a.reason,
                    "scheduled_for": a.due_at,
                })  # fmt: skip
                payload = {"nid": a.notification_id, "attempt": a.attempt}
                jobs.append(_job_row(alert.id, JobKind.SEND, payload, a.due_at, now))
            elif isinstance(a, ScheduleStep):
                payload = {"round": a.round, "step": a.step}
                jobs.append(_job_row(alert.id, JobKind.STEP, payload, a.due_at, now))
            elif isinstance(a, ScheduleCap):
                jobs.append(_job_row(alert.id, JobKind.CAP, {}, a.due_at, now))
            elif isinstance(a, Transition):
                self._transition(alert, a, now)
                fx.closed.append(a.state.value)
            elif isinstance(a, CancelAll):
                await unit.insert(attempts, jobs, fx)  # the cancel must see them
                inflight = await unit.cancel_all(alert.id, now, a.scope)
                fx.cancels.append(CancelRequest(alert.id, tuple(inflight), None, a.scope))
            else:
                assert isinstance(a, Audit)
                rec = a.record()
                if rec["actor"] is None:
                    rec["actor"] = ctx.actor
                fx.record(alert, ctx, now, **rec)
        await unit.insert(attempts, jobs, fx)

    async def _oncall(
        self, unit: Staging, company: str, plan: Plan, event: Event, now: datetime
    ) -> dict[str, schedules.OnCall]:
        """Who the plan's schedules have on call at `now`, when the event may fire a step:
        a step pages whoever is on call when it fires, not when the alert started."""
        if not plan.schedules or not may_fire_step(event):
            return {}
        found = await unit.oncall_sources(company, plan.schedules, now)
        return {n: schedules.oncall(sch, ovr, now) for n, (sch, ovr) in found.items()}

    @staticmethod
    def _transition(alert: AlertRecord, t: Transition, now: datetime) -> None:
        alert.state = t.state.value
        alert.close_reason = t.reason or t.state.value
        if t.state is AlertState.ACKNOWLEDGED:
            alert.acknowledged_at, alert.acked_by = now, t.actor
        elif t.state is AlertState.RESOLVED:
            alert.resolved_at, alert.resolved_by = now, t.actor
            alert.open_dedup_key = None
        elif t.state is AlertState.EXHAUSTED:
            alert.exhausted_at = now
            alert.open_dedup_key = None

    # ------------------------------------------------------------------ ingest

    def invalidate_plans(self, company: str) -> None:
        """Forget resolved policies after a policy/recipient/group change in this process."""
        self.plans.invalidate(company)

    async def ingest(
        self,
        company: str,
        api_key: str,
        idempotency_key: str | None,
        body: AlertIn,
        ctx: RequestContext,
    ) -> IngestResult:
        """Commit the alert and its first step before returning; duplicates page nobody.

        A concurrent duplicate collides on the idempotency (or open dedup key) constraint;
        the loser rolls back and finds the winner's alert on the next pass.
        """
        key_hash = api_key_hash(api_key)
        if self._fast and body.dedup_key is None:
            fx = Effects()
            created = await self._ingest_fast(company, key_hash, idempotency_key, body, ctx, fx)
            if created is not None:
                await self._after_commit(fx)
                metrics.ALERTS_INGESTED.labels("created").inc()
                return created
            # a replay or a collision: the general path below sorts it out
        for _ in range(5):
            fx = Effects()
            try:
                async with SessionUnit.begin(self.db) as unit:
                    result = await self._ingest_tx(
                        unit, company, key_hash, idempotency_key, body, ctx, fx
                    )
            except (IntegrityError, _Retry):
                continue
            await self._after_commit(fx)
            outcome = "created" if result.created else "deduplicated"
            metrics.ALERTS_INGESTED.labels(outcome).inc()
            return result
        raise RuntimeError("ingest kept colliding; giving up")

    async def _ingest_tx(
        self,
        unit: SessionUnit,
        company: str,
        key_hash: str,
        idempotency_key: str | None,
        body: AlertIn,
        ctx: RequestContext,
        fx: Effects,
    ) -> IngestResult:
        """Claim the idempotency key first (one INSERT .. ON CONFLICT DO NOTHING instead of
        a lookup plus an insert), then insert the alert with Core: no ORM unit of work, no
        reload after commit. A key that is taken means a replay: return the first alert."""
        s = unit.session
        now = self.clock()
        alert_id = str(uuid.uuid4())
        if idempotency_key is not None:
            claimed = await s.execute(
                unit.insert_ignore(IdempotencyKey)
                .values(api_key_hash=key_hash, idempotency_key=idempotency_key,
                        alert_id=alert_id, created_at=now)
                .returning(col(IdempotencyKey.alert_id))
            )  # fmt: skip
            if claimed.first() is None:
                seen = await s.scalar(
                    select(col(IdempotencyKey.alert_id)).where(
                        col(IdempotencyKey.api_key_hash) == key_hash,
                        col(IdempotencyKey.idempotency_key) == idempotency_key,
                    )
                )
                first = None if seen is None else await s.get(Alert, seen)
                if first is None:  # the other request rolled back after all: try again
                    raise _Retry
                return IngestResult(first, created=False)
        if body.dedup_key is not None:
            res = await s.execute(
                select(Alert)
                .where(col(Alert.company) == company, col(Alert.open_dedup_key) == body.dedup_key)
                .with_for_update()
            )
            existing = res.scalar_one_or_none()
            if existing is not None:
                existing.dup_count += 1
                if idempotency_key is not None:
                    await s.execute(
                        update(IdempotencyKey)
                        .where(
                            col(IdempotencyKey.api_key_hash) == key_hash,
                            col(IdempotencyKey.idempotency_key) == idempotency_key,
                        )
                        .values(alert_id=existing.id)
                    )
                fx.record(
                    existing, ctx, now, event="deduplicated", status=existing.state,
                    reason=f"dedup_key:{body.dedup_key}",
                )  # fmt: skip
                return IngestResult(existing, created=False, deduplicated=True)
        plan, plan_json = await self.plans.in_session(s, company, body.policy)
        alert = self._new_alert(company, body, plan_json, now, alert_id)
        fx.record(
            alert, ctx, now, event="created", status="triggered", reason=body.policy,
            severity=body.severity, title=body.title,
        )  # fmt: skip
        # Not added to the session: the row goes in below, once the first decision has
        # shaped its chain (no foreign keys, so the order of the inserts is free).
        await self._decide(unit, alert, Start(), now, ctx, fx)
        await s.execute(insert(ALERTS), [alert.as_dict()])
        self.plans.remember(alert.id, company, body.policy, plan, plan_json)
        return IngestResult(alert, created=True)

    async def _ingest_fast(
        self,
        company: str,
        key_hash: str,
        idempotency_key: str | None,
        body: AlertIn,
        ctx: RequestContext,
        fx: Effects,
    ) -> IngestResult | None:
        """PostgreSQL, no dedup key: the rows `_ingest_tx` writes, as one prepared
        statement on the driver connection (one round trip, committed and flushed before
        it answers; SQLAlchemy's per-statement overhead was most of an ingest's CPU time,
        then the round trips). None when the key is taken (a replay) or a constraint
        fired: the caller then takes the general path, which finds the first alert and
        pages nobody."""
        plan, plan_json = await self.plans.resolved(company, body.policy)
        now = self.clock()
        alert = self._new_alert(company, body, plan_json, now)
        fx.record(
            alert, ctx, now, event="created", status="triggered", reason=body.policy,
            severity=body.severity, title=body.title,
        )  # fmt: skip
        # The first decision needs nothing from the database: stage its rows, then write
        # everything in one statement (see pg_sql.PG_INGEST).
        staged = StagedRows(self.db)
        await self._decide(staged, alert, Start(), now, ctx, fx)
        try:
            async with self.db.driver_connection() as raw:
                row = await raw.fetchrow(
                    pg_sql.PG_INGEST[idempotency_key is not None],
                    key_hash, idempotency_key, alert.id, now,
                    *pg_sql.alert_args(alert, self.plans.text(plan_json)),
                    *([a[c] for a in staged.attempts] for c in pg_sql.PG_ATTEMPT_COLUMNS),
                    *pg_sql.job_arrays(staged.jobs),
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return None
        if not row["claimed"]:
            return None  # a replay
        for job_id, job in zip(row["ids"], staged.jobs, strict=True):
            fx.jobs.append(NewJob(job_id, job["alert_id"], job["kind"], job["due_at"]))
        self.plans.remember(alert.id, company, body.policy, plan, plan_json)
        return IngestResult(alert, created=True)

    async def warm_up(self) -> None:
        """The fast path: run every driver statement once on each pooled connection, with
        arguments that match no row (the inserts in a transaction rolled back), so its
        server process has loaded the catalogs and cached the plan before the first
        alert. Cold, a statement's first run took ~4 ms instead of 0.3, and the first
        storm after a start met ten cold connections at once: a quarter of a dispatch
        bench's slowest hand-offs came in its first second."""
        if not self._fast:
            return
        async with self.db.every_driver_connection() as held:
            await asyncio.gather(*(self._warm_up(raw) for raw in held))

    async def _warm_up(self, raw: Any) -> None:
        past = datetime(2000, 1, 1, tzinfo=UTC)
        alert = self._new_alert("-", AlertIn(title="-", policy="-"), {}, past)
        await raw.fetch(pg_sql.PG_CLAIM, past, 0, "-", past)
        await raw.fetch(pg_sql.PG_LOCK_ALERTS, [alert.id])
        await raw.fetchrow(pg_sql.PG_LOCK_ALERT, alert.id)
        await raw.fetch(pg_sql.PG_RESULT_ROWS, [], [])
        await raw.execute(pg_sql.PG_RECORD_RESULTS, [], [], [], [], [], past)
        await pg_sql.cancel_all(raw, alert.id, past)
        await pg_sql.update_alerts(raw, [alert])
        await raw.fetch(pg_sql.PG_INSERT_JOBS, *pg_sql.job_arrays([]))
        attempt = {c: None for c in pg_sql.PG_ATTEMPT_COLUMNS} | {
            "company": "-", "alert_id": alert.id, "notification_id": alert.id, "attempt": 1,
            "channel": "-", "recipient_id": "-", "round": 0, "step": 0, "status": "-",
            "scheduled_for": past,
        }  # fmt: skip
        no_rows: list[list[Any]] = [[] for _ in pg_sql.PG_ATTEMPT_COLUMNS]
        rollback = raw.transaction()
        await rollback.start()
        try:
            await pg_sql.insert_rows(raw, [attempt], [], Effects())
            for keyed, sql in pg_sql.PG_INGEST.items():
                new = self._new_alert("-", AlertIn(title="-", policy="-"), {}, past)
                await raw.fetchrow(
                    sql, "-", "-" if keyed else None, new.id, past,
                    *pg_sql.alert_args(new), *no_rows, *pg_sql.job_arrays([]),
                )  # fmt: skip
        finally:
            await rollback.rollback()

    async def first_responders(self, company: str, policy: str) -> list[ContactPoint]:
        """Who the policy's first step pages, in order (a hotline bridges callers to them).

        Raises UnknownPolicy."""
        plan, _ = await self.plans.resolved(company, policy)
        if not plan.steps:
            return []
        oncall = {}
        if plan.steps[0].schedules:  # whoever is on call now
            async with self.db.session() as s:
                unit = SessionUnit(s, self.db.is_sqlite)
                oncall = await self._oncall(unit, company, plan, Start(), self.clock())
        seen: dict[str, ContactPoint] = {}
        for target in step_targets(plan.steps[0], oncall):
            if target.recipient_id not in seen and target.recipient_id in plan.contacts:
                seen[target.recipient_id] = plan.contacts[target.recipient_id]
        return list(seen.values())

    async def shutdown(self) -> None:
        """End the background plan refreshes before the database goes away."""
        await self.plans.shutdown()

    @staticmethod
    def _new_alert(
        company: str,
        body: AlertIn,
        plan_json: dict[str, Any],
        now: datetime,
        alert_id: str | None = None,
    ) -> AlertRow:
        """The new alert as a plain record with every column (the row is inserted with
        Core or prepared SQL, never through the ORM, and an ORM instance costs ~0.1 ms
        to build: a twentieth of an ingest's CPU time)."""
        return AlertRow(dict.fromkeys(ALERT_COLUMNS) | {
            "id": alert_id or str(uuid.uuid4()), "company": company, "short_id": short_id(),
            "title": body.title, "summary": body.summary, "severity": body.severity,
            "policy": body.policy, "dedup_key": body.dedup_key,
            "open_dedup_key": body.dedup_key, "details": body.details,
            "state": AlertState.TRIGGERED.value, "plan": plan_json,
            "chain": Chain().to_json(), "dup_count": 0, "created_at": now, "updated_at": now,
        })  # fmt: skip

    # ------------------------------------------------------------------ ack / resolve

    async def close(
        self,
        alert_id: str,
        state: AlertState,
        ctx: RequestContext,
        *,
        company: str | None = None,
        reason: str = "",
    ) -> Alert | None:
        """Ack or resolve: one commit cancels every scheduled notification of the alert;
        in-flight ones are hung up right after. None if the alert does not exist."""
        fx = Effects()
        async with self._unit() as unit:
            alert = await unit.lock_alert(alert_id)
            if alert is None or (company is not None and alert.company != company):
                return None
            await self._decide(unit, alert, Close(state, ctx.actor, reason), self.clock(), ctx, fx)
            await unit.save_alerts([alert])
        await self._after_commit(fx)
        return alert

    async def ack_by_address(
        self, address: str, channels: Sequence[str], short: str | None, ctx: RequestContext
    ) -> Alert | None:
        """Ack from a reply (SMS "1" / "ACK 7F3K"): only an alert this address was paged for."""
        query = (
            select(col(NotificationAttempt.alert_id))
            .join(Alert, col(Alert.id) == col(NotificationAttempt.alert_id))
            .where(
                col(NotificationAttempt.address) == address,
                col(NotificationAttempt.channel).in_(channels),
                col(Alert.state) == AlertState.TRIGGERED.value,
            )
            .order_by(col(NotificationAttempt.id).desc())
            .limit(1)
        )
        if short is not None:
            query = query.where(col(Alert.short_id) == short.upper())
        async with self.db.session() as s:
            alert_id = (await s.execute(query)).scalar_one_or_none()
        if alert_id is None:
            return None
        return await self.close(alert_id, AlertState.ACKNOWLEDGED, ctx, reason="reply")

    async def was_notified(self, alert_id: str, channels: Sequence[str]) -> bool:
        async with self.db.session() as s:
            n = await s.scalar(
                select(func.count())
                .select_from(NotificationAttempt)
                .where(
                    col(NotificationAttempt.alert_id) == alert_id,
                    col(NotificationAttempt.channel).in_(channels),
                )
            )
        return bool(n)

    # ------------------------------------------------------------------ escalate / reassign

    async def escalate(
        self, alert_id: str, ctx: RequestContext, *, company: str | None = None
    ) -> Alert | None:
        """Fire the next step now, as pressing 2 on a call does (past the last step the
        alert may end exhausted). None if the alert does not exist; AlertClosed if it is
        no longer triggered."""

        async def event(_s: AsyncSession, _alert: Alert) -> Event:
            return EscalateNow(ctx.actor, "api")

        return await self._act(alert_id, company, ctx, event)

    async def reassign(
        self,
        alert_id: str,
        recipients: Sequence[str],
        groups: Sequence[str],
        ctx: RequestContext,
        *,
        company: str | None = None,
    ) -> Alert | None:
        """Hand the alert to other people: the running chain's notifications are cancelled
        (calls in flight hung up) and the policy's steps start again for them. Raises
        BadTarget for recipients or groups the company does not have."""

        async def event(s: AsyncSession, alert: Alert) -> Event:
            contacts = await self._contacts(s, alert.company, recipients, groups)
            plan = self.plans.parsed(alert).reassigned(contacts)
            return Reassign(plan, ctx.actor, tuple(groups))

        return await self._act(alert_id, company, ctx, event)

    async def _act(
        self,
        alert_id: str,
        company: str | None,
        ctx: RequestContext,
        event: Callable[[AsyncSession, Alert], Awaitable[Event]],
    ) -> Alert | None:
        """Decide one event on a triggered alert, in the session (both databases)."""
        fx = Effects()
        async with SessionUnit.begin(self.db) as unit:
            alert = await unit.lock_alert(alert_id)
            if alert is None or (company is not None and alert.company != company):
                return None
            if alert.state != AlertState.TRIGGERED.value:
                raise AlertClosed(alert.state)
            event_now = await event(unit.session, alert)
            await self._decide(unit, alert, event_now, self.clock(), ctx, fx)
        await self._after_commit(fx)
        return alert

    async def _contacts(
        self, s: AsyncSession, company: str, recipients: Sequence[str], groups: Sequence[str]
    ) -> list[ContactPoint]:
        """The people named and the groups' members, in order and once each."""
        found = {
            g.name: g.members
            for g in await s.scalars(
                select(GroupRow).where(
                    col(GroupRow.company) == company, col(GroupRow.name).in_(groups)
                )
            )
        }
        if missing := [g for g in groups if g not in found]:
            raise BadTarget(f"unknown groups: {', '.join(missing)}")
        ids = list(dict.fromkeys([*recipients, *(m for g in groups for m in found[g])]))
        rows = {
            r.id: r
            for r in await s.scalars(
                select(RecipientRow).where(
                    col(RecipientRow.company) == company, col(RecipientRow.id).in_(ids)
                )
            )
        }
        if missing := [r for r in recipients if r not in rows]:
            raise BadTarget(f"unknown recipients: {', '.join(missing)}")
        # a group member deleted since is left out, as build_plan does
        contacts = [contact_point(recipient(rows[r])) for r in ids if r in rows]
        if not contacts:
            raise BadTarget("the groups have no members")
        return contacts

    # ------------------------------------------------------------------ worker side

    async def claim(self, owner: str, limit: int) -> list[SendTask]:
        """Claim due jobs: run due timers inline, lease due sends to `owner`.

        Jobs of an alert that is no longer `triggered` are closed here, in the same
        transaction that checks the state under the alert's row lock: no send is claimed
        after an ack has committed.
        """
        if self._fast and not self.config.rate_limits:
            tasks = await self._claim_fast(owner, limit)
            if tasks is not None:
                return tasks
        now = self.clock()
        fx = Effects()
        async with SessionUnit.begin(self.db) as unit:
            s = unit.session
            # Due jobs and their alerts in one statement, both rows locked; whatever another
            # transaction holds (a worker, an ack) is skipped, never waited for.
            await unit.plan_claim_by_index()
            rows = (await s.execute(_CLAIM, {"now": now, "limit": limit})).all()
            if not rows:
                return []
            alerts = {a.id: a for _, a in rows}
            jobs = [j for j, _ in rows]
            sends: list[Job] = []
            closed_sends: list[tuple[str, int]] = []
            for job in jobs:
                alert = alerts[job.alert_id]
                if job.done:
                    continue
                if alert.state != AlertState.TRIGGERED.value:
                    job.done, job.outcome = True, "cancelled"
                    if job.kind == JobKind.SEND.value:
                        closed_sends.append((job.payload["nid"], job.payload["attempt"]))
                elif job.kind == JobKind.SEND.value:
                    sends.append(job)
                else:
                    job.done, job.outcome, job.owner = True, "done", owner
                    event: Event = (
                        StepTimer(**job.payload) if job.kind == JobKind.STEP.value else CapTimer()
                    )
                    await self._decide(unit, alert, event, now, ENGINE, fx)
            if closed_sends:  # their attempts end too (see pg_sql.PG_CLAIM's closed_attempts)
                await s.execute(
                    update(NotificationAttempt)
                    .where(
                        tuple_(
                            col(NotificationAttempt.notification_id),
                            col(NotificationAttempt.attempt),
                        ).in_(closed_sends),
                        col(NotificationAttempt.status).in_(OPEN_STATES),
                    )
                    .values(status="cancelled", reason="alert_closed", finished_at=now)
                )
            # sends created by the timers above and due now are claimed right away
            fresh = [
                j
                for j in fx.jobs
                if j.kind == JobKind.SEND.value
                and j.due_at <= now
                and alerts[j.alert_id].state == AlertState.TRIGGERED.value
            ]
            if fresh:
                for j in fresh:
                    j.owned = True
                more = await s.execute(select(Job).where(col(Job.id).in_([j.id for j in fresh])))
                sends += list(more.scalars())
            tasks = await self._lease_sends(s, sends, alerts, owner, now, fx)
        await self._after_commit(fx)
        return tasks

    async def _claim_fast(self, owner: str, limit: int) -> list[SendTask] | None:
        """The fast path without rate limits: the claim as prepared SQL on the driver pool
        (the ORM's row loading and unit of work were most of a claim's CPU time). What
        the general path's transaction does, as one statement (pg_sql.PG_CLAIM): due jobs
        and their alerts locked, skipping what others hold; jobs of closed alerts
        cancelled; sends leased and their attempts marked in flight. None when a due timer
        is among the jobs, with nothing changed: the general path then runs it (and claims
        the sends it makes)."""
        now = self.clock()
        fx = Effects()
        tasks: list[SendTask] = []
        lease = now + timedelta(seconds=self.config.lease_seconds)
        async with self.db.driver_connection() as raw:
            rows = await raw.fetch(pg_sql.PG_CLAIM, now, limit, owner, lease)
        if any(
            r["kind"] != JobKind.SEND.value and r["state"] == AlertState.TRIGGERED.value
            for r in rows
        ):
            return None  # nothing was changed
        for r in rows:
            if r["state"] != AlertState.TRIGGERED.value:
                continue  # cancelled by the claim statement
            alert = SendAlert(
                r["alert_id"], r["company"], r["short_id"], r["title"], r["summary"],
                r["severity"], r["policy"], r["details"], r["plan"],
            )  # fmt: skip
            row = AttemptRecord(
                r["attempt_row"], r["notification_id"], r["attempt"], r["channel"],
                r["recipient_id"], INFLIGHT, r["reason"], r["answered_at"],
            )  # fmt: skip
            tasks.append(SendTask(r["id"], row.id, alert.company, r["due_at"],
                                  self._notification(alert, row),
                                  interrupted=row.answered_at is not None))  # fmt: skip
            fx.record(
                alert, ENGINE, now, event="send", status=INFLIGHT,
                reason=row.reason, notification_uuid=row.notification_id,
                channel=row.channel, attempt=row.attempt,
                recipient_id=row.recipient_id, worker=owner,
            )  # fmt: skip
        await self._after_commit(fx)
        return tasks

    async def _lease_sends(
        self,
        s: AsyncSession,
        sends: list[Job],
        alerts: Mapping[str, Alert],
        owner: str,
        now: datetime,
        fx: Effects,
    ) -> list[SendTask]:
        if not sends:
            return []
        res = await s.execute(
            select(NotificationAttempt).where(
                col(NotificationAttempt.notification_id).in_({j.payload["nid"] for j in sends})
            )
        )
        rows = {(r.notification_id, r.attempt): r for r in res.scalars()}
        lease = now + timedelta(seconds=self.config.lease_seconds)

        async def recent(key: tuple[str, str, str], limit: RateLimit) -> list[datetime]:
            return await self._recent_sends(s, key, limit, now)

        limiter = BatchLimiter[SendTask](self.config.rate_limit_for, recent, lambda: now)
        tasks: list[SendTask] = []
        for job in sends:
            alert = alerts[job.alert_id]
            row = rows[(job.payload["nid"], job.payload["attempt"])]
            key = (alert.company, row.recipient_id, row.channel)
            verdict = await limiter.decide(key)
            if verdict.verdict is Verdict.HOLD:
                assert verdict.limit is not None
                assert verdict.release is not None
                release = verdict.release
                job.due_at, job.owner, job.lease_until = release, None, None
                row.status, row.scheduled_for = "held", release
                fx.jobs.append(NewJob(job.id or 0, job.alert_id, job.kind, release))
                fx.record(
                    alert, ENGINE, now, event="held", status="held",
                    reason=f"rate_limit:{verdict.limit.max}/{verdict.limit.window:g}s",
                    notification_uuid=row.notification_id, channel=row.channel,
                    attempt=row.attempt, recipient_id=row.recipient_id,
                    released_at=release.isoformat(),
                )  # fmt: skip
                continue
            job.owner, job.lease_until, job.attempts = owner, lease, job.attempts + 1
            row.status = INFLIGHT
            task = SendTask(job.id or 0, row.id or 0, alert.company, job.due_at,
                            self._notification(alert, row),
                            interrupted=row.answered_at is not None)  # fmt: skip
            if verdict.verdict is Verdict.BUNDLE:
                # rides along with the carrier: no sent_at, so it is not counted as a send
                limiter.carrier(key).bundled.append(task)
            else:
                row.sent_at = now
                tasks.append(task)
                limiter.sent(key, task, verdict)
            fx.record(
                alert, ENGINE, now, event=verdict.verdict.value, status=INFLIGHT,
                reason=row.reason, notification_uuid=row.notification_id, channel=row.channel,
                attempt=row.attempt, recipient_id=row.recipient_id, worker=owner,
            )  # fmt: skip
        for task in tasks:
            if task.bundled:
                task.notification = bundle(
                    task.notification, [m.notification for m in task.bundled]
                )
        return tasks

    async def _recent_sends(
        self, s: AsyncSession, key: tuple[str, str, str], limit: RateLimit, now: datetime
    ) -> list[datetime]:
        company, recipient_id, channel = key
        res = await s.execute(
            select(col(NotificationAttempt.sent_at))
            .where(
                col(NotificationAttempt.company) == company,
                col(NotificationAttempt.recipient_id) == recipient_id,
                col(NotificationAttempt.channel) == channel,
                col(NotificationAttempt.sent_at) > now - timedelta(seconds=limit.window),
            )
            .order_by(col(NotificationAttempt.sent_at).desc())
            .limit(limit.max)
        )
        return [t for t in res.scalars() if t is not None]

    def _notification(
        self, alert: AlertView, row: NotificationAttempt | AttemptRecord
    ) -> Notification:
        plan = self.plans.parsed(alert)
        ack_url = None
        if self.config.public_url and self.config.ack_secret:
            expires = int(time.time() + self.config.ack_link_ttl)
            token = sign_ack(alert.id, self.config.ack_secret, expires)
            ack_url = f"{self.config.public_url.rstrip('/')}/v1/ack?token={token}"
        return Notification(
            notification_id=row.notification_id,
            alert_id=alert.id,
            alert_short_id=alert.short_id,
            channel=row.channel,
            contact=plan.contacts[row.recipient_id],
            title=alert.title,
            summary=alert.summary,
            severity=alert.severity,
            attempt=row.attempt,
            ack_url=ack_url,
            details={str(k): str(v) for k, v in alert.details.items()},
            policy=alert.policy,
        )

    async def renew(self, owner: str, job_ids: Sequence[int]) -> None:
        """Extend the lease of in-flight jobs so a long call is not taken over."""
        if not job_ids:
            return
        lease = self.clock() + timedelta(seconds=self.config.lease_seconds)
        # Rows another transaction holds are skipped, not waited for: they are being
        # finished (a result, an ack), and waiting on several of them could deadlock with
        # a batch of results recorded at the same moment.
        mine = (
            select(col(Job.id))
            .where(col(Job.id).in_(job_ids), col(Job.owner) == owner, ~col(Job.done))
            .with_for_update(skip_locked=True)
        )
        async with SessionUnit.begin(self.db) as unit:
            await unit.commit_without_flush()
            await unit.session.execute(
                update(Job)
                .where(col(Job.id).in_(mine))
                .values(lease_until=lease)
                .execution_options(synchronize_session=False)
            )

    async def release(self, owner: str, job_ids: Sequence[int]) -> None:
        """Hand jobs back (a worker stopping with sends still running): unleased, they are
        claimed again at once by another worker instead of after the lease runs out."""
        if not job_ids:
            return
        now = self.clock()
        fx = Effects()
        async with self.db.session() as s, s.begin():
            res = await s.execute(
                update(Job)
                .where(col(Job.id).in_(job_ids), col(Job.owner) == owner, ~col(Job.done))
                .values(owner=None, lease_until=None)
                .returning(col(Job.id), col(Job.alert_id), col(Job.kind))
                .execution_options(synchronize_session=False)
            )
            fx.jobs = [
                NewJob(job_id, alert_id, kind, now)
                for job_id, alert_id, kind in res
                if job_id is not None
            ]
        await self._after_commit(fx)  # wakes the other workers

    async def mark_answered(self, task: SendTask) -> None:
        """A person picked up the call of this attempt (see NotificationAttempt.answered_at)."""
        async with self.db.session() as s, s.begin():
            await s.execute(
                update(NotificationAttempt)
                .where(
                    col(NotificationAttempt.id) == task.attempt_row,
                    col(NotificationAttempt.answered_at).is_(None),
                )
                .values(answered_at=self.clock())
                .execution_options(synchronize_session=False)
            )

    async def inflight_status(
        self, owner: str, job_ids: Sequence[int], alert_ids: Collection[str]
    ) -> tuple[set[int], set[str]]:
        """Of a worker's sends in flight: the jobs no longer leased to it (another worker
        took them over after the lease ran out, or they were handed back), and the alerts
        that are no longer triggered (a cancel the worker may not have heard of)."""
        if not job_ids:
            return set(), set()
        async with self.db.session() as s:
            lost = await s.scalars(
                select(col(Job.id)).where(
                    col(Job.id).in_(job_ids),
                    or_(col(Job.owner).is_(None), col(Job.owner) != owner),
                )
            )
            closed = await s.scalars(
                select(col(Alert.id)).where(
                    col(Alert.id).in_(alert_ids), col(Alert.state) != AlertState.TRIGGERED.value
                )
            )
            return {int(job_id) for job_id in lost if job_id is not None}, set(closed)

    async def complete(self, task: SendTask, result: DeliveryResult, owner: str) -> None:
        """Record a delivery result (for a bundle: for each member) and decide what's next."""
        await self.complete_many([(task, result)], owner)

    async def complete_many(
        self, results: Sequence[tuple[SendTask, DeliveryResult]], owner: str
    ) -> None:
        """Record several results in one transaction (see sends.record_results)."""
        fx = Effects()
        now = self.clock()
        async with self._unit() as unit:
            await record_results(unit, members(results), owner, now, fx, self._decide)
        await self._after_commit(fx)

    async def provider_update(
        self, provider_id: str, result: DeliveryResult, ctx: RequestContext
    ) -> bool:
        """A carrier's later report (Twilio status callback): a failure reopens the attempt."""
        fx = Effects()
        now = self.clock()
        async with SessionUnit.begin(self.db) as unit:
            s = unit.session
            row = (
                await s.execute(
                    select(NotificationAttempt)
                    .where(col(NotificationAttempt.provider_id) == provider_id)
                    .order_by(col(NotificationAttempt.id).desc())
                    .limit(1)
                )
            ).scalar_one_or_none()
            if row is None:
                return False
            alert = await unit.lock_alert(row.alert_id)
            assert alert is not None
            fx.record(
                alert, ctx, now, event="provider_status", status=result.status.value,
                reason=result.reason, notification_uuid=row.notification_id,
                channel=row.channel, attempt=row.attempt, recipient_id=row.recipient_id,
                provider_id=provider_id,
            )  # fmt: skip
            if result.status is not DeliveryStatus.DELIVERED and row.status == "delivered":
                row.status, row.reason = result.status.value, result.reason
                outcome = Outcome(row.notification_id, row.attempt, result.status, result.reason)
                await self._decide(unit, alert, outcome, now, ctx, fx)
        await self._after_commit(fx)
        return True

    async def purge_done_jobs(self, limit: int = 1000) -> int:
        """Delete up to `limit` done jobs whose due time is more than the retention ago,
        oldest first; returns how many. Undone jobs are never touched."""
        cutoff = self.clock() - timedelta(seconds=self.config.done_job_retention)
        oldest = (
            select(col(Job.id))
            .where(col(Job.done), col(Job.due_at) < cutoff)
            .order_by(col(Job.due_at))
            .limit(limit)
        )
        async with SessionUnit.begin(self.db) as unit:
            await unit.commit_without_flush()  # a lost delete is only done again
            res = await unit.session.execute(
                delete(Job)
                .where(col(Job.id).in_(oldest), col(Job.done))
                .execution_options(synchronize_session=False)
            )
        return int(getattr(res, "rowcount", 0) or 0)

    async def next_due(self) -> datetime | None:
        async with self.db.session() as s:
            due = await s.scalar(select(func.min(col(Job.due_at))).where(~col(Job.done)))
        if isinstance(due, datetime) and due.tzinfo is None:
            due = due.replace(tzinfo=UTC)
        return due

    # ------------------------------------------------------------------ reads

    async def get_alert(
        self, alert_id: str, company: str | None = None
    ) -> tuple[Alert, list[NotificationAttempt]] | None:
        async with self.db.session() as s:
            alert = await s.get(Alert, alert_id)
            if alert is None or (company is not None and alert.company != company):
                return None
            res = await s.execute(
                select(NotificationAttempt)
                .where(col(NotificationAttempt.alert_id) == alert_id)
                .order_by(col(NotificationAttempt.id))
            )
            return alert, list(res.scalars())
