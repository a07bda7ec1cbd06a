"""Typed access to the native paced RTP sender (``_rtpsend``, built from ``_rtpsend.c``).

One C thread per process sends every stream's next packet on absolute 20 ms ticks, so the
per-packet work of a thousand calls leaves the event loop and its GIL; Python only keeps
each stream's queue ~160 ms ahead. When the extension is not built (a source checkout run
without ``pip install``) :func:`available` is False and sessions use the Python pacer.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

try:
    from gateway.media import _rtpsend as _ext

    _BUILT = True
except ImportError:  # not built: sessions send from the Python pacer instead
    _BUILT = False

__all__ = [
    "NativeSenderStats",
    "NativeStream",
    "NativeStreamStats",
    "available",
    "reset_stats",
    "stats",
]

# Set to "0" to keep the native sender off in this process (comparisons, diagnosis).
_DISABLE_ENV = "ACKLINE_NATIVE_SEND"
RING = 128  # packets a stream can queue (the extension's RING)


def available() -> bool:
    """True when the extension is built and not switched off by ACKLINE_NATIVE_SEND=0."""
    return _BUILT and os.environ.get(_DISABLE_ENV, "1") != "0"


@dataclass(frozen=True, slots=True)
class NativeStreamStats:
    """One stream's counters: ``underruns`` counts times its queue ran dry while fed."""

    pushed: int
    sent: int
    underruns: int
    dropped: int
    errors: int
    queued: int


def _summary(values: Any) -> dict[str, float]:
    return {key: float(values.get(key, math.nan)) for key in ("p50", "p99", "max")}


@dataclass(frozen=True, slots=True)
class NativeSenderStats:
    """The sender thread since start or ``reset_stats``: ``lateness_ms`` is how late each
    2 ms send step woke after its deadline, ``interval_jitter_ms`` |tick interval - 20 ms|."""

    lateness_ms: dict[str, float]
    interval_jitter_ms: dict[str, float]
    ticks: int
    ticks_skipped: int
    ticks_caught_up: int
    sent: int
    underruns: int
    dropped: int
    errors: int
    streams: int
    realtime: bool  # SCHED_FIFO was granted
    running: bool


def stats() -> NativeSenderStats:
    if not _BUILT:
        raise RuntimeError("the native RTP sender is not built")
    raw = _ext.stats()
    return NativeSenderStats(
        lateness_ms=_summary(raw["lateness_ms"]),
        interval_jitter_ms=_summary(raw["interval_jitter_ms"]),
        ticks=int(raw["ticks"]),
        ticks_skipped=int(raw["ticks_skipped"]),
        ticks_caught_up=int(raw["ticks_caught_up"]),
        sent=int(raw["sent"]),
        underruns=int(raw["underruns"]),
        dropped=int(raw["dropped"]),
        errors=int(raw["errors"]),
        streams=int(raw["streams"]),
        realtime=bool(raw["realtime"]),
        running=bool(raw["running"]),
    )


def reset_stats() -> None:
    """Start a new measurement window of the sender thread's figures."""
    if _BUILT:
        _ext.reset_stats()


class NativeStream:
    """One outgoing stream: ``fd`` is the call's UDP socket (the sender uses a dup of it),
    ``address`` where packets go, one every ``period`` 20 ms ticks. Closing (or dropping
    the object) frees the sender's slot and drops what is still queued."""

    __slots__ = ("_sid", "address")

    def __init__(self, fd: int, address: tuple[Any, ...], *, period: int = 1) -> None:
        self._sid: int | None = None
        if not _BUILT:
            raise RuntimeError("the native RTP sender is not built")
        self._sid = _ext.open_stream(fd, tuple(address), period)
        self.address = address

    @property
    def closed(self) -> bool:
        return self._sid is None

    def _id(self) -> int:
        if self._sid is None:
            raise ValueError("native stream is closed")
        return self._sid

    def push(self, packet: bytes) -> bool:
        """Queue one ready packet (e.g. SRTP-protected); False when the queue is full."""
        return _ext.push(self._id(), packet)

    def push_rtp(
        self,
        payload: bytes | memoryview,
        *,
        frame_size: int,
        sequence_number: int,
        timestamp: int,
        ssrc: int,
        payload_type: int,
        marker: bool = False,
        samples: int | None = None,
    ) -> int:
        """Queue ``len(payload) // frame_size`` RTP packets with consecutive sequence numbers
        and timestamps ``samples`` apart (default ``frame_size``, right for G.711); the
        marker bit on the first only. Returns how many fitted."""
        return _ext.push_rtp(
            self._id(),
            payload,
            frame_size,
            sequence_number & 0xFFFF,
            timestamp & 0xFFFFFFFF,
            ssrc,
            payload_type,
            marker,
            frame_size if samples is None else samples,
        )

    def flush(self) -> int:
        """Drop everything queued; returns how many packets were dropped."""
        return _ext.flush(self._id())

    def queued(self) -> int:
        return _ext.queued(self._id())

    def stats(self) -> NativeStreamStats:
        raw = _ext.stream_stats(self._id())
        return NativeStreamStats(**{key: int(value) for key, value in raw.items()})

    def close(self) -> None:
        sid, self._sid = self._sid, None
        if sid is not None:
            _ext.close_stream(sid)

    def __del__(self) -> None:
        self.close()
