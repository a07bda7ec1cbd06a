"""The engine's transactions: ingest, timers and claims, results, ack/resolve.

Every transaction that touches an alert's chain first locks the alert row, runs the
decision core and applies its actions before committing; side effects that cannot be
rolled back (audit lines, wake-ups, hanging up calls) happen only after the commit.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import time
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, Protocol, cast

import asyncpg  # type: ignore[import-untyped]
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import (
    JSON,
    Table,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from escalation import crud, metrics, schedules
from escalation.audit import AuditLog
from escalation.channels.base import ContactPoint, DeliveryResult, DeliveryStatus, Notification
from escalation.channels.signing import sign_ack
from escalation.config import (
    Policy,
    RateLimit,
    RateLimitMode,
    Recipient,
    RetryPolicy,
    Severity,
)
from escalation.core import (
    Audit,
    CancelAll,
    CancelScope,
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
    build_plan,
    contact_point,
    decide,
    may_fire_step,
    rate_limit_release,
    step_targets,
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
    PolicyRow,
    RecipientRow,
    utcnow,
)
from storage.outage import FailureLog

log = logging.getLogger(__name__)

_SHORT_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: read aloud and typed
_MAX_DETAILS_BYTES = 16_384
_INFLIGHT = "sending"
# Attempt states that end when their alert closes (the others already have a result).
_OPEN_STATES = ("scheduled", "held", _INFLIGHT)
_OPEN_ATTEMPTS = f"({', '.join(repr(state) for state in _OPEN_STATES)})"
_PLAN_CACHE_SIZE = 20_000
# Core tables: hot-path inserts skip the ORM's bulk-insert machinery.
_ALERTS: Table = Alert.__table__  # type: ignore[attr-defined]
_ATTEMPTS: Table = NotificationAttempt.__table__  # type: ignore[attr-defined]
_JOBS: Table = Job.__table__  # type: ignore[attr-defined]
_ALERT_COLUMNS = tuple(c.name for c in _ALERTS.columns)


class AlertIn(BaseModel):
    """Body of POST /v1/alerts."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=300)
    summary: str = Field(default="", max_length=4000)
    severity: Severity = "critical"
    policy: str = Field(min_length=1, max_length=64)
    dedup_key: str | None = Field(default=None, min_length=1, max_length=255)
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > _MAX_DETAILS_BYTES:
            raise ValueError(f"details must serialise to at most {_MAX_DETAILS_BYTES} bytes")
        return value


@dataclass(frozen=True)
class RequestContext:
    """Who asked, from where: copied into every audit line the request causes."""

    actor: str
    ip: str | None = None
    request_id: str | None = None


ENGINE = RequestContext("engine")


class UnknownPolicy(LookupError):
    pass


class AlertClosed(Exception):
    """Escalate or reassign asked of an alert no longer triggered (args[0]: its state)."""


class BadTarget(ValueError):
    """A reassign named recipients or groups the company does not have (or nobody)."""


class _Retry(Exception):
    """Roll the transaction back and run it again."""


@dataclass(frozen=True)
class CancelRequest:
    """After an ack/resolve commit: hang up these in-flight notifications of the alert."""

    alert_id: str
    notifications: tuple[tuple[str, str], ...]  # (notification id, channel)
    # time.time() of the commit, for cancel latency; None when a worker found the closed
    # alert by itself (its cancel never came)
    committed_at: float | None
    # CHAIN (a reassign): only the listed notifications stop, the alert's new ones go on
    scope: CancelScope = CancelScope.ALERT


class Bus(Protocol):
    """How committed changes reach workers (in-process event or Redis)."""

    async def jobs_added(self, jobs: Sequence[tuple[int, datetime]]) -> None: ...

    async def alert_closed(self, request: CancelRequest) -> None: ...


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

    def rate_limit_for(self, channel: str) -> RateLimit | None:
        return self.rate_limits.get(channel) or self.rate_limits.get("default")


@dataclass
class SendTask:
    """A claimed notification attempt, owned by one worker until its result is recorded."""

    job_id: int
    attempt_row: int
    company: str
    due_at: datetime
    notification: Notification
    bundled: list[SendTask] = field(default_factory=list)
    # A worker lost this attempt after the person picked up: it is recorded as answered
    # without a key instead of being placed again (see NotificationAttempt.answered_at).
    interrupted: bool = False


@dataclass
class IngestResult:
    alert: Alert
    created: bool
    deduplicated: bool = False


@dataclass
class NewJob:
    """A job this transaction created or re-timed; the bus learns about unowned ones."""

    id: int
    alert_id: str
    kind: str
    due_at: datetime
    owned: bool = False


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


_Inserter = Callable[[list[dict[str, Any]], list[dict[str, Any]], "_Effects"], Awaitable[None]]
# Cancels every scheduled job/attempt of an alert, returns the in-flight ones (see _cancel_all)
_Canceller = Callable[[str, datetime, CancelScope], Awaitable[list[tuple[str, str]]]]

# Every transaction that comes before a side effect or records one commits durably (the
# connections force synchronous_commit on, whatever the server's default: see
# db.DURABLE_COMMITS): an ingest (the 202 promises the alert), an ack or resolve, a claim
# (a lost claim after a database crash would hand the same notification out again) and a
# result (a lost result leaves the job leased to a worker that has forgotten it: it would
# be sent again when the lease runs out). Only bookkeeping that is simply done again
# commits without waiting for its WAL flush: lease renewals and the cleanup of old jobs.
_PG_ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off"
# The claim joins a few due jobs to their alerts and attempts: index lookups per job. A
# planner without statistics (a young table, or a server without autovacuum, where
# ANALYZE never runs) takes the tables for tiny and hashes all of alerts and attempts
# instead, a scan of both on every claim that grows with every alert ever stored (35 ms
# at 20,000 alerts, against 0.5 ms). Hash and merge joins are off for the ORM claim (the
# general path; the driver pool's statements plan under db.DRIVER_PLANNER).
_PG_CLAIM_JOINS = ("SET LOCAL enable_hashjoin TO off", "SET LOCAL enable_mergejoin TO off")

# The driver-level ingest on PostgreSQL (`Engine._ingest_pg`): the same rows the Core
# inserts write, as prepared statements. JSON goes in as text (see Database.driver_pool),
# timestamps as aware datetimes.
_PG_ATTEMPT_COLUMNS = ("company", "alert_id", "notification_id", "attempt", "channel",
                       "recipient_id", "address", "round", "step", "status", "reason",
                       "scheduled_for")  # fmt: skip
_PG_INSERT_ATTEMPT = (
    f"INSERT INTO notification_attempts ({', '.join(_PG_ATTEMPT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(_PG_ATTEMPT_COLUMNS)))})"
)
# Ids come from the serial in insertion order, which ORDER BY n fixes: sorted, they
# line up with the rows given.
_PG_INSERT_JOBS = (
    "INSERT INTO jobs (alert_id, kind, payload, due_at, attempts, done, created_at) "
    "SELECT a, k, p, d, 0, false, c FROM unnest($1::varchar[], $2::varchar[], $3::json[], "
    "$4::timestamptz[], $5::timestamptz[]) WITH ORDINALITY AS t(a, k, p, d, c, n) "
    "ORDER BY n RETURNING id"
)
_JSON_COLUMNS = frozenset(c.name for c in _ALERTS.columns if isinstance(c.type, JSON))


