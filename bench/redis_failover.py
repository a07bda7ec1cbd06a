"""Redis failover under load: does ackline ride through a master killed -9?

Starts a Redis master + replica + three sentinels (bench.ha_redis), one `ackline serve
--role api` and one `--role worker` pointed at the redis+sentinel:// URL, on a fresh
database of the local PostgreSQL (ACKLINE_BENCH_PG), and a webhook receiver standing in
for the person paged. It posts alerts at a steady rate, kills the Redis master -9, and
keeps posting. The worker polls the database only every `poll` seconds, so alerts handed
off sooner than that after the failover show the wake-ups came back. Per run it prints:

* failover: kill -9 .. a quorum of sentinels names the promoted replica, a master;
* resubscribed: kill -9 .. the worker listens for wake-ups on the new master;
* accepted (202), other answers, lost (202 but never delivered), the slowest hand-off of
  an alert posted after the resubscription.

    python -m bench.redis_failover [--runs 3] [--rate 20] [--before 3] [--after 6]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx
import yaml
from redis.exceptions import RedisError

from bench.ha_redis import RedisSentinelSet
from bench.ports import free_port
from bench.services import Owned, ackline_command, service_env, tail, wait_http_ready
from storage.redis_client import async_client

PG_ADMIN = os.environ.get("ACKLINE_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
API_KEY = "failover-key"
COMPANY = "acme"
PREFIX = "ackline-failover"


@dataclass
class Params:
    rate: float = 20.0  # alerts per second
    before: float = 3.0  # seconds of load before the kill
    after: float = 6.0  # seconds of load after the kill
    poll: float = 5.0  # the worker's database poll (ACKLINE_POLL_INTERVAL)
    settle: float = 15.0  # how long, after the load, every accepted alert may take
    workdir: Path | None = None


@dataclass
class Outcome:
    failover_s: float
    resubscribed_s: float
    answers: Counter[int | str] = field(default_factory=Counter)
    accepted: int = 0
    delivered: int = 0
    lost: list[str] = field(default_factory=list)
    late_handoff_s: float = 0.0  # the slowest hand-off of an alert posted once resubscribed
    after_resubscribe: int = 0  # how many alerts that was measured on
    logs: list[Path] = field(default_factory=list)

    @property
    def non_202(self) -> int:
        return sum(n for status, n in self.answers.items() if status != 202)

    def line(self) -> str:
        others = {k: v for k, v in self.answers.items() if k != 202}
        return (
            f"failover {self.failover_s:.2f} s, resubscribed {self.resubscribed_s:.2f} s, "
            f"accepted {self.accepted}, non-202 {self.non_202} {others or ''}, "
            f"lost {len(self.lost)}, slowest hand-off after resubscription "
            f"{self.late_handoff_s * 1000:.0f} ms ({self.after_resubscribe} alerts)"
        )


class Receiver:
    """A webhook endpoint: when each alert's first notification arrived (monotonic)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: dict[str, float] = {}
        self._arrived = asyncio.Event()  # set on each alert's first notification
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.seen.setdefault(str(body.get("alert_id")), time.monotonic())
                self._arrived.set()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        writer.close()

    async def settle(self, alerts: set[str], timeout: float) -> None:
        """Until each of `alerts` arrived or `timeout` s passed (those missing are lost)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while alerts - set(self.seen):
                    self._arrived.clear()
                    await self._arrived.wait()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def _config(receiver: Receiver) -> dict[str, object]:
    return {
        "company": COMPANY,
        "recipients": [{"id": "hook", "name": "Hook", "webhook_url": receiver.url}],
        "policies": [{"name": "p", "steps": [
            {"recipients": ["hook"], "channels": ["webhook"], "delay": "1h"}]}],
    }  # fmt: skip


async def _subscribers(url: str, channel: str) -> int:
    """Listeners of `channel` on the server at `url` (0 when it does not answer)."""
    client = async_client(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        [(_, count)] = await client.pubsub_numsub(channel)
        return int(count)
    except (RedisError, OSError):
        return 0
    finally:
        await client.aclose()


async def _post(client: httpx.AsyncClient, answers: dict[str, tuple[int | str, float]]) -> None:
    key = uuid.uuid4().hex
    headers = {"X-API-Key": API_KEY, "Idempotency-Key": key}
    body = {"title": "failover test", "policy": "p", "details": {"key": key}}
    try:
        response = await client.post("/v1/alerts", json=body, headers=headers)
    except httpx.HTTPError as exc:
        answers[key] = (type(exc).__name__, time.monotonic())
        return
    at = time.monotonic()
    if response.status_code == 202:
        answers[str(response.json()["id"])] = (202, at)
    else:
        answers[key] = (response.status_code, at)


async def _load(client: httpx.AsyncClient, params: Params, seconds: float,
                answers: dict[str, tuple[int | str, float]]) -> None:  # fmt: skip
    """Open loop: one alert every 1/rate s whatever became of the others."""
    start = time.monotonic()
    tasks = []
    for i in range(int(seconds * params.rate)):
        await asyncio.sleep(max(0.0, start + i / params.rate - time.monotonic()))
        tasks.append(asyncio.create_task(_post(client, answers)))
    await asyncio.gather(*tasks)


async def _run(params: Params, workdir: Path) -> Outcome:
    name = f"ackline_failover_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(PG_ADMIN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    redis_set = RedisSentinelSet(workdir / "redis")
    receiver = Receiver()
    procs: list[Owned] = []
    try:
        await asyncio.to_thread(redis_set.start)
        await receiver.start()
        config = workdir / "ackline.yaml"
        config.write_text(yaml.safe_dump(_config(receiver)))
        env = service_env({
            "ACKLINE_DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + name,
            "REDIS_URL": redis_set.url,
            "ACKLINE_REDIS_PREFIX": PREFIX,
            "ACKLINE_CONFIG": str(config),
            "ACKLINE_API_KEYS": f"{API_KEY}:{COMPANY}",
            "ACKLINE_AUDIT_DIR": str(workdir / "audit"),
            "ACKLINE_POLL_INTERVAL": f"{params.poll:g}",
            "ACKLINE_WEBHOOK_SECRET": "failover-secret",
        })  # fmt: skip
        for unwanted in ("REDIS_SENTINELS", "REDIS_MASTER_NAME"):
            env.pop(unwanted, None)
        http_port = free_port()
        for role, args in (("api", ["--http-port", str(http_port)]), ("worker", [])):
            proc = Owned(role, [*ackline_command(), "serve", "--role", role, *args],
                         workdir / f"{role}.log", env=env, cwd=workdir)  # fmt: skip
            procs.append(proc)
            proc.start()
        wake = f"{PREFIX}:wake"
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=10) as c:
            await wait_http_ready(c, procs[0].popen)
            deadline = time.monotonic() + 30
            while await _subscribers(redis_set.url, wake) < 1:
                if time.monotonic() > deadline or not procs[1].alive():
                    raise RuntimeError(f"the worker did not subscribe:\n{tail(procs[1].log)}")
                await asyncio.sleep(0.1)
            answers: dict[str, tuple[int | str, float]] = {}
            load = asyncio.create_task(_load(c, params, params.before + params.after, answers))
            await asyncio.sleep(params.before)
            old = await asyncio.to_thread(redis_set.crash_master)
            killed = time.monotonic()
            new = await asyncio.to_thread(redis_set.wait_failover, old)
            failover = time.monotonic() - killed
            while await _subscribers(f"redis://{new[0]}:{new[1]}/0", wake) < 1:
                if time.monotonic() - killed > 30:
                    raise RuntimeError(f"no resubscription:\n{tail(procs[1].log)}")
                await asyncio.sleep(0.02)
            resubscribed_at = time.monotonic()
            await load
            accepted = {a: at for a, (status, at) in answers.items() if status == 202}
            await receiver.settle(set(accepted), params.settle)
        outcome = Outcome(failover, resubscribed_at - killed,
                          Counter(status for status, _ in answers.values()))  # fmt: skip
        outcome.accepted = len(accepted)
        outcome.delivered = len(set(accepted) & set(receiver.seen))
        outcome.lost = sorted(set(accepted) - set(receiver.seen))
        later = [a for a, at in accepted.items() if at > resubscribed_at and a in receiver.seen]
        outcome.after_resubscribe = len(later)
        outcome.late_handoff_s = max((receiver.seen[a] - accepted[a] for a in later), default=0)
        outcome.logs = [p.log for p in procs]
        return outcome
    finally:
        for proc in reversed(procs):
            proc.stop(timeout=15)
        await receiver.close()
        await asyncio.to_thread(redis_set.close)
        admin = await asyncpg.connect(PG_ADMIN)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


def run(params: Params) -> Outcome:
    """One run in `params.workdir` (a temporary directory when None)."""
    if params.workdir is not None:
        params.workdir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_run(params, params.workdir))
    with tempfile.TemporaryDirectory(prefix="ackline-failover-") as tmp:
        return asyncio.run(_run(params, Path(tmp)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.redis_failover",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--before", type=float, default=3.0)
    parser.add_argument("--after", type=float, default=6.0)
    parser.add_argument("--poll", type=float, default=5.0)
    args = parser.parse_args(argv)
    failed = False
    for i in range(args.runs):
        outcome = run(Params(rate=args.rate, before=args.before, after=args.after,
                             poll=args.poll))  # fmt: skip
        print(f"run {i + 1}: {outcome.line()}", flush=True)
        failed |= bool(outcome.lost) or outcome.non_202 > 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
