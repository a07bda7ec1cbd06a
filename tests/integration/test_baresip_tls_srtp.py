"""SIP over TLS with SDES SRTP against baresip (its own TLS stack and libsrtp), both ways.

baresip runs with ``mediaenc=srtp-mand``: it offers and accepts only RTP/SAVP with
a=crypto, so a call that carries audio and RFC 4733 digits at all carried them as SRTP.
The CA and certificates are made for this run (tests/tls_certs.py); nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import wave
from pathlib import Path

import numpy as np
import pytest

from api.voice_channel import classify_call
from escalation.channels.base import DeliveryStatus
from gateway.call import Call, Gateway, GatewayConfig
from gateway.media.srtp import SrtpMode, SrtpPolicy
from gateway.result import CallOutcome, CallResult, FailureCause
from gateway.tls import TlsClientSettings, TlsServerSettings
from tests.integration.baresip_peer import baresip_uac, baresip_uas
from tests.tls_certs import PkiFiles, make_pki
from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]


def _tone(seconds: float, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def _rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


def _wav_rms(path: Path) -> float:
    with wave.open(str(path)) as wav:
        frames = wav.readframes(wav.getnframes())
    return _rms(np.frombuffer(frames, dtype=np.int16))


@pytest.fixture
def pki(tmp_path: Path) -> PkiFiles:
    return make_pki(tmp_path / "pki")


async def test_gateway_calls_baresip_over_tls_with_srtp(tmp_path: Path, pki: PkiFiles) -> None:
    with baresip_uas(
        tmp_path, transport="tls", certificate=pki.bundle, mediaenc="srtp-mand",
        dtmf="1", dtmf_delay_s=1.5, record=True,
    ) as peer:  # fmt: skip
        async with Gateway(
            GatewayConfig(host="127.0.0.1", udp_port=None, media_history_seconds=10.0)
        ) as gateway:
            call = await gateway.dial(
                peer.uri,
                tls=TlsClientSettings(ca_file=pki.ca_cert),
                srtp=SrtpPolicy(SrtpMode.REQUIRED),
                ring_timeout=10,
            )
            assert call.answered, (call.result, peer.log_text())
            digits = await call.gather(_tone(0.5), max_digits=1, timeout=15)
            assert call.media is not None
            heard = call.media.received_audio()
            stats = call.media.stats
            result = await call.hangup()
        await asyncio.to_thread(peer.wait_closed, 10.0)
        assert peer.closed_by_remote, peer.log_text()
        sent = peer.sent_sdp()
        trace = [m for m in peer.sip_messages() if m.transport == "TLS"]
    assert digits == "1"  # an RFC 4733 event inside SRTP
    assert result.dtmf_method == "rfc4733"
    assert result.srtp
    assert result.transport == "tls"
    assert sent
    assert "RTP/SAVP" in sent[0]
    assert "a=crypto:" in sent[0]
    assert trace, "baresip saw no SIP over TLS"
    assert stats.malformed == 0  # every SRTP packet from baresip authenticated
    assert _rms(heard) > 500, "no audio from baresip came through SRTP"
    decoded = [p for p in peer.recordings() if "dec" in p.name]
    assert decoded, "baresip heard no audio"
    assert max(_wav_rms(p) for p in decoded) > 500, "baresip heard no audio"


async def test_baresip_calls_the_gateway_tls_listener_with_srtp(
    tmp_path: Path, pki: PkiFiles
) -> None:
    finished: list[CallResult] = []
    heard: list[float] = []

    async def on_incoming(call: Call) -> None:
        await call.gather(_tone(0.5), max_digits=2, timeout=15)
        assert call.media is not None
        heard.append(_rms(call.media.received_audio()))

    config = GatewayConfig(
        media_history_seconds=10.0,  # the test reads what ackline heard
        host="127.0.0.1",
        udp_port=None,
        tls_port=0,
        tls=TlsServerSettings(pki.cert, pki.key),
    )
    async with Gateway(config, on_incoming=on_incoming, on_call_ended=finished.append) as gateway:
        host, port = gateway.address("tls")
        target = f"sip:hotline@{host}:{port};transport=tls"
        with baresip_uac(
            tmp_path, target, transport="tls", certificate=pki.bundle, mediaenc="srtp-mand",
            dtmf="42", dtmf_delay_s=1.5,
        ) as peer:  # fmt: skip
            await asyncio.to_thread(peer.wait_established, 10.0)
            await asyncio.to_thread(peer.wait_closed, 20.0)
            assert peer.closed_by_remote, peer.log_text()
            # baresip's INVITE leaves from an ephemeral port: find it by its request line
            invites = [m for m in peer.sip_messages() if m.first_line.startswith("INVITE ")]
        await wait_until(lambda: finished, 5, "the call's result", interval=0.05)
    result = finished[0]
    assert result.direction == "inbound"
    assert result.transport == "tls"
    assert result.digits == "42"
    assert result.dtmf_method == "rfc4733"
    assert result.srtp
    assert invites
    assert invites[0].transport == "TLS"
    assert "RTP/SAVP" in invites[0].body
    assert "a=crypto:" in invites[0].body
    assert heard, "no audio from baresip came through SRTP"
    assert heard[0] > 500, "no audio from baresip came through SRTP"


async def test_required_srtp_against_baresip_without_srtp_fails_cleanly(
    tmp_path: Path, pki: PkiFiles
) -> None:
    with baresip_uas(tmp_path, transport="tls", certificate=pki.bundle, dtmf="") as peer:
        async with Gateway(GatewayConfig(host="127.0.0.1", udp_port=None)) as gateway:
            call = await gateway.dial(
                peer.uri,
                tls=TlsClientSettings(ca_file=pki.ca_cert),
                srtp=SrtpPolicy(SrtpMode.REQUIRED),
                ring_timeout=10,
            )
            result = await call.wait_ended(15)
    # baresip without mediaenc refuses an RTP/SAVP offer: no plain-RTP call slips through
    assert not call.answered
    assert not result.srtp
    assert (result.outcome.value, result.sip_code) == ("rejected", 488), result


@pytest.mark.parametrize("listener", [False, True], ids=["connect-first", "tls-listener"])
async def test_baresip_with_a_certificate_from_another_ca_is_refused_fast_and_said_so(
    tmp_path: Path, pki: PkiFiles, listener: bool
) -> None:
    """Whether the connection is opened before the INVITE (no TLS listener of ours) or by
    sending it (with one), the call fails within the handshake, not the ring timeout,
    and its result and delivery outcome name the certificate, not a SIP code."""
    other = make_pki(tmp_path / "other", name="other")
    config = GatewayConfig(host="127.0.0.1", udp_port=None)
    if listener:
        config = GatewayConfig(host="127.0.0.1", udp_port=None, tls_port=0,
                               tls=TlsServerSettings(pki.cert, pki.key))  # fmt: skip
    with baresip_uas(tmp_path, transport="tls", certificate=other.bundle, dtmf="") as peer:
        async with Gateway(config) as gateway:
            started = asyncio.get_running_loop().time()
            call = await gateway.dial(
                peer.uri, tls=TlsClientSettings(ca_file=pki.ca_cert), ring_timeout=30
            )
            result = await call.wait_ended(5)
            took = asyncio.get_running_loop().time() - started
    assert took < 3.0, took
    assert not call.answered
    assert result.outcome is CallOutcome.FAILED
    assert result.failure is FailureCause.TLS_CERTIFICATE
    assert "TLS certificate verification failed" in result.reason
    assert "unable to get local issuer certificate" in result.reason
    delivery = classify_call(result, "")
    assert (delivery.status, delivery.reason) == (
        DeliveryStatus.FAILED_RETRYABLE, "tls_certificate_rejected",
    )  # fmt: skip
    assert "TLS certificate verification failed" in delivery.details["error"]
    assert not peer.established
    assert not [m for m in peer.sip_messages() if m.first_line.startswith("INVITE")]


async def test_an_alert_call_through_a_tls_trunk_with_the_wrong_ca_fails_fast_and_audited(
    tmp_path: Path, pki: PkiFiles
) -> None:
    """The alert path: the voice channel dials through a TLS trunk whose ca_file does not
    vouch for the carrier's certificate. The delivery fails within the handshake with the
    reason in its details (what the engine writes to the alert's audit trail), the
    attempt counts against the trunk's health, and the carrier never sees an INVITE."""
    from api.voice_channel import CarrierDialer, VoiceChannel
    from carriers.router import CarrierRouter
    from carriers.trunk import Trunk
    from tests.fakes import make_notification

    other = make_pki(tmp_path / "other", name="other")
    with baresip_uas(tmp_path, transport="tls", certificate=other.bundle, dtmf="") as peer:
        trunk = Trunk.model_validate(
            {"name": "tlscarrier", "host": "127.0.0.1", "port": peer.signalling_port,
             "transport": "tls", "tls": {"ca_file": str(pki.ca_cert)}}
        )  # fmt: skip
        async with Gateway(GatewayConfig(host="127.0.0.1", udp_port=None)) as gateway:
            router = CarrierRouter(gateway, [trunk], allowed_countries=["US"])
            try:
                channel = VoiceChannel(CarrierDialer(router), ring_timeout=30)
                started = asyncio.get_running_loop().time()
                delivery = await asyncio.wait_for(
                    channel.send(make_notification("voice", phone="+14155550101")), 10
                )
                took = asyncio.get_running_loop().time() - started
            finally:
                await router.close()
    assert took < 3.0, took
    assert (delivery.status, delivery.reason) == (DeliveryStatus.FAILED_RETRYABLE, "no_route")
    error = delivery.details["error"]
    assert "tlscarrier" in error, error
    assert "TLS certificate verification failed" in error, error
    assert "unable to get local issuer certificate" in error, error
    assert router.health["tlscarrier"].call_failures == 1  # a carrier failure: failover
    assert not [m for m in peer.sip_messages() if m.first_line.startswith("INVITE")]
