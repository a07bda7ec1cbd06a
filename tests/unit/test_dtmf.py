"""DTMF must yield each key press exactly once, whatever path or impairment it came through."""

from __future__ import annotations

import random
import struct
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.media.dtmf import (
    DIGITS,
    DtmfDigit,
    DtmfMethod,
    GoertzelDetector,
    Rfc4733Receiver,
    dtmf_tone,
    feed_all,
    info_dtmf_body,
    parse_info_dtmf,
    rfc4733_packets,
)

SSRC = 0x1234ABCD
Packet = tuple[bytes, bool, int]


def feed_packets(
    receiver: Rfc4733Receiver,
    packets: list[Packet],
    timestamp: int,
    *,
    start: float = 0.0,
    ssrc: int = SSRC,
) -> list[DtmfDigit]:
    """Deliver packets 20 ms apart, collecting every digit the receiver returns."""
    got: list[DtmfDigit] = []
    for i, (payload, marker, offset) in enumerate(packets):
        digit = receiver.receive(payload, timestamp + offset, ssrc, marker, start + 0.02 * i)
        if digit is not None:
            got.append(digit)
    return got


# --------------------------------------------------------------------------------------------
# rfc4733_packets
# --------------------------------------------------------------------------------------------


def test_packets_layout_for_100ms() -> None:
    packets = rfc4733_packets("5", duration_ms=100, volume=10)
    fields = [struct.unpack("!BBH", p) for p, _, _ in packets]
    assert [m for _, m, _ in packets] == [True] + [False] * 6
    assert {off for _, _, off in packets} == {0}
    assert [f[0] for f in fields] == [5] * 7
    assert [f[2] for f in fields] == [160, 320, 480, 640, 800, 800, 800]
    assert [bool(f[1] & 0x80) for f in fields] == [False] * 4 + [True] * 3
    assert {f[1] & 0x3F for f in fields} == {10}


def test_packets_short_event_is_only_end_packets_with_marker_first() -> None:
    packets = rfc4733_packets("#", duration_ms=20)
    assert [(p[1], struct.unpack("!BBH", p[0])) for p in packets] == [
        (True, (11, 0x80 | 10, 160)),
        (False, (11, 0x80 | 10, 160)),
        (False, (11, 0x80 | 10, 160)),
    ]


@pytest.mark.parametrize("bad", ["E", "", "12", "x", "+"])
def test_packets_reject_non_digits(bad: str) -> None:
    with pytest.raises(ValueError, match="not a DTMF digit"):
        rfc4733_packets(bad)


def test_packets_reject_bad_volume_and_duration() -> None:
    with pytest.raises(ValueError, match=r"volume must be 0\.\.63"):
        rfc4733_packets("1", volume=64)
    with pytest.raises(ValueError, match="duration_ms out of range"):
        rfc4733_packets("1", duration_ms=0)
    with pytest.raises(ValueError, match="duration_ms out of range"):
        rfc4733_packets("1", duration_ms=9000)


# --------------------------------------------------------------------------------------------
# Rfc4733Receiver
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("digit", list(DIGITS))
def test_round_trip_with_all_three_end_packets(digit: str) -> None:
    receiver = Rfc4733Receiver()
    got = feed_packets(receiver, rfc4733_packets(digit, duration_ms=120), 1000)
    assert [(d.digit, d.method, d.duration_ms) for d in got] == [(digit, DtmfMethod.RFC4733, 120)]
    assert got[0].at == pytest.approx(0.1)  # the first end packet, sixth sent
    assert receiver.flush(10.0) == []


@pytest.mark.parametrize("digit", list(DIGITS))
def test_round_trip_with_first_end_lost(digit: str) -> None:
    packets = rfc4733_packets(digit)
    del packets[-3]
    receiver = Rfc4733Receiver()
    got = feed_packets(receiver, packets, 5000)
    assert [(d.digit, d.duration_ms) for d in got] == [(digit, 100)]
    assert receiver.flush(10.0) == []


