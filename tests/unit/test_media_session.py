"""MediaSession over real UDP on 127.0.0.1: session to session, and against a raw socket."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import numpy as np
import pytest
from numpy.typing import NDArray
from prometheus_client import REGISTRY

import gateway.media.session as session_module
from gateway.media import native
from gateway.media.dtmf import DtmfDigit, DtmfMethod, dtmf_tone, feed_all, rfc4733_packets
from gateway.media.g711 import alaw_encode, decoder_for, ulaw_encode
from gateway.media.pacer import Pacer
from gateway.media.rtp import RtpPacket
from gateway.media.sdp import NegotiatedMedia, create_offer, parse_answer
from gateway.media.session import MediaSession, MediaSessionClosed
from gateway.media.source import RtpSourceFilter, SourceVerdict
from gateway.media.srtp import CryptoAttribute, SrtpKeys, SrtpStream
from tests.waiting import wait_until

HOST = "127.0.0.1"
TE = 101


def negotiated(
    port: int,
    *,
    codec: str = "PCMU",
    direction: str = "sendrecv",
    host: str = HOST,
    ptime: int = 20,
    te: int | None = TE,
) -> NegotiatedMedia:
    return NegotiatedMedia(
        remote_host=host,
        remote_port=port,
        payload_type=0 if codec == "PCMU" else 8,
        codec=codec,
        clock_rate=8000,
        telephone_event_pt=te,
        ptime=ptime,
        direction=direction,
    )


def is_running(pacer: Pacer) -> bool:
    """Read through a call so mypy does not carry narrowing across awaits."""
    return pacer.running


def is_playing(session: MediaSession) -> bool:
    return session.playing


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    await wait_until(predicate, timeout)


class RawPeer(asyncio.DatagramProtocol):
    """A bare UDP socket standing in for the far end."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[RtpPacket, float]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received.put_nowait((RtpPacket.parse(data), asyncio.get_running_loop().time()))

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    def send(self, data: bytes, port: int) -> None:
        assert self.transport is not None
        self.transport.sendto(data, (HOST, port))

    async def next(self, timeout: float = 1.0) -> RtpPacket:
        async with asyncio.timeout(timeout):
            packet, _ = await self.received.get()
        return packet

    async def collect(self, count: int, timeout: float = 3.0) -> list[RtpPacket]:
        return [await self.next(timeout) for _ in range(count)]

    def drain(self) -> None:
        while not self.received.empty():
            self.received.get_nowait()


async def raw_peer(host: str = HOST) -> RawPeer:
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_datagram_endpoint(RawPeer, local_addr=(host, 0))
    return peer


@pytest.fixture(autouse=True, params=["native", "python"])
def send_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test twice: packets sent by the native sender thread, and by the Python pacer
    (the fallback when the extension is not built)."""
    if request.param == "python":
        monkeypatch.setenv("ACKLINE_NATIVE_SEND", "0")
    else:
        assert native.available()
    return str(request.param)


@pytest.fixture
async def pacer() -> AsyncIterator[Pacer]:
    p = Pacer(20)
    yield p
    await p.stop()


@pytest.fixture
async def pair(pacer: Pacer) -> AsyncIterator[tuple[MediaSession, MediaSession]]:
    a = MediaSession(local_host=HOST, pacer=pacer)
    b = MediaSession(local_host=HOST, pacer=pacer)
    await a.open()
    await b.open()
    yield a, b
    await a.close()
    await b.close()


@pytest.fixture
async def peer() -> AsyncIterator[RawPeer]:
    p = await raw_peer()
    yield p
    assert p.transport is not None
    p.transport.close()


def rtp(seq: int, payload: bytes, *, ssrc: int = 77, pt: int = 0, ts: int | None = None) -> bytes:
    timestamp = seq * 160 if ts is None else ts
    return RtpPacket(pt, seq % 65536, timestamp % (1 << 32), ssrc, payload).serialize()


def dropped(reason: str) -> float:
    """The process's ackline_rtp_dropped_packets_total for ``reason``."""
    value = REGISTRY.get_sample_value("ackline_rtp_dropped_packets_total", {"reason": reason})
    return value or 0.0


def best_match(received: NDArray[np.int16], sent: NDArray[np.int16]) -> float:
    """Highest normalised correlation of ``sent`` against any window of ``received``."""
    r = received.astype(np.float64)
    s = sent.astype(np.float64)
    scores = np.correlate(r, s, mode="valid")
    lag = int(np.argmax(scores))
    window = r[lag : lag + len(s)]
    return float(scores[lag] / (np.linalg.norm(window) * np.linalg.norm(s) + 1e-9))


# -- session to session ----------------------------------------------------------------


@pytest.mark.parametrize("codec", ["PCMU", "PCMA"])
async def test_audio_arrives_in_order_and_decoded(
    pair: tuple[MediaSession, MediaSession], codec: str
) -> None:
    a, b = pair
    assert a.local_port % 2 == 0
    assert 20000 <= a.local_port < 30000
    a.configure(negotiated(b.local_port, codec=codec))
    b.configure(negotiated(a.local_port, codec=codec))
    # Noise, not a tone: any reordering or dropped frame would destroy the correlation.
    sent = (np.random.default_rng(7).normal(0, 4000, 8000)).astype(np.int16)
    async with asyncio.timeout(3):
        await a.play(sent)
    sent_count = a.stats.packets_sent
    await wait_for(lambda: b.stats.packets_received >= sent_count)
    received = b.received_audio()
    assert len(received) >= len(sent)
    assert best_match(received, sent) > 0.999
    stats = b.stats
    assert stats.lost == 0
    assert stats.duplicates == 0
    assert stats.malformed == 0
    assert stats.ssrc_changes == 0
    assert stats.foreign == 0
    assert 0 <= stats.jitter < 20
    assert a.stats.packets_sent >= 50


