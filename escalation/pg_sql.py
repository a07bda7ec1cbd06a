"""The asyncpg fast path's SQL: each transaction of the engine as few prepared
statements as it takes, one round trip where it can (SQLAlchemy's per-statement overhead
was most of an ingest's or a claim's CPU time, then the round trips).

The statements run on the driver pool (`Database.driver_connection`), whose connections
keep one generic plan each (see db.DRIVER_PLANNER); JSON goes in as text, timestamps as
aware datetimes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import JSON
from sqlalchemy.dialects import postgresql

from escalation.core import CancelScope
from escalation.effects import Effects, NewJob
from escalation.records import ALERT_COLUMNS, ALERTS, ATTEMPTS, INFLIGHT, OPEN_STATES, AlertRecord
from storage.models import AlertState, JobKind

_OPEN_ATTEMPTS = f"({', '.join(repr(state) for state in OPEN_STATES)})"

# Every transaction that comes before a side effect or records one commits durably (the
# connections force synchronous_commit on, whatever the server's default: see
# db.DURABLE_COMMITS): an ingest (the 202 promises the alert), an ack or resolve, a claim
# (a lost claim after a database crash would hand the same notification out again) and a
# result (a lost result leaves the job leased to a worker that has forgotten it: it would
# be sent again when the lease runs out). Only bookkeeping that is simply done again
# commits without waiting for its WAL flush: lease renewals and the cleanup of old jobs.
PG_ASYNC_COMMIT = "SET LOCAL synchronous_commit TO off"
# The claim joins a few due jobs to their alerts and attempts: index lookups per job. A
# planner without statistics (a young table, or a server without autovacuum, where
# ANALYZE never runs) takes the tables for tiny and hashes all of alerts and attempts
# instead, a scan of both on every claim that grows with every alert ever stored (35 ms
# at 20,000 alerts, against 0.5 ms). Hash and merge joins are off for the ORM claim (the
# general path; the driver pool's statements plan under db.DRIVER_PLANNER).
PG_CLAIM_JOINS = ("SET LOCAL enable_hashjoin TO off", "SET LOCAL enable_mergejoin TO off")

# The driver-level ingest on PostgreSQL (`Engine._ingest_fast`): the same rows the Core
# inserts write, as prepared statements. JSON goes in as text (see Database.driver_pool),
# timestamps as aware datetimes.
PG_ATTEMPT_COLUMNS = ("company", "alert_id", "notification_id", "attempt", "channel",
                       "recipient_id", "address", "round", "step", "status", "reason",
                       "scheduled_for")  # fmt: skip
PG_INSERT_ATTEMPT = (
    f"INSERT INTO notification_attempts ({', '.join(PG_ATTEMPT_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}' for i in range(len(PG_ATTEMPT_COLUMNS)))})"
)
# Ids come from the serial in insertion order, which ORDER BY n fixes: sorted, they
# line up with the rows given.
PG_INSERT_JOBS = (
    "INSERT INTO jobs (alert_id, kind, payload, due_at, attempts, done, created_at) "
    "SELECT a, k, p, d, 0, false, c FROM unnest($1::varchar[], $2::varchar[], $3::json[], "
    "$4::timestamptz[], $5::timestamptz[]) WITH ORDINALITY AS t(a, k, p, d, c, n) "
    "ORDER BY n RETURNING id"
)
_JSON_COLUMNS = frozenset(c.name for c in ALERTS.columns if isinstance(c.type, JSON))


def _ingest_statement(keyed: bool) -> str:
    """The whole ingest as one statement, so one round trip and its own (synchronous)
    commit: the Idempotency-Key claimed ($1-$4; without a key the gate is one constant
    row), and only if it was, the alert, its attempts and its jobs inserted (the rows
    `Engine._decide` staged: parameters as arrays per column, as in PG_INSERT_JOBS). Returns
    whether the key was claimed and the new job ids in insertion order."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]

    def cast_to(column: Any) -> str:
        # the type without its length: a value too long fails as in a plain INSERT
        # (a cast to VARCHAR(n) would cut it silently)
        return re.sub(r"\(\d+\)", "", column.type.compile(dialect=dialect))

    alert_types = [cast_to(c) for c in ALERTS.columns]
    attempt_types = [cast_to(ATTEMPTS.c[name]) for name in PG_ATTEMPT_COLUMNS]
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
        f"alert_in AS (INSERT INTO alerts ({', '.join(c.name for c in ALERTS.columns)}) "
        f"SELECT {', '.join(alert_params)} FROM key_claimed), "
        f"attempts_in AS (INSERT INTO notification_attempts ({', '.join(PG_ATTEMPT_COLUMNS)}) "
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


PG_INGEST = {keyed: _ingest_statement(keyed) for keyed in (True, False)}

# The driver-level claim (`Engine._claim_fast`): one statement in its own transaction, so
# one round trip. `_CLAIM` with only what a send needs (a send's attempt row read
# alongside, not locked: the alert's lock covers it), and in the same statement the sends
# of triggered alerts leased and their attempts marked in flight, the jobs of closed
# alerts cancelled. The rows come back as they were before those updates. A due timer
# among them leaves everything as it was (the updates are guarded by `timers`): the
# general path then runs the claim.
PG_CLAIM_SENDABLE = (
    f"due.kind = '{JobKind.SEND.value}' AND due.state = '{AlertState.TRIGGERED.value}' "
    "AND NOT timers.found"
)
PG_CLAIM = (
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
    f"FROM due, timers WHERE jobs.id = due.id AND {PG_CLAIM_SENDABLE}), "
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
    f"AND {PG_CLAIM_SENDABLE}) "
    "SELECT due.* FROM due ORDER BY due_at, id"
)


