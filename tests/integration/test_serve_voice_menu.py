"""`ackline serve` end to end: SIPp answers the alert call and presses 3 (resolve) or 4
(snooze); the alert is resolved, or stays open with its chain paused, and the spoken
confirmation plays before our BYE.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import wave
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from prompts import EspeakEngine, PromptCache
from tests.integration.peers import dtmf_pcap, sipp
from tests.integration.test_serve_escalation import serve, voice_page_config

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]
pytest_plugins = ["tests.conftest_escalation"]

CONFIRMATION = {"3": "Resolved. Goodbye.", "4": "Snoozed for 15 minutes. Goodbye."}


def call_results(log: str) -> list[dict[str, Any]]:
    """The call records `serve` prints when a call ends (one JSON object a line)."""
    found = []
    for line in log.splitlines():
        if line.startswith("{") and '"call_id"' in line:
            found.append(json.loads(line))
    return found


def prompt_seconds(cache_dir: Path, text: str) -> float:
    """How long a prompt the service rendered lasts (it must be in the service's cache)."""
    path = PromptCache(cache_dir, EspeakEngine()).path_for(text)
    assert path.exists(), f"{text!r} was never rendered"
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


def open_jobs(db: Path, alert_id: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT kind, payload, due_at FROM jobs WHERE alert_id = ? AND NOT done",
            (alert_id,),
        ).fetchall()
    return [(str(k), str(p), str(d)) for k, p, d in rows]


@pytest.mark.parametrize("digit", ["3", "4"])
async def test_pressing_3_resolves_and_4_snoozes_each_confirmed_before_hang_up(
    tmp_path: Path, digit: str
) -> None:
    config = voice_page_config()
    config["channel_defaults"] = {"voice": {"attempts": 1}}
    config["policies"][0]["voice"] = {"snooze": "15m"}
    scenario = {"CODECS": "0", "RING_MS": "200", "PAUSE_MS": "1500"}
    with sipp("uas_answer_dtmf.xml", tmp_path, PCAP=str(dtmf_pcap(digit)), fields=scenario) as uas:
        env = {"ACKLINE_VOICE_TARGET": f"sip:{{number}}@{uas.address}"}
        async with serve(tmp_path, config, env) as service:
            alert_id = await service.post_alert("page")
            alert = await service.until(
                alert_id, lambda a: a["attempts"] and a["attempts"][0]["status"] != "sending", 30
            )
            assert await asyncio.to_thread(uas.wait, 20) == 0, uas.logs()  # our BYE came
            alert = await service.until(alert_id, lambda a: False, 0)
            audit = service.audit_lines(alert_id)
            jobs = open_jobs(tmp_path / "ackline.db", alert_id)
            log = service.logs()
    [voice] = alert["attempts"]
    if digit == "3":
        assert (voice["status"], voice["reason"]) == ("resolved", "pressed_3"), voice
        assert alert["state"] == "resolved", alert
        assert alert["resolved_by"] == "voice:alice", alert
        [resolve] = [x for x in audit if x.get("event") == "resolve"]
        assert resolve["actor"] == "voice:alice", resolve
        assert jobs == [], jobs  # nothing left to fire
    else:
        assert (voice["status"], voice["reason"]) == ("snooze", "pressed_4"), voice
        assert alert["state"] == "triggered", alert  # open, its chain paused
        [snoozed] = [x for x in audit if x.get("event") == "snoozed"]
        assert (snoozed["actor"], snoozed["seconds"]) == ("voice:alice", 900), snoozed
        until = datetime.fromisoformat(snoozed["until"])
        assert until - datetime.fromisoformat(snoozed["ts"]) == timedelta(minutes=15)
        # persisted: the step fires again at `until`; the cap timer still runs
        kinds = sorted((kind, json.loads(payload)) for kind, payload, _due in jobs)
        assert kinds == [("cap", {}), ("step", {"round": 0, "step": 0})], jobs
        [step_due] = [due for kind, _p, due in jobs if kind == "step"]
        assert datetime.fromisoformat(step_due).replace(tzinfo=None) == until.replace(tzinfo=None)
    # the confirmation was spoken in full between the key and our hang-up
    [call] = [c for c in call_results(log) if c["digits"] == digit]
    assert call["hangup_by"] == "local", call
    pressed_at = call["dtmf"][0]["at_ms"] / 1000
    spoken = prompt_seconds(tmp_path / "prompts", CONFIRMATION[digit])
    assert call["duration_ms"] / 1000 - pressed_at >= spoken, (call, spoken)