async def test_silence_is_sent_continuously(pair: tuple[MediaSession, MediaSession]) -> None:
    a, b = pair
    loop = asyncio.get_running_loop()
    a.configure(negotiated(b.local_port))
    b.configure(negotiated(a.local_port))
    started = loop.time()
    await asyncio.sleep(0.5)
    due = (loop.time() - started) / 0.02
    # One frame per 20 ms; allow a couple in flight or on the tick boundary.
    assert due - 3 <= b.stats.packets_received <= due + 2
    audio = b.received_audio()
    assert len(audio) >= 20 * 160
    assert not audio.any()


async def test_rfc4733_digit_detected_exactly_once(
    pair: tuple[MediaSession, MediaSession],
) -> None:
    a, b = pair
    a.configure(negotiated(b.local_port))
    b.configure(negotiated(a.local_port))
    async with asyncio.timeout(3):
        await a.send_digit("5", 100)
        await a.send_digit("#", 60)
        first = await b.digits.get()
        second = await b.digits.get()
    assert (first.digit, first.method) == ("5", DtmfMethod.RFC4733)
    assert first.duration_ms == 100
    assert (second.digit, second.method) == ("#", DtmfMethod.RFC4733)
    await asyncio.sleep(0.4)  # redundant end packets and timeouts must not repeat them
    assert b.digits.empty()


async def test_inband_digit_detected(pair: tuple[MediaSession, MediaSession]) -> None:
    a, b = pair
    a.configure(negotiated(b.local_port))
    b.configure(negotiated(a.local_port))
    async with asyncio.timeout(3):
        await a.play(dtmf_tone("7", 200))
        digit = await b.digits.get()
    assert (digit.digit, digit.method) == ("7", DtmfMethod.INBAND)
    await asyncio.sleep(0.3)
    assert b.digits.empty()


async def test_push_digit_shares_the_queue(pair: tuple[MediaSession, MediaSession]) -> None:
    a, _ = pair
    d = DtmfDigit("9", DtmfMethod.SIP_INFO, 1.0, 160)
    a.push_digit(d)
    assert a.digits.get_nowait() == d


# -- against a raw socket --------------------------------------------------------------


