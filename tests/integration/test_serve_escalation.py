"""`ackline serve` end to end: an alert posted over HTTP rings a SIPp phone, the keypress
acknowledges it and nothing else is paged; a busy phone falls back channel by channel.

The service runs as a real subprocess (API + worker + gateway in one, on SQLite); SIPp is
the far end of the call; Telegram and Twilio are local servers speaking their wire format.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest
import yaml

from tests.conftest_escalation import REDIS_URL
from tests.fakes.telegram_server import FakeTelegram
from tests.fakes.twilio_server import FakeTwilio
from tests.integration.peers import (
    ackline_cli,
    cli_env,
    dtmf_pcap,
    free_port,
    popen_logged,
    sipp,
)

pytestmark = pytest.mark.interop
pytest_plugins = ["tests.conftest_escalation"]

KEY = {"X-API-Key": "k-acme"}
ALICE = "+14155550101"


def serve_logs(log_dir: Path) -> str:
    """What every `ackline serve` process printed, for a failure message."""
    return "\n".join(f"--- {f.name}\n{f.read_text()}" for f in sorted(log_dir.glob("serve-*.log")))


@dataclass
class Service:
    procs: list[subprocess.Popen[bytes]]
    client: httpx.AsyncClient
    audit: Path
    log_dir: Path
    sip_port: int = 0  # the first process's

    async def post_alert(self, policy: str) -> str:
        body = {"title": "Database down on eu-1", "summary": "primary unreachable"}
        r = await self.client.post("/v1/alerts", json={**body, "policy": policy}, headers=KEY)
        assert r.status_code == 202, r.text
        alert_id: str = r.json()["id"]
        return alert_id

    async def until(
        self, alert_id: str, done: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            r = await self.client.get(f"/v1/alerts/{alert_id}", headers=KEY)
            assert r.status_code == 200, r.text
            data: dict[str, Any] = r.json()
            if done(data) or time.monotonic() > deadline:
                return data
            assert all(p.poll() is None for p in self.procs), "ackline serve died:\n" + self.logs()
            await asyncio.sleep(0.1)

    def logs(self) -> str:
        return serve_logs(self.log_dir)

    def audit_lines_all(self) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        return [json.loads(x) for x in self.audit.read_text().splitlines() if x.strip()]

    def audit_lines(self, alert_id: str) -> list[dict[str, Any]]:
        return [x for x in self.audit_lines_all() if x.get("alert_id") == alert_id]


@contextlib.asynccontextmanager
async def serve(
    tmp: Path,
    config: dict[str, Any],
    env: dict[str, str],
    roles: tuple[str, ...] = ("all",),
) -> AsyncIterator[Service]:
    """Start one `ackline serve` process per role; the first one must serve the API."""
    (tmp / "ackline.yaml").write_text(yaml.safe_dump(config))
    http_port = free_port()
    full_env = {
        **cli_env(tmp),
        "ACKLINE_DATABASE_URL": f"sqlite:///{tmp}/ackline.db",
        "ACKLINE_CONFIG": str(tmp / "ackline.yaml"),
        "ACKLINE_API_KEYS": "k-acme:acme",
        "ACKLINE_AUDIT_DIR": str(tmp / "audit"),
        "ACKLINE_POLL_INTERVAL": "0.2",
        # "{http_port}" in a value: the API's port (e.g. ACKLINE_PUBLIC_URL for webhooks)
        **{k: v.replace("{http_port}", str(http_port)) for k, v in env.items()},
    }
    if "REDIS_URL" not in env:
        full_env.pop("REDIS_URL", None)
    procs: list[subprocess.Popen[bytes]] = []
    sip_ports = [free_port() for _ in roles]
    try:
        for role, sip_port in zip(roles, sip_ports, strict=True):
            cmd = [*ackline_cli(), "serve", "--role", role, "--port", str(sip_port),
                   "--http-port", str(http_port)]  # fmt: skip
            procs.append(popen_logged(cmd, tmp / f"serve-{role}.log", env=full_env, cwd=tmp))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}", timeout=5) as c:
            deadline = time.monotonic() + 30
            while True:
                dead = [p for p in procs if p.poll() is not None]
                assert not dead, serve_logs(tmp)
                with contextlib.suppress(httpx.TransportError):
                    if (await c.get("/readyz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, "ackline serve did not become ready"
                await asyncio.sleep(0.1)
            yield Service(procs, c, tmp / "audit" / "acme.jsonl", tmp, sip_ports[0])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def recipients(telegram: bool = True) -> list[dict[str, str]]:
    alice = {"id": "alice", "name": "Alice", "phone": ALICE}
    if telegram:
        alice["telegram_chat_id"] = "4242"
    return [alice]


def voice_page_config(**extra: Any) -> dict[str, Any]:
    """Alice, no Telegram, and policy "page": one voice step, then nothing for 10 min."""
    return {
        "company": "acme",
        "recipients": recipients(telegram=False),
        "policies": [
            {"name": "page",
             "steps": [{"recipients": ["alice"], "channels": ["voice"], "delay": "10m"}]},
        ],
        **extra,
    }  # fmt: skip


async def test_keypress_1_acknowledges_and_later_steps_never_fire(tmp_path: Path) -> None:
    config = {
        "company": "acme",
        "recipients": recipients(),
        "policies": [
            {
                "name": "page",
                "steps": [
                    {"recipients": ["alice"], "channels": ["voice"], "delay": "4s"},
                    {"recipients": ["alice"], "channels": ["telegram", "sms"], "delay": "0s"},
                ],
            }
        ],
    }
    async with FakeTelegram() as telegram, FakeTwilio() as twilio:
        account = twilio.add_account(numbers=("+14155550106",))
        env = {
            "TELEGRAM_BOT_TOKEN": telegram.token,
            "TELEGRAM_API_BASE": telegram.url,
            "TWILIO_ACCOUNT_SID": account.sid,
            "TWILIO_AUTH_TOKEN": account.auth_token,
            "TWILIO_FROM_NUMBERS": account.numbers[0],
            "TWILIO_API_BASE": twilio.url,
        }
        scenario = {"CODECS": "0", "RING_MS": "300", "PAUSE_MS": "1000"}
        with sipp(
            "uas_answer_dtmf.xml", tmp_path, PCAP=str(dtmf_pcap("1")), fields=scenario
        ) as uas:
            env["ACKLINE_VOICE_TARGET"] = f"sip:{{number}}@{uas.address}"
            async with serve(tmp_path, config, env) as service:
                alert_id = await service.post_alert("page")
                alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 20)
                assert alert["state"] == "acknowledged", alert
                assert await asyncio.to_thread(uas.wait, 15) == 0, uas.logs()
                await asyncio.sleep(5)  # past step 1's delay: step 2 must not fire
                alert = await service.until(alert_id, lambda a: False, 0)
                audit = service.audit_lines(alert_id)
        assert telegram.requests == []
        assert twilio.requests == []
    assert alert["state"] == "acknowledged"
    [voice] = alert["attempts"]
    assert (voice["channel"], voice["status"], voice["reason"]) == (
        "voice",
        "acknowledged",
        "pressed_1",
    )
    path = [(x["channel"], x["status"]) for x in audit if x.get("channel")]
    assert ("voice", "acknowledged") in path, audit
    assert {x.get("channel") for x in audit} <= {None, "", "voice"}, audit
    assert audit[-1]["status"] == "acknowledged", audit


async def test_busy_phone_retries_with_backoff_then_falls_back_in_order(tmp_path: Path) -> None:
    config = {
        "company": "acme",
        "recipients": recipients(),
        "channel_defaults": {
            "voice": {"attempts": 2, "backoff": "linear", "base": "1s", "factor": 1,
                      "max": "5s", "fallback_channel": "telegram"},
            "telegram": {"attempts": 1, "fallback_channel": "sms"},
        },
        "policies": [
            {"name": "page",
             "steps": [{"recipients": ["alice"], "channels": ["voice"], "delay": "10m"}]},
        ],
    }  # fmt: skip
    async with FakeTelegram() as telegram, FakeTwilio() as twilio:
        telegram.fail_next(400, description="Bad Request: chat not found", match="sendMessage")
        account = twilio.add_account(numbers=("+14155550106",))
        env = {
            "TELEGRAM_BOT_TOKEN": telegram.token,
            "TELEGRAM_API_BASE": telegram.url,
            "TWILIO_ACCOUNT_SID": account.sid,
            "TWILIO_AUTH_TOKEN": account.auth_token,
            "TWILIO_FROM_NUMBERS": account.numbers[0],
            "TWILIO_API_BASE": twilio.url,
        }
        with sipp("uas_reject.xml", tmp_path, calls=2, CODE="486", PHRASE="Busy Here") as uas:
            env["ACKLINE_VOICE_TARGET"] = f"sip:{{number}}@{uas.address}"
            async with serve(tmp_path, config, env) as service:
                alert_id = await service.post_alert("page")
                alert = await service.until(
                    alert_id, lambda a: any(n["channel"] == "sms" for n in a["attempts"]), 20
                )
                alert = await service.until(
                    alert_id,
                    lambda a: all(n["status"] not in ("scheduled", "sending")
                                  for n in a["attempts"]),
                    5,
                )  # fmt: skip
                audit = service.audit_lines(alert_id)
            assert await asyncio.to_thread(uas.wait, 15) == 0, uas.logs()  # both INVITEs
    attempts = [(n["channel"], n["attempt"], n["status"], n["reason"])
                for n in alert["attempts"]]  # fmt: skip
    assert attempts == [
        ("voice", 1, "failed_retryable", "busy"),
        ("voice", 2, "failed_retryable", "busy"),
        ("telegram", 1, "failed_permanent", attempts[2][3]),
        ("sms", 1, "delivered", attempts[3][3]),
    ], attempts
    assert "telegram" in attempts[2][3], attempts
    assert [m["to"] for m in twilio.messages] == [ALICE]
    assert len([r for r in telegram.requests if r.path.endswith("/sendMessage")]) == 1

    # The audit trail alone replays the path, with the configured 1 s backoff between calls.
    results = [x for x in audit if x.get("event") == "result"]
    assert [(x["channel"], x["status"]) for x in results] == [
        ("voice", "failed_retryable"),
        ("voice", "failed_retryable"),
        ("telegram", "failed_permanent"),
        ("sms", "delivered"),
    ], audit
    sent = [x for x in audit if x.get("status") == "sending"]
    assert [x["channel"] for x in sent] == ["voice", "voice", "telegram", "sms"], audit
    first, second = (datetime.fromisoformat(x["ts"]) for x in sent[:2])
    assert (second - first).total_seconds() >= 1.0, sent
    assert any(x.get("event") == "retry" and x["channel"] == "voice" for x in audit), audit
    assert any(x.get("event") == "fallback" and x["channel"] == "voice" for x in audit), audit
    assert await asyncio.to_thread(os.path.getsize, service.audit) > 0


@pytest.mark.parametrize(
    ("scenario", "answered"), [("uas_answer_wait_bye.xml", True), ("uas_ring_cancel.xml", False)]
)
async def test_ack_from_api_hangs_up_the_call_in_progress(
    tmp_path: Path, scenario: str, answered: bool
) -> None:
    """An ack on another channel ends the call at once: BYE while the prompt plays, CANCEL
    while it rings. SIPp's scenario passes only when that request arrives."""
    config = voice_page_config()
    with sipp(scenario, tmp_path) as uas:
        env = {"ACKLINE_VOICE_TARGET": f"sip:{{number}}@{uas.address}"}
        async with serve(tmp_path, config, env) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(
                alert_id, lambda a: [n["status"] for n in a["attempts"]] == ["sending"], 10
            )
            await asyncio.sleep(1.0)  # ringing, or the prompt is playing
            r = await service.client.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
            assert r.status_code == 200, r.text
            acked_at = time.monotonic()
            code = await asyncio.to_thread(uas.wait, 10)
            hung_up_after = time.monotonic() - acked_at
            alert = await service.until(
                alert_id, lambda a: a["attempts"][0]["status"] != "sending", 10
            )
            audit = service.audit_lines(alert_id)
    assert code == 0, uas.logs()  # SIPp saw the BYE (or CANCEL) it waits for
    assert hung_up_after < 3.0, hung_up_after
    assert alert["state"] == "acknowledged"
    assert alert["acked_by"] == "api:acme", alert
    [voice] = alert["attempts"]
    assert voice["status"] == "cancelled", voice
    assert audit[-1]["status"] in ("cancelled", "acknowledged"), audit


