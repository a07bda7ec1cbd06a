"""RFC 3262 (100rel) and RFC 4028 (session timers) against SIPp, both directions.

SIPp plays the callee (requiring 100rel, retransmitting reliable 18x, answering 422,
choosing either refresher) and the caller (requiring 100rel, refreshing the session).
Session timer tests use a few seconds' interval through the gateway's lab setting
``min_session_expires`` so that a refresh or an expiry happens within the test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.call import Call, Gateway, GatewayConfig
from gateway.result import CallOutcome, CallResult
from gateway.sip.auth import Credentials
from gateway.sip.session_timer import Refresher, SessionExpires
from tests.integration.peers import SippRun, ackline_cli, cli_env, dtmf_pcap, sipp

pytestmark = pytest.mark.interop

# A short session timer for the lab: refreshes and expiries within seconds.
LAB_TIMER: dict[str, Any] = {"session_expires": 4, "min_se": 2, "min_session_expires": 2}


@asynccontextmanager
async def gateway(
    on_incoming: Callable[[Call], Awaitable[None]] | None = None,
    transport: str = "udp",
    **config: Any,
) -> AsyncIterator[Gateway]:
    udp_port, tcp_port = (0, None) if transport == "udp" else (None, 0)
    settings = GatewayConfig(host="127.0.0.1", udp_port=udp_port, tcp_port=tcp_port, **config)
    async with Gateway(settings, on_incoming=on_incoming) as gw:
        yield gw


async def sipp_exit(peer: SippRun, timeout: float = 15) -> int:
    return await asyncio.to_thread(peer.wait, timeout)


def run_call(tmp: Path, target: str, *args: str, timeout: float = 30) -> dict[str, Any]:
    proc = subprocess.run(
        [*ackline_cli(), "call", target, "--json", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(tmp),
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# -- outbound: the callee requires 100rel ------------------------------------------------


def test_callee_requiring_100rel_gets_pracks_early_media_and_digit(tmp_path: Path) -> None:
    """Reliable 180, reliable 183 with the SDP answer, each PRACKed once with its RAck;
    the 200 without SDP still answers (the 183 had the answer) and press-1 works."""
    with sipp(
        "uas_100rel_answer_dtmf.xml",
        tmp_path,
        PCAP=str(dtmf_pcap("1")),
        RING_MS="300",
        PAUSE_MS="500",
    ) as peer:
        result = run_call(
            tmp_path, f"sip:+15550140@{peer.address}", "--gather", "1", "--timeout", "10"
        )
        assert peer.wait(timeout=15) == 0, peer.logs()  # both PRACKs, ACK, BYE as expected
    assert result["outcome"] == "answered", result
    assert result["codec"] == "PCMU"
    assert result["digits"] == "1"
    assert result["hangup_by"] == "local"
    assert result["duration_ms"] < 5000  # the digit ended the call, not the timeout
    lines = peer.log_lines()
    assert any(line.startswith("SUPPORTED") for line in lines), lines  # INVITE offered 100rel
    assert len([line for line in lines if line.startswith("RACK")]) == 2, lines


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``predicate`` (cheap state of the call), bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_reliable_18x_retransmissions_and_out_of_order_get_one_prack(
    tmp_path: Path, transport: str
) -> None:
    with sipp("uas_100rel_retransmit.xml", tmp_path, transport=transport) as peer:
        async with gateway(transport=transport) as gw:
            call = await gw.dial(
                f"sip:+15550141@{peer.address}", transport=transport, ring_timeout=10
            )
            assert call.answered, call.result
            await call.hangup()
        assert await sipp_exit(peer) == 0, peer.logs()  # a second PRACK would be unexpected
        racks = [line for line in peer.log_lines() if line.startswith("RACK")]
    assert len(racks) == 2, racks  # RSeq 7 once, RSeq 8 once; RSeq 9 and the repeat: none
    assert call.result is not None
    assert call.result.outcome is CallOutcome.ANSWERED


def _md5(*parts: str) -> str:
    return hashlib.md5(":".join(parts).encode()).hexdigest()


async def test_prack_carries_the_credentials_the_proxy_asked_the_invite_for(
    tmp_path: Path,
) -> None:
    """The proxy challenged the INVITE (407): the PRACK answers the same challenge, with a
    digest computed for PRACK and its own Request-URI (checked here, RFC 2069 form)."""
    with sipp("uas_auth_100rel.xml", tmp_path) as peer:
        async with gateway() as gw:
            call = await gw.dial(
                f"sip:+15550151@{peer.address}",
                credentials=Credentials("lab-user", "lab-pass"),
                ring_timeout=10,
            )
            assert call.answered, call.result
            await call.hangup()
        assert await sipp_exit(peer) == 0, peer.logs()  # no PRACK without credentials
        (line,) = [x for x in peer.log_lines() if x.startswith("PRACK AUTH")]
    params = dict(re.findall(r'(\w+)="?([^",]+)"?', line.split("Digest", 1)[1]))
    ha1 = _md5("lab-user", "ackline.test", "lab-pass")
    assert params["username"] == "lab-user"
    assert params["nonce"] == "a1b2c3d4e5f60718"
    assert params["response"] == _md5(ha1, params["nonce"], _md5("PRACK", params["uri"]))
    assert params["uri"].startswith("sip:uas@127.0.0.1")  # the callee's Contact
    assert call.result is not None
    assert call.result.authenticated


async def test_refused_prack_ends_the_attempt_with_the_reason(tmp_path: Path) -> None:
    """A PRACK answered 481 would leave the INVITE ringing for nobody: the attempt is
    cancelled at once and the result names the PRACK's failure."""
    with sipp("uas_100rel_prack_refused.xml", tmp_path, CODE="481") as peer:
        async with gateway() as gw:
            started = time.monotonic()
            call = await gw.dial(f"sip:+15550148@{peer.address}", ring_timeout=20)
            took = time.monotonic() - started
        assert await sipp_exit(peer) == 0, peer.logs()  # CANCEL, then ACK for the 487
    assert not call.answered
    assert call.result is not None
    assert call.result.outcome is CallOutcome.FAILED
    assert "PRACK failed: 481" in call.result.reason
    assert took < 3  # not the 20 s ring timeout


