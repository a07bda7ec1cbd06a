"""The YAML loader accepts the shipped example and rejects mistakes with their location."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from common.durations import parse_duration
from escalation.config import (
    DEFAULT_RETRY,
    Backoff,
    ConfigError,
    RetryPolicy,
    load_config,
    parse_config,
)

ROOT = Path(__file__).resolve().parents[2]


def _base() -> dict[str, Any]:
    return {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "groups": [{"name": "primary", "members": ["alice"]}],
        "policies": [
            {"name": "p", "steps": [{"groups": ["primary"], "channels": ["voice"], "delay": "1m"}]}
        ],
    }


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "ackline.yaml")
    return info.value.errors


def test_example_file_loads() -> None:
    cfg = load_config(ROOT / "ackline.example.yaml")
    assert cfg.company == "acme"
    critical = next(p for p in cfg.policies if p.name == "critical")
    assert [s.delay for s in critical.steps] == [300.0, 600.0, 0.0]
    assert critical.max_duration == 7200.0
    retry = critical.retry_for(cfg.channel_defaults)
    assert retry["voice"].fallback_channel == "telegram_voice"
    assert retry["telegram_voice"].fallback_channel == "sms"
    assert cfg.rate_limit_for("voice") is not None
    assert cfg.rate_limit_for("sms") == cfg.rate_limits["default"]


def test_shipped_defaults_match_the_spec() -> None:
    assert DEFAULT_RETRY["voice"].attempts == 3
    assert DEFAULT_RETRY["voice"].backoff is Backoff.EXPONENTIAL
    assert DEFAULT_RETRY["telegram_voice"].attempts == 2
    assert DEFAULT_RETRY["telegram_voice"].backoff is Backoff.LINEAR
    assert DEFAULT_RETRY["sms"].attempts == 2
    assert DEFAULT_RETRY["telegram"].attempts == 2
    email = DEFAULT_RETRY["email"]
    assert email.retries("smtp_421")
    assert not email.retries("smtp_550")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(5, 5.0), ("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "m5", "", True, -1, [1]])
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError, match="a duration"):
        parse_duration(bad)


def test_backoff_arithmetic() -> None:
    exp = RetryPolicy(attempts=5, backoff=Backoff.EXPONENTIAL, base=10, factor=2, max=50)
    assert [exp.delay(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 50]
    lin = RetryPolicy(attempts=5, backoff=Backoff.LINEAR, base=10, factor=1, max=25)
    assert [lin.delay(n) for n in (1, 2, 3)] == [10, 20, 25]


def test_phone_is_normalised_and_validated() -> None:
    data = _base()
    data["recipients"][0]["phone"] = "+1 415 555 0101"
    assert parse_config(data).recipients[0].phone == "+14155550101"
    data["recipients"][0]["phone"] = "4155550101"
    assert any("recipients[0].phone" in e and "E.164" in e for e in _errors(data))
    data["recipients"][0]["phone"] = "+1555"
    assert any("not a valid number" in e for e in _errors(data))


def test_every_error_names_its_location() -> None:
    data = _base()
    data["recipients"].append({"id": "Bad Id", "name": "x", "email": "nope"})
    data["policies"][0]["steps"][0]["channels"] = ["voice", "fax"]
    errors = _errors(data)
    assert any(e.startswith("ackline.yaml: recipients[1].id:") for e in errors)
    assert any("recipients[1].email" in e for e in errors)
    assert any("policies[0].steps[0].channels" in e and "'fax'" in e for e in errors)


def test_dangling_references() -> None:
    data = _base()
    data["groups"][0]["members"] = ["alice", "carol"]
    data["policies"][0]["steps"][0]["recipients"] = ["dave"]
    data["policies"][0]["steps"][0]["groups"] = ["nobody"]
    errors = _errors(data)
    assert "ackline.yaml: groups[0].members[1]: unknown recipient 'carol'" in errors
    assert "ackline.yaml: policies[0].steps[0].recipients[0]: unknown recipient 'dave'" in errors
    assert "ackline.yaml: policies[0].steps[0].groups[0]: unknown group 'nobody'" in errors


def test_fallback_cycles_are_rejected() -> None:
    data = _base()
    data["channel_defaults"] = {"sms": {"attempts": 1, "fallback_channel": "voice"}}
    errors = _errors(data)
    assert any("fallback cycle voice -> telegram_voice -> sms -> voice" in e for e in errors)


def test_step_needs_targets_and_duplicates_rejected() -> None:
    data = _base()
    data["policies"].append(data["policies"][0])
    assert any("policies[1]: duplicate policy 'p'" in e for e in _errors(data))
    data["policies"][0]["steps"].append({"channels": ["sms"]})
    errors = _errors(data)
    assert any(
        "steps[1]: a step needs at least one recipient, group or schedule" in e for e in errors
    )


def test_unknown_keys_and_bad_yaml(tmp_path: Path) -> None:
    data = _base()
    data["policies"][0]["stepz"] = []
    assert any("policies[0].stepz: Extra inputs are not permitted" in e for e in _errors(data))
    bad = tmp_path / "ackline.yaml"
    bad.write_text("policies: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text(yaml.safe_dump(["a"]))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_slack_channel_is_a_contact_point_and_must_be_an_id() -> None:
    data = _base()
    data["recipients"] = [{"id": "alice", "name": "Alice", "slack_channel": "C0123ABCD"}]
    data["policies"][0]["steps"][0]["channels"] = ["slack"]
    config = parse_config(data, "ackline.yaml")
    assert config.recipients[0].slack_channel == "C0123ABCD"
    assert config.recipients[0].reachable_on("slack")
    data["recipients"][0]["slack_channel"] = "#ops"
    [error] = _errors(data)
    assert "recipients[0].slack_channel: slack channel '#ops' must be a channel" in error


def test_voice_menu_keys_default_to_resolve_on_and_snooze_off() -> None:
    data = _base()
    policy = parse_config(data).policies[0]
    assert policy.snooze is None
    data["policies"][0]["voice"] = {}
    options = parse_config(data).policies[0].voice
    assert options is not None
    assert options.resolve_key
    assert options.snooze is None
    data["policies"][0]["voice"] = {"resolve_key": False, "snooze": "15m"}
    policy = parse_config(data).policies[0]
    assert policy.voice is not None
    assert not policy.voice.resolve_key
    assert policy.snooze == 900


@pytest.mark.parametrize("bad", ["30s", "90s", "25h", 0])
def test_snooze_is_whole_minutes_within_a_day(bad: object) -> None:
    data = _base()
    data["policies"][0]["voice"] = {"snooze": bad}
    with pytest.raises(ConfigError, match="snooze must be whole minutes"):
        parse_config(data)


def test_every_contact_field_is_carried_from_config_to_table_to_channel() -> None:
    """A contact field missing from one of them would silently never reach its channel."""
    from dataclasses import fields

    from escalation.channels.base import ContactPoint
    from escalation.config import CONTACT_FIELDS, Recipient
    from escalation.core import contact_point
    from storage.models import RecipientRow

    assert set(CONTACT_FIELDS) <= set(Recipient.model_fields)
    assert set(CONTACT_FIELDS) <= {f.name for f in fields(ContactPoint)}
    assert set(CONTACT_FIELDS) <= set(RecipientRow.model_fields)
    from api.web.console_admin import CONTACT_LABELS

    assert list(CONTACT_LABELS) == list(CONTACT_FIELDS)  # the console's form and list
    values = {
        "phone": "+14155550100",
        "telegram_chat_id": "12345",
        "email": "oncall@example.org",
        "webhook_url": "https://hooks.example.org/p",
        "slack_channel": "C0123ABCD",
    }
    assert set(values) == set(CONTACT_FIELDS), "give the new contact field a value here"
    contact = contact_point(Recipient(id="ann", name="Ann", **values))
    assert {name: getattr(contact, name) for name in CONTACT_FIELDS} == values