async def test_api_and_worker_as_separate_processes_on_postgres_and_redis(
    tmp_path: Path, pg_url: str, redis_prefix: str
) -> None:
    """Scale-out: `--role api` takes the alert, `--role worker` (with its own SIP user agent)
    rings the phone; the keypress acks through the shared PostgreSQL and Redis."""
    config = voice_page_config()
    scenario = {"CODECS": "8", "RING_MS": "100", "PAUSE_MS": "800"}
    with sipp("uas_answer_dtmf.xml", tmp_path, PCAP=str(dtmf_pcap("1")), fields=scenario) as uas:
        env = {
            "ACKLINE_DATABASE_URL": pg_url,
            "REDIS_URL": REDIS_URL,
            "ACKLINE_REDIS_PREFIX": redis_prefix,
            "ACKLINE_VOICE_TARGET": f"sip:{{number}}@{uas.address}",
        }
        async with serve(tmp_path, config, env, roles=("api", "worker")) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 20)
        assert await asyncio.to_thread(uas.wait, 10) == 0, uas.logs()
    assert alert["state"] == "acknowledged", alert
    [voice] = alert["attempts"]
    assert (voice["status"], voice["reason"]) == ("acknowledged", "pressed_1")
    worker_log = (tmp_path / "serve-worker.log").read_text()
    api_log = (tmp_path / "serve-api.log").read_text()
    assert '"digits": "1"' in worker_log, worker_log
    assert '"codec": "PCMA"' in worker_log, worker_log
    assert "sip listening" not in api_log, api_log  # the API process placed no call


