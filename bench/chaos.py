"""Chaos bench: a steady alert load on API + 2 workers while their dependencies die.

Starts, as processes it owns (own ports, own data directories in a temporary directory):
PostgreSQL, Redis, a SIPp carrier whose callee +14155550100 presses 1 and whose callee
+14155550150 never does, one `ackline serve --role api` and two `--role worker`. It POSTs
alerts at a steady rate (each with its own Idempotency-Key; a try that fails in transport
or with a 5xx is tried again with the same key, honouring Retry-After, as a client
would), a seeded choice of three policies per alert:

* answer: the callee presses 1;
* late:   a silent callee first, then (next step) the one who presses 1;
* ignore: only the silent callee: retried, then exhausted.

Meanwhile it injects, in order: kill -9 of a worker (a replacement starts after a few
seconds), kill -9 of Redis and a restart, `pg_ctl stop -m immediate` and a restart, kill -9
of the carrier for 10 s and a restart on the same port. After the load it waits, bounded,
for every alert to end, then prints per fault window the API's answers, alerts accepted,
finished, lost, stuck, duplicate notifications and audit lines, time to recover, and a
verdict (bench/chaos_report.py has the rules). Exit status 0 on PASS, 1 on FAIL.

    python -m bench.chaos [--duration 100] [--rate 5] [--seed 42]
                          [--faults worker@10:3,redis@30:5,postgres@50:5,carrier@70:10]
                          [--lease 30] [--max-duration 40] [--pg-setting KEY=VALUE]
                          [--workdir DIR] [--keep] [--json [FILE]]

A fault is `kind@start[:down]`, seconds into the load: `down` is how long the dependency
stays away (worker: until the replacement starts).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import yaml

from bench.chaos_report import (
    Answer,
    FaultEvent,
    FaultKind,
    Report,
    Request,
    StoredAlert,
    WorkerCalls,
    build_report,
    open_calls,
    render,
)
from bench.ports import free_port
from bench.services import (
    Invite,
    Owned,
    Postgres,
    Redis,
    Services,
    SippCarrier,
    ackline_command,
    service_env,
    wait_http_ready,
    wait_subscribed,
)

COMPANY = "chaos"
API_KEY = "chaos-key"
PREFIX = "chaos"
PRESSER = "+14155550100"  # the carrier's callee who presses 1 (fictional 555-01xx)
SILENT = "+14155550150"  # the carrier's callee who never presses a key
DTMF_1 = Path("/usr/share/sip-tester/dtmf_2833_1.pcap")
POLICY_WEIGHTS = {"answer": 5, "late": 3, "ignore": 2}
DEFAULT_DOWN = {FaultKind.WORKER: 3.0, FaultKind.REDIS: 5.0, FaultKind.POSTGRES: 5.0,
                FaultKind.CARRIER: 10.0}  # fmt: skip
DEFAULT_FAULTS = "worker@10:3,redis@30:5,postgres@50:5,carrier@70:10"
STARTUP_BOUND = 180.0  # seconds for every service to come up on a loaded machine
STOP_GRACE = 15.0  # seconds an ackline process gets to exit after SIGTERM
CALL_GRACE = 10.0  # seconds for calls to end once every alert has (a goodbye, a BYE)


@dataclass(frozen=True)
class FaultSpec:
    kind: FaultKind
    at: float  # seconds into the load
    down: float  # seconds away


def parse_faults(text: str) -> tuple[FaultSpec, ...]:
    """`worker@10:3,redis@30` -> specs in order of time; an empty text: no faults."""
    specs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([a-z]+)@([\d.]+)(?::([\d.]+))?", item)
        if match is None or match[1] not in DEFAULT_DOWN:
            kinds = ", ".join(k.value for k in DEFAULT_DOWN)
            raise ValueError(f"fault {item!r} must look like kind@start[:down] ({kinds})")
        kind = FaultKind(match[1])
        down = float(match[3]) if match[3] else DEFAULT_DOWN[kind]
        specs.append(FaultSpec(kind, float(match[2]), down))
    return tuple(sorted(specs, key=lambda s: s.at))


@dataclass(frozen=True)
class Params:
    duration: float = 100.0  # seconds of load
    rate: float = 5.0  # alerts per second
    faults: tuple[FaultSpec, ...] = parse_faults(DEFAULT_FAULTS)
    seed: int = 42  # which policy (pressing 1 or not) each alert gets
    workers: int = 2
    lease: float = 30.0  # ACKLINE_LEASE_SECONDS (the product's default)
    max_duration: float = 40.0  # every policy's max_duration: when an alert must have ended
    settle: float = 10.0  # slack on top of max_duration + lease before "stuck"
    request_timeout: float = 10.0
    tries: int = 10  # per alert, same Idempotency-Key
    pg_settings: tuple[tuple[str, str], ...] = ()  # e.g. synchronous_commit=off
    workdir: Path | None = None  # default: a temporary directory (kept when the run fails)
    keep: bool = False
    progress: bool = True  # say what happens on stderr
    trace_sip: bool = False  # the carrier logs every SIP message (large)


@dataclass
class Outcome:
    report: Report
    params: Params
    faults: list[FaultEvent]
    load_start: float
    load_end: float
    log_findings: list[str]
    workdir: Path
    requests: list[Request]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.report.to_json(),
            "params": {
                "duration": self.params.duration, "rate": self.params.rate,
                "seed": self.params.seed, "workers": self.params.workers,
                "lease": self.params.lease, "max_duration": self.params.max_duration,
                "pg_settings": dict(self.params.pg_settings),
            },
            "faults": [{"kind": f.kind.value, "start": round(f.start - self.load_start, 3),
                        "end": round(f.end - self.load_start, 3), "killed_pid": f.killed_pid}
                       for f in self.faults],
            "log_findings": self.log_findings,
            "workdir": str(self.workdir),
        }  # fmt: skip


def policies(max_duration: float) -> list[dict[str, Any]]:
    """Short calls (one prompt, 3 s for a key), quick retries, no fallback channel, and
    a max_duration that ends every alert within a bounded time."""
    voice = {"prompts": 1, "digit_timeout": "3s"}
    retry = {"voice": {"attempts": 2, "backoff": "linear", "base": "2s", "factor": 0,
                       "max": "2s", "fallback_channel": None}}  # fmt: skip
    common = {"max_duration": f"{max_duration:g}s", "retry": retry, "voice": voice}
    return [
        {"name": "answer", "repeat": 2, **common,
         "steps": [{"recipients": ["presser"], "channels": ["voice"], "delay": "8s"}]},
        {"name": "late", **common,
         "steps": [{"recipients": ["silent"], "channels": ["voice"], "delay": "4s"},
                   {"recipients": ["presser"], "channels": ["voice"], "delay": "8s"}]},
        {"name": "ignore", **common,
         "steps": [{"recipients": ["silent"], "channels": ["voice"], "delay": "5s"}]},
    ]  # fmt: skip


def ackline_config(carrier_port: int, max_duration: float) -> dict[str, Any]:
    return {
        "company": COMPANY,
        "recipients": [
            {"id": "presser", "name": "Presses 1", "phone": PRESSER},
            {"id": "silent", "name": "Never presses a key", "phone": SILENT},
        ],
        "policies": policies(max_duration),
        "carriers": {
            "allowed_countries": ["US"],
            "probe": {"interval": "1s", "down_after": 2, "up_after": 1},
            "breaker": {"failures": 3, "cooldown": "3s"},
            # hundreds of calls to two numbers: the toll-fraud budgets would refuse them
            "call_budget": {"per_hour": None, "per_number_per_hour": None},
            "trunks": [{"name": "chaos-carrier", "host": "127.0.0.1", "port": carrier_port,
                        "transport": "udp", "trying_timeout": "2s"}],
        },
    }  # fmt: skip


class Progress:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.origin = time.time()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"[{time.time() - self.origin:7.1f}s] {message}", file=sys.stderr, flush=True)


class Stack:
    """The services of one run and how to start more of them (a replacement worker)."""

    def __init__(self, params: Params, services: Services, workdir: Path, say: Progress) -> None:
        self.params = params
        self.services = services
        self.workdir = workdir
        self.say = say
        self.pg = Postgres(free_port(), workdir / "postgres.log", dict(params.pg_settings))
        services.add(self.pg)
        self.redis = Redis(free_port(), workdir)
        services.add(self.redis)
        self.carrier = SippCarrier(free_port(), workdir / "carrier", PRESSER, DTMF_1,
                                   trace_messages=params.trace_sip)  # fmt: skip
        services.add(self.carrier)
        self.http_port = free_port()
        self.api: Owned | None = None
        self.workers: list[Owned] = []
        self.env: dict[str, str] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    async def start(self) -> None:
        await asyncio.to_thread(self.pg.init)
        await asyncio.to_thread(self.pg.start)
        admin = await asyncpg.connect(self.pg.url("postgres"))
        try:
            await admin.execute("CREATE DATABASE ackline")
        finally:
            await admin.close()
        self.redis.start()
        self.carrier.start()
        await self.redis.wait_ready()
        await self.carrier.wait_ready()
        self.say(f"postgres :{self.pg.port}, redis :{self.redis.port}, "
                 f"carrier :{self.carrier.port} up")  # fmt: skip
        config = self.workdir / "ackline.yaml"
        config.write_text(yaml.safe_dump(ackline_config(self.carrier.port,
                                                        self.params.max_duration)))  # fmt: skip
        self.env = service_env({
            "ACKLINE_DATABASE_URL": self.pg.url("ackline"),
            "REDIS_URL": self.redis.url,
            "ACKLINE_REDIS_PREFIX": PREFIX,
            "ACKLINE_CONFIG": str(config),
            "ACKLINE_API_KEYS": f"{API_KEY}:{COMPANY}",
            "ACKLINE_AUDIT_DIR": str(self.workdir / "audit"),
            "ACKLINE_POLL_INTERVAL": "0.5",
            "ACKLINE_LEASE_SECONDS": f"{self.params.lease:g}",
            "ACKLINE_VOICE_RING_TIMEOUT": "10",
            "ACKLINE_PROMPT_CACHE": str(self.workdir / "prompts"),
        })  # fmt: skip
        self.api = self._ackline("api", ["--http-port", str(self.http_port)])
        async with httpx.AsyncClient(base_url=self.base_url, timeout=5) as probe:
            await wait_http_ready(probe, self.api.popen)
        self.say(f"api :{self.http_port} ready")
        for _ in range(self.params.workers):
            self.workers.append(self._ackline(f"worker-{len(self.workers) + 1}", []))
        await self.workers_ready(self.workers)
        self.say(f"{len(self.workers)} workers ready")

    def _ackline(self, name: str, args: list[str]) -> Owned:
        role = "api" if name == "api" else "worker"
        proc = Owned(name, [*ackline_command(), "serve", "--role", role, *args],
                     self.workdir / f"{name}.log", env=self.env, cwd=self.workdir)  # fmt: skip
        self.services.add(proc)
        proc.start()
        return proc

    async def workers_ready(self, starting: Sequence[Owned]) -> None:
        alive = [w for w in self.workers if w.alive()]
        await wait_subscribed(self.redis.url, PREFIX, len(alive), [w.popen for w in starting])

    async def inject(self, spec: FaultSpec) -> FaultEvent:
        """One fault, from the kill to the moment the dependency answers again."""
        start = time.time()
        killed: int | None = None
        if spec.kind is FaultKind.WORKER:
            victim = next(w for w in self.workers if w.alive())
            killed = victim.pid
            victim.kill()
            self.say(f"killed -9 {victim.name} (pid {killed})")
            await asyncio.sleep(spec.down)
            replacement = self._ackline(f"worker-{len(self.workers) + 1}", [])
            self.workers.append(replacement)
            await self.workers_ready([replacement])
            self.say(f"{replacement.name} replaces it")
        elif spec.kind is FaultKind.REDIS:
            self.redis.kill()
            self.say("killed -9 redis")
            await asyncio.sleep(spec.down)
            self.redis.start()
            await self.redis.wait_ready()
            self.say("redis back (empty)")
        elif spec.kind is FaultKind.POSTGRES:
            await asyncio.to_thread(self.pg.crash)
            self.say("postgres stopped -m immediate")
            await asyncio.sleep(spec.down)
            await asyncio.to_thread(self.pg.start)
            self.say("postgres back")
        else:
            self.carrier.kill()
            self.say("killed -9 the carrier")
            await asyncio.sleep(spec.down)
            self.carrier.start()
            await self.carrier.wait_ready()
            self.say("carrier back")
        return FaultEvent(spec.kind, start, time.time(), killed)

    def ackline_processes(self) -> list[Owned]:
        return [p for p in (self.api, *self.workers) if p is not None]


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["retry-after"])
    except (KeyError, ValueError):
        return None


async def post_alert(client: httpx.AsyncClient, req: Request, params: Params) -> None:
    """Raise one alert as a careful client: the same Idempotency-Key on every try, again
    after a transport error or a 5xx (after Retry-After, at most 2 s), never after a 4xx."""
    body = {"title": "Chaos test alert", "summary": "chaos", "policy": req.policy,
            "details": {"chaos_key": req.key}}  # fmt: skip
    headers = {"X-API-Key": API_KEY, "Idempotency-Key": req.key}
    for attempt in range(params.tries):
        sent = time.time()
        wait = min(2.0, 0.25 * 2**attempt)
        try:
            response = await client.post("/v1/alerts", json=body, headers=headers)
        except httpx.TransportError as exc:
            req.answers.append(Answer(sent, time.time(), None, type(exc).__name__))
        else:
            req.answers.append(Answer(sent, time.time(), response.status_code))
            if response.status_code == 202:
                req.alert_id = str(response.json()["id"])
                return
            if response.status_code < 500:
                return
            wait = min(2.0, _retry_after(response) or wait)
        await asyncio.sleep(wait)


async def drive(params: Params, base_url: str, requests: list[Request], start: float) -> None:
    """Open loop: request i is sent at start + i / rate, whatever became of the others."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with httpx.AsyncClient(base_url=base_url, timeout=params.request_timeout,
                                 limits=limits) as client:  # fmt: skip
        tasks = []
        for req in requests:
            delay = start + req.index / params.rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(post_alert(client, req, params)))
        await asyncio.gather(*tasks)


