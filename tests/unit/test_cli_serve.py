"""`ackline serve` helpers that need no sockets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from api.cli import EXIT_BAD_INPUT, Role, _inbound_srtp, _local_api_key, app
from api.settings import Settings, inbound_srtp
from carriers.trunk import Trunk
from escalation.config import ConfigError, parse_config
from escalation.unit_of_work import StorePath
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


def test_inbound_srtp_policy_from_the_environment_unset_by_default() -> None:
    assert Settings.from_env({}).sip_srtp is None  # then the file, else optional
    assert Settings.from_env({"ACKLINE_SIP_SRTP": ""}).sip_srtp is None
    assert Settings.from_env({"ACKLINE_SIP_SRTP": "required"}).sip_srtp is SrtpMode.REQUIRED
    assert Settings.from_env({"ACKLINE_SIP_SRTP": " Off "}).sip_srtp is SrtpMode.OFF
    with pytest.raises(ValueError, match="ACKLINE_SIP_SRTP must be one of required"):
        Settings.from_env({"ACKLINE_SIP_SRTP": "requird"})


def test_inbound_srtp_precedence_is_cli_then_environment_then_file_then_optional() -> None:
    req, opt, off = SrtpMode.REQUIRED, SrtpMode.OPTIONAL, SrtpMode.OFF
    assert inbound_srtp(None, None, None) is SrtpMode.OPTIONAL
    assert inbound_srtp(None, None, off) is off
    assert inbound_srtp(None, req, off) is req
    assert inbound_srtp(opt, req, off) is opt
    assert inbound_srtp(off, None, req) is off


def test_inbound_srtp_in_the_file_and_bad_values_there(tmp_path: Path) -> None:
    assert parse_config({"inbound_srtp": "required"}).inbound_srtp is SrtpMode.REQUIRED
    assert parse_config({}).inbound_srtp is None
    # YAML 1.1 reads a bare off as false; it means off here, as it does for a trunk
    assert parse_config(yaml.safe_load("inbound_srtp: off")).inbound_srtp is SrtpMode.OFF
    trunk = {"name": "t", "host": "192.0.2.1", "srtp": False}
    assert Trunk.model_validate(trunk).srtp is SrtpMode.OFF
    with pytest.raises(ConfigError, match="inbound_srtp"):
        parse_config({"inbound_srtp": True})
    with pytest.raises(ConfigError, match="inbound_srtp"):
        parse_config({"inbound_srtp": "mandatory"})


@pytest.mark.parametrize(
    ("cli", "env", "in_file", "role", "expected"),
    [
        (None, None, None, Role.GATEWAY, SrtpMode.OPTIONAL),
        (None, None, "required", Role.GATEWAY, SrtpMode.REQUIRED),
        (None, "off", "required", Role.GATEWAY, SrtpMode.OFF),
        (SrtpMode.OPTIONAL, "off", "required", Role.ALL, SrtpMode.OPTIONAL),
        (None, None, "required", Role.WORKER, SrtpMode.REQUIRED),
    ],
)
def test_serve_resolves_its_inbound_srtp_from_cli_environment_and_file(
    tmp_path: Path,
    cli: SrtpMode | None,
    env: str | None,
    in_file: str | None,
    role: Role,
    expected: SrtpMode,
) -> None:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump({"inbound_srtp": in_file} if in_file else {}))
    settings = Settings.from_env(
        {"ACKLINE_CONFIG": str(config), **({"ACKLINE_SIP_SRTP": env} if env else {})}
    )
    assert _inbound_srtp(role, cli, settings) is expected


def test_serve_refuses_bad_srtp_values_from_each_source(tmp_path: Path) -> None:
    runner = CliRunner()
    clean = {"ACKLINE_CONFIG": "", "ACKLINE_SIP_SRTP": ""}
    bad_cli = runner.invoke(app, ["serve", "--role", "gateway", "--srtp", "maybe"], env=clean)
    assert bad_cli.exit_code == 2
    assert "Invalid value for '--srtp'" in bad_cli.output
    assert "'maybe' is not one of" in bad_cli.output

    bad_env = runner.invoke(
        app, ["serve", "--role", "gateway"], env={**clean, "ACKLINE_SIP_SRTP": "requird"}
    )
    assert bad_env.exit_code == EXIT_BAD_INPUT
    assert "ACKLINE_SIP_SRTP must be one of required, optional, off" in bad_env.output

    config = tmp_path / "ackline.yaml"
    config.write_text("inbound_srtp: mandatory\n")
    bad_file = runner.invoke(
        app, ["serve", "--role", "gateway"], env={**clean, "ACKLINE_CONFIG": str(config)}
    )
    assert bad_file.exit_code == EXIT_BAD_INPUT
    assert "inbound_srtp: Input should be 'required', 'optional' or 'off'" in bad_file.output


def test_store_path_comes_from_the_environment_default_fast() -> None:
    assert Settings.from_env({}).store_path is StorePath.FAST
    assert Settings.from_env({"ACKLINE_STORE_PATH": " Session "}).store_path is StorePath.SESSION
    with pytest.raises(ValueError, match="ACKLINE_STORE_PATH must be one of fast, session"):
        Settings.from_env({"ACKLINE_STORE_PATH": "orm"})
