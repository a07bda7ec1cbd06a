"""The received-audio tap in MediaSession and the wall-clock paced AudioStream on top."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import cast

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.call import Call
from gateway.media.pacer import Pacer
from gateway.media.session import MediaSession
from ivr.audio import FRAME_SAMPLES, AudioStream, VoiceActivity, frame_dbfs
from tests.ivr_harness import loopback
from tests.unit.test_media_session import HOST, negotiated, raw_peer, rtp, wait_for

pytestmark = pytest.mark.timeout(30)


async def test_listener_sees_what_history_stores_including_gap_fill() -> None:
    pacer = Pacer(20)
    session = MediaSession(local_host=HOST, pacer=pacer)
    peer = await raw_peer()
    try:
        port = await session.open()
        session.configure(negotiated(peer.port))
        chunks: list[NDArray[np.int16]] = []
        remove = session.add_audio_listener(chunks.append)

        def broken(_: NDArray[np.int16]) -> None:
            raise RuntimeError("listener bug")

        session.add_audio_listener(broken)  # must not break reception or other listeners
        tone = bytes(range(0x10, 0x10 + 160))
        for seq in (1, 2, 4):  # packet 3 is lost: 160 samples of silence fill its place
            peer.send(rtp(seq, tone), port)
        await wait_for(lambda: sum(len(c) for c in chunks) >= 4 * 160)
        heard = np.concatenate(chunks)
        assert np.array_equal(heard, session.received_audio())
        assert len(heard) == 4 * 160
        assert not heard[320:480].any()
        assert heard[:160].any()
        remove()
        peer.send(rtp(5, tone), port)
        await wait_for(lambda: len(session.received_audio()) >= 5 * 160)
        assert sum(len(c) for c in chunks) == 4 * 160  # removed: nothing more delivered
    finally:
        await session.close()
        await pacer.stop()
        assert peer.transport is not None
        peer.transport.close()


async def test_stream_fills_silence_when_no_rtp_arrives(tmp_path: Path) -> None:
    """A caller that sends nothing still yields frames at the wall-clock rate."""

    async def listen(call: Call) -> tuple[float, list[NDArray[np.int16] | None], int]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with AudioStream(call) as stream:
            frames = [await stream.read() for _ in range(25)]
        return loop.time() - started, frames, stream.filled_frames

    async with loopback(tmp_path, listen) as lb:
        call = await lb.call()
        assert call.media is not None
        assert call.media.media is not None
        # The caller goes quiet (as if held: no RTP at all, from either send path).
        call.media.configure(dataclasses.replace(call.media.media, direction="inactive"))
        took, frames, filled = cast(
            tuple[float, list[NDArray[np.int16] | None], int], await lb.outcome()
        )
    assert 0.4 < took < 1.0  # 25 frames of 20 ms, paced by the clock, not instant
    assert filled >= 20
    assert all(f is not None and len(f) == FRAME_SAMPLES and not f.any() for f in frames)


def test_voice_activity_follows_the_noise_floor() -> None:
    rng = np.random.default_rng(3)
    hiss = rng.normal(0, 900, FRAME_SAMPLES * 100).astype(np.int16)  # about -31 dBFS
    vad = VoiceActivity()
    voiced = [vad.is_speech(hiss[i : i + FRAME_SAMPLES]) for i in range(0, len(hiss), 160)]
    assert sum(voiced[10:]) == 0  # once the floor is known, steady hiss is not speech
    t = np.arange(FRAME_SAMPLES * 10) / 8000
    talk = (hiss[: len(t)] + 9000 * np.sin(2 * np.pi * 300 * t)).astype(np.int16)
    assert all(vad.is_speech(talk[i : i + FRAME_SAMPLES]) for i in range(0, len(talk), 160))
    assert frame_dbfs(np.zeros(160, dtype=np.int16)) == -120.0


async def test_without_history_listeners_still_get_every_chunk() -> None:
    """The gateway keeps no history by default (memory per call); listeners, which
    recording and AMD use, must see exactly what a history would have held."""
    pacer = Pacer(20)
    session = MediaSession(local_host=HOST, pacer=pacer, history_seconds=0)
    peer = await raw_peer()
    try:
        port = await session.open()
        session.configure(negotiated(peer.port))
        chunks: list[NDArray[np.int16]] = []
        session.add_audio_listener(chunks.append)
        tone = bytes(range(0x10, 0x10 + 160))
        for seq in (1, 2, 4):
            peer.send(rtp(seq, tone), port)
        await wait_for(lambda: sum(len(c) for c in chunks) >= 4 * 160)
        heard = np.concatenate(chunks)
        assert len(heard) == 4 * 160
        assert not heard[320:480].any()
        assert heard[:160].any()
        assert len(session.received_audio()) == 0
    finally:
        await session.close()
