"""SDES SRTP: a=crypto parsing, libsrtp round trips, offer/answer, and calls over TLS."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
import pytest

from gateway.call import Call, Gateway, GatewayConfig
from gateway.media.rtp import RtpPacket
from gateway.media.sdp import SdpError, create_answer, create_offer, parse_answer
from gateway.media.srtp import (
    CryptoAttribute,
    SrtpError,
    SrtpKeys,
    SrtpMode,
    SrtpPolicy,
    SrtpStream,
)
from gateway.result import CallResult
from gateway.tls import TlsClientSettings, TlsServerSettings
from tests.tls_certs import PkiFiles, make_pki

pytestmark = pytest.mark.timeout(30)

KEY = bytes(range(30))
LINE = "1 AES_CM_128_HMAC_SHA1_80 inline:" + base64.b64encode(KEY).decode()


def test_crypto_attribute_round_trips_and_hides_its_key() -> None:
    crypto = CryptoAttribute.parse(LINE)
    assert (crypto.tag, crypto.key_salt) == (1, KEY)
    assert crypto.value == LINE
    assert CryptoAttribute.parse(LINE + "|2^20").key_salt == KEY  # a lifetime is fine
    assert base64.b64encode(KEY).decode() not in repr(crypto)
    fresh = CryptoAttribute.generate(3)
    assert fresh.tag == 3
    assert len(fresh.key_salt) == 30
    assert fresh != CryptoAttribute.generate(3)
    assert crypto.with_tag(7).value.startswith("7 AES_CM_128_HMAC_SHA1_80 inline:")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1 AES_CM_128_HMAC_SHA1_32 inline:" + base64.b64encode(KEY).decode(), "suite"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:" + base64.b64encode(KEY[:20]).decode(), "bytes"),
        ("1 AES_CM_128_HMAC_SHA1_80 inline:***", "base64"),
        (LINE + "|2^20|1:4", "MKI"),
        ("x AES_CM_128_HMAC_SHA1_80 inline:" + base64.b64encode(KEY).decode(), "tag"),
        ("1 AES_CM_128_HMAC_SHA1_80", "needs"),
        (LINE + " UNENCRYPTED_SRTP", "session parameters"),
    ],
)
def test_unusable_crypto_attributes_are_refused(value: str, reason: str) -> None:
    with pytest.raises(SrtpError, match=reason):
        CryptoAttribute.parse(value)


def _rtp(seq: int) -> bytes:
    return RtpPacket(payload_type=0, sequence_number=seq, timestamp=160 * seq, ssrc=0x1234,
                     payload=bytes([seq % 256]) * 160).serialize()  # fmt: skip


def test_srtp_round_trip_between_two_streams() -> None:
    a_key, b_key = CryptoAttribute.generate(), CryptoAttribute.generate()
    a = SrtpStream(SrtpKeys(local=a_key, remote=b_key))
    b = SrtpStream(SrtpKeys(local=b_key, remote=a_key))
    for seq in range(1, 5):
        packet = _rtp(seq)
        protected = a.protect(packet)
        assert protected != packet
        assert len(protected) == len(packet) + 10  # 80-bit tag
        assert protected[12:172] != packet[12:172]  # the payload is encrypted
        assert b.unprotect(protected) == packet
        assert a.unprotect(b.protect(packet)) == packet
    with pytest.raises(SrtpError):
        b.unprotect(protected)  # a replay
    tampered = bytearray(a.protect(_rtp(9)))
    tampered[20] ^= 1
    with pytest.raises(SrtpError):
        b.unprotect(bytes(tampered))
    wrong = SrtpStream(SrtpKeys(local=b_key, remote=CryptoAttribute.generate()))
    with pytest.raises(SrtpError):
        wrong.unprotect(a.protect(_rtp(10)))


def test_offers_for_required_and_optional_srtp() -> None:
    key = CryptoAttribute.generate()
    required = str(create_offer("192.0.2.1", 20000, crypto=key, srtp_required=True))
    optional = str(create_offer("192.0.2.1", 20000, crypto=key))
    assert "m=audio 20000 RTP/SAVP 0 8 101\r\n" in required
    assert "m=audio 20000 RTP/AVP 0 8 101\r\n" in optional
    for offer in (required, optional):
        assert f"a=crypto:{key.value}\r\n" in offer
    assert "crypto" not in str(create_offer("192.0.2.1", 20000))
    with pytest.raises(ValueError, match="needs a crypto"):
        create_offer("192.0.2.1", 20000, srtp_required=True)


def test_an_answered_srtp_offer_negotiates_both_keys() -> None:
    ours, theirs = CryptoAttribute.generate(), CryptoAttribute.generate(5)
    offer = create_offer("192.0.2.1", 20000, crypto=ours, srtp_required=True)
    answer, answered = create_answer(str(offer), "192.0.2.2", 30000, crypto=theirs)
    assert "RTP/SAVP" in str(answer)
    assert answered.srtp == SrtpKeys(local=theirs.with_tag(1), remote=ours)
    negotiated = parse_answer(str(answer), offer)
    assert negotiated.srtp == SrtpKeys(local=ours, remote=theirs.with_tag(1))


def test_best_effort_srtp_falls_back_to_rtp_with_a_plain_peer() -> None:
    offer = create_offer("192.0.2.1", 20000, crypto=CryptoAttribute.generate())
    answer, answered = create_answer(str(offer), "192.0.2.2", 30000)  # a peer without SRTP
    assert answered.srtp is None
    assert "crypto" not in str(answer)
    assert parse_answer(str(answer), offer).srtp is None


def test_srtp_refusals_are_sdp_errors() -> None:
    key = CryptoAttribute.generate()
    savp = str(create_offer("192.0.2.1", 20000, crypto=key, srtp_required=True))
    with pytest.raises(SdpError, match="not accepted here"):
        create_answer(savp, "192.0.2.2", 30000)  # SRTP off on our side
    plain = str(create_offer("192.0.2.1", 20000))
    with pytest.raises(SdpError, match="required"):
        create_answer(plain, "192.0.2.2", 30000, crypto=key, srtp_required=True)
    other_suite = savp.replace("AES_CM_128_HMAC_SHA1_80", "AES_256_CM_HMAC_SHA1_80")
    with pytest.raises(SdpError, match="no usable a=crypto"):
        create_answer(other_suite, "192.0.2.2", 30000, crypto=key)
    offer = create_offer("192.0.2.1", 20000, crypto=key, srtp_required=True)
    answer, _ = create_answer(savp, "192.0.2.2", 30000, crypto=CryptoAttribute.generate())
    stripped = "".join(line + "\r\n" for line in str(answer).splitlines() if "crypto" not in line)
    with pytest.raises(SdpError, match="no matching a=crypto"):
        parse_answer(stripped, offer)


def test_srtp_keys_never_go_over_cleartext_unless_allowed() -> None:
    for mode in (SrtpMode.REQUIRED, SrtpMode.OPTIONAL):
        with pytest.raises(ValueError, match="use transport tls"):
            SrtpPolicy(mode).check("udp")
        assert SrtpPolicy(mode).mode_over("tcp") is SrtpMode.OFF
        assert SrtpPolicy(mode).mode_over("tls") is mode
        assert SrtpPolicy(mode, allow_cleartext_keys=True).mode_over("udp") is mode
    SrtpPolicy().check("udp")


# -- calls over TLS ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PkiFiles:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _tone(seconds: float = 1.0, hz: float = 1000.0) -> np.ndarray:
    t = np.arange(int(8000 * seconds)) / 8000
    return (8000 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


class Answerer:
    """Plays a tone, then waits for two digits; keeps the call and the audio it heard."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.digits: list[str] = []
        self.heard: list[np.ndarray] = []
        self.ended: list[CallResult] = []

    async def __call__(self, call: Call) -> None:
        self.calls.append(call)
        await call.play(_tone(0.6))
        self.digits.append(await call.collect(max_digits=2, timeout=8))
        assert call.media is not None
        self.heard.append(call.media.received_audio())
        await asyncio.sleep(0.3)


