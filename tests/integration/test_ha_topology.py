"""Two complete ackline nodes behind HAProxy (bench/ha.py), under a steady alert load:
a node killed -9 leaves its chains to the other node, and a rolling restart of every node
fails no request and cuts no call short; an inbound call reaches either node; a drill
attached to a topology `make ha` left running leaves it running and whole. The drills run
here in miniature (one PostgreSQL, one Redis: their failover has tests of its own);
`ackline drill` runs them in full."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.chaos import Progress
from bench.drill import DrillParams, Scenario, run
from bench.drill import main as drill_main
from bench.ha import HaParams, PgMode, RedisMode, Topology
from bench.services import REPO, Services, group_running
from tests.integration.peers import dtmf_pcap, sipp

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
    assert f.accepted == 120, outcome.markdown
    assert f.rpo_alerts == 0, outcome.markdown
    assert all(c["ok"] for c in f.checks), outcome.markdown
    assert f.ingest_rto <= 5, outcome.markdown
    assert f.dispatch_rto <= 5, outcome.markdown
    # the killed node had calls in flight: another node placed them again (a re-send or a
    # call_interrupted result each), within the duplicate bound the checks verified
    assert f.calls_cut_short >= 1, outcome.markdown
    assert f.passed, outcome.markdown
    assert outcome.report_files[0].read_text().startswith("# Drill `node-crash`: PASS")


@pytest.mark.timeout(420)
def test_rolling_restart_fails_no_request_and_cuts_no_call(tmp_path: Path) -> None:
    outcome = run(_drill(Scenario.ROLLING_RESTART, tmp_path, duration=45, rate=4, at=3))
    f = outcome.figures
    assert f.accepted == 180, outcome.markdown
    assert f.rpo_alerts == 0, outcome.markdown
    assert f.failed_requests == 0, outcome.markdown
    assert f.calls_cut_short == 0, outcome.markdown
    assert f.passed, outcome.markdown


@pytest.mark.timeout(180)
async def test_an_inbound_call_reaches_either_node_and_the_survivor_of_a_crash(
    tmp_path: Path,
) -> None:
    """Carriers are given every node's SIP address (two trunk hosts, or DNS SRV): each
    node answers the hotline on its own, and with one node killed the other still does."""
    params = HaParams(nodes=2, pg=PgMode.SINGLE, redis=RedisMode.SINGLE, progress=False)
    services = Services()
    try:
        top = Topology(params, services, tmp_path / "ha", Progress(False))
        await top.start()

        def call(node_index: int, name: str) -> None:
            workdir = tmp_path / name
            workdir.mkdir()
            port = top.nodes[node_index].sip_port
            with sipp("uac_dtmf.xml", workdir, remote=f"127.0.0.1:{port}",
                      PCAP=str(dtmf_pcap("1")), PAUSE_MS="1000") as peer:  # fmt: skip
                # SIPp succeeds only if the node answered, heard the digit and hung up
                assert peer.wait(timeout=40) == 0, peer.logs()

        await asyncio.to_thread(call, 0, "to-a")
        await asyncio.to_thread(call, 1, "to-b")
        top.crash_node(top.nodes[0])
        await asyncio.to_thread(call, 1, "to-b-after-crash")
    finally:
        services.close()


def _bench_ha(command: str, workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "bench.ha", command, "--workdir", str(workdir), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


def _groups(workdir: Path) -> list[tuple[str, int]]:
    """(name, process group) of every process the state file lists."""
    state: dict[str, Any] = json.loads((workdir / "state.json").read_text())
    return [(p["name"], p["pid"]) for p in state["processes"]]


@pytest.mark.timeout(240)
def test_a_drill_attached_to_a_running_topology_leaves_it_running_and_whole(
    tmp_path: Path,
) -> None:
    """`make ha`, then `ackline drill node-crash --attach DIR`: the killed node is back
    under a new pid the state file names, so `status` finds everything up and `down`
    stops everything, the replacement included."""
    workdir = tmp_path / "ha"
    up = _bench_ha("up", workdir, "--pg", "single", "--redis", "single")
    assert up.returncode == 0, up.stderr
    try:
        before = _groups(workdir)
        outcome = run(DrillParams(Scenario.NODE_CRASH, duration=20, rate=4, at=6, down=5,
                                  report_dir=tmp_path / "reports", attach=workdir,
                                  progress=False))  # fmt: skip
        f = outcome.figures
        assert f.accepted == 80, outcome.markdown
        assert f.rpo_alerts == 0, outcome.markdown
        assert f.passed, outcome.markdown
        status = _bench_ha("status", workdir)
        assert status.returncode == 0, status.stdout
        after = _groups(workdir)
        assert [name for name, pid in after if (name, pid) not in before] == ["node-a"]
        os.killpg(dict(after)["haproxy"], signal.SIGKILL)  # a part missing: refused
        assert drill_main(["node-crash", "--attach", str(workdir)]) == 2
    finally:
        down = _bench_ha("down", workdir)
    assert down.returncode == 0, down.stderr
    assert not [name for name, pid in after if group_running(pid)]
    assert drill_main(["node-crash", "--attach", str(workdir)]) == 2  # no state file now