@pytest.mark.parametrize("digit", list(DIGITS))
def test_all_end_packets_lost_reported_by_flush_after_timeout(digit: str) -> None:
    packets = rfc4733_packets(digit, duration_ms=100)[:-3]
    receiver = Rfc4733Receiver()
    assert feed_packets(receiver, packets, 777) == []
    last_packet_at = 0.02 * (len(packets) - 1)
    assert receiver.flush(last_packet_at + 0.1) == []
    flushed = receiver.flush(last_packet_at + 0.25)
    # Only the four non-end packets (640 samples = 80 ms) were seen.
    assert [(d.digit, d.duration_ms, d.at) for d in flushed] == [(digit, 80, last_packet_at + 0.25)]
    assert receiver.flush(100.0) == []


def test_all_end_packets_lost_reported_when_next_event_starts() -> None:
    receiver = Rfc4733Receiver()
    first = rfc4733_packets("7")[:-3]
    assert feed_packets(receiver, first, 8000) == []
    second = rfc4733_packets("8")
    got = feed_packets(receiver, second, 8000 + 1600, start=0.5)
    assert [d.digit for d in got] == ["7", "8"]
    assert receiver.flush(10.0) == []


def test_reordered_packets_report_once() -> None:
    for seed in range(30):
        packets = rfc4733_packets("9", duration_ms=160)
        random.Random(seed).shuffle(packets)
        receiver = Rfc4733Receiver()
        got = feed_packets(receiver, packets, 42) + receiver.flush(10.0)
        assert [d.digit for d in got] == ["9"], seed


def test_late_packet_of_finished_event_is_ignored() -> None:
    receiver = Rfc4733Receiver()
    first = rfc4733_packets("1")
    second = rfc4733_packets("2")
    assert [d.digit for d in feed_packets(receiver, first, 100)] == ["1"]
    assert [d.digit for d in feed_packets(receiver, second[:2], 1700, start=1.0)] == []
    # A straggler from the first event arrives in the middle of the second.
    assert receiver.receive(first[1][0], 100, SSRC, False, 1.05) is None
    assert [d.digit for d in feed_packets(receiver, second[2:], 1700, start=1.1)] == ["2"]
    assert receiver.flush(10.0) == []


def test_late_first_packet_of_older_event_does_not_cut_newer_one() -> None:
    receiver = Rfc4733Receiver()
    newer = rfc4733_packets("4")
    older = rfc4733_packets("3")
    got = feed_packets(receiver, newer[:2], 3000)
    # Only one packet of the older event survives and it arrives late.
    assert receiver.receive(older[0][0], 1400, SSRC, True, 0.05) is None
    got += feed_packets(receiver, newer[2:], 3000, start=0.06)
    got += receiver.flush(10.0)
    assert sorted(d.digit for d in got) == ["3", "4"]
    assert next(d for d in got if d.digit == "4").duration_ms == 100


def test_duplicated_packets_report_once() -> None:
    packets = [p for p in rfc4733_packets("0") for _ in range(3)]
    receiver = Rfc4733Receiver()
    got = feed_packets(receiver, packets, 1) + receiver.flush(10.0)
    assert [d.digit for d in got] == ["0"]


def test_same_digit_twice_with_different_timestamps_counts_twice() -> None:
    receiver = Rfc4733Receiver()
    got = feed_packets(receiver, rfc4733_packets("5"), 16000)
    got += feed_packets(receiver, rfc4733_packets("5"), 16000 + 2400, start=0.3)
    assert [d.digit for d in got] == ["5", "5"]


def test_same_timestamp_on_another_ssrc_is_another_event() -> None:
    receiver = Rfc4733Receiver()
    got = feed_packets(receiver, rfc4733_packets("6"), 500, ssrc=1)
    got += feed_packets(receiver, rfc4733_packets("6"), 500, ssrc=2)
    assert [d.digit for d in got] == ["6", "6"]


def test_timestamp_wraparound_finishes_previous_event() -> None:
    receiver = Rfc4733Receiver()
    assert feed_packets(receiver, rfc4733_packets("A")[:-3], 0xFFFFFF00) == []
    got = feed_packets(receiver, rfc4733_packets("B"), 0x00000100, start=0.2)
    assert [d.digit for d in got] == ["A", "B"]


def test_one_packet_completing_two_events_queues_the_second() -> None:
    receiver = Rfc4733Receiver()
    assert feed_packets(receiver, rfc4733_packets("C")[:-3], 10) == []
    end_of_d = rfc4733_packets("D", duration_ms=20)[0][0]
    first = receiver.receive(end_of_d, 2000, SSRC, True, 1.0)
    assert first is not None
    assert first.digit == "C"
    assert [d.digit for d in receiver.flush(1.0)] == ["D"]


