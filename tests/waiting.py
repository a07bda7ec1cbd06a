"""Waiting in async tests for state that has no event to await (a fake's counters, a
peer's log, weakrefs): the condition is polled, with a deadline that fails the test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    what: str = "the condition",
    *,
    interval: float = 0.01,
) -> None:
    """Return once `predicate()` is true; TimeoutError naming `what` after `timeout` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