# -- outbound: session timers ---------------------------------------------------------------


async def test_422_is_retried_once_with_the_callees_min_se(tmp_path: Path) -> None:
    with sipp("uas_422_then_answer.xml", tmp_path, MIN_SE="2400") as peer:
        async with gateway() as gw:
            call = await gw.dial(f"sip:+15550142@{peer.address}", ring_timeout=10)
            assert call.answered, call.result
            assert call.session_expires == SessionExpires(2400, Refresher.UAC)
            await call.hangup()
        assert await sipp_exit(peer) == 0, peer.logs()
        lines = peer.log_lines()
    assert ["FIRST", "SE", "1800"] in [line.split() for line in lines], lines
    assert ["RETRY", "SE", "2400", "CSEQ", "2", "INVITE"] in [line.split() for line in lines]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_refresher_uac_we_refresh_within_the_interval(tmp_path: Path, transport: str) -> None:
    """The callee makes us the refresher of a 4 s session (lab setting): two refresh
    re-INVITEs must reach it, each within the interval (SIPp's recv timeout); an answer
    that moves the media is applied."""
    with sipp(
        "uas_timer_refresher_uac.xml",
        tmp_path,
        transport=transport,
        SE="4",
        SE_MS="4000",
        MOVED_PORT="23456",
    ) as peer:
        async with gateway(transport=transport, **LAB_TIMER) as gw:
            call = await gw.dial(
                f"sip:+15550143@{peer.address}", transport=transport, ring_timeout=10
            )
            assert call.answered, call.result
            started = time.monotonic()
            media = call.media
            assert media is not None
            assert media.media is not None
            original = media.media.remote_port
            await wait_for(lambda: call.session_refreshes >= 1, 8, "the first refresh")
            assert media.media.remote_port == 23456  # the refresh's answer moved the media
            await wait_for(lambda: call.session_refreshes >= 2, 8, "two refreshes")
            elapsed = time.monotonic() - started
            assert not call.ended.is_set()
            assert media.media.remote_port == original  # and the next one moved it back
            result = await call.hangup()
        assert await sipp_exit(peer) == 0, peer.logs()
    assert 3.0 <= elapsed < 6.0  # refreshes at half the interval: about 2 s and 4 s
    assert result.outcome is CallOutcome.ANSWERED
    assert result.reason == "local hangup"
    assert not result.session_expired


async def test_a_callee_allowing_update_is_refreshed_with_update_then_reinvite_on_501(
    tmp_path: Path,
) -> None:
    """RFC 4028 9 prefers UPDATE: the callee's 2xx lists it in Allow, so we refresh with
    an UPDATE carrying no offer. When it refuses the next UPDATE (501: its Allow was
    wrong), the same refresh goes out as a re-INVITE, and the call goes on."""
    with sipp("uas_timer_refresher_uac_update.xml", tmp_path, SE="4", SE_MS="4000") as peer:
        async with gateway(**LAB_TIMER) as gw:
            call = await gw.dial(f"sip:+15550145@{peer.address}", ring_timeout=10)
            assert call.answered, call.result
            await wait_for(lambda: call.session_refreshes >= 1, 8, "the UPDATE refresh")
            await wait_for(lambda: call.session_refreshes >= 2, 8, "the re-INVITE refresh")
            assert not call.ended.is_set()
            result = await call.hangup()
        assert await sipp_exit(peer) == 0, peer.logs()
        lines = [line.split() for line in peer.log_lines()]
    # no offer in the UPDATE; the re-INVITE carries our SDP
    assert lines[0][:6] == ["UPDATE", "1", "refresher=uac", "LENGTH", "0", "CSEQ"], lines
    assert lines[0][7] == "UPDATE", lines
    assert lines[1:] == [["UPDATE", "2", "refused"], ["REINVITE", "refresher=uac", "m=audio"]]
    assert result.outcome is CallOutcome.ANSWERED
    assert not result.session_expired


