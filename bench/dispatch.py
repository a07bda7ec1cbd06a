"""Dispatch benchmark against real PostgreSQL + Redis, API and worker as separate processes.

An open-loop client POSTs alerts at a steady rate to the API (uvicorn); a worker process
hands them to a carrier double that stamps each hand-off into Redis. Reports P50/P99 of

* ingest -> channel hand-off: the POST's scheduled send time .. the worker calls
  channel.send() (latencies count from the schedule, so a lagging client shows up too);
* POST latency (the 202 comes only after the commit), and the part of it that is the
  client's own delay (scheduled .. request written): a stall there is the client's or the
  whole machine's, not the service's;
* ack -> cancel: for a share of alerts the "call" rings until hung up; the client acks
  once it rings and we measure until channel.cancel() runs in the worker.

    python -m bench.dispatch [--rate 200] [--duration 60] [--ack-share 0.05]
                             [--raw FILE] [--keep-db] [--store-path fast|session]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import redis.asyncio as aioredis
import yaml

from api.loop import freeze_startup_objects
from api.loop import run as run_service
from bench.services import wait_http_ready, wait_subscribed
from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    ignore_progress,
)
from escalation.unit_of_work import StorePath
from storage.redis_client import async_client

PG_ADMIN = os.environ.get("ACKLINE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("ACKLINE_BENCH_REDIS", "redis://127.0.0.1:6379/0")
API_KEY = "bench-key"
CONFIG = {
    "company": "bench",
    "recipients": [
        {"id": "svc", "name": "Service hook", "webhook_url": "http://127.0.0.1:9/hook"},
        {"id": "oncall", "name": "On call", "phone": "+14155550101"},
    ],
    "policies": [
        {"name": "fast", "steps": [{"recipients": ["svc"], "channels": ["webhook"],
                                    "delay": "1h"}]},
        {"name": "ring", "steps": [{"recipients": ["oncall"], "channels": ["voice"],
                                    "delay": "1h"}]},
    ],
}  # fmt: skip


class StampingCarrier:
    """Records hand-off (and hang-up) times in Redis; `ring` keeps the call up until cancel."""

    def __init__(self, name: str, redis: aioredis.Redis, prefix: str, ring: bool) -> None:
        self.name = name
        self.redis = redis
        self.prefix = prefix
        self.ring = ring
        self._hangups: dict[str, asyncio.Event] = {}

    def deadline(self, n: Notification) -> float:
        return 60.0

    async def send(
        self, n: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        now = time.time()
        await self.redis.hset(f"{self.prefix}:handoff", n.alert_id, now)
        if not self.ring:
            return DeliveryResult(DeliveryStatus.DELIVERED, "accepted")
        hangup = self._hangups.setdefault(n.notification_id, asyncio.Event())
        try:
            await asyncio.wait_for(hangup.wait(), 30)
        except TimeoutError:
            return DeliveryResult(DeliveryStatus.NOT_ACKNOWLEDGED, "no_digit")
        finally:
            self._hangups.pop(n.notification_id, None)
        return DeliveryResult(DeliveryStatus.CANCELLED, "hung_up")

    async def cancel(self, notification_id: str) -> None:
        await self.redis.hset(f"{self.prefix}:cancel", notification_id, time.time())
        self._hangups.setdefault(notification_id, asyncio.Event()).set()


def _settings(args: argparse.Namespace) -> Any:
    from api.settings import Settings

    return Settings(
        database_url=args.db,
        redis_url=REDIS_URL,
        redis_prefix=args.prefix,
        config_path=Path(args.workdir) / "ackline.yaml",
        api_keys={API_KEY: "bench"},
        audit_dir=Path(args.workdir) / "audit",
        embedded_worker=False,
        poll_interval=1.0,
        migrate_on_start=args.role == "api",
        store_path=StorePath(args.store_path),
    )


async def _serve_api(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app

    app = create_app(_settings(args), {})
    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning",
                            access_log=False, http="httptools")  # fmt: skip
    await uvicorn.Server(config).serve()


async def _serve_worker(args: argparse.Namespace) -> None:
    from api.app import run_worker
    from escalation.channels.base import Channel

    # Blocking pool: a claim of 100 sends must queue for connections, not fail the sends.
    r = async_client(REDIS_URL, max_connections=32, blocking_timeout=30)
    channels: dict[str, Channel] = {
        "webhook": StampingCarrier("webhook", r, args.prefix, ring=False),
        "voice": StampingCarrier("voice", r, args.prefix, ring=True),
    }
    try:
        await run_worker(_settings(args), channels)
    finally:
        await r.aclose()


class RawHttp:
    """A minimal keep-alive HTTP/1.1 client over a fixed pool of connections.

    The load generator must cost far less than the server it measures; httpx's per-request
    overhead on this 2-core box is of the same order as the API's own work."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self.host, self.port, self.size = host, port, size
        self._pool: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )

    async def open(self) -> None:
        for _ in range(self.size):
            self._pool.put_nowait(await asyncio.open_connection(self.host, self.port))

    async def request(
        self, method: str, path: str, body: dict[str, Any] | None, headers: dict[str, str]
    ) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else b""
        head = [
            f"{method} {path} HTTP/1.1",
            f"Host: {self.host}",
            f"Content-Length: {len(data)}",
            "Content-Type: application/json",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        reader, writer = await self._pool.get()
        try:
            message = ("\r\n".join(head) + "\r\n\r\n").encode() + data
            writer.write(message)
            try:
                raw = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionResetError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise
                # The server closed the connection while it sat idle (uvicorn's 5 s
                # keep-alive, e.g. acks waiting for a lagging worker): nothing was read,
                # so send it again on a new connection.
                writer.close()
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(message)
                raw = await reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = next(
                int(x.split(":", 1)[1]) for x in lines if x.lower().startswith("content-length:")
            )
            payload = await reader.readexactly(length)
        finally:
            self._pool.put_nowait((reader, writer))
        return status, json.loads(payload) if payload else None

    async def close(self) -> None:
        while not self._pool.empty():
            _, writer = self._pool.get_nowait()
            writer.close()


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def line(name: str, values_s: list[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return (f"{name:<34} n={len(ms):<6} p50={pct(ms, 50):7.2f} ms  p99={pct(ms, 99):7.2f} ms"
            f"  max={max(ms, default=float('nan')):7.2f} ms")  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine (all cores)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _cpu_report(
    procs: list[subprocess.Popen[bytes]], before: list[float], machine: tuple[float, float]
) -> str:
    """CPU seconds the API and the workers used during the load, and how busy the box was."""
    used = [_cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True)]
    busy, total = _machine_busy()
    share = (busy - machine[0]) / max(1.0, total - machine[1]) * 100
    workers = " + ".join(f"{u:.1f}" for u in used[1:])
    return (f"api {used[0]:.1f} s, worker(s) {workers} s; machine {share:.0f}% busy "
            f"({os.cpu_count()} cores)")  # fmt: skip


async def _drive(args: argparse.Namespace, port: int) -> dict[str, Any]:
    # Blocking pool: hundreds of ackers polling for their call at once queue for a
    # connection instead of failing the run (MaxConnectionsError).
    r = async_client(REDIS_URL, max_connections=32, blocking_timeout=30)
    client = RawHttp("127.0.0.1", port, args.connections)
    await client.open()
    posted: dict[str, float] = {}
    send_lag: dict[str, float] = {}  # scheduled .. the request is written: the client's own delay
    post_lat: list[float] = []
    errors = 0
    acks: dict[str, float] = {}
    ack_lat: list[float] = []
    auth = {"X-API-Key": API_KEY}

    async def ack_when_ringing(alert_id: str) -> None:
        for _ in range(400):
            if await r.hexists(f"{args.prefix}:handoff", alert_id):
                break
            await asyncio.sleep(0.025)
        t0 = time.time()
        status, _ = await client.request("POST", f"/v1/alerts/{alert_id}/ack", None, auth)
        if status == 200:
            acks[alert_id] = t0
            ack_lat.append(time.time() - t0)

    ackers: list[asyncio.Task[None]] = []

    async def post(i: int, ring: bool, t0: float) -> None:
        """`t0` is the scheduled send time (open loop): a late client counts against us."""
        nonlocal errors
        body = {"title": f"bench {i}", "summary": "load", "policy": "ring" if ring else "fast"}
        lag = time.time() - t0
        try:
            status, data = await client.request(
                "POST", "/v1/alerts", body, {**auth, "Idempotency-Key": f"b{i}"}
            )
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            return
        if status != 202:
            errors += 1
            return
        post_lat.append(time.time() - t0)
        posted[data["id"]] = t0
        send_lag[data["id"]] = lag
        if ring:
            ackers.append(asyncio.create_task(ack_when_ringing(data["id"])))

    total = int(args.rate * args.duration)
    every = max(1, round(1 / args.ack_share)) if args.ack_share > 0 else 0
    tasks: list[asyncio.Task[None]] = []
    start, wall_start = time.perf_counter(), time.time()
    for i in range(total):
        delay = start + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        ring = bool(every) and i % every == every - 1
        tasks.append(asyncio.create_task(post(i, ring, wall_start + i / args.rate)))
    await asyncio.gather(*tasks)
    achieved = total / (time.perf_counter() - start)
    await asyncio.gather(*ackers)
    await client.close()

    # Let the last hand-offs and hang-ups land, then collect.
    deadline = time.time() + 10
    while time.time() < deadline:
        if await r.hlen(f"{args.prefix}:handoff") >= len(posted):
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    handoffs = {
        (k.decode() if isinstance(k, bytes) else k): float(v)
        for k, v in (await r.hgetall(f"{args.prefix}:handoff")).items()
    }
    cancels = [float(v) for v in (await r.hgetall(f"{args.prefix}:cancel")).values()]
    await r.delete(f"{args.prefix}:handoff", f"{args.prefix}:cancel", f"{args.prefix}:due")
    await r.aclose()

    ingest = [handoffs[a] - t for a, t in posted.items() if a in handoffs]
    if args.raw:  # when in the run each slow hand-off happened: a start-up cost, a stall
        raw = json.dumps(sorted(
            (t - wall_start, handoffs[a] - t, send_lag[a])
            for a, t in posted.items() if a in handoffs
        ))  # fmt: skip
        await asyncio.to_thread(Path(args.raw).write_text, raw)
    # Each cancelled call belongs to one acked alert; match them by order of time.
    cancel_lat = [c - a for c, a in zip(sorted(cancels), sorted(acks.values()), strict=False)]
    return {
        "requested_rate": args.rate,
        "achieved_rate": round(achieved, 1),
        "alerts": len(posted),
        "post_errors": errors,
        "lost": len([a for a in posted if a not in handoffs]),
        "ingest_to_handoff": ingest,
        "post_latency": post_lat,
        "send_lag": list(send_lag.values()),
        "ack_response": ack_lat,
        "ack_to_cancel": cancel_lat,
        "acks": len(acks),
        "cancels": len(cancels),
    }


def _start_role(role: str, common: list[str]) -> subprocess.Popen[bytes]:
    """One `bench.dispatch --role` process (a plain function: the fork blocks briefly)."""
    return subprocess.Popen([sys.executable, "-m", "bench.dispatch", "--role", role, *common])


async def _bench(args: argparse.Namespace) -> int:
    name = f"ackline_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db_url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    prefix = args.prefix = f"ackline-bench-{uuid.uuid4().hex[:6]}"
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory() as workdir:
        (Path(workdir) / "ackline.yaml").write_text(yaml.safe_dump(CONFIG))
        common = [
            "--db",
            db_url,
            "--prefix",
            prefix,
            "--workdir",
            workdir,
            "--port",
            str(args.port),
            "--store-path",
            args.store_path,
        ]
        try:
            api = _start_role("api", common)
            procs.append(api)
            base = f"http://127.0.0.1:{args.port}"
            async with httpx.AsyncClient(base_url=base) as probe:
                await wait_http_ready(probe, api)
            for _ in range(args.workers):
                procs.append(_start_role("worker", common))
            await wait_subscribed(REDIS_URL, prefix, args.workers, procs)
            freeze_startup_objects()  # no full collection of the client's heap mid-load
            cpu_before = [_cpu_seconds(p.pid) for p in procs], _machine_busy()
            result = await _drive(args, args.port)
            result["cpu"] = _cpu_report(procs, *cpu_before)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
            if args.keep_db:
                print(f"kept the benchmark database {name} (drop it when done)")
            else:
                admin = await asyncpg.connect(PG_ADMIN)
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                await admin.close()
    print(f"dispatch benchmark: {result['alerts']} alerts at {result['achieved_rate']}/s "
          f"(asked {args.rate}/s for {args.duration:g} s), {args.workers} worker(s), "
          f"PostgreSQL ({args.store_path} store path) + Redis")  # fmt: skip
    print(line("ingest -> channel hand-off", result["ingest_to_handoff"]))
    print(line("POST /v1/alerts (202 after commit)", result["post_latency"]))
    print(line("  of which the client's own delay", result["send_lag"]))
    print(line("ack -> in-flight call hung up", result["ack_to_cancel"]))
    print(line("ack response (pending cancelled)", result["ack_response"]))
    print(f"lost alerts: {result['lost']}  POST errors: {result['post_errors']}  "
          f"acks: {result['acks']}  hang-ups: {result['cancels']}")  # fmt: skip
    print(f"cpu during the load: {result['cpu']}")
    if args.json:
        summary = {k: v for k, v in result.items() if not isinstance(v, list)}
        summary["store_path"] = args.store_path
        for key in ("ingest_to_handoff", "post_latency", "ack_to_cancel", "ack_response"):
            summary[f"{key}_p50_ms"] = round(pct(result[key], 50) * 1000, 3)
            summary[f"{key}_p99_ms"] = round(pct(result[key], 99) * 1000, 3)
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(summary, indent=2))
    ok = result["lost"] == 0 and result["post_errors"] == 0 and result["acks"] == result["cancels"]
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=200.0, help="alerts per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--ack-share", type=float, default=0.05,
                        help="share of alerts whose call rings until acked")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--port", type=int, default=18081)
    parser.add_argument("--connections", type=int, default=32, help="client keep-alive pool")
    parser.add_argument("--json", help="also write a summary to this file")
    parser.add_argument("--raw", help="also write each alert's [seconds into the load, "
                        "hand-off latency s, client delay s] to this file")  # fmt: skip
    parser.add_argument("--store-path", choices=[p.value for p in StorePath],
                        default=StorePath.FAST.value,
                        help="the engine's way to PostgreSQL: asyncpg fast path or SQLAlchemy "
                        "session only")  # fmt: skip
    parser.add_argument("--keep-db", action="store_true",
                        help="leave the benchmark database for inspection")  # fmt: skip
    parser.add_argument("--role", choices=["bench", "api", "worker"], default="bench",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "api":
        run_service(_serve_api(args))
        return 0
    if args.role == "worker":
        run_service(_serve_worker(args))
        return 0
    return run_service(_bench(args))  # the client on the same loop as the servers


if __name__ == "__main__":
    sys.exit(main())
