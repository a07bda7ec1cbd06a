"""The shared pacing clock: tick accuracy, absolute deadlines, catch-up and isolation."""

from __future__ import annotations

import asyncio
import math
import time

import numpy as np
import pytest

from gateway.media.pacer import Pacer, PacerStats
from tests.waiting import wait_until


class FakeStream:
    """Records the nominal tick time and the real time of every call."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.nominal: list[float] = []
        self.actual: list[float] = []

    def on_tick(self, now: float) -> None:
        self.nominal.append(now)
        self.actual.append(self.loop.time())


def is_running(pacer: Pacer) -> bool:
    """Read through a call so mypy does not carry narrowing across awaits."""
    return pacer.running


def grid_steps(stream: FakeStream, period: float) -> np.ndarray:
    """Tick-to-tick steps of the nominal times, in periods."""
    return np.diff(np.array(stream.nominal)) / period


async def test_fifty_streams_for_one_second() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(20)
    streams = [FakeStream(loop) for _ in range(50)]
    started = loop.time()
    for s in streams:
        pacer.register(s)
    assert is_running(pacer)
    await asyncio.sleep(1.0)
    await pacer.stop()
    due = (loop.time() - started) / 0.02

    counts = {len(s.nominal) for s in streams}
    assert len(counts) == 1  # every stream is served on every tick
    assert due - 3 <= counts.pop() <= due + 1
    for s in streams:
        # Nominal times sit exactly on the 20 ms grid: no drift, no gaps.
        assert np.allclose(grid_steps(s, 0.02), 1.0)
    # All streams of one tick are served in the same pass.
    assert streams[0].nominal[:40] == streams[-1].nominal[:40]

    jitter = pacer.interval_jitter_ms((50, 99))
    assert set(jitter) == {"p50", "p99"}
    assert all(math.isfinite(v) and v >= 0 for v in jitter.values())
    assert jitter["p50"] < 5.0
    assert jitter["p99"] < 15.0  # generous: shared CI machines
    lateness = pacer.stats.lateness_ms((50, 99))
    assert 0 <= lateness["p50"] < 5.0
    assert pacer.stats.work_ms()["p99"] < 15.0
    assert pacer.stats.ticks >= due - 3
    assert pacer.stats.ticks_skipped == 0


async def test_catches_up_after_blocked_loop_without_drift() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(20, max_catchup=10)
    stream = FakeStream(loop)
    pacer.register(stream)
    await asyncio.sleep(0.1)
    before = len(stream.nominal)
    assert before >= 3
    time.sleep(0.12)  # noqa: ASYNC251 - blocking the loop for six ticks is the test
    await asyncio.sleep(0.2)
    await pacer.stop()

    # Every tick on the grid ran once, none skipped, none duplicated.
    assert np.allclose(grid_steps(stream, 0.02), 1.0)
    assert pacer.stats.ticks_skipped == 0
    assert pacer.stats.ticks_caught_up >= 4
    # The overdue ticks were replayed back to back right after the block...
    actual = np.diff(np.array(stream.actual[before:]))
    assert np.sum(actual < 0.005) >= 4
    # ...so the stream is back on schedule rather than shifted by the block.
    elapsed = stream.nominal[-1] - stream.nominal[0]
    assert stream.actual[-1] - stream.nominal[-1] < 0.01
    assert len(stream.nominal) == round(elapsed / 0.02) + 1


async def test_catch_up_is_bounded_and_stays_on_grid() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(20, max_catchup=3)
    stream = FakeStream(loop)
    pacer.register(stream)
    await asyncio.sleep(0.06)
    time.sleep(0.3)  # noqa: ASYNC251 - blocking the loop fifteen ticks is the test
    await asyncio.sleep(0.1)
    await pacer.stop()

    assert pacer.stats.ticks_skipped >= 10
    steps = grid_steps(stream, 0.02)
    # Skipped ticks leave whole-period holes; the grid itself never shifts.
    assert np.allclose(steps, np.round(steps))
    assert steps.max() >= 10
    assert stream.actual[-1] - stream.nominal[-1] < 0.01


async def test_failing_stream_does_not_stop_others() -> None:
    loop = asyncio.get_running_loop()

    class Broken:
        calls = 0

        def on_tick(self, now: float) -> None:
            Broken.calls += 1
            raise RuntimeError("boom")

    pacer = Pacer(10)
    good = FakeStream(loop)
    pacer.register(Broken())
    pacer.register(good)
    await asyncio.sleep(0.1)
    await pacer.stop()
    assert Broken.calls >= 5
    assert len(good.nominal) >= 5
    assert pacer.stats.stream_errors == Broken.calls


async def test_unregister_from_on_tick_and_idle_stop() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(10)

    class OneShot:
        def __init__(self) -> None:
            self.calls = 0

        def on_tick(self, now: float) -> None:
            self.calls += 1
            pacer.unregister(self)

    first, second = OneShot(), OneShot()
    pacer.register(first)
    pacer.register(second)
    await wait_until(lambda: not pacer.running, 1.0, "the pacer to stop", interval=0.005)
    assert (first.calls, second.calls) == (1, 1)
    assert len(pacer) == 0

    # Registering again restarts the clock lazily.
    stream = FakeStream(loop)
    pacer.register(stream)
    await asyncio.sleep(0.05)
    assert is_running(pacer)
    assert len(stream.nominal) >= 3
    pacer.unregister(stream)
    pacer.unregister(stream)  # absent: no error
    assert not is_running(pacer)
    await pacer.stop()


async def test_explicit_start_and_stop_keep_registrations() -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer(10)
    await pacer.start()
    assert is_running(pacer)
    stream = FakeStream(loop)
    pacer.register(stream)
    await asyncio.sleep(0.03)
    await pacer.stop()
    assert not is_running(pacer)
    count = len(stream.nominal)
    await asyncio.sleep(0.03)
    assert len(stream.nominal) == count
    await pacer.start()
    await asyncio.sleep(0.03)
    assert len(stream.nominal) > count
    await pacer.stop()


def test_stats_ring_is_bounded_and_empty_stats_are_nan() -> None:
    stats = PacerStats(0.02, capacity=4)
    assert all(math.isnan(v) for v in stats.interval_jitter_ms().values())
    for value in (0.02, 0.021, 0.019, 0.02, 0.025, 0.015):
        stats.interval.add(value)
    assert len(stats.interval) == 4
    # Only the last four samples (19, 20, 25, 15 ms) remain: deviations 1, 0, 5, 5 ms.
    assert stats.interval_jitter_ms((0, 100)) == pytest.approx({"p0": 0.0, "p100": 5.0})


def test_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="ptime_ms must be positive"):
        Pacer(0)
    with pytest.raises(ValueError, match="max_catchup must be at least 1"):
        Pacer(20, max_catchup=0)
