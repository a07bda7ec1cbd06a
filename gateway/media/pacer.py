"""One shared pacing clock for every call's outgoing RTP.

Hundreds of concurrent calls each need a frame every 20 ms. A timer per call would mean
hundreds of wake-ups per tick, each drifting on its own; instead one task wakes on absolute
deadlines ``start + n * ptime`` of ``loop.time()`` and lets every registered stream send its
frame. Absolute deadlines keep the long-run rate exact; when the loop was blocked the
missed ticks are replayed immediately (at most ``max_catchup``) so receivers' jitter buffers
refill instead of the whole stream sliding late.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Iterable
from time import perf_counter
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

__all__ = ["PacedStream", "Pacer", "PacerStats"]

logger = logging.getLogger(__name__)


class PacedStream(Protocol):
    """Anything the pacer drives: called once per tick, sends its own datagram."""

    def on_tick(self, now: float) -> None:
        """``now`` is the tick's scheduled deadline on ``loop.time()`` (on the ptime grid,
        so consecutive calls differ by whole ticks even when the loop woke late)."""


class _Ring:
    """Fixed-size float sample buffer; keeps the most recent ``capacity`` samples."""

    def __init__(self, capacity: int) -> None:
        self._data = np.zeros(capacity, dtype=np.float64)
        self._count = 0

    def add(self, value: float) -> None:
        self._data[self._count % len(self._data)] = value
        self._count += 1

    def values(self) -> NDArray[np.float64]:
        return self._data[: min(self._count, len(self._data))].copy()

    def __len__(self) -> int:
        return min(self._count, len(self._data))


def _percentiles(values: NDArray[np.float64], percentiles: Iterable[float]) -> dict[str, float]:
    ps = list(percentiles)
    if len(values) == 0:
        return {f"p{p:g}": math.nan for p in ps}
    return {f"p{p:g}": float(v) for p, v in zip(ps, np.percentile(values, ps), strict=True)}


class PacerStats:
    """Timing of the most recent ticks, for the benchmark and health metrics.

    ``lateness`` is how long after its deadline each tick ran, ``interval`` the time between
    consecutive ticks actually running, ``work`` how long one tick spent in the streams.
    """

    def __init__(self, ptime: float, capacity: int = 8192) -> None:
        self.ptime = ptime
        self.lateness = _Ring(capacity)
        self.interval = _Ring(capacity)
        self.work = _Ring(capacity)
        self.ticks = 0
        self.ticks_skipped = 0  # overdue ticks dropped beyond the catch-up bound
        self.ticks_caught_up = 0  # overdue ticks replayed back to back
        self.stream_errors = 0

    def interval_jitter_ms(self, percentiles: Iterable[float] = (50, 99)) -> dict[str, float]:
        """Percentiles of |interval - ptime| in ms, keyed ``"p50"``, ``"p99"``..."""
        return _percentiles(np.abs(self.interval.values() - self.ptime) * 1000.0, percentiles)

    def lateness_ms(self, percentiles: Iterable[float] = (50, 99)) -> dict[str, float]:
        return _percentiles(self.lateness.values() * 1000.0, percentiles)

    def work_ms(self, percentiles: Iterable[float] = (50, 99)) -> dict[str, float]:
        return _percentiles(self.work.values() * 1000.0, percentiles)


class Pacer:
    """A single asyncio task ticking every ``ptime`` ms on ``loop.time()``; each tick asks
    every registered stream to send its next frame.

    Deadlines are absolute (start + n * ptime) so error does not accumulate; if the loop
    falls behind by more than one tick the due ticks run back to back, at most
    ``max_catchup`` of them, and older ones are skipped rather than letting the grid drift.
    The task starts on the first ``register`` and ends when the last stream unregisters.
    """

    def __init__(
        self,
        ptime_ms: int = 20,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        max_catchup: int = 5,
        stats_capacity: int = 8192,
    ) -> None:
        if ptime_ms <= 0:
            raise ValueError("ptime_ms must be positive")
        if max_catchup < 1:
            raise ValueError("max_catchup must be at least 1")
        self.ptime_ms = ptime_ms
        self.period = ptime_ms / 1000.0
        self.max_catchup = max_catchup
        self._stats_capacity = stats_capacity
        self.stats = PacerStats(self.period, stats_capacity)
        self._reset_interval = False
        # How late ticks have been lately (s): the worst, decaying by half in ~7 s. Streams
        # queued ahead elsewhere (the native sender) size their queues by it.
        self.recent_lateness = 0.0
        self._loop = loop
        self._streams: dict[int, PacedStream] = {}
        self._snapshot: tuple[PacedStream, ...] = ()
        self._failing: set[int] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def __len__(self) -> int:
        return len(self._streams)

    def interval_jitter_ms(self, percentiles: Iterable[float] = (50, 99)) -> dict[str, float]:
        """Shortcut for ``stats.interval_jitter_ms``."""
        return self.stats.interval_jitter_ms(percentiles)

    def reset_stats(self) -> None:
        """Start a fresh measurement window (e.g. once a benchmark's ramp-up is over)."""
        self.stats = PacerStats(self.period, self._stats_capacity)
        self._reset_interval = True

    def register(self, stream: PacedStream) -> None:
        """Start ticking ``stream`` from the next tick (starting the pacer if needed)."""
        self._streams[id(stream)] = stream
        self._snapshot = tuple(self._streams.values())
        if not self.running:
            self._start_task()

    def unregister(self, stream: PacedStream) -> None:
        """Stop ticking ``stream``; safe to call from its own ``on_tick`` and when absent."""
        if self._streams.pop(id(stream), None) is None:
            return
        self._failing.discard(id(stream))
        self._snapshot = tuple(self._streams.values())
        if not self._streams and self._task is not None:
            # Idle: do not keep waking the loop 50 times a second for nobody.
            self._task.cancel()
            self._task = None

    async def start(self) -> None:
        """Start ticking now rather than on the first ``register``."""
        if not self.running:
            self._start_task()

    async def stop(self) -> None:
        """Stop ticking; registered streams stay registered and resume on ``start``."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _start_task(self) -> None:
        loop = self._loop if self._loop is not None else asyncio.get_running_loop()
        self._task = loop.create_task(self._run(loop), name="rtp-pacer")

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        period = self.period
        start = loop.time()
        n = 0  # index of the next tick to run
        previous: float | None = None
        while True:
            delay = start + n * period - loop.time()
            # Always yield, even when late, so datagrams keep being received.
            await asyncio.sleep(max(delay, 0.0))
            now = loop.time()
            last_due = max(n, math.floor((now - start) / period + 1e-9))
            due = last_due - n + 1
            stats = self.stats
            if due > self.max_catchup:
                stats.ticks_skipped += due - self.max_catchup
                n = last_due - self.max_catchup + 1
                due = self.max_catchup
            stats.ticks_caught_up += due - 1
            if self._reset_interval:
                previous, self._reset_interval = None, False
            self.recent_lateness = max(now - (start + n * period), self.recent_lateness * 0.998)
            for _ in range(due):
                deadline = start + n * period
                stats.lateness.add(loop.time() - deadline)
                # Interval and work on perf_counter: uvloop's loop.time() is a millisecond
                # clock read once per loop iteration, too coarse for a 20 ms grid's jitter.
                began = perf_counter()
                if previous is not None:
                    stats.interval.add(began - previous)
                previous = began
                self._tick(deadline)
                stats.work.add(perf_counter() - began)
                stats.ticks += 1
                n += 1

    def _tick(self, deadline: float) -> None:
        streams = self._streams
        for stream in self._snapshot:
            key = id(stream)
            if key not in streams:
                continue  # unregistered earlier in this tick
            try:
                stream.on_tick(deadline)
            except Exception:
                self.stats.stream_errors += 1
                if key not in self._failing:
                    # Log once per stream; one broken call must not silence the others.
                    self._failing.add(key)
                    logger.exception("paced stream %r failed in on_tick", stream)
