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
from gateway.softphone import Softphone, load_script, run_script
from tests.integration.peers import ackline_cli, call_results, cli_env, free_port, serve_gateway

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
    with serve_gateway(tmp_path) as (port, proc):
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
        calls = call_results(proc)
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
    with serve_gateway(tmp_path, "--timeout", "20") as (port, proc):
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
    assert hangup["ok"] is False, report
    assert "expect_hangup" in hangup["step"], report


def test_bad_script_is_a_clear_error(tmp_path: Path) -> None:
    code, _, err = run_softphone(
        tmp_path, {"call": "sip:x@127.0.0.1:5", "steps": [{"dtmf": "1", "method": "smoke"}]}
    )
    assert code == 2
    assert "steps.0" in err, err
    assert "method" in err, err


async def test_softphone_answers_and_presses_2_for_our_gateway() -> None:
    tone = (np.sin(np.arange(8000) * 2 * np.pi * 440 / 8000) * 8000).astype(np.int16)
    async with Softphone() as phone, Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        host, port = phone.address

        async def callee() -> tuple[float, str | None]:
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


def _tone_wav(path: Path, hz: float, rate: int, channels: int) -> Path:
    t = np.arange(rate) / rate  # one second
    mono = (np.sin(2 * np.pi * hz * t) * 12000).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.repeat(mono, channels).tobytes())
    return path


@pytest.mark.parametrize("expected_digits", ["42", "24"])
async def test_answering_script_speaks_a_wav_file_and_checks_the_keys_it_got(
    tmp_path: Path, expected_digits: str
) -> None:
    """`play:` sends a 16 kHz stereo WAV (found next to the script) as 8 kHz audio, and
    `expect: {digits}` passes only for the keys the caller really pressed, in order."""
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    _tone_wav(scripts / "tone.wav", 1000, 16000, 2)
    port = free_port()
    (scripts / "answer.yaml").write_text(yaml.safe_dump({
        "answer": True, "listen": f"127.0.0.1:{port}", "ring_timeout": 10,
        "steps": [{"play": "tone.wav"}, {"expect_hangup": 10}],
        "expect": {"digits": expected_digits, "hangup_by": "remote"},
    }))  # fmt: skip
    script = load_script(scripts / "answer.yaml")
    running = asyncio.create_task(run_script(script))
    heard: list[np.ndarray] = []
    async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        await asyncio.sleep(0.3)  # the script's phone is listening
        call = await gateway.dial(f"sip:qa@127.0.0.1:{port}", ring_timeout=5)
        assert call.answered
        assert call.media is not None
        call.media.add_audio_listener(lambda pcm: heard.append(pcm.copy()))
        await asyncio.sleep(1.3)  # the phone plays its one-second file
        await call.send_digits("42")
        await asyncio.sleep(0.3)
        await call.hangup()
        report = await asyncio.wait_for(running, 15)
    pcm = np.concatenate(heard)
    loud = pcm[np.abs(pcm) > 3000]
    assert len(loud) > 4000  # most of a second of tone, at 8 kHz
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    assert abs(np.fft.rfftfreq(len(pcm), 1 / 8000)[int(np.argmax(spectrum[1:])) + 1] - 1000) < 20
    [play, hangup, *checks] = report.steps
    assert play.ok, report
    assert "to the end" in play.detail, report
    assert hangup.ok, report
    digits = next(c for c in checks if c.step == "expect digits")
    assert digits.ok is (expected_digits == "42")
    assert digits.detail == "received '42'"
    assert report.ok is (expected_digits == "42")


def test_a_missing_wav_file_is_a_bad_script(tmp_path: Path) -> None:
    code, _, err = run_softphone(
        tmp_path, {"call": "sip:x@127.0.0.1:5", "steps": [{"play": "nowhere.wav"}]}
    )
    assert code == 2
    assert "steps.0.play" in err, err
    assert "nowhere.wav" in err, err