async def test_refresh_glare_gets_491_and_our_refresh_is_retried(tmp_path: Path) -> None:
    """Both sides re-INVITE at once: theirs gets 491 while ours is pending; ours, answered
    491, goes out again half way to the expiry and keeps the call up."""
    with sipp("uas_timer_glare.xml", tmp_path, SE="4", SE_MS="4000") as peer:
        async with gateway(**LAB_TIMER) as gw:
            call = await gw.dial(f"sip:+15550150@{peer.address}", ring_timeout=10)
            assert call.answered, call.result
            await wait_for(lambda: call.session_refreshes >= 1, 8, "the retried refresh")
            assert not call.ended.is_set()
            result = await call.hangup()
        assert await sipp_exit(peer) == 0, peer.logs()
    assert result.reason == "local hangup"
    assert not result.session_expired


@pytest.mark.parametrize("code", [481, 408])
async def test_refused_refresh_ends_the_call_at_once(tmp_path: Path, code: int) -> None:
    with sipp(
        "uas_timer_refresh_refused.xml", tmp_path, SE="4", SE_MS="4000", CODE=str(code)
    ) as peer:
        async with gateway(**LAB_TIMER) as gw:
            call = await gw.dial(f"sip:+15550152@{peer.address}", ring_timeout=10)
            assert call.answered, call.result
            result = await call.wait_ended(timeout=8)
        assert await sipp_exit(peer) == 0, peer.logs()  # BYE within 1 s of the refusal
    assert result.session_expired
    assert result.hangup_by == "local"
    assert f"session timer (4 s): session refresh failed ({code})" in result.reason
    assert 1500 <= result.duration_ms < 3500  # refreshed at 2 s, refused, BYE


async def test_silent_refresher_uas_gets_bye_at_expiry(tmp_path: Path) -> None:
    """refresher=uas and no refresh: BYE at 6 - min(32, 6/3) = 4 s, with the reason."""
    with sipp("uas_timer_refresher_uas_silent.xml", tmp_path, SE="6", SE_MS="6000") as peer:
        async with gateway(**LAB_TIMER) as gw:
            call = await gw.dial(f"sip:+15550144@{peer.address}", ring_timeout=10)
            assert call.answered, call.result
            result = await call.wait_ended(timeout=10)
        assert await sipp_exit(peer) == 0, peer.logs()
    assert result.outcome is CallOutcome.ANSWERED
    assert result.hangup_by == "local"
    assert "session timer (6 s): no session refresh from the peer" in result.reason
    assert result.session_expired
    assert 3500 <= result.duration_ms < 5500


# -- inbound ------------------------------------------------------------------------------


async def test_inbound_caller_requiring_100rel_is_answered_after_its_prack(
    tmp_path: Path,
) -> None:
    digits: list[str] = []

    async def on_incoming(call: Call) -> None:
        digits.append(await call.collect(1, timeout=5.0))

    async with gateway(on_incoming) as gw:
        host, port = gw.address()
        with sipp(
            "uac_100rel_dtmf.xml",
            tmp_path,
            remote=f"{host}:{port}",
            PAUSE_MS="300",
            PCAP=str(dtmf_pcap("1")),
        ) as peer:
            assert await sipp_exit(peer) == 0, peer.logs()
            lines = [line.split() for line in peer.log_lines()]
    assert digits == ["1"]
    assert ["PRACK", "OK", "PRACK"] in lines, lines  # the PRACK's 200 came before the answer
    assert ["ANSWERED", "INVITE"] in lines, lines


