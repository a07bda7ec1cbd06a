"""Each calling process's trunk health in one Redis hash: fresh reports are read back,
stale or unreadable ones (a worker that died without withdrawing) are left out and
removed (real Redis)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from carriers.shared_health import MAX_AGE, SharedTrunkHealth
from tests.conftest_escalation import REDIS_URL

pytest_plugins = ["tests.conftest_escalation"]
NOW = 1_800_000_000.0
UP = {"probe": "up", "breaker": "closed", "usable": True}


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    yield client
    await client.aclose()


async def test_fresh_reports_are_read_and_stale_ones_dropped(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    a = SharedTrunkHealth(redis, redis_prefix, "gw-1/100")
    b = SharedTrunkHealth(redis, redis_prefix, "gw-2/200")
    await a.publish({"carrier-a": UP}, now=NOW - 1)
    await b.publish({"carrier-a": {**UP, "probe": "down"}}, now=NOW - MAX_AGE - 1)  # gone
    await redis.hset(a.key, "gw-3/300", "not json")
    try:
        got = await a.read(now=NOW)
        assert got == {"gw-1/100": {"at": NOW - 1, "trunks": {"carrier-a": UP}}}
        assert set(await redis.hkeys(a.key)) == {b"gw-1/100"}  # the dead ones are removed
        await a.withdraw()
        assert await a.read(now=NOW) == {}
    finally:
        await redis.delete(a.key)


async def test_a_report_replaces_the_same_processs_last_one(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    shared = SharedTrunkHealth(redis, redis_prefix, "gw-1/100")
    try:
        await shared.publish({"carrier-a": UP}, now=NOW - 3)
        await shared.publish({"carrier-a": {**UP, "breaker": "open"}}, now=NOW - 1)
        raw = await redis.hget(shared.key, "gw-1/100")
        assert json.loads(raw or "{}")["trunks"]["carrier-a"]["breaker"] == "open"
        assert list(await shared.read(now=NOW)) == ["gw-1/100"]
    finally:
        await redis.delete(shared.key)


async def test_redis_being_away_reads_as_no_reports(caplog: pytest.LogCaptureFixture) -> None:
    """The API's trunk list must not fail because Redis is down: no views, a warning."""
    away = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        assert await SharedTrunkHealth(away, "x", "gw/1").read() == {}
    finally:
        await away.aclose()
    assert any("trunk health unavailable" in r.getMessage() for r in caplog.records)
