"""Shift reminders, the pure part: which shift starts are due at an instant (DST, overrides,
the same person carrying on), which channel a reminder takes, what it says, and what the
configuration accepts. Synthetic time throughout."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from escalation.channels.base import NotificationKind
from escalation.channels.email import render_email
from escalation.channels.slack import alert_blocks
from escalation.channels.sms import sms_body
from escalation.channels.webhook import webhook_payload
from escalation.config import ConfigError, Recipient, parse_config
from escalation.reminders import ShiftStart, pick_channel, reminder_text, upcoming_starts
from escalation.schedules import Override, Reminder, Schedule
from tests.fakes import make_notification

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
QUARTER = 900.0


def schedule(zone: str = "Europe/Berlin", **layer: Any) -> Schedule:
    base = {"name": "primary", "rotation": "daily", "handoff": "09:00",
            "start": "2026-03-16", "participants": ["alice", "bob"]}  # fmt: skip
    return Schedule.model_validate(
        {"name": "payments", "time_zone": zone, "layers": [base | layer],
         "reminder": {"before": "15m"}}
    )  # fmt: skip


def at(tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=tz)


def test_a_handoff_is_due_from_before_it_until_it_starts_and_never_after() -> None:
    s = schedule()
    handoff = at(BERLIN, 2026, 3, 17, 9)  # bob's first shift
    assert upcoming_starts(s, [], handoff - timedelta(minutes=15, seconds=1), QUARTER) == []
    due = [ShiftStart("payments", "bob", handoff)]
    assert upcoming_starts(s, [], handoff - timedelta(minutes=15), QUARTER) == due
    assert upcoming_starts(s, [], handoff - timedelta(seconds=1), QUARTER) == due  # late
    assert upcoming_starts(s, [], handoff, QUARTER) == []  # under way: too late
    assert upcoming_starts(s, [], handoff + timedelta(minutes=1), QUARTER) == []


def test_the_weekly_handoff_after_the_spring_change_is_due_at_local_time() -> None:
    s = schedule(rotation="weekly")
    # 29 March 2026: Berlin moves to CEST; the 30 March 09:00 handoff is 07:00 UTC
    handoff = at(BERLIN, 2026, 3, 30, 9)
    assert handoff.astimezone(UTC) == datetime(2026, 3, 30, 7, tzinfo=UTC)
    now = datetime(2026, 3, 30, 6, 45, tzinfo=UTC)
    assert upcoming_starts(s, [], now, QUARTER) == [ShiftStart("payments", "alice", handoff)]
    # the same UTC time a week earlier (CET) is an hour before that week's handoff
    assert upcoming_starts(s, [], now - timedelta(days=7), QUARTER) == []


def test_a_handoff_in_the_spring_gap_and_one_that_happens_twice() -> None:
    # 02:30 does not exist on 8 March 2026 in New York: the handoff is 03:30 EDT
    s = schedule("America/New_York", handoff="02:30", start="2026-03-01")
    gap = datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 03:30 EDT
    [due] = upcoming_starts(s, [], gap - timedelta(minutes=10), QUARTER)
    assert due.start == gap
    # 01:30 happens twice on 1 November 2026: the first time (EDT, 05:30 UTC)
    s = schedule("America/New_York", handoff="01:30", start="2026-10-25")
    first = datetime(2026, 11, 1, 5, 30, tzinfo=UTC)
    [due] = upcoming_starts(s, [], first - timedelta(minutes=15), QUARTER)
    assert due.start == first
    assert upcoming_starts(s, [], first + timedelta(hours=1) - timedelta(minutes=15), 600) == []


def test_overrides_start_shifts_and_the_same_person_carrying_on_is_no_new_shift() -> None:
    s = schedule()
    # Bob covers Alice from 12:00 to 15:00 on 16 March (Alice's day)
    cover = Override(
        schedule="payments", recipient="bob", replaces="alice",
        start=at(BERLIN, 2026, 3, 16, 12), end=at(BERLIN, 2026, 3, 16, 15),
    )  # fmt: skip
    assert upcoming_starts(s, [cover], at(BERLIN, 2026, 3, 16, 11, 50), QUARTER) == [
        ShiftStart("payments", "bob", at(BERLIN, 2026, 3, 16, 12))
    ]
    assert upcoming_starts(s, [cover], at(BERLIN, 2026, 3, 16, 14, 50), QUARTER) == [
        ShiftStart("payments", "alice", at(BERLIN, 2026, 3, 16, 15))
    ]
    # an override that puts Alice on during her own shift starts nothing
    same = cover.model_copy(update={"recipient": "alice", "replaces": None})
    assert upcoming_starts(s, [same], at(BERLIN, 2026, 3, 16, 11, 50), QUARTER) == []


def test_a_restricted_layer_starts_a_shift_after_nobody_was_on_call() -> None:
    s = schedule(restrictions=[{"days": ["mon"], "start": "10:00", "end": "12:00"}])
    assert upcoming_starts(s, [], at(BERLIN, 2026, 3, 16, 9, 50), QUARTER) == [
        ShiftStart("payments", "alice", at(BERLIN, 2026, 3, 16, 10))
    ]


def recipient(**contacts: str) -> Recipient:
    return Recipient(id="alice", name="Alice", **contacts)


def test_the_channel_is_the_configured_one_or_the_first_the_worker_can_deliver_to() -> None:
    alice = recipient(phone="+14155550101", email="alice@example.com", slack_channel="U0123ABCD")
    default = Reminder()
    assert pick_channel(default, alice, {"sms", "email", "slack"}) == ("sms", "first_available")
    assert pick_channel(default, alice, {"voice", "email", "slack"}) == (
        "slack", "first_available",
    )  # fmt: skip
    assert pick_channel(default, alice, {"voice"}) == (None, "no_reachable_channel")
    email = Reminder(channel="email")
    assert pick_channel(email, alice, {"sms", "email"}) == ("email", "configured")
    assert pick_channel(email, alice, {"sms"}) == (None, "channel_unavailable:email")
    assert pick_channel(Reminder(channel="telegram"), alice, {"telegram"}) == (
        None, "no_contact:telegram",
    )  # fmt: skip
    assert pick_channel(default, None, {"sms"}) == (None, "unknown_recipient")


def test_the_text_gives_the_start_in_the_schedules_own_time_zone() -> None:
    title, summary = reminder_text(schedule(), datetime(2026, 3, 30, 7, tzinfo=UTC))
    assert title == "On call soon: payments"
    assert summary == (
        "Your on-call shift for payments starts Mon 30 Mar 09:00 CEST (Europe/Berlin)."
    )


def test_a_reminder_reads_as_a_message_without_anything_to_acknowledge() -> None:
    n = replace(make_notification("sms"), kind=NotificationKind.SHIFT_REMINDER, title="On call")
    assert "ACK" not in sms_body(n)
    assert "reply" not in sms_body(n)
    assert [b["type"] for b in alert_blocks(n)] == ["section"]  # no buttons
    assert webhook_payload(n)["kind"] == "shift_reminder"
    mail = render_email(replace(n, contact=replace(n.contact, email="a@example.com")), "x@y.z")
    assert mail["Subject"] == "On call"
    assert "Acknowledge" not in mail.as_string()
    page = make_notification("sms")
    assert "ACK 7F3K" in sms_body(page)
    assert webhook_payload(page)["kind"] == "alert"


def config(reminder: dict[str, Any]) -> dict[str, Any]:
    return {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "schedules": [{"name": "payments", "time_zone": "Europe/Berlin", "reminder": reminder,
                       "layers": [{"name": "l", "rotation": "daily", "start": "2026-03-16",
                                   "participants": ["alice"]}]}],
    }  # fmt: skip


def test_the_configuration_checks_the_reminder() -> None:
    cfg = parse_config(config({"before": "30m", "channel": "sms"}))
    assert cfg.schedules[0].reminder == Reminder(before=1800, channel="sms")
    with pytest.raises(ConfigError, match=r"schedules\[0\]\.reminder\.channel: 'voice' cannot"):
        parse_config(config({"channel": "voice"}))
    with pytest.raises(ConfigError, match=r"reminder\.channel: 'fax' cannot"):
        parse_config(config({"channel": "fax"}))
    with pytest.raises(ConfigError, match=r"reminder\.before is from 1m to 24h"):
        parse_config(config({"before": "30s"}))
    with pytest.raises(ValidationError):
        Reminder.model_validate({"before": "2d"})
    with pytest.raises(ConfigError, match="Extra inputs"):
        parse_config(config({"when": "15m"}))
