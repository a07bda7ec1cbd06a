"""Per-trunk budgets (concurrent calls, calls per second) and the toll-fraud guard's hourly
call budgets (all calls, calls to one number), in one process or shared.

A carrier enforces its limits across everything we send it, so with several workers the
budget must be shared too, or the workers together hit the carrier's 503 instead of
spreading the load. `RedisBudgets` keeps each trunk's calls in Redis (one atomic script
per decision); a slot has a lease, so a worker that dies mid-call frees it in time.
"""

from __future__ import annotations

import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from carriers.trunk import Trunk

__all__ = ["Budgets", "CallBudget", "LocalBudgets", "RedisBudgets", "TokenBucket"]

HOUR = 3600.0


@dataclass(frozen=True)
class CallBudget:
    """At most this many calls started per sliding hour: in all (a runaway loop, a leaked
    API key dialling out) and to any one number (a flapping alert, a looping hotline)."""

    per_hour: int | None = None
    per_number_per_hour: int | None = None

    def refusal(self, total: int, to_number: int) -> str | None:
        """Why one more call would break the budget, with `total` and `to_number` calls
        already started within the hour."""
        if self.per_hour is not None and total >= self.per_hour:
            return f"hourly call budget spent ({self.per_hour} calls in the last hour)"
        if self.per_number_per_hour is not None and to_number >= self.per_number_per_hour:
            return (
                f"hourly budget for this number spent ({self.per_number_per_hour} calls "
                "in the last hour)"
            )
        return None


