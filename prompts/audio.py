"""Conversion of engine WAV output to telephony PCM (8 kHz, mono, signed 16-bit)."""

from __future__ import annotations

import io
import math
import wave
from typing import Any

import numpy as np
import numpy.typing as npt
from pydub import AudioSegment

__all__ = [
    "TELEPHONY_RATE",
    "WavFormatError",
    "pcm_to_wav",
    "resample",
    "to_telephony_pcm",
    "wav_to_pcm",
]

TELEPHONY_RATE = 8000

Pcm = npt.NDArray[np.int16]

# Resampler design: Kaiser-windowed sinc, cutoff at 90% of the lower Nyquist, 20 zero crossings
# each side. Linear-interpolation resamplers (pydub/audioop) fold espeak's 4-11 kHz fricative
# energy back into the voice band as hiss; this keeps aliases below about -70 dB.
_CUTOFF = 0.9
_ZERO_CROSSINGS = 20
_KAISER_BETA = 8.0
_CHUNK = 4096


class WavFormatError(ValueError):
    """Bytes are not a complete WAV of the expected format (corrupt or truncated)."""


def to_telephony_pcm(wav_bytes: bytes) -> Pcm:
    """Decode any WAV pydub understands and return 8 kHz mono int16 samples.

    pydub parses plain PCM WAV itself and only shells out to ffmpeg for formats it cannot read
    (float, A-law, odd headers); rate conversion is done here with a band-limited resampler.
    """
    try:
        segment: Any = AudioSegment.from_file(io.BytesIO(wav_bytes), format="wav")
    except Exception as exc:  # pydub raises CouldntDecodeError, IndexError, OSError...
        raise WavFormatError(f"cannot decode engine audio: {exc}") from exc
    segment = segment.set_channels(1).set_sample_width(2)
    rate = int(segment.frame_rate)
    raw: bytes = segment.raw_data
    samples = np.frombuffer(raw, dtype="<i2").astype(np.int16)
    return resample(samples, rate, TELEPHONY_RATE)


def resample(samples: Pcm, src_rate: int, dst_rate: int) -> Pcm:
    """Band-limited rational resampling of mono int16 audio (polyphase windowed sinc)."""
    if src_rate <= 0 or dst_rate <= 0:
        raise ValueError("sample rates must be positive")
    if samples.ndim != 1:
        raise ValueError("resample expects mono (1-D) samples")
    if src_rate == dst_rate or samples.size == 0:
        return samples.astype(np.int16, copy=True)
    g = math.gcd(src_rate, dst_rate)
    up, down = dst_rate // g, src_rate // g
    # Output n sits at input position n * down / up; phase (n * down) % up picks its kernel.
    ratio = min(1.0, dst_rate / src_rate) * _CUTOFF
    half = math.ceil(_ZERO_CROSSINGS / ratio)
    offsets = np.arange(-half + 1, half + 1)
    phases = np.arange(up) / up
    x = phases[:, None] - offsets[None, :]  # distance (input samples) from output to each tap
    window = np.i0(_KAISER_BETA * np.sqrt(np.clip(1.0 - (x / half) ** 2, 0.0, None)))
    table = ratio * np.sinc(ratio * x) * window / np.i0(_KAISER_BETA)
    table /= table.sum(axis=1, keepdims=True)  # unity DC gain for every phase

    padded = np.concatenate(
        [np.zeros(half, np.float64), samples.astype(np.float64), np.zeros(half + 1, np.float64)]
    )
    n_out = (samples.size * up) // down
    out = np.empty(n_out, np.float64)
    for start in range(0, n_out, _CHUNK):
        n = np.arange(start, min(start + _CHUNK, n_out), dtype=np.int64)
        pos = n * down
        base = pos // up
        idx = base[:, None] + offsets[None, :] + half
        out[start : start + n.size] = np.einsum("ij,ij->i", padded[idx], table[pos % up])
    return np.clip(np.rint(out), -32768, 32767).astype(np.int16)


def pcm_to_wav(pcm: Pcm, rate: int = TELEPHONY_RATE) -> bytes:
    """Wrap mono int16 samples in a canonical little-endian PCM WAV file."""
    if pcm.ndim != 1 or pcm.dtype != np.int16:
        raise ValueError(f"expected 1-D int16 samples, got {pcm.ndim}-D {pcm.dtype}")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2", copy=False).tobytes())
    return buf.getvalue()


def wav_to_pcm(data: bytes, *, rate: int | None = TELEPHONY_RATE) -> Pcm:
    """Read a mono 16-bit WAV strictly; a wrong format or short data chunk is an error.

    Strictness is the point: the prompt cache relies on it to spot damaged files.
    Pass `rate=None` to accept any sample rate.
    """
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            channels, width, framerate, nframes = (
                w.getnchannels(),
                w.getsampwidth(),
                w.getframerate(),
                w.getnframes(),
            )
            frames = w.readframes(nframes)
    except (wave.Error, EOFError, ValueError) as exc:
        raise WavFormatError(f"not a readable WAV: {exc}") from exc
    if channels != 1 or width != 2:
        raise WavFormatError(f"expected mono 16-bit WAV, got {channels} ch x {width * 8} bit")
    if rate is not None and framerate != rate:
        raise WavFormatError(f"expected {rate} Hz WAV, got {framerate} Hz")
    if len(frames) != nframes * 2:
        found = len(frames) // 2
        raise WavFormatError(f"truncated WAV: header says {nframes} frames, found {found}")
    return np.frombuffer(frames, dtype="<i2").astype(np.int16)
