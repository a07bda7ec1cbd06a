"""A stopping API turns unready before it stops serving, which is what lets a load balancer
(HAProxy in bench/ha.py) take it out of rotation without a failed request."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.peers import ackline_cli, cli_env, free_port, popen_logged

pytest_plugins = ["tests.conftest_escalation"]


async def test_a_stopping_api_turns_unready_and_still_serves_for_its_grace(
    tmp_path: Path, pg_url: str
) -> None:
    """SIGTERM with ACKLINE_UNREADY_GRACE=3: /readyz answers 503 `draining` at once while
    alerts are still accepted, and the process exits once the grace is over."""
    port = free_port()
    config = {
        "company": "acme",
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "policies": [{"name": "p", "steps": [{"recipients": ["alice"], "channels": ["voice"]}]}],
    }
    (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(config))
    env = cli_env(tmp_path) | {
        "ACKLINE_CONFIG": str(tmp_path / "ackline.yaml"),
        "ACKLINE_DATABASE_URL": pg_url,
        "ACKLINE_API_KEYS": "k-acme:acme",
        "ACKLINE_UNREADY_GRACE": "3",
        "ACKLINE_DRAIN_TIMEOUT": "4",
        "ACKLINE_EMBEDDED_WORKER": "0",
    }
    cmd = [*ackline_cli(), "serve", "--role", "api", "--http-port", str(port)]
    proc = popen_logged(cmd, tmp_path / "api.log", env=env, cwd=tmp_path)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            for _ in range(300):
                try:
                    if (await client.get("/readyz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the API never became ready:\n" + (tmp_path / "api.log").read_text())
            proc.send_signal(signal.SIGTERM)
            stopped = time.monotonic()
            await asyncio.sleep(0.3)
            ready = await client.get("/readyz")
            assert (ready.status_code, ready.json()["status"]) == (503, "draining")
            alert = {"title": "still served", "policy": "p"}
            posted = await client.post("/v1/alerts", json=alert, headers={"X-API-Key": "k-acme"})
            assert posted.status_code == 202, posted.text
            assert time.monotonic() - stopped < 3
        code = await asyncio.to_thread(proc.wait, 15)
        took = time.monotonic() - stopped
        assert code == 0, (tmp_path / "api.log").read_text()
        assert 3 <= took < 3 + 4 + 2, f"stopped after {took:.1f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