async def test_inbound_session_refreshes_accepted_then_missing_refresh_ends_call(
    tmp_path: Path,
) -> None:
    """The caller refreshes its 3 s session by UPDATE and by re-INVITE, then stops: the
    gateway answers both with Session-Expires and sends BYE 3 - min(32, 3/3) = 2 s after
    the last one, ending the flow with the reason."""
    results: list[CallResult] = []
    refreshes: list[int] = []

    async def on_incoming(call: Call) -> None:
        result = await call.wait_ended(timeout=15)
        refreshes.append(call.session_refreshes)
        results.append(result)

    async with gateway(on_incoming, **LAB_TIMER) as gw:
        host, port = gw.address()
        with sipp(
            "uac_session_refresh.xml",
            tmp_path,
            remote=f"{host}:{port}",
            SE="3",
            HALF_MS="1000",
            SE_MS="3000",
        ) as peer:
            assert await sipp_exit(peer) == 0, peer.logs()
        await wait_for(lambda: bool(results), 5, "the call's result")
    (result,) = results
    assert refreshes == [2]
    assert result.outcome is CallOutcome.ANSWERED
    assert result.hangup_by == "local"
    assert "session timer (3 s): no session refresh from the peer" in result.reason
    assert result.session_expired
    assert 3500 <= result.duration_ms < 5500  # 1 s + 1 s of refreshes, then 2 s


async def test_session_expiry_ends_the_ack_flow_and_the_escalation_attempt(
    tmp_path: Path,
) -> None:
    """An alert call whose callee stops its session (refresher=uas, never refreshes)
    while the ack menu waits 30 s for a key: the session timer's BYE ends the flow at
    once, and the attempt's result says so (``session_expired``), not a person."""
    from api.voice_channel import AckMenu, SipUriDialer, VoiceChannel
    from escalation.channels.base import DeliveryStatus
    from prompts import EspeakEngine, PromptCache
    from tests.fakes import make_notification

    prompts = PromptCache(tmp_path / "prompts", EspeakEngine())
    with sipp("uas_timer_refresher_uas_silent.xml", tmp_path, SE="6", SE_MS="6000") as peer:
        settings = GatewayConfig(host="127.0.0.1", udp_port=0, **LAB_TIMER)
        async with Gateway(settings, prompts=prompts) as gw:
            dialer = SipUriDialer(gw, f"sip:{{number}}@{peer.address}")
            channel = VoiceChannel(
                dialer, ring_timeout=5, max_call=60, menu=AckMenu(prompts=3, digit_timeout=30)
            )
            notification = make_notification("voice", phone="+15550147")
            started = time.monotonic()
            result = await asyncio.wait_for(channel.send(notification), 30)
            took = time.monotonic() - started
        assert await sipp_exit(peer) == 0, peer.logs()  # the BYE came within the interval
    assert (result.status, result.reason) == (DeliveryStatus.NOT_ACKNOWLEDGED, "session_expired")
    assert took < 10, f"the attempt lasted {took:.1f} s"


async def test_inbound_reliable_180_never_pracked_is_rejected_after_64_t1(
    tmp_path: Path,
) -> None:
    """With T1 = 50 ms the reliable 180 is retransmitted for 3.2 s, then 500; the
    handler never runs (the call was never answered)."""
    from gateway.sip.transaction import TimerSettings

    handled: list[Call] = []

    async def on_incoming(call: Call) -> None:
        handled.append(call)

    ended: list[CallResult] = []
    async with gateway(on_incoming, timers=TimerSettings(t1=0.05)) as gw:
        gw.on_call_ended = ended.append
        host, port = gw.address()
        started = time.monotonic()
        with sipp(
            "uac_100rel_no_prack.xml", tmp_path, remote=f"{host}:{port}", WAIT_MS="6000"
        ) as peer:
            assert await sipp_exit(peer) == 0, peer.logs()
        took = time.monotonic() - started
        await wait_for(lambda: bool(ended), 5, "the call's result")
    assert handled == []
    (result,) = ended
    assert (result.outcome, result.sip_code) == (CallOutcome.FAILED, 500)
    assert "no PRACK" in result.reason
    assert 3.0 <= took < 6.0


async def test_inbound_caller_asking_us_to_refresh_gets_a_refresh(tmp_path: Path) -> None:
    """refresher=uas from the caller: the gateway itself re-INVITEs at half of the 4 s."""
    results: list[CallResult] = []
    refreshes: list[int] = []

    async def on_incoming(call: Call) -> None:
        result = await call.wait_ended(timeout=15)
        refreshes.append(call.session_refreshes)
        results.append(result)

    async with gateway(on_incoming, **LAB_TIMER) as gw:
        host, port = gw.address()
        with sipp(
            "uac_expect_refresh.xml", tmp_path, remote=f"{host}:{port}", SE="4", SE_MS="4000"
        ) as peer:
            assert await sipp_exit(peer) == 0, peer.logs()
        await wait_for(lambda: bool(results), 5, "the call's result")
    (result,) = results
    assert refreshes == [1]
    assert result.hangup_by == "remote"
    assert not result.session_expired
    assert 1500 <= result.duration_ms < 3500