async def test_sigterm_drains_a_worker_in_time_and_hands_its_ringing_call_back(
    tmp_path: Path, pg_url: str, redis_prefix: str
) -> None:
    """SIGTERM to a worker whose call is ringing: it exits within its drain timeout, the
    phone gets a CANCEL (not a call left ringing), and the job is released for another
    worker to take at once instead of after its 30 s lease."""
    config = voice_page_config()
    drain = 4.0
    with sipp("uas_ring_cancel.xml", tmp_path) as uas:
        env = {
            "ACKLINE_DATABASE_URL": pg_url,
            "REDIS_URL": REDIS_URL,
            "ACKLINE_REDIS_PREFIX": redis_prefix,
            "ACKLINE_VOICE_TARGET": f"sip:{{number}}@{uas.address}",
            "ACKLINE_VOICE_RING_TIMEOUT": "120",
            "ACKLINE_DRAIN_TIMEOUT": str(drain),
        }
        async with serve(tmp_path, config, env, roles=("api", "worker")) as service:
            alert_id = await service.post_alert("page")
            await service.until(
                alert_id, lambda a: a["attempts"] and a["attempts"][0]["status"] == "sending", 20
            )
            worker = service.procs[1]
            await asyncio.sleep(0.5)  # the phone is ringing
            stopped = time.monotonic()
            worker.terminate()
            code = await asyncio.to_thread(worker.wait, 30)
            took = time.monotonic() - stopped
            log = service.logs()
            assert code == 0, log
            assert took < drain + 1.5, f"the worker took {took:.1f} s to stop\n{log}"
            conn = await asyncpg.connect(pg_url)
            try:
                job = await conn.fetchrow(
                    "SELECT owner, lease_until, done FROM jobs WHERE alert_id = $1 "
                    "AND kind = 'send'", alert_id,
                )  # fmt: skip
            finally:
                await conn.close()
            assert tuple(job) == (None, None, False)  # free for the next worker
        assert await asyncio.to_thread(uas.wait, 10) == 0, uas.logs()  # CANCEL, 487, ACK