def _pg_ingest_statement(keyed: bool) -> str:
    """The whole ingest as one statement, so one round trip and its own (synchronous)
    commit: the Idempotency-Key claimed ($1-$4; without a key the gate is one constant
    row), and only if it was, the alert, its attempts and its jobs inserted (the rows
    `_decide` staged: parameters as arrays per column, as in _PG_INSERT_JOBS). Returns
    whether the key was claimed and the new job ids in insertion order."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]

    def cast_to(column: Any) -> str:
        # the type without its length: a value too long fails as in a plain INSERT
        # (a cast to VARCHAR(n) would cut it silently)
        return re.sub(r"\(\d+\)", "", column.type.compile(dialect=dialect))

    alert_types = [cast_to(c) for c in _ALERTS.columns]
    attempt_types = [cast_to(_ATTEMPTS.c[name]) for name in _PG_ATTEMPT_COLUMNS]
    alert_params = [f"${i + 5}::{t}" for i, t in enumerate(alert_types)]
    first = 5 + len(alert_types)
    attempt_params = [f"${first + i}::{t}[]" for i, t in enumerate(attempt_types)]
    job = [f"${first + len(attempt_types) + i}" for i in range(5)]
    gate = (
        "INSERT INTO idempotency_keys (api_key_hash, idempotency_key, alert_id, created_at) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING alert_id"
        if keyed
        else "SELECT $1::varchar, $2::varchar, $3::varchar, $4::timestamptz"
    )
    return (
        f"WITH key_claimed AS ({gate}), "
        f"alert_in AS (INSERT INTO alerts ({', '.join(c.name for c in _ALERTS.columns)}) "
        f"SELECT {', '.join(alert_params)} FROM key_claimed), "
        f"attempts_in AS (INSERT INTO notification_attempts ({', '.join(_PG_ATTEMPT_COLUMNS)}) "
        f"SELECT * FROM unnest({', '.join(attempt_params)}) "
        "WHERE EXISTS (SELECT 1 FROM key_claimed)), "
        "jobs_in AS (INSERT INTO jobs (alert_id, kind, payload, due_at, attempts, done, "
        f"created_at) SELECT a, k, p, d, 0, false, c FROM unnest({job[0]}::varchar[], "
        f"{job[1]}::varchar[], {job[2]}::json[], {job[3]}::timestamptz[], "
        f"{job[4]}::timestamptz[]) WITH ORDINALITY AS t(a, k, p, d, c, n) "
        "WHERE EXISTS (SELECT 1 FROM key_claimed) ORDER BY n RETURNING id) "
        "SELECT EXISTS (SELECT 1 FROM key_claimed) AS claimed, "
        "array(SELECT id FROM jobs_in ORDER BY id) AS ids"
    )


_PG_INGEST = {keyed: _pg_ingest_statement(keyed) for keyed in (True, False)}

# The driver-level claim (`Engine._claim_pg`): one statement in its own transaction, so
# one round trip. `_CLAIM` with only what a send needs (a send's attempt row read
# alongside, not locked: the alert's lock covers it), and in the same statement the sends
# of triggered alerts leased and their attempts marked in flight, the jobs of closed
# alerts cancelled. The rows come back as they were before those updates. A due timer
# among them leaves everything as it was (the updates are guarded by `timers`): the
# general path then runs the claim.
_PG_CLAIM_SENDABLE = (
    f"due.kind = '{JobKind.SEND.value}' AND due.state = '{AlertState.TRIGGERED.value}' "
    "AND NOT timers.found"
)
_PG_CLAIM = (
    "WITH due AS (SELECT j.id, j.alert_id, j.kind, j.payload, j.due_at, a.state, a.company, "
    "a.short_id, a.title, a.summary, a.severity, a.policy, a.details, a.plan, "
    "n.id AS attempt_row, n.notification_id, n.attempt, n.channel, n.recipient_id, n.reason, "
    "n.answered_at "
    "FROM jobs j JOIN alerts a ON a.id = j.alert_id "
    "LEFT JOIN notification_attempts n ON j.kind = 'send' "
    "AND n.notification_id = j.payload->>'nid' AND n.attempt = (j.payload->>'attempt')::int "
    "WHERE NOT j.done AND j.due_at <= $1 AND (j.lease_until IS NULL OR j.lease_until < $1) "
    "ORDER BY j.due_at, j.id LIMIT $2 FOR UPDATE OF j, a SKIP LOCKED), "
    f"timers AS (SELECT EXISTS (SELECT 1 FROM due WHERE kind <> '{JobKind.SEND.value}' "
    f"AND state = '{AlertState.TRIGGERED.value}') AS found), "
    "leased AS (UPDATE jobs SET owner = $3, lease_until = $4, attempts = jobs.attempts + 1 "
    f"FROM due, timers WHERE jobs.id = due.id AND {_PG_CLAIM_SENDABLE}), "
    "cancelled AS (UPDATE jobs SET done = true, outcome = 'cancelled' FROM due, timers "
    f"WHERE jobs.id = due.id AND due.state <> '{AlertState.TRIGGERED.value}' "
    "AND NOT timers.found), "
    "closed_attempts AS (UPDATE notification_attempts SET status = 'cancelled', "
    "reason = 'alert_closed', finished_at = $1 FROM due, timers "
    "WHERE notification_attempts.id = due.attempt_row "
    f"AND due.state <> '{AlertState.TRIGGERED.value}' AND NOT timers.found "
    f"AND notification_attempts.status IN {_OPEN_ATTEMPTS}), "
    "marked AS (UPDATE notification_attempts SET status = 'sending', sent_at = $1 "
    f"FROM due, timers WHERE notification_attempts.id = due.attempt_row "
    f"AND {_PG_CLAIM_SENDABLE}) "
    "SELECT due.* FROM due ORDER BY due_at, id"
)


# The driver-level result recording (`Engine._complete_pg`).
_PG_LOCK_ALERTS = "SELECT * FROM alerts WHERE id = any($1::varchar[]) ORDER BY id FOR UPDATE"
# The results' jobs and attempt rows in one read, the jobs done and the results written
# in one statement (a job cancelled meanwhile stays cancelled: its outcome is kept; the
# test is not `AND NOT done`, which lets the planner walk all of ix_jobs_due, every
# pending timer, for the ids).
_PG_RESULT_ROWS = (
    "SELECT true AS is_job, id, owner, done, NULL::varchar AS notification_id, "
    "NULL::int AS attempt, NULL::varchar AS channel, NULL::varchar AS recipient_id, "
    "NULL::varchar AS status FROM jobs WHERE id = any($1::int[]) UNION ALL "
    "SELECT false, id, NULL, NULL, notification_id, attempt, channel, recipient_id, status "
    "FROM notification_attempts WHERE id = any($2::int[])"
)
_PG_RECORD_RESULTS = (
    "WITH finished AS (UPDATE jobs SET done = true, "
    "outcome = CASE WHEN done THEN outcome ELSE 'done' END WHERE id = any($1::int[])) "
    "UPDATE notification_attempts n SET status = r.status, reason = r.reason, "
    "provider_id = r.provider_id, finished_at = $6 "
    "FROM unnest($2::int[], $3::varchar[], $4::varchar[], $5::varchar[]) "
    "AS r(id, status, reason, provider_id) WHERE n.id = r.id"
)
_ALERT_MUTABLE = ("chain", "updated_at", "state", "close_reason", "acknowledged_at", "acked_by",
                  "resolved_at", "resolved_by", "exhausted_at", "open_dedup_key")  # fmt: skip
_PG_UPDATE_ALERT = (
    f"UPDATE alerts SET {', '.join(f'{c} = ${i + 2}' for i, c in enumerate(_ALERT_MUTABLE))} "
    "WHERE id = $1"
)
# An alert's sends in flight on a lease that still runs ($1: alert id, $2: now).
_LIVE_SENDS = (
    "SELECT payload->>'nid' AS nid, (payload->>'attempt')::int AS attempt FROM jobs "
    f"WHERE alert_id = $1 AND kind = '{JobKind.SEND.value}' AND NOT done "
    "AND owner IS NOT NULL AND lease_until >= $2"
)
# `Engine._cancel_all` in one statement: the alert's undone jobs and its scheduled, held
# and orphaned attempts cancelled, the sends in flight returned to be hung up. A send in
# flight on a live lease is left to its worker, which hangs up and records how it ended;
# if that worker is gone, the claim that finds the lease expired closes it (a job closed
# here would leave its attempt `sending` for ever: nobody records a dead worker's call).
# An attempt in flight whose lease has run out has no worker left: it is cancelled here.
# (The final SELECT sees the rows as they were before the statement.) $3: the scope's
# reason; $4: keep the cap timer (a snooze).
_PG_CANCEL_ALL = (
    f"WITH live AS ({_LIVE_SENDS}), "
    "jobs_cancelled AS (UPDATE jobs SET done = true, outcome = 'cancelled' "
    "WHERE alert_id = $1 AND NOT done AND (owner IS NULL OR lease_until IS NULL "
    f"OR lease_until < $2) AND NOT (kind = '{JobKind.CAP.value}' AND $4::boolean)), "
    "attempts_cancelled AS (UPDATE notification_attempts n SET status = 'cancelled', "
    "reason = $3, finished_at = $2 "
    f"WHERE n.alert_id = $1 AND n.status IN {_OPEN_ATTEMPTS} AND NOT EXISTS "
    "(SELECT 1 FROM live WHERE live.nid = n.notification_id AND live.attempt = n.attempt)) "
    "SELECT n.notification_id, n.channel FROM notification_attempts n JOIN live "
    "ON live.nid = n.notification_id AND live.attempt = n.attempt "
    f"WHERE n.alert_id = $1 AND n.status = '{_INFLIGHT}'"
)
_PG_LOCK_ALERT = "SELECT * FROM alerts WHERE id = $1 FOR UPDATE"


async def _pg_cancel_all(
    raw: Any, alert_id: str, at: datetime, scope: CancelScope = CancelScope.ALERT
) -> list[tuple[str, str]]:
    keep_cap = scope is CancelScope.SNOOZE
    rows = await raw.fetch(_PG_CANCEL_ALL, alert_id, at, scope.value, keep_cap)
    return [(r[0], r[1]) for r in rows]


async def _pg_update_alerts(raw: Any, alerts: Sequence[Alert]) -> None:
    """Write back what a decision changed on locked alerts (`_ALERT_MUTABLE`)."""
    await raw.executemany(
        _PG_UPDATE_ALERT,
        [
            (a.id, *(json.dumps(v) if c == "chain" else v
                     for c in _ALERT_MUTABLE for v in (getattr(a, c),)))
            for a in alerts
        ],
    )  # fmt: skip


def _pg_alert_args(alert: Alert, plan_text: str | None = None) -> list[Any]:
    """The alert's columns in order, JSON as text (`plan_text`: its plan already dumped)."""
    return [
        plan_text
        if c == "plan" and plan_text is not None
        else json.dumps(getattr(alert, c))
        if c in _JSON_COLUMNS
        else getattr(alert, c)
        for c in _ALERT_COLUMNS
    ]