def _server(pki: PkiFiles, answerer: Answerer, srtp: SrtpPolicy) -> Gateway:
    config = GatewayConfig(
        udp_port=0, tls_port=0, tls=TlsServerSettings(pki.cert, pki.key), srtp=srtp,
        media_history_seconds=10.0,  # the test reads what each side heard
    )  # fmt: skip
    return Gateway(config, on_incoming=answerer, on_call_ended=answerer.ended.append)


async def _dial_tls(server: Gateway, caller: Gateway, pki: PkiFiles, mode: SrtpMode) -> Call:
    host, port = server.address("tls")
    return await caller.dial(
        f"sips:hotline@{host}:{port}",
        tls=TlsClientSettings(ca_file=pki.ca_cert),
        srtp=SrtpPolicy(mode),
        ring_timeout=5,
    )


def _energy(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


@pytest.mark.parametrize("mode", [SrtpMode.REQUIRED, SrtpMode.OPTIONAL])
async def test_srtp_call_over_tls_carries_audio_and_dtmf_both_ways(
    pki: PkiFiles, mode: SrtpMode
) -> None:
    answerer = Answerer()
    async with (
        _server(pki, answerer, SrtpPolicy(SrtpMode.OPTIONAL)) as server,
        Gateway(GatewayConfig(udp_port=None, media_history_seconds=10.0)) as caller,
    ):
        call = await _dial_tls(server, caller, pki, mode)
        assert call.answered, call.result
        assert call.media is not None
        assert call.media.media is not None
        assert call.media.media.srtp is not None
        await asyncio.sleep(0.8)  # the answerer's tone
        heard_by_caller = call.media.received_audio()
        await call.play(_tone(0.4, 700))
        await call.send_digits("73")
        result = await call.wait_ended(10)
        stats = call.media.stats
    assert answerer.digits == ["73"]
    assert _energy(heard_by_caller) > 1000, "the caller heard no audio through SRTP"
    assert _energy(answerer.heard[0]) > 1000, "the answerer heard no audio through SRTP"
    assert result.srtp
    assert answerer.ended[0].srtp
    assert stats.malformed == 0  # every packet authenticated


async def test_required_srtp_against_a_peer_without_srtp_fails_cleanly(pki: PkiFiles) -> None:
    answerer = Answerer()
    async with (
        _server(pki, answerer, SrtpPolicy(SrtpMode.OFF)) as server,
        Gateway(GatewayConfig(udp_port=None)) as caller,
    ):
        call = await _dial_tls(server, caller, pki, SrtpMode.REQUIRED)
    assert not call.answered
    assert call.result is not None
    assert call.result.sip_code == 488
    assert not answerer.calls


async def test_optional_srtp_with_a_peer_without_srtp_is_plain_rtp(pki: PkiFiles) -> None:
    answerer = Answerer()
    async with (
        _server(pki, answerer, SrtpPolicy(SrtpMode.OFF)) as server,
        Gateway(GatewayConfig(udp_port=None)) as caller,
    ):
        call = await _dial_tls(server, caller, pki, SrtpMode.OPTIONAL)
        assert call.answered
        result = await call.hangup()
    assert not result.srtp


async def test_inbound_required_srtp_refuses_calls_over_udp(pki: PkiFiles) -> None:
    answerer = Answerer()
    async with (
        _server(pki, answerer, SrtpPolicy(SrtpMode.REQUIRED)) as server,
        Gateway(GatewayConfig()) as caller,
    ):
        host, port = server.address("udp")
        call = await caller.dial(f"sip:hotline@{host}:{port}", ring_timeout=5)
    assert call.result is not None
    assert call.result.sip_code == 488
    assert "SRTP required" in call.result.reason


async def test_dialling_with_srtp_over_udp_is_refused_before_anything_is_sent() -> None:
    async with Gateway(GatewayConfig()) as caller:
        with pytest.raises(ValueError, match="use transport tls"):
            await caller.dial("sip:x@127.0.0.1:9", srtp=SrtpPolicy(SrtpMode.REQUIRED))
