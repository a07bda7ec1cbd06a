"""SIP signalling corner cases against SIPp as an independent far end, over loopback.

Each SIPp scenario passes (exit code 0) only when our side sent exactly what it expects:
the right answers to re-INVITEs, ACKs, an authenticated retry, retransmissions (or none).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.call import Call, Gateway, GatewayConfig
from gateway.result import CallOutcome
from gateway.sip.auth import Credentials
from gateway.sip.transaction import TimerSettings
from tests.integration.peers import (
    SippRun,
    ackline_cli,
    cli_env,
    dtmf_pcap,
    free_port,
    sipp,
)

pytestmark = pytest.mark.interop


def run_call(tmp: Path, target: str, *args: str, timeout: float = 20) -> dict[str, Any]:
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


@asynccontextmanager
async def gateway_for(transport: str, **config: Any) -> AsyncIterator[Gateway]:
    udp_port, tcp_port = (0, None) if transport == "udp" else (None, 0)
    settings = GatewayConfig(host="127.0.0.1", udp_port=udp_port, tcp_port=tcp_port, **config)
    async with Gateway(settings) as gateway:
        yield gateway


async def sipp_exit(peer: SippRun, timeout: float = 10) -> int:
    return await asyncio.to_thread(peer.wait, timeout)


async def wait_for_state(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def sending(call: Call) -> bool:
    return call.media is not None and call.media.sending


def direction(call: Call) -> str | None:
    media = call.media.media if call.media is not None else None
    return media.direction if media is not None else None


def origin_fields(line: str) -> tuple[str, str, int, str]:
    """(username, sess-id, sess-version, address) of a logged o= line."""
    user, sess_id, version, _net, _addr_type, address = line.split("o=", 1)[1].split()[:6]
    return user, sess_id, int(version), address


# -- re-INVITE: hold and resume ----------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_reinvite_hold_and_resume(tmp_path: Path, transport: str) -> None:
    with sipp("uas_hold_resume.xml", tmp_path, transport=transport, PAUSE_MS="600") as peer:
        async with gateway_for(transport) as gateway:
            call = await gateway.dial(
                f"sip:+15550300@{peer.address}", transport=transport, ring_timeout=5
            )
            assert call.answered, call.result
            await wait_for_state(lambda: direction(call) == "recvonly", 5, "hold")
            assert not sending(call)  # on hold: we must not send RTP
            await wait_for_state(lambda: direction(call) == "sendrecv", 5, "resume")
            assert sending(call)
            result = await call.wait_ended(timeout=5)  # SIPp's BYE ends it
        assert await sipp_exit(peer) == 0, peer.logs()
        lines = peer.log_lines()
    assert result.outcome == CallOutcome.ANSWERED
    assert result.sip_code == 200
    assert result.hangup_by == "remote"
    assert result.codec == "PCMU"
    assert 1500 <= result.duration_ms < 6000
    assert any(line.startswith("HOLD answer recvonly") for line in lines), lines
    assert any(line.startswith("RESUME answer sendrecv") for line in lines), lines


async def test_reinvite_answers_keep_our_sdp_origin(tmp_path: Path) -> None:
    """RFC 3264 §8: later SDP from one party keeps its o= line, only the version goes up."""
    with sipp("uas_hold_resume.xml", tmp_path, PAUSE_MS="200") as peer:
        async with gateway_for("udp") as gateway:
            call = await gateway.dial(f"sip:+15550301@{peer.address}", ring_timeout=5)
            assert call.answered, call.result
            await call.wait_ended(timeout=5)
        assert await sipp_exit(peer) == 0, peer.logs()
        origins = {
            line.split()[1]: origin_fields(line)
            for line in peer.log_lines()
            if line.startswith("ORIGIN ")
        }
    offer, hold, resume = origins["offer"], origins["hold"], origins["resume"]
    assert hold[2] == offer[2] + 1, origins
    assert resume[2] == hold[2] + 1, origins
    assert (hold[0], hold[1], hold[3]) == (offer[0], offer[1], offer[3]), origins
    assert (resume[0], resume[1], resume[3]) == (offer[0], offer[1], offer[3]), origins


# -- early media ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario",
    [
        "uas_183_early_media.xml",  # 100, 183 + SDP, 200 + SDP
        "uas_180_183_early_media.xml",  # 100, 180 without SDP, 183 + SDP, 200 + SDP
        "uas_answer_dtmf.xml",  # 100, 180 without SDP, 200 + SDP
    ],
)
def test_provisional_responses_then_answer_and_digit(tmp_path: Path, scenario: str) -> None:
    with sipp(
        scenario,
        tmp_path,
        PCAP=str(dtmf_pcap("1")),
        RING_MS="300",
        PAUSE_MS="500",
        CODECS="0",
    ) as peer:
        result = run_call(
            tmp_path, f"sip:+15550310@{peer.address}", "--gather", "1", "--timeout", "10"
        )
        assert peer.wait(timeout=15) == 0, peer.logs()  # ACK for the 200, BYE after the digit
    assert result["outcome"] == "answered"
    assert result["sip_code"] == 200
    assert result["codec"] == "PCMU"
    assert result["digits"] == "1"
    assert result["dtmf_method"] == "rfc4733"
    assert result["hangup_by"] == "local"
    assert 0 <= result["pdd_ms"] < 250  # the first 18x comes at once
    assert result["answer_delay_ms"] >= 280  # the 200 only after the ring pause(s)
    assert result["duration_ms"] < 5000  # the digit ended the call, not the 10 s timeout


# -- 401 challenge -----------------------------------------------------------------------


def _ha(*parts: str) -> str:
    return hashlib.md5(":".join(parts).encode()).hexdigest()


def _digest_params(header: str) -> dict[str, str]:
    body = header.split(" ", 1)[1]
    out: dict[str, str] = {}
    for item in body.split(","):
        key, _, value = item.strip().partition("=")
        out[key] = value.strip('"')
    return out


NONCE = "a1b2c3d4e5f60718"


@pytest.mark.parametrize("qop", ["auth", None])
def test_401_www_authenticate_challenge(tmp_path: Path, qop: str | None) -> None:
    with sipp("uas_auth_401.xml", tmp_path, QOP_PARAM=f', qop="{qop}"' if qop else "") as peer:
        target = f"sip:+15550320@{peer.address}"
        result = run_call(tmp_path, target, "--auth-user", "alice", "--auth-password", "s3cret")
        assert peer.wait(timeout=15) == 0, peer.logs()  # ACK for the 401, authorized INVITE
        lines = peer.log_lines()
    assert result["outcome"] == "answered"
    assert result["sip_code"] == 200
    assert result["authenticated"] is True
    auth = [line.split("AUTH ", 1)[1] for line in lines if line.startswith("AUTH ")]
    assert len(auth) == 1, lines
    params = _digest_params(auth[0])
    assert params["username"] == "alice"
    assert params["realm"] == "ackline.test"
    assert params["nonce"] == NONCE
    assert params["uri"] == target
    ha1 = _ha("alice", "ackline.test", "s3cret")
    ha2 = _ha("INVITE", params["uri"])
    if qop:
        assert params["qop"] == "auth"
        assert params["nc"] == "00000001"
        expected = _ha(ha1, NONCE, params["nc"], params["cnonce"], "auth", ha2)
    else:
        assert "qop" not in params
        assert "nc" not in params
        expected = _ha(ha1, NONCE, ha2)
    assert params["response"] == expected
    first = dict(re.findall(r"(\w+)=(\S+)", next(x for x in lines if x.startswith("FIRST "))))
    second = dict(re.findall(r"(\w+)=(\S+)", next(x for x in lines if x.startswith("SECOND "))))
    assert int(second["cseq"]) == int(first["cseq"]) + 1  # RFC 3261 §22.2: new CSeq
    assert second["branch"] != first["branch"]  # and a new transaction


# -- OPTIONS probe ------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_options_probe_answered(tmp_path: Path, transport: str) -> None:
    with sipp("uas_options.xml", tmp_path, transport=transport) as peer:
        async with gateway_for(transport) as gateway:
            response = await asyncio.wait_for(
                gateway.options(f"sip:probe@{peer.address}", transport=transport), 5
            )
        assert await sipp_exit(peer) == 0, peer.logs()
        lines = peer.log_lines()
    assert response is not None
    assert response.code == 200
    assert response.cseq.method == "OPTIONS"
    assert "OPTIONS" in (response.headers.get("Allow") or "")
    assert any(line.startswith("OPTIONS cseq=1 OPTIONS max-forwards=70") for line in lines), lines


async def test_options_probe_nothing_listening() -> None:
    timers = TimerSettings(t1=0.05)
    port = free_port()  # nothing listens there
    async with gateway_for("udp", timers=timers) as gateway:
        started = time.monotonic()
        response = await asyncio.wait_for(gateway.options(f"sip:probe@127.0.0.1:{port}"), 10)
        elapsed = time.monotonic() - started
    assert response is None
    assert elapsed < timers.timer_f + 1.0  # timer F (3.2 s), or sooner on ICMP unreachable


# -- INVITE retransmissions (timer A) --------------------------------------------------------


def received_requests(peer: SippRun, method: str) -> list[float]:
    """Arrival times of each copy of ``method`` in SIPp's message trace."""
    times: list[float] = []
    for path in peer.workdir.glob("*_messages.log"):
        blocks = re.split(r"^-{20,} (\S+ \S+)$", path.read_text(errors="replace"), flags=re.M)
        for stamp, block in zip(blocks[1::2], blocks[2::2], strict=True):
            lines = [line for line in block.strip().splitlines() if line.strip()]
            if (
                len(lines) >= 2
                and "message received" in lines[0]
                and lines[1].startswith(f"{method} ")
            ):
                h, m, s = stamp.split()[1].split(":")
                times.append(int(h) * 3600 + int(m) * 60 + float(s))
    return times


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_invite_retransmitted_only_over_udp(tmp_path: Path, transport: str) -> None:
    timers = TimerSettings(t1=0.2)  # timer A fires 0.2 s, then 0.6 s after the INVITE
    with sipp("uas_invite_retrans.xml", tmp_path, transport=transport, SILENCE_MS="1000") as peer:
        async with gateway_for(transport, timers=timers) as gateway:
            call = await gateway.dial(
                f"sip:+15550330@{peer.address}", transport=transport, ring_timeout=5
            )
            assert call.answered, call.result
            result = await asyncio.wait_for(call.hangup(), 5)
        assert await sipp_exit(peer) == 0, peer.logs()
        invites = received_requests(peer, "INVITE")
    assert result.outcome == CallOutcome.ANSWERED
    assert result.answer_delay_ms is not None
    assert result.answer_delay_ms >= 950
    if transport == "tcp":
        assert len(invites) == 1, invites  # reliable transport: timer A is not used
        return
    assert len(invites) == 3, invites  # the original, then at T1 and 3*T1
    gaps = [b - a for a, b in itertools.pairwise(invites)]
    assert gaps[0] == pytest.approx(timers.t1, abs=0.1), gaps
    assert gaps[1] == pytest.approx(2 * timers.t1, abs=0.1), gaps  # the interval doubles


async def test_401_rechallenge_with_fresh_nonce_gives_up(tmp_path: Path) -> None:
    """A second challenge without stale=true means wrong credentials (RFC 7616 §3.3, RFC 2617
    §3.2.1): the call must fail with 401, not loop with a third INVITE."""
    timers = TimerSettings(t1=0.05)  # a looping INVITE that SIPp ignores ends by timer B in 3.2 s
    with sipp("uas_auth_401_rechallenge.xml", tmp_path, WAIT_MS="1500") as peer:
        async with gateway_for("udp", timers=timers) as gateway:
            call = await asyncio.wait_for(
                gateway.dial(
                    f"sip:+15550321@{peer.address}",
                    credentials=Credentials("alice", "wrong"),
                    ring_timeout=5,
                ),
                10,
            )
            result = await call.wait_ended(timeout=5)
        assert await sipp_exit(peer) == 0, peer.logs()  # both 401s ACKed, no third INVITE
    assert not call.answered
    assert result.outcome == CallOutcome.REJECTED
    assert result.sip_code == 401
    assert result.authenticated is True
