"""Received call audio as a paced stream of 20 ms frames, and the frame measures IVR uses.

RTP only flows while the far end sends it: a SIP peer that stops sending (SIPp after its
pcap, phones with voice activity detection) produces no packets at all during silence.
Recording and answering-machine detection both measure silence in time, so the stream
follows the wall clock and hands out silent frames when nothing arrived in time.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from prompts.audio import pcm_to_wav

if TYPE_CHECKING:
    from gateway.call import Call

__all__ = [
    "FRAME_SAMPLES",
    "SAMPLE_RATE",
    "AudioStream",
    "VoiceActivity",
    "frame_dbfs",
    "write_wav",
]

SAMPLE_RATE = 8000
FRAME_SAMPLES = 160  # 20 ms at 8 kHz, the RTP packet size every peer here uses
_FULL_SCALE_POWER = 32768.0**2
# Received audio passes a 3-packet jitter buffer polled every 3 pacer ticks: up to ~120 ms
# late without anything being wrong. Waiting that long before inventing silence keeps
# real audio from being displaced by filler.
_DEFAULT_LAG = 0.15


def frame_dbfs(pcm: NDArray[Any]) -> float:
    """Mean power of a frame in dB relative to a full-scale square wave (-inf -> -120)."""
    samples = np.asarray(pcm, dtype=np.float64)
    if samples.size == 0:
        return -120.0
    samples = samples - samples.mean()  # DC offset is not sound
    power = float(np.dot(samples, samples)) / samples.size
    return max(-120.0, 10.0 * math.log10(power / _FULL_SCALE_POWER + 1e-15))


class VoiceActivity:
    """Speech/silence decision per frame against the line's own noise floor.

    The floor is the quietest frame of the last ``window`` frames: speech always has gaps,
    so that minimum is the line noise. A frame is speech when it is ``margin_db`` above it,
    never below ``min_db`` (digital silence and hiss) and always above ``max_db`` (so a
    caller talking from the first frame is heard before the floor is known).
    """

    def __init__(
        self,
        *,
        min_db: float = -45.0,
        max_db: float = -30.0,
        margin_db: float = 10.0,
        window: int = 75,
    ) -> None:
        self.min_db = min_db
        self.max_db = max_db
        self.margin_db = margin_db
        self._recent: deque[float] = deque(maxlen=max(1, window))
        self.last_db = -120.0

    def is_speech(self, frame: NDArray[Any]) -> bool:
        energy = frame_dbfs(frame)
        self.last_db = energy
        self._recent.append(energy)
        threshold = min(max(self.min_db, min(self._recent) + self.margin_db), self.max_db)
        return energy >= threshold


def write_wav(path: Path, pcm: NDArray[np.int16], rate: int = SAMPLE_RATE) -> Path:
    """Store mono int16 audio as a PCM WAV file, creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pcm_to_wav(pcm.astype(np.int16, copy=False), rate))
    return path


class AudioStream:
    """The audio a call receives from the moment the stream is opened, frame by frame.

    Use as an async context manager; ``read`` returns the next 20 ms frame, real audio when
    it has arrived, otherwise silence once the wall clock says the frame is overdue, and
    ``None`` when the call has ended and everything received was read.
    """

    def __init__(self, call: Call, *, lag: float = _DEFAULT_LAG) -> None:
        self.call = call
        self.lag = lag
        self.filled_frames = 0  # silent frames handed out because no RTP arrived
        self._chunks: list[NDArray[np.int16]] = []
        self._buffered = 0
        self._arrived = asyncio.Event()
        self._remove: Any = None
        self._started = 0.0
        self._delivered = 0  # samples handed out, real or filler

    async def __aenter__(self) -> AudioStream:
        media = self.call.media
        if media is None:
            from gateway.call import CallEnded

            raise CallEnded("the call has no media")
        self._remove = media.add_audio_listener(self._on_audio)
        self._started = self.call.loop.time()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._remove is not None:
            self._remove()
            self._remove = None

    @property
    def elapsed(self) -> float:
        """Seconds of audio handed out so far."""
        return self._delivered / SAMPLE_RATE

    def _on_audio(self, pcm: NDArray[np.int16]) -> None:
        self._chunks.append(pcm)
        self._buffered += len(pcm)
        self._arrived.set()

    def _take(self) -> NDArray[np.int16]:
        data = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        frame, rest = data[:FRAME_SAMPLES], data[FRAME_SAMPLES:]
        self._chunks = [rest] if len(rest) else []
        self._buffered = len(rest)
        self._delivered += FRAME_SAMPLES
        return frame

    async def read(self) -> NDArray[np.int16] | None:
        """The next frame (160 samples), waiting at most until it is overdue."""
        loop = self.call.loop
        while self._buffered < FRAME_SAMPLES:
            if self.call.ended.is_set():
                return None
            due = self._started + (self._delivered + FRAME_SAMPLES) / SAMPLE_RATE + self.lag
            remaining = due - loop.time()
            if remaining <= 0:
                self._delivered += FRAME_SAMPLES
                self.filled_frames += 1
                return np.zeros(FRAME_SAMPLES, dtype=np.int16)
            self._arrived.clear()
            waiter = asyncio.ensure_future(self._arrived.wait())
            ender = asyncio.ensure_future(self.call.ended.wait())
            try:
                await asyncio.wait(
                    {waiter, ender}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                waiter.cancel()
                ender.cancel()
        return self._take()
