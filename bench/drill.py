"""Game-day drills on the HA topology (bench/ha.py): one fault under a steady alert load.

    ackline drill SCENARIO [--duration 60] [--rate 5] [--at 20] [--report-dir var/drills]
                           [--attach DIR]
    python -m bench.drill SCENARIO ...

Each drill starts its own topology (PostgreSQL primary + synchronous standby under
pg_auto_failover, Redis + replica + three Sentinels, two SIPp carriers, two ackline nodes
behind HAProxy), or with `--attach DIR` takes over the one `make ha` (`python -m bench.ha
up --workdir DIR`) left running there and leaves it running, whole again, with its state
file updated (`make ha-down` still stops it). It POSTs alerts through the load balancer
as a careful client (one Idempotency-Key per alert, retried after a transport error or a
5xx), injects the fault `--at` seconds into the load, waits for every alert to end and
writes a report, Markdown and JSON, with:

* RPO: accepted alerts (answered 202) missing afterwards; the target is 0 in every drill;
* RTO: the longest stretch after the fault without a 202 (ingest) and without a call
  handed to a carrier (dispatch), against the scenario's target;
* alerts delayed (202 later than 1 s after the first try; first call later than 2 s) and
  by how much, duplicate notifications, failed requests and calls cut short;
* the chaos bench's checks (nothing lost, stuck, sent twice beyond a kill, left ringing).

Exit status 0 when every target is met, 1 otherwise, 2 when `--attach` finds no running
topology in DIR (no state file, a process of it gone) or one without what the fault needs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import itertools
import json
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, assert_never

from bench.chaos import (
    Params,
    Progress,
    drain,
    drive,
    log_findings,
    plan_requests,
    read_audit,
    stored_alerts,
)
from bench.chaos_report import (
    FaultEvent,
    FaultKind,
    Report,
    Request,
    WorkerCalls,
    audit_time,
    build_report,
    open_calls,
)
from bench.chaos_report import (
    render as render_checks,
)
from bench.ha import STATE_FILE, HaParams, Node, PgMode, RedisMode, Topology
from bench.ha_postgres import NODES as PG_NODES
from bench.ha_postgres import PgAutoFailover
from bench.ha_redis import RedisSentinelSet
from bench.services import Invite, ServiceError, Services, SippCarrier

DRILL_BOUND = 900.0  # seconds for a whole drill, start-up to report
STOP_GRACE = 45.0  # a node drains its calls (ACKLINE_DRAIN_TIMEOUT 30 s) before it exits
CALL_GRACE = 15.0
SLOW_202 = 1.0  # an alert accepted later than this after its first try counts as delayed
SLOW_CALL = 2.0  # ... and one whose first call left later than this after its 202
CUT_SHORT = frozenset({"call_interrupted", "deadline_exceeded"})
# 64 T1: an INVITE given up at a trunk's trying timeout (its carrier is dead) is still
# retransmitted this long, and a carrier back within it answers it as a new call
ABANDONED_INVITE_LIFETIME = 32.0


class Scenario(enum.StrEnum):
    DB_PRIMARY_CRASH = "db-primary-crash"
    DB_SWITCHOVER = "db-switchover"
    REDIS_MASTER_CRASH = "redis-master-crash"
    NODE_CRASH = "node-crash"
    CARRIER_OUTAGE = "carrier-outage"
    ROLLING_RESTART = "rolling-restart"


@dataclass(frozen=True)
class Target:
    rto: float  # seconds: ingest and dispatch work again within this after the fault
    failed_requests: int | None = None  # None: client retries are expected
    cut_short: int | None = None  # calls cut short; None: a crash may cut its calls


TARGETS: Mapping[Scenario, Target] = {
    Scenario.DB_PRIMARY_CRASH: Target(rto=30.0),
    Scenario.DB_SWITCHOVER: Target(rto=30.0),
    Scenario.REDIS_MASTER_CRASH: Target(rto=10.0),
    Scenario.NODE_CRASH: Target(rto=5.0),
    Scenario.CARRIER_OUTAGE: Target(rto=10.0),
    Scenario.ROLLING_RESTART: Target(rto=5.0, failed_requests=0, cut_short=0),
}


@dataclass(frozen=True)
class DrillParams:
    scenario: Scenario
    duration: float = 60.0  # seconds of load
    rate: float = 5.0  # alerts per second
    at: float = 20.0  # seconds into the load the fault is injected
    down: float = 15.0  # how long a crashed node or carrier stays away
    seed: int = 42
    pg: PgMode = PgMode.CLUSTER
    redis: RedisMode = RedisMode.SENTINEL
    report_dir: Path = Path("var/drills")
    workdir: Path | None = None
    attach: Path | None = None  # the working directory of a running topology (bench.ha up)
    progress: bool = True


@dataclass
class Figures:
    """What a drill measured, as the report states it."""

    scenario: str
    passed: bool
    rpo_alerts: int  # accepted alerts missing after recovery
    accepted: int
    ingest_rto: float  # longest stretch after the fault without a 202
    dispatch_rto: float  # ... without a call handed to a carrier
    target_rto: float
    failed_requests: int  # tries not answered 202 (the client retried them)
    failed_answers: dict[str, int]
    slow_202: int
    max_202_delay: float
    slow_first_call: int
    max_first_call_delay: float
    duplicate_notifications: int
    duplicate_notifications_over_bound: int
    calls_cut_short: int
    fault: dict[str, Any]
    checks: list[dict[str, Any]]
    failures: list[str] = field(default_factory=list)


def longest_gap(times: Sequence[float], start: float, end: float) -> float:
    """The longest stretch in [start, end] with none of `times` (start counts as one)."""
    inside = sorted(t for t in times if start <= t <= end)
    points = [start, *inside, end]
    return max(b - a for a, b in itertools.pairwise(points))


def _failed_answers(requests: Sequence[Request]) -> dict[str, int]:
    """Answers other than 202, by status (or `conn:<error>` when none came)."""
    failed: dict[str, int] = {}
    for r in requests:
        for a in r.answers:
            if a.status != 202:
                key = str(a.status) if a.status is not None else f"conn:{a.error}"
                failed[key] = failed.get(key, 0) + 1
    return failed


def _calls_cut_short(audit: Sequence[Mapping[str, Any]]) -> int:
    """Attempts sent more than once, plus calls whose result says they were cut short."""
    send_count: dict[tuple[str, int], int] = {}
    for rec in audit:
        if rec.get("event") == "send" and rec.get("notification_uuid"):
            attempt = (str(rec["notification_uuid"]), int(rec["attempt"]))
            send_count[attempt] = send_count.get(attempt, 0) + 1
    return sum(1 for n in send_count.values() if n > 1) + sum(
        1 for rec in audit if rec.get("event") == "result" and rec.get("reason") in CUT_SHORT
    )


def measure(
    scenario: Scenario,
    requests: Sequence[Request],
    audit: Sequence[Mapping[str, Any]],
    fault: FaultEvent,
    load_end: float,
    report: Report,
) -> Figures:
    target = TARGETS[scenario]
    accepted_at = [a.answered_at for r in requests for a in r.answers if a.status == 202]
    sends = [audit_time(r) for r in audit if r.get("event") == "send"]
    ingest_rto = longest_gap(accepted_at, fault.start, load_end)
    dispatch_rto = longest_gap(sends, fault.start, load_end)
    failed = _failed_answers(requests)
    first_send: dict[str, float] = {}
    for rec in audit:
        if rec.get("event") == "send" and rec.get("alert_id"):
            at = audit_time(rec)
            first_send[str(rec["alert_id"])] = min(at, first_send.get(str(rec["alert_id"]), at))
    delays_202, delays_call = [], []
    for r in requests:
        ok = [a for a in r.answers if a.status == 202]
        if r.alert_id is None or not ok:
            continue
        delays_202.append(ok[0].answered_at - r.sent_at)
        if r.alert_id in first_send:
            delays_call.append(first_send[r.alert_id] - ok[0].answered_at)
    cut_short = _calls_cut_short(audit)
    rto = max(ingest_rto, dispatch_rto)
    failures = [f"chaos check failed: {c.name} ({c.detail})" for c in report.checks if not c.ok]
    if report.total.gave_up:
        failures.append(f"{report.total.gave_up} alerts never accepted (the client gave up)")
    if report.total.lost:
        failures.append(f"RPO: {report.total.lost} accepted alerts lost")
    if rto > target.rto:
        failures.append(f"RTO {rto:.1f} s over the target of {target.rto:g} s")
    n_failed = sum(failed.values())
    if target.failed_requests is not None and n_failed > target.failed_requests:
        failures.append(f"{n_failed} failed requests (target {target.failed_requests})")
    if target.cut_short is not None and cut_short > target.cut_short:
        failures.append(f"{cut_short} calls cut short (target {target.cut_short})")
    return Figures(
        scenario=scenario.value,
        passed=not failures,
        rpo_alerts=report.total.lost,
        accepted=report.total.accepted,
        ingest_rto=round(ingest_rto, 2),
        dispatch_rto=round(dispatch_rto, 2),
        target_rto=target.rto,
        failed_requests=n_failed,
        failed_answers=failed,
        slow_202=sum(1 for d in delays_202 if d > SLOW_202),
        max_202_delay=round(max(delays_202, default=0.0), 2),
        slow_first_call=sum(1 for d in delays_call if d > SLOW_CALL),
        max_first_call_delay=round(max(delays_call, default=0.0), 2),
        duplicate_notifications=report.total.duplicate_sends_within
        + report.total.duplicate_sends_over,
        duplicate_notifications_over_bound=report.total.duplicate_sends_over,
        calls_cut_short=cut_short,
        fault={"kind": fault.kind.value, "took": round(fault.end - fault.start, 2)},
        checks=[asdict(c) for c in report.checks],
        failures=failures,
    )


def markdown(figures: Figures, params: DrillParams, detail: str, checks: str) -> str:
    f = figures
    where = "" if params.attach is None else f" of the running topology in {params.attach}"
    lines = [
        f"# Drill `{f.scenario}`: {'PASS' if f.passed else 'FAIL'}",
        "",
        f"{params.rate:g} alerts/s for {params.duration:g} s through the load balancer{where}; "
        f"fault at {params.at:g} s: {detail}.",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| RPO: accepted alerts lost | {f.rpo_alerts} of {f.accepted} | 0 |",
        f"| RTO ingest: longest time without a 202 after the fault | {f.ingest_rto:.2f} s "
        f"| ≤ {f.target_rto:g} s |",
        f"| RTO dispatch: longest time without a call placed | {f.dispatch_rto:.2f} s "
        f"| ≤ {f.target_rto:g} s |",
        f"| fault injected until the topology answered again | {f.fault['took']:.2f} s | |",
        f"| failed requests (retried by the client) | {f.failed_requests} "
        f"{_answers(f.failed_answers)} | "
        f"{'0' if TARGETS[Scenario(f.scenario)].failed_requests == 0 else '-'} |",
        f"| alerts accepted > {SLOW_202:g} s after the first try | {f.slow_202} "
        f"(max {f.max_202_delay:.2f} s) | |",
        f"| first call > {SLOW_CALL:g} s after the 202 | {f.slow_first_call} "
        f"(max {f.max_first_call_delay:.2f} s) | |",
        f"| duplicate notifications (over the bound) | {f.duplicate_notifications} "
        f"({f.duplicate_notifications_over_bound}) | over: 0 |",
        f"| calls cut short (re-placed, interrupted or past their deadline) "
        f"| {f.calls_cut_short} | "
        f"{'0' if TARGETS[Scenario(f.scenario)].cut_short == 0 else '-'} |",
        "",
    ]
    if f.failures:
        lines += ["Failures:", "", *(f"- {x}" for x in f.failures), ""]
    lines += ["<details><summary>chaos checks</summary>", "", "```", checks, "```", "",
              "</details>", ""]  # fmt: skip
    return "\n".join(lines)


def _answers(counts: Mapping[str, int]) -> str:
    return "(" + ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) + ")" if counts else ""


async def inject(scenario: Scenario, top: Topology, params: DrillParams) -> tuple[FaultEvent, str]:
    """The fault, from its injection to the moment the topology answers again."""
    start = time.time()
    killed: int | None = None
    kind = FAULT_KIND[scenario]
    match scenario:
        case Scenario.NODE_CRASH:
            victim = top.nodes[0]
            killed = top.crash_node(victim)
            top.say(f"killed -9 {victim.name} (pid {killed})")
            end = time.time()
            await asyncio.sleep(params.down)
            await top.replace_node(victim)
            top.say(f"{victim.name} back (sip :{victim.sip_port})")
            detail = (
                f"kill -9 of {victim.name} (API, worker and gateway), back after {params.down:g} s"
            )
        case Scenario.ROLLING_RESTART:
            took = []
            for node in top.nodes:
                top.say(f"restarting {node.name}")
                took.append(await top.restart_node(node))
            end = time.time()
            detail = "every node restarted in turn (SIGTERM: unready, drain, exit; then start)"
            detail += " — stop took " + ", ".join(
                "killed" if t is None else f"{t:.1f} s" for t in took
            )
        case Scenario.CARRIER_OUTAGE:
            carrier = top.carriers[0]
            carrier.kill()
            top.say("killed -9 carrier trunk-a")
            end = time.time()
            await asyncio.sleep(params.down)
            carrier.start()
            await carrier.wait_ready()
            top.say("trunk-a back")
            detail = f"kill -9 of the first-priority carrier (trunk-a) for {params.down:g} s"
        case Scenario.DB_PRIMARY_CRASH:
            old = await asyncio.to_thread(top.pg.crash_primary)
            top.say(f"killed -9 the PostgreSQL primary ({old})")
            new = await asyncio.to_thread(top.pg.wait_primary, 120.0, old)
            end = time.time()
            top.say(f"{new} promoted")
            detail = f"kill -9 of the PostgreSQL primary {old} and its keeper; {new} promoted"
            await asyncio.to_thread(top.pg.restart_node, old)
            top.say(f"{old} back as a standby")
        case Scenario.DB_SWITCHOVER:
            old, new = await asyncio.to_thread(top.pg.switchover, 120.0)
            end = time.time()
            top.say(f"switched over {old} -> {new}")
            detail = f"planned switchover: {old} -> {new}"
        case Scenario.REDIS_MASTER_CRASH:
            old_master = await asyncio.to_thread(top.redis.crash_master)
            top.say(f"killed -9 the Redis master {old_master}")
            new_master = await asyncio.to_thread(top.redis.wait_failover, old_master, 60.0)
            end = time.time()
            top.say(f"Sentinel promoted {new_master}")
            detail = f"kill -9 of the Redis master {old_master}; Sentinel promoted {new_master}"
            await asyncio.to_thread(top.redis.restart, top.redis.node_at(old_master))
            top.say("the old master back as a replica")
        case _:
            assert_never(scenario)
    return FaultEvent(kind, start, end, killed), detail


FAULT_KIND: Mapping[Scenario, FaultKind] = {
    Scenario.DB_PRIMARY_CRASH: FaultKind.DB_FAILOVER,
    Scenario.DB_SWITCHOVER: FaultKind.DB_SWITCHOVER,
    Scenario.REDIS_MASTER_CRASH: FaultKind.REDIS_FAILOVER,
    Scenario.NODE_CRASH: FaultKind.NODE,
    Scenario.CARRIER_OUTAGE: FaultKind.TRUNK,
    Scenario.ROLLING_RESTART: FaultKind.ROLLING,
}


def node_calls(top: Topology) -> WorkerCalls:
    """Which node life placed each call (by SIP port) and the calls the nodes reported
    ended (one JSON line each in their logs)."""
    ended: set[str] = set()
    for node in top.nodes:
        text = node.log.read_text(errors="replace") if node.log.exists() else ""
        for line in text.splitlines():
            if line.startswith("{") and '"call_id"' in line:
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    ended.add(str(json.loads(line)["call_id"]))
    return WorkerCalls(dict(top.lives), frozenset(ended))


async def settle(
    top: Topology, killed: set[int], since: float, deadline: float
) -> tuple[list[Invite], WorkerCalls]:
    """Until every call since `since` (the load's start: an attached topology's carriers
    logged earlier drills' calls too) has ended, or the deadline."""
    while True:
        invites = [i for c in top.carriers for i in c.invites() if i.at >= since]
        calls = node_calls(top)
        if not open_calls(invites, calls, killed) or time.time() >= deadline:
            return invites, calls
        await asyncio.sleep(0.5)


@dataclass
class Outcome:
    figures: Figures
    markdown: str
    report_files: tuple[Path, Path]


class AttachError(ServiceError):
    """No running topology to attach to, or not one this drill can run on."""


def unsupported(scenario: Scenario, pg: PgMode, redis: RedisMode) -> str | None:
    """Why a topology of these modes cannot take this fault (None: it can)."""
    if scenario in (Scenario.DB_PRIMARY_CRASH, Scenario.DB_SWITCHOVER) and pg is PgMode.SINGLE:
        return f"{scenario} needs the PostgreSQL cluster (pg {PgMode.CLUSTER})"
    if scenario is Scenario.REDIS_MASTER_CRASH and redis is RedisMode.SINGLE:
        return f"{scenario} needs Redis with Sentinel (redis {RedisMode.SENTINEL})"
    return None


async def _run(params: DrillParams, services: Services, workdir: Path) -> Outcome:
    say = Progress(params.progress)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    if params.attach is None:
        top = Topology(HaParams(pg=params.pg, redis=params.redis, progress=params.progress),
                       services, workdir, say)  # fmt: skip
        await top.start()
        return await _drill(params, top)
    try:
        top = Topology.attach(params.attach, services, say)
    except (OSError, ValueError, KeyError, ServiceError) as exc:
        raise AttachError(f"cannot attach to {params.attach}: {exc}") from exc
    why = unsupported(params.scenario, top.params.pg, top.params.redis)
    if why is not None:
        raise AttachError(f"the topology in {params.attach} cannot run this drill: {why}")
    say(f"attached to the topology in {params.attach}: API {top.base_url}")
    try:
        return await _drill(params, top)
    finally:
        await _leave_whole(top)


async def _leave_whole(top: Topology) -> None:
    """An attached topology is left running and whole (a process a failed drill left
    dead is started again), its state file naming the processes that run now."""
    try:
        parts: list[SippCarrier | Node] = [*top.carriers, *top.nodes]
        for proc in parts:
            if not proc.alive():
                top.say(f"{proc.name} is down: starting it again")
                proc.start()
                await proc.wait_ready()
        if isinstance(top.redis, RedisSentinelSet):
            for name in [n for n, proc in top.redis.nodes.items() if not proc.alive()]:
                top.say(f"{name} is down: starting it again")
                top.redis.restart(name)
        if isinstance(top.pg, PgAutoFailover):
            procs = top.pg.procs
            for name in [n for n in PG_NODES if n not in procs or not procs[n].alive()]:
                top.say(f"PostgreSQL {name} is down: starting it again")
                top.pg.restart_node(name)
            await asyncio.to_thread(top.pg.wait_healthy, 60.0)
    finally:
        top.save()
        top.say(f"topology left running; {top.workdir / STATE_FILE} updated")


async def _drill(params: DrillParams, top: Topology) -> Outcome:
    """Load, fault, measurement and report on a running topology."""
    say, ha = top.say, top.params
    load = Params(duration=params.duration, rate=params.rate, seed=params.seed, faults=())
    requests = plan_requests(load)
    drain_bound = ha.max_duration + ha.lease + 20
    load_start = time.time()
    say(f"load: {len(requests)} alerts at {params.rate:g}/s for {params.duration:g} s; "
        f"{params.scenario} at {params.at:g} s")  # fmt: skip

    async def fault_later() -> tuple[FaultEvent, str]:
        await asyncio.sleep(max(0.0, load_start + params.at - time.time()))
        return await inject(params.scenario, top, params)

    fault_task = asyncio.create_task(fault_later())
    try:
        await drive(load, top.base_url, requests, load_start)
        load_end = time.time()
        say("load done")
        fault, detail = await fault_task
    finally:
        fault_task.cancel()
    await drain(top.database_url, time.time() + drain_bound, say)
    stored = await stored_alerts(top.database_url)
    killed = {fault.killed_pid} if fault.killed_pid is not None else set()
    invites, calls = await settle(top, killed, load_start, time.time() + CALL_GRACE)
    if params.attach is None:  # what an attached topology's owner started goes on running
        for node in top.nodes:
            if node.alive():
                await asyncio.to_thread(node.stop, STOP_GRACE)
    audit = sorted((r for n in top.nodes for r in read_audit(n.audit_file)
                    if audit_time(r) >= load_start), key=audit_time)  # fmt: skip
    cut: set[str] = set()
    if params.scenario is Scenario.CARRIER_OUTAGE:  # their sends went on to the next trunk
        until = fault.end + params.down + ABANDONED_INVITE_LIFETIME
        cut = {i.call_id for i in top.carriers[0].invites() if i.at <= until}
    report = build_report(
        requests, [fault], load_start, load_end, stored, audit, invites, calls, cut
    )
    figures = measure(params.scenario, requests, audit, fault, load_end, report)
    checks = render_checks(report)
    findings = log_findings([n.log for n in top.nodes])
    text = markdown(figures, params, detail, checks + "".join(f"\n{x}" for x in findings))
    params.report_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = params.report_dir / f"{params.scenario}-{stamp}.md"
    js = md.with_suffix(".json")
    md.write_text(text)
    settings = {"duration": params.duration, "rate": params.rate, "at": params.at,
                "down": params.down, "seed": params.seed, "pg": ha.pg.value,
                "redis": ha.redis.value,
                "attach": None if params.attach is None else str(params.attach)}  # fmt: skip
    summary = {**asdict(figures), "params": settings, "chaos_report": report.to_json()}
    js.write_text(json.dumps(summary, indent=2) + "\n")
    return Outcome(figures, text, (md, js))


def run(params: DrillParams) -> Outcome:
    """One drill; every process it started is stopped before it returns or raises. The
    working directory (logs, audit trails) is kept when the drill fails. An attached
    topology is left running (AttachError: there is none to attach to)."""
    if params.attach is not None:
        # never closed: the processes are the topology's, started again ones included
        services = Services()
        return asyncio.run(asyncio.wait_for(_run(params, services, params.attach),
                                            DRILL_BOUND))  # fmt: skip
    workdir = params.workdir or Path(tempfile.mkdtemp(prefix=f"ackline-drill-{params.scenario}-"))
    workdir.mkdir(parents=True, exist_ok=True)
    passed = False
    try:
        with Services() as services:
            outcome = asyncio.run(asyncio.wait_for(_run(params, services, workdir), DRILL_BOUND))
        passed = outcome.figures.passed
        return outcome
    finally:
        if params.workdir is None and passed:
            shutil.rmtree(workdir, ignore_errors=True)
        elif params.progress:
            print(f"logs and audit trails kept in {workdir}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ackline drill", description=__doc__.split("\n")[0])
    parser.add_argument("scenario", type=Scenario, choices=list(Scenario))
    defaults = DrillParams(Scenario.NODE_CRASH)
    parser.add_argument(
        "--duration",
        type=float,
        default=defaults.duration,
        help="seconds of alert load (default %(default)g)",
    )
    parser.add_argument(
        "--rate", type=float, default=defaults.rate, help="alerts per second (default %(default)g)"
    )
    parser.add_argument(
        "--at",
        type=float,
        default=defaults.at,
        help="seconds into the load the fault strikes (default %(default)g)",
    )
    parser.add_argument(
        "--down",
        type=float,
        default=defaults.down,
        help="seconds a crashed node or carrier stays away (default %(default)g)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="the load's policies")
    parser.add_argument(
        "--pg",
        type=PgMode,
        choices=list(PgMode),
        help="cluster (default): pg_auto_failover primary + standby; single: one server",
    )
    parser.add_argument(
        "--redis",
        type=RedisMode,
        choices=list(RedisMode),
        help="sentinel (default): master + replica + 3 Sentinels; single: one server",
    )
    parser.add_argument(
        "--report-dir",
        type=Path,
        default=defaults.report_dir,
        help="where the Markdown and JSON reports go (default %(default)s)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="keep the topology's logs and data here (default: a temporary dir)",
    )
    parser.add_argument(
        "--attach",
        type=Path,
        metavar="DIR",
        help="drill the topology `python -m bench.ha up --workdir DIR` (make ha) left running "
        "there instead of starting one; it is left running",
    )
    args = parser.parse_args(argv)
    if args.attach is not None and (args.workdir or args.pg or args.redis):
        parser.error("--attach drills the topology in DIR as it is: no --workdir, --pg, --redis")
    params = DrillParams(
        args.scenario, duration=args.duration, rate=args.rate, at=args.at, down=args.down,
        seed=args.seed, pg=args.pg or defaults.pg, redis=args.redis or defaults.redis,
        report_dir=args.report_dir, workdir=args.workdir, attach=args.attach,
    )  # fmt: skip
    if params.at >= params.duration:
        parser.error("--at must fall within --duration")
    why = unsupported(params.scenario, params.pg, params.redis)
    if params.attach is None and why is not None:
        parser.error(why)
    try:
        outcome = run(params)
    except AttachError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(outcome.markdown)
    print(f"report: {outcome.report_files[0]} and {outcome.report_files[1]}")
    return 0 if outcome.figures.passed else 1


if __name__ == "__main__":
    sys.exit(main())
