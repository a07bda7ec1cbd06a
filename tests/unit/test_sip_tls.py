"""SIP over TLS between two gateways on loopback, with a CA and certificate made per run."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest
from sipmessage import URI

from gateway.call import Call, Gateway, GatewayConfig, parse_target, target_transport
from gateway.media.dtmf import DtmfMethod
from gateway.result import CallOutcome, CallResult
from gateway.sip.transaction import TimerSettings
from gateway.tls import TlsClientSettings, TlsServerSettings
from tests.tls_certs import PkiFiles, make_pki
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return make_pki(tmp_path_factory.mktemp("other-pki"), name="other")


def server_config(pki: PkiFiles) -> GatewayConfig:
    return GatewayConfig(udp_port=None, tls_port=0, tls=TlsServerSettings(pki.cert, pki.key))


async def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    await wait_until(predicate, timeout, interval=0.02)


class Answerer:
    """An inbound handler that waits for two digits, remembering the call it got."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.digits: list[str] = []
        self.ended: list[CallResult] = []

    async def __call__(self, call: Call) -> None:
        self.calls.append(call)
        self.digits.append(await call.collect(max_digits=2, timeout=8))
        await asyncio.sleep(0.3)  # let the caller's last end packets go before the BYE


def _caller(**extra: object) -> Gateway:
    return Gateway(GatewayConfig(udp_port=None, tcp_port=None, **extra))  # type: ignore[arg-type]


async def _dial(
    server: Gateway, caller: Gateway, tls: TlsClientSettings, scheme: str = "sips"
) -> Call:
    host, port = server.address("tls")
    target = f"{scheme}:hotline@{host}:{port}" + (";transport=tls" if scheme == "sip" else "")
    return await caller.dial(target, tls=tls, ring_timeout=5)


async def test_a_call_over_tls_carries_dtmf_and_uses_sips(pki: PkiFiles) -> None:
    answerer = Answerer()
    server = Gateway(server_config(pki), on_incoming=answerer, on_call_ended=answerer.ended.append)
    async with server, _caller() as caller:
        call = await _dial(server, caller, TlsClientSettings(ca_file=pki.ca_cert))
        assert call.answered, call.result
        await call.send_digits("42")
        await _wait_for(lambda: bool(answerer.ended))
        result = await call.wait_ended(5)
        inbound = answerer.calls[0]
        assert inbound.sips
        assert inbound.peer.transport == "tls"
        assert inbound.dialog is not None
        assert str(inbound.dialog.contact.uri).startswith("sips:")
        assert caller.endpoint.transport.stats.tcp_connections == 1  # one connection, reused
    assert answerer.digits == ["42"]
    assert result.transport == "tls"
    assert result.hangup_by == "remote"
    assert answerer.ended[0].transport == "tls"


async def test_a_method_that_cannot_send_is_refused_before_any_key_goes_out(
    pki: PkiFiles,
) -> None:
    answerer = Answerer()
    server = Gateway(server_config(pki), on_incoming=answerer, on_call_ended=answerer.ended.append)
    async with server, _caller() as caller:
        call = await _dial(server, caller, TlsClientSettings(ca_file=pki.ca_cert))
        assert call.answered, call.result
        with pytest.raises(ValueError, match="unknown DTMF method 'tones'"):
            await call.send_digits("9", method="tones")
        with pytest.raises(ValueError, match="cannot send"):
            await call.send_digits("8", method=DtmfMethod.TWILIO_GATHER)
        await call.send_digits("42", method="rfc4733")  # a flow's plain string is accepted
        await _wait_for(lambda: bool(answerer.ended))
    assert answerer.digits == ["42"]


async def test_sip_uri_with_transport_tls_gets_a_sip_contact(pki: PkiFiles) -> None:
    answerer = Answerer()
    async with Gateway(server_config(pki), on_incoming=answerer) as server, _caller() as caller:
        call = await _dial(server, caller, TlsClientSettings(ca_file=pki.ca_cert), scheme="sip")
        assert call.answered, call.result
        assert call.dialog is not None
        await _wait_for(lambda: bool(answerer.calls))
        assert not call.sips
        assert not answerer.calls[0].sips
        await call.hangup()


async def test_a_certificate_from_another_ca_is_refused_with_the_reason(
    pki: PkiFiles, other_pki: PkiFiles
) -> None:
    async with Gateway(server_config(pki), on_incoming=Answerer()) as server, _caller() as caller:
        call = await _dial(server, caller, TlsClientSettings(ca_file=other_pki.ca_cert))
        assert call.result is not None
        assert not call.answered
        assert not call.responded.is_set()
        assert call.result.outcome is CallOutcome.FAILED
        assert "TLS certificate verification failed" in call.result.reason
        assert "unable to get local issuer certificate" in call.result.reason
        assert server.calls == {}


