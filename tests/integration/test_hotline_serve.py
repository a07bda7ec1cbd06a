"""The inbound hotline in `ackline serve`: a caller (SIPp) presses 1 and describes the
outage; an alert is raised on the hotline policy with the recording attached, and the
caller is put through to the on-call responder (our softphone behind a carrier trunk) or
hears that the team was paged. Untrusted sources get 403 and an audit line."""

from __future__ import annotations

import asyncio
import json
import os
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.softphone import Softphone
from tests.integration.pcap import write_pcmu_pcap
from tests.integration.peers import dtmf_pcap, sipp
from tests.integration.test_serve_escalation import KEY, serve
from tests.integration.test_softphone import run_softphone
from tests.ivr_audio import Clip, load, render
from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

ONCALL = "+14155550101"


def speech_pcap(tmp: Path, *, keep_talking: bool = False) -> tuple[Path, int]:
    """The caller's report; with `keep_talking`, after a pause that ends the recording the
    caller goes on speaking (heard by the responder once put through)."""
    clip = Clip("report", "human", "The checkout service is returning errors for every customer.",
                "en-us+m3", 160, lead=0.2, tail=0.0)  # fmt: skip
    pcm = load(render(clip, tmp))
    audio = pcm
    if keep_talking:
        pause = np.zeros(int(8000 * 3.5), dtype=np.int16)
        audio = np.concatenate([pcm, pause, pcm, pcm, pcm])
    return write_pcmu_pcap(tmp / "report.pcap", audio), len(pcm)


