"""Two complete ackline nodes behind HAProxy (bench/ha.py), under a steady alert load:
a node killed -9 leaves its chains to the other node, and a rolling restart of every node
fails no request and cuts no call short. The drills run here in miniature (one PostgreSQL,
one Redis: their failover has tests of its own); `ackline drill` runs them in full."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.drill import DrillParams, Scenario, run
from bench.ha import PgMode, RedisMode

pytest_plugins = ["tests.conftest_escalation"]


def _drill(scenario: Scenario, tmp_path: Path, **kw: float) -> DrillParams:
    return DrillParams(
        scenario, pg=PgMode.SINGLE, redis=RedisMode.SINGLE, report_dir=tmp_path / "reports",
        workdir=tmp_path / "work", progress=False, **kw,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.timeout(420)
def test_node_crash_its_chains_continue_on_the_other_node(tmp_path: Path) -> None:
    outcome = run(_drill(Scenario.NODE_CRASH, tmp_path, duration=30, rate=4, at=8, down=8))
    f = outcome.figures
    assert f.accepted == 120 and f.rpo_alerts == 0, outcome.markdown
    assert all(c["ok"] for c in f.checks), outcome.markdown
    assert f.ingest_rto <= 5 and f.dispatch_rto <= 5, outcome.markdown
    # the killed node had calls in flight: another node placed them again (a re-send or a
    # call_interrupted result each), within the duplicate bound the checks verified
    assert f.calls_cut_short >= 1, outcome.markdown
    assert f.passed, outcome.markdown
    assert outcome.report_files[0].read_text().startswith("# Drill `node-crash`: PASS")


@pytest.mark.timeout(420)
def test_rolling_restart_fails_no_request_and_cuts_no_call(tmp_path: Path) -> None:
    outcome = run(_drill(Scenario.ROLLING_RESTART, tmp_path, duration=45, rate=4, at=3))
    f = outcome.figures
    assert f.accepted == 180 and f.rpo_alerts == 0, outcome.markdown
    assert f.failed_requests == 0, outcome.markdown
    assert f.calls_cut_short == 0, outcome.markdown
    assert f.passed, outcome.markdown
