"""Bridging two calls: a caller and a callee (two softphones, separate user agents) hear
each other through our gateway, and one hanging up ends the other."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from gateway.bridge import BridgeResult, bridge_calls
from gateway.call import Call, Gateway, GatewayConfig
from gateway.result import ReceivedDigit
from gateway.softphone import Softphone
from tests.integration.pcap import inband_dtmf_pcap
from tests.integration.peers import dtmf_pcap, sipp

pytestmark = pytest.mark.timeout(60)


def tone(hz: float, seconds: float) -> np.ndarray:
    return (np.sin(np.arange(int(8000 * seconds)) * 2 * np.pi * hz / 8000) * 9000).astype(np.int16)


def dominant_hz(pcm: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.fft.rfftfreq(len(pcm), 1 / 8000)[int(np.argmax(spectrum[1:])) + 1])


def bridging_gateway(callee: str, bridged: list[BridgeResult]) -> Gateway:
    """A gateway that puts every incoming call through to `callee`."""

    async def on_incoming(caller: Call) -> None:
        leg = await gateway.dial(callee, ring_timeout=5)
        assert leg.answered
        bridged.append(await bridge_calls(caller, leg))

    gateway = Gateway(GatewayConfig(host="127.0.0.1"), on_incoming=on_incoming)
    return gateway


async def _until_digits(call: Call, want: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while call.digits != want:
        assert asyncio.get_running_loop().time() < deadline, f"got {call.digits!r}, not {want}"
        await asyncio.sleep(0.05)


async def _call_in_until_digits(gateway: Gateway, want: str, linger: float) -> list[ReceivedDigit]:
    """Call through `gateway` until `want` arrives, stay `linger` s, hang up: all received."""
    host, port = gateway.address("udp")
    async with Softphone() as phone, phone.call(f"sip:hotline@{host}:{port}") as leg:
        await _until_digits(leg.call, want)
        await asyncio.sleep(linger)
    assert leg.call.result is not None
    return leg.call.result.received


async def test_caller_and_callee_hear_each_other_until_one_hangs_up() -> None:
    bridged: list[BridgeResult] = []
    async with Softphone() as callee_phone:
        callee_host, callee_port = callee_phone.address
        gateway = bridging_gateway(f"sip:oncall@{callee_host}:{callee_port}", bridged)
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
    assert summary.relayed_ms[0] >= 500, summary
    assert summary.relayed_ms[1] >= 500, summary
    assert abs(dominant_hz(callee_heard[-4000:]) - 440) < 20
    loud = caller_heard[np.abs(caller_heard) > 2000]
    assert len(loud) > 2000
    assert abs(dominant_hz(caller_heard[-8000:]) - 1000) < 20


async def test_unanswered_calls_cannot_be_bridged() -> None:
    async with Gateway(GatewayConfig(host="127.0.0.1")) as gateway:
        call = Call(gateway, direction="outbound", transport="udp",
                    peer=None, target="sip:x@127.0.0.1")  # type: ignore[arg-type]  # fmt: skip
        with pytest.raises(ValueError, match="answered"):
            await bridge_calls(call, call)


@pytest.mark.interop
async def test_a_sipp_callers_rfc2833_key_reaches_the_callee_across_the_bridge(
    tmp_path: Path,
) -> None:
    """SIPp calls in and, once put through, plays its recorded RFC 2833 "5"; the callee
    (another user agent) receives it as an RFC 4733 event from our side of the bridge."""
    bridged: list[BridgeResult] = []
    async with Softphone() as callee_phone:
        callee_host, callee_port = callee_phone.address
        gateway = bridging_gateway(f"sip:oncall@{callee_host}:{callee_port}", bridged)
        async with gateway:
            host, port = gateway.address("udp")

            async def callee_side() -> list[ReceivedDigit]:
                async with callee_phone.answer(timeout=10) as leg:
                    await _until_digits(leg.call, "5")
                    await asyncio.sleep(0.3)  # the event's end packets, then leave (hang up)
                assert leg.call.result is not None
                return leg.call.result.received

            answering = asyncio.create_task(callee_side())
            with sipp("uac_dtmf.xml", tmp_path, remote=f"{host}:{port}", PAUSE_MS="1500",
                      PCAP=str(dtmf_pcap("5"))) as caller:  # fmt: skip
                received = await asyncio.wait_for(answering, 20)
                # the callee left: the bridge hangs the caller up with BYE, SIPp's last step
                assert await asyncio.to_thread(caller.wait, 15) == 0, caller.logs()
    assert [(d.digit, d.method) for d in received] == [("5", "rfc4733")]
    [summary] = bridged
    assert summary.relayed_digits == ("5", "")


@pytest.mark.interop
async def test_a_sipp_callees_sip_info_key_reaches_the_caller_as_an_rfc4733_event(
    tmp_path: Path,
) -> None:
    """The other way and across methods: the callee (SIPp) presses 9 by SIP INFO, the
    caller, who negotiated telephone-event, gets an RFC 4733 "9"."""
    bridged: list[BridgeResult] = []
    info = {"CONTENT_TYPE": "application/dtmf-relay", "BODY": "Signal=9\nDuration=160"}
    with sipp("uas_info_dtmf.xml", tmp_path, PAUSE_MS="800", fields=info) as callee:
        async with bridging_gateway(f"sip:oncall@{callee.address}", bridged) as gateway:
            received = await _call_in_until_digits(gateway, "9", 0.3)  # the end packets
            # the caller left: the bridge sends the callee BYE, SIPp's last step
            assert await asyncio.to_thread(callee.wait, 15) == 0, callee.logs()
    assert [(d.digit, d.method) for d in received] == [("9", "rfc4733")]
    assert bridged[0].relayed_digits == ("", "9")


@pytest.mark.interop
async def test_in_band_keys_cross_as_audio_only_so_none_is_pressed_twice(tmp_path: Path) -> None:
    """A callee (SIPp) that plays its key as a tone: the tone crosses the bridge as audio
    and the caller hears one 3; the bridge does not add an RFC 4733 copy of it."""
    bridged: list[BridgeResult] = []
    pcap = inband_dtmf_pcap(tmp_path / "inband_3.pcap", "3")
    with sipp("uas_inband_dtmf.xml", tmp_path, PAUSE_MS="800", PCAP=str(pcap)) as callee:
        async with bridging_gateway(f"sip:oncall@{callee.address}", bridged) as gateway:
            # lingering long enough for a second copy to arrive, if one came
            received = await _call_in_until_digits(gateway, "3", 0.5)
            assert await asyncio.to_thread(callee.wait, 15) == 0, callee.logs()
    assert [(d.digit, d.method) for d in received] == [("3", "inband")]
    assert bridged[0].relayed_digits == ("", "")