async def test_a_name_the_certificate_does_not_hold_is_refused(pki: PkiFiles) -> None:
    tls = TlsClientSettings(ca_file=pki.ca_cert, server_name="carrier.invalid")
    async with Gateway(server_config(pki), on_incoming=Answerer()) as server, _caller() as caller:
        call = await _dial(server, caller, tls)
        assert call.result is not None
        assert "TLS certificate verification failed" in call.result.reason
        assert "carrier.invalid" in call.result.reason


async def test_verification_can_be_turned_off_explicitly(
    pki: PkiFiles, other_pki: PkiFiles
) -> None:
    tls = TlsClientSettings(ca_file=other_pki.ca_cert, verify=False)
    answerer = Answerer()
    async with Gateway(server_config(pki), on_incoming=answerer) as server, _caller() as caller:
        call = await _dial(server, caller, tls)
        assert call.answered, call.result
        await call.hangup()


async def test_the_system_cas_do_not_trust_a_private_ca(pki: PkiFiles) -> None:
    async with Gateway(server_config(pki), on_incoming=Answerer()) as server, _caller() as caller:
        call = await _dial(server, caller, TlsClientSettings())
        assert call.result is not None
        assert "verification failed" in call.result.reason


async def test_a_peer_that_never_finishes_the_handshake_is_given_up(pki: PkiFiles) -> None:
    """A plain TCP listener that accepts and stays silent: bounded by the connect timeout."""
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with _caller() as caller:
            caller.endpoint.transport.connect_timeout = 0.5
            loop = asyncio.get_running_loop()
            started = loop.time()
            call = await caller.dial(
                f"sips:x@127.0.0.1:{port}", tls=TlsClientSettings(ca_file=pki.ca_cert)
            )
            assert loop.time() - started < 3
            assert call.result is not None
            assert "timed out" in call.result.reason
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_mutual_tls_needs_the_client_certificate(pki: PkiFiles, other_pki: PkiFiles) -> None:
    settings = TlsServerSettings(pki.cert, pki.key, client_ca_file=other_pki.ca_cert)
    config = GatewayConfig(udp_port=None, tls_port=0, tls=settings)
    answerer = Answerer()
    # TLS 1.3 clients finish their handshake before the server checks their certificate:
    # the refusal closes the connection under the INVITE, which then times out (timer B).
    fast = TimerSettings(t1=0.05, t2=0.2)
    async with Gateway(config, on_incoming=answerer) as server, _caller(timers=fast) as caller:
        without = await _dial(server, caller, TlsClientSettings(ca_file=pki.ca_cert))
        assert not without.answered
        assert server.calls == {}
        assert not answerer.calls
        with_cert = TlsClientSettings(
            ca_file=pki.ca_cert, client_cert=other_pki.cert, client_key=other_pki.key
        )
        caller.endpoint.transport.connect_timeout = 5.0
        call = await _dial(server, caller, with_cert)
        assert call.answered, call.result
        await call.hangup()


def test_sips_targets_go_over_tls_and_only_tls() -> None:
    assert target_transport(parse_target("sips:bob@127.0.0.1")) == "tls"
    assert target_transport(parse_target("sip:bob@127.0.0.1;transport=tls")) == "tls"
    assert target_transport(parse_target("sip:bob@127.0.0.1")) == "udp"
    assert target_transport(URI.parse("sip:bob@127.0.0.1"), "tls") == "tls"
    with pytest.raises(ValueError, match="reached over TLS"):
        parse_target("sips:bob@127.0.0.1;transport=udp")
    with pytest.raises(ValueError, match="reached over TLS"):
        target_transport(parse_target("sips:bob@127.0.0.1"), "tcp")
    with pytest.raises(ValueError, match="unsupported transport"):
        parse_target("sip:bob@127.0.0.1;transport=sctp")


async def test_resolving_a_sips_target_defaults_to_port_5061() -> None:
    from gateway.call import resolve_target

    peer = await resolve_target(parse_target("sips:bob@127.0.0.1"), "tls")
    assert (peer.transport, peer.port) == ("tls", 5061)


def test_listening_on_tls_needs_a_certificate() -> None:
    with pytest.raises(ValueError, match="tls_port needs tls"):
        GatewayConfig(tls_port=0)


async def test_an_unreadable_certificate_fails_at_start(tmp_path: Path) -> None:
    from gateway.transport import TransportError

    config = GatewayConfig(udp_port=None, tls_port=0, tls=TlsServerSettings(tmp_path / "no.pem"))
    with pytest.raises(TransportError, match="cannot load the TLS certificate"):
        async with Gateway(config):
            pass
