"""Audit file format: stable leading fields, additive extras, torn lines, replay."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from escalation.audit import STABLE_FIELDS, AuditLog, replay


def test_lines_have_stable_fields_first_and_survive_a_torn_tail(tmp_path: Path) -> None:
    log = AuditLog(tmp_path, fsync=True)
    log.write("acme/../x", [{"alert_id": "a", "event": "created", "extra": 1}])
    log.close()
    path = log.path("acme/../x")
    assert path.parent == tmp_path  # a company name cannot escape the directory
    with path.open("a") as fh:
        fh.write('{"ts": "2030-01-01T00:00:00+00:00", "alert_id": "a", "ev')  # crash mid-write
    records = list(AuditLog(tmp_path).read("acme/../x"))
    assert len(records) == 1
    assert list(records[0])[: len(STABLE_FIELDS)] == list(STABLE_FIELDS)
    assert records[0]["extra"] == 1
    assert records[0]["ip"] is None
    raw = path.read_text().splitlines()[0]
    assert json.loads(raw)["alert_id"] == "a"


def test_read_filters(tmp_path: Path) -> None:
    log = AuditLog(tmp_path)
    t0 = datetime(2030, 1, 1, tzinfo=UTC)
    log.write("c", [
        {"ts": t0.isoformat(), "alert_id": "a", "channel": "sms", "event": "send"},
        {"ts": (t0 + timedelta(hours=1)).isoformat(), "alert_id": "b", "channel": "voice",
         "event": "send"},
    ])  # fmt: skip
    assert [r["alert_id"] for r in log.read("c", channel="voice")] == ["b"]
    assert [r["alert_id"] for r in log.read("c", since=t0 + timedelta(minutes=1))] == ["b"]
    assert [r["alert_id"] for r in log.read("c", until=t0)] == ["a"]
    assert list(log.read("other")) == []


def test_replay_reconstructs_the_path() -> None:
    def rec(event: str, **kw: object) -> dict[str, object]:
        return {"alert_id": "a", "event": event, **kw}

    path = replay(
        [
            rec("created", status="triggered"),
            rec("step", round=0, step=0),
            rec("scheduled", notification_uuid="n1", attempt=1, channel="voice",
                recipient_id="r", status="scheduled"),
            rec("send", notification_uuid="n1", attempt=1, channel="voice", status="sending"),
            {"alert_id": "other", "event": "ack"},
            rec("result", notification_uuid="n1", attempt=1, channel="voice",
                status="acknowledged"),
            rec("ack", actor="voice:r", status="acknowledged"),
        ],
        "a",
    )  # fmt: skip
    assert path.state == "acknowledged"
    assert path.acked_by == "voice:r"
    assert path.steps == [(0, 0)]
    assert path.sent() == [("voice", "r", 1)]
    assert path.attempts[("n1", 1)].statuses == ["scheduled", "sending", "acknowledged"]
