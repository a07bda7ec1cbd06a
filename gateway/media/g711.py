"""G.711 µ-law (PCMU) and A-law (PCMA) companding with precomputed lookup tables.

Every call encodes 50 frames a second in each direction, so the codec is a single numpy
gather per frame: the 65536-entry encode tables are indexed by the ``uint16`` view of the
samples and the 256-entry decode tables by the code bytes. The tables are generated once,
vectorised, from the ITU-T G.191 (STL) reference formulation of G.711, including its
one's-complement treatment of negative samples, so the output is bit-exact with it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "ALAW_SILENCE",
    "SILENCE",
    "ULAW_SILENCE",
    "Decoder",
    "Encoder",
    "alaw_decode",
    "alaw_encode",
    "decoder_for",
    "encoder_for",
    "silence_frame",
    "ulaw_decode",
    "ulaw_encode",
]

Encoder = Callable[[NDArray[np.int16]], bytes]
Decoder = Callable[[bytes], NDArray[np.int16]]

ULAW_SILENCE = 0xFF
"""µ-law code for a zero sample (positive zero)."""
ALAW_SILENCE = 0xD5
"""A-law code for the smallest positive sample (A-law has no exact zero)."""

SILENCE: Mapping[str, int] = MappingProxyType({"PCMU": ULAW_SILENCE, "PCMA": ALAW_SILENCE})
"""Silence byte per SDP codec name."""


def _all_int16() -> NDArray[np.int64]:
    """Every int16 value, ordered by its uint16 bit pattern (the encode table index)."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.int16).astype(np.int64)


def _bit_length(values: NDArray[np.int64]) -> NDArray[np.int64]:
    """Vectorised ``int.bit_length`` for non-negative integers below 2**52."""
    return np.frexp(values.astype(np.float64))[1].astype(np.int64)


def _build_ulaw_encode() -> NDArray[np.uint8]:
    x = _all_int16()
    # 14-bit magnitude plus the µ-law bias (33 in 14-bit units); negatives use ~x.
    magnitude = np.where(x < 0, (~x) >> 2, x >> 2) + 33
    magnitude = np.minimum(magnitude, 0x1FFF)
    segment = _bit_length(magnitude >> 6) + 1
    high = 8 - segment
    low = 0x0F - ((magnitude >> segment) & 0x0F)
    code: NDArray[np.int64] = (high << 4) | low
    return np.where(x >= 0, code | 0x80, code).astype(np.uint8)


def _build_ulaw_decode() -> NDArray[np.int16]:
    code = np.arange(256, dtype=np.int64)
    inverted = ~code
    exponent = (inverted >> 4) & 0x07
    mantissa = inverted & 0x0F
    step = 4 << (exponent + 1)
    magnitude = (0x80 << exponent) + step * mantissa + step // 2 - 4 * 33
    return np.where(code < 0x80, -magnitude, magnitude).astype(np.int16)


def _build_alaw_encode() -> NDArray[np.uint8]:
    x = _all_int16()
    magnitude = np.where(x < 0, (~x) >> 4, x >> 4)  # 12-bit magnitude, one's complement
    exponent = np.maximum(_bit_length(magnitude) - 4, 0)
    shifted = magnitude >> np.maximum(exponent - 1, 0)
    code = np.where(exponent == 0, magnitude, (exponent << 4) + shifted - 16)
    code = np.where(x >= 0, code | 0x80, code)
    return (code ^ 0x55).astype(np.uint8)


def _build_alaw_decode() -> NDArray[np.int16]:
    code = np.arange(256, dtype=np.int64)
    value = (code ^ 0x55) & 0x7F
    exponent = value >> 4
    mantissa = value & 0x0F
    mantissa = np.where(exponent > 0, mantissa + 16, mantissa)
    mantissa = (mantissa << 4) + 8
    mantissa = np.where(exponent > 1, mantissa << np.maximum(exponent - 1, 0), mantissa)
    return np.where(code > 0x7F, mantissa, -mantissa).astype(np.int16)


_ULAW_ENCODE = _build_ulaw_encode()
_ULAW_DECODE = _build_ulaw_decode()
_ALAW_ENCODE = _build_alaw_encode()
_ALAW_DECODE = _build_alaw_decode()
for _table in (_ULAW_ENCODE, _ULAW_DECODE, _ALAW_ENCODE, _ALAW_DECODE):
    _table.flags.writeable = False


def _as_index(pcm: NDArray[np.int16]) -> NDArray[np.uint16]:
    """Reinterpret samples as table indices; refuses other dtypes rather than guess a scale."""
    if pcm.dtype != np.int16:
        raise TypeError(f"G.711 encodes int16 samples, got {pcm.dtype}")
    return np.ascontiguousarray(pcm).view(np.uint16)


def ulaw_encode(pcm: NDArray[np.int16]) -> bytes:
    """Encode int16 samples to µ-law bytes."""
    return _ULAW_ENCODE[_as_index(pcm)].tobytes()


def ulaw_decode(data: bytes) -> NDArray[np.int16]:
    """Decode µ-law bytes to a new int16 array."""
    return _ULAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


def alaw_encode(pcm: NDArray[np.int16]) -> bytes:
    """Encode int16 samples to A-law bytes."""
    return _ALAW_ENCODE[_as_index(pcm)].tobytes()


def alaw_decode(data: bytes) -> NDArray[np.int16]:
    """Decode A-law bytes to a new int16 array."""
    return _ALAW_DECODE[np.frombuffer(data, dtype=np.uint8)]


_ENCODERS: Mapping[str, Encoder] = {"PCMU": ulaw_encode, "PCMA": alaw_encode}
_DECODERS: Mapping[str, Decoder] = {"PCMU": ulaw_decode, "PCMA": alaw_decode}


def _codec_key(codec: str) -> str:
    key = codec.upper()
    if key not in _ENCODERS:
        raise ValueError(f"unsupported G.711 codec {codec!r}; expected PCMU or PCMA")
    return key


def encoder_for(codec: str) -> Encoder:
    """Encoder for an SDP codec name (case-insensitive, as rtpmap names are)."""
    return _ENCODERS[_codec_key(codec)]


def decoder_for(codec: str) -> Decoder:
    """Decoder for an SDP codec name (case-insensitive)."""
    return _DECODERS[_codec_key(codec)]


def silence_frame(codec: str, samples: int) -> bytes:
    """A payload of ``samples`` silence codes, for the comfort stream between prompts."""
    if samples < 0:
        raise ValueError("samples must be non-negative")
    return bytes((SILENCE[_codec_key(codec)],)) * samples