@pytest.mark.parametrize(
    "payload",
    [b"", b"\x05", b"\x05\x8a\x03", bytes([16, 0x8A, 0, 160]), bytes([255, 0x8A, 3, 32])],
)
def test_malformed_or_non_digit_events_ignored(payload: bytes) -> None:
    receiver = Rfc4733Receiver()
    assert receiver.receive(payload, 99, SSRC, True, 0.0) is None
    assert receiver.flush(10.0) == []


def test_duration_uses_clock_rate() -> None:
    receiver = Rfc4733Receiver(clock_rate=16000)
    payload = struct.pack("!BBH", 3, 0x80 | 10, 3200)
    got = receiver.receive(payload, 1, SSRC, True, 0.0)
    assert got is not None
    assert got.duration_ms == 200


@settings(max_examples=200, deadline=None)
@given(
    digits=st.lists(st.sampled_from(DIGITS), min_size=1, max_size=6),
    seed=st.integers(0, 2**32 - 1),
)
def test_lossy_duplicating_channel_never_double_reports(digits: list[str], seed: int) -> None:
    """Loss and duplication inside events never duplicate, invent or drop a key."""
    rng = random.Random(seed)
    receiver = Rfc4733Receiver()
    got: list[DtmfDigit] = []
    delivered: list[str] = []
    now = 0.0
    for i, digit in enumerate(digits):
        copies = [rng.choice([0, 1, 1, 1, 2]) for _ in rfc4733_packets(digit)]
        if any(copies):
            delivered.append(digit)
        for (payload, marker, _), count in zip(rfc4733_packets(digit), copies, strict=True):
            for _ in range(count):
                now += 0.02
                result = receiver.receive(payload, 1000 + 4000 * i, SSRC, marker, now)
                if result is not None:
                    got.append(result)
        now += 0.1
    got += receiver.flush(now + 1.0)
    # Every event with at least one surviving packet is reported exactly once, in order.
    assert "".join(d.digit for d in got) == "".join(delivered)


# --------------------------------------------------------------------------------------------
# Goertzel
# --------------------------------------------------------------------------------------------

RATE = 8000
Pcm = npt.NDArray[np.int16]


def silence(ms: int) -> Pcm:
    return np.zeros(ms * RATE // 1000, dtype=np.int16)


def detect(pcm: npt.NDArray[np.int16] | npt.NDArray[np.float64], chunk: int = 160) -> str:
    """Run audio through a fresh detector in RTP-sized chunks; return the keys found."""
    detector = GoertzelDetector()
    found: list[DtmfDigit] = []
    for start in range(0, len(pcm), chunk):
        found += detector.feed(pcm[start : start + chunk], start / RATE)
    assert all(d.method is DtmfMethod.INBAND for d in found)
    return "".join(d.digit for d in found)


def keyed(digits: str, tone_ms: int = 80, gap_ms: int = 80, amplitude: float = 0.3) -> Pcm:
    parts = [silence(gap_ms)]
    for digit in digits:
        parts += [dtmf_tone(digit, tone_ms, amplitude=amplitude), silence(gap_ms)]
    return np.concatenate(parts)


def add_noise(pcm: Pcm, snr_db: float, seed: int = 1) -> npt.NDArray[np.float64]:
    """Add white noise at ``snr_db`` below the RMS of the tone parts of ``pcm``."""
    signal = pcm.astype(np.float64)
    tone_rms = float(np.sqrt(np.mean(signal[signal != 0] ** 2)))
    noise = np.random.default_rng(seed).normal(0.0, tone_rms / 10 ** (snr_db / 20), len(pcm))
    return np.clip(signal + noise, -32768, 32767)


def ulaw_round_trip(pcm: npt.NDArray[np.int16] | npt.NDArray[np.float64]) -> Pcm:
    """G.711 µ-law encode then decode (segment/mantissa form, 14-bit magnitude, bias 33)."""
    x = np.asarray(pcm, dtype=np.int64) >> 2
    sign = x < 0
    magnitude = np.minimum(np.abs(x) + 33, 8191)
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int64) - 5, 0, 7)
    mantissa = (magnitude >> (exponent + 1)) & 0x0F
    decoded = (((mantissa << 1) + 33) << exponent) - 33
    restored: Pcm = (np.where(sign, -decoded, decoded) << 2).astype(np.int16)
    return restored


