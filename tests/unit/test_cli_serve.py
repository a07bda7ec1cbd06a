"""`ackline serve` helpers that need no sockets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from api.cli import _local_api_key
from api.settings import Settings
from gateway.media.srtp import SrtpMode


def test_local_api_key_is_private_and_survives_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump({"company": "acme"}))
    settings = Settings(audit_dir=tmp_path / "var" / "audit", config_path=config)

    first = _local_api_key(settings)
    second = _local_api_key(settings)

    key_file = tmp_path / "var" / "api-key"
    assert first == second
    [(key, company)] = first.items()
    assert company == "acme"
    assert len(key) >= 32
    assert key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in capsys.readouterr().err


def test_fault_bounds_come_from_the_environment_and_bad_ones_are_refused() -> None:
    env = {
        "ACKLINE_DRAIN_TIMEOUT": "4",
        "ACKLINE_VOICE_MAX_CALL": "120",
        "ACKLINE_SIP_T1": "0.05",
        "ACKLINE_SIP_MAX_CALL": "900",
        "ACKLINE_SIP_MAX_INBOUND_CALLS": "50",
    }
    settings = Settings.from_env(env)
    assert (settings.drain_timeout, settings.voice_max_call) == (4.0, 120.0)
    assert (settings.sip_t1, settings.sip_max_call, settings.sip_max_inbound_calls) == (
        0.05,
        900.0,
        50,
    )
    defaults = Settings.from_env({})
    assert (defaults.drain_timeout, defaults.sip_t1, defaults.sip_max_inbound_calls) == (
        10.0,
        0.5,
        500,
    )
    for name, value in [("ACKLINE_DRAIN_TIMEOUT", "0"), ("ACKLINE_SIP_T1", "9"),
                        ("ACKLINE_SIP_MAX_INBOUND_CALLS", "0")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: value})


def test_session_timer_settings_come_from_the_environment_with_the_rfc_floor() -> None:
    settings = Settings.from_env(
        {"ACKLINE_SIP_SESSION_EXPIRES": "600", "ACKLINE_SIP_MIN_SE": "120"}
    )
    assert (settings.sip_session_expires, settings.sip_min_se) == (600, 120)
    defaults = Settings.from_env({})
    assert (defaults.sip_session_expires, defaults.sip_min_se) == (1800, 90)
    for name in ("ACKLINE_SIP_SESSION_EXPIRES", "ACKLINE_SIP_MIN_SE"):
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: "60"})  # below RFC 4028's 90 s


def test_inbound_srtp_policy_comes_from_the_environment_default_optional() -> None:
    assert Settings.from_env({}).sip_srtp is SrtpMode.OPTIONAL
    assert Settings.from_env({"ACKLINE_SIP_SRTP": "required"}).sip_srtp is SrtpMode.REQUIRED
    assert Settings.from_env({"ACKLINE_SIP_SRTP": " Off "}).sip_srtp is SrtpMode.OFF
    with pytest.raises(ValueError, match="ACKLINE_SIP_SRTP must be one of required"):
        Settings.from_env({"ACKLINE_SIP_SRTP": "requird"})