async def run_faults(stack: Stack, start: float) -> list[FaultEvent]:
    events = []
    for spec in stack.params.faults:
        delay = start + spec.at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        events.append(await stack.inject(spec))
    return events


_OPEN = """SELECT count(*) FILTER (WHERE state = 'triggered'),
                  (SELECT count(*) FROM notification_attempts WHERE status = 'sending')
           FROM alerts"""
_ALERTS = """SELECT a.id, a.details::jsonb ->> 'chaos_key', a.state,
                    array(SELECT n.notification_id || '/' || n.attempt
                          FROM notification_attempts n
                          WHERE n.alert_id = a.id AND n.status = 'sending')
             FROM alerts a"""


async def drain(url: str, deadline: float, say: Progress) -> None:
    """Until no alert is `triggered` and no attempt `sending`, or the deadline."""
    last = None
    while time.time() < deadline:
        try:
            conn = await asyncpg.connect(url, timeout=5)
            try:
                row = await conn.fetchrow(_OPEN)
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError) as exc:
            say(f"drain: database not answering ({exc!r})")
        else:
            if row[0] == 0 and row[1] == 0:
                return
            if (row[0], row[1]) != last:
                say(f"drain: {row[0]} alerts triggered, {row[1]} attempts sending")
                last = (row[0], row[1])
        await asyncio.sleep(1.0)


