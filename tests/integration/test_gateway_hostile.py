"""The gateway against malformed and hostile signalling, over raw UDP and TCP sockets (the
right tool for bytes no real SIP stack would send).

Every INVITE that cannot be served gets one final response that says why, before a call
or an RTP socket exists for it; whatever a call's task raises, the call ends answered for,
its socket closed and its entry gone; a flood from many sources costs one stateless
response per INVITE and a bounded number of audit lines; nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import random
import re
import socket
import time
import tracemalloc
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from api.hotline import Hotline
from escalation.audit import AuditLog
from gateway.admission import InboundGuard, TrustedTrunk
from gateway.call import Call, Gateway, GatewayConfig
from gateway.media.session import MediaSession
from gateway.result import CallOutcome
from gateway.sip.message import REASON_PHRASES
from gateway.sip.transaction import TimerSettings
from gateway.transport import SipStreamFramer
from tests.integration.peers import dtmf_pcap, sipp
from tests.waiting import wait_until

RTP_PORTS = (21000, 21998)  # below the ephemeral range: an open socket here is a call's
FAST = TimerSettings(t1=0.02, t2=0.16, t4=0.1)  # 64*T1 = 1.28 s: every timer ends quickly
WAIT = 10.0

SDP_OFFER = (
    "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    "m=audio 40000 RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
    "a=rtpmap:101 telephone-event/8000\r\n"
)


def invite(port: int, *, transport: str = "UDP", local: str = "127.0.0.1:5999", n: int = 1) -> str:
    """A valid INVITE to our gateway on ``port`` from ``local`` (the defects edit it)."""
    return (
        f"INVITE sip:hotline@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} {local};branch=z9hG4bKhost{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:+15550101@127.0.0.1>;tag=hostile{n}\r\n"
        f"To: <sip:hotline@127.0.0.1:{port}>\r\n"
        f"Call-ID: hostile-{n}@127.0.0.1\r\n"
        "CSeq: 1 INVITE\r\n"
        f"Contact: <sip:+15550101@{local};transport={transport.lower()}>\r\n"
        "Content-Type: application/sdp\r\n"
        f"Content-Length: {len(SDP_OFFER)}\r\n"
        "\r\n" + SDP_OFFER
    )


def edit(text: str, pattern: str, replacement: str) -> str:
    changed = re.sub(pattern, replacement, text, count=1, flags=re.MULTILINE)
    assert changed != text, pattern
    return changed


def refit_length(text: str) -> str:
    head, _, body = text.partition("\r\n\r\n")
    head = re.sub(r"Content-Length: \d+", f"Content-Length: {len(body.encode())}", head)
    return f"{head}\r\n\r\n{body}"


DEFECTS: dict[str, tuple[Callable[[str], str], int, str]] = {
    "no Contact": (lambda t: edit(t, r"^Contact: .*\r\n", ""), 400, "Missing Contact"),
    "no From tag": (lambda t: edit(t, r";tag=hostile\d+", ""), 400, "Missing From tag"),
    "unparseable Request-URI": (
        lambda t: edit(t, r"^INVITE \S+", "INVITE sip:@@"),
        400,
        "Invalid Request-URI",
    ),
    "tel Request-URI": (
        lambda t: edit(t, r"^INVITE \S+", "INVITE tel:+15550100"),
        416,
        "Unsupported URI Scheme",
    ),
    "no To": (lambda t: edit(t, r"^To: .*\r\n", ""), 400, "Missing To header"),
    "no Call-ID": (lambda t: edit(t, r"^Call-ID: .*\r\n", ""), 400, "Missing Call-ID"),
    "no CSeq": (lambda t: edit(t, r"^CSeq: .*\r\n", ""), 400, "Missing CSeq"),
    "CSeq method mismatch": (
        lambda t: edit(t, r"^CSeq: 1 INVITE", "CSeq: 1 BYE"),
        400,
        "CSeq method does not match the request",
    ),
    "Max-Forwards 0": (
        lambda t: edit(t, r"^Max-Forwards: 70", "Max-Forwards: 0"),
        483,
        "Too Many Hops",
    ),
    "body not SDP": (
        lambda t: edit(t, r"^Content-Type: application/sdp", "Content-Type: text/plain"),
        415,
        "Unsupported Media Type",
    ),
    "no common codec": (
        lambda t: refit_length(edit(t, r"RTP/AVP 0 101", "RTP/AVP 18 101")),
        488,
        "Not Acceptable Here (no common codec)",
    ),
    "bad Record-Route": (
        lambda t: edit(t, r"^Max-Forwards: 70\r\n", "Max-Forwards: 70\r\nRecord-Route: a b\r\n"),
        400,
        "Invalid Record-Route",
    ),
    "SDP address not an IP": (
        lambda t: refit_length(edit(t, r"^c=IN IP4 127.0.0.1", "c=IN IP4 127.0.0.1\u202e")),
        488,
        "Not Acceptable Here (connection address is not an IP address: '127.0.0.1\\u202e')",
    ),
}


def rtp_sockets() -> int:
    """Open UDP sockets of this process in the gateway's RTP range."""
    low, high = RTP_PORTS
    return sum(
        1 for c in psutil.Process().net_connections(kind="udp") if low <= c.laddr.port <= high
    )


