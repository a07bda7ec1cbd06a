"""The QA softphone driving real call flows: `ackline serve` answering it, and our gateway
calling it. Each script's pass/fail must follow what really happened on the call."""

from __future__ import annotations

import asyncio
import json
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from gateway.call import Gateway, GatewayConfig
from gateway.softphone import Softphone
from tests.integration.peers import ackline_cli, cli_env
from tests.integration.test_serve_inbound_sipp import results, serve

pytestmark = pytest.mark.interop


def run_softphone(tmp: Path, script: dict[str, Any]) -> tuple[int, dict[str, Any], str]:
    path = tmp / "script.yaml"
    path.write_text(yaml.safe_dump(script))
    proc = subprocess.run(
        [*ackline_cli(), "softphone", str(path), "--json"],
        capture_output=True,
        text=True,
        env=cli_env(tmp),
        timeout=60,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


@pytest.mark.parametrize("method", ["rfc4733", "sip_info", "inband"])
def test_script_presses_key_after_greeting_and_sees_hangup(tmp_path: Path, method: str) -> None:
    with serve(tmp_path) as (port, proc):
        code, report, err = run_softphone(
            tmp_path,
            {
                "call": f"sip:hotline@127.0.0.1:{port}",
                "steps": [
                    {"wait_audio": 10},
                    {"wait_silence": 15, "min_ms": 600},
                    {"dtmf": "7", "method": method},
                    {"expect_hangup": 8},
                ],
                "record": str(tmp_path / "heard.wav"),
                "expect": {"answered": True, "hangup_by": "remote", "min_heard_ms": 800},
            },
        )
        proc.terminate()
        proc.wait(timeout=10)
        calls = results(proc)
    assert code == 0, (report, err)
    assert report["ok"] is True
    assert [s["ok"] for s in report["steps"]] == [True] * 7, report
    assert report["heard_ms"] >= 800
    with wave.open(str(tmp_path / "heard.wav")) as w:
        assert (w.getframerate(), w.getnchannels()) == (8000, 1)
        assert w.getnframes() >= 8000  # at least the greeting
    [call] = calls  # what the flow under test saw
    assert call["digits"] == "7"
    assert call["dtmf_method"] == method


def test_failed_expectation_fails_the_script(tmp_path: Path) -> None:
    with serve(tmp_path, "--timeout", "20") as (port, proc):
        code, report, err = run_softphone(
            tmp_path,
            {
                "call": f"sip:hotline@127.0.0.1:{port}",
                "steps": [{"wait_audio": 10}, {"expect_hangup": 1}],  # nobody presses a key
            },
        )
        proc.terminate()
        proc.wait(timeout=10)
    assert code == 1, (report, err)
    assert report["ok"] is False
    [audio, hangup] = report["steps"]
    assert audio["ok"] is True
    assert hangup["ok"] is False and "expect_hangup" in hangup["step"], report


def test_bad_script_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = run_softphone(
        tmp_path, {"call": "sip:x@127.0.0.1:5", "steps": [{"dtmf": "1", "method": "smoke"}]}
    )
    assert code == 2
    assert "steps.0" in err and "method" in err, err


async def test_softphone_answers_and_presses_2_for_our_gateway() -> None:
    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    async with Softphone() as phone, Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        host, port = phone.address

        async def callee() -> tuple[float, str]:
            async with phone.answer(timeout=10) as leg:
                waited = await leg.wait_for_audio(timeout=5)
                await leg.send_dtmf("2")
                await leg.wait_hangup(10)
                return waited, leg.call.result.hangup_by if leg.call.result else ""

        answering = asyncio.create_task(callee())
        call = await gateway.dial(f"sip:qa@{host}:{port}", ring_timeout=5)
        assert call.answered
        await call.play(tone)
        digits = await call.collect(1, timeout=5)
        result = await call.hangup()
        waited, hangup_by = await asyncio.wait_for(answering, 10)
    assert digits == "2"
    assert result.dtmf_method == "rfc4733"
    assert waited < 2.0
    assert hangup_by == "remote"
