"""`make test` runs the fuzz bench in miniature: the same code as `make fuzz` (a real
`ackline serve`, its own network namespace), with 2,000 SIP inputs over UDP and TCP, the
RFC 4475 messages, 20 INVITEs with odd SDP, a few hundred RTP packets to a live call and
schemathesis with one valid and one invalid case per operation; every check of the
bench's verdict must hold (no crash, no traceback, growth within bounds, no hang, no 5xx,
a real call afterwards, a stop within the drain timeout)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]


def test_fuzz_bench_in_miniature(tmp_path: Path) -> None:
    report = tmp_path / "fuzz.json"
    cmd = [sys.executable, "-m", "bench.fuzz", "--sip", "2000", "--sdp", "20", "--rtp", "300",
           "--api-examples", "1", "--prime", "0", "--settle", "0", "--t1", "0.1",
           "--time-limit", "120",
           "--workdir", str(tmp_path / "run"), "--json", str(report), "--quiet"]  # fmt: skip
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=220)
    assert report.exists(), f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    result = json.loads(report.read_text())
    failed = [f"{c['name']}: {c['detail']}" for c in result["checks"] if not c["ok"]]
    assert not failed, f"{failed}\n\n{done.stdout}"
    assert done.returncode == 0, done.stdout
    inputs = result["inputs"]
    assert inputs["SIP inputs made"] == 2000
    assert inputs["SIP over UDP"] > 1000
    assert inputs["SIP over TCP"] > 100
    assert inputs["INVITEs with odd SDP"] == 20
    assert inputs["RTP/RTCP/RFC 4733 packets"] >= 300
    assert inputs["HTTP requests"] > 0
    assert len(result["torture"]) >= 45