async def test_alert_call_fails_over_across_carrier_trunks_and_audits_health(
    tmp_path: Path,
) -> None:
    """With a `carriers:` section the voice channel routes through the trunks: a carrier
    answering 503 is skipped for the next one, whose callee presses 1; a dead trunk is
    probed down and that is written to the audit trail."""
    dead_port = free_port()  # nothing listens there
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        sipp("carrier_reject.xml", tmp_path / "a", calls=100, CODE="503", PHRASE="Down") as broken,
        sipp("carrier_answer_dtmf.xml", tmp_path / "b", calls=100, RING_MS="100",
             PAUSE_MS="800", PCAP=str(dtmf_pcap("1"))) as healthy,
    ):  # fmt: skip
        config = voice_page_config(
            carriers={
                "allowed_countries": ["US"],
                "probe": {"interval": "300ms", "down_after": 2, "up_after": 2},
                "trunks": [
                    {"name": "dead", "host": "127.0.0.1", "port": dead_port, "priority": 0,
                     "trying_timeout": "300ms"},
                    {"name": "broken", "host": "127.0.0.1", "port": broken.port, "priority": 1},
                    {"name": "healthy", "host": "127.0.0.1", "port": healthy.port,
                     "priority": 2},
                ],
            }
        )  # fmt: skip
        async with serve(tmp_path, config, {}) as service:
            deadline = time.monotonic() + 10
            while not any(x.get("trunk") == "dead" for x in service.audit_lines_all()):
                assert time.monotonic() < deadline, "the dead trunk was never probed down"
                await asyncio.sleep(0.1)
            alert_id = await service.post_alert("page")
            alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 20)
            health = [x for x in service.audit_lines_all() if x.get("event") == "trunk_health"]
            [result] = [x for x in service.audit_lines(alert_id) if x.get("event") == "result"]
    assert alert["state"] == "acknowledged", alert
    [voice] = alert["attempts"]
    assert (voice["status"], voice["reason"]) == ("acknowledged", "pressed_1")
    # the audit line of the result names the route: the 503 trunk, then the healthy one
    # (the dead trunk was already down, so it was not tried)
    assert result["details"]["trunk"] == "healthy", result
    assert result["details"]["trunks_tried"] == "broken:503,healthy:200", result
    dead = [x for x in health if x["trunk"] == "dead"]
    assert dead, health
    assert dead[0]["status"] == "down", health
    assert dead[0]["aspect"] == "probe", health
    invites = (tmp_path / "a").glob("*_messages.log")
    assert any("INVITE sip:+14155550101@" in p.read_text() for p in invites)  # tried first


