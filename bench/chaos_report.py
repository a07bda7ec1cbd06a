"""The chaos bench's verdict, computed from what was recorded: every answer the client got,
the faults injected, the alerts in the database, the audit trail and the carrier's INVITEs.

Pure functions over plain records (no processes, no clock), so each rule can be checked on
its own. Times are Unix seconds; audit lines carry ISO timestamps that are converted.

The rules (issue 13, "the suite that keeps it true"):

* lost: answered 202 but not in the database;
* stuck: still `triggered` after the bound, or a notification attempt still `sending`;
* duplicate notifications: one attempt (notification_uuid, attempt) handed to a channel
  more than once. At-least-once allows one re-send of a notification that was in flight on
  a worker killed -9; every other re-send is over the bound;
* duplicate audit lines: the same event twice for the same alert, notification, attempt
  and status (two `result` lines for one call);
* nobody who answered is called again for the same alert;
* no 500, whatever is down.
"""

from __future__ import annotations

import enum
import itertools
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from bench.services import Invite

FINAL_STATES = frozenset({"acknowledged", "exhausted", "resolved"})
# A call that reached a person (or a delivered message), as opposed to failing or being
# cancelled: what "the first completed notification after a fault" means.
COMPLETED = frozenset(
    {"acknowledged", "not_acknowledged", "escalate", "resolved", "snooze", "delivered"}
)
# A send that follows the acknowledging result by less than this was committed before the
# ack (each audit line carries its transaction's start time, not its commit time).
ACK_RACE_MARGIN = 1.0


class FaultKind(enum.StrEnum):
    WORKER = "worker"  # kill -9 one worker, start a replacement
    REDIS = "redis"  # kill -9 Redis, restart it empty
    POSTGRES = "postgres"  # pg_ctl stop -m immediate, start again (crash recovery)
    CARRIER = "carrier"  # kill -9 the SIPp carrier, restart it on the same port
    # the drills' faults on the HA topology (bench/drill.py)
    NODE = "node"  # kill -9 a whole node (API, worker, gateway)
    TRUNK = "trunk"  # kill -9 one of two carriers
    DB_FAILOVER = "db-failover"  # kill -9 the PostgreSQL primary: the standby is promoted
    DB_SWITCHOVER = "db-switchover"  # planned: the standby becomes primary
    REDIS_FAILOVER = "redis-failover"  # kill -9 the Redis master: Sentinel promotes
    ROLLING = "rolling"  # every node restarted in turn

    @property
    def label(self) -> str:
        return {
            FaultKind.WORKER: "worker kill -9",
            FaultKind.REDIS: "redis kill -9",
            FaultKind.POSTGRES: "postgres crash",
            FaultKind.CARRIER: "carrier kill -9",
            FaultKind.NODE: "node kill -9",
            FaultKind.TRUNK: "trunk kill -9",
            FaultKind.DB_FAILOVER: "pg failover",
            FaultKind.DB_SWITCHOVER: "pg switchover",
            FaultKind.REDIS_FAILOVER: "redis failover",
            FaultKind.ROLLING: "rolling restart",
        }[self]


@dataclass(frozen=True)
class Answer:
    """One HTTP exchange of POST /v1/alerts; `status` None: a transport error."""

    sent_at: float
    answered_at: float
    status: int | None
    error: str | None = None


@dataclass
class Request:
    """One alert the client wanted raised (one Idempotency-Key), with every try."""

    index: int
    key: str
    policy: str
    answers: list[Answer] = field(default_factory=list)
    alert_id: str | None = None  # from the 202

    @property
    def sent_at(self) -> float:
        return self.answers[0].sent_at if self.answers else float("inf")


@dataclass(frozen=True)
class FaultEvent:
    kind: FaultKind
    start: float  # injected
    end: float  # the dependency answers again (worker: the replacement is ready)
    killed_pid: int | None = None  # the worker killed


@dataclass(frozen=True)
class StoredAlert:
    id: str
    key: str | None  # the Idempotency-Key the client sent (kept in details)
    state: str
    sending: tuple[tuple[str, int], ...] = ()  # (notification_uuid, attempt) still `sending`

    @property
    def stuck(self) -> bool:
        return self.state == "triggered" or bool(self.sending)


