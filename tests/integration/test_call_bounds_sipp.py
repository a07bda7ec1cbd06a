"""Every call ends within a bound known in advance, and so does the gateway's shutdown,
whatever the peer (SIPp) does: ring and then never answer anything, not even our CANCEL;
answer and never hang up; ignore our BYE.

Timers are shortened (T1 = 50 ms, so 64*T1 = 3.2 s) so the RFC waits fit in a test; the
bounds are the gateway's own (`call_time_bound`), not numbers made up here.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.call import Call, Gateway, GatewayConfig, call_time_bound
from gateway.result import CallOutcome
from gateway.sip.transaction import TimerSettings
from tests.integration.peers import SippRun, sipp

pytestmark = pytest.mark.interop

TIMERS = TimerSettings(t1=0.05, t2=0.4, t4=0.5)


@asynccontextmanager
async def gateway(**config: Any) -> AsyncIterator[Gateway]:
    settings = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TIMERS, **config)
    gw = Gateway(settings)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(timeout=1.0)


def received(peer: SippRun, method: str) -> set[str]:
    """Call-IDs of the ``method`` requests SIPp received (its message trace)."""
    call_ids = set()
    for path in peer.workdir.glob("*_messages.log"):
        for block in path.read_text(errors="replace").split("message received")[1:]:
            body = block.split("\n\n", 1)[-1].lstrip()
            found = re.search(r"^Call-ID:\s*(\S+)", body, re.MULTILINE | re.IGNORECASE)
            if body.startswith(f"{method} ") and found:
                call_ids.add(found.group(1))
    return call_ids


async def eventually(predicate: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_call_time_bound_adds_ring_cancel_duration_and_bye() -> None:
    timers = TimerSettings(t1=0.5)
    # 5 s to resolve, the ring time, 2 x 32 s (a provisional as late as timer B, then 64*T1
    # for the CANCEL's answer), the call itself, 32 s of timer F for the BYE.
    assert call_time_bound(30.0, 3600.0, timers) == 5 + 30 + 64 + 3600 + 32
    assert call_time_bound(0, 0, TimerSettings(t1=0.05)) == pytest.approx(5 + 6.4 + 3.2)
    with pytest.raises(ValueError, match="must not be negative"):
        call_time_bound(-1, 10)


async def test_peer_silent_after_ringing_ends_within_the_bound(tmp_path: Path) -> None:
    """RFC 3261 9.1: the peer rang, then died; our CANCEL is never answered. The call
    ends 64*T1 after the CANCEL as no-answer instead of waiting forever, and the INVITE
    transaction is gone too."""
    with sipp("uas_ring_silent.xml", tmp_path, HOLD_MS="30000") as peer:
        async with gateway(max_call_duration=10) as gw:
            bound = gw.call_time_bound(ring_timeout=1.0)
            started = time.monotonic()
            call = await asyncio.wait_for(
                gw.dial(f"sip:+15550120@{peer.address}", ring_timeout=1.0), bound
            )
            took = time.monotonic() - started
            assert not call.answered
            assert call.ended.is_set()
            result = call.result
            assert result is not None
            assert result.outcome is CallOutcome.NO_ANSWER, result
            assert "no final response to CANCEL" in result.reason
            assert took >= 1.0 + TIMERS.timer_b * 0.9  # the peer had its 64*T1
            await eventually(lambda: gw.endpoint._clients == {}, "the transactions to end")
            assert gw.calls == {}
        assert len(received(peer, "CANCEL")) == 1


async def test_hangup_while_the_silent_peer_rings_is_bounded(tmp_path: Path) -> None:
    with sipp("uas_ring_silent.xml", tmp_path, HOLD_MS="30000") as peer:
        async with gateway() as gw:
            calls: list[Call] = []
            dialing = asyncio.create_task(
                gw.dial(f"sip:+15550121@{peer.address}", ring_timeout=60, on_call=calls.append)
            )
            await eventually(lambda: bool(calls) and calls[0].responded.is_set(), "ringing")
            result = await asyncio.wait_for(calls[0].hangup(), 2 * TIMERS.timer_b + 1)
            assert result.outcome is CallOutcome.CANCELLED, result
            assert (await asyncio.wait_for(dialing, 1.0)) is calls[0]


async def test_answered_call_gets_bye_at_its_max_duration(tmp_path: Path) -> None:
    with sipp("uas_answer_wait_bye.xml", tmp_path) as peer:
        async with gateway(max_call_duration=600) as gw:
            call = await gw.dial(f"sip:+15550122@{peer.address}", ring_timeout=5, max_duration=1.0)
            assert call.answered
            result = await call.wait_ended(gw.call_time_bound(5, max_duration=1.0))
        assert await asyncio.to_thread(peer.wait, 10) == 0, peer.logs()  # it got our BYE
    assert (result.outcome, result.hangup_by) == (CallOutcome.ANSWERED, "local")
    assert result.reason == "max duration (1 s) reached"
    assert 900 <= result.duration_ms < 5000


async def test_stop_hangs_up_every_call_at_once_and_returns_within_the_drain_bound(
    tmp_path: Path,
) -> None:
    """Six answered calls whose peer never answers BYE, two more that do, two ringing
    calls whose peer ignores CANCEL, one inbound call still ringing: stop(timeout=1)
    sends each its BYE, CANCEL or 480 at once and returns without waiting on any of them
    (one after the other, 2 s each, it used to take over 16 s)."""
    drain = 1.0
    dirs = [tmp_path / name for name in ("deaf", "polite", "ringing", "caller")]
    for path in dirs:
        path.mkdir()
    with (
        sipp("uas_answer_ignore_bye.xml", dirs[0], calls=6, HOLD_MS="30000") as deaf,
        sipp("uas_answer_wait_bye.xml", dirs[1], calls=2) as polite,
        sipp("uas_ring_silent.xml", dirs[2], calls=2, HOLD_MS="30000") as ringing,
    ):
        gw = Gateway(
            GatewayConfig(host="127.0.0.1", udp_port=0, timers=TIMERS, answer_ring_ms=60_000),
            on_incoming=lambda call: asyncio.sleep(0),
        )
        await gw.start()
        try:
            answered = await asyncio.gather(
                *(gw.dial(f"sip:+155501{30 + n}@{deaf.address}", ring_timeout=5) for n in range(6)),
                *(
                    gw.dial(f"sip:+155501{40 + n}@{polite.address}", ring_timeout=5)
                    for n in range(2)
                ),
            )
            assert all(call.answered for call in answered)
            rings = [
                asyncio.create_task(
                    gw.dial(f"sip:+155501{50 + n}@{ringing.address}", ring_timeout=60)
                )
                for n in range(2)
            ]
            host, port = gw.address()
            with sipp("uac_refused.xml", dirs[3], remote=f"{host}:{port}", CODE="480") as caller:
                await eventually(lambda: len(gw.calls) == 11, "every call to be up or ringing")
                started = time.monotonic()
                await gw.stop(timeout=drain)
                took = time.monotonic() - started
                assert await asyncio.to_thread(caller.wait, 10) == 0, caller.logs()
            for task in rings:
                assert not (await asyncio.wait_for(task, 1.0)).answered
        finally:
            await gw.stop(timeout=0)
        assert took < drain + 7, f"stop took {took:.1f} s"
        assert await asyncio.to_thread(polite.wait, 10) == 0, polite.logs()
        assert len(received(deaf, "BYE")) == 6
        assert len(received(ringing, "CANCEL")) == 2
    assert gw.calls == {}
    assert all(call.ended.is_set() for call in answered)


async def test_an_alert_call_nobody_ends_is_hung_up_at_the_channels_max_call(
    tmp_path: Path,
) -> None:
    """The far end answers, never presses a key and never hangs up, and the ack menu
    would wait half a minute for a key three times: the voice channel ends the call at
    its `max_call` (BYE), and the whole send stays inside the channel's own deadline."""
    from api.voice_channel import AckMenu, SipUriDialer, VoiceChannel
    from escalation.channels.base import DeliveryStatus
    from prompts import EspeakEngine, PromptCache
    from tests.fakes import make_notification

    prompts = PromptCache(tmp_path / "prompts", EspeakEngine())
    with sipp("uas_answer_ignore_bye.xml", tmp_path, HOLD_MS="20000") as peer:
        settings = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TIMERS)
        async with Gateway(settings, prompts=prompts) as gw:
            dialer = SipUriDialer(gw, f"sip:{{number}}@{peer.address}")
            channel = VoiceChannel(
                dialer, ring_timeout=5, max_call=1.5, menu=AckMenu(prompts=3, digit_timeout=30)
            )
            notification = make_notification("voice", phone="+14155550101")
            deadline = channel.deadline(notification)
            assert deadline == dialer.time_bound(5, 1.5) + 5  # finite, from the gateway
            started = time.monotonic()
            result = await asyncio.wait_for(channel.send(notification), deadline)
            took = time.monotonic() - started
            await eventually(lambda: bool(received(peer, "BYE")), "our BYE")
    assert result.status is DeliveryStatus.NOT_ACKNOWLEDGED, result
    assert took < 15, f"the call lasted {took:.1f} s"
