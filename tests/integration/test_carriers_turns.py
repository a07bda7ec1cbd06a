"""The round-robin turn shared by every process: in Redis when configured, else in the
database; a router whose shared turn does not answer keeps rotating on its own."""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest

from carriers.router import CarrierRouter
from carriers.trunk import Trunk
from carriers.turns import DatabaseTurns, RedisTurns
from gateway.call import Gateway
from storage.db import Database
from tests.conftest_escalation import REDIS_URL

pytest_plugins = ["tests.conftest_escalation"]
pytestmark = pytest.mark.timeout(60)


async def test_database_turns_count_across_processes(db_url: str) -> None:
    first, second = Database(db_url), Database(db_url)  # as a worker and `ackline call` would
    try:
        await first.migrate()
        a, b = DatabaseTurns(first), DatabaseTurns(second)
        turns = [await a.next_turn("*"), await b.next_turn("*"), await a.next_turn("*")]
        assert turns == [0, 1, 2]
        assert await b.next_turn("cheap") == 0  # each route has its own
        concurrent = await asyncio.gather(
            *(DatabaseTurns(first).next_turn("new") for _ in range(5))
        )
        assert sorted(concurrent) == [0, 1, 2, 3, 4]  # the first insert race included
    finally:
        await first.dispose()
        await second.dispose()


async def test_redis_turns_count_across_processes() -> None:
    prefix = f"test-{uuid.uuid4().hex}"
    a, b = RedisTurns(REDIS_URL, prefix), RedisTurns(REDIS_URL, prefix)
    try:
        assert [await a.next_turn("*"), await b.next_turn("*"), await a.next_turn("x")] == [0, 1, 0]
    finally:
        await a.redis.delete(f"{prefix}:route:*:turn", f"{prefix}:route:x:turn")
        await a.close()
        await b.close()


class Broken:
    async def next_turn(self, route: str) -> int:
        raise ConnectionError("database away")

    async def close(self) -> None:
        return None


async def test_an_unavailable_shared_turn_falls_back_to_the_process_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    trunks = [Trunk(name="a", host="127.0.0.1"), Trunk(name="b", host="127.0.0.1")]
    router = CarrierRouter(
        Gateway(), trunks, "round_robin", allowed_countries=["US"], turns=Broken()
    )
    with caplog.at_level(logging.WARNING, logger="carriers.router"):
        assert await router._turn() is None
    assert "shared round-robin turn unavailable" in caplog.text
    await router.close()
