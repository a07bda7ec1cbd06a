"""The README's quick start, for real: `ackline serve` on the shipped demo configuration,
`ackline softphone examples/answer-and-ack.yaml` answering on loopback, an alert posted
over HTTP is acknowledged by the phone pressing 1. Start-up says which channels are
missing. Only the ports differ from the README (free ones, so tests run side by side)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.peers import ackline_cli, cli_env, free_port
from tests.integration.test_serve_escalation import serve

pytestmark = [pytest.mark.interop, pytest.mark.timeout(150)]
pytest_plugins = ["tests.conftest_escalation"]

ROOT = Path(__file__).resolve().parents[2]
DEMO_PHONE = "127.0.0.1:5070"
CHANNEL_ENV = ("ACKLINE_VOICE_TARGET", "TWILIO_ACCOUNT_SID", "TWILIO_AUTH_TOKEN",
               "TWILIO_FROM_NUMBERS", "TELEGRAM_BOT_TOKEN", "SLACK_BOT_TOKEN",
               "ACKLINE_SMTP_HOST", "ACKLINE_SMTP_FROM", "ACKLINE_WEBHOOK_SECRET")  # fmt: skip


async def read_until(stream: asyncio.StreamReader, prefix: str, timeout: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not (lines and lines[-1].startswith(prefix)):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {prefix!r} within {timeout:g} s: {lines}"
        raw = await asyncio.wait_for(stream.readline(), remaining)
        assert raw, f"the process ended before {prefix!r}: {lines}"
        lines.append(raw.decode().rstrip("\n"))
    return lines


async def test_the_demo_alert_is_acknowledged_by_the_softphone_on_this_machine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in CHANNEL_ENV:  # "no carrier env vars": what a fresh machine has
        monkeypatch.delenv(name, raising=False)
    demo = yaml.safe_load((ROOT / "ackline.demo.yaml").read_text())
    phone = f"127.0.0.1:{free_port()}"
    assert DEMO_PHONE in demo["voice_target"]
    demo["voice_target"] = demo["voice_target"].replace(DEMO_PHONE, phone)
    softphone = await asyncio.create_subprocess_exec(
        *ackline_cli(), "softphone", str(ROOT / "examples" / "answer-and-ack.yaml"),
        "--listen", phone, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=cli_env(tmp_path),
    )  # fmt: skip
    assert softphone.stdout is not None
    assert softphone.stderr is not None
    try:
        await read_until(softphone.stderr, "softphone waiting for a call on " + phone, 30)
        async with serve(tmp_path, demo, {}) as service:
            alert_id = await service.post_alert("critical")
            alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 60)
            startup = (tmp_path / "serve-all.log").read_text().splitlines()
            out, err = await asyncio.wait_for(softphone.communicate(), 40)
    finally:
        with contextlib.suppress(ProcessLookupError):
            softphone.kill()
        await softphone.wait()
    assert alert["state"] == "acknowledged", alert
    assert alert["acked_by"] == "voice:you", alert
    [voice] = alert["attempts"]
    assert (voice["channel"], voice["status"], voice["reason"]) == (
        "voice", "acknowledged", "pressed_1",
    )  # fmt: skip
    assert softphone.returncode == 0, (out, err)
    report = json.loads(out.decode().strip().splitlines()[-1])
    assert report["ok"], report
    assert report["result"]["hangup_by"] == "remote", report
    # start-up said what the demo lacks, and why
    assert (
        "channels: voice; not configured: sms, telegram, telegram_voice, slack, email, webhook"
    ) in startup, startup
    warnings = [line for line in startup if line.startswith("warning:")]
    assert warnings == [
        "warning: policy critical step 2 pages on sms, which is not configured: set "
        "TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_FROM_NUMBERS",
        "warning: policy critical: voice falls back to telegram_voice, which is not "
        "configured: set TELEGRAM_BOT_TOKEN (or change the fallback in channel_defaults)",
    ], startup
