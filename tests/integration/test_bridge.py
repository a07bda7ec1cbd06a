"""Bridging two calls: a caller and a callee (two softphones, separate user agents) hear
each other through our gateway, and one hanging up ends the other."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from gateway.bridge import BridgeResult, bridge_calls
from gateway.call import Call, Gateway, GatewayConfig
from gateway.softphone import Softphone

pytestmark = pytest.mark.timeout(60)


def tone(hz: float, seconds: float) -> np.ndarray:
    return (np.sin(np.arange(int(8000 * seconds)) * 2 * np.pi * hz / 8000) * 9000).astype(np.int16)


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.fft.rfftfreq(len(pcm), 1 / 8000)[int(np.argmax(spectrum[1:])) + 1])


async def test_caller_and_callee_hear_each_other_until_one_hangs_up() -> None:
    bridged: list[BridgeResult] = []
    async with Softphone() as callee_phone:
        callee_host, callee_port = callee_phone.address

        async def on_incoming(caller: Call) -> None:
            callee = await gateway.dial(f"sip:oncall@{callee_host}:{callee_port}", ring_timeout=5)
            assert callee.answered
            bridged.append(await bridge_calls(caller, callee))

        gateway = Gateway(GatewayConfig(host="127.0.0.1"), on_incoming=on_incoming)
        async with gateway, Softphone() as caller_phone:
            host, port = gateway.address("udp")

            async def callee_side() -> np.ndarray:
                async with callee_phone.answer(timeout=10) as leg:
                    await leg.wait_for_audio(timeout=5)  # the caller's 440 Hz
                    heard = leg.heard()
                    assert leg.call.media is not None
                    await leg.call.media.play(tone(1000, 1.0))
                    await asyncio.sleep(0.3)
                    return heard  # leaving the block hangs up: the bridge must end

            answering = asyncio.create_task(callee_side())
            async with caller_phone.call(f"sip:hotline@{host}:{port}") as leg:
                await asyncio.sleep(0.5)  # the gateway dials the callee and bridges
                assert leg.call.media is not None
                await leg.call.media.play(tone(440, 1.0))
                callee_heard = await asyncio.wait_for(answering, 15)
                result = await leg.wait_hangup(10)  # the callee left: we are released too
                caller_heard = leg.heard()
    assert result.hangup_by == "remote"
    [summary] = bridged
    assert summary.ended_by == "b"
    assert summary.relayed_ms[0] >= 500 and summary.relayed_ms[1] >= 500, summary
    assert abs(dominant_hz(callee_heard[-4000:]) - 440) < 20
    loud = caller_heard[np.abs(caller_heard) > 2000]
    assert len(loud) > 2000 and abs(dominant_hz(caller_heard[-8000:]) - 1000) < 20


async def test_unanswered_calls_cannot_be_bridged() -> None:
    async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        call = Call(gateway, direction="outbound", transport="udp",
                    peer=None, target="sip:x@127.0.0.1")  # type: ignore[arg-type]  # fmt: skip
        with pytest.raises(ValueError, match="answered"):
            await bridge_calls(call, call)
