"""G.711 tables against a scalar transcription of the ITU-T G.191 reference algorithm."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.media.g711 import (
    ALAW_SILENCE,
    SILENCE,
    ULAW_SILENCE,
    alaw_decode,
    alaw_encode,
    decoder_for,
    encoder_for,
    silence_frame,
    ulaw_decode,
    ulaw_encode,
)


def _ref_ulaw_compress(x: int) -> int:
    """G.191 ``ulaw_compress`` for one 16-bit sample, written as the C reference loops."""
    absno = ((~x) >> 2) + 33 if x < 0 else (x >> 2) + 33
    absno = min(absno, 0x1FFF)
    i = absno >> 6
    segno = 1
    while i != 0:
        segno += 1
        i >>= 1
    high = 0x0008 - segno
    low = 0x000F - ((absno >> segno) & 0x000F)
    out = (high << 4) | low
    if x >= 0:
        out |= 0x0080
    return out


def _ref_ulaw_expand(code: int) -> int:
    sign = -1 if code < 0x80 else 1
    mantissa = ~code
    exponent = (mantissa >> 4) & 0x07
    segment = exponent + 1
    mantissa &= 0x0F
    step = 4 << segment
    return sign * ((0x80 << exponent) + step * mantissa + step // 2 - 4 * 33)


def _ref_alaw_compress(x: int) -> int:
    ix = (~x) >> 4 if x < 0 else x >> 4
    if ix > 15:
        iexp = 1
        while ix > 16 + 15:
            ix >>= 1
            iexp += 1
        ix -= 16
        ix += iexp << 4
    if x >= 0:
        ix |= 0x0080
    return ix ^ 0x0055


def _ref_alaw_expand(code: int) -> int:
    ix = (code ^ 0x55) & 0x7F
    iexp = ix >> 4
    mant = ix & 0x0F
    if iexp > 0:
        mant += 16
    mant = (mant << 4) + 0x0008
    if iexp > 1:
        mant <<= iexp - 1
    return mant if code > 127 else -mant


ALL_SAMPLES: NDArray[np.int16] = np.arange(-32768, 32768, dtype=np.int32).astype(np.int16)


def test_ulaw_encode_matches_reference_for_every_sample() -> None:
    expected = bytes(_ref_ulaw_compress(int(x)) for x in ALL_SAMPLES)
    assert ulaw_encode(ALL_SAMPLES) == expected


def test_alaw_encode_matches_reference_for_every_sample() -> None:
    expected = bytes(_ref_alaw_compress(int(x)) for x in ALL_SAMPLES)
    assert alaw_encode(ALL_SAMPLES) == expected


def test_decode_matches_reference_for_every_code() -> None:
    codes = bytes(range(256))
    assert ulaw_decode(codes).tolist() == [_ref_ulaw_expand(c) for c in range(256)]
    assert alaw_decode(codes).tolist() == [_ref_alaw_expand(c) for c in range(256)]


@pytest.mark.parametrize(
    ("sample", "ulaw", "alaw"),
    [
        (0, 0xFF, 0xD5),
        (-1, 0x7F, 0x55),
        (32767, 0x80, 0xAA),
        (-32768, 0x00, 0x2A),
        (1000, 0xCE, 0xFA),
        (-1000, 0x4E, 0x7A),
    ],
)
def test_published_code_points(sample: int, ulaw: int, alaw: int) -> None:
    pcm = np.array([sample], dtype=np.int16)
    assert ulaw_encode(pcm) == bytes([ulaw])
    assert alaw_encode(pcm) == bytes([alaw])


def test_decode_extremes_and_zero() -> None:
    # G.711 full-scale outputs: µ-law ±32124, A-law ±32256; µ-law has two zeros.
    assert ulaw_decode(bytes([0x80, 0x00, 0xFF, 0x7F])).tolist() == [32124, -32124, 0, 0]
    assert alaw_decode(bytes([0xAA, 0x2A, 0xD5, 0x55])).tolist() == [32256, -32256, 8, -8]


def test_decode_returns_int16_owned_array() -> None:
    out = ulaw_decode(b"\x00\x80")
    assert out.dtype == np.int16
    out[0] = 7  # must be writable, not a view of the read-only table
    assert ulaw_decode(b"\x00")[0] == -32124


@pytest.mark.parametrize(
    ("encode", "decode", "rel"),
    [(ulaw_encode, ulaw_decode, 1 / 30), (alaw_encode, alaw_decode, 1 / 30)],
)
def test_round_trip_error_is_within_half_a_quantisation_step(
    encode: object, decode: object, rel: float
) -> None:
    assert callable(encode)
    assert callable(decode)
    # Below the clipping point the error is at most half a segment step: ~|x|/32 plus
    # the fixed step of the first segments.
    pcm = ALL_SAMPLES[np.abs(ALL_SAMPLES.astype(np.int32)) <= 32000]
    err = np.abs(decode(encode(pcm)).astype(np.int32) - pcm.astype(np.int32))
    bound = np.abs(pcm.astype(np.int32)) * rel + 16
    assert np.all(err <= bound)


@pytest.mark.parametrize("codec", ["PCMU", "PCMA", "pcmu"])
def test_sine_round_trip_snr(codec: str) -> None:
    t = np.arange(8000) / 8000
    pcm = (np.sin(2 * np.pi * 1004 * t) * 16000).astype(np.int16)
    out = decoder_for(codec)(encoder_for(codec)(pcm)).astype(np.float64)
    noise = out - pcm
    snr_db = 10 * np.log10(np.sum(pcm.astype(np.float64) ** 2) / np.sum(noise**2))
    assert snr_db > 33  # G.711 gives ~38 dB for a loud sine


def test_silence_bytes() -> None:
    assert ULAW_SILENCE == 0xFF
    assert ALAW_SILENCE == 0xD5
    assert SILENCE == {"PCMU": 0xFF, "PCMA": 0xD5}
    assert ulaw_decode(bytes([SILENCE["PCMU"]])).tolist() == [0]
    assert abs(int(alaw_decode(bytes([SILENCE["PCMA"]]))[0])) <= 8
    assert ulaw_encode(np.zeros(160, dtype=np.int16)) == silence_frame("PCMU", 160)
    assert alaw_encode(np.zeros(160, dtype=np.int16)) == silence_frame("pcma", 160)


def test_rejects_non_int16_and_unknown_codecs() -> None:
    with pytest.raises(TypeError):
        ulaw_encode(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"unsupported G\.711 codec 'G722'"):
        encoder_for("G722")
    with pytest.raises(ValueError, match=r"unsupported G\.711 codec 'opus'"):
        decoder_for("opus")
    with pytest.raises(ValueError, match="samples must be non-negative"):
        silence_frame("PCMU", -1)


def test_non_contiguous_input() -> None:
    pcm = ALL_SAMPLES[::7]
    assert ulaw_encode(pcm) == ulaw_encode(pcm.copy())
    assert ulaw_encode(np.array([], dtype=np.int16)) == b""