async def stored_alerts(url: str) -> list[StoredAlert]:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await conn.fetch(_ALERTS)
    finally:
        await conn.close()
    return [
        StoredAlert(r[0], r[1], r[2], tuple((n, int(a)) for n, _, a in
                                            (x.rpartition("/") for x in r[3])))
        for r in rows
    ]  # fmt: skip


def read_audit(path: Path) -> list[dict[str, Any]]:
    """Every audit line; a torn line (a process killed mid-write) is skipped."""
    records = []
    if path.exists():
        for raw in path.read_text(errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(raw))
    return records


_STAMP = re.compile(r"^\S+ \S+ ")  # logging's "date time " prefix


def log_findings(logs: Sequence[Path]) -> list[str]:
    """Errors the services logged: count per file and the most frequent messages, as
    evidence next to the verdict (not part of it)."""
    out = []
    for path in logs:
        if not path.exists():
            continue
        lines = path.read_text(errors="replace").splitlines()
        errors = [_STAMP.sub("", x)[:160] for x in lines if " ERROR " in x or " CRITICAL " in x]
        tracebacks = sum(1 for x in lines if x.startswith("Traceback"))
        if not errors and not tracebacks:
            continue
        top = Counter(errors).most_common(3)
        out.append(f"{path.name}: {len(errors)} error lines, {tracebacks} tracebacks"
                   + "".join(f"\n    {n} x {msg}" for msg, n in top))  # fmt: skip
    return out