async def test_policy_with_amd_counts_a_voicemail_as_not_acknowledged(tmp_path: Path) -> None:
    """voice: {amd: true} on a policy: a voicemail greeting (generated with espeak-ng and a
    beep, played by SIPp) is classified as a machine, a message is left, and the chain
    goes on (not acknowledged)."""
    from tests.integration.pcap import write_pcmu_pcap
    from tests.ivr_audio import MACHINE_CLIPS, load, render

    greeting = write_pcmu_pcap(tmp_path / "vm.pcap", load(render(MACHINE_CLIPS[0], tmp_path)))
    config = {
        "company": "acme",
        "recipients": recipients(telegram=False),
        "channel_defaults": {"voice": {"attempts": 1}},
        "policies": [
            {"name": "page", "voice": {"amd": True, "machine_message": "Please call back."},
             "steps": [{"recipients": ["alice"], "channels": ["voice"], "delay": "10m"}]},
        ],
    }  # fmt: skip
    with sipp("ivr_uas_greeting.xml", tmp_path, PAUSE_MS="0", PCAP=str(greeting)) as uas:
        env = {"ACKLINE_VOICE_TARGET": f"sip:{{number}}@{uas.address}"}
        async with serve(tmp_path, config, env) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(
                alert_id, lambda a: a["attempts"] and a["attempts"][0]["status"] != "sending", 40
            )
        assert await asyncio.to_thread(uas.wait, 10) == 0, uas.logs()  # our BYE came
    [voice] = alert["attempts"]
    assert (voice["status"], voice["reason"]) == ("not_acknowledged", "answering_machine")
    assert alert["state"] != "acknowledged"


def test_a_policy_with_a_broken_flow_file_stops_serve_at_start(tmp_path: Path) -> None:
    config = {
        "company": "acme",
        "recipients": recipients(telegram=False),
        "policies": [{"name": "page", "voice": {"flow": str(tmp_path / "missing.yaml")},
                      "steps": [{"recipients": ["alice"], "channels": ["voice"]}]}],
    }  # fmt: skip
    (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(config))
    env = {**cli_env(tmp_path), "ACKLINE_CONFIG": str(tmp_path / "ackline.yaml"),
           "ACKLINE_VOICE_TARGET": "sip:{number}@127.0.0.1:9",
           "ACKLINE_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}  # fmt: skip
    proc = subprocess.run(
        [*ackline_cli(), "serve", "--port", str(free_port()), "--http-port", str(free_port())],
        capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "missing.yaml" in proc.stderr
    assert "cannot read the flow" in proc.stderr