def test_dtmf_tone_shape_and_level() -> None:
    tone = dtmf_tone("1", 100)
    assert tone.dtype == np.int16
    assert len(tone) == 800
    assert 0.55 * 32767 < np.max(np.abs(tone)) <= 0.6 * 32767 + 1
    spectrum = np.abs(np.fft.rfft(tone.astype(np.float64)))
    peaks = sorted(np.argsort(spectrum)[-2:] * RATE / len(tone))
    assert peaks == [pytest.approx(697, abs=10), pytest.approx(1209, abs=10)]
    with pytest.raises(ValueError, match="not a DTMF digit"):
        dtmf_tone("E", 100)


def test_clean_tones_all_digits_once_each() -> None:
    assert detect(keyed(DIGITS)) == DIGITS


def test_lowercase_letters_accepted_for_synthesis() -> None:
    assert detect(keyed("abcd")) == "ABCD"


@pytest.mark.parametrize("chunk", [1, 37, 106, 160, 1000, 100_000])
def test_any_chunk_size(chunk: int) -> None:
    assert detect(keyed("159#"), chunk=chunk) == "159#"


def test_float_input_is_full_scale_normalised() -> None:
    pcm = keyed("26") / 32768.0
    assert detect(pcm) == "26"


def test_long_press_reported_once() -> None:
    assert detect(keyed("8", tone_ms=2000)) == "8"


def test_repeated_digit_needs_silence_between() -> None:
    assert detect(keyed("555", gap_ms=60)) == "555"
    continuous = np.concatenate([silence(50), dtmf_tone("5", 300), silence(50)])
    assert detect(continuous) == "5"


def test_digit_change_without_gap_reports_both() -> None:
    pcm = np.concatenate([silence(40), dtmf_tone("1", 100), dtmf_tone("2", 100), silence(40)])
    assert detect(pcm) == "12"


def test_at_and_duration_reflect_the_audio_timeline() -> None:
    detector = GoertzelDetector()
    pcm = np.concatenate([silence(500), dtmf_tone("3", 100), silence(100)])
    found: list[DtmfDigit] = []
    for start in range(0, len(pcm), 160):
        found += detector.feed(pcm[start : start + 160], 10.0 + start / RATE)
    assert len(found) == 1
    # Two 13.25 ms blocks after onset, at most one more block of alignment slack.
    assert 10.5 + 0.026 <= found[0].at <= 10.5 + 0.041
    assert 26 <= found[0].duration_ms <= 27


def test_tones_at_minus_20_dbfs_with_white_noise_15db_snr() -> None:
    # -20 dBFS relative to a full-scale sine: each of the two tones at 0.0707 amplitude.
    pcm = keyed(DIGITS, amplitude=0.1 / np.sqrt(2))
    for seed in range(5):
        assert detect(add_noise(pcm, 15.0, seed=seed)) == DIGITS


def test_tones_through_ulaw_round_trip() -> None:
    assert detect(ulaw_round_trip(keyed(DIGITS))) == DIGITS
    quiet = keyed(DIGITS, amplitude=0.1 / np.sqrt(2))
    assert detect(ulaw_round_trip(add_noise(quiet, 15.0))) == DIGITS


def test_ulaw_helper_is_g711_accurate() -> None:
    """The test codec must itself be right for the µ-law cases to mean anything."""
    ramp = np.arange(-32768, 32768, dtype=np.int64)
    decoded = ulaw_round_trip(ramp.astype(np.int16)).astype(np.int64)
    assert len(np.unique(decoded)) == 255  # 256 codes, +0 and -0 decode alike
    relative = np.abs(decoded - ramp)[np.abs(ramp) > 256] / np.abs(ramp)[np.abs(ramp) > 256]
    assert relative.max() < 0.07


def test_twisted_tones_within_limits_detected() -> None:
    t = np.arange(800) / RATE
    for row_db, col_db in [(0.0, -6.0), (-3.0, 0.0)]:
        wave = 0.3 * 10 ** (row_db / 20) * np.sin(2 * np.pi * 852 * t)
        wave += 0.3 * 10 ** (col_db / 20) * np.sin(2 * np.pi * 1477 * t)
        pcm = np.concatenate([silence(50), (wave * 32767).astype(np.int16), silence(50)])
        assert detect(pcm) == "9", (row_db, col_db)