_SIP_PORT = re.compile(r"sip listening on [^\s]+:(\d+) ")


def worker_calls(workers: Sequence[Owned]) -> WorkerCalls:
    """Each worker's SIP port (its start-up line) and the calls it reported ended (one
    JSON line each on its stdout), read from the workers' logs."""
    ports: dict[int, int] = {}
    ended: set[str] = set()
    for worker in workers:
        text = worker.log.read_text(errors="replace") if worker.log.exists() else ""
        match = _SIP_PORT.search(text)
        if match is not None:
            ports[int(match[1])] = worker.pid
        for line in text.splitlines():
            if line.startswith("{") and '"call_id"' in line:
                with contextlib.suppress(json.JSONDecodeError, KeyError):
                    ended.add(str(json.loads(line)["call_id"]))
    return WorkerCalls(ports, frozenset(ended))


async def settle_calls(
    stack: Stack, killed: set[int], deadline: float
) -> tuple[list[Invite], WorkerCalls]:
    """Until every call of a running worker has ended (a goodbye may still be playing when
    the last alert closes), or the deadline."""
    while True:
        invites, calls = stack.carrier.invites(), worker_calls(stack.workers)
        if not open_calls(invites, calls, killed) or time.time() >= deadline:
            return invites, calls
        await asyncio.sleep(0.5)


