"""Trunk budgets shared by every worker through real Redis: two routers (two workers,
each with its own SIP user agent) never exceed a trunk's concurrency or call rate
together, and a dead worker's slot comes back when its lease runs out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from carriers.budgets import RedisBudgets
from carriers.trunk import Trunk
from tests.conftest_escalation import REDIS_URL
from tests.integration.peers import sipp
from tests.integration.test_carriers_sipp import NUMBER, carrier, gateway, router, sipp_dir

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


def trunk(**values: object) -> Trunk:
    return Trunk.model_validate({"name": "a", "host": "127.0.0.1", **values})


@pytest.fixture
async def budgets() -> AsyncIterator[RedisBudgets]:
    shared = RedisBudgets(REDIS_URL, f"ackline-test-{uuid.uuid4().hex[:8]}", lease_s=0.5)
    yield shared
    await shared.close()


async def test_concurrency_is_shared_and_released(budgets: RedisBudgets) -> None:
    other = RedisBudgets(REDIS_URL, budgets.prefix.removesuffix(":trunk"), lease_s=0.5)
    try:
        t = trunk(max_concurrent=1)
        refused, first = await budgets.acquire(t)
        assert refused is None
        assert first
        refused, _ = await other.acquire(t)  # the other worker sees the slot taken
        assert refused is not None
        assert "all workers" in refused
        await budgets.release("a", first)
        refused, _ = await other.acquire(t)
        assert refused is None
        await asyncio.sleep(0.6)  # a worker died holding it: the lease frees the slot
        refused, _ = await budgets.acquire(t)
        assert refused is None
    finally:
        await other.close()


async def test_calls_per_second_window(budgets: RedisBudgets) -> None:
    t = trunk(max_cps=2)
    results = [(await budgets.acquire(t))[0] for _ in range(3)]
    assert results[:2] == [None, None]
    assert results[2] is not None
    assert "max_cps" in results[2]
    await asyncio.sleep(1.05)
    assert (await budgets.acquire(t))[0] is None


async def test_two_workers_spread_load_instead_of_overrunning_a_trunk(
    tmp_path: Path, budgets: RedisBudgets
) -> None:
    with (
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "a"), calls=20, RING_MS="0") as a,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "b"), calls=20, RING_MS="0") as b,
    ):
        trunks = [carrier("a", a, priority=1, max_concurrent=1), carrier("b", b, priority=2)]
        prefix = budgets.prefix.removesuffix(":trunk")
        async with (
            gateway() as gw1,
            gateway() as gw2,
            router(gw1, trunks, budgets=RedisBudgets(REDIS_URL, prefix)) as worker1,
            router(gw2, trunks, budgets=RedisBudgets(REDIS_URL, prefix)) as worker2,
        ):
            first = await worker1.place_call(NUMBER, ring_timeout=5)
            assert first.trunk == "a"
            assert first.answered
            second = await worker2.place_call(NUMBER, ring_timeout=5)  # a is full
            assert second.trunk == "b"
            assert second.answered
            assert [(s.trunk, s.reason.split(" (")[0]) for s in second.skipped] == [
                ("a", "max_concurrent reached")
            ]
            await second.call.hangup()
            await first.call.hangup()
            await asyncio.sleep(0.2)  # the release reaches Redis
            third = await worker2.place_call(NUMBER, ring_timeout=5)
            assert third.trunk == "a", third.skipped
            await third.call.hangup()


async def test_hourly_call_budgets_are_shared_by_every_worker(budgets: RedisBudgets) -> None:
    from carriers.budgets import CallBudget

    other = RedisBudgets(REDIS_URL, budgets.prefix.removesuffix(":trunk"))
    try:
        per_number = CallBudget(per_hour=None, per_number_per_hour=2)
        assert await budgets.admit_call(NUMBER, per_number) is None
        assert await other.admit_call(NUMBER, per_number) is None
        refused = await budgets.admit_call(NUMBER, per_number)
        assert refused is not None
        assert "this number" in refused
        assert await other.admit_call("+14155550102", per_number) is None  # another number
        overall = CallBudget(per_hour=3)
        refused = await other.admit_call("+14155550103", overall)  # 3 counted already
        assert refused is not None
        assert "3 calls in the last hour" in refused
        assert await other.admit_call(NUMBER, CallBudget()) is None  # no limits: no count
    finally:
        await other.close()