def test_excessive_twist_rejected() -> None:
    t = np.arange(800) / RATE
    for row_db, col_db in [(0.0, -12.0), (-8.0, 0.0)]:
        wave = 0.3 * 10 ** (row_db / 20) * np.sin(2 * np.pi * 852 * t)
        wave += 0.3 * 10 ** (col_db / 20) * np.sin(2 * np.pi * 1477 * t)
        assert detect((wave * 32767).astype(np.int16)) == "", (row_db, col_db)


def test_slightly_off_frequency_tones_detected() -> None:
    """Q.24 asks for acceptance within ±1.5 %; real phones are usually well inside that."""
    t = np.arange(800) / RATE
    for factor in (0.985, 1.015):
        wave = 0.3 * (np.sin(2 * np.pi * 941 * factor * t) + np.sin(2 * np.pi * 1633 * factor * t))
        pcm = np.concatenate([silence(50), (wave * 32767).astype(np.int16), silence(50)])
        assert detect(pcm) == "D", factor


def test_single_tone_is_not_a_digit() -> None:
    t = np.arange(4000) / RATE
    for freq in (697, 1209, 1633, 1000):
        assert detect((0.5 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)) == ""


def test_40ms_tones_detected_at_any_alignment() -> None:
    for lead_samples in range(0, 106, 7):
        pcm = np.concatenate(
            [np.zeros(lead_samples, dtype=np.int16), keyed("1470", tone_ms=40, gap_ms=40)]
        )
        assert detect(pcm) == "1470", lead_samples


def test_10ms_blips_rejected_at_any_alignment() -> None:
    for lead_samples in range(0, 106, 5):
        pcm = np.concatenate(
            [np.zeros(lead_samples, dtype=np.int16), keyed(DIGITS, tone_ms=10, gap_ms=60)]
        )
        assert detect(pcm) == "", lead_samples


def test_quiet_tones_below_threshold_ignored() -> None:
    assert detect(keyed("123", amplitude=0.005)) == ""


@pytest.mark.parametrize("rms", [100.0, 1000.0, 8000.0])
def test_white_noise_gives_no_digits(rms: float) -> None:
    for seed in range(3):
        noise = np.random.default_rng(seed).normal(0.0, rms, 5 * RATE)
        assert detect(np.clip(noise, -32768, 32767).astype(np.int16)) == ""


def resonator_gain(freq: float, formant: float, bandwidth: float) -> float:
    """Magnitude response of a Klatt-style two-pole formant resonator at ``freq``."""
    c = -np.exp(-2 * np.pi * bandwidth / RATE)
    b = 2 * np.exp(-np.pi * bandwidth / RATE) * np.cos(2 * np.pi * formant / RATE)
    z = np.exp(-2j * np.pi * freq / RATE)
    return float(abs((1 - b - c) / (1 - b * z - c * z * z)))