def _pg_job_arrays(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """Job rows as the per-column arrays _PG_INSERT_JOBS (and the ingest) unnest."""
    return [
        [j["alert_id"] for j in jobs],
        [j["kind"] for j in jobs],
        [json.dumps(j["payload"]) for j in jobs],
        [j["due_at"] for j in jobs],
        [j["created_at"] for j in jobs],
    ]


async def _pg_insert_rows(
    raw: Any, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: _Effects
) -> None:
    if len(attempts) == 1:
        await raw.execute(_PG_INSERT_ATTEMPT, *(attempts[0][c] for c in _PG_ATTEMPT_COLUMNS))
    elif attempts:
        await raw.executemany(
            _PG_INSERT_ATTEMPT, [[a[c] for c in _PG_ATTEMPT_COLUMNS] for a in attempts]
        )
    attempts.clear()
    if jobs:
        ids = sorted(
            await raw.fetch(_PG_INSERT_JOBS, *_pg_job_arrays(jobs)), key=lambda r: int(r[0])
        )
        for (job_id,), row in zip(ids, jobs, strict=True):
            fx.jobs.append(NewJob(job_id, row["alert_id"], row["kind"], row["due_at"]))
        jobs.clear()


def _job_row(
    alert_id: str, kind: JobKind, payload: dict[str, Any], due: datetime, now: datetime
) -> dict[str, Any]:
    return {"alert_id": alert_id, "kind": kind.value, "payload": payload, "due_at": due,
            "created_at": now, "attempts": 0, "done": False}  # fmt: skip


@dataclass
class _Effects:
    """What to do once the transaction has committed."""

    audit: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    jobs: list[NewJob] = field(default_factory=list)
    cancels: list[CancelRequest] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)


def _already_recorded(row: Any, member: SendTask, result: DeliveryResult) -> bool:
    """A result for an attempt that is no longer in flight was committed before: the
    worker retried a batch whose commit it could not confirm (the connection broke on the
    way back). Recording it again would write a second audit line for one event."""
    if row.status == _INFLIGHT:
        return False
    log.info("result %s of %s attempt %s was recorded already", result.status.value,
             member.notification.notification_id, member.notification.attempt)  # fmt: skip
    return True


def _recipient(row: RecipientRow) -> Recipient:
    return Recipient.model_validate(row.model_dump(exclude={"company", "updated_at"}))


def short_id() -> str:
    return "".join(secrets.choice(_SHORT_ALPHABET) for _ in range(6))


