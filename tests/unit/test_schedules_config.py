"""Schedules and overrides in ackline.yaml: validated with paths, like the rest."""

from __future__ import annotations

from typing import Any

import pytest

from escalation.config import ConfigError, parse_config

PEOPLE = [
    {"id": "alice", "name": "Alice", "phone": "+14155550101"},
    {"id": "bob", "name": "Bob", "email": "bob@example.com"},
]
PAYMENTS: dict[str, Any] = {
    "name": "payments",
    "time_zone": "Europe/Berlin",
    "layers": [{"name": "primary", "rotation": "weekly", "handoff": "09:00",
                "start": "2026-03-16", "participants": ["alice", "bob"]}],
}  # fmt: skip


def cfg(**extra: Any) -> dict[str, Any]:
    return {
        "recipients": PEOPLE,
        "schedules": [PAYMENTS],
        "policies": [{"name": "p", "steps": [{"schedules": ["payments"], "channels": ["sms"]}]}],
    } | extra


def errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        parse_config(data, "ackline.yaml")
    return exc.value.errors


def test_a_step_may_page_a_schedule_alone() -> None:
    got = parse_config(cfg(overrides=[{
        "schedule": "payments", "recipient": "bob", "replaces": "alice",
        "start": "2026-03-20T00:00:00+01:00", "end": "2026-03-21T00:00:00+01:00",
    }]))  # fmt: skip
    assert got.policies[0].steps[0].schedules == ["payments"]
    assert got.schedules[0].layers[0].participants == ("alice", "bob")
    assert got.overrides[0].replaces == "alice"


def test_unknown_zone_is_a_clear_error_with_its_path() -> None:
    data = cfg(schedules=[PAYMENTS | {"time_zone": "Europe/Atlantis"}])
    assert errors(data) == [
        "ackline.yaml: schedules[0].time_zone: unknown time zone 'Europe/Atlantis': "
        "use an IANA name such as Europe/Berlin"
    ]


def test_participants_overrides_and_steps_must_name_known_things() -> None:
    layer = PAYMENTS["layers"][0] | {"participants": ["alice", "mallory"]}
    data = cfg(
        schedules=[PAYMENTS | {"layers": [layer]}, PAYMENTS],
        overrides=[{"schedule": "billing", "recipient": "eve", "replaces": "bob",
                    "start": "2026-03-20T00:00Z", "end": "2026-03-21T00:00Z"}],
        policies=[{"name": "p", "steps": [{"schedules": ["billing"], "channels": ["sms"]}]}],
    )  # fmt: skip
    assert errors(data) == [
        "ackline.yaml: schedules[0].layers[0].participants[1]: unknown recipient 'mallory'",
        "ackline.yaml: schedules[1]: duplicate schedule 'payments'",
        "ackline.yaml: overrides[0].schedule: unknown schedule 'billing'",
        "ackline.yaml: overrides[0].recipient: unknown recipient 'eve'",
        "ackline.yaml: policies[0].steps[0].schedules[0]: unknown schedule 'billing'",
    ]


def test_a_step_without_any_target_is_refused() -> None:
    data = cfg(policies=[{"name": "p", "steps": [{"channels": ["sms"]}]}])
    assert errors(data) == [
        "ackline.yaml: policies[0].steps[0]: a step needs at least one recipient, group or schedule"
    ]