def vowel(
    f0: float,
    formants: tuple[float, float, float],
    bandwidths: tuple[float, float, float],
    seconds: float = 0.6,
) -> Pcm:
    """Voiced-speech stand-in: a glottal source (-6 dB/octave after lip radiation) with 3 %
    vibrato through a cascade of three formant resonators, synthesised harmonic by harmonic."""
    t = np.arange(int(seconds * RATE)) / RATE
    pitch = f0 * (1 + 0.03 * np.sin(2 * np.pi * 5 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    wave = np.zeros_like(t)
    for k in range(1, int(3600 // f0) + 1):
        gain = np.prod(
            [resonator_gain(k * f0, f, bw) for f, bw in zip(formants, bandwidths, strict=True)]
        )
        wave += gain / k * np.sin(k * phase)
    pcm: Pcm = (0.5 * 32767 * wave / np.max(np.abs(wave))).astype(np.int16)
    return pcm


VOWELS = {
    "a": (700.0, 1220.0, 2600.0),
    "i": (270.0, 2290.0, 3010.0),
    "u": (300.0, 870.0, 2240.0),
    "ae": (850.0, 1610.0, 2500.0),
    "o": (570.0, 840.0, 2410.0),
    "e": (530.0, 1840.0, 2480.0),
    "er": (490.0, 1350.0, 1690.0),
}


@pytest.mark.parametrize("name", sorted(VOWELS))
@pytest.mark.parametrize("bandwidths", [(70.0, 100.0, 150.0), (50.0, 70.0, 110.0)])
def test_vowel_like_harmonic_signal_gives_no_digits(
    name: str, bandwidths: tuple[float, float, float]
) -> None:
    """Pitch sweeps male to child range, so harmonics land on every DTMF pair somewhere."""
    for f0 in np.arange(85.0, 260.0, 3.5):
        assert detect(vowel(float(f0), VOWELS[name], bandwidths)) == "", f0


def test_steady_harmonics_on_dtmf_frequencies_give_no_digits() -> None:
    """A pitch whose harmonics sit on a row and a column tone is still rich speech, not DTMF."""
    t = np.arange(RATE) / RATE
    f0 = 697 / 4  # 4th harmonic on 697 Hz, 7th lands near 1209 Hz
    wave = sum(np.sin(2 * np.pi * k * f0 * t) / k**0.3 for k in range(1, 20))
    assert detect((0.2 * 32767 * wave / 3).astype(np.int16)) == ""


def test_reset_forgets_partial_state() -> None:
    detector = GoertzelDetector()
    tone = dtmf_tone("4", 100)
    assert [d.digit for d in detector.feed(tone, 0.0)] == ["4"]
    detector.reset()
    assert [d.digit for d in detector.feed(tone, 1.0)] == ["4"]


def test_other_sample_rate() -> None:
    detector = GoertzelDetector(sample_rate=16000)
    pcm = np.concatenate(
        [np.zeros(800, dtype=np.int16), dtmf_tone("*", 80, 16000), np.zeros(800, dtype=np.int16)]
    )
    assert [d.digit for d in detector.feed(pcm, 0.0)] == ["*"]


# --------------------------------------------------------------------------------------------
# SIP INFO
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n", ("5", 160)),
        ("application/dtmf-relay", b"Signal=5\nDuration=250\n", ("5", 250)),
        ("Application/DTMF-Relay", b"signal = *\r\nduration= 90", ("*", 90)),
        ("application/dtmf-relay; charset=utf-8", b"Signal=#\r\n", ("#", 100)),
        ("application/dtmf-relay", b"Signal= d \r\nDuration=100\r\n", ("D", 100)),
        ("application/dtmf-relay", b"Signal=11\r\nDuration=100\r\n", ("#", 100)),
        ("application/dtmf-relay", b"\r\nSignal=0\r\n\r\nDuration=40\r\n\r\n", ("0", 40)),
        ("application/dtmf", b"7", ("7", 100)),
        ("application/dtmf", b"  #\r\n", ("#", 100)),
        ("application/dtmf", b"10", ("*", 100)),
        ("application/dtmf", b"15", ("D", 100)),
    ],
)
def test_parse_info_dtmf_accepts(content_type: str, body: bytes, expected: tuple[str, int]) -> None:
    assert parse_info_dtmf(content_type, body) == expected


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/dtmf-relay", b""),
        ("application/dtmf-relay", b"Duration=160\r\n"),
        ("application/dtmf-relay", b"Signal=E\r\n"),
        ("application/dtmf-relay", b"Signal=16\r\n"),
        ("application/dtmf-relay", b"Signal=\r\n"),
        ("application/dtmf-relay", b"Signal=5\r\nDuration=abc\r\n"),
        ("application/dtmf-relay", b"Signal=5\r\nDuration=-5\r\n"),
        ("application/dtmf-relay", b"garbage\r\n"),
        ("application/dtmf-relay", b"Signal=\xff\r\n"),
        ("application/dtmf", b""),
        ("application/dtmf", b"16"),
        ("application/dtmf", b"12a"),
        ("application/sdp", b"Signal=5\r\n"),
        ("text/plain", b"5"),
    ],
)
def test_parse_info_dtmf_rejects(content_type: str, body: bytes) -> None:
    assert parse_info_dtmf(content_type, body) is None