class TokenBucket:
    """Calls-per-second budget: ``rate`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._at: float | None = None

    def take(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class Budgets(Protocol):
    async def acquire(self, trunk: Trunk) -> tuple[str | None, str]:
        """Claim a slot for one call: (refusal reason or None, the claim's key)."""
        ...

    async def release(self, trunk: str, key: str) -> None:
        """The call through `trunk` claimed as `key` is over."""
        ...

    async def admit_call(self, number: str, budget: CallBudget) -> str | None:
        """Count one call to `number` unless that breaks `budget` (then: why not)."""
        ...

    async def close(self) -> None: ...


class LocalBudgets:
    """Budgets of this process alone (the embedded default, one worker)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._active: dict[str, set[str]] = {}
        self._buckets: dict[str, tuple[float, TokenBucket]] = {}
        self._calls: deque[float] = deque()  # start times within the last hour
        self._calls_to: dict[str, deque[float]] = {}

    async def acquire(self, trunk: Trunk) -> tuple[str | None, str]:
        active = self._active.setdefault(trunk.name, set())
        if trunk.max_concurrent is not None and len(active) >= trunk.max_concurrent:
            return f"max_concurrent reached ({trunk.max_concurrent})", ""
        if trunk.max_cps:
            entry = self._buckets.get(trunk.name)
            if entry is None or entry[0] != trunk.max_cps:  # new, or changed at run time
                entry = (trunk.max_cps, TokenBucket(trunk.max_cps))
                self._buckets[trunk.name] = entry
            if not entry[1].take(self.clock()):
                return f"max_cps reached ({trunk.max_cps:g}/s)", ""
        key = uuid.uuid4().hex
        active.add(key)
        return None, key

    async def release(self, trunk: str, key: str) -> None:
        self._active.get(trunk, set()).discard(key)

    async def admit_call(self, number: str, budget: CallBudget) -> str | None:
        now = self.clock()
        for starts in (self._calls, self._calls_to.get(number, deque())):
            while starts and starts[0] <= now - HOUR:
                starts.popleft()
        for gone in [n for n, starts in self._calls_to.items() if not starts]:
            del self._calls_to[gone]
        to_number = self._calls_to.setdefault(number, deque())
        refusal = budget.refusal(len(self._calls), len(to_number))
        if refusal is None:
            self._calls.append(now)
            to_number.append(now)
        elif not to_number:
            del self._calls_to[number]
        return refusal

    async def close(self) -> None:
        return None


# KEYS: active zset (member: claim, score: lease end ms), starts zset (member: claim, score:
# start ms). ARGV: now ms, max concurrent (-1: none), window ms, calls per window (-1: none),
# lease ms, claim. Returns "" (claimed) or the refusal.
_ACQUIRE = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(ARGV[2]) >= 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 'max_concurrent'
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
if tonumber(ARGV[4]) >= 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  return 'max_cps'
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[5]), ARGV[6])
redis.call('ZADD', KEYS[2], now, ARGV[6])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[3]) + 1000)
return ''
"""


# KEYS: all calls zset, calls to the number zset (member: unique, score: start ms).
# ARGV: now ms, window ms, limit of all (-1: none), limit per number (-1: none), member.
# Returns "" (counted), "all" or "number".
_ADMIT = """
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
if tonumber(ARGV[3]) >= 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then
  return 'all'
end
if tonumber(ARGV[4]) >= 0 and redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  return 'number'
end
redis.call('ZADD', KEYS[1], now, ARGV[5])
redis.call('ZADD', KEYS[2], now, ARGV[5])
redis.call('PEXPIRE', KEYS[1], window)
redis.call('PEXPIRE', KEYS[2], window)
return ''
"""


BUDGET_TIMEOUT = 2.0


class RedisBudgets:
    """Budgets shared by every worker through Redis.

    Calls per second are a sliding window: at most ``max(1, cps * w)`` starts in any window
    ``w = max(1 s, 1 / cps)``. A claim's lease (default 4 h) bounds how long a crashed
    worker's call keeps its slot.
    """

    def __init__(self, url: str, prefix: str = "ackline", *, lease_s: float = 4 * 3600) -> None:
        from storage.redis_client import async_client

        # A Redis that hangs must not hold a page up: past this the budget counts as
        # unavailable and the call goes ahead (CarrierRouter).
        self.redis: Any = async_client(
            url, socket_connect_timeout=BUDGET_TIMEOUT, socket_timeout=BUDGET_TIMEOUT
        )
        self.prefix = f"{prefix}:trunk"
        self.lease_ms = int(lease_s * 1000)
        self._script: Any = self.redis.register_script(_ACQUIRE)
        self._admit: Any = self.redis.register_script(_ADMIT)
        self.calls_prefix = f"{prefix}:calls"

    async def acquire(self, trunk: Trunk) -> tuple[str | None, str]:
        key = uuid.uuid4().hex
        cps = trunk.max_cps
        window_ms = int(max(1.0, 1.0 / cps) * 1000) if cps else 1000
        per_window = max(1, int(cps * window_ms / 1000)) if cps else -1
        result = await self._script(
            keys=[f"{self.prefix}:{trunk.name}:active", f"{self.prefix}:{trunk.name}:starts"],
            args=[
                int(time.time() * 1000),
                trunk.max_concurrent if trunk.max_concurrent is not None else -1,
                window_ms,
                per_window,
                self.lease_ms,
                key,
            ],
        )
        refusal = result.decode() if isinstance(result, bytes) else str(result)
        if refusal == "max_concurrent":
            return f"max_concurrent reached ({trunk.max_concurrent}, all workers)", ""
        if refusal == "max_cps":
            return f"max_cps reached ({cps:g}/s, all workers)", ""
        return None, key

    async def release(self, trunk: str, key: str) -> None:
        await self.redis.zrem(f"{self.prefix}:{trunk}:active", key)

    async def admit_call(self, number: str, budget: CallBudget) -> str | None:
        if budget.per_hour is None and budget.per_number_per_hour is None:
            return None
        result = await self._admit(
            keys=[f"{self.calls_prefix}:all", f"{self.calls_prefix}:to:{number}"],
            args=[
                int(time.time() * 1000),
                int(HOUR * 1000),
                budget.per_hour if budget.per_hour is not None else -1,
                budget.per_number_per_hour if budget.per_number_per_hour is not None else -1,
                uuid.uuid4().hex,
            ],
        )
        which = result.decode() if isinstance(result, bytes) else str(result)
        if which == "all":
            return budget.refusal(budget.per_hour or 0, 0)
        if which == "number":
            return budget.refusal(0, budget.per_number_per_hour or 0)
        return None

    async def close(self) -> None:
        await self.redis.aclose()