def plan_requests(params: Params) -> list[Request]:
    """Which policy each alert gets is seeded: the same run presses the same keys."""
    rng = random.Random(params.seed)
    names, weights = list(POLICY_WEIGHTS), list(POLICY_WEIGHTS.values())
    run = f"{params.seed}-{int(time.time())}"
    total = max(1, int(params.rate * params.duration))
    return [Request(i, f"chaos-{run}-{i}", rng.choices(names, weights)[0]) for i in range(total)]


async def _run(params: Params, services: Services, workdir: Path) -> Outcome:
    say = Progress(params.progress)
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    stack = Stack(params, services, workdir, say)
    async with asyncio.timeout(STARTUP_BOUND):
        await stack.start()
    requests = plan_requests(params)
    drain_bound = params.max_duration + params.lease + params.settle
    # the load, the retries of its last requests, the faults, then the drain
    bound = params.duration + params.tries * (params.request_timeout + 2) + drain_bound + 120
    async with asyncio.timeout(bound):
        load_start = time.time()
        say(
            f"load: {len(requests)} alerts at {params.rate:g}/s for {params.duration:g} s; "
            f"faults: {', '.join(f'{f.kind}@{f.at:g}:{f.down:g}' for f in params.faults) or '-'}"
        )
        faults_task = asyncio.create_task(run_faults(stack, load_start))
        try:
            await drive(params, stack.base_url, requests, load_start)
            load_end = time.time()
            say("load done")
            faults = await faults_task
        finally:
            faults_task.cancel()
        await drain(stack.pg.url("ackline"), time.time() + drain_bound, say)
        stored = await stored_alerts(stack.pg.url("ackline"))
        killed = {f.killed_pid for f in faults if f.killed_pid is not None}
        invites, calls = await settle_calls(stack, killed, time.time() + CALL_GRACE)
    say("stopping ackline processes")
    findings = []
    for proc in reversed(stack.ackline_processes()):
        if proc.alive() and await asyncio.to_thread(proc.stop, STOP_GRACE) is None:
            findings.append(f"{proc.name} did not exit within {STOP_GRACE:g} s of SIGTERM")
    audit = read_audit(workdir / "audit" / f"{COMPANY}.jsonl")
    report = build_report(requests, faults, load_start, load_end, stored, audit, invites,
                          calls)  # fmt: skip
    logs = [workdir / "api.log", *(workdir / f"{w.name}.log" for w in stack.workers)]
    return Outcome(report, params, faults, load_start, load_end, findings + log_findings(logs),
                   workdir, requests)  # fmt: skip


