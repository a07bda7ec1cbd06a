"""Connect two answered calls: each side hears the other until one of them hangs up.

The relay works on decoded audio (a listener on one call's media session queues what
arrives into the other's playback), so the two legs may use different codecs, ports
and transports. A leg that falls behind drops audio instead of building up delay: a
conversation with a growing lag is worse than one with a short gap.

Keys pressed out of band (RFC 4733 events, SIP INFO) are sent on to the other leg in
the way it understands (events when it negotiated telephone-event, else INFO), so a
caller can work an IVR or enter a conference PIN behind the bridge. In-band tones are
audio and cross with it; relaying them out of band as well would press them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from gateway.call import Call, CallEnded
from gateway.media.dtmf import DtmfMethod
from gateway.media.session import MediaSession
from gateway.result import ReceivedDigit

__all__ = ["BridgeResult", "bridge_calls"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BridgeResult:
    ended_by: str  # "a" or "b": who hung up first; "timeout" when max_duration passed
    seconds: float
    relayed_ms: tuple[int, int]  # audio carried a -> b and b -> a
    dropped_ms: tuple[int, int]  # audio dropped because the other side was behind
    relayed_digits: tuple[str, str] = ("", "")  # out-of-band keys sent whole a -> b, b -> a


class _Relay:
    """Queues one leg's received audio into the other leg's playback, boundedly."""

    def __init__(self, target: MediaSession, max_lag_ms: int) -> None:
        self.target = target
        self.max_pending = max(1, max_lag_ms // 20)
        self.pending = 0
        self.relayed_samples = 0
        self.dropped_samples = 0

    def __call__(self, pcm: NDArray[np.int16]) -> None:
        if self.pending >= self.max_pending:
            self.dropped_samples += len(pcm)
            return
        self.pending += 1
        self.relayed_samples += len(pcm)
        future = self.target.play(pcm.copy())
        future.add_done_callback(self._done)

    def _done(self, _future: asyncio.Future[None]) -> None:
        self.pending -= 1


class _DigitRelay:
    """Sends one leg's out-of-band digits to the other leg, one at a time, in order."""

    def __init__(self, target: Call) -> None:
        self.target = target
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.sent = ""
        self.task = asyncio.ensure_future(self._send())

    def __call__(self, digit: ReceivedDigit) -> None:
        if digit.method != DtmfMethod.INBAND.value:
            self.queue.put_nowait(digit.digit)

    async def _send(self) -> None:
        while True:
            digit = await self.queue.get()
            try:
                await self.target.send_digits(digit, method=self.target.dtmf_method)
            except (CallEnded, RuntimeError, OSError) as exc:  # it hung up, or is on hold
                logger.info("bridge: digit %s not relayed to %s: %s",
                            digit, self.target.call_id, exc)  # fmt: skip
                continue
            self.sent += digit

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def bridge_calls(
    a: Call, b: Call, *, max_lag_ms: int = 120, max_duration: float = 3600.0
) -> BridgeResult:
    """Relay audio both ways until either call ends (the other is then hung up)."""
    if a.media is None or b.media is None or not (a.answered and b.answered):
        raise ValueError("both calls must be answered before they can be bridged")
    a.media.stop_playback()
    b.media.stop_playback()
    to_b, to_a = _Relay(b.media, max_lag_ms), _Relay(a.media, max_lag_ms)
    keys_to_b, keys_to_a = _DigitRelay(b), _DigitRelay(a)
    removers: list[Callable[[], None]] = [
        a.media.add_audio_listener(to_b),
        b.media.add_audio_listener(to_a),
        a.add_digit_listener(keys_to_b),
        b.add_digit_listener(keys_to_a),
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    a_ended = asyncio.ensure_future(a.ended.wait())
    b_ended = asyncio.ensure_future(b.ended.wait())
    try:
        done, _ = await asyncio.wait(
            {a_ended, b_ended}, timeout=max_duration, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        a_ended.cancel()
        b_ended.cancel()
        for remove in removers:
            remove()
        await keys_to_b.close()
        await keys_to_a.close()
    ended_by = "a" if a_ended in done else "b" if b_ended in done else "timeout"
    for leg in (a, b):
        if not leg.ended.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(leg.hangup(), 5.0)
    result = BridgeResult(
        ended_by,
        loop.time() - started,
        (to_b.relayed_samples // 8, to_a.relayed_samples // 8),
        (to_b.dropped_samples // 8, to_a.dropped_samples // 8),
        (keys_to_b.sent, keys_to_a.sent),
    )
    logger.info("bridge %s <-> %s ended by %s: %s", a.call_id, b.call_id, ended_by, result)
    return result