def hotline_config(carrier_port: int, recordings: Path, channels: list[str],
                   trusted: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    hotline: dict[str, Any] = {
        "numbers": {"default": {"policy": "hotline"}},
        "recordings_dir": str(recordings),
    }
    if trusted is not None:
        hotline["trusted"] = trusted
    return {
        "company": "acme",
        "recipients": [{"id": "alice", "name": "Alice", "phone": ONCALL}],
        "policies": [{"name": "hotline", "steps": [
            {"recipients": ["alice"], "channels": channels, "delay": "10m"}]}],
        "carriers": {"allowed_countries": ["US"], "probe": {"interval": "1h"},
                     "trunks": [{"name": "carrier-a", "host": "127.0.0.1",
                                 "port": carrier_port}]},
        "hotline": hotline,
    }  # fmt: skip


async def caller(tmp: Path, sip_port: int, speech: Path) -> int:
    with sipp(
        "ivr_uac_hotline.xml",
        tmp,
        remote=f"127.0.0.1:{sip_port}",
        timeout_s=60,
        PAUSE_MS="1000",  # during the greeting: the menu takes the key
        DTMF=str(dtmf_pcap("1")),
        SPEAK_AFTER_MS="6500",  # after the record prompt and its tone
        SPEECH=str(speech),
    ) as peer:
        code = await asyncio.to_thread(peer.wait, 90)
        if code:
            print(peer.logs())
        return code


async def hotline_alert(service: Any, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        calls = [x for x in service.audit_lines_all() if x.get("event") == "hotline_call"]
        if calls:
            last: dict[str, Any] = calls[-1]
            return last
        assert time.monotonic() < deadline, "no hotline call was recorded"
        await asyncio.sleep(0.2)


async def test_caller_reports_outage_recording_attached_nobody_answers(tmp_path: Path) -> None:
    speech, samples = speech_pcap(tmp_path)
    (tmp_path / "carrier").mkdir()
    with sipp("carrier_reject.xml", tmp_path / "carrier", calls=100, CODE="480",
              PHRASE="Temporarily Unavailable") as carrier:  # fmt: skip
        config = hotline_config(carrier.port, tmp_path / "rec", ["voice"])
        async with serve(tmp_path, config, {}) as service:
            sip_port = int(service.sip_port)
            assert await caller(tmp_path, sip_port, speech) == 0  # we hung up with BYE
            call = await hotline_alert(service)
            alert = await service.until(call["alert_id"], lambda a: bool(a["attempts"]), 10)
            r = await service.client.get(f"/v1/alerts/{call['alert_id']}/recording", headers=KEY)
        invites = "".join(p.read_text() for p in (tmp_path / "carrier").glob("*_messages.log"))
    assert call["status"] == "reported", call
    assert call["path"][-3:] == ["connect", "paged", "end"], call  # nobody answered
    assert call["caller"] == "+14155550123"
    assert alert["policy"] == "hotline"
    assert alert["state"] == "triggered"
    assert alert["details"]["caller"] == "+14155550123"
    assert alert["details"]["source"] == "hotline"
    recording = Path(alert["details"]["recording"])
    assert recording.parent == tmp_path / "rec"
    with wave.open(str(recording)) as wav:
        recorded = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert len(recorded) > 0.6 * samples  # the caller's report, not a blip
    assert np.sqrt(np.mean(recorded.astype(np.float64) ** 2)) > 300  # not silence
    assert r.status_code == 200
    assert r.headers["content-type"] == "audio/wav"
    assert r.content == await asyncio.to_thread(recording.read_bytes)
    assert f"INVITE sip:{ONCALL}@" in invites  # the bridge and the page both rang alice
    assert alert["attempts"][0]["channel"] == "voice"


async def test_caller_is_put_through_to_the_oncall_responder(tmp_path: Path) -> None:
    speech, _ = speech_pcap(tmp_path, keep_talking=True)
    async with Softphone() as oncall:
        _, oncall_port = oncall.address
        # sms is not configured here, so the page itself rings nobody: only the bridge does
        config = hotline_config(oncall_port, tmp_path / "rec", ["sms"])
        async with serve(tmp_path, config, {}) as service:

            async def responder() -> int:
                async with oncall.answer(timeout=60) as leg:
                    await asyncio.sleep(3.0)  # listen to the caller for a while
                    return leg.heard_ms  # leaving hangs up: the caller is released

            answering = asyncio.create_task(responder())
            assert await caller(tmp_path, int(service.sip_port), speech) == 0
            heard_ms = await asyncio.wait_for(answering, 30)
            call = await hotline_alert(service)
    assert call["status"] == "connected", call
    assert call["path"][-1] == "connect", call  # the bridge ended the call
    assert heard_ms > 500  # the responder heard the caller (relayed audio)


async def test_untrusted_source_gets_403_and_an_audit_line(tmp_path: Path) -> None:
    """A flood from an untrusted source: every call gets 403, the first refusal is an
    audit line at once, the rest one line with their count, written at shutdown."""
    config = hotline_config(9, tmp_path / "rec", ["voice"], trusted=[
        {"name": "carrier-b", "sources": ["127.0.0.2"]}])  # fmt: skip
    async with serve(tmp_path, config, {}) as service:
        with sipp("uac_refused.xml", tmp_path, remote=f"127.0.0.1:{service.sip_port}",
                  calls=40, extra=["-r", "100"], CODE="403") as peer:  # fmt: skip
            assert await asyncio.to_thread(peer.wait, 20) == 0, peer.logs()
        await asyncio.sleep(0.3)
        refused = [x for x in service.audit_lines_all() if x.get("event") == "inbound_refused"]
        calls = [x for x in service.audit_lines_all() if x.get("event") == "hotline_call"]
        audit = service.audit
    assert calls == []
    [line] = refused
    assert (line["status"], line["reason"], line["ip"]) == ("403", "untrusted_source", "127.0.0.1")
    assert line["caller"].startswith("sip:+14155550123@")
    assert line["count"] == 1
    lines = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    first, rest = [x for x in lines if x.get("event") == "inbound_refused"]  # after stop
    assert first == line
    assert (rest["status"], rest["ip"], rest["caller"]) == ("403", "127.0.0.1", None)
    assert rest["count"] >= 39  # SIPp may have retransmitted an INVITE: each counts


async def test_baresip_caller_through_the_hotline_raises_an_alert(tmp_path: Path) -> None:
    """A second independent peer: baresip dials in, presses 1 (RFC 4733), talks (its tone
    generator) until it presses # to end the recording; the alert carries the recording."""
    from tests.integration.baresip_peer import baresip_uac

    (tmp_path / "carrier").mkdir()
    with sipp("carrier_reject.xml", tmp_path / "carrier", calls=100, CODE="480",
              PHRASE="Temporarily Unavailable") as carrier:  # fmt: skip
        config = hotline_config(carrier.port, tmp_path / "rec", ["voice"])
        async with serve(tmp_path, config, {}) as service:
            target = f"sip:+14155550100@127.0.0.1:{service.sip_port}"
            with baresip_uac(tmp_path / "baresip", target, dtmf="1", dtmf_delay_s=1.0,
                             lifetime_s=60, tone_hz=700) as peer:  # fmt: skip
                await asyncio.to_thread(peer.wait_established, 10)
                await asyncio.sleep(9.0)  # the menu, the record prompt and its tone, talking
                await asyncio.to_thread(peer.send_dtmf, "#")
                await asyncio.to_thread(peer.wait_closed, 40)
                closed_by_remote = peer.closed_by_remote
            call = await hotline_alert(service)
            alert = await service.until(call["alert_id"], lambda a: bool(a["attempts"]), 10)
    assert closed_by_remote  # the flow said goodbye and hung up
    assert call["status"] == "reported", call
    assert "record" in call["path"], call
    recording = Path(alert["details"]["recording"])
    with wave.open(str(recording)) as wav:
        recorded = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert len(recorded) > 8000  # more than a second of the caller
    spectrum = np.abs(np.fft.rfft(recorded.astype(np.float64)))
    assert (
        abs(np.fft.rfftfreq(len(recorded), 1 / 8000)[int(np.argmax(spectrum[1:])) + 1] - 700) < 15
    )


async def test_recordings_past_their_retention_are_deleted_and_audited(tmp_path: Path) -> None:
    """`recordings_retention`: the serve process deletes what is older at start and keeps
    doing so while it runs; each deletion is an audit line, and the alert's recording
    link then answers 410 Gone instead of serving a file or pretending there was none."""
    rec = tmp_path / "rec"
    rec.mkdir()
    old, fresh = rec / "20260101T000000-old-record-1.wav", rec / "fresh-record-1.wav"
    for path in (old, fresh):
        path.write_bytes(b"RIFF")
    day_ago = time.time() - 86400
    os.utime(old, (day_ago, day_ago))
    config = hotline_config(9, rec, ["voice"])
    config["hotline"]["recordings_retention"] = "30s"  # swept every 3 s

    async def gone(path: Path) -> None:
        await wait_until(lambda: not path.exists(), 10, f"{path} to go", interval=0.2)

    async with serve(tmp_path, config, {}) as service:
        await gone(old)
        assert fresh.exists()  # 30 s have not passed
        os.utime(fresh, (day_ago, day_ago))  # as if it had aged while the process runs
        await gone(fresh)
        body = {"title": "hotline", "policy": "hotline", "details": {"recording": str(old)}}
        r = await service.client.post("/v1/alerts", json=body, headers=KEY)
        assert r.status_code == 202, r.text
        link = await service.client.get(f"/v1/alerts/{r.json()['id']}/recording", headers=KEY)
        deleted = [x for x in service.audit_lines_all() if x.get("event") == "recording_deleted"]
    assert link.status_code == 410, link.text
    assert "deleted" in link.json()["detail"]
    assert [(x["recording"], x["reason"]) for x in deleted] == [
        (str(old), "retention"), (str(fresh), "retention")]  # fmt: skip


async def test_a_softphone_script_reports_an_outage_by_voice(tmp_path: Path) -> None:
    """A QA script drives the whole hotline flow: greeting, 1, it speaks its report after
    the tone (TTS), and the flow pages and hangs up; the alert carries what it said."""
    (tmp_path / "carrier").mkdir()
    report_text = "The checkout service is returning errors for every customer."
    with sipp("carrier_reject.xml", tmp_path / "carrier", calls=100, CODE="480",
              PHRASE="Temporarily Unavailable") as carrier:  # fmt: skip
        config = hotline_config(carrier.port, tmp_path / "rec", ["voice"])
        async with serve(tmp_path, config, {}) as service:
            script = {
                "call": f"sip:+14155550100@127.0.0.1:{service.sip_port}",
                "steps": [
                    {"wait_audio": 10},  # the greeting
                    {"sleep": 1},
                    {"dtmf": "1"},  # the menu takes it
                    {"wait_audio": 10},  # "describe the outage after the tone"
                    {"wait_silence": 15},  # 0.8 s of quiet: prompt and tone are over
                    {"say": report_text},
                    {"expect_hangup": 40},  # silence ends the recording; paged, goodbye
                ],
                "expect": {"answered": True, "hangup_by": "remote"},
            }
            code, report, err = await asyncio.to_thread(run_softphone, tmp_path, script)
            call = await hotline_alert(service)
            alert = await service.until(call["alert_id"], lambda a: bool(a["attempts"]), 10)
    assert code == 0, (report, err)
    assert [s["ok"] for s in report["steps"]] == [True] * 9, report
    assert call["status"] == "reported", call
    assert call["path"][-2:] == ["paged", "end"], call
    with wave.open(alert["details"]["recording"]) as wav:
        recorded = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    spoken = render(Clip("r", "human", report_text, "en-us", 175, lead=0, tail=0), tmp_path)
    assert len(recorded) > 0.6 * len(load(spoken))  # the report itself, not a blip
    assert np.sqrt(np.mean(recorded.astype(np.float64) ** 2)) > 300  # not silence
