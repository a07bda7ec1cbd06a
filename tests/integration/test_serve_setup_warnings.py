"""`ackline serve --role api` and `--role worker` say at start-up, on stderr, which channels
they have and every setup warning, one `warning:` line each, before they serve."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.peers import ackline_cli, cli_env, free_port

pytestmark = pytest.mark.timeout(60)

CONFIG = {
    "company": "acme",
    "recipients": [{"id": "bob", "name": "Bob", "email": "bob@example.com"}],
    "policies": [{"name": "critical", "steps": [{"recipients": ["bob"], "channels": ["voice"]}]}],
}


async def startup_lines(tmp: Path, role: str, ready: str) -> list[str]:
    """stderr of `ackline serve --role ROLE` up to the line starting with `ready`."""
    (tmp / "ackline.yaml").write_text(yaml.safe_dump(CONFIG))
    env = {
        **cli_env(tmp),
        "ACKLINE_CONFIG": str(tmp / "ackline.yaml"),
        "ACKLINE_DATABASE_URL": f"sqlite:///{tmp}/ackline.db",
        "ACKLINE_AUDIT_DIR": str(tmp / "audit"),
        "ACKLINE_API_KEYS": "k:acme",
    }
    for name in ("REDIS_URL", "ACKLINE_VOICE_TARGET", "TWILIO_ACCOUNT_SID", "TELEGRAM_BOT_TOKEN",
                 "SLACK_BOT_TOKEN", "ACKLINE_SMTP_HOST", "ACKLINE_WEBHOOK_SECRET"):  # fmt: skip
        env.pop(name, None)
    proc = await asyncio.create_subprocess_exec(
        *ackline_cli(), "serve", "--role", role, "--port", str(free_port()),
        "--http-port", str(free_port()),
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL, env=env, cwd=tmp,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + 30
    try:
        while not (lines and lines[-1].startswith(ready)):
            remaining = deadline - time.monotonic()
            assert remaining > 0, "no start-up within 30 s:\n" + "\n".join(lines)
            raw = await asyncio.wait_for(proc.stderr.readline(), remaining)
            assert raw, "ackline serve exited:\n" + "\n".join(lines)
            lines.append(raw.decode().rstrip("\n"))
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        await asyncio.wait_for(proc.wait(), 20)
    return lines


@pytest.mark.parametrize(("role", "ready"), [("api", "api listening"), ("worker", "sip listening")])
async def test_serve_prints_each_setup_warning_on_stderr(
    tmp_path: Path, role: str, ready: str
) -> None:
    lines = await startup_lines(tmp_path, role, ready)
    assert "channels: none; not configured: voice, sms, telegram, telegram_voice, slack, " \
        "email, webhook" in lines, lines  # fmt: skip
    warnings = [line for line in lines if line.startswith("warning:")]
    assert warnings[0].startswith("warning: voice has nowhere to ring"), lines
    assert (
        "warning: policy critical step 1 pages on voice, which is not configured: set "
        "ACKLINE_VOICE_TARGET (or voice_target / carriers: trunks in ackline.yaml)"
    ) in warnings, lines
    # the shipped fallbacks of voice: telegram_voice, then sms
    assert [w.split(",")[0] for w in warnings[2:]] == [
        "warning: policy critical: voice falls back to telegram_voice",
        "warning: policy critical: voice falls back to sms",
    ], warnings