@dataclass(frozen=True)
class Window:
    """A stretch of the load: before the first fault, or from one fault to the next."""

    name: str
    start: float
    end: float
    fault: FaultEvent | None = None


def make_windows(load_start: float, load_end: float, faults: Sequence[FaultEvent]) -> list[Window]:
    ordered = sorted(faults, key=lambda f: f.start)
    starts = [load_start, *(f.start for f in ordered)]
    ends = [*(f.start for f in ordered), max([load_end, *(f.end for f in ordered)])]
    names = ["before faults", *(f.kind.label for f in ordered)]
    owners: list[FaultEvent | None] = [None, *ordered]
    return [Window(n, s, e, f) for n, s, e, f in zip(names, starts, ends, owners, strict=True)]


def window_of(windows: Sequence[Window], at: float) -> Window:
    """The window a moment belongs to (before the load: the first; after: the last)."""
    found = windows[0]
    for w in windows:
        if at >= w.start:
            found = w
    return found


def audit_time(record: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(str(record["ts"])).timestamp()


def worker_pid(worker: str | None) -> int | None:
    """The pid in a worker id (`host:pid:suffix`)."""
    parts = (worker or "").split(":")
    return int(parts[-2]) if len(parts) >= 3 and parts[-2].isdigit() else None


def _attempt(record: Mapping[str, Any]) -> tuple[str, int]:
    return str(record["notification_uuid"]), int(record["attempt"])


def sends_by_attempt(audit: Iterable[Mapping[str, Any]]) -> dict[tuple[str, int], list[Any]]:
    """Every `send` line per attempt, oldest first."""
    sends: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for rec in audit:
        if rec.get("event") == "send" and rec.get("notification_uuid") is not None:
            sends[_attempt(rec)].append(rec)
    for lines in sends.values():
        lines.sort(key=audit_time)
    return sends


@dataclass(frozen=True)
class DuplicateSend:
    alert_id: str
    notification_uuid: str
    attempt: int
    previous_at: float  # the hand-off this one repeats
    at: float
    cause_at: float  # the kill that excused it, else the hand-off it repeats
    worker: str | None
    previous_worker: str | None
    within_bound: bool  # the hand-off before was in flight on a worker killed -9


def duplicate_sends(
    audit: Sequence[Mapping[str, Any]], kills: Mapping[int, float]
) -> list[DuplicateSend]:
    """Each hand-off of an attempt after its first. `kills` maps each worker killed -9 to
    when: a re-send is within the bound when the hand-off before it was on a worker that
    was killed while it was in flight (so each killed worker excuses one re-send per
    attempt it had in flight); any other re-send is over the bound."""
    found: list[DuplicateSend] = []
    for (nid, attempt), lines in sends_by_attempt(audit).items():
        for previous, line in itertools.pairwise(lines):
            sent, resent = audit_time(previous), audit_time(line)
            killed_at = kills.get(worker_pid(previous.get("worker")) or 0)
            allowed = killed_at is not None and sent <= killed_at <= resent
            cause = killed_at if allowed and killed_at is not None else sent
            found.append(DuplicateSend(str(line.get("alert_id")), nid, attempt, sent, resent,
                                       cause, line.get("worker"), previous.get("worker"),
                                       allowed))  # fmt: skip
    return found


@dataclass(frozen=True)
class DuplicateLine:
    alert_id: str
    event: str
    status: str | None
    notification_uuid: str | None
    attempt: int | None
    copies: int
    at: float  # the first of them


def duplicate_audit_lines(audit: Sequence[Mapping[str, Any]]) -> list[DuplicateLine]:
    """Events recorded twice: same alert, event, status, notification, attempt, round and
    step. Hand-offs (`send`) are counted as duplicate notifications instead."""
    seen: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for rec in audit:
        if rec.get("alert_id") is None or rec.get("event") == "send":
            continue
        key = tuple(rec.get(k) for k in ("alert_id", "event", "status", "notification_uuid",
                                         "attempt", "round", "step"))  # fmt: skip
        seen[key].append(audit_time(rec))
    return [
        DuplicateLine(str(k[0]), str(k[1]), k[2], k[3], k[4], len(times), min(times))
        for k, times in seen.items()
        if len(times) > 1
    ]


@dataclass(frozen=True)
class CalledAgain:
    alert_id: str
    recipient_id: str
    answered_at: float
    called_at: float


def called_after_answering(audit: Sequence[Mapping[str, Any]]) -> list[CalledAgain]:
    """Hand-offs to a recipient after that recipient acknowledged the same alert."""
    acked: dict[tuple[str, str], float] = {}
    for rec in audit:
        if rec.get("event") == "result" and rec.get("status") == "acknowledged":
            key = (str(rec.get("alert_id")), str(rec.get("recipient_id")))
            acked[key] = min(acked.get(key, float("inf")), audit_time(rec))
    found = []
    for rec in audit:
        if rec.get("event") != "send":
            continue
        key = (str(rec.get("alert_id")), str(rec.get("recipient_id")))
        if key in acked and audit_time(rec) > acked[key] + ACK_RACE_MARGIN:
            found.append(CalledAgain(key[0], key[1], acked[key], audit_time(rec)))
    return found


@dataclass(frozen=True)
class WorkerCalls:
    """What the workers said about their calls: the SIP port each listened on (which
    tells who placed an INVITE) and the Call-IDs of the calls they reported ended."""

    pid_by_port: Mapping[int, int]
    ended: frozenset[str]


def open_calls(
    invites: Sequence[Invite], workers: WorkerCalls, killed: Iterable[int]
) -> list[Invite]:
    """Calls that reached the carrier from a worker still running and never ended."""
    dead = set(killed)
    seen: set[str] = set()
    found = []
    for invite in invites:
        pid = workers.pid_by_port.get(invite.via_port or 0)
        if pid in dead or invite.call_id in workers.ended or invite.call_id in seen:
            continue
        seen.add(invite.call_id)
        found.append(invite)
    return found


@dataclass(frozen=True)
class CarrierCheck:
    """The carrier's own count of calls against the audit trail and the workers."""

    invites: int  # distinct Call-IDs that reached the carrier
    voice_sends: int  # `send` lines of the voice channel
    attempts_sent: int  # distinct voice attempts handed to the channel
    with_result: int  # INVITEs whose call has a recorded result (provider_id = Call-ID)
    from_killed: int  # INVITEs placed by a worker that was then killed -9
    # INVITEs of running workers no recorded result names: calls given up before any
    # answer, e.g. an INVITE abandoned at trying_timeout that reached the carrier later
    unnamed: int
    # of those, calls to a carrier killed under them (or an abandoned INVITE reaching it
    # when it came back): the send went on to another trunk, so reached two carriers
    failed_over: int
    left_open: int  # calls of running workers that never ended
    unknown_caller: int  # INVITEs from a port no worker listened on
    attempts_called_twice: int  # attempts with two calls that reached the carrier

    @property
    def consistent(self) -> bool:
        """Every call the carrier saw was handed out (and audited) as a send."""
        return self.invites - self.failed_over <= self.voice_sends and self.unknown_caller == 0


def _attempt_of_call(audit: Iterable[Mapping[str, Any]]) -> dict[str, tuple[str, int]]:
    """Call-ID -> the attempt whose recorded result names it (provider_id)."""
    return {
        str(rec["provider_id"]): _attempt(rec)
        for rec in audit
        if rec.get("event") in ("result", "stale_result") and rec.get("provider_id")
    }


def calls_by_attempt(
    audit: Sequence[Mapping[str, Any]], invites: Iterable[Invite]
) -> Counter[tuple[str, int]]:
    """How many calls of each attempt reached the carrier (those with a recorded result)."""
    attempt_of_call = _attempt_of_call(audit)
    calls = {i.call_id for i in invites}
    return Counter(attempt_of_call[c] for c in calls if c in attempt_of_call)


def carrier_check(
    audit: Sequence[Mapping[str, Any]],
    invites: Sequence[Invite],
    workers: WorkerCalls,
    killed: Iterable[int],
    cut_by_carrier_kill: Collection[str] = frozenset(),
) -> CarrierCheck:
    """`cut_by_carrier_kill`: Call-IDs at a carrier that was killed, from before the kill
    until its abandoned INVITEs stopped."""
    dead = set(killed)
    callers = {i.call_id: workers.pid_by_port.get(i.via_port or 0) for i in invites}
    voice = [r for r in audit if r.get("event") == "send" and r.get("channel") == "voice"]
    attempt_of_call = _attempt_of_call(audit)
    reached = calls_by_attempt(audit, invites)
    return CarrierCheck(
        invites=len(callers),
        voice_sends=len(voice),
        attempts_sent=len({_attempt(r) for r in voice}),
        with_result=sum(1 for c in callers if c in attempt_of_call),
        from_killed=sum(1 for pid in callers.values() if pid in dead),
        unnamed=sum(
            1 for c, pid in callers.items() if pid not in dead and c not in attempt_of_call
        ),
        failed_over=sum(
            1
            for c, pid in callers.items()
            if pid not in dead and c not in attempt_of_call and c in cut_by_carrier_kill
        ),
        left_open=len(open_calls(invites, workers, dead)),
        unknown_caller=sum(1 for pid in callers.values() if pid is None),
        attempts_called_twice=sum(1 for n in reached.values() if n > 1),
    )


@dataclass(frozen=True)
class Orphans:
    """Attempts a killed worker had in flight, and what became of them."""

    in_flight: int
    resent: int
    last_resent_after: float | None  # seconds from the kill


def orphans(audit: Sequence[Mapping[str, Any]], fault: FaultEvent) -> Orphans:
    if fault.killed_pid is None:
        return Orphans(0, 0, None)
    ended = {
        _attempt(r)
        for r in audit
        if r.get("event") == "result" and r.get("notification_uuid") is not None
        and audit_time(r) <= fault.start
    }  # fmt: skip
    in_flight = resent = 0
    last: float | None = None
    for key, lines in sends_by_attempt(audit).items():
        before = [r for r in lines if audit_time(r) <= fault.start]
        if not before or key in ended or worker_pid(before[-1].get("worker")) != fault.killed_pid:
            continue
        in_flight += 1
        after = [audit_time(r) for r in lines if audit_time(r) > fault.start]
        if after:
            resent += 1
            last = max(last or 0.0, after[0] - fault.start)
    return Orphans(in_flight, resent, last)


@dataclass(frozen=True)
class Recovery:
    to_first_202: float | None  # fault end .. the first 202 answered after it
    to_first_completed: float | None  # fault end .. the first call completed that was sent after


def recovery(
    fault: FaultEvent, requests: Sequence[Request], audit: Sequence[Mapping[str, Any]]
) -> Recovery:
    accepted = [a.answered_at for r in requests for a in r.answers
                if a.status == 202 and a.answered_at >= fault.end]  # fmt: skip
    sends = sends_by_attempt(audit)
    completed = []
    for rec in audit:
        if rec.get("event") != "result" or rec.get("status") not in COMPLETED:
            continue
        at = audit_time(rec)
        before = [audit_time(s) for s in sends.get(_attempt(rec), []) if audit_time(s) <= at]
        if before and max(before) >= fault.end:
            completed.append(at)
    return Recovery(
        round(min(accepted) - fault.end, 3) if accepted else None,
        round(min(completed) - fault.end, 3) if completed else None,
    )


@dataclass
class WindowStats:
    name: str
    start: float
    end: float
    answers: Counter[str] = field(default_factory=Counter)  # "202", "503", "conn:ReadError"
    retries: int = 0
    gave_up: int = 0
    accepted: int = 0
    finished: int = 0
    lost: int = 0
    stuck: int = 0
    duplicate_sends_within: int = 0
    duplicate_sends_over: int = 0
    duplicate_lines: int = 0
    recovery: Recovery | None = None
    orphans: Orphans | None = None

    def count(self, *keys: str) -> int:
        return sum(self.answers[k] for k in keys)

    @property
    def transport_errors(self) -> int:
        return sum(n for k, n in self.answers.items() if k.startswith("conn:"))

    @property
    def other_answers(self) -> int:
        known = ("202", "503", "500")
        return sum(n for k, n in self.answers.items() if k not in known and ":" not in k)


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    windows: list[WindowStats]
    total: WindowStats
    carrier: CarrierCheck
    checks: list[Check]
    final_states: dict[str, dict[str, int]]  # policy -> state -> alerts
    examples: dict[str, list[str]]  # check name -> a few offending records

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        def stats(w: WindowStats) -> dict[str, Any]:
            out = asdict(w)
            out["answers"] = dict(w.answers)
            return out

        return {
            "passed": self.passed,
            "windows": [stats(w) for w in self.windows],
            "total": stats(self.total),
            "carrier": {**asdict(self.carrier), "consistent": self.carrier.consistent},
            "checks": [asdict(c) for c in self.checks],
            "final_states": self.final_states,
            "examples": self.examples,
        }


def _stuck(
    row: StoredAlert,
    policy: str,
    sends: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    killed: set[int],
) -> str:
    """Why an alert counts as stuck, naming who last took each open attempt."""
    parts = []
    for nid, attempt in row.sending:
        lines = sends.get((nid, attempt), [])
        worker = lines[-1].get("worker") if lines else None
        fate = " (killed -9)" if worker_pid(worker) in killed else ""
        parts.append(f"attempt {nid}/{attempt} still sending, last taken by {worker}{fate}")
    return f"alert {row.id} ({policy}) {row.state}: " + ("; ".join(parts) or "no attempt open")


def _answer_key(answer: Answer) -> str:
    return str(answer.status) if answer.status is not None else f"conn:{answer.error}"


_Windows = Callable[[float], tuple[WindowStats, WindowStats]]  # its window's and the total


def _tally_request(
    req: Request,
    by_id: Mapping[str, StoredAlert],
    both: _Windows,
    examples: dict[str, list[str]],
    sends: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]],
    killed: set[int],
) -> None:
    """Count one request's answers and its alert's fate; note it if lost or stuck."""
    for i, answer in enumerate(req.answers):
        for s in both(answer.sent_at):
            s.answers[_answer_key(answer)] += 1
            s.retries += i > 0
    for s in both(req.sent_at):
        if req.alert_id is None:
            s.gave_up += 1
            continue
        s.accepted += 1
        row = by_id.get(req.alert_id)
        if row is None:
            s.lost += 1
            continue
        s.finished += row.state in FINAL_STATES
        s.stuck += row.stuck
    if req.alert_id is not None and req.alert_id not in by_id:
        examples["no alert lost"].append(f"{req.key} -> {req.alert_id} (202) not in the database")
    elif req.alert_id is not None and by_id[req.alert_id].stuck:
        examples["no alert stuck"].append(_stuck(by_id[req.alert_id], req.policy, sends,
                                                 killed))  # fmt: skip


