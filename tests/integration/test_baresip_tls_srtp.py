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

from gateway.call import Call, Gateway, GatewayConfig
from gateway.media.srtp import SrtpMode, SrtpPolicy
from gateway.result import CallResult
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


async def test_baresip_with_a_certificate_from_another_ca_is_refused(
    tmp_path: Path, pki: PkiFiles
) -> None:
    other = make_pki(tmp_path / "other", name="other")
    with baresip_uas(tmp_path, transport="tls", certificate=other.bundle, dtmf="") as peer:
        async with Gateway(GatewayConfig(host="127.0.0.1", udp_port=None)) as gateway:
            call = await gateway.dial(
                peer.uri, tls=TlsClientSettings(ca_file=pki.ca_cert), ring_timeout=10
            )
    assert call.result is not None
    assert not call.answered
    assert "TLS certificate verification failed" in call.result.reason
    assert not peer.established