async def eventually(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the loop's exception handler ("Task exception was never retrieved")."""
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield errors
    loop.set_exception_handler(previous)


def error_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@asynccontextmanager
async def gateway(
    on_incoming: Callable[[Call], Any] | None = None, **config: Any
) -> AsyncIterator[Gateway]:
    async def default_incoming(call: Call) -> None:
        await call.collect(1, timeout=3.0)

    settings = GatewayConfig(
        host="127.0.0.1", udp_port=0, tcp_port=0, rtp_ports=RTP_PORTS, timers=FAST, **config
    )
    gw = Gateway(settings, on_incoming=on_incoming or default_incoming)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.stop(timeout=1.0)


class RawCaller:
    """A caller that speaks bytes: UDP from a bound socket, or one TCP connection."""

    def __init__(self, transport: str) -> None:
        self.transport = transport
        self.responses: list[str] = []
        self._framer = SipStreamFramer(65535)
        self._frames: deque[bytes] = deque()
        self._udp: socket.socket | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.local = ""

    async def connect(self, gw: Gateway) -> RawCaller:
        host, port = gw.address(self.transport)
        if self.transport == "udp":
            self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._udp.bind(("127.0.0.1", 0))
            self._udp.setblocking(False)
            self._udp.connect((host, port))
            sockname = self._udp.getsockname()
        else:
            self._reader, self._writer = await asyncio.open_connection(host, port)
            sockname = self._writer.get_extra_info("sockname")
        self.local = f"{sockname[0]}:{sockname[1]}"
        return self

    async def send(self, text: str | bytes) -> None:
        data = text.encode() if isinstance(text, str) else text
        if self._udp is not None:
            await asyncio.get_running_loop().sock_sendall(self._udp, data)
        else:
            assert self._writer is not None
            self._writer.write(data)
            await self._writer.drain()

    async def receive(self, timeout: float = WAIT) -> str:
        """The next message the gateway sent us (responses and requests alike)."""
        if self._udp is not None:
            loop = asyncio.get_running_loop()
            data = await asyncio.wait_for(loop.sock_recv(self._udp, 65535), timeout)
            message = data.decode()
        else:
            message = await asyncio.wait_for(self._next_frame(), timeout)
        self.responses.append(message)
        return message

    async def _next_frame(self) -> str:
        assert self._reader is not None
        while not self._frames:
            data = await self._reader.read(65535)
            if not data:
                raise ConnectionError("gateway closed the connection")
            self._frames.extend(f for f in self._framer.feed(data) if isinstance(f, bytes))
        return self._frames.popleft().decode()

    async def final(self, timeout: float = WAIT) -> tuple[int, str]:
        """Skip provisionals; the code and reason phrase of the first final response."""
        while True:
            status = (await self.receive(timeout)).split("\r\n", 1)[0]
            code, phrase = int(status.split(" ", 2)[1]), status.split(" ", 2)[2]
            if code >= 200:
                return code, phrase

    async def silent_for(self, seconds: float) -> bool:
        return await self.received_for(seconds) == []

    async def received_for(self, seconds: float) -> list[str]:
        """Everything the gateway sends us during the next ``seconds``."""
        deadline = time.monotonic() + seconds
        messages = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                messages.append(await self.receive(left))
            except TimeoutError:
                break
        return messages

    def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._writer is not None:
            self._writer.close()


# -- item 2: malformed INVITEs ----------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("defect", list(DEFECTS))
async def test_malformed_invite_gets_a_final_response_and_leaves_nothing(
    transport: str,
    defect: str,
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    transform, code, phrase = DEFECTS[defect]
    handled: list[Call] = []

    async def on_incoming(call: Call) -> None:
        handled.append(call)

    async with gateway(on_incoming) as gw:
        caller = await RawCaller(transport).connect(gw)
        try:
            port = gw.address(transport)[1]
            await caller.send(
                transform(invite(port, transport=transport.upper(), local=caller.local))
            )
            got_code, got_phrase = await caller.final()
            assert (got_code, got_phrase) == (code, phrase), caller.responses
            # Refused statelessly: no 100 Trying first, and never a retransmission after.
            assert len(caller.responses) == 1, caller.responses
            assert await caller.silent_for(0.3)
            assert handled == []
            assert gw.calls == {}
            assert rtp_sockets() == 0
            assert gw.endpoint._servers == {}
        finally:
            caller.close()
    assert error_records(caplog) == []
    assert loop_errors == []


async def test_a_raising_call_task_answers_500_and_cleans_up(
    monkeypatch: pytest.MonkeyPatch,
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug inside the call (here: while answering the offer) ends in a final response,
    the RTP socket closed, the call entry gone and one logged traceback."""

    def broken_answer(*args: object, **kwargs: object) -> Any:
        raise RuntimeError("bug while answering")

    monkeypatch.setattr("gateway.call.create_answer", broken_answer)
    async with gateway() as gw:
        caller = await RawCaller("udp").connect(gw)
        await caller.send(invite(gw.address()[1], local=caller.local))
        assert (await caller.final())[0] == 500
        await eventually(lambda: rtp_sockets() == 0 and gw.calls == {}, "cleanup")
        caller.close()
    gc.collect()  # an unretrieved task exception is reported when the task is collected
    errors = error_records(caplog)
    assert len(errors) == 1, errors
    assert "inbound call failed" in errors[0], errors
    assert loop_errors == []


async def test_a_call_task_raising_after_the_answer_sends_bye(
    monkeypatch: pytest.MonkeyPatch, loop_errors: list[dict[str, Any]]
) -> None:
    async def broken_ack_wait(self: Call, *args: object) -> bool:
        raise RuntimeError("bug after answering")

    monkeypatch.setattr(Call, "_await_ack", broken_ack_wait)
    async with gateway() as gw:
        caller = await RawCaller("udp").connect(gw)
        await caller.send(invite(gw.address()[1], local=caller.local))
        assert (await caller.final())[0] == 200
        assert (await caller.receive()).startswith("BYE ")
        await eventually(lambda: rtp_sockets() == 0 and gw.calls == {}, "cleanup")
        caller.close()
    gc.collect()
    assert loop_errors == []


async def test_cancel_while_the_media_port_opens_leaves_no_socket(
    monkeypatch: pytest.MonkeyPatch,
    loop_errors: list[dict[str, Any]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The caller cancels while we are still binding its RTP port: 487, and the port that
    was being opened is closed, not leaked; nothing is sent on the ended transaction."""
    opening = asyncio.Event()
    original_open = MediaSession.open

    async def slow_open(self: MediaSession) -> int:
        opening.set()
        await asyncio.sleep(0.3)
        return await original_open(self)

    monkeypatch.setattr(MediaSession, "open", slow_open)
    async with gateway() as gw:
        caller = await RawCaller("udp").connect(gw)
        text = invite(gw.address()[1], local=caller.local)
        await caller.send(text)
        assert (await caller.receive()).startswith("SIP/2.0 100 ")
        await asyncio.wait_for(opening.wait(), WAIT)
        await caller.send(cancel_for(text))
        codes = sorted([(await caller.final())[0], (await caller.final())[0]])
        assert codes == [200, 487]
        later = await caller.received_for(0.8)  # 487 retransmissions (no ACK), never 180/200
        assert all(m.startswith("SIP/2.0 487 ") for m in later), later
        await eventually(lambda: rtp_sockets() == 0 and gw.calls == {}, "cleanup")
        caller.close()
    gc.collect()
    assert error_records(caplog) == []
    assert loop_errors == []


def cancel_for(invite_text: str) -> str:
    head = invite_text.split("\r\n\r\n")[0]
    cancel = edit(edit(head, r"^INVITE ", "CANCEL "), r"^CSeq: 1 INVITE", "CSeq: 1 CANCEL")
    cancel = edit(cancel, r"^Content-Type: .*\r\n", "")
    return edit(cancel, r"Content-Length: \d+", "Content-Length: 0") + "\r\n\r\n"


async def test_cancel_in_the_same_segment_as_its_invite_ends_the_call(
    loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """Over TCP both arrive in one read, so the CANCEL is handled before the call's task
    has run: the call must already own the INVITE (and end), not leave it to a task that
    then answers a finished transaction and leaks the call."""
    async with gateway() as gw:
        caller = await RawCaller("tcp").connect(gw)
        text = invite(gw.address("tcp")[1], transport="TCP", local=caller.local)
        await caller.send(text + cancel_for(text))
        codes = sorted([(await caller.final())[0], (await caller.final())[0]])
        assert codes == [200, 487]
        assert await caller.silent_for(0.5)
        await eventually(lambda: rtp_sockets() == 0 and gw.calls == {}, "cleanup")
        caller.close()
    gc.collect()
    assert error_records(caplog) == []
    assert loop_errors == []


async def test_unacknowledged_answer_ends_in_bye_without_touching_the_ended_transaction(
    loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """No ACK ever: the 2xx is retransmitted until 64*T1 (when timer L has also ended the
    INVITE transaction: no "cannot send 200 in state TERMINATED"), then BYE."""
    async with gateway() as gw:
        caller = await RawCaller("udp").connect(gw)
        await caller.send(invite(gw.address()[1], local=caller.local))
        while not (message := await caller.receive()).startswith("BYE "):
            assert message.startswith("SIP/2.0 1") or message.startswith("SIP/2.0 200 ")
        assert sum(m.startswith("SIP/2.0 200 ") for m in caller.responses) >= 3
        await eventually(lambda: rtp_sockets() == 0 and gw.calls == {}, "cleanup")
        caller.close()
    gc.collect()
    assert error_records(caplog) == []
    assert loop_errors == []


async def test_late_offer_whose_ack_brings_no_answer_is_hung_up_at_once(
    loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    """An INVITE without SDP: our 200 carries the offer, the ACK must carry the answer. An
    ACK without one leaves a call no media can flow on; its flow used to wait on its first
    prompt until the maximum call duration (an hour)."""

    async def waits_for_media(call: Call) -> None:
        await call.ended.wait()  # like a flow whose first prompt never finishes playing

    async with gateway(waits_for_media, max_call_duration=600) as gw:
        caller = await RawCaller("udp").connect(gw)
        with_offer = invite(gw.address()[1], local=caller.local)
        head = with_offer.split("\r\n\r\n")[0]
        text = edit(head, r"^Content-Type: .*\r\n", "")
        text = edit(text, r"Content-Length: \d+", "Content-Length: 0") + "\r\n\r\n"
        await caller.send(text)
        while not (ok := await caller.receive()).startswith("SIP/2.0 200 "):
            pass
        assert "m=audio" in ok  # our offer
        await caller.send(ack_for(with_offer, ok, "z9hG4bKack1"))  # and no answer in it
        while not (await caller.receive(timeout=5)).startswith("BYE "):
            pass
        await eventually(lambda: rtp_sockets() == 0 and gw.calls == {}, "cleanup")
        caller.close()
    assert error_records(caplog) == []
    assert loop_errors == []


async def test_inbound_calls_beyond_the_cap_get_503_before_any_media(
    loop_errors: list[dict[str, Any]],
) -> None:
    """Calls in progress hold an RTP socket and a task each: past max_inbound_calls a new
    INVITE is refused statelessly with 503 and Retry-After, and admitted again once a
    call has ended."""
    release = asyncio.Event()

    async def on_incoming(call: Call) -> None:
        await release.wait()

    async with gateway(on_incoming, max_inbound_calls=2) as gw:
        callers = [await RawCaller("udp").connect(gw) for _ in range(3)]
        try:
            for n, caller in enumerate(callers[:2], start=1):
                await answered_call(caller, gw, "z9hG4bKack1", n=n)
            third = callers[2]
            await third.send(invite(gw.address()[1], local=third.local, n=3))
            assert await third.final() == (503, "Service Unavailable (too many calls)")
            assert "Retry-After: 10" in third.responses[-1]
            assert gw.inbound_calls == 2
            assert rtp_sockets() == 2
            release.set()
            await eventually(lambda: gw.inbound_calls == 0, "the calls to end")
            await third.send(invite(gw.address()[1], local=third.local, n=4))
            code, _ = await third.final()
            assert code == 200
        finally:
            release.set()
            for caller in callers:
                caller.close()
    assert loop_errors == []


def out_of_dialog(method: str, port: int, local: str, n: int, to_tag: str = "") -> str:
    tag = f";tag={to_tag}" if to_tag else ""
    return (
        f"{method} sip:hotline@127.0.0.1:{port} SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP {local};branch=z9hG4bKprobe{n};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"From: <sip:scanner@127.0.0.9>;tag=s{n}\r\n"
        f"To: <sip:hotline@127.0.0.1:{port}>{tag}\r\n"
        f"Call-ID: probe-{n}@127.0.0.9\r\n"
        f"CSeq: 1 {method}\r\n"
        "Content-Length: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("method", "to_tag", "code"),
    [
        ("OPTIONS", "", 200),
        ("BYE", "", 481),
        ("INFO", "", 481),
        ("BYE", "no-such-call", 481),
        ("INVITE", "no-such-call", 481),
        ("REGISTER", "", 501),
        ("MESSAGE", "", 501),
    ],
)
async def test_requests_that_need_no_call_are_answered_without_keeping_anything(
    method: str, to_tag: str, code: int
) -> None:
    """A probe or a request for no call of ours, from anyone: one final answer, the same
    for a retransmission, and no transaction kept (each held about 2 KB for 32 s, so a
    stranger's flood of them cost memory in proportion to its rate)."""
    async with gateway() as gw:
        caller = await RawCaller("udp").connect(gw)
        try:
            port = gw.address()[1]
            for n in range(40):
                await caller.send(out_of_dialog(method, port, caller.local, n, to_tag))
                if n % 10 == 9:
                    await asyncio.sleep(0.02)
            await caller.send(out_of_dialog(method, port, caller.local, 0, to_tag))  # again
            answers = await caller.received_for(1.0)
            assert len(answers) == 41, answers[:3]
            assert {a.split("\r\n", 1)[0] for a in answers} == {
                f"SIP/2.0 {code} {REASON_PHRASES[code]}"
            }
            first = [a for a in answers if "Call-ID: probe-0@" in a]
            tags = {re.findall(r"^To: .*;tag=(\S+)", a, re.MULTILINE)[0] for a in first}
            assert len(first) == 2
            assert len(tags) == 1  # the retransmission: the same answer
            assert gw.endpoint._servers == {}
            assert gw.calls == {}
        finally:
            caller.close()


def ack_for(invite_text: str, ok: str, branch: str | None) -> str:
    """The ACK for the 200 ``ok`` to ``invite_text``: its To tag, a new branch unless told."""
    to = re.search(r"^To: .*$", ok, re.MULTILINE)
    assert to is not None
    head = invite_text.split("\r\n\r\n")[0]
    ack = edit(edit(head, r"^INVITE ", "ACK "), r"^CSeq: 1 INVITE", "CSeq: 1 ACK")
    ack = edit(edit(ack, r"^To: .*$", to.group(0)), r"Content-Length: \d+", "Content-Length: 0")
    if branch is not None:
        ack = edit(ack, r"branch=[^;\r]+", f"branch={branch}")
    return edit(ack, r"^Content-Type: .*\r\n", "") + "\r\n\r\n"


async def answered_call(caller: RawCaller, gw: Gateway, ack_branch: str | None, n: int = 1) -> None:
    """Call in, wait for the 200 and ACK it."""
    text = invite(gw.address()[1], local=caller.local, n=n)
    await caller.send(text)
    while not (ok := await caller.receive()).startswith("SIP/2.0 200 "):
        pass
    await caller.send(ack_for(text, ok, ack_branch))


@pytest.mark.parametrize("ack_branch", ["z9hG4bKack1", None], ids=["new_branch", "same_branch"])
async def test_inbound_call_is_hung_up_at_its_max_duration(ack_branch: str | None) -> None:
    """Also: an ACK reusing the INVITE's branch (the transaction hands it up, RFC 6026)
    counts as the ACK; it used to be swallowed, and the call hung up for want of one."""
    handled: list[Call] = []

    async def on_incoming(call: Call) -> None:
        call.set_max_duration(0.5)  # per-call override of GatewayConfig.max_call_duration
        handled.append(call)
        await call.ended.wait()  # bounded: the gateway ends it

    async with gateway(on_incoming, max_call_duration=600) as gw:
        caller = await RawCaller("udp").connect(gw)
        await answered_call(caller, gw, ack_branch)
        while not (await caller.receive()).startswith("BYE "):
            pass
        await eventually(lambda: bool(handled) and handled[0].ended.is_set(), "the call to end")
        caller.close()
    result = handled[0].result
    assert result is not None
    assert (result.outcome, result.hangup_by) == (CallOutcome.ANSWERED, "local")
    assert result.reason == "max duration (0.5 s) reached"


async def test_reinvite_with_a_garbled_contact_is_refused_and_the_call_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handled: list[Call] = []

    async def on_incoming(call: Call) -> None:
        handled.append(call)
        await call.collect(1, timeout=3.0)

    async with gateway(on_incoming) as gw:
        caller = await RawCaller("udp").connect(gw)
        text = invite(gw.address()[1], local=caller.local)
        await caller.send(text)
        while not (ok := await caller.receive()).startswith("SIP/2.0 200 "):
            pass
        await caller.send(ack_for(text, ok, "z9hG4bKack2"))
        await eventually(lambda: bool(handled), "the call to be answered")
        to = re.search(r"^To: .*$", ok, re.MULTILINE)
        assert to is not None
        reinvite = edit(edit(text, r"^To: .*$", to.group(0)), r"^CSeq: 1 ", "CSeq: 2 ")
        reinvite = edit(reinvite, r"branch=[^;\r]+", "branch=z9hG4bKre2")
        await caller.send(edit(reinvite, r"^Contact: .*$", "Contact: <sip:@@>"))
        assert await caller.final() == (400, "Invalid Contact")
        assert not handled[0].ended.is_set()
        caller.close()
    assert error_records(caplog) == []


# -- a quick seeded fuzz loop: memory and fds stay flat ----------------------------------

TEMPLATES = [
    "invite",
    (
        "OPTIONS sip:hotline@127.0.0.1:{port} SIP/2.0\r\n"
        "Via: SIP/2.0/{transport} {local};branch=z9hG4bKopt{n};rport\r\n"
        "From: <sip:probe@127.0.0.1>;tag=o{n}\r\nTo: <sip:hotline@127.0.0.1>\r\n"
        "Call-ID: opt-{n}@x\r\nCSeq: {n} OPTIONS\r\nContent-Length: 0\r\n\r\n"
    ),
    (
        "BYE sip:hotline@127.0.0.1:{port} SIP/2.0\r\n"
        "Via: SIP/2.0/{transport} {local};branch=z9hG4bKbye{n};rport\r\n"
        "From: <sip:x@127.0.0.1>;tag=b{n}\r\nTo: <sip:hotline@127.0.0.1>;tag=nope\r\n"
        "Call-ID: bye-{n}@x\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n"
    ),
    (
        "SIP/2.0 200 OK\r\nVia: SIP/2.0/{transport} 127.0.0.1:9;branch=z9hG4bKr{n}\r\n"
        "From: <sip:a@x>;tag=r{n}\r\nTo: <sip:b@x>;tag=s\r\nCall-ID: r{n}@x\r\n"
        "CSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
    ),
]


def fuzz_input(rng: random.Random, port: int, transport: str, local: str, n: int) -> bytes:
    """A valid message put through a few corruptions (some stay valid: calls get made)."""
    template = rng.choice(TEMPLATES)
    if template == "invite":
        text = invite(port, transport=transport.upper(), local=local, n=n)
    else:
        text = template.format(port=port, transport=transport.upper(), local=local, n=n)
    if rng.random() < 0.3:
        name = rng.choice(list(DEFECTS))
        with contextlib.suppress(AssertionError):  # when it does not apply to the template
            text = DEFECTS[name][0](text)
    data = bytearray(text.encode())
    for _ in range(rng.randint(0, 3)):
        if not data:
            break
        at = rng.randrange(len(data))
        operation = rng.choice(["flip", "truncate", "insert", "delete_line", "dup_line"])
        if operation == "flip":
            data[at] ^= 1 << rng.randrange(8)
        elif operation == "truncate":
            del data[at:]
        elif operation == "insert":
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            lines = bytes(data).split(b"\r\n")
            index = rng.randrange(len(lines))
            if operation == "delete_line":
                del lines[index]
            else:
                lines.insert(index, lines[index])
            data = bytearray(b"\r\n".join(lines))
    return bytes(data)


async def fuzz_round(gw: Gateway, rng: random.Random, start: int, count: int) -> None:
    udp = await RawCaller("udp").connect(gw)
    tcp: RawCaller | None = None
    udp_port, tcp_port = gw.address("udp")[1], gw.address("tcp")[1]
    try:
        for n in range(start, start + count):
            if n % 5:
                await udp.send(fuzz_input(rng, udp_port, "udp", udp.local, n))
            else:
                if tcp is None or tcp._writer is None or tcp._writer.is_closing():
                    if tcp is not None:
                        tcp.close()
                    tcp = await RawCaller("tcp").connect(gw)
                try:
                    await tcp.send(fuzz_input(rng, tcp_port, "tcp", tcp.local, n))
                except ConnectionError:
                    tcp.close()
                    tcp = None
            if n % 20 == 0:
                await asyncio.sleep(0.01)  # let the gateway keep up (UDP would drop)
        await asyncio.sleep(0.2)
    finally:
        udp.close()
        if tcp is not None:
            tcp.close()


def quiet(gw: Gateway) -> bool:
    endpoint = gw.endpoint
    return not gw.calls and not endpoint._servers and not endpoint._clients and rtp_sockets() == 0


async def test_seeded_fuzz_leaves_memory_and_fds_flat_and_calls_still_work(
    tmp_path: Path, loop_errors: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(1313)
    process = psutil.Process()
    digits: list[str] = []

    async def on_incoming(call: Call) -> None:
        digits.append(await call.collect(1, timeout=5.0))

    async with gateway(on_incoming) as gw:
        fds_before = process.num_fds()
        await fuzz_round(gw, rng, 0, 400)  # warm-up: caches, metrics' label sets, ...
        await eventually(lambda: quiet(gw), "the gateway to settle", 30)
        gc.collect()
        fds_warm = process.num_fds()
        tracemalloc.start()
        try:
            warm = tracemalloc.get_traced_memory()[0]
            await fuzz_round(gw, rng, 400, 400)
            await eventually(lambda: quiet(gw), "the gateway to settle", 30)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - warm
        finally:
            tracemalloc.stop()
        assert process.num_fds() == fds_warm == fds_before
        assert grown < 512 * 1024, f"{grown} bytes kept after 400 more inputs"
        assert gw.endpoint.transport.stats.received > 200  # the inputs were not all junk
        # A real caller still gets through.
        host, port = gw.address()
        with sipp("uac_dtmf.xml", tmp_path, remote=f"{host}:{port}", PAUSE_MS="300",
                  PCAP=str(dtmf_pcap("5"))) as peer:  # fmt: skip
            assert await asyncio.to_thread(peer.wait, 30) == 0, peer.logs()
        assert digits[-1] == "5"
        started = time.monotonic()
    assert time.monotonic() - started < 10  # stop() after all that garbage is prompt
    gc.collect()
    assert error_records(caplog) == []
    assert loop_errors == []


# -- item 4: a flood from many spread-out sources ---------------------------------------


async def test_flood_from_many_sources_costs_one_stateless_403_each_and_few_audit_lines(
    tmp_path: Path,
) -> None:
    """20,000 INVITEs from 400 untrusted loopback addresses: each INVITE the gateway read
    got exactly one 403 (none retransmitted, none a 503), no transaction or budget was
    kept, the audit has one line per source at once plus one counted line per source at
    stop, and memory did not grow with the flood."""
    audit = AuditLog(tmp_path / "audit")
    hotline = SimpleNamespace(audit=audit, config=SimpleNamespace(company="acme"))
    guard = InboundGuard([TrustedTrunk.parse("carrier", ["127.0.0.2"])])
    config = GatewayConfig(
        host="127.0.0.1", udp_port=0, rtp_ports=RTP_PORTS, timers=TimerSettings(t1=0.05)
    )
    gw = Gateway(
        config,
        on_incoming=lambda call: asyncio.sleep(0),
        guard=guard,
        on_refused=functools.partial(Hotline.on_refused, hotline),  # type: ignore[arg-type]
    )
    await gw.start()
    sources = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(400)]
    responses: dict[str, int] = {}
    try:
        for k, sock in enumerate(sources):
            sock.bind((f"127.1.{k // 200}.{k % 200 + 1}", 0))
            sock.setblocking(False)
        host, port = gw.address()
        stats = gw.endpoint.transport.stats

        def drain() -> None:
            for sock in sources:
                while True:
                    try:
                        data = sock.recv(65535)
                    except BlockingIOError:
                        break
                    code = data.split(b" ", 2)[1].decode()
                    responses[code] = responses.get(code, 0) + 1

        def flood(first: int, count: int) -> None:
            for n in range(first, first + count):
                sock = sources[n % len(sources)]
                local = "{}:{}".format(*sock.getsockname())
                sock.sendto(invite(port, local=local, n=n).encode(), (host, port))

        async def send(first: int, total: int) -> None:
            for batch in range(first, first + total, 100):

                def counted(want: int = stats.received + 100) -> bool:
                    return stats.received >= want

                flood(batch, 100)
                # what the kernel drops is not counted: no error when the wait times out
                with contextlib.suppress(TimeoutError):
                    await wait_until(counted, 2.0, interval=0.002)
                drain()

        await send(0, 2_000)  # warm-up: every source's first line, allocator pools
        gc.collect()
        rss_warm = psutil.Process().memory_info().rss
        await send(2_000, 18_000)
        gc.collect()
        grown = psutil.Process().memory_info().rss - rss_warm
        await asyncio.sleep(1.0)  # a stateful 403 would be retransmitted by now (T1 50 ms)
        drain()
        read = stats.received
        assert read > 18_000, "the flood did not reach the gateway"
        assert responses == {"403": read}  # exactly one each: no retransmission, no 503
        assert gw.endpoint._servers == {}
        assert len(guard._buckets) == 0
        assert grown < 8 * 1024 * 1024, f"RSS grew by {grown} bytes during the flood"
    finally:
        await gw.stop(timeout=1.0)
        for sock in sources:
            sock.close()
        audit.close()
    lines = [line for line in audit.read("acme") if line["event"] == "inbound_refused"]
    assert len(lines) <= 2 * len(sources)  # O(sources / interval), not O(INVITEs)
    assert sum(line["count"] for line in lines) == read
    assert {line["status"] for line in lines} == {"403"}
    assert len({line["ip"] for line in lines}) == len(sources)
