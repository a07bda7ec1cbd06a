"""`make chaos` in miniature, so a regression fails `make test`: the same bench
(bench/chaos.py: its own PostgreSQL, Redis, SIPp carrier, `ackline serve` API and two
workers) for ten seconds at two alerts a second, with a worker killed -9 and Redis
killed -9 and restarted. Every check of the full run must hold: no alert lost or stuck,
no 500, duplicates within the bound, no repeated audit line, every call hung up."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import Params, describe, parse_faults, run

pytestmark = pytest.mark.interop


def test_chaos_smoke_worker_and_redis_killed(tmp_path: Path) -> None:
    params = Params(
        duration=10,
        rate=2,
        faults=parse_faults("worker@2:1,redis@5:2"),
        max_duration=12,
        lease=5,
        settle=8,  # slack on a loaded machine; costs nothing when every alert ends in time
        workdir=tmp_path,
        progress=False,
    )
    outcome = run(params)
    failed = [c.name for c in outcome.report.checks if not c.ok]
    assert outcome.report.total.accepted > 0, describe(outcome)
    assert not failed, f"failed: {failed}\n{describe(outcome)}"