def _tally_duplicate(
    d: DuplicateSend,
    both: _Windows,
    examples: dict[str, list[str]],
    calls: Mapping[tuple[str, int], int],
    load_start: float,
) -> None:
    """Count one duplicate send in its window; note it when over the bound."""
    for s in both(d.cause_at):
        if d.within_bound:
            s.duplicate_sends_within += 1
        else:
            s.duplicate_sends_over += 1
    if not d.within_bound:
        examples["duplicate notifications within bound"].append(
            f"alert {d.alert_id} notification {d.notification_uuid} attempt {d.attempt}: "
            f"sent at {d.previous_at - load_start:.1f} s by {d.previous_worker}, again at "
            f"{d.at - load_start:.1f} s by {d.worker}; "
            f"{calls.get((d.notification_uuid, d.attempt), 0)} of its calls reached the "
            "carrier"
        )


def build_report(
    requests: Sequence[Request],
    faults: Sequence[FaultEvent],
    load_start: float,
    load_end: float,
    stored: Sequence[StoredAlert],
    audit: Sequence[Mapping[str, Any]],
    invites: Sequence[Invite],
    workers: WorkerCalls,
    cut_by_carrier_kill: Collection[str] = frozenset(),
) -> Report:
    windows = make_windows(load_start, load_end, faults)
    sends = sends_by_attempt(audit)
    killed = {f.killed_pid for f in faults if f.killed_pid is not None}
    stats = {w.name: WindowStats(w.name, w.start, w.end) for w in windows}
    total = WindowStats("total", load_start, windows[-1].end)
    by_id = {a.id: a for a in stored}
    examples: dict[str, list[str]] = defaultdict(list)

    def both(at: float) -> tuple[WindowStats, WindowStats]:
        return stats[window_of(windows, at).name], total

    for req in requests:
        _tally_request(req, by_id, both, examples, sends, killed)

    duplicates = duplicate_sends(audit, {f.killed_pid: f.start for f in faults
                                         if f.killed_pid is not None})  # fmt: skip
    calls = calls_by_attempt(audit, invites)
    for d in duplicates:
        _tally_duplicate(d, both, examples, calls, load_start)
    lines = duplicate_audit_lines(audit)
    for line in lines:
        for s in both(line.at):
            s.duplicate_lines += line.copies - 1
        examples["no duplicate audit lines"].append(
            f"alert {line.alert_id} {line.event}/{line.status} notification "
            f"{line.notification_uuid} attempt {line.attempt}: {line.copies} lines"
        )
    for w in windows:
        if w.fault is not None:
            stats[w.name].recovery = recovery(w.fault, requests, audit)
            if w.fault.kind in (FaultKind.WORKER, FaultKind.NODE):
                stats[w.name].orphans = orphans(audit, w.fault)

    again = called_after_answering(audit)
    examples["nobody called again after answering"] = [
        f"alert {c.alert_id}: {c.recipient_id} answered, called again "
        f"{c.called_at - c.answered_at:.1f} s later"
        for c in again
    ]
    keys = Counter(a.key for a in stored if a.key is not None)
    twice = {k: n for k, n in keys.items() if n > 1}
    examples["one alert per Idempotency-Key"] = [f"{k}: {n} alerts" for k, n in twice.items()]
    refused_but_stored = [r for r in requests if r.alert_id is None and keys.get(r.key)]
    examples["stored although refused"] = [
        f"{r.key}: last answer {_answer_key(r.answers[-1])}, alert in the database"
        for r in refused_but_stored
    ]
    carrier = carrier_check(audit, invites, workers, killed, cut_by_carrier_kill)
    left_open = open_calls(invites, workers, killed)
    examples["every call hung up"] = [
        f"call {i.call_id} from worker pid {workers.pid_by_port.get(i.via_port or 0)}, "
        f"reached the carrier at {i.at - load_start:.1f} s, never ended"
        for i in left_open
    ]
    answers_500 = total.count("500")
    examples["no 500"] = [
        f"{r.key} at {a.sent_at - load_start:.1f} s" for r in requests for a in r.answers
        if a.status == 500
    ]  # fmt: skip
    checks = [
        Check("no alert lost", total.lost == 0, f"{total.lost} of {total.accepted} accepted"),
        Check("no alert stuck", total.stuck == 0, f"{total.stuck} of {total.accepted} accepted"),
        Check("no 500", answers_500 == 0, f"{answers_500} answers 500"),
        Check(
            "duplicate notifications within bound",
            total.duplicate_sends_over == 0,
            f"{total.duplicate_sends_within} within, {total.duplicate_sends_over} over "
            "(one re-send per killed worker per in-flight notification)",
        ),
        Check(
            "no duplicate audit lines",
            total.duplicate_lines == 0,
            f"{total.duplicate_lines} repeated lines",
        ),
        Check("nobody called again after answering", not again, f"{len(again)} calls"),
        Check("one alert per Idempotency-Key", not twice, f"{len(twice)} keys with 2+ alerts"),
        Check(
            "every call at the carrier was handed out",
            carrier.consistent,
            f"{carrier.invites} INVITEs, {carrier.voice_sends} voice sends audited, "
            f"{carrier.unknown_caller} from no known worker",
        ),
        Check(
            "every call hung up",
            not left_open,
            f"{len(left_open)} calls of running workers still up at the end "
            f"({carrier.from_killed} more died with the killed worker)",
        ),
    ]
    final: dict[str, Counter[str]] = defaultdict(Counter)
    for req in requests:
        if req.alert_id is not None and req.alert_id in by_id:
            final[req.policy][by_id[req.alert_id].state] += 1
    return Report(
        windows=[stats[w.name] for w in windows],
        total=total,
        carrier=carrier,
        checks=checks,
        final_states={p: dict(c) for p, c in sorted(final.items())},
        examples={k: v[:5] for k, v in examples.items() if v},
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def render(report: Report) -> str:
    """The tables and the verdict, as printed by `make chaos`."""
    rows = [*report.windows, report.total]
    out = ["API answers to POST /v1/alerts, by the window each try was sent in",
           f"{'window':<16}{'tries':>7}{'202':>6}{'503':>6}{'500':>6}{'other':>7}"
           f"{'conn-err':>10}{'retries':>9}{'gave-up':>9}"]  # fmt: skip
    for w in rows:
        out.append(
            f"{w.name:<16}{sum(w.answers.values()):>7}{w.count('202'):>6}{w.count('503'):>6}"
            f"{w.count('500'):>6}{w.other_answers:>7}{w.transport_errors:>10}{w.retries:>9}"
            f"{w.gave_up:>9}"
        )
    out += ["", "Alerts, by the window their first try was sent in (duplicates: by the window "
            "of the kill that excuses them, else of the hand-off or event they repeat)",
            f"{'window':<16}{'accepted':>9}{'finished':>9}{'lost':>6}{'stuck':>7}"
            f"{'dup-notif ok/over':>19}{'dup-audit':>11}{'to 202':>9}{'to call':>9}"]  # fmt: skip
    for w in rows:
        rec = w.recovery
        out.append(
            f"{w.name:<16}{w.accepted:>9}{w.finished:>9}{w.lost:>6}{w.stuck:>7}"
            f"{f'{w.duplicate_sends_within}/{w.duplicate_sends_over}':>19}"
            f"{w.duplicate_lines:>11}{_seconds(rec.to_first_202 if rec else None):>9}"
            f"{_seconds(rec.to_first_completed if rec else None):>9}"
        )
    out.append("(to 202 / to call: from the end of the fault to the first 202, and to the first "
               "call completed that was placed after it)")  # fmt: skip
    for w in report.windows:
        if w.orphans is not None:
            o = w.orphans
            out.append(f"{w.name}: {o.in_flight} notification(s) in flight on the killed worker,"
                       f" {o.resent} re-sent, the last {_seconds(o.last_resent_after)} after "
                       "the kill")  # fmt: skip
    other = Counter[str]()
    for w in report.windows:
        other.update({k: n for k, n in w.answers.items() if k not in ("202", "503", "500")})
    if other:
        out.append("other answers: " + ", ".join(f"{k} x{n}" for k, n in sorted(other.items())))
    c = report.carrier
    out += ["", f"carrier: {c.invites} INVITEs received ({c.from_killed} from the killed "
            f"worker); {c.voice_sends} voice sends audited ({c.attempts_sent} attempts); "
            f"{c.with_result} calls named by a recorded result, {c.unnamed} from running workers"
            f" by none (given up before an answer; {c.failed_over} cut by a carrier's kill and "
            f"placed again on another trunk); {c.attempts_called_twice} attempts reached "
            "the carrier twice"]  # fmt: skip
    states = "; ".join(
        f"{policy}: " + ", ".join(f"{s} {n}" for s, n in sorted(by_state.items()))
        for policy, by_state in report.final_states.items()
    )
    out += [f"final states by policy: {states or '-'}", "", "checks"]
    for check in report.checks:
        out.append(f"  {'PASS' if check.ok else 'FAIL'}  {check.name}: {check.detail}")
        for example in report.examples.get(check.name, []) if not check.ok else []:
            out.append(f"        {example}")
    if report.examples.get("stored although refused"):
        out.append("  note: alerts stored although the client never got a 202, e.g.:")
        out += [f"        {e}" for e in report.examples["stored although refused"]]
    out.append(f"verdict: {'PASS' if report.passed else 'FAIL'}")
    return "\n".join(out)
