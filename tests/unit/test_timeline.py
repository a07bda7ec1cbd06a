"""The timeline maps every audit line the engine writes; unknown kinds pass through."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import escalation
from escalation.rate_limits import Verdict
from escalation.timeline import AuditEvent, EntryKind, build_timeline

SOURCES = Path(escalation.__file__).parent
# `Audit("step", ...)`, `event="send"`, `event = "bundled"`, `"ack" if ... else "resolve"`
_WRITTEN = re.compile(r'Audit\(\s*"(\w+)"|\bevent\s*=\s*"(\w+)"(?:\s+if\s.*?\selse\s"(\w+)")?')


def written_events() -> set[str]:
    found: set[str] = set()
    for name in ("core.py", "engine.py", "sends.py"):
        for match in _WRITTEN.finditer((SOURCES / name).read_text()):
            found |= {g for g in match.groups() if g}
    return found | {v.value for v in Verdict}  # a leased send is audited by its verdict


def test_every_event_the_engine_writes_is_mapped_and_none_is_made_up() -> None:
    written = written_events()
    assert {"created", "result", "ack", "resolve", "bundled", "reassigned"} <= written
    assert written == {e.value for e in AuditEvent}


def rec(ts: str, event: str, **fields: object) -> dict[str, Any]:
    return {"ts": f"2030-01-01T00:00:{ts}+00:00", "alert_id": "a1", "event": event, **fields}


def test_entries_are_typed_in_time_order_and_unknown_kinds_keep_their_fields() -> None:
    records = [
        rec("00", "created", status="triggered", reason="ring", actor="api:acme",
            ip="203.0.113.7"),
        rec("01", "send", status="sending", notification_uuid="n1", channel="voice",
            attempt=1, recipient_id="alice", worker="w1"),
        # written later by another process, but earlier in time
        rec("00.5", "scheduled", status="scheduled", notification_uuid="n1", channel="voice",
            attempt=1, recipient_id="alice", round=0, step=0),
        rec("02", "result", status="failed_retryable", reason="sip_486",
            notification_uuid="n1", channel="voice", attempt=1,
            details={"trunk": "t1", "trunks_tried": "t1:486", "sip_code": "486"}),
        rec("02", "retry", status="retry", reason="sip_486:in_0s", notification_uuid="n1"),
        rec("03", "held", status="held", released_at="2030-01-01T00:01:00+00:00"),
        rec("04", "result", status="acknowledged", reason="pressed_1",
            notification_uuid="n1", channel="voice", attempt=2, recipient_id="alice",
            details={"trunk": "t2", "sip_code": ""}),
        rec("04", "ack", status="acknowledged", actor="voice:alice"),
        rec("05", "frobnicated", status="x", colour="blue"),
        {"ts": "2030-01-01T00:00:05+00:00", "alert_id": "other", "event": "ack"},
        rec("06", "ack", status="acknowledged", actor="sms:+14155550101"),
        rec("07", "reassigned", actor="carol", **{"from": ["alice"], "to": ["bob"]},
            groups=[]),
    ]  # fmt: skip
    t = build_timeline("a1", records).entries
    assert [e.event for e in t] == [
        "created", "scheduled", "send", "result", "retry", "held", "result", "ack",
        "frobnicated", "ack", "reassigned",
    ]  # fmt: skip
    created, _scheduled, send, failed, retry, held, _acked, ack, unknown, reply, moved = t
    assert created.kind is EntryKind.LIFECYCLE
    assert created.ip == "203.0.113.7"
    assert (send.channel, send.attempt, send.recipient_id) == ("voice", 1, "alice")
    assert (failed.trunk, failed.sip_code, failed.trunks_tried) == ("t1", 486, "t1:486")
    assert failed.kind is EntryKind.DELIVERY
    assert retry.kind is EntryKind.DECISION
    assert held.kind is EntryKind.RATE_LIMIT
    assert held.released_at is not None
    assert (ack.actor, ack.channel, ack.recipient_id) == ("voice:alice", "voice", "alice")
    assert unknown.kind is EntryKind.UNKNOWN
    assert unknown.raw is not None
    assert unknown.raw["colour"] == "blue"
    assert unknown.status is None
    assert (reply.channel, reply.recipient_id) == ("sms", None)
    assert (moved.reassigned_from, moved.reassigned_to, moved.kind) == (
        ["alice"], ["bob"], EntryKind.CHAIN
    )  # fmt: skip


def test_an_oncall_line_names_the_schedule_layer_and_override_that_chose() -> None:
    records = [
        rec("00", "oncall", status="chosen", reason="schedule:payments", recipient_id="bob",
            step=1, schedule="payments", layer="weekly", override=7),
        rec("01", "oncall", status="nobody", reason="schedule:night", step=2,
            schedule="night", layer=None, override=None),
    ]  # fmt: skip
    chosen, nobody = build_timeline("a1", records).entries
    assert (chosen.kind, chosen.recipient_id, chosen.schedule, chosen.layer, chosen.override) \
        == (EntryKind.CHAIN, "bob", "payments", "weekly", 7)  # fmt: skip
    assert (nobody.status, nobody.recipient_id, nobody.schedule) == ("nobody", None, "night")


def test_a_resolve_and_a_snooze_from_the_phone_name_the_callee_and_its_channel() -> None:
    records = [
        rec("01", "snoozed", status="snoozed", reason="pressed_4", notification_uuid="n1",
            channel="voice", recipient_id="alice", actor="voice:alice", step=0,
            until="2030-01-01T00:15:01+00:00", seconds=900.0),
        rec("20", "result", status="resolved", reason="pressed_3", notification_uuid="n2",
            channel="voice", attempt=1, recipient_id="alice"),
        rec("20", "resolve", status="resolved", reason="pressed_3", actor="voice:alice"),
    ]  # fmt: skip
    snoozed, _result, resolved = build_timeline("a1", records).entries
    assert snoozed.kind is EntryKind.CHAIN
    assert snoozed.snoozed_until is not None
    assert snoozed.snoozed_until.isoformat() == "2030-01-01T00:15:01+00:00"
    assert (resolved.actor, resolved.channel, resolved.recipient_id) == (
        "voice:alice", "voice", "alice"
    )  # fmt: skip
