"""Trunk health as every calling process sees it, shared through Redis for the API.

Each process that places calls keeps its own view of every trunk (OPTIONS probes, the
circuit breaker, answer-seizure ratio). In scale-out those processes are the workers, not
the API an admin asks. So every few seconds each of them writes its view, with the time,
under its own field of one Redis hash; the API reads the hash and leaves out views older
than `max_age` (a worker that died without taking its own away). A worker that stops
cleanly removes its field at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import RedisError

from carriers.router import CarrierRouter

__all__ = ["SharedTrunkHealth", "process_name", "publish_trunk_health"]

logger = logging.getLogger(__name__)

PUBLISH_INTERVAL = 2.0  # seconds between a worker's reports
MAX_AGE = 10.0  # a report older than this is a worker that is gone


def process_name() -> str:
    """Which process a report comes from, as an admin can find it: host and pid."""
    return f"{socket.gethostname()}/{os.getpid()}"


class SharedTrunkHealth:
    """One Redis hash, `<prefix>:trunk-health`: process -> {"at", "trunks": {name: report}}."""

    def __init__(self, redis: Any, prefix: str, process: str) -> None:
        self.redis = redis
        self.key = f"{prefix}:trunk-health"
        self.process = process

    async def publish(
        self, reports: Mapping[str, Mapping[str, Any]], now: float | None = None
    ) -> None:
        at = time.time() if now is None else now
        await self.redis.hset(self.key, self.process, json.dumps({"at": at, "trunks": reports}))

    async def withdraw(self) -> None:
        await self.redis.hdel(self.key, self.process)

    async def read(
        self, max_age: float = MAX_AGE, now: float | None = None
    ) -> dict[str, dict[str, Any]]:
        """Every live process's report, by process; stale ones are removed as they are
        met, so the hash does not collect dead workers. Redis being away reads as no
        reports (logged): the trunks' settings must stay readable without it."""
        try:
            return await self._read(max_age, time.time() if now is None else now)
        except (OSError, RedisError) as exc:
            logger.warning("workers' trunk health unavailable: %s", exc)
            return {}

    async def _read(self, max_age: float, at: float) -> dict[str, dict[str, Any]]:
        live: dict[str, dict[str, Any]] = {}
        stale: list[Any] = []
        for field, raw in (await self.redis.hgetall(self.key)).items():
            name = field.decode() if isinstance(field, bytes) else str(field)
            try:
                report = json.loads(raw)
                fresh = at - float(report["at"]) <= max_age
            except (ValueError, TypeError, KeyError):
                fresh = False
            if fresh:
                live[name] = report
            else:
                stale.append(field)
        if stale:
            await self.redis.hdel(self.key, *stale)
        return live


async def publish_trunk_health(
    shared: SharedTrunkHealth, router: CarrierRouter, interval: float = PUBLISH_INTERVAL
) -> None:
    """Report `router`'s view every `interval` seconds until cancelled, then withdraw it.
    Redis being away costs a report, never the calls."""
    try:
        while True:
            reports = {t.name: router.health_report(t.name) for t in router.trunks}
            try:
                await shared.publish(reports)
            except (OSError, RedisError) as exc:
                logger.info("trunk health not shared this time: %s", exc)
            await asyncio.sleep(interval)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.shield(shared.withdraw())
