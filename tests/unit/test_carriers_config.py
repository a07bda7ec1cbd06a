"""The carriers: YAML section: a full example loads; mistakes give errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
from phonenumbers import PhoneNumberType

from carriers.config import CarrierConfigError, load_carriers
from carriers.registration import register_target
from carriers.trunk import NumberFormat
from common.durations import parse_duration

EXAMPLE = """
carriers:
  strategy: weighted
  allowed_countries: [US, ca]
  probe: {interval: 500ms, down_after: 4, up_after: 3}
  breaker: {failures: 5, cooldown: 1m}
  trunks:
    - name: primary
      host: 127.0.0.1
      port: 5090
      transport: tcp
      caller_id: "+14155550100"
      weight: 3
      priority: 10
      trying_timeout: 1.5
      max_concurrent: 20
      max_cps: 5
    - name: backup
      host: sip.backup.example
      username: acct-1
      password_env: ACKLINE_TEST_TRUNK_PASSWORD
      number_format: tech_prefix
      tech_prefix: "0101#"
      allowed_countries: [US]
      enabled: false
    - name: cloud
      kind: twilio
      account_sid: AC0123456789abcdef0123456789abcdef
      auth_token_env: ACKLINE_TEST_TWILIO_TOKEN
      caller_id: "+14155550109"
      priority: 20
