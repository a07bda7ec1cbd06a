"""PostgreSQL fails over under an `ackline serve` API that keeps answering: a primary
killed -9 and a planned switchover, each while alerts are posted in a steady loop.

The API is given both data nodes of a pg_auto_failover cluster in one multi-host URL
(target_session_attrs=read-write) and is neither restarted nor reconfigured. What must
hold: every alert answered 202 is on the new primary (the standby was synchronous: RPO
0), no request is answered 500 (503 with Retry-After is the outage answer, and the
client retries with the same Idempotency-Key), and ingest works again within a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
import yaml

from bench.ha_postgres import PgAutoFailover
from bench.ports import free_port
from bench.services import Owned, ackline_command, service_env, tail, wait_http_ready

API_KEY = "k-acme"
CONFIG = {
    "company": "acme",
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
    "policies": [{"name": "page", "steps": [{"recipients": ["alice"], "channels": ["sms"],
                                             "delay": 600}]}],
}  # fmt: skip
RECOVERY_BOUND = 60.0  # seconds from the fault to the first 202 after it
RETRY_DELAY = 0.2  # the test client's, not Retry-After's 5 s: we want to see the recovery


@pytest.fixture
def cluster() -> Iterator[PgAutoFailover]:
    workdir = Path(tempfile.mkdtemp(prefix="ackline-ha-test-"))
    pg = PgAutoFailover(workdir, "ackline", fast=True)
    try:
        pg.start()
        yield pg
    except BaseException:
        for log in sorted(workdir.glob("*.log")):
            print(f"--- {log.name}\n{tail(log, 40)}")
        raise
    finally:
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)


@contextlib.asynccontextmanager
async def serve(dsn: str, workdir: Path) -> AsyncIterator[httpx.AsyncClient]:
    """`ackline serve --role api` on the multi-host URL, as an operator would run it."""
    config = workdir / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    env = service_env({
        "ACKLINE_DATABASE_URL": dsn,
        "ACKLINE_CONFIG": str(config),
        "ACKLINE_API_KEYS": f"{API_KEY}:acme",
        "ACKLINE_AUDIT_DIR": str(workdir / "audit"),
    })  # fmt: skip
    api = Owned("api", [*ackline_command(), "serve", "--role", "api", "--http-port", str(port)],
                workdir / "api.log", env=env, cwd=workdir)  # fmt: skip
    api.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=40) as client:
            await wait_http_ready(client, api.popen)
            yield client
            assert api.alive(), f"the API died:\n{tail(api.log)}"
    except BaseException:
        print(f"--- api.log\n{tail(api.log, 60)}")
        raise
    finally:
        api.stop()


@dataclass
class Load:
    """Alerts posted one after another, each retried (same Idempotency-Key) until
    answered 202; what every answer was, and when."""

    client: httpx.AsyncClient
    accepted: dict[str, tuple[float, float]] = field(default_factory=dict)  # id: sent, answered
    codes: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # transport errors: must stay empty
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: int = 0

    async def run(self, interval: float = 0.05) -> None:
        while not self.stop.is_set():
            self.sent += 1
            key = f"ha-{self.sent}"
            while True:
                sent_at = time.monotonic()
                try:
                    r = await self.client.post(
                        "/v1/alerts", json={"title": f"failover {key}", "policy": "page"},
                        headers={"X-API-Key": API_KEY, "Idempotency-Key": key},
                    )  # fmt: skip
                except httpx.HTTPError as exc:
                    self.errors.append(repr(exc))
                    await asyncio.sleep(RETRY_DELAY)
                    continue
                self.codes[r.status_code] = self.codes.get(r.status_code, 0) + 1
                if r.status_code == 202:
                    self.accepted[r.json()["id"]] = (sent_at, time.monotonic())
                    break
                if r.status_code != 503 or self.stop.is_set():
                    break  # a 500 or anything else is counted and not retried
                await asyncio.sleep(RETRY_DELAY)
            await asyncio.sleep(interval)

    def first_202_sent_after(self, moment: float) -> float | None:
        """When the first request sent after `moment` was answered 202, if one was."""
        later = [answered for sent, answered in self.accepted.values() if sent > moment]
        return min(later) if later else None

    async def until_202_sent_after(self, moment: float, timeout: float) -> float:
        deadline = moment + timeout
        while time.monotonic() < deadline:
            answered = self.first_202_sent_after(moment)
            if answered is not None:
                return answered
            await asyncio.sleep(0.05)
        raise AssertionError(f"no alert answered 202 within {timeout:g} s; codes {self.codes}")

    def longest_gap(self, start: float, end: float) -> float:
        """The longest stretch in [start, end] with no 202 answered: the write outage."""
        moments = sorted(a for _, a in self.accepted.values() if start <= a <= end)
        edges = [start, *moments, end]
        return max(b - a for a, b in itertools.pairwise(edges))


async def stored_ids(dsn: str) -> set[str]:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return {str(r["id"]) for r in await conn.fetch("SELECT id FROM alerts")}
    finally:
        await conn.close()


@pytest.mark.timeout(240)
async def test_ingest_survives_a_primary_crash_and_a_switchover(
    cluster: PgAutoFailover, tmp_path: Path
) -> None:
    figures: dict[str, float | str] = {}
    async with serve(cluster.dsn(), tmp_path) as client:
        load = Load(client)
        loader = asyncio.create_task(load.run())
        try:
            await load.until_202_sent_after(time.monotonic(), 30)
            await asyncio.sleep(1.0)

            crashed_at = time.monotonic()
            crashed = await asyncio.to_thread(cluster.crash_primary)
            # Sent after the kill, so it cannot have been committed by the old primary.
            back = await load.until_202_sent_after(time.monotonic(), RECOVERY_BOUND)
            figures["crash_to_202_s"] = round(back - crashed_at, 2)
            promoted = await asyncio.to_thread(cluster.wait_primary, 30.0, crashed)
            await asyncio.sleep(1.0)
            figures["crash_gap_s"] = round(load.longest_gap(crashed_at, time.monotonic()), 2)

            await asyncio.to_thread(cluster.restart_node, crashed)
            await asyncio.to_thread(cluster.wait_healthy, 60.0)
            await asyncio.sleep(1.0)

            switched_at = time.monotonic()
            old, new = await asyncio.to_thread(cluster.switchover, 60.0)
            back = await load.until_202_sent_after(time.monotonic(), RECOVERY_BOUND)
            figures["switchover_to_202_s"] = round(back - switched_at, 2)
            await asyncio.sleep(1.0)
            figures["switchover_gap_s"] = round(load.longest_gap(switched_at, time.monotonic()), 2)
        finally:
            load.stop.set()
            await asyncio.wait_for(loader, 60)

    assert (old, new) == (promoted, crashed)
    stored = await stored_ids(cluster.dsn())
    lost = set(load.accepted) - stored
    figures.update(accepted=len(load.accepted), lost=len(lost), codes=str(load.codes))
    print(f"failover figures: {figures}")
    assert not lost, f"{len(lost)} alerts answered 202 are not on the new primary: {figures}"
    assert 500 not in load.codes, figures
    assert not load.errors, load.errors[:5]
    assert set(load.codes) <= {202, 503}, figures