@pytest.mark.parametrize("digit", list(DIGITS))
def test_info_body_round_trip(digit: str) -> None:
    content_type, body = info_dtmf_body(digit, 250)
    assert content_type == "application/dtmf-relay"
    assert body == f"Signal={digit}\r\nDuration=250\r\n".encode()
    assert parse_info_dtmf(content_type, body) == (digit, 250)


def test_info_body_defaults_and_validation() -> None:
    assert info_dtmf_body("5") == ("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n")
    with pytest.raises(ValueError, match="not a DTMF digit"):
        info_dtmf_body("X")
    with pytest.raises(ValueError, match="duration_ms must be positive"):
        info_dtmf_body("1", 0)


@given(st.text(), st.binary())
def test_parse_info_never_raises(content_type: str, body: bytes) -> None:
    result = parse_info_dtmf(content_type, body)
    assert result is None or (result[0] in DIGITS and result[1] >= 0)


# --------------------------------------------------------------------------------------------
# feed_all: many detectors in one pass
# --------------------------------------------------------------------------------------------


def _streams() -> list[tuple[GoertzelDetector, npt.NDArray[Any]]]:
    """Detectors with the audio each hears: keys at various offsets, noise, a quiet key that
    only a more sensitive detector (other settings, so another group) reports."""
    rng = np.random.default_rng(3)
    quiet = keyed("9", amplitude=0.004)  # int16 scale: float input would mean full scale 1.0
    return [
        (GoertzelDetector(), keyed("147")),
        (GoertzelDetector(), np.concatenate([silence(33), keyed("2580")])),
        (GoertzelDetector(), rng.normal(0, 3000 / 32768, 8000)),
        (GoertzelDetector(), add_noise(keyed("*#"), 20.0).astype(np.int16)),
        (GoertzelDetector(), quiet),
        (GoertzelDetector(min_level_dbfs=-60.0), quiet),
        (GoertzelDetector(), keyed("36", tone_ms=2000, gap_ms=30)),
    ]


def _alone(chunk: int) -> list[list[DtmfDigit]]:
    out = []
    for detector, pcm in _streams():
        found: list[DtmfDigit] = []
        for start in range(0, len(pcm), chunk):
            found += detector.feed(pcm[start : start + chunk], start / RATE)
        out.append(found)
    return out


@pytest.mark.parametrize("chunk", [160, 1000, 3200])
def test_feed_all_equals_feeding_each_detector_alone(chunk: int) -> None:
    streams = _streams()
    together: list[list[DtmfDigit]] = [[] for _ in streams]
    longest = max(len(pcm) for _, pcm in streams)
    for start in range(0, longest, chunk):
        jobs = [(d, pcm[start : start + chunk], start / RATE) for d, pcm in streams]
        jobs = [job for job in jobs if len(job[1])]
        for index, found in zip(
            [i for i, (_, pcm) in enumerate(streams) if len(pcm) > start],
            feed_all(jobs),
            strict=True,
        ):
            together[index] += found
    assert together == _alone(chunk)
    assert ["".join(d.digit for d in found) for found in together] == [
        "147",
        "2580",
        "",
        "*#",
        "",
        "9",
        "36",
    ]


def test_feed_all_takes_a_detectors_repeated_chunks_in_order() -> None:
    pcm = keyed("42")
    half = len(pcm) // 2 + 53
    detector = GoertzelDetector()
    found = feed_all([(detector, pcm[:half], 0.0), (detector, pcm[half:], half / RATE)])
    assert "".join(d.digit for chunk in found for d in chunk) == "42"
    reference = GoertzelDetector()
    assert found == [reference.feed(pcm[:half], 0.0), reference.feed(pcm[half:], half / RATE)]


def test_feed_all_of_nothing() -> None:
    assert feed_all([]) == []
    assert feed_all([(GoertzelDetector(), np.zeros(50, dtype=np.int16), 0.0)]) == [[]]


def test_detector_keeps_no_view_of_the_audio_it_was_fed() -> None:
    """What stays buffered between feeds is copied: a view would keep each whole batch
    (and, through feed_all, every session's stacked batch) alive per call."""
    detector = GoertzelDetector(8000)
    detector.feed(np.zeros(3200 + 50, dtype=np.int16), 0.0)
    assert detector._buffer.base is None
    assert len(detector._buffer) == (3250 % 106)
    assert detector._last_block is not None
    assert detector._last_block.base is None