async def test_stream_headers_marker_and_audio_payload(
    pacer: Pacer, peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prompts are encoded a window at a time; make a window end mid-frame.
    monkeypatch.setattr(session_module, "_ENCODE_CHUNK", 250)
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        silence = await peer.collect(3)
        pcm = (np.arange(400) * 50 - 10000).astype(np.int16)
        done = s.play(pcm)
        await asyncio.wait_for(done, 2)
        await asyncio.sleep(0.05)
        rest = [p for p, _ in _drain(peer)]
    finally:
        await s.close()
    packets = silence + rest
    assert packets[0].marker
    assert not any(p.marker for p in packets[1:3])
    assert all(p.payload == b"\xff" * 160 for p in silence)
    seqs = [p.sequence_number for p in packets]
    assert seqs == [(seqs[0] + i) % 65536 for i in range(len(packets))]
    steps = {(b.timestamp - a.timestamp) % (1 << 32) for a, b in itertools.pairwise(packets)}
    assert steps == {160}
    assert len({p.ssrc for p in packets}) == 1
    assert {p.payload_type for p in packets} == {0}
    # The prompt: three frames, the first with the talkspurt marker, padded with silence.
    start = next(i for i, p in enumerate(packets) if p.payload != b"\xff" * 160)
    audio = packets[start : start + 3]
    assert [p.marker for p in audio] == [True, False, False]
    expected = ulaw_encode(pcm) + b"\xff" * 80
    assert b"".join(p.payload for p in audio) == expected
    assert all(p.payload == b"\xff" * 160 for p in packets[start + 3 :])
    assert not any(p.marker for p in packets[start + 1 :])


def _drain(peer: RawPeer) -> list[tuple[RtpPacket, float]]:
    out = []
    while not peer.received.empty():
        out.append(peer.received.get_nowait())
    return out


async def test_paced_every_20ms(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    s.configure(negotiated(peer.port))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.sleep(0.5)
    due = (loop.time() - started) / 0.02
    await s.close()
    arrivals = np.array([t for _, t in _drain(peer)])
    gaps = np.diff(arrivals)
    assert due - 3 <= len(arrivals) <= due + 2
    assert abs(float(np.median(gaps)) - 0.02) < 0.003


async def test_dtmf_events_pause_audio_and_share_timestamp(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        head = await peer.collect(2)
        s.play(np.full(8000, 1000, dtype=np.int16))
        await asyncio.wait_for(s.send_digit("3", 100), 2)
        await asyncio.sleep(0.06)
    finally:
        await s.close()
    packets = head + [p for p, _ in _drain(peer)]
    events = [i for i, p in enumerate(packets) if p.payload_type == TE]
    expected = rfc4733_packets("3", duration_ms=100)
    assert len(events) == len(expected)
    assert events == list(range(events[0], events[0] + len(events)))  # no audio in between
    ev = [packets[i] for i in events]
    assert [p.payload for p in ev] == [payload for payload, _, _ in expected]
    assert [p.marker for p in ev] == [m for _, m, _ in expected]
    assert len({p.timestamp for p in ev}) == 1
    before, after = packets[events[0] - 1], packets[events[-1] + 1]
    assert ev[0].timestamp == (before.timestamp + 160) % (1 << 32)
    # Audio resumes where the media clock got to, as a new talkspurt.
    assert after.timestamp == (ev[0].timestamp + 160 * len(ev)) % (1 << 32)
    assert after.marker
    assert after.payload_type == 0


async def test_hold_resume_and_codec_change(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        last = (await peer.collect(3))[-1]
        s.configure(negotiated(peer.port, direction="recvonly"))  # we are held
        assert not s.sending
        await asyncio.sleep(0.03)
        in_flight = _drain(peer)  # sent before the hold, read only now
        if in_flight:
            last = in_flight[-1][0]
        await asyncio.sleep(0.2)
        assert peer.received.empty()
        prompt = np.full(160, 1000, dtype=np.int16)
        done = s.play(prompt)
        with pytest.raises(RuntimeError):
            await s.send_digit("1")
        s.configure(negotiated(peer.port, host="0.0.0.0"))
        await asyncio.sleep(0.1)
        assert peer.received.empty()
        assert not done.done()  # paused, not played unheard
        s.configure(negotiated(peer.port, codec="PCMA"))
        resumed = await peer.next()
        await asyncio.wait_for(done, 1)
        more = await peer.collect(2)
    finally:
        await s.close()
    assert resumed.marker
    assert resumed.payload_type == 8
    assert resumed.sequence_number == (last.sequence_number + 1) % 65536
    # The media clock kept running through the hold (≥ 0.3 s = 2400 samples).
    assert (resumed.timestamp - last.timestamp) % (1 << 32) >= 2400
    assert resumed.payload == alaw_encode(prompt)
    assert all(p.payload == b"\xd5" * 160 for p in more)


async def test_ptime_40_sends_double_frames(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    s.configure(negotiated(peer.port, ptime=40))
    packets = await peer.collect(4)
    await s.close()
    assert {len(p.payload) for p in packets} == {320}
    assert all(
        (b.timestamp - a.timestamp) % (1 << 32) == 320 for a, b in itertools.pairwise(packets)
    )


async def test_stop_playback_cancels_and_returns_to_silence(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        first = s.play(np.full(16000, 3000, dtype=np.int16))
        second = s.play(np.full(800, 3000, dtype=np.int16))
        await asyncio.sleep(0.1)
        assert is_playing(s)
        s.stop_playback()
        assert first.cancelled()
        assert second.cancelled()
        assert not is_playing(s)
        await asyncio.sleep(0.05)
        peer.drain()
        tail = await peer.collect(3)
        assert all(p.payload == b"\xff" * 160 for p in tail)
        empty = s.play(np.zeros(0, dtype=np.int16))
        assert empty.done()
        assert not empty.cancelled()
        with pytest.raises(TypeError):
            s.play(np.zeros(10, dtype=np.float32))
    finally:
        await s.close()


async def test_cancelled_play_future_drops_its_audio(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(s.play(np.full(16000, 3000, dtype=np.int16)), 0.1)
        assert not is_playing(s)
        await asyncio.sleep(0.05)
        peer.drain()
        tail = await peer.collect(3)
        assert all(p.payload == b"\xff" * 160 for p in tail)
    finally:
        await s.close()


def test_rejects_port_range_without_even_port(pacer: Pacer) -> None:
    with pytest.raises(ValueError, match="no even RTP port"):
        MediaSession(local_host=HOST, pacer=pacer, port_range=(5001, 5001))
    with pytest.raises(ValueError, match="no even RTP port"):
        MediaSession(local_host=HOST, pacer=pacer, port_range=(6000, 5000))


async def test_reordered_and_duplicated_packets(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        levels = np.arange(1, 21, dtype=np.int16) * 1000
        frames = [ulaw_encode(np.full(160, lv, dtype=np.int16)) for lv in levels]
        order = [0, 2, 1, 3, 3, 5, 4, 6, 7, 7, 7, 9, 8, *range(10, 20), 12]
        for seq in order:
            peer.send(rtp(1000 + seq, frames[seq]), s.local_port)
            await asyncio.sleep(0.002)
        await wait_for(lambda: s.stats.packets_received >= 20)
        stats = s.stats
        audio = s.received_audio()
    finally:
        await s.close()
    assert stats.duplicates == 4
    assert stats.reordered == 3
    assert stats.lost == 0
    got = audio.reshape(-1, 160)[:, 0]
    decoded = decoder_for("PCMU")(b"".join(f[:1] for f in frames))
    assert got.tolist() == decoded.tolist()


async def test_loss_gap_is_filled_with_silence(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        frame = ulaw_encode(np.full(160, 5000, dtype=np.int16))
        for seq in (0, 1, 4, 5):
            peer.send(rtp(seq, frame), s.local_port)
        await wait_for(lambda: len(s.received_audio()) >= 6 * 160)
        stats = s.stats
        audio = s.received_audio().reshape(-1, 160)
    finally:
        await s.close()
    assert stats.lost == 2
    assert [bool(f.any()) for f in audio] == [True, True, False, False, True, True]


async def test_malformed_rtcp_and_other_payloads_are_dropped(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    before = dropped("malformed")
    try:
        peer.send(rtp(0, b"\xff" * 160), s.local_port)  # before configure
        await wait_for(lambda: s.stats.unconfigured == 1)
        s.configure(negotiated(peer.port))
        junk = [
            b"\x80",  # (asyncio never sends an empty datagram)
            b"hello",
            b"\x40" + bytes(15),  # RTP version 1
            bytes.fromhex("a000 0001 00000000 00000000 aabb05"),  # padding overrun
            bytes.fromhex("8f00 0001 00000000 00000000"),  # 15 CSRCs announced, none present
        ]
        for data in junk:
            peer.send(data, s.local_port)
        peer.send(bytes.fromhex("80c8 0006") + bytes(24), s.local_port)  # RTCP SR (mux)
        peer.send(rtp(1, b"\x01" * 4, pt=13), s.local_port)  # comfort noise: not handled
        peer.send(rtp(2, b"\xff" * 160), s.local_port)
        await wait_for(lambda: s.stats.packets_received == 2)
        stats = s.stats
    finally:
        await s.close()
    assert stats.malformed == len(junk) == dropped("malformed") - before
    assert stats.rtcp == 1
    assert stats.other_payload == 1
    assert stats.unconfigured == 1
    assert s.digits.empty()


async def test_ssrc_change_is_counted(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        for seq in range(3):
            peer.send(rtp(seq, b"\xff" * 160, ssrc=1), s.local_port)
        for seq in range(3):
            peer.send(rtp(9000 + seq, b"\xff" * 160, ssrc=2), s.local_port)
        await wait_for(lambda: s.stats.packets_received == 6)
        assert s.stats.ssrc_changes == 1
        assert s.stats.lost == 0
    finally:
        await s.close()


async def test_latches_to_first_source_and_rejects_others(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    intruder = await raw_peer()
    await s.open()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as unused:
        unused.bind((HOST, 0))
        dead_port = unused.getsockname()[1]
    try:
        s.configure(negotiated(dead_port))  # SDP address nobody sends from
        peer.send(b"junk", s.local_port)  # garbage must not latch
        await asyncio.sleep(0.05)
        assert s.remote_address == (HOST, dead_port)
        peer.send(rtp(0, b"\xff" * 160), s.local_port)
        await wait_for(lambda: s.stats.packets_received == 1)
        assert s.remote_address == (HOST, peer.port)
        peer.drain()
        echoed = await peer.next()  # our stream now goes to the latched source
        assert echoed.payload_type == 0
        intruder.send(rtp(1, b"\xff" * 160, ssrc=99), s.local_port)
        await wait_for(lambda: s.stats.foreign == 1)
        assert s.stats.packets_received == 1
    finally:
        await s.close()
        assert intruder.transport is not None
        intruder.transport.close()


async def test_rfc4733_from_raw_socket_with_lost_end_packets(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        packets = rfc4733_packets("8", duration_ms=80)
        without_end = [p for p in packets if not p[0][1] & 0x80]
        for seq, (payload, marker, _) in enumerate(without_end):
            data = RtpPacket(TE, seq, 4000, 5, payload, marker).serialize()
            peer.send(data, s.local_port)
        async with asyncio.timeout(2):
            digit = await s.digits.get()  # reported on the receiver's timeout, via on_tick
        assert (digit.digit, digit.method) == ("8", DtmfMethod.RFC4733)
        await asyncio.sleep(0.3)
        assert s.digits.empty()
    finally:
        await s.close()


def answered_126_pcma(port: int) -> NegotiatedMedia:
    """Our offer (PCMU, PCMA, telephone-event/101) answered with PCMA first, PCMU too,
    and telephone-event renumbered 126."""
    answer = (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
        f"m=audio {port} RTP/AVP 8 0 126\r\na=rtpmap:126 telephone-event/8000\r\n"
    )
    return parse_answer(answer, create_offer(HOST, 20000))


async def test_events_heard_on_the_offered_and_the_answered_type(
    pacer: Pacer, peer: RawPeer
) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer, inband_dtmf=False)
    await s.open()
    try:
        s.configure(answered_126_pcma(peer.port))
        seq = 0
        for pt, digit, ts in ((TE, "4", 1000), (126, "6", 9000)):
            for payload, marker, _ in rfc4733_packets(digit, duration_ms=60):
                peer.send(RtpPacket(pt, seq, ts, 5, payload, marker).serialize(), s.local_port)
                seq += 1
        async with asyncio.timeout(2):
            heard = [(await s.digits.get()).digit for _ in range(2)]
        peer.drain()
        sent = asyncio.ensure_future(s.send_digit("2", 60))
        async with asyncio.timeout(2):
            while (packet := await peer.next()).payload_type not in (TE, 126):
                pass
        await sent
    finally:
        await s.close()
    assert heard == ["4", "6"]
    assert packet.payload_type == 126  # we send on the answer's number


async def test_audio_of_every_offered_codec_is_decoded(pacer: Pacer, peer: RawPeer) -> None:
    """We send PCMA as answered; the callee sends PCMU (listed too): heard, tones included."""
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(answered_126_pcma(peer.port))
        tone = np.concatenate((dtmf_tone("9", 200), np.zeros(3200, dtype=np.int16)))
        codes = ulaw_encode(tone)
        for seq in range(len(codes) // 160):
            peer.send(rtp(seq, codes[seq * 160 : (seq + 1) * 160], pt=0), s.local_port)
        ulaw_frames = len(codes) // 160
        level = alaw_encode(np.full(160, 3000, dtype=np.int16))
        peer.send(rtp(ulaw_frames, level, pt=8), s.local_port)
        async with asyncio.timeout(3):
            digit = await s.digits.get()
        await wait_for(lambda: s.stats.packets_received == ulaw_frames + 1)
        packet = await peer.next()
        audio = s.received_audio()
        stats = s.stats
    finally:
        await s.close()
    assert (digit.digit, digit.method) == ("9", DtmfMethod.INBAND)
    assert stats.other_payload == 0
    assert packet.payload_type == 8  # we send PCMA, as answered
    assert audio[-160:].tolist() == decoder_for("PCMA")(level).tolist()
    assert best_match(audio, dtmf_tone("9", 200)) > 0.95


# -- lifecycle ---------------------------------------------------------------------------


async def test_open_skips_ports_in_use(pacer: Pacer) -> None:
    for attempt in range(20):
        base = 40000 + 4 * (attempt * 97 % 2000)
        blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            blocker.bind((HOST, base))
        except OSError:
            blocker.close()
            continue
        try:
            s = MediaSession(local_host=HOST, pacer=pacer, port_range=(base, base + 3))
            try:
                port = await s.open()
            except OSError:
                continue  # base + 2 happened to be taken too
            await s.close()
            assert port == base + 2
            full = MediaSession(local_host=HOST, pacer=pacer, port_range=(base, base + 1))
            with pytest.raises(OSError, match="no free RTP port"):
                await full.open()
            return
        finally:
            blocker.close()
    pytest.fail("no free port pair found")


async def test_close_releases_everything(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    port = await s.open()
    assert is_running(pacer)
    assert len(pacer) == 1
    s.configure(negotiated(peer.port))
    playing = s.play(np.zeros(80000, dtype=np.int16))
    digit = asyncio.ensure_future(s.send_digit("4", 2000))
    await asyncio.sleep(0.05)
    await s.close()
    await s.close()  # idempotent
    assert playing.cancelled()
    with pytest.raises(MediaSessionClosed):
        await digit
    with pytest.raises(MediaSessionClosed):
        await s.send_digit("4")
    assert s.play(np.zeros(10, dtype=np.int16)).cancelled()
    assert len(pacer) == 0
    assert not is_running(pacer)
    # The port is free again.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind((HOST, port))
    sent = s.stats.packets_sent
    await asyncio.sleep(0.05)
    assert s.stats.packets_sent == sent


async def test_send_digit_requires_telephone_event(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        with pytest.raises(RuntimeError):
            await s.send_digit("1")  # not configured
        s.configure(negotiated(peer.port, te=None))
        with pytest.raises(RuntimeError):
            await s.send_digit("1")
        with pytest.raises(ValueError, match=r"unsupported G\.711 codec 'G722'"):
            s.configure(negotiated(peer.port, codec="G722"))
    finally:
        await s.close()


async def test_many_sessions_share_one_pacer(pacer: Pacer, peer: RawPeer) -> None:
    sessions = [MediaSession(local_host=HOST, pacer=pacer) for _ in range(50)]
    for s in sessions:
        await s.open()
    loop = asyncio.get_running_loop()
    for s in sessions:  # all in one go: they start on the same tick
        s.configure(negotiated(peer.port))
    started = loop.time()
    await asyncio.sleep(0.5)
    due = (loop.time() - started) / 0.02
    counts = [s.stats.packets_sent for s in sessions]
    for s in sessions:
        await s.close()
    assert max(counts) - min(counts) <= 1
    assert due - 2 <= min(counts) <= due + 1
    assert len(pacer) == 0
    # (pacing jitter is a figure of bench.calls, not a timed assertion here)
    ssrcs = {p.ssrc for p, _ in _drain(peer)}
    assert len(ssrcs) == 50


async def test_long_prompt_is_byte_identical_to_encoding_it_whole(
    pacer: Pacer, peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Many encode windows, each spanning several frames and ending mid-frame: the per-frame
    # fast path and the window refill must together send exactly the whole-prompt encoding.
    monkeypatch.setattr(session_module, "_ENCODE_CHUNK", 1000)
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        rng = np.random.default_rng(7)
        pcm = rng.integers(-20000, 20000, 160 * 30 + 37).astype(np.int16)
        await asyncio.wait_for(s.play(pcm), 3)
        await asyncio.sleep(0.05)
    finally:
        await s.close()
    packets = [p for p, _ in _drain(peer)]
    start = next(i for i, p in enumerate(packets) if p.payload != b"\xff" * 160)
    audio = b"".join(p.payload for p in packets[start : start + 31])
    assert audio == ulaw_encode(pcm) + b"\xff" * (160 - 37)
    seqs = [p.sequence_number for p in packets]
    assert seqs == [(seqs[0] + i) % 65536 for i in range(len(packets))]


class _RecordingTransport:
    """Stands in for the asyncio transport to see which frames take which path."""

    def __init__(self, buffered: int) -> None:
        self.buffered = buffered
        self.sent: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def sendto(self, data: bytes, addr: object) -> None:
        self.sent.append(data)


class _BlockedSocket:
    def __init__(self, error: OSError) -> None:
        self.error = error

    def sendto(self, data: bytes, addr: object) -> int:
        raise self.error


async def test_transmit_goes_through_the_transport_only_when_it_queues(
    pacer: Pacer, peer: RawPeer
) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer, native_send=False)  # the Python path's
    await s.open()
    real = s._transport
    try:
        s.configure(negotiated(peer.port))
        await peer.collect(2)  # direct sends reach the peer
        await pacer.stop()
        # Something already queued: the frame must queue behind it, not overtake it.
        queued = _RecordingTransport(buffered=172)
        s._transport, s._buffered = queued, queued.get_write_buffer_size  # type: ignore[assignment]
        s._transmit(b"frame-1")
        assert queued.sent == [b"frame-1"]
        # More than a few frames queued: stale audio is dropped and counted.
        queued.buffered = 10_000
        dropped = s.stats.send_dropped
        s._transmit(b"frame-2")
        assert queued.sent == [b"frame-1"]
        assert s.stats.send_dropped == dropped + 1
        # Empty queue but the socket would block: handed to the transport to queue.
        queued.buffered = 0
        s._sock = _BlockedSocket(BlockingIOError())  # type: ignore[assignment]
        sent = s.stats.packets_sent
        s._transmit(b"frame-3")
        assert queued.sent == [b"frame-1", b"frame-3"]
        assert s.stats.packets_sent == sent + 1
        # Any other socket error is what error_received counts, and nothing is queued.
        s._sock = _BlockedSocket(ConnectionRefusedError())  # type: ignore[assignment]
        errors = s.stats.send_errors
        s._transmit(b"frame-4")
        assert queued.sent == [b"frame-1", b"frame-3"]
        assert s.stats.send_errors == errors + 1
    finally:
        if real is not None:
            s._transport = real
        await s.close()


def _inband_packets(digit: str, ssrc: int, tail: int = 480) -> list[bytes]:
    pcm = np.concatenate([np.zeros(800, np.int16), dtmf_tone(digit, 200), np.zeros(tail, np.int16)])
    codes = ulaw_encode(pcm)
    return [rtp(i, codes[i * 160 : (i + 1) * 160], ssrc=ssrc) for i in range(len(codes) // 160)]


async def test_inband_digits_of_many_sessions_scanned_together(
    pacer: Pacer, peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes: list[int] = []
    real_feed_all = feed_all

    def counting_feed_all(jobs: Any) -> Any:
        passes.append(len(jobs))
        return real_feed_all(jobs)

    monkeypatch.setattr(session_module, "feed_all", counting_feed_all)
    sessions = [MediaSession(local_host=HOST, pacer=pacer) for _ in range(4)]
    for s in sessions:
        await s.open()
        s.configure(negotiated(peer.port))
    try:
        # Enough audio to fill each session's batch, so all hand it over in the same tick.
        for index, s in enumerate(sessions):
            for data in _inband_packets("1470"[index], ssrc=index + 1, tail=1600):
                peer.send(data, s.local_port)
        async with asyncio.timeout(3):
            got = [await s.digits.get() for s in sessions]
        assert [(d.digit, d.method) for d in got] == [(k, DtmfMethod.INBAND) for k in "1470"]
        assert 4 in passes  # one vectorised pass for the four batches
    finally:
        for s in sessions:
            await s.close()


async def test_close_detects_the_batch_still_waiting(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    s.configure(negotiated(peer.port))
    packets = _inband_packets("5", ssrc=9)
    assert len(packets) * 160 < session_module._INBAND_BATCH  # no batch full before close
    for data in packets:
        peer.send(data, s.local_port)
    await wait_for(lambda: s.stats.packets_received == len(packets))
    await s.close()
    digit = s.digits.get_nowait()
    assert (digit.digit, digit.method) == ("5", DtmfMethod.INBAND)


# -- media source: symmetric RTP without injection ----------------------------------------

SDP = ("192.0.2.10", 4000)  # the filter is pure: documentation addresses, no packets
ACCEPT, LEARN, DROP = SourceVerdict.ACCEPT, SourceVerdict.LEARN, SourceVerdict.DROP


def test_filter_accepts_the_sdp_address_and_nothing_else_once_heard() -> None:
    f = RtpSourceFilter(["203.0.113.5"])
    f.set_remote(SDP)
    assert f.check(SDP) is LEARN
    assert f.check(("198.51.100.7", 4000)) is DROP
    assert not f.learn(SDP)  # it was already where we send
    assert f.check(SDP) is ACCEPT
    assert f.send_to == SDP
    # Heard: neither its IP on another port nor the signalling peer may latch any more.
    assert f.check(("192.0.2.10", 4002)) is DROP
    assert f.check(("203.0.113.5", 4000)) is DROP
    assert not f.learn(("192.0.2.10", 4002))
    assert f.latched is None


def test_filter_latches_a_nat_rewritten_port_only_before_the_sdp_address_is_heard() -> None:
    f = RtpSourceFilter()
    f.set_remote(SDP)
    nat = ("192.0.2.10", 61000)
    assert f.check(nat) is LEARN
    assert f.check(("192.0.2.11", 4000)) is DROP
    assert f.learn(nat)
    assert f.send_to == nat
    assert f.check(nat) is ACCEPT
    assert f.check(("192.0.2.10", 61002)) is DROP  # one latch, the first
    # The SDP address heard after the latch wins: the latched source is dropped.
    assert f.check(SDP) is LEARN
    assert f.learn(SDP)
    assert f.send_to == SDP
    assert f.latched is None
    assert f.check(nat) is DROP


def test_filter_latches_a_trusted_host_for_a_phone_behind_nat() -> None:
    f = RtpSourceFilter(["203.0.113.5", "2001:DB8::0:1"])
    f.set_remote(("10.0.0.8", 4000))  # a private address in SDP
    public = ("203.0.113.5", 31000)
    assert f.check(("198.51.100.7", 31000)) is DROP
    assert f.check(("2001:db8::1", 5004)) is LEARN  # trusted hosts compare normalised
    assert f.learn(public)
    assert f.send_to == public
    assert f.check(public) is ACCEPT
    assert f.check(("2001:db8::1", 5004)) is DROP


def test_filter_forgets_on_a_new_sdp_address_but_not_on_hold() -> None:
    f = RtpSourceFilter()
    f.set_remote(SDP)
    nat = ("192.0.2.10", 61000)
    f.learn(nat)
    assert not f.set_remote(SDP)  # same address: a re-INVITE for a codec change
    assert not f.set_remote(("0.0.0.0", 4000))
    assert not f.set_remote(("192.0.2.10", 0))
    assert (f.latched, f.send_to) == (nat, nat)  # hold does not move the far end's media
    moved = ("192.0.2.20", 5000)
    assert f.set_remote(moved)
    assert f.send_to == moved
    assert f.latched is None
    assert f.check(nat) is DROP
    assert f.check(moved) is LEARN
    assert f.check(("192.0.2.20", 5002)) is LEARN  # latching may happen again


def test_filter_latch_any_source_is_the_opt_in_first_source_rule() -> None:
    f = RtpSourceFilter(latch_any_source=True)
    f.set_remote(SDP)
    relay = ("198.51.100.7", 40000)
    assert f.check(relay) is LEARN
    assert f.learn(relay)
    assert f.send_to == relay
    assert f.check(("198.51.100.8", 40000)) is DROP
    assert f.learn(SDP)
    assert f.check(relay) is DROP  # the SDP address still wins


def events(digit: str, *, ssrc: int, seq: int, start_ts: int) -> list[bytes]:
    """One complete RFC 4733 key press: growing durations, then three end (E bit) packets,
    all carrying the event's start timestamp."""
    return [
        RtpPacket(TE, (seq + i) % 65536, start_ts, ssrc, payload, marker).serialize()
        for i, (payload, marker, _) in enumerate(rfc4733_packets(digit, duration_ms=100))
    ]


PRESS = len(rfc4733_packets("0", duration_ms=100))  # packets per key press


def flood(digit: str, presses: int, *, ssrc: int = 0x5EED) -> list[bytes]:
    return [
        packet
        for n in range(presses)
        for packet in events(digit, ssrc=ssrc, seq=n * 10, start_ts=n * 8000)
    ]


async def free_udp_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


async def close_peers(*peers: RawPeer) -> None:
    for p in peers:
        assert p.transport is not None
        p.transport.close()


async def test_rfc4733_from_a_stranger_is_dropped_and_counted(pacer: Pacer, peer: RawPeer) -> None:
    """Issue 13: a stranger's "7" events reached the digit queue (acknowledging an alert)."""
    s = MediaSession(local_host=HOST, pacer=pacer)
    stranger = await raw_peer("127.0.0.2")
    await s.open()
    before = dropped("foreign_source")
    try:
        s.configure(negotiated(peer.port))
        attack = flood("7", 5)
        for data in attack:  # first, before the far end has said a word
            stranger.send(data, s.local_port)
        await wait_for(lambda: s.stats.foreign == len(attack))
        for data in events("3", ssrc=42, seq=100, start_ts=16000):
            peer.send(data, s.local_port)
        async with asyncio.timeout(3):
            digit = await s.digits.get()
        for data in flood("7", 2):  # and again once the SDP address was heard
            stranger.send(data, s.local_port)
        await wait_for(lambda: s.stats.foreign == len(attack) + 2 * PRESS)
        # Reported to Prometheus while the call is live (in bulk, on the housekeeping tick).
        await wait_for(lambda: dropped("foreign_source") - before == len(attack) + 2 * PRESS)
        await asyncio.sleep(0.3)  # longer than the event receiver's timeout
        assert s.digits.empty()
        assert s.remote_address == (HOST, peer.port)
        stats = s.stats
    finally:
        await s.close()
        await close_peers(stranger)
    assert (digit.digit, digit.method) == ("3", DtmfMethod.RFC4733)
    assert stats.packets_received == PRESS  # the stranger's packets were not even parsed
    assert dropped("foreign_source") - before == stats.foreign


async def test_sdp_address_heard_after_a_latch_drops_the_latched_source(pacer: Pacer) -> None:
    sdp_peer, nat_peer = await raw_peer(), await raw_peer()  # same IP, other port
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(sdp_peer.port))
        nat_peer.send(rtp(0, b"\xff" * 160, ssrc=1), s.local_port)
        await wait_for(lambda: s.remote_address == (HOST, nat_peer.port))
        sdp_peer.send(rtp(0, b"\xff" * 160, ssrc=2), s.local_port)
        await wait_for(lambda: s.remote_address == (HOST, sdp_peer.port))
        sdp_peer.drain()
        assert (await sdp_peer.next()).payload_type == 0  # our stream is back on the SDP
        for data in events("7", ssrc=1, seq=1, start_ts=800):
            nat_peer.send(data, s.local_port)
        await wait_for(lambda: s.stats.foreign == PRESS)
        await asyncio.sleep(0.3)
        assert s.digits.empty()
        assert s.stats.packets_received == 2
    finally:
        await s.close()
        await close_peers(sdp_peer, nat_peer)


async def test_same_ip_other_port_is_foreign_once_the_sdp_address_is_heard(
    pacer: Pacer, peer: RawPeer
) -> None:
    late = await raw_peer()
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        peer.send(rtp(0, b"\xff" * 160), s.local_port)
        await wait_for(lambda: s.stats.packets_received == 1)
        late.send(rtp(1, b"\xff" * 160, ssrc=5), s.local_port)
        await wait_for(lambda: s.stats.foreign == 1)
        assert s.remote_address == (HOST, peer.port)
        assert s.stats.packets_received == 1
    finally:
        await s.close()
        await close_peers(late)


async def test_trusted_signalling_host_is_latched_for_a_phone_behind_nat(pacer: Pacer) -> None:
    """SDP names a "private" address nobody sends from (127.0.0.3); the phone's packets come
    from its signalling address (127.0.0.2); a third host (127.0.0.4) may not latch."""
    phone, stranger = await raw_peer("127.0.0.2"), await raw_peer("127.0.0.4")
    s = MediaSession(local_host=HOST, pacer=pacer, trusted_hosts=["127.0.0.2"])
    await s.open()
    try:
        s.configure(negotiated(await free_udp_port("127.0.0.3"), host="127.0.0.3"))
        for data in events("7", ssrc=9, seq=0, start_ts=0):
            stranger.send(data, s.local_port)
        await wait_for(lambda: s.stats.foreign == PRESS)
        for data in events("1", ssrc=8, seq=0, start_ts=0):
            phone.send(data, s.local_port)
        async with asyncio.timeout(3):
            digit = await s.digits.get()
        assert s.remote_address == ("127.0.0.2", phone.port)
        phone.drain()
        assert (await phone.next()).payload_type == 0  # our stream follows the latch
        await asyncio.sleep(0.3)
        assert s.digits.empty()
    finally:
        await s.close()
        await close_peers(phone, stranger)
    assert digit.digit == "1"


async def test_latch_any_source_opt_in_latches_an_unrelated_address(pacer: Pacer) -> None:
    relay = await raw_peer("127.0.0.4")
    s = MediaSession(local_host=HOST, pacer=pacer, latch_any_source=True)
    await s.open()
    try:
        s.configure(negotiated(await free_udp_port("127.0.0.3"), host="127.0.0.3"))
        for data in events("2", ssrc=3, seq=0, start_ts=0):
            relay.send(data, s.local_port)
        async with asyncio.timeout(3):
            digit = await s.digits.get()
        assert digit.digit == "2"
        assert s.remote_address == ("127.0.0.4", relay.port)
    finally:
        await s.close()
        await close_peers(relay)


async def test_inband_scan_of_a_crowd_is_spread_over_ticks(
    pacer: Pacer, peer: RawPeer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches handed over in one tick by more sessions than a tick scans are classified
    over the next ticks, oldest first, and every digit still arrives."""
    monkeypatch.setattr(session_module, "_INBAND_SESSIONS_PER_TICK", 2)
    passes: list[int] = []
    real_feed_all = feed_all

    def counting_feed_all(jobs: Any) -> Any:
        passes.append(len(jobs))
        return real_feed_all(jobs)

    monkeypatch.setattr(session_module, "feed_all", counting_feed_all)
    sessions = [MediaSession(local_host=HOST, pacer=pacer) for _ in range(5)]
    for s in sessions:
        await s.open()
        s.configure(negotiated(peer.port))
    try:
        for index, s in enumerate(sessions):
            for data in _inband_packets("14703"[index], ssrc=index + 1, tail=1600):
                peer.send(data, s.local_port)
        async with asyncio.timeout(3):
            got = [await s.digits.get() for s in sessions]
        assert [(d.digit, d.method) for d in got] == [(k, DtmfMethod.INBAND) for k in "14703"]
        assert passes
        assert max(passes) <= 2
    finally:
        for s in sessions:
            await s.close()


# -- the native sender ------------------------------------------------------------------


async def test_native_sender_carries_the_stream_unless_switched_off(
    pacer: Pacer, peer: RawPeer, send_path: str
) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    off = MediaSession(local_host=HOST, pacer=pacer, native_send=False)
    await s.open()
    await off.open()
    try:
        s.configure(negotiated(peer.port))
        off.configure(negotiated(peer.port))
        await peer.collect(6)
        assert (s._native is not None) == (send_path == "native")
        assert off._native is None  # native_send=False: the Python pacer sends
        # Frames longer than 60 ms stay on the Python pacer too.
        s.configure(negotiated(peer.port, ptime=80))
        assert s._native is None
        s.configure(negotiated(peer.port))
        assert (s._native is not None) == (send_path == "native")
        assert s.stats.packets_sent > 0
        assert off.stats.packets_sent > 0
    finally:
        await s.close()
        await off.close()


async def test_play_completes_once_its_last_frame_is_sent(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        await peer.collect(2)
        pcm = np.full(160 * 10, 2000, dtype=np.int16)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(s.play(pcm), 2)
        took = loop.time() - started
        await asyncio.sleep(0.01)  # loopback delivery
        audio = [p for p, _ in _drain(peer) if p.payload != b"\xff" * 160]
    finally:
        await s.close()
    assert len(audio) == 10  # all of it had gone out when play() returned
    assert took >= 0.15  # ten 20 ms frames: not when merely queued


async def test_barge_in_and_digits_keep_the_wire_contiguous(pacer: Pacer, peer: RawPeer) -> None:
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.configure(negotiated(peer.port))
        await peer.collect(2)
        s.play(np.full(16000, 2000, dtype=np.int16))
        await asyncio.sleep(0.1)
        s.stop_playback()  # drops what was queued ahead
        await asyncio.sleep(0.06)
        await asyncio.wait_for(s.send_digit("5", 60), 2)
        s.play(np.full(800, 2000, dtype=np.int16))
        await asyncio.sleep(0.3)
    finally:
        await s.close()
    packets = [p for p, _ in _drain(peer)]
    seqs = [p.sequence_number for p in packets]
    assert seqs == [(seqs[0] + i) % 65536 for i in range(len(packets))]
    audio = [p for p in packets if p.payload_type == 0]
    steps = [(b.timestamp - a.timestamp) % (1 << 32) for a, b in itertools.pairwise(audio)]
    # 160 per frame, except across the digit (its packets advance the clock too).
    assert set(steps) <= {160, 160 * (1 + len(rfc4733_packets("5", duration_ms=60)))}
    loud = [p.payload != b"\xff" * 160 for p in audio]
    first_quiet = loud.index(False)
    assert 2 <= first_quiet <= 12  # barge-in: the prompt stopped within ~100 ms + a frame
    assert sum(loud) < 20 + 6  # not the 100 frames the 2 s prompt had


async def test_srtp_never_reuses_a_sequence_number(
    pacer: Pacer, peer: RawPeer, send_path: str
) -> None:
    ours, theirs = CryptoAttribute.generate(), CryptoAttribute.generate()
    far_end = SrtpStream(SrtpKeys(local=theirs, remote=ours))
    s = MediaSession(local_host=HOST, pacer=pacer)
    await s.open()
    try:
        s.set_srtp(SrtpStream(SrtpKeys(local=ours, remote=theirs)))
        s.configure(negotiated(peer.port))
        await asyncio.sleep(0.1)
        s.play(np.full(8000, 2000, dtype=np.int16))
        await asyncio.sleep(0.1)
        s.stop_playback()
        await asyncio.sleep(0.2)
    finally:
        await s.close()
    packets = [p for p, _ in _drain(peer)]
    # libsrtp's replay check refuses an index it has seen: every packet must authenticate.
    plain = [RtpPacket.parse(far_end.unprotect(p.serialize())) for p in packets]
    seqs = [p.sequence_number for p in plain]
    assert len(set(seqs)) == len(seqs)
    assert all((b - a) % 65536 < 1000 for a, b in itertools.pairwise(seqs))  # only forward
    steps = [(b.timestamp - a.timestamp) % (1 << 32) for a, b in itertools.pairwise(plain)]
    assert set(steps) == {160}  # the media clock stays contiguous
    skips = [
        b
        for a, b in itertools.pairwise(plain)
        if (b.sequence_number - a.sequence_number) % 65536 != 1
    ]
    assert all(b.marker for b in skips)  # a skip over numbers queued and dropped is marked
    # The native sender had ~160 ms queued at the prompt and at the barge-in: skipped.
    assert len(skips) == (2 if send_path == "native" else 0)
