"""Start-up setup warnings: each kind found from settings and configuration alone, and a
complete setup has none."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from api.settings import Settings
from api.setup_health import (
    SetupCode,
    SetupWarning,
    audit_dir_writable,
    available_channels,
    setup_warnings,
)
from escalation.config import AcklineConfig, ConfigError, parse_config

NOW = datetime(2026, 3, 18, 12, tzinfo=UTC)
EVERYTHING = {
    "voice_target": "sip:{number}@127.0.0.1:5070",
    "twilio_account_sid": "AC0123456789abcdef0123456789abcdef",
    "twilio_auth_token": "t",
    "twilio_from_numbers": ("+14155550106",),
    "telegram_bot_token": "1:x",
    "slack_bot_token": "xoxb-1",
    "smtp_host": "127.0.0.1",
    "smtp_from": "ackline@example.com",
    "webhook_secret": "s",
}


def settings(tmp_path: Path, **kw: Any) -> Settings:
    return Settings(audit_dir=tmp_path / "audit", **kw)


def config(**extra: Any) -> Any:
    base: dict[str, Any] = {
        "recipients": [
            {"id": "alice", "name": "Alice", "phone": "+14155550101", "telegram_chat_id": "42"},
            {"id": "bob", "name": "Bob", "email": "bob@example.com"},
        ],
        "groups": [{"name": "ops", "members": ["alice", "bob"]}],
        "policies": [{"name": "critical", "steps": [
            {"recipients": ["alice"], "channels": ["voice"], "delay": "5m"},
            {"groups": ["ops"], "channels": ["sms"], "delay": "5m"},
        ]}],
    }  # fmt: skip
    return parse_config(base | extra)


def codes(found: list[SetupWarning]) -> list[tuple[SetupCode, str]]:
    return [(w.code, w.subject) for w in found]


def test_a_complete_setup_has_no_warnings(tmp_path: Path) -> None:
    s = settings(tmp_path, **EVERYTHING)
    cfg = config(policies=[{"name": "critical", "steps": [
        {"recipients": ["alice"], "channels": ["voice", "telegram"]},
    ]}])  # fmt: skip
    assert available_channels(s, cfg) == {
        "voice", "sms", "telegram", "telegram_voice", "slack", "email", "webhook"
    }  # fmt: skip
    assert setup_warnings(s, cfg, now=NOW) == []


def test_a_step_on_a_channel_without_provider_names_policy_channel_and_setting(
    tmp_path: Path,
) -> None:
    s = settings(tmp_path, **(EVERYTHING | {"twilio_account_sid": None}))
    [w] = setup_warnings(s, config(), now=NOW)
    assert w == SetupWarning(
        SetupCode.CHANNEL_UNAVAILABLE,
        "policy critical step 2 pages on sms, which is not configured: set "
        "TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_FROM_NUMBERS",
        "policy critical",
    )
    assert w.to_dict()["code"] == "channel_unavailable"


def test_a_fallback_without_provider_is_named_with_the_channel_it_backs_up(
    tmp_path: Path,
) -> None:
    # the shipped defaults: voice -> telegram_voice -> sms
    s = settings(tmp_path, **(EVERYTHING | {"telegram_bot_token": None}))
    cfg = config(policies=[{"name": "critical", "steps": [
        {"recipients": ["alice"], "channels": ["voice"]},
    ]}])  # fmt: skip
    [w] = setup_warnings(s, cfg, now=NOW)
    assert (w.code, w.subject) == (SetupCode.FALLBACK_UNAVAILABLE, "policy critical")
    assert w.message.startswith(
        "policy critical: voice falls back to telegram_voice, which is not configured: set "
        "TELEGRAM_BOT_TOKEN"
    )
    # a file default changing the fallback changes the warning
    cfg = config(
        policies=cfg.model_dump()["policies"],
        channel_defaults={"voice": {"attempts": 2, "fallback_channel": "email"}},
    )
    assert setup_warnings(s, cfg, now=NOW) == []


def test_a_recipient_without_the_contact_a_step_needs(tmp_path: Path) -> None:
    s = settings(tmp_path, **EVERYTHING)
    # step 2 pages group ops on sms: bob has only an email
    assert setup_warnings(s, config(), now=NOW) == [
        SetupWarning(
            SetupCode.NO_CONTACT,
            "policy critical step 2 pages bob (group ops) on sms, but bob has no phone",
            "recipient bob",
        )
    ]


def test_no_carrier_trunk_and_no_voice_target(tmp_path: Path) -> None:
    s = settings(tmp_path, **(EVERYTHING | {"voice_target": None}))
    found = setup_warnings(s, config(), now=NOW)
    assert codes(found)[:2] == [
        (SetupCode.NO_VOICE_ROUTE, "voice"),
        (SetupCode.CHANNEL_UNAVAILABLE, "policy critical"),
    ]
    assert "ACKLINE_VOICE_TARGET" in found[1].message
    # the file's voice_target is a route too
    cfg = config(voice_target="sip:{number}@127.0.0.1:5070")
    assert SetupCode.NO_VOICE_ROUTE not in {w.code for w in setup_warnings(s, cfg, now=NOW)}


def test_an_audit_dir_that_cannot_be_written(tmp_path: Path) -> None:
    s = settings(tmp_path, **EVERYTHING)
    cfg = config(policies=[{"name": "critical", "steps": [
        {"recipients": ["alice"], "channels": ["voice"]},
    ]}])  # fmt: skip
    found = setup_warnings(s, cfg, now=NOW, writable=lambda _p: False)
    assert codes(found) == [(SetupCode.AUDIT_DIR_NOT_WRITABLE, f"audit_dir {tmp_path / 'audit'}")]
    # the real probe: a missing directory under a writable one is fine, a file is not
    assert audit_dir_writable(tmp_path / "audit" / "deeper")
    (tmp_path / "file").write_text("")
    assert not audit_dir_writable(tmp_path / "file")
    assert not audit_dir_writable(tmp_path / "file" / "audit")


def test_a_schedule_that_puts_nobody_on_call(tmp_path: Path) -> None:
    s = settings(tmp_path, **EVERYTHING)
    layer = {"name": "l", "rotation": "weekly", "participants": ["alice"]}
    cfg = config(
        policies=[{"name": "critical", "steps": [
            {"schedules": ["later", "now"], "channels": ["voice"]},
        ]}],
        schedules=[
            {"name": "later", "time_zone": "UTC", "layers": [layer | {"start": "2026-06-01"}]},
            {"name": "now", "time_zone": "UTC", "layers": [layer | {"start": "2026-03-01"}]},
        ],
    )  # fmt: skip
    assert codes(setup_warnings(s, cfg, now=NOW)) == [(SetupCode.SCHEDULE_EMPTY, "schedule later")]


def test_the_files_voice_target_is_a_sip_template_with_the_number() -> None:
    assert config(voice_target="sip:{number}@127.0.0.1:5070").voice_target is not None
    for bad in ("sip:alice@127.0.0.1:5070", "tel:{number}"):
        with pytest.raises(ConfigError, match="voice_target is a SIP URI template"):
            config(voice_target=bad)


async def test_every_channel_but_voice_has_one_provider_and_is_built_as_announced(
    tmp_path: Path,
) -> None:
    """The registry is the one list: what the warnings call available is what a worker
    builds, and a channel the config accepts cannot lack a provider."""
    from api.channel_providers import PROVIDERS
    from api.channels import services_for
    from escalation.config import KNOWN_CHANNELS

    provided = [name for p in PROVIDERS for name in p.channels]
    assert sorted(provided) == sorted(set(KNOWN_CHANNELS) - {"voice"})
    settings = Settings(
        audit_dir=tmp_path / "audit",
        smtp_host="127.0.0.1",
        smtp_from="ackline@example.org",
        webhook_secret="s",
        twilio_account_sid="AC00000000000000000000000000000000",
        twilio_auth_token="t",  # no From numbers: sms stays off
    )
    assert available_channels(settings, AcklineConfig()) == {"email", "webhook"}
    async with services_for(settings, None) as services:
        assert set(services.channels) == {"email", "webhook"}
