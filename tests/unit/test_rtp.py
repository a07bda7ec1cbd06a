"""RTP packet codec, sender state and receiver reordering/statistics."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.media.rtp import RtpExtension, RtpPacket, RtpReceiver, RtpSender, is_rtcp

# -- packet codec ------------------------------------------------------------------------


def test_parse_known_bytes() -> None:
    data = bytes.fromhex("80e0 0001 000000a0 deadbeef") + b"\xff" * 160
    packet = RtpPacket.parse(data)
    assert packet == RtpPacket(
        payload_type=96,
        sequence_number=1,
        timestamp=160,
        ssrc=0xDEADBEEF,
        payload=b"\xff" * 160,
        marker=True,
    )
    assert packet.serialize() == data


def test_parse_csrc_extension_and_padding() -> None:
    header = bytes.fromhex("b2 08 1234 00000010 00000001")  # P, X, CC=2, PT 8
    csrc = struct.pack("!II", 7, 8)
    ext = bytes.fromhex("bede 0001 01020304")
    payload = b"abc"
    padding = b"\x00\x00\x03"
    packet = RtpPacket.parse(header + csrc + ext + payload + padding)
    assert packet.csrc == (7, 8)
    assert packet.extension == RtpExtension(0xBEDE, bytes([1, 2, 3, 4]))
    assert packet.payload == b"abc"
    assert packet.padding == 3
    assert packet.payload_type == 8
    assert packet.sequence_number == 0x1234
    assert packet.serialize() == header + csrc + ext + payload + padding


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "too short"),
        (bytes.fromhex("8000 0001 00000000 000000"), "too short"),
        (bytes.fromhex("4000 0001 00000000 00000000"), "version 1 is not 2"),
        (bytes.fromhex("0000 0001 00000000 00000000"), "version 0 is not 2"),
        (bytes.fromhex("a000 0001 00000000 00000000 00"), "zero padding"),
        # padding longer than the packet: no room left for the header and CSRC list
        (bytes.fromhex("a000 0001 00000000 00000000 aabb05"), "CSRC list exceeds packet"),
        (bytes.fromhex("8300 0001 00000000 00000000 00000001"), "CSRC list exceeds packet"),
        (bytes.fromhex("9000 0001 00000000 00000000 bede"), "extension header exceeds"),
        (bytes.fromhex("9000 0001 00000000 00000000 bede0002 00000000"), "extension data exceeds"),
        # padding reaching into the extension
        (bytes.fromhex("b000 0001 00000000 00000000 bede0001 00000002"), "extension data exceeds"),
    ],
)
def test_parse_rejects_malformed(data: bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        RtpPacket.parse(data)


def test_constructor_validates_fields() -> None:
    with pytest.raises(ValueError, match="payload type must fit 7 bits"):
        RtpPacket(payload_type=128, sequence_number=0, timestamp=0, ssrc=0)
    with pytest.raises(ValueError, match="sequence number must fit 16 bits"):
        RtpPacket(payload_type=0, sequence_number=65536, timestamp=0, ssrc=0)
    with pytest.raises(ValueError, match="timestamp must fit 32 bits"):
        RtpPacket(payload_type=0, sequence_number=0, timestamp=1 << 32, ssrc=0)
    with pytest.raises(ValueError, match="at most 15 CSRC identifiers"):
        RtpPacket(payload_type=0, sequence_number=0, timestamp=0, ssrc=0, csrc=(0,) * 16)
    with pytest.raises(ValueError, match="only RTP version 2 exists"):
        RtpPacket(payload_type=0, sequence_number=0, timestamp=0, ssrc=0, version=1)
    with pytest.raises(ValueError, match="extension data must be a multiple of 4 bytes"):
        RtpExtension(1, b"abc")


packets = st.builds(
    RtpPacket,
    payload_type=st.integers(0, 127),
    sequence_number=st.integers(0, 0xFFFF),
    timestamp=st.integers(0, 0xFFFFFFFF),
    ssrc=st.integers(0, 0xFFFFFFFF),
    payload=st.binary(max_size=200),
    marker=st.booleans(),
    csrc=st.lists(st.integers(0, 0xFFFFFFFF), max_size=15).map(tuple),
    extension=st.none()
    | st.builds(
        RtpExtension,
        profile=st.integers(0, 0xFFFF),
        data=st.integers(0, 4).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n)),
    ),
    padding=st.integers(0, 255),
)


@given(packets)
def test_round_trip(packet: RtpPacket) -> None:
    data = packet.serialize()
    assert RtpPacket.parse(data) == packet
    assert len(data) == 12 + 4 * len(packet.csrc) + len(packet.payload) + packet.padding + (
        0 if packet.extension is None else 4 + len(packet.extension.data)
    )


@given(st.binary(max_size=64))
def test_parse_never_raises_anything_but_value_error(data: bytes) -> None:
    try:
        packet = RtpPacket.parse(data)
    except ValueError:
        return
    assert len(packet.serialize()) == len(data)


def test_is_rtcp() -> None:
    assert is_rtcp(bytes.fromhex("80c8 0006"))  # sender report
    assert is_rtcp(bytes.fromhex("81c9 0007"))  # receiver report
    assert not is_rtcp(bytes.fromhex("8000 0001"))  # PCMU
    assert not is_rtcp(bytes.fromhex("8080 0001"))  # PCMU with marker
    assert not is_rtcp(b"\x80")


# -- sender ------------------------------------------------------------------------------


def test_sender_wraps_sequence_and_timestamp() -> None:
    sender = RtpSender(0, ssrc=42, sequence_number=0xFFFE, timestamp=0xFFFFFF00)
    seqs, stamps = [], []
    for _ in range(4):
        packet = RtpPacket.parse(sender.next_packet(b"\xff" * 160, samples=160))
        seqs.append(packet.sequence_number)
        stamps.append(packet.timestamp)
        assert packet.ssrc == 42
        assert packet.payload_type == 0
        assert not packet.marker
    assert seqs == [0xFFFE, 0xFFFF, 0, 1]
    assert stamps == [0xFFFFFF00, 0xFFFFFFA0, 0x40, 0xE0]
    assert sender.packets_sent == 4
    assert sender.octets_sent == 640


def test_sender_is_randomised() -> None:
    a, b = RtpSender(0), RtpSender(0)
    # 80 random bits in total; equal only with probability 2**-80.
    assert (a.ssrc, a.sequence_number, a.timestamp) != (b.ssrc, b.sequence_number, b.timestamp)


def test_sender_marker_and_timestamp_hold() -> None:
    sender = RtpSender(8, ssrc=1, sequence_number=10, timestamp=1000)
    first = RtpPacket.parse(sender.next_packet(b"x", samples=160, marker=True))
    held = RtpPacket.parse(sender.next_packet(b"y", samples=160, timestamp_advance=False))
    after = RtpPacket.parse(sender.next_packet(b"z", samples=160))
    assert first.marker
    assert not held.marker
    assert (first.timestamp, held.timestamp, after.timestamp) == (1000, 1160, 1160)
    assert sender.timestamp == 1320
    assert [p.sequence_number for p in (first, held, after)] == [10, 11, 12]


def test_event_packets_share_timestamp_and_sequence_space() -> None:
    sender = RtpSender(0, event_payload_type=101, ssrc=5, sequence_number=100, timestamp=8000)
    audio = RtpPacket.parse(sender.next_packet(b"\xff" * 160, samples=160))
    start = sender.timestamp
    events = []
    for i in range(3):
        events.append(RtpPacket.parse(sender.event_packet(b"\x01\x0a\x00\xa0", i == 0, start)))
        sender.advance_timestamp(160)
    resumed = RtpPacket.parse(sender.next_packet(b"\xff" * 160, samples=160))
    assert [e.timestamp for e in events] == [8160] * 3
    assert [e.payload_type for e in events] == [101] * 3
    assert [e.marker for e in events] == [True, False, False]
    assert [e.sequence_number for e in events] == [101, 102, 103]
    assert {e.ssrc for e in events} == {audio.ssrc}
    assert resumed.sequence_number == 104
    assert resumed.timestamp == 8160 + 3 * 160

    with pytest.raises(RuntimeError):
        RtpSender(0).event_packet(b"\x01\x0a\x00\xa0", True, 0)


# -- receiver ----------------------------------------------------------------------------


def pkt(seq: int, ts: int | None = None, ssrc: int = 1, pt: int = 0) -> RtpPacket:
    return RtpPacket(
        payload_type=pt,
        sequence_number=seq % 65536,
        timestamp=(seq * 160 if ts is None else ts) % (1 << 32),
        ssrc=ssrc,
        payload=b"\xff" * 160,
    )


def seqs(packets: list[RtpPacket]) -> list[int]:
    return [p.sequence_number for p in packets]


def test_in_order_packets_leave_immediately() -> None:
    rx = RtpReceiver()
    for i in range(10):
        assert seqs(rx.push(pkt(i), i * 0.02)) == [i]
    stats = rx.stats
    assert stats.packets_received == 10
    assert stats.lost == 0
    assert stats.expected == 10
    assert stats.jitter == pytest.approx(0.0)


def test_reordering_is_repaired() -> None:
    rx = RtpReceiver(depth=3)
    assert seqs(rx.push(pkt(1), 0.0)) == [1]
    assert seqs(rx.push(pkt(3), 0.04)) == []
    assert rx.pending == 1
    assert seqs(rx.push(pkt(2), 0.041)) == [2, 3]
    assert seqs(rx.push(pkt(4), 0.06)) == [4]
    assert rx.stats.reordered == 1
    assert rx.stats.lost == 0


def test_duplicates_are_dropped_and_counted() -> None:
    rx = RtpReceiver()
    assert seqs(rx.push(pkt(1), 0.0)) == [1]
    assert seqs(rx.push(pkt(1), 0.001)) == []
    assert seqs(rx.push(pkt(3), 0.04)) == []
    assert seqs(rx.push(pkt(3), 0.041)) == []
    assert seqs(rx.push(pkt(2), 0.042)) == [2, 3]
    assert seqs(rx.push(pkt(2), 0.043)) == []
    assert rx.stats.duplicates == 3
    assert rx.stats.packets_received == 3


def test_gap_is_given_up_after_depth_packets_and_late_arrival_dropped() -> None:
    rx = RtpReceiver(depth=2)
    rx.push(pkt(0), 0.0)
    assert seqs(rx.push(pkt(2), 0.04)) == []
    assert seqs(rx.push(pkt(3), 0.06)) == []
    assert seqs(rx.push(pkt(4), 0.08)) == [2, 3, 4]  # depth exceeded: 1 is lost
    assert rx.stats.lost == 1
    assert seqs(rx.push(pkt(1), 0.09)) == []  # its slot is gone
    assert rx.stats.late == 1
    assert rx.stats.lost == 1
    assert seqs(rx.push(pkt(1), 0.1)) == []
    assert rx.stats.duplicates == 1


def test_expire_releases_after_max_hold() -> None:
    rx = RtpReceiver(depth=5, max_hold=0.05)
    rx.push(pkt(0), 0.0)
    rx.push(pkt(2), 0.04)
    assert rx.expire(0.06) == []
    assert seqs(rx.expire(0.091)) == [2]
    assert rx.pending == 0
    assert rx.expire(0.2) == []


def test_flush_releases_everything_in_order() -> None:
    rx = RtpReceiver(depth=5)
    rx.push(pkt(0), 0.0)
    for s in (4, 2, 3):
        rx.push(pkt(s), 0.05)
    assert seqs(rx.flush()) == [2, 3, 4]
    assert rx.flush() == []


def test_sequence_wraparound() -> None:
    rx = RtpReceiver()
    out: list[RtpPacket] = []
    order = [65533, 65535, 65534, 0, 2, 1, 3]
    for i, s in enumerate(order):
        out += rx.push(pkt(s), i * 0.02)
    assert seqs(out) == [65533, 65534, 65535, 0, 1, 2, 3]
    assert rx.stats.expected == 7
    assert rx.stats.lost == 0
    assert rx.stats.reordered == 2


def test_ssrc_change_resets_and_flushes_held_packets() -> None:
    rx = RtpReceiver(depth=5)
    rx.push(pkt(10, ssrc=1), 0.0)
    rx.push(pkt(12, ssrc=1), 0.04)
    out = rx.push(pkt(500, ssrc=2), 0.06)
    assert [(p.ssrc, p.sequence_number) for p in out] == [(1, 12), (2, 500)]
    assert seqs(rx.push(pkt(501, ssrc=2), 0.08)) == [501]
    stats = rx.stats
    assert stats.ssrc_changes == 1
    assert rx.ssrc == 2
    assert stats.lost == 1  # 11 of the first source
    assert stats.expected == 3 + 2


def test_far_jump_needs_two_consecutive_packets() -> None:
    rx = RtpReceiver()
    rx.push(pkt(100), 0.0)
    assert rx.push(pkt(20000), 0.02) == []  # lone stray: dropped
    assert seqs(rx.push(pkt(101), 0.04)) == [101]
    assert rx.push(pkt(30000), 0.06) == []
    assert seqs(rx.push(pkt(30001), 0.08)) == [30001]  # sender restarted
    assert seqs(rx.push(pkt(30002), 0.1)) == [30002]
    assert rx.stats.ssrc_changes == 0
    assert rx.stats.lost == 0


def test_jitter_matches_rfc3550_estimator() -> None:
    rx = RtpReceiver(8000)
    # Alternate 0 and 10 ms extra delay: every |D| is 80 timestamp units.
    for i in range(200):
        rx.push(pkt(i), i * 0.02 + (0.01 if i % 2 else 0.0))
    expected = 0.0
    for _ in range(199):
        expected += (80 - expected) / 16
    assert rx.stats.jitter == pytest.approx(expected)
    assert rx.stats.jitter_ms == pytest.approx(expected / 8)


def test_jitter_ignores_repeated_event_timestamps() -> None:
    rx = RtpReceiver(8000)
    for i in range(5):
        rx.push(pkt(i), i * 0.02)
    for i in range(5, 12):  # one DTMF event: ts frozen while time runs on
        rx.push(pkt(i, ts=5 * 160), i * 0.02)
    for i in range(12, 20):
        rx.push(pkt(i), i * 0.02)
    assert rx.stats.jitter == pytest.approx(0.0, abs=1e-6)


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=60),
    st.randoms(use_true_random=False),
    st.integers(0, 65535),
)
def test_receiver_output_is_ordered_and_unique(
    dup_counts: list[int], rnd: object, base: int
) -> None:
    import random

    assert isinstance(rnd, random.Random)
    # Each packet sent 0..3 times (0 = lost), then shuffled within windows of 3.
    arrivals = [base + i for i, n in enumerate(dup_counts) for _ in range(n)]
    for start in range(0, len(arrivals), 3):
        window = arrivals[start : start + 3]
        rnd.shuffle(window)
        arrivals[start : start + 3] = window
    rx = RtpReceiver(depth=8)
    out: list[RtpPacket] = []
    for i, s in enumerate(arrivals):
        out += rx.push(pkt(s), i * 0.02)
    out += rx.flush()
    extended = [base + ((p.sequence_number - base) % 65536) for p in out]
    assert extended == sorted(set(extended))
    if not arrivals:
        assert out == []
        return
    # The first arrival starts the stream; anything older is late. Depth 8 exceeds the
    # shuffle window, so nothing newer is given up.
    playable = {s for s in arrivals if s >= arrivals[0]}
    assert set(extended) == playable
    stats = rx.stats
    assert stats.late == len(set(arrivals) - playable)
    assert stats.duplicates == len(arrivals) - len(set(arrivals))
    assert stats.lost == max(arrivals) - arrivals[0] + 1 - len(playable)


def test_duplicates_are_recognised_a_window_back_across_the_wrap() -> None:
    rx = RtpReceiver()
    start = 65536 - 300  # the window spans the 16-bit wrap
    for i in range(800):
        rx.push(pkt(start + i), i * 0.02)
    for back in (1, 100, 512):
        assert rx.push(pkt(start + 800 - back), 16.0) == []
    assert rx.stats.duplicates == 3
    assert rx.stats.late == 0