def api_key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


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
        self._plans_by_alert: OrderedDict[str, Plan] = OrderedDict()
        self._plans_by_content: dict[tuple[str, str], tuple[dict[str, Any], Plan]] = {}
        self._pg_fast_ingest = not db.is_sqlite
        self._policy_plans: dict[tuple[str, str], tuple[float, Plan, dict[str, Any]]] = {}
        self._plan_loads: dict[tuple[str, str], asyncio.Task[tuple[Plan, dict[str, Any]]]] = {}
        # A resolved policy's snapshot as JSON text, by the identity of the cached dict
        # (kept here, so the id stays its own): every alert of a policy stores the same.
        self._plan_texts: dict[int, tuple[dict[str, Any], str]] = {}
        self._audit_failures = FailureLog(log, "writing audit lines after a commit")
        self._wake_failures = FailureLog(log, "waking workers after a commit")
        self._cancel_failures = FailureLog(log, "announcing a closed alert to workers")

    # ------------------------------------------------------------------ plumbing

    def _audit(
        self, fx: _Effects, alert: Alert, ctx: RequestContext, now: datetime, **rec: Any
    ) -> None:
        rec.setdefault("actor", ctx.actor)
        fx.audit[alert.company].append(
            {
                "ts": now.isoformat(),
                "alert_id": alert.id,
                "ip": ctx.ip,
                "request_id": ctx.request_id,
                "short_id": alert.short_id,
                "company": alert.company,
                **rec,
            }
        )

    def _audit_result(
        self,
        fx: _Effects,
        alert: Alert,
        now: datetime,
        row: Any,
        result: DeliveryResult,
        member: SendTask,
        carrier: SendTask,
    ) -> None:
        """The audit line of a channel's answer (both result paths write the same one)."""
        self._audit(
            fx, alert, ENGINE, now, event="result", status=result.status.value,
            reason=result.reason, notification_uuid=row.notification_id, channel=row.channel,
            attempt=row.attempt, recipient_id=row.recipient_id, provider_id=result.provider_id,
            bundled_into=None if member is carrier else carrier.notification.notification_id,
            details=dict(result.details) or None,  # e.g. trunk used, trunks tried
        )  # fmt: skip

    async def _decide(
        self,
        s: AsyncSession | None,
        alert: Alert,
        event: Event,
        now: datetime,
        ctx: RequestContext,
        fx: _Effects,
        put: _Inserter | None = None,
        cancel: _Canceller | None = None,
    ) -> None:
        """Run the core on a locked alert and stage its actions in the transaction.

        New attempts and jobs go in as bulk Core inserts (or through `put`, the driver-level
        ingest): building ORM objects for them was most of the CPU cost of an ingest."""
        if put is None:
            assert s is not None
            session = s

            async def put(a: list[dict[str, Any]], j: list[dict[str, Any]], f: _Effects) -> None:
                await self._insert(session, a, j, f)

        plan = self._parsed_plan(alert)
        oncall = await self._oncall(s, alert.company, plan, event, now)
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
            plan = self._plans_by_alert[alert.id] = decision.plan
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
                assert s is not None or cancel is not None, "closing an alert needs the session"
                await put(attempts, jobs, fx)
                if cancel is None:
                    assert s is not None
                    inflight = await self._cancel_all(s, alert.id, now, a.scope)
                else:
                    # the driver-level paths close or snooze alerts (a reassign uses the
                    # session)
                    assert a.scope is not CancelScope.CHAIN
                    inflight = await cancel(alert.id, now, a.scope)
                fx.cancels.append(CancelRequest(alert.id, tuple(inflight), None, a.scope))
            else:
                assert isinstance(a, Audit)
                rec = a.record()
                if rec["actor"] is None:
                    rec["actor"] = ctx.actor
                self._audit(fx, alert, ctx, now, **rec)
        await put(attempts, jobs, fx)

    async def _oncall(
        self, s: AsyncSession | None, company: str, plan: Plan, event: Event, now: datetime
    ) -> dict[str, schedules.OnCall]:
        """Who the plan's schedules have on call at `now`, when the event may fire a step:
        a step pages whoever is on call when it fires, not when the alert started."""
        if not plan.schedules or not may_fire_step(event):
            return {}
        if s is None:  # a driver-level path (PostgreSQL): a read needs no lock
            async with self.db.session() as own:
                found = await crud.oncall_sources(own, company, plan.schedules, now)
        else:
            found = await crud.oncall_sources(s, company, plan.schedules, now)
        return {n: schedules.oncall(sch, ovr, now) for n, (sch, ovr) in found.items()}

    @staticmethod
    async def _insert(
        s: AsyncSession, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: _Effects
    ) -> None:
        if attempts:
            await s.execute(insert(_ATTEMPTS), attempts)
            attempts.clear()
        if jobs:
            res = await s.execute(
                insert(_JOBS).returning(_JOBS.c.id, sort_by_parameter_order=True), jobs
            )
            for job_id, row in zip(res.scalars(), jobs, strict=True):
                assert job_id is not None
                fx.jobs.append(NewJob(job_id, row["alert_id"], row["kind"], row["due_at"]))
            jobs.clear()

    @staticmethod
    def _transition(alert: Alert, t: Transition, now: datetime) -> None:
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

    async def _cancel_all(
        self, s: AsyncSession, alert_id: str, now: datetime, scope: CancelScope
    ) -> list[tuple[str, str]]:
        """Cancel every job and open attempt of the alert except the sends in flight on a
        live lease, which are returned to be hung up (see _PG_CANCEL_ALL)."""
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
                col(NotificationAttempt.status).in_(_OPEN_STATES),
            )
        ):
            if (row.notification_id, row.attempt) in live:
                inflight.append((row.notification_id, row.channel))
            else:
                row.status, row.reason, row.finished_at = "cancelled", scope.value, now
        return inflight

    async def _after_commit(self, fx: _Effects) -> None:
        """The side effects of a committed transaction. Never raises: the change is
        durable, so the caller answers success whatever happens here (a 500 after the
        commit would tell a client to retry what is already stored). A lost audit line
        is logged and counted; a lost wake-up only delays the jobs until the workers'
        next poll; a lost cancel is found by the workers' check of their calls' alerts
        (`Worker._heartbeat`)."""
        for company, records in fx.audit.items():
            try:
                self.audit.write(company, records)
            except OSError as exc:
                self._audit_failures.failed(exc)
        waiting = [(j.id, j.due_at) for j in fx.jobs if not j.owned]
        if waiting:
            try:
                await self.bus.jobs_added(waiting)
            except Exception as exc:
                self._wake_failures.failed(exc)
        for state in fx.closed:
            metrics.ALERTS_CLOSED.labels(state).inc()
        committed = time.time()
        for request in fx.cancels:
            try:
                await self.bus.alert_closed(replace(request, committed_at=committed))
            except Exception as exc:
                self._cancel_failures.failed(exc)

    async def _commit_without_flush(self, s: AsyncSession) -> None:
        """Let bookkeeping that a crash would only make happen again commit without the
        WAL flush wait on PostgreSQL (see _PG_ASYNC_COMMIT)."""
        if not self.db.is_sqlite:
            await s.execute(text(_PG_ASYNC_COMMIT))

    async def _lock_alert(self, s: AsyncSession, alert_id: str) -> Alert | None:
        result = await s.execute(select(Alert).where(col(Alert.id) == alert_id).with_for_update())
        return result.scalar_one_or_none()

    # ------------------------------------------------------------------ ingest

    def _parsed_plan(self, alert: Alert) -> Plan:
        """Plans change only when an alert is reassigned (a new revision), so parse each
        once per revision (the hot path of every tx)."""
        plan = self._plans_by_alert.get(alert.id)
        if plan is None or plan.revision != alert.plan.get("revision", 0):
            # Alerts of one policy mostly share one snapshot: comparing dicts is far cheaper
            # than parsing one (a worker sees every alert for the first time).
            key = (alert.company, alert.policy)
            shared = self._plans_by_content.get(key)
            if shared is not None and shared[0] == alert.plan:
                plan = shared[1]
            else:
                plan = Plan.from_json(alert.plan)
                if plan.revision == 0:  # a reassigned plan is its alert's alone
                    self._plans_by_content[key] = (alert.plan, plan)
            self._plans_by_alert[alert.id] = plan
            if len(self._plans_by_alert) > _PLAN_CACHE_SIZE:
                self._plans_by_alert.popitem(last=False)
        return plan

    def invalidate_plans(self, company: str) -> None:
        """Forget resolved policies after a policy/recipient/group change in this process."""
        for key in [k for k in self._policy_plans if k[0] == company]:
            del self._policy_plans[key]
        for key in [k for k in self._plan_loads if k[0] == company]:
            del self._plan_loads[key]  # a load under way may predate the change

    async def _plan(
        self, s: AsyncSession, company: str, policy_name: str
    ) -> tuple[Plan, dict[str, Any]]:
        """The resolved policy; cached for `plan_ttl` seconds so ingest stays cheap
        (another process's edit applies to new alerts within that time)."""
        key = (company, policy_name)
        cached = self._policy_plans.get(key)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1], cached[2]
        return self._cache_plan(key, await self._load_plan(s, company, policy_name))

    def _cache_plan(self, key: tuple[str, str], plan: Plan) -> tuple[Plan, dict[str, Any]]:
        data = plan.to_json()
        self._policy_plans[key] = (time.monotonic() + self.config.plan_ttl, plan, data)
        return plan, data

    async def _load_plan(self, s: AsyncSession, company: str, policy_name: str) -> Plan:
        row = await s.get(PolicyRow, (company, policy_name))
        if row is None:
            raise UnknownPolicy(policy_name)
        policy = Policy.model_validate(row.spec)
        group_names = {g for step in policy.steps for g in step.groups}
        groups: dict[str, list[str]] = {}
        if group_names:
            res = await s.execute(
                select(GroupRow).where(
                    col(GroupRow.company) == company, col(GroupRow.name).in_(group_names)
                )
            )
            groups = {g.name: list(g.members) for g in res.scalars()}
        ids = {r for step in policy.steps for r in step.recipients}
        ids |= {m for members in groups.values() for m in members}
        names = {n for step in policy.steps for n in step.schedules}
        rotas = await crud.rotas(s, company, names, self.clock())
        ids |= {r for people in rotas.values() for r in people}
        res2 = await s.execute(
            select(RecipientRow).where(
                col(RecipientRow.company) == company, col(RecipientRow.id).in_(ids)
            )
        )
        recipients = {r.id: _recipient(r) for r in res2.scalars()}
        return build_plan(policy, recipients, groups, self.config.channel_defaults, rotas)

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
        if self._pg_fast_ingest and body.dedup_key is None:
            fx = _Effects()
            created = await self._ingest_pg(company, key_hash, idempotency_key, body, ctx, fx)
            if created is not None:
                await self._after_commit(fx)
                metrics.ALERTS_INGESTED.labels("created").inc()
                return created
            # a replay or a collision: the general path below sorts it out
        for _ in range(5):
            fx = _Effects()
            try:
                async with self.db.session() as s, s.begin():
                    result = await self._ingest_tx(
                        s, company, key_hash, idempotency_key, body, ctx, fx
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
        s: AsyncSession,
        company: str,
        key_hash: str,
        idempotency_key: str | None,
        body: AlertIn,
        ctx: RequestContext,
        fx: _Effects,
    ) -> IngestResult:
        """Claim the idempotency key first (one INSERT .. ON CONFLICT DO NOTHING instead of
        a lookup plus an insert), then insert the alert with Core: no ORM unit of work, no
        reload after commit. A key that is taken means a replay: return the first alert."""
        now = self.clock()
        alert_id = str(uuid.uuid4())
        if idempotency_key is not None:
            claimed = await s.execute(
                self._insert_ignore(IdempotencyKey)
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
                alert = None if seen is None else await s.get(Alert, seen)
                if alert is None:  # the other request rolled back after all: try again
                    raise _Retry
                return IngestResult(alert, created=False)
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
                self._audit(
                    fx, existing, ctx, now, event="deduplicated", status=existing.state,
                    reason=f"dedup_key:{body.dedup_key}",
                )  # fmt: skip
                return IngestResult(existing, created=False, deduplicated=True)
        plan, plan_json = await self._plan(s, company, body.policy)
        alert = self._new_alert(company, body, plan_json, now)
        alert.id = alert_id
        self._audit(
            fx, alert, ctx, now, event="created", status="triggered", reason=body.policy,
            severity=body.severity, title=body.title,
        )  # fmt: skip
        # Not added to the session: the row goes in below, once the first decision has
        # shaped its chain (no foreign keys, so the order of the inserts is free).
        await self._decide(s, alert, Start(), now, ctx, fx)
        await s.execute(insert(_ALERTS), [{c: getattr(alert, c) for c in _ALERT_COLUMNS}])
        self._remember_plan(alert.id, company, body.policy, plan, plan_json)
        return IngestResult(alert, created=True)

    async def _ingest_pg(
        self,
        company: str,
        key_hash: str,
        idempotency_key: str | None,
        body: AlertIn,
        ctx: RequestContext,
        fx: _Effects,
    ) -> IngestResult | None:
        """PostgreSQL, no dedup key: the rows `_ingest_tx` writes, as one prepared
        statement on the driver connection (one round trip, committed and flushed before
        it answers; SQLAlchemy's per-statement overhead was most of an ingest's CPU time,
        then the round trips). None when the key is taken (a replay) or a constraint
        fired: the caller then takes the general path, which finds the first alert and
        pages nobody."""
        plan, plan_json = await self._plan_for(company, body.policy)
        now = self.clock()
        alert = self._new_alert(company, body, plan_json, now)
        self._audit(
            fx, alert, ctx, now, event="created", status="triggered", reason=body.policy,
            severity=body.severity, title=body.title,
        )  # fmt: skip
        # The first decision needs nothing from the database: stage its rows, then write
        # everything in one statement (see _pg_ingest_statement).
        attempts: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []

        async def put(a: list[dict[str, Any]], j: list[dict[str, Any]], _f: _Effects) -> None:
            attempts.extend(a)
            jobs.extend(j)
            a.clear()
            j.clear()

        await self._decide(None, alert, Start(), now, ctx, fx, put)
        try:
            async with self.db.driver_connection() as raw:
                row = await raw.fetchrow(
                    _PG_INGEST[idempotency_key is not None],
                    key_hash, idempotency_key, alert.id, now,
                    *_pg_alert_args(alert, self._plan_text(plan_json)),
                    *([a[c] for a in attempts] for c in _PG_ATTEMPT_COLUMNS),
                    *_pg_job_arrays(jobs),
                )  # fmt: skip
        except asyncpg.UniqueViolationError:
            return None
        if not row["claimed"]:
            return None  # a replay
        for job_id, job in zip(row["ids"], jobs, strict=True):
            fx.jobs.append(NewJob(job_id, job["alert_id"], job["kind"], job["due_at"]))
        self._remember_plan(alert.id, company, body.policy, plan, plan_json)
        return IngestResult(alert, created=True)

    def _plan_text(self, plan_json: dict[str, Any]) -> str:
        cached = self._plan_texts.get(id(plan_json))
        if cached is not None and cached[0] is plan_json:
            return cached[1]
        if len(self._plan_texts) > 256:
            self._plan_texts.clear()
        text = json.dumps(plan_json)
        self._plan_texts[id(plan_json)] = (plan_json, text)
        return text

    async def warm_up(self) -> None:
        """PostgreSQL: run every driver statement once on each pooled connection, with
        arguments that match no row (the inserts in a transaction rolled back), so its
        server process has loaded the catalogs and cached the plan before the first
        alert. Cold, a statement's first run took ~4 ms instead of 0.3, and the first
        storm after a start met ten cold connections at once: a quarter of a dispatch
        bench's slowest hand-offs came in its first second."""
        if self.db.is_sqlite:
            return
        async with self.db.every_driver_connection() as held:
            await asyncio.gather(*(self._warm_up(raw) for raw in held))

    async def _warm_up(self, raw: Any) -> None:
        past = datetime(2000, 1, 1, tzinfo=UTC)
        alert = self._new_alert("-", AlertIn(title="-", policy="-"), {}, past)
        await raw.fetch(_PG_CLAIM, past, 0, "-", past)
        await raw.fetch(_PG_LOCK_ALERTS, [alert.id])
        await raw.fetchrow(_PG_LOCK_ALERT, alert.id)
        await raw.fetch(_PG_RESULT_ROWS, [], [])
        await raw.execute(_PG_RECORD_RESULTS, [], [], [], [], [], past)
        await _pg_cancel_all(raw, alert.id, past)
        await _pg_update_alerts(raw, [alert])
        await raw.fetch(_PG_INSERT_JOBS, *_pg_job_arrays([]))
        attempt = {c: None for c in _PG_ATTEMPT_COLUMNS} | {
            "company": "-", "alert_id": alert.id, "notification_id": alert.id, "attempt": 1,
            "channel": "-", "recipient_id": "-", "round": 0, "step": 0, "status": "-",
            "scheduled_for": past,
        }  # fmt: skip
        no_rows: list[list[Any]] = [[] for _ in _PG_ATTEMPT_COLUMNS]
        rollback = raw.transaction()
        await rollback.start()
        try:
            await _pg_insert_rows(raw, [attempt], [], _Effects())
            for keyed, sql in _PG_INGEST.items():
                new = self._new_alert("-", AlertIn(title="-", policy="-"), {}, past)
                await raw.fetchrow(
                    sql, "-", "-" if keyed else None, new.id, past,
                    *_pg_alert_args(new), *no_rows, *_pg_job_arrays([]),
                )  # fmt: skip
        finally:
            await rollback.rollback()

    async def first_responders(self, company: str, policy: str) -> list[ContactPoint]:
        """Who the policy's first step pages, in order (a hotline bridges callers to them).

        Raises UnknownPolicy."""
        plan, _ = await self._plan_for(company, policy)
        if not plan.steps:
            return []
        oncall = {}
        if plan.steps[0].schedules:  # whoever is on call now
            async with self.db.session() as s:
                oncall = await self._oncall(s, company, plan, Start(), self.clock())
        seen: dict[str, ContactPoint] = {}
        for target in step_targets(plan.steps[0], oncall):
            if target.recipient_id not in seen and target.recipient_id in plan.contacts:
                seen[target.recipient_id] = plan.contacts[target.recipient_id]
        return list(seen.values())

    async def _plan_for(self, company: str, policy: str) -> tuple[Plan, dict[str, Any]]:
        """The resolved policy for a new alert, outside any transaction. One load at a
        time per policy: in the last quarter of its `plan_ttl` a cached plan is reloaded
        in the background, so under a steady stream it never expires; one that has (a
        quiet spell) is loaded once while the requests arriving meanwhile wait for it
        (each loading it for itself took a session apiece, and at 200 alerts/s with the
        default two-second `plan_ttl` that window came every two seconds)."""
        key = (company, policy)
        cached = self._policy_plans.get(key)
        if cached is not None:
            expires, plan, data = cached
            left = expires - time.monotonic()
            if left > 0:
                if left < self.config.plan_ttl / 4 and key not in self._plan_loads:
                    self._load_plan_once(key)
                return plan, data
        return await asyncio.shield(self._plan_loads.get(key) or self._load_plan_once(key))

    def _load_plan_once(self, key: tuple[str, str]) -> asyncio.Task[tuple[Plan, dict[str, Any]]]:
        async def load() -> tuple[Plan, dict[str, Any]]:
            async with self.db.session() as s:
                return self._cache_plan(key, await self._load_plan(s, *key))

        def done(task: asyncio.Task[tuple[Plan, dict[str, Any]]]) -> None:
            if self._plan_loads.get(key) is task:
                del self._plan_loads[key]
            # (retrieved here: no "exception was never retrieved" for a background load)
            error = None if task.cancelled() else task.exception()
            if error is not None and not isinstance(error, UnknownPolicy):
                log.warning("loading policy %s/%s failed: %r", *key, error)

        task = asyncio.create_task(load(), name=f"plan-{key[0]}-{key[1]}")
        self._plan_loads[key] = task
        task.add_done_callback(done)
        return task

    async def shutdown(self) -> None:
        """End the background plan refreshes before the database goes away: a refresh
        is only a cache fill, and one left running would outlive its pool."""
        loads = list(self._plan_loads.values())
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)

    def _remember_plan(
        self, alert_id: str, company: str, policy: str, plan: Plan, plan_json: dict[str, Any]
    ) -> None:
        self._plans_by_alert[alert_id] = plan
        if len(self._plans_by_alert) > _PLAN_CACHE_SIZE:
            self._plans_by_alert.popitem(last=False)
        self._plans_by_content[(company, policy)] = (plan_json, plan)

    @staticmethod
    def _new_alert(company: str, body: AlertIn, plan_json: dict[str, Any], now: datetime) -> Alert:
        """The new alert as a plain record with every column (the row is inserted with
        Core or prepared SQL, never through the ORM, and an ORM instance costs ~0.1 ms
        to build: a twentieth of an ingest's CPU time)."""
        return cast(Alert, SimpleNamespace(**dict.fromkeys(_ALERT_COLUMNS) | {
            "id": str(uuid.uuid4()), "company": company, "short_id": short_id(),
            "title": body.title, "summary": body.summary, "severity": body.severity,
            "policy": body.policy, "dedup_key": body.dedup_key,
            "open_dedup_key": body.dedup_key, "details": body.details,
            "state": AlertState.TRIGGERED.value, "plan": plan_json,
            "chain": Chain().to_json(), "dup_count": 0, "created_at": now, "updated_at": now,
        }))  # fmt: skip

    def _insert_ignore(self, table: type[IdempotencyKey]) -> Any:
        """INSERT .. ON CONFLICT DO NOTHING for the database in use."""
        if self.db.is_sqlite:
            return sqlite_insert(table).on_conflict_do_nothing()
        return pg_insert(table).on_conflict_do_nothing()

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
        fx = _Effects()
        event = Close(state, ctx.actor, reason)
        if not self.db.is_sqlite:
            # the same transaction as prepared SQL on the driver pool (synchronous commit)
            async with self.db.driver_connection() as raw, raw.transaction():
                row = await raw.fetchrow(_PG_LOCK_ALERT, alert_id)
                if row is None or (company is not None and row["company"] != company):
                    return None
                alert = Alert(**dict(row))

                async def put(
                    attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], f: _Effects
                ) -> None:
                    await _pg_insert_rows(raw, attempts, jobs, f)

                async def cancel(
                    alert_id: str, at: datetime, scope: CancelScope
                ) -> list[tuple[str, str]]:
                    return await _pg_cancel_all(raw, alert_id, at, scope)

                await self._decide(None, alert, event, self.clock(), ctx, fx, put, cancel)
                await _pg_update_alerts(raw, [alert])
        else:
            async with self.db.session() as s, s.begin():
                found = await self._lock_alert(s, alert_id)
                if found is None or (company is not None and found.company != company):
                    return None
                alert = found
                await self._decide(s, alert, event, self.clock(), ctx, fx)
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
            plan = self._parsed_plan(alert).reassigned(contacts)
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
        fx = _Effects()
        async with self.db.session() as s, s.begin():
            alert = await self._lock_alert(s, alert_id)
            if alert is None or (company is not None and alert.company != company):
                return None
            if alert.state != AlertState.TRIGGERED.value:
                raise AlertClosed(alert.state)
            await self._decide(s, alert, await event(s, alert), self.clock(), ctx, fx)
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
        contacts = [contact_point(_recipient(rows[r])) for r in ids if r in rows]
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
        if not self.db.is_sqlite and not self.config.rate_limits:
            tasks = await self._claim_pg(owner, limit)
            if tasks is not None:
                return tasks
        now = self.clock()
        fx = _Effects()
        async with self.db.session() as s, s.begin():
            # Due jobs and their alerts in one statement, both rows locked; whatever another
            # transaction holds (a worker, an ack) is skipped, never waited for.
            if not self.db.is_sqlite:
                for setting in _PG_CLAIM_JOINS:
                    await s.execute(text(setting))
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
                    await self._decide(s, alert, event, now, ENGINE, fx)
            if closed_sends:  # their attempts end too (see _PG_CLAIM's closed_attempts)
                await s.execute(
                    update(NotificationAttempt)
                    .where(
                        tuple_(
                            col(NotificationAttempt.notification_id),
                            col(NotificationAttempt.attempt),
                        ).in_(closed_sends),
                        col(NotificationAttempt.status).in_(_OPEN_STATES),
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

    async def _claim_pg(self, owner: str, limit: int) -> list[SendTask] | None:
        """PostgreSQL without rate limits: the claim as prepared SQL on the driver pool
        (the ORM's row loading and unit of work were most of a claim's CPU time). What
        the general path's transaction does, as one statement (_PG_CLAIM): due jobs and
        their alerts locked, skipping what others hold; jobs of closed alerts cancelled;
        sends leased and their attempts marked in flight. None when a due timer is among
        the jobs, with nothing changed: the general path then runs it (and claims the
        sends it makes)."""
        now = self.clock()
        fx = _Effects()
        tasks: list[SendTask] = []
        lease = now + timedelta(seconds=self.config.lease_seconds)
        async with self.db.driver_connection() as raw:
            rows = await raw.fetch(_PG_CLAIM, now, limit, owner, lease)
        if any(
            r["kind"] != JobKind.SEND.value and r["state"] == AlertState.TRIGGERED.value
            for r in rows
        ):
            return None  # nothing was changed
        for r in rows:
            if r["state"] != AlertState.TRIGGERED.value:
                continue  # cancelled by the claim statement
            # a plain record, not an ORM instance (one costs ~0.1 ms to build)
            alert = cast(Alert, SimpleNamespace(id=r["alert_id"], **{
                k: r[k] for k in ("company", "short_id", "title", "summary",
                                  "severity", "policy", "details", "plan")
            }))  # fmt: skip
            row = cast(NotificationAttempt, SimpleNamespace(**{
                k: r[k] for k in ("notification_id", "attempt", "channel",
                                  "recipient_id", "reason")
            }))  # fmt: skip
            n = self._notification(alert, row)
            tasks.append(SendTask(r["id"], r["attempt_row"], alert.company, r["due_at"], n,
                                  interrupted=r["answered_at"] is not None))  # fmt: skip
            self._audit(
                fx, alert, ENGINE, now, event="send", status=_INFLIGHT,
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
        fx: _Effects,
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
        sent_in_batch: dict[tuple[str, str, str], list[datetime]] = {}
        carriers: dict[tuple[str, str, str], SendTask] = {}
        tasks: list[SendTask] = []
        for job in sends:
            alert = alerts[job.alert_id]
            row = rows[(job.payload["nid"], job.payload["attempt"])]
            key = (alert.company, row.recipient_id, row.channel)
            limit = self.config.rate_limit_for(row.channel)
            if limit is not None:
                if key not in sent_in_batch:
                    sent_in_batch[key] = await self._recent_sends(s, key, limit, now)
                release = rate_limit_release(sent_in_batch[key], limit, now)
                if release is not None and not (
                    limit.mode is RateLimitMode.BUNDLE and key in carriers
                ):
                    job.due_at, job.owner, job.lease_until = release, None, None
                    row.status, row.scheduled_for = "held", release
                    fx.jobs.append(NewJob(job.id or 0, job.alert_id, job.kind, release))
                    self._audit(
                        fx, alert, ENGINE, now, event="held", status="held",
                        reason=f"rate_limit:{limit.max}/{limit.window:g}s",
                        notification_uuid=row.notification_id, channel=row.channel,
                        attempt=row.attempt, recipient_id=row.recipient_id,
                        released_at=release.isoformat(),
                    )  # fmt: skip
                    metrics.RATE_LIMITED.labels("hold").inc()
                    continue
            job.owner, job.lease_until, job.attempts = owner, lease, job.attempts + 1
            row.status = _INFLIGHT
            task = SendTask(job.id or 0, row.id or 0, alert.company, job.due_at,
                            self._notification(alert, row),
                            interrupted=row.answered_at is not None)  # fmt: skip
            if (
                limit is not None
                and key in carriers
                and rate_limit_release(sent_in_batch[key], limit, now)
            ):
                # rides along with the carrier: no sent_at, so it is not counted as a send
                carriers[key].bundled.append(task)
                metrics.RATE_LIMITED.labels("bundle").inc()
                event = "bundled"
            else:
                row.sent_at = now
                tasks.append(task)
                carriers[key] = task
                if limit is not None:
                    sent_in_batch[key].append(now)
                event = "send"
            self._audit(
                fx, alert, ENGINE, now, event=event, status=_INFLIGHT, reason=row.reason,
                notification_uuid=row.notification_id, channel=row.channel,
                attempt=row.attempt, recipient_id=row.recipient_id, worker=owner,
            )  # fmt: skip
        for task in tasks:
            if task.bundled:
                task.notification = _bundle(task.notification, task.bundled)
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

    def _notification(self, alert: Alert, row: NotificationAttempt) -> Notification:
        plan = self._parsed_plan(alert)
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
        async with self.db.session() as s, s.begin():
            await self._commit_without_flush(s)
            await s.execute(
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
        fx = _Effects()
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
        """Record several results in one transaction: one lock statement for all their
        alerts (in id order, like every other multi-alert lock), one read of their jobs
        and attempts, then each result is decided in the order given."""
        members = [(m, result, task) for task, result in results for m in (task, *task.bundled)]
        if not self.db.is_sqlite:
            await self._complete_pg(members, owner)
            return
        fx = _Effects()
        now = self.clock()
        async with self.db.session() as s, s.begin():
            res = await s.execute(
                select(Alert)
                .where(col(Alert.id).in_({m.notification.alert_id for m, _, _ in members}))
                .order_by(col(Alert.id))
                .with_for_update()
            )
            alerts = {a.id: a for a in res.scalars()}
            jobs = {
                j.id: j
                for j in (
                    await s.execute(
                        select(Job).where(col(Job.id).in_({m.job_id for m, _, _ in members}))
                    )
                ).scalars()
            }
            rows = {
                r.id: r
                for r in (
                    await s.execute(
                        select(NotificationAttempt).where(
                            col(NotificationAttempt.id).in_({m.attempt_row for m, _, _ in members})
                        )
                    )
                ).scalars()
            }
            for m, result, task in members:
                alert = alerts[m.notification.alert_id]
                job = jobs.get(m.job_id)
                row = rows.get(m.attempt_row)
                if job is None or row is None or job.owner != owner:
                    self._audit(
                        fx, alert, ENGINE, now, event="stale_result", status=result.status.value,
                        reason="lease_lost", notification_uuid=m.notification.notification_id,
                        channel=m.notification.channel, attempt=m.notification.attempt,
                    )  # fmt: skip
                    continue
                if _already_recorded(row, m, result):
                    continue
                if not job.done:
                    job.done, job.outcome = True, "done"
                row.status, row.reason = result.status.value, result.reason
                row.provider_id, row.finished_at = result.provider_id, now
                self._audit_result(fx, alert, now, row, result, m, task)
                metrics.NOTIFICATIONS.labels(row.channel, result.status.value).inc()
                outcome = Outcome(row.notification_id, row.attempt, result.status, result.reason)
                await self._decide(s, alert, outcome, now, ENGINE, fx)
        await self._after_commit(fx)

    async def _complete_pg(
        self, members: Sequence[tuple[SendTask, DeliveryResult, SendTask]], owner: str
    ) -> None:
        """`complete_many` on PostgreSQL as prepared SQL on the driver pool, the same
        transaction: alerts locked in id order, jobs and attempts read, each result
        recorded and decided in order; changes to jobs and attempts are written before
        an alert's cancel-all reads them (as the ORM's flush does) and at the end."""
        fx = _Effects()
        now = self.clock()
        async with self.db.driver_connection() as raw, raw.transaction():
            alerts = {
                r["id"]: cast(Alert, SimpleNamespace(**r))
                for r in await raw.fetch(
                    _PG_LOCK_ALERTS, list({m.notification.alert_id for m, _, _ in members})
                )
            }
            jobs: dict[int, Any] = {}
            rows: dict[int, NotificationAttempt] = {}
            for r in await raw.fetch(
                _PG_RESULT_ROWS,
                list({m.job_id for m, _, _ in members}),
                list({m.attempt_row for m, _, _ in members}),
            ):
                if r["is_job"]:
                    jobs[r["id"]] = r
                else:
                    rows[r["id"]] = cast(NotificationAttempt, SimpleNamespace(**{
                        k: r[k] for k in ("id", "notification_id", "attempt", "channel",
                                          "recipient_id", "status")
                    }))  # fmt: skip
            done: list[int] = []
            recorded: dict[int, tuple[str, str | None, str | None]] = {}  # by attempt row
            decided: set[str] = set()

            async def flush() -> None:
                if not done and not recorded:
                    return
                results = list(recorded.values())
                await raw.execute(
                    _PG_RECORD_RESULTS, done, list(recorded), [r[0] for r in results],
                    [r[1] for r in results], [r[2] for r in results], now,
                )  # fmt: skip
                done.clear()
                recorded.clear()

            async def put(
                attempts: list[dict[str, Any]], new_jobs: list[dict[str, Any]], f: _Effects
            ) -> None:
                await _pg_insert_rows(raw, attempts, new_jobs, f)

            async def cancel(
                alert_id: str, at: datetime, scope: CancelScope
            ) -> list[tuple[str, str]]:
                await flush()
                return await _pg_cancel_all(raw, alert_id, at, scope)

            for m, result, task in members:
                alert = alerts[m.notification.alert_id]
                job = jobs.get(m.job_id)
                row = rows.get(m.attempt_row)
                if job is None or row is None or job["owner"] != owner:
                    self._audit(
                        fx, alert, ENGINE, now, event="stale_result", status=result.status.value,
                        reason="lease_lost", notification_uuid=m.notification.notification_id,
                        channel=m.notification.channel, attempt=m.notification.attempt,
                    )  # fmt: skip
                    continue
                if _already_recorded(row, m, result):
                    continue
                done.append(m.job_id)  # a job cancelled meanwhile stays cancelled
                recorded[m.attempt_row] = (result.status.value, result.reason,
                                           result.provider_id)  # fmt: skip
                self._audit_result(fx, alert, now, row, result, m, task)
                metrics.NOTIFICATIONS.labels(row.channel, result.status.value).inc()
                outcome = Outcome(row.notification_id, row.attempt, result.status, result.reason)
                await self._decide(None, alert, outcome, now, ENGINE, fx, put, cancel)
                decided.add(alert.id)
            await flush()
            if decided:
                await _pg_update_alerts(raw, [a for a in alerts.values() if a.id in decided])
        await self._after_commit(fx)

    async def provider_update(
        self, provider_id: str, result: DeliveryResult, ctx: RequestContext
    ) -> bool:
        """A carrier's later report (Twilio status callback): a failure reopens the attempt."""
        fx = _Effects()
        now = self.clock()
        async with self.db.session() as s, s.begin():
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
            alert = await self._lock_alert(s, row.alert_id)
            assert alert is not None
            self._audit(
                fx, alert, ctx, now, event="provider_status", status=result.status.value,
                reason=result.reason, notification_uuid=row.notification_id,
                channel=row.channel, attempt=row.attempt, recipient_id=row.recipient_id,
                provider_id=provider_id,
            )  # fmt: skip
            if result.status is not DeliveryStatus.DELIVERED and row.status == "delivered":
                row.status, row.reason = result.status.value, result.reason
                outcome = Outcome(row.notification_id, row.attempt, result.status, result.reason)
                await self._decide(s, alert, outcome, now, ctx, fx)
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
        async with self.db.session() as s, s.begin():
            await self._commit_without_flush(s)  # a lost delete is only done again
            res = await s.execute(
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


def _bundle(carrier: Notification, members: Sequence[SendTask]) -> Notification:
    """One notification standing for several held ones, so a flapping source pages once."""
    others = [m.notification for m in members]
    details = dict(carrier.details)
    details["bundled_alert_ids"] = ",".join(n.alert_id for n in others)
    details["bundled_short_ids"] = ",".join(n.alert_short_id for n in others)
    details["bundled_count"] = str(len(others))
    return Notification(
        notification_id=carrier.notification_id,
        alert_id=carrier.alert_id,
        alert_short_id=carrier.alert_short_id,
        channel=carrier.channel,
        contact=carrier.contact,
        title=f"{carrier.title} (+{len(others)} more)",
        summary=carrier.summary,
        severity=carrier.severity,
        attempt=carrier.attempt,
        ack_url=carrier.ack_url,
        details=details,
        policy=carrier.policy,
    )
