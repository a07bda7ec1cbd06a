"""The `twilio` trunk kind end to end: `ackline serve` places the call through the Twilio
REST API (a local server speaking its wire format, driven by the real SDK), Twilio fetches
the ack flow as TwiML from our webhooks, and the keypress, busy signal or failure comes
back through signed callbacks to the worker, which reports it like a SIP call's.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_escalation import REDIS_URL
from tests.fakes.twilio_server import FakeTwilio, TwilioAccount, twilio_signature
from tests.integration.peers import dtmf_pcap, sipp
from tests.integration.test_serve_escalation import ALICE, KEY, recipients, serve

pytestmark = pytest.mark.interop
pytest_plugins = ["tests.conftest_escalation"]

FROM = "+14155550107"
PUBLIC = "http://127.0.0.1:{http_port}"


def twilio_trunk(twilio: FakeTwilio, account: TwilioAccount, **extra: Any) -> dict[str, Any]:
    return {"name": "tw", "kind": "twilio", "account_sid": account.sid,
            "auth_token": account.auth_token, "caller_id": FROM, "api_base": twilio.url,
            **extra}  # fmt: skip


async def first_probe(twilio: FakeTwilio) -> None:
    """Wait until the worker's first health probe (GET the account) is out of the way, so a
    scripted failure or stall meets the call, not the probe."""
    for _ in range(200):
        if any(r.method == "GET" for r in twilio.requests):
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the twilio trunk was never probed")


def config_with(trunks: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "company": "acme",
        "recipients": recipients(telegram=False),
        "carriers": {"allowed_countries": ["US"], "trunks": trunks},
        "policies": [
            {"name": "page",
             "steps": [{"recipients": ["alice"], "channels": ["voice"], "delay": "10m"}]},
        ],
        **extra,
    }  # fmt: skip


async def test_keypress_on_a_twilio_call_acknowledges(tmp_path: Path) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        twilio.script_call(ALICE, digits="1")
        config = config_with([twilio_trunk(twilio, account)])
        async with serve(tmp_path, config, {"ACKLINE_PUBLIC_URL": PUBLIC}) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 20)
            [call] = twilio.calls.values()
            await twilio.call_finished(call.sid, timeout=10)
            audit = service.audit_lines(alert_id)
    assert alert["state"] == "acknowledged", alert
    [voice] = alert["attempts"]
    assert (voice["channel"], voice["status"], voice["reason"]) == (
        "voice", "acknowledged", "pressed_1",
    )  # fmt: skip
    # Twilio ran our flow: the alert, the menu, the key, our thank-you, hang-up.
    says = [v[1] for v in call.verbs if v[0] == "say"]
    assert says[0] == "critical alert. Database down on eu-1. primary unreachable", call.verbs
    assert "Press 1 to acknowledge, 2 to escalate now, 3 to resolve, 9 to repeat." in says
    assert ("gather", "1") in call.verbs
    assert says[-1] == "Acknowledged, thank you. Goodbye."
    assert call.verbs[-1] == ("hangup",)
    assert call.form["To"] == ALICE
    assert call.form["From"] == FROM
    # every webhook was answered 2xx (the signatures checked out)
    assert all(c.status_code is not None and c.status_code < 300 for c in call.callbacks), [
        (c.kind, c.status_code, c.body) for c in call.callbacks
    ]
    result = next(x for x in audit if x.get("event") == "result")["details"]
    assert result["trunk"] == "tw", result
    assert result["digits"] == "1", result
    assert result["call_id"] == call.sid
    assert account.auth_token not in (tmp_path / "serve-all.log").read_text()


async def test_busy_on_twilio_retries_and_the_second_call_is_acknowledged(
    tmp_path: Path,
) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        twilio.script_call(ALICE, outcome="busy")
        twilio.script_call(ALICE, digits="1")
        config = config_with(
            [twilio_trunk(twilio, account)],
            channel_defaults={"voice": {"attempts": 2, "backoff": "linear", "base": "1s",
                                        "factor": 1, "max": "5s"}},
        )  # fmt: skip
        async with serve(tmp_path, config, {"ACKLINE_PUBLIC_URL": PUBLIC}) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 25)
    attempts = [(n["attempt"], n["status"], n["reason"]) for n in alert["attempts"]]
    assert attempts == [(1, "failed_retryable", "busy"), (2, "acknowledged", "pressed_1")]
    assert [c.status for c in twilio.calls.values()] == ["busy", "completed"]


async def test_twilio_refusing_the_call_fails_over_to_a_sip_trunk(tmp_path: Path) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        scenario = {"CODECS": "0", "RING_MS": "100", "PAUSE_MS": "800"}
        with sipp(
            "uas_answer_dtmf.xml", tmp_path, PCAP=str(dtmf_pcap("1")), fields=scenario
        ) as uas:
            host, port = uas.address.rsplit(":", 1)
            trunks = [
                twilio_trunk(twilio, account, priority=1),
                {"name": "sip-b", "host": host, "port": int(port), "priority": 2},
            ]
            config = config_with(trunks)
            config["carriers"]["probe"] = {"interval": "10m"}
            async with serve(tmp_path, config, {"ACKLINE_PUBLIC_URL": PUBLIC}) as s:
                await first_probe(twilio)
                twilio.fail_next(20500, match=account.sid)  # Twilio's API has a bad moment
                alert_id = await s.post_alert("page")
                alert = await s.until(alert_id, lambda a: a["state"] != "triggered", 20)
                audit = s.audit_lines(alert_id)
    assert alert["state"] == "acknowledged", alert
    result = next(x for x in audit if x.get("event") == "result")["details"]
    assert result["trunk"] == "sip-b", result
    assert result["trunks_tried"] == "tw:carrier_error,sip-b:200", result
    assert twilio.calls == {}


async def test_an_api_ack_cancels_a_ringing_twilio_call(tmp_path: Path) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        twilio.script_call(ALICE, ring=20)
        async with serve(
            tmp_path, config_with([twilio_trunk(twilio, account)]), {"ACKLINE_PUBLIC_URL": PUBLIC}
        ) as service:
            alert_id = await service.post_alert("page")
            for _ in range(100):
                if any(c.status == "ringing" for c in twilio.calls.values()):
                    break
                await asyncio.sleep(0.1)
            [call] = twilio.calls.values()
            assert call.status == "ringing"
            r = await service.client.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
            assert r.status_code == 200, r.text
            started = asyncio.get_running_loop().time()
            await twilio.call_finished(call.sid, timeout=5)
            took = asyncio.get_running_loop().time() - started
    assert call.status == "canceled", (call.status, call.ended_by)
    assert call.ended_by == "api", (call.status, call.ended_by)
    assert took < 3.0


async def test_webhooks_refuse_a_forged_signature(tmp_path: Path) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        config = config_with([twilio_trunk(twilio, account)])
        async with serve(tmp_path, config, {"ACKLINE_PUBLIC_URL": PUBLIC}) as service:
            url = str(service.client.base_url).rstrip("/") + "/v1/webhooks/twilio/voice/status"
            form = {"AccountSid": account.sid, "CallSid": "CA" + "1" * 32,
                    "CallStatus": "completed"}  # fmt: skip
            forged = twilio_signature(url, form, "not-the-token")
            r = await service.client.post(url, data=form, headers={"X-Twilio-Signature": forged})
            assert r.status_code == 403, r.text
            other = {**form, "AccountSid": "AC" + "2" * 32}
            r = await service.client.post(
                url, data=other, headers={"X-Twilio-Signature": twilio_signature(url, other, "x")}
            )
            assert r.status_code == 403, r.text
            good = twilio_signature(url, form, account.auth_token)
            r = await service.client.post(url, data=form, headers={"X-Twilio-Signature": good})
            assert r.status_code == 204, r.text
            listed = await service.client.get("/v1/carriers", headers=KEY)
            assert listed.status_code == 200, listed.text
            assert account.auth_token not in listed.text  # never echoed back
            [tw] = listed.json()
            assert tw["kind"] == "twilio"
            assert tw["has_password"] is True


async def test_api_and_worker_processes_share_twilio_reports_through_redis(
    tmp_path: Path, pg_url: str, redis_prefix: str
) -> None:
    """The webhooks land on `--role api`; the worker that placed the call hears them."""
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        twilio.script_call(ALICE, digits="1")
        env = {
            "ACKLINE_PUBLIC_URL": PUBLIC,
            "ACKLINE_DATABASE_URL": pg_url,
            "REDIS_URL": REDIS_URL,
            "ACKLINE_REDIS_PREFIX": redis_prefix,
        }
        config = config_with([twilio_trunk(twilio, account)])
        async with serve(tmp_path, config, env, roles=("api", "worker")) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(alert_id, lambda a: a["state"] != "triggered", 20)
            audit = service.audit_lines(alert_id)
    assert alert["state"] == "acknowledged", alert
    assert [n["reason"] for n in alert["attempts"]] == ["pressed_1"]
    # the PostgreSQL result path audits the same channel details as the embedded one
    result = next(x for x in audit if x.get("event") == "result")
    assert result["details"]["trunk"] == "tw", result


@pytest.mark.parametrize("problem", ["no_public_url", "flow_with_record"])
def test_worker_refuses_to_start_with_twilio_it_cannot_serve(tmp_path: Path, problem: str) -> None:
    import subprocess

    import yaml

    from tests.integration.peers import ackline_cli, cli_env

    sid = "AC" + "3" * 32
    trunk = {"name": "tw", "kind": "twilio", "account_sid": sid, "auth_token": "t",
             "caller_id": FROM}  # fmt: skip
    config = config_with([trunk])
    env = {**cli_env(tmp_path), "ACKLINE_CONFIG": str(tmp_path / "ackline.yaml"),
           "ACKLINE_DATABASE_URL": f"sqlite:///{tmp_path}/a.db"}  # fmt: skip
    env.pop("ACKLINE_PUBLIC_URL", None)
    expected = "twilio trunks need ACKLINE_PUBLIC_URL"
    if problem == "flow_with_record":
        env["ACKLINE_PUBLIC_URL"] = "http://127.0.0.1:9"
        flow = {"name": "vm", "start": "rec", "nodes": {"rec": {"type": "record"}}}
        (tmp_path / "vm.yaml").write_text(yaml.safe_dump(flow))
        config["policies"][0]["voice"] = {"flow": str(tmp_path / "vm.yaml")}
        expected = "policy page: node 'rec': record is not supported on twilio trunks"
    (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [*ackline_cli(), "serve", "--role", "worker", "--port", "0"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]  # bad configuration, said plainly
    assert "error: invalid configuration" in proc.stderr
    assert expected in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


async def test_probes_take_a_twilio_trunk_down_and_up_through_its_api() -> None:
    from carriers.health import HealthPolicy
    from carriers.router import CarrierRouter
    from carriers.trunk import Trunk
    from carriers.twilio_voice import CallEvents, TwilioVoice
    from gateway.call import Gateway, GatewayConfig

    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        trunk = Trunk.model_validate(twilio_trunk(twilio, account))
        config = GatewayConfig(host="127.0.0.1", udp_port=0, tcp_port=0)
        async with Gateway(config) as gw:
            voice = TwilioVoice(CallEvents(), "http://127.0.0.1:9")
            r = CarrierRouter(gw, [trunk], allowed_countries=["US"], twilio=voice,
                              health=HealthPolicy(down_after=2, up_after=1))  # fmt: skip
            prober = r.prober(interval=60, timeout=5)
            try:
                assert await prober.probe(trunk)
                assert r.health.usable("tw")
                twilio.account_status[account.sid] = "suspended"
                assert not await prober.probe(trunk)
                assert r.health.usable("tw")  # one failure is not enough (no flapping)
                assert not await prober.probe(trunk)
                assert not r.health.usable("tw")
                assert r.health["tw"].probe.value == "down"
                del twilio.account_status[account.sid]
                assert await prober.probe(trunk)
                assert r.health.usable("tw")
                twilio.fail_next(20503, match=account.sid)
                ok, detail = await voice.probe(trunk)
                assert not ok
                assert "HTTP 503" in detail
            finally:
                await r.close()
    ok, detail = await voice.probe(trunk)  # the API is gone altogether
    assert not ok, detail
    assert "unreachable" in detail, detail


async def test_an_ack_while_twilio_is_still_creating_the_call_cancels_it_at_once(
    tmp_path: Path,
) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(FROM,))
        twilio.script_call(ALICE, ring=20)
        config = config_with([twilio_trunk(twilio, account)])
        config["carriers"]["probe"] = {"interval": "10m"}
        async with serve(tmp_path, config, {"ACKLINE_PUBLIC_URL": PUBLIC}) as service:
            await first_probe(twilio)
            twilio.stall_next(1.5, match=account.sid)  # the create's answer is slow
            alert_id = await service.post_alert("page")
            for _ in range(100):
                if any(r.path.endswith("/Calls.json") for r in twilio.requests):
                    break
                await asyncio.sleep(0.05)
            assert not twilio.calls  # Twilio has not answered the create yet
            r = await service.client.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
            assert r.status_code == 200, r.text
            for _ in range(100):
                if twilio.calls:
                    break
                await asyncio.sleep(0.05)
            [call] = twilio.calls.values()
            await twilio.call_finished(call.sid, timeout=5)
            alert = await service.until(
                alert_id, lambda a: all(n["status"] != "sending" for n in a["attempts"]), 10
            )
    assert call.status == "canceled", (call.status, call.ended_by)
    assert call.ended_by == "api", (call.status, call.ended_by)
    assert "in-progress" not in call.statuses
    assert [(n["status"], n["reason"]) for n in alert["attempts"]] == [
        ("cancelled", "alert_closed")
    ], alert["attempts"]


async def test_a_report_published_before_anyone_listens_is_sent_again_until_someone_does(
    redis_prefix: str,
) -> None:
    """Pub/sub keeps nothing: right after a Redis failover the webhook's process may reach
    the new master before the call's process has resubscribed there. The report is
    published again until a listener receives it."""
    from carriers.twilio_voice import CallEvents

    webhook, listener = CallEvents(REDIS_URL, redis_prefix), CallEvents(REDIS_URL, redis_prefix)
    try:
        published = asyncio.create_task(webhook.publish("CA-early", {"kind": "gather"}))
        await asyncio.sleep(0.5)  # nobody listens yet
        assert not published.done()
        await listener.start()
        await asyncio.wait_for(published, 5)
        for _ in range(100):
            if "CA-early" in listener._early:
                break
            await asyncio.sleep(0.02)
        assert [r for _, r in listener._early["CA-early"]] == [{"kind": "gather"}]
    finally:
        await listener.close()
        await webhook.close()