"""


def test_full_example_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACKLINE_TEST_TRUNK_PASSWORD", "not-a-real-secret")
    monkeypatch.setenv("ACKLINE_TEST_TWILIO_TOKEN", "not-a-real-token")
    config = load_carriers(EXAMPLE)
    assert config.strategy == "weighted"
    assert config.allowed_countries == ("US", "CA")
    assert config.probe.interval == 0.5
    assert config.probe.down_after == 4
    policy = config.health_policy()
    assert (policy.down_after, policy.up_after) == (4, 3)
    assert (policy.breaker_failures, policy.breaker_cooldown) == (5, 60.0)
    primary, backup, cloud = config.trunks
    assert cloud.kind == "twilio"
    assert cloud.host is None
    assert cloud.auth_token is not None
    assert cloud.auth_token.get_secret_value() == "not-a-real-token"
    assert "not-a-real-token" not in config.model_dump_json()
    assert primary.transport == "tcp"
    assert primary.weight == 3
    assert primary.trying_timeout == 1.5
    assert primary.max_cps == 5
    assert primary.max_concurrent == 20
    assert backup.number_format is NumberFormat.TECH_PREFIX
    assert not backup.enabled
    assert backup.password is not None
    assert backup.password.get_secret_value() == "not-a-real-secret"
    assert "not-a-real-secret" not in repr(config)
    assert "not-a-real-secret" not in str(config)
    assert "not-a-real-secret" not in config.model_dump_json()
    monkeypatch.delenv("ACKLINE_TEST_TWILIO_TOKEN")
    with pytest.raises(CarrierConfigError, match="auth_token_env ACKLINE_TEST_TWILIO_TOKEN"):
        load_carriers(EXAMPLE)
    assert PhoneNumberType.PREMIUM_RATE in config.refused_type_values()


def test_loads_from_a_file_and_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "ackline.yaml"
    path.write_text(
        "carriers:\n  allowed_countries: [US]\n  trunks:\n    - {name: a, host: 127.0.0.1}\n"
    )
    config = load_carriers(path)
    assert config.strategy == "priority"
    assert config.trunks[0].port == 5060
    mapping = {"carriers": {"allowed_countries": ["US"], "trunks": [{"name": "a", "host": "x"}]}}
    assert load_carriers(mapping).trunks[0].host == "x"


def errors_of(text: str) -> str:
    with pytest.raises(CarrierConfigError) as info:
        load_carriers(text)
    return str(info.value)


BASE = "carriers:\n  allowed_countries: [US]\n"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("other: {}\n", "no carriers: section"),
        ("carriers: [1, 2]\n", "must be a mapping"),
        ("carriers: {trunks: [\n", "invalid YAML"),
        (BASE, "carriers.trunks: Field required"),
        (BASE + "  trunks: []\n", "carriers.trunks: List should have at least 1 item"),
        (
            "carriers:\n  trunks: [{name: a, host: h}]\n",
            "carriers.allowed_countries: Field required",
        ),
        (
            "carriers:\n  allowed_countries: []\n  trunks: [{name: a, host: h}]\n",
            "carriers.allowed_countries",
        ),
        (
            "carriers:\n  allowed_countries: [US, XX]\n  trunks: [{name: a, host: h}]\n",
            "unknown ISO 3166 alpha-2 country code(s): XX",
        ),
        (
            "carriers:\n  allowed_countries: US\n  trunks: [{name: a, host: h}]\n",
            "carriers.allowed_countries: allowed_countries is a list",
        ),
        (
            BASE + "  trunks: [{name: a, host: h, allowed_countries: [us, zz]}]\n",
            "carriers.trunks[0] (a).allowed_countries: unknown ISO 3166 alpha-2 "
            "country code(s): ZZ",
        ),
        (
            BASE + "  trunks:\n    - {name: a, host: h}\n    - {name: b, host: h, port: 99999}\n",
            "carriers.trunks[1] (b).port: Input should be less than or equal to 65535",
        ),
        (
            BASE + "  trunks:\n    - {name: tw, host: h, kind: twilio}\n",
            "carriers.trunks[0] (tw): a twilio trunk needs account_sid",
        ),
        (BASE + "  strategy: fastest\n  trunks: [{name: a, host: h}]\n", "carriers.strategy"),
        (BASE + "  trunks: [{name: a, host: h}, {name: a, host: h2}]\n", "duplicate trunk"),
        (BASE + "  trunks: [{name: a, host: h, enabled: false}]\n", "every trunk is disabled"),
        (BASE + "  trunks: [{name: a, host: h, prot: 5060}]\n", "carriers.trunks[0] (a).prot"),
        (BASE + "  trunks: [{name: a, host: h}]\n  probe: {interval: soon}\n", "duration"),
        (BASE + "  trunks: [{name: a, host: h}]\n  probe: {down_after: 0}\n", "down_after"),
        (BASE + "  trunks: [{name: a, host: h}]\n  refused_types: [cheap]\n", "unknown number"),
        (BASE + "  trunks: [{name: a, host: h}]\n  colour: blue\n", "carriers.colour"),
        (
            BASE + "  trunks: [{name: a, host: h, password_env: ACKLINE_TEST_UNSET_VAR}]\n",
            "ACKLINE_TEST_UNSET_VAR is not set",
        ),
    ],
)
def test_validation_errors_name_the_key(yaml_text: str, expected: str) -> None:
    message = errors_of(yaml_text)
    assert expected in message, message


def test_every_problem_is_listed() -> None:
    message = errors_of(
        BASE + "  trunks:\n    - {name: a, host: h, port: 0}\n    - {name: b, host: h, weight: 0}\n"
    )
    assert "trunks[0] (a).port" in message
    assert "trunks[1] (b).weight" in message


def test_parse_duration() -> None:
    assert parse_duration(2) == 2.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("2m") == 120.0
    assert parse_duration("3") == 3.0
    for bad in ("fast", True, None, "-1s"):
        with pytest.raises(ValueError, match="a duration is a number of seconds"):
            parse_duration(bad)


def _tls_trunk(extra: str) -> str:
    return (
        "carriers:\n  allowed_countries: [US]\n  trunks:\n"
        f"    - {{name: secure, host: sip.carrier.example, transport: tls{extra}}}\n"
    )


def test_a_tls_trunk_defaults_to_port_5061_and_verifies_with_system_cas() -> None:
    trunk = load_carriers(_tls_trunk("")).trunks[0]
    assert trunk.port == 5061
    assert (
        trunk.request_uri("+14155550100")
        == "sip:+14155550100@sip.carrier.example:5061;transport=tls"
    )
    tls = trunk.tls_client()
    assert tls is not None
    assert tls.verify
    assert tls.ca_file is None
    assert load_carriers(_tls_trunk(", port: 5081")).trunks[0].port == 5081


def test_a_tls_trunk_takes_a_ca_file_and_client_certificate(tmp_path: Path) -> None:
    for name in ("ca.pem", "me.pem", "me.key"):
        (tmp_path / name).write_text("placeholder\n")
    extra = (f", tls: {{ca_file: {tmp_path}/ca.pem, client_cert: {tmp_path}/me.pem, "
             f"client_key: {tmp_path}/me.key, server_name: sip.example}}")  # fmt: skip
    tls = load_carriers(_tls_trunk(extra)).trunks[0].tls_client()
    assert tls is not None
    assert (tls.ca_file, tls.server_name, tls.verify) == (tmp_path / "ca.pem", "sip.example", True)
    assert tls.client_key == tmp_path / "me.key"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        (_tls_trunk(", tls: {ca_file: /nonexistent/ca.pem}"), "tls.ca_file /nonexistent/ca.pem"),
        (_tls_trunk(", tls: {verfy: false}"), "verfy"),
        (
            "carriers:\n  allowed_countries: [US]\n  trunks:\n"
            "    - {name: plain, host: 192.0.2.1, tls: {verify: false}}\n",
            "tls: settings need transport: tls",
        ),
    ],
)
def test_bad_tls_settings_are_named(yaml_text: str, expected: str) -> None:
    assert expected in errors_of(yaml_text)


def test_a_tls_trunk_registers_over_tls_verified_with_its_ca_file(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("placeholder\n")
    extra = f", username: u, password: p, register: true, tls: {{ca_file: {tmp_path}/ca.pem}}"
    target = register_target(load_carriers(_tls_trunk(extra)).trunks[0])
    assert target.transport == "tls"
    assert str(target.registrar).endswith(";transport=tls")
    assert target.tls is not None
    assert target.tls.ca_file == tmp_path / "ca.pem"


def test_srtp_per_trunk_needs_tls_unless_allowed() -> None:
    trunk = load_carriers(_tls_trunk(", srtp: required")).trunks[0]
    assert trunk.srtp_policy().mode_over("tls").value == "required"
    assert "use transport tls" in errors_of(
        "carriers:\n  allowed_countries: [US]\n  trunks:\n"
        "    - {name: plain, host: 192.0.2.1, srtp: optional}\n"
    )
    lab = load_carriers(
        "carriers:\n  allowed_countries: [US]\n  trunks:\n"
        "    - {name: lab, host: 192.0.2.1, srtp: optional, srtp_without_tls: true}\n"
    ).trunks[0]
    assert lab.srtp_policy().mode_over("udp").value == "optional"
    assert "srtp" in errors_of(_tls_trunk(", srtp: maybe"))


def test_session_timer_per_trunk_with_rfc_4028_floor() -> None:
    head = "carriers:\n  allowed_countries: [US]\n  trunks:\n"
    default = load_carriers(head + "    - {name: a, host: 192.0.2.1}\n").trunks[0]
    assert (default.session_timer().session_expires, default.session_timer().min_se) == (
        1800,
        90,
    )
    trunk = load_carriers(
        head + "    - {name: a, host: 192.0.2.1, session_expires: 600, min_se: 300}\n"
    ).trunks[0]
    assert (trunk.session_timer().session_expires, trunk.session_timer().min_se) == (600, 300)
    assert "session_expires" in errors_of(
        head + "    - {name: a, host: 192.0.2.1, session_expires: 60}\n"
    )
    assert "min_se" in errors_of(head + "    - {name: a, host: 192.0.2.1, min_se: 30}\n")
    assert "below min_se" in errors_of(
        head + "    - {name: a, host: 192.0.2.1, session_expires: 120, min_se: 300}\n"
    )