# The driver-level result recording (`DriverUnit`).
PG_LOCK_ALERTS = "SELECT * FROM alerts WHERE id = any($1::varchar[]) ORDER BY id FOR UPDATE"
# The results' jobs and attempt rows in one read, the jobs done and the results written
# in one statement (a job cancelled meanwhile stays cancelled: its outcome is kept; the
# test is not `AND NOT done`, which lets the planner walk all of ix_jobs_due, every
# pending timer, for the ids).
PG_RESULT_ROWS = (
    "SELECT true AS is_job, id, owner, done, NULL::varchar AS notification_id, "
    "NULL::int AS attempt, NULL::varchar AS channel, NULL::varchar AS recipient_id, "
    "NULL::varchar AS status FROM jobs WHERE id = any($1::int[]) UNION ALL "
    "SELECT false, id, NULL, NULL, notification_id, attempt, channel, recipient_id, status "
    "FROM notification_attempts WHERE id = any($2::int[])"
)
PG_RECORD_RESULTS = (
    "WITH finished AS (UPDATE jobs SET done = true, "
    "outcome = CASE WHEN done THEN outcome ELSE 'done' END WHERE id = any($1::int[])) "
    "UPDATE notification_attempts n SET status = r.status, reason = r.reason, "
    "provider_id = r.provider_id, finished_at = $6 "
    "FROM unnest($2::int[], $3::varchar[], $4::varchar[], $5::varchar[]) "
    "AS r(id, status, reason, provider_id) WHERE n.id = r.id"
)
ALERT_MUTABLE = ("chain", "updated_at", "state", "close_reason", "acknowledged_at", "acked_by",
                  "resolved_at", "resolved_by", "exhausted_at", "open_dedup_key")  # fmt: skip
PG_UPDATE_ALERT = (
    f"UPDATE alerts SET {', '.join(f'{c} = ${i + 2}' for i, c in enumerate(ALERT_MUTABLE))} "
    "WHERE id = $1"
)
# An alert's sends in flight on a lease that still runs ($1: alert id, $2: now).
_LIVE_SENDS = (
    "SELECT payload->>'nid' AS nid, (payload->>'attempt')::int AS attempt FROM jobs "
    f"WHERE alert_id = $1 AND kind = '{JobKind.SEND.value}' AND NOT done "
    "AND owner IS NOT NULL AND lease_until >= $2"
)
# `SessionUnit.cancel_all` in one statement: the alert's undone jobs and its scheduled, held
# and orphaned attempts cancelled, the sends in flight returned to be hung up. A send in
# flight on a live lease is left to its worker, which hangs up and records how it ended;
# if that worker is gone, the claim that finds the lease expired closes it (a job closed
# here would leave its attempt `sending` for ever: nobody records a dead worker's call).
# An attempt in flight whose lease has run out has no worker left: it is cancelled here.
# (The final SELECT sees the rows as they were before the statement.) $3: the scope's
# reason; $4: keep the cap timer (a snooze).
PG_CANCEL_ALL = (
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
    f"WHERE n.alert_id = $1 AND n.status = '{INFLIGHT}'"
)
PG_LOCK_ALERT = "SELECT * FROM alerts WHERE id = $1 FOR UPDATE"


async def cancel_all(
    raw: Any, alert_id: str, at: datetime, scope: CancelScope = CancelScope.ALERT
) -> list[tuple[str, str]]:
    keep_cap = scope is CancelScope.SNOOZE
    rows = await raw.fetch(PG_CANCEL_ALL, alert_id, at, scope.value, keep_cap)
    return [(r[0], r[1]) for r in rows]


async def update_alerts(raw: Any, alerts: Sequence[AlertRecord]) -> None:
    """Write back what a decision changed on locked alerts (`ALERT_MUTABLE`)."""
    await raw.executemany(
        PG_UPDATE_ALERT,
        [
            (a.id, *(json.dumps(v) if c == "chain" else v
                     for c in ALERT_MUTABLE for v in (getattr(a, c),)))
            for a in alerts
        ],
    )  # fmt: skip


def alert_args(alert: AlertRecord, plan_text: str | None = None) -> list[Any]:
    """The alert's columns in order, JSON as text (`plan_text`: its plan already dumped)."""
    return [
        plan_text
        if c == "plan" and plan_text is not None
        else json.dumps(getattr(alert, c))
        if c in _JSON_COLUMNS
        else getattr(alert, c)
        for c in ALERT_COLUMNS
    ]


def job_arrays(jobs: list[dict[str, Any]]) -> list[list[Any]]:
    """Job rows as the per-column arrays PG_INSERT_JOBS (and the ingest) unnest."""
    return [
        [j["alert_id"] for j in jobs],
        [j["kind"] for j in jobs],
        [json.dumps(j["payload"]) for j in jobs],
        [j["due_at"] for j in jobs],
        [j["created_at"] for j in jobs],
    ]


async def insert_rows(
    raw: Any, attempts: list[dict[str, Any]], jobs: list[dict[str, Any]], fx: Effects
) -> None:
    if len(attempts) == 1:
        await raw.execute(PG_INSERT_ATTEMPT, *(attempts[0][c] for c in PG_ATTEMPT_COLUMNS))
    elif attempts:
        await raw.executemany(
            PG_INSERT_ATTEMPT, [[a[c] for c in PG_ATTEMPT_COLUMNS] for a in attempts]
        )
    attempts.clear()
    if jobs:
        ids = sorted(await raw.fetch(PG_INSERT_JOBS, *job_arrays(jobs)), key=lambda r: int(r[0]))
        for (job_id,), row in zip(ids, jobs, strict=True):
            fx.jobs.append(NewJob(job_id, row["alert_id"], row["kind"], row["due_at"]))
        jobs.clear()
