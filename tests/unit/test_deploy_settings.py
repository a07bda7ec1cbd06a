"""Settings a container deployment relies on: the advertised SIP address, the RTP port
range and secrets read from files (Docker secrets)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from api.settings import Settings, parse_rtp_ports, with_file_secrets
from bench.ports import free_port
from gateway.call import Gateway, GatewayConfig, advertised_address
from gateway.media.pacer import Pacer
from gateway.media.session import MediaSession, NoFreeRtpPort


def test_rtp_ports_come_from_the_environment() -> None:
    assert Settings.from_env({}).rtp_ports == (20000, 30000)
    assert Settings.from_env({"ACKLINE_RTP_PORTS": " 40000-40999 "}).rtp_ports == (40000, 40999)
    assert parse_rtp_ports("20000-20001") == (20000, 20001)


@pytest.mark.parametrize(
    "text",
    ["", "20000", "20000-", "-20000", "a-b", "20000:30000", "30000-20000", "20000-20000",
     "20001-30000", "1000-2000", "60000-70000", "20000-30000-40000"],
)  # fmt: skip
def test_bad_rtp_port_ranges_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="ACKLINE_RTP_PORTS"):
        parse_rtp_ports(text)
    if text:
        with pytest.raises(ValueError, match="ACKLINE_RTP_PORTS"):
            Settings.from_env({"ACKLINE_RTP_PORTS": text})


def test_secrets_can_come_from_files(tmp_path: Path) -> None:
    keys = tmp_path / "api_keys"
    keys.write_text("k1:acme,k2:globex\n")
    ack = tmp_path / "ack_secret"
    ack.write_text("  s3cret\n")
    db = tmp_path / "database_url"
    db.write_text("postgresql://ackline:pw@pg-a:5432,pg-b:5432/ackline\n")
    settings = Settings.from_env(
        {
            "ACKLINE_API_KEYS_FILE": str(keys),
            "ACKLINE_ACK_SECRET_FILE": str(ack),
            "ACKLINE_DATABASE_URL_FILE": str(db),
        }
    )
    assert settings.api_keys == {"k1": "acme", "k2": "globex"}
    assert settings.ack_secret == "s3cret"
    assert settings.database_url == "postgresql://ackline:pw@pg-a:5432,pg-b:5432/ackline"


def test_file_secrets_are_refused_when_ambiguous_or_unreadable(tmp_path: Path) -> None:
    secret = tmp_path / "ack_secret"
    secret.write_text("from-file")
    with pytest.raises(ValueError, match="not both"):
        Settings.from_env({"ACKLINE_ACK_SECRET": "x", "ACKLINE_ACK_SECRET_FILE": str(secret)})
    with pytest.raises(ValueError, match="ACKLINE_API_KEYS_FILE: cannot read"):
        Settings.from_env({"ACKLINE_API_KEYS_FILE": str(tmp_path / "missing")})
    env = {"ACKLINE_ACK_SECRET": "plain"}
    assert with_file_secrets(env) is env  # nothing to read: the environment as it is


def test_a_wildcard_bind_needs_an_advertised_address() -> None:
    assert advertised_address("127.0.0.1", None) == "127.0.0.1"
    assert advertised_address("0.0.0.0", "192.0.2.10") == "192.0.2.10"
    assert advertised_address("::", "[2001:db8::1]") == "2001:db8::1"
    for host in ("0.0.0.0", "::", "[::]"):
        with pytest.raises(ValueError, match="--advertise"):
            advertised_address(host, None)
        with pytest.raises(ValueError, match="--advertise"):
            GatewayConfig(host=host)
    with pytest.raises(ValueError, match="not an IP address"):
        advertised_address("0.0.0.0", "sip.example.com")
    with pytest.raises(ValueError, match="wildcard"):
        advertised_address("0.0.0.0", "0.0.0.0")
    config = GatewayConfig(host="0.0.0.0", advertise="198.51.100.7")
    assert config.advertised_host == "198.51.100.7"


async def test_via_and_contact_carry_the_advertised_address_and_the_bound_port() -> None:
    config = GatewayConfig(host="127.0.0.1", advertise="192.0.2.44", udp_port=0, tcp_port=0)
    async with Gateway(config) as gateway:
        for kind in ("udp", "tcp"):
            bound_host, bound_port = gateway.address(kind)
            assert bound_host == "127.0.0.1"
            via = gateway.endpoint.via(kind)
            contact = gateway.endpoint.contact(kind)
            assert (via.host, via.port) == ("192.0.2.44", bound_port)
            assert (contact.uri.host, contact.uri.port) == ("192.0.2.44", bound_port)


async def test_an_exhausted_rtp_range_is_named_in_the_error() -> None:
    port = free_port()  # even: the range's only RTP port
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", port))
        pacer = Pacer(20)
        media = MediaSession(local_host="127.0.0.1", pacer=pacer, port_range=(port, port + 1))
        with pytest.raises(NoFreeRtpPort, match=f"^no free RTP port in {port}-{port + 1}$"):
            await media.open()
        await pacer.stop()


def test_every_setting_reads_its_variable_and_empty_ones_count_as_unset() -> None:
    env = {
        "DATABASE_URL": "postgresql://db/other",  # the generic name, read when the own one is unset
        "ACKLINE_AUDIT_FSYNC": "yes",
        "ACKLINE_EMBEDDED_WORKER": "false",
        "TWILIO_FROM_NUMBERS": "+15550100, +15550101,",
        "ACKLINE_API_KEYS": "k1:acme",
        "ACKLINE_SMTP_PORT": "2525",
        "ACKLINE_VOICE_TARGET": "",
        "ACKLINE_LEASE_SECONDS": "",
    }
    settings = Settings.from_env(env)
    assert settings.database_url == "postgresql://db/other"
    assert settings.audit_fsync is True
    assert settings.embedded_worker is False
    assert settings.twilio_from_numbers == ("+15550100", "+15550101")
    assert settings.api_keys == {"k1": "acme"}
    assert settings.smtp_port == 2525
    assert settings.voice_target is None
    assert settings.lease_seconds == 30.0
    both = {"ACKLINE_DATABASE_URL": "postgresql://db/own", "DATABASE_URL": "postgresql://x/y"}
    assert Settings.from_env(both).database_url == "postgresql://db/own"


def test_a_malformed_variable_is_refused_by_name_instead_of_read_as_a_default() -> None:
    for name, value in [("ACKLINE_AUDIT_FSYNC", "maybe"), ("ACKLINE_SIP_PORT", "5o60"),
                        ("ACKLINE_LEASE_SECONDS", "thirty")]:  # fmt: skip
        with pytest.raises(ValueError, match=name):
            Settings.from_env({name: value})


def test_settings_built_in_code_ignore_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ACKLINE_SIP_PORT", "5999")
    assert Settings().sip_port == 5060
    assert Settings(sip_port=5070).sip_port == 5070
    assert Settings.from_env().sip_port == 5999
