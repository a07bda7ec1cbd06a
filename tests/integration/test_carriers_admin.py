"""Telecom admins change trunks at run time: the API and the CLI write overrides, the
running worker applies them to the next call without a restart; every change is audited
and no password is ever shown."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.peers import ackline_cli, cli_env, dtmf_pcap, free_port, sipp
from tests.integration.test_serve_escalation import KEY, recipients, serve

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]


def config(primary: int, secondary: int) -> dict[str, Any]:
    return {
        "company": "acme",
        "recipients": recipients(telegram=False),
        "channel_defaults": {"voice": {"attempts": 1}},
        "policies": [{"name": "page", "steps": [
            {"recipients": ["alice"], "channels": ["voice"], "delay": "10m"}]}],
        "carriers": {"allowed_countries": ["US"], "probe": {"interval": "500ms"}, "trunks": [
            {"name": "primary", "host": "127.0.0.1", "port": primary, "priority": 1,
             "username": "gw", "password": "s3cret-pw"},
            {"name": "secondary", "host": "127.0.0.1", "port": secondary, "priority": 2}]},
    }  # fmt: skip


def cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(tmp), "ACKLINE_CONFIG": str(tmp / "ackline.yaml"),
           "ACKLINE_DATABASE_URL": f"sqlite:///{tmp}/ackline.db",
           "ACKLINE_AUDIT_DIR": str(tmp / "audit")}  # fmt: skip
    return subprocess.run([*ackline_cli(), "carriers", *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=tmp)  # fmt: skip


async def trunk_of_next_call(service: Any) -> str:
    alert_id = await service.post_alert("page")
    deadline = time.monotonic() + 20
    while True:
        results = [x for x in service.audit_lines(alert_id) if x.get("event") == "result"]
        if results:
            trunk: str = results[0]["details"]["trunk"]
            return trunk
        assert time.monotonic() < deadline, "the call never finished"
        await asyncio.sleep(0.1)


async def test_disable_and_enable_a_trunk_without_restart(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    scenario = {"RING_MS": "0", "PAUSE_MS": "200", "PCAP": str(dtmf_pcap("1"))}
    with (
        sipp("carrier_answer_dtmf.xml", tmp_path / "p", calls=200, **scenario) as primary,
        sipp("carrier_answer_dtmf.xml", tmp_path / "s", calls=200, **scenario) as secondary,
    ):
        async with serve(tmp_path, config(primary.port, secondary.port), {}) as service:
            r = await service.client.get("/v1/carriers", headers=KEY)
            assert r.status_code == 200, r.text
            listed = {t["name"]: t for t in r.json()}
            assert "s3cret-pw" not in r.text and listed["primary"]["has_password"] is True
            assert listed["primary"]["health"]["probe"] == "up"
            assert await trunk_of_next_call(service) == "primary"

            r = await service.client.patch(
                "/v1/carriers/primary", json={"enabled": False}, headers=KEY
            )
            assert r.status_code == 200 and r.json()["enabled"] is False, r.text
            await asyncio.sleep(2.5)  # workers poll the overrides every 2 s
            assert await trunk_of_next_call(service) == "secondary"

            listed_cli = cli(tmp_path, "list", "--json")
            assert listed_cli.returncode == 0, listed_cli.stderr
            rows = {t["name"]: t for t in json.loads(listed_cli.stdout)}
            assert rows["primary"]["enabled"] is False
            assert rows["primary"]["overrides"] == {"enabled": False}
            assert "s3cret-pw" not in listed_cli.stdout

            enabled = cli(tmp_path, "enable", "primary")
            assert enabled.returncode == 0, enabled.stderr
            await asyncio.sleep(2.5)
            assert await trunk_of_next_call(service) == "primary"

            probe = await service.client.post("/v1/carriers/secondary/test", headers=KEY)
            assert probe.status_code == 200 and probe.json()["ok"] is True, probe.text
            assert probe.json()["sip_code"] == 200

            bad = [
                await service.client.patch("/v1/carriers/nope", json={"enabled": False},
                                           headers=KEY),
                await service.client.patch("/v1/carriers/primary", json={"weight": 0},
                                           headers=KEY),
                await service.client.patch("/v1/carriers/primary", json={"host": "x"},
                                           headers=KEY),
                await service.client.patch("/v1/carriers/primary", json={}, headers=KEY),
                await service.client.get("/v1/carriers"),
            ]  # fmt: skip
            assert [b.status_code for b in bad] == [404, 422, 422, 422, 401]
            changes = [x for x in service.audit_lines_all() if x.get("event") == "trunk_changed"]
    assert [(c["trunk"], c["changes"], c["actor"].split(":")[0]) for c in changes] == [
        ("primary", {"enabled": False}, "api"),
        ("primary", {"enabled": True}, "cli"),
    ], changes
    assert changes[0]["actor"] == "api:acme" and changes[0]["ip"] == "127.0.0.1"


def test_cli_test_probes_every_trunk_and_fails_on_a_dead_one(tmp_path: Path) -> None:
    import yaml

    with sipp("carrier_answer_dtmf.xml", tmp_path, calls=10, RING_MS="0", PAUSE_MS="0",
              PCAP=str(dtmf_pcap("1"))) as live:  # fmt: skip
        cfg = config(live.port, free_port())
        cfg["carriers"]["trunks"][1]["trying_timeout"] = "300ms"
        (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(cfg))
        proc = cli(tmp_path, "test", "--json")
    assert proc.returncode == 1, proc.stderr
    results = {r["trunk"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert results["primary"]["ok"] is True and results["primary"]["sip_code"] == 200
    assert results["secondary"]["ok"] is False
    unknown = cli(tmp_path, "disable", "nope")
    assert unknown.returncode == 2 and "no trunk 'nope'" in unknown.stderr
