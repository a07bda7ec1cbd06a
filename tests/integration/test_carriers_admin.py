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

from tests.conftest_escalation import REDIS_URL
from tests.integration.peers import ackline_cli, cli_env, dtmf_pcap, free_port, sipp
from tests.integration.test_serve_escalation import KEY, recipients, serve

pytest_plugins = ["tests.conftest_escalation"]
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
    return cli_with(tmp, {}, *args)


def cli_with(tmp: Path, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**cli_env(tmp), "ACKLINE_CONFIG": str(tmp / "ackline.yaml"),
           "ACKLINE_DATABASE_URL": f"sqlite:///{tmp}/ackline.db",
           "ACKLINE_AUDIT_DIR": str(tmp / "audit"), **extra}  # fmt: skip
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
        sipp("carrier_answer_dtmf.xml", tmp_path / "p", calls=200, fields=scenario) as primary,
        sipp("carrier_answer_dtmf.xml", tmp_path / "s", calls=200, fields=scenario) as secondary,
    ):
        async with serve(tmp_path, config(primary.port, secondary.port), {}) as service:
            r = await service.client.get("/v1/carriers", headers=KEY)
            assert r.status_code == 200, r.text
            listed = {t["name"]: t for t in r.json()}
            assert "s3cret-pw" not in r.text
            assert listed["primary"]["has_password"] is True
            assert listed["primary"]["health"]["probe"] == "up"
            assert await trunk_of_next_call(service) == "primary"

            r = await service.client.patch(
                "/v1/carriers/primary", json={"enabled": False}, headers=KEY
            )
            assert r.status_code == 200, r.text
            assert r.json()["enabled"] is False, r.text
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
            assert probe.status_code == 200, probe.text
            assert probe.json()["ok"] is True, probe.text
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
    assert changes[0]["actor"] == "api:acme"
    assert changes[0]["ip"] == "127.0.0.1"


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
    assert results["primary"]["ok"] is True
    assert results["primary"]["sip_code"] == 200
    assert results["secondary"]["ok"] is False
    unknown = cli(tmp_path, "disable", "nope")
    assert unknown.returncode == 2
    assert "no trunk 'nope'" in unknown.stderr


async def test_the_api_shows_each_workers_trunk_health_in_scale_out(
    tmp_path: Path, pg_url: str, redis_prefix: str
) -> None:
    """`--role api` places no calls and probes nothing; the admin still sees how each
    worker sees every trunk (probe, breaker), through Redis, over HTTP and in the CLI;
    a worker that stops takes its report with it."""
    dead = free_port()  # nothing answers there
    (tmp_path / "live").mkdir()
    with sipp("carrier_uas.xml", tmp_path / "live", calls=1000, RING_MS="0") as live:
        cfg = config(live.port, dead)
        cfg["carriers"]["probe"] = {"interval": "300ms", "down_after": 2, "up_after": 2}
        env = {"ACKLINE_DATABASE_URL": pg_url, "REDIS_URL": REDIS_URL,
               "ACKLINE_REDIS_PREFIX": redis_prefix}  # fmt: skip
        async with serve(tmp_path, cfg, env, roles=("api", "worker")) as service:
            worker = service.procs[1]
            deadline = time.monotonic() + 15
            while True:
                r = await service.client.get("/v1/carriers", headers=KEY)
                assert r.status_code == 200, r.text
                trunks = {t["name"]: t for t in r.json()}
                seen = {n: list(t["health_by_process"].values()) for n, t in trunks.items()}
                probes = {n: [h["probe"] for h in views] for n, views in seen.items()}
                if probes == {"primary": ["up"], "secondary": ["down"]}:
                    break
                assert time.monotonic() < deadline, probes
                await asyncio.sleep(0.2)
            assert trunks["primary"]["health"] is None  # the API process has no router
            [process] = trunks["primary"]["health_by_process"]
            assert process.endswith(f"/{worker.pid}"), process
            listed = await asyncio.to_thread(
                cli_with, tmp_path, {"REDIS_URL": REDIS_URL, "ACKLINE_REDIS_PREFIX": redis_prefix,
                                     "ACKLINE_DATABASE_URL": pg_url}, "list", "--json")  # fmt: skip
            assert listed.returncode == 0, listed.stderr
            by_name = {t["name"]: t for t in json.loads(listed.stdout)}
            assert by_name["secondary"]["health_by_process"][process]["probe"] == "down"
            text = await asyncio.to_thread(
                cli_with, tmp_path, {"REDIS_URL": REDIS_URL, "ACKLINE_REDIS_PREFIX": redis_prefix,
                                     "ACKLINE_DATABASE_URL": pg_url}, "list")  # fmt: skip
            assert f"[{process}: probe down, breaker" in text.stdout, text.stdout
            worker.terminate()
            worker.wait(15)
            r = await service.client.get("/v1/carriers", headers=KEY)
    assert all(t["health_by_process"] == {} for t in r.json()), r.json()