def run(params: Params) -> Outcome:
    """One chaos run; every process it started is stopped before it returns or raises.
    The working directory (logs, audit trail, SIPp traces) is removed after a passing run
    unless it was given or `keep` is set."""
    workdir = params.workdir or Path(tempfile.mkdtemp(prefix="ackline-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    passed = False
    try:
        with Services() as services:
            outcome = asyncio.run(_run(params, services, workdir))
        passed = outcome.report.passed
        return outcome
    finally:
        if params.workdir is None and passed and not params.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        elif params.progress:
            print(f"logs, audit trail and SIPp traces kept in {workdir}", file=sys.stderr)


def describe(outcome: Outcome) -> str:
    p = outcome.params
    t0 = outcome.load_start
    faults = "; ".join(
        f"{f.kind.label} at {f.start - t0:.1f} s, back at {f.end - t0:.1f} s"
        for f in outcome.faults
    )
    head = [f"chaos: {len(outcome.requests)} alerts at {p.rate:g}/s for {p.duration:g} s, "
            f"{p.workers} workers, PostgreSQL + Redis + SIPp carrier, seed {p.seed}, "
            f"lease {p.lease:g} s, max_duration {p.max_duration:g} s"
            + (f", {dict(p.pg_settings)}" if p.pg_settings else ""),
            f"faults: {faults or 'none'}", ""]  # fmt: skip
    tail = ["", "findings in the services' logs (evidence, not part of the verdict):",
            *(outcome.log_findings or ["(no errors logged)"])]  # fmt: skip
    return "\n".join([*head, render(outcome.report), *tail])


def _parse_setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not re.fullmatch(r"[a-z_.]+", key):
        raise argparse.ArgumentTypeError(f"{text!r} must look like name=value")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = Params()
    parser.add_argument("--duration", type=float, default=defaults.duration,
                        help="seconds of load")  # fmt: skip
    parser.add_argument("--rate", type=float, default=defaults.rate, help="alerts per second")
    parser.add_argument("--faults", default=DEFAULT_FAULTS,
                        help="kind@start[:down],... (worker, redis, postgres, carrier); "
                        "'' for none")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--lease", type=float, default=defaults.lease,
                        help="worker lease seconds (ACKLINE_LEASE_SECONDS)")  # fmt: skip
    parser.add_argument("--max-duration", type=float, default=defaults.max_duration,
                        help="the policies' max_duration, seconds")  # fmt: skip
    parser.add_argument("--settle", type=float, default=defaults.settle,
                        help="slack after max_duration + lease before 'stuck'")  # fmt: skip
    parser.add_argument("--pg-setting", type=_parse_setting, action="append", default=[],
                        help="a PostgreSQL setting, e.g. synchronous_commit=off")  # fmt: skip
    parser.add_argument("--workdir", type=Path, help="keep logs, audit and traces here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--trace-sip", action="store_true",
                        help="the carrier keeps every SIP message in its trace")  # fmt: skip
    parser.add_argument("--json", nargs="?", const="-",
                        help="the report as JSON, on stdout (or into FILE)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        faults = parse_faults(args.faults)
    except ValueError as exc:
        parser.error(str(exc))
    if any(f.at >= args.duration for f in faults):
        parser.error("every fault must start inside --duration")
    params = Params(duration=args.duration, rate=args.rate, faults=faults, seed=args.seed,
                    workers=args.workers, lease=args.lease, max_duration=args.max_duration,
                    settle=args.settle, pg_settings=tuple(args.pg_setting),
                    workdir=args.workdir, keep=args.keep, trace_sip=args.trace_sip)  # fmt: skip
    try:
        outcome = run(params)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: everything started was stopped", file=sys.stderr)
        return 130
    if args.json == "-":
        print(json.dumps(outcome.to_json(), indent=2))
    else:
        print(describe(outcome))
        if args.json:
            Path(args.json).write_text(json.dumps(outcome.to_json(), indent=2))
    return 0 if outcome.report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
