"""RFC 3262 100rel state machines on synthetic time."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from gateway.sip.message import create_response, parse_message
from gateway.sip.reliable import (
    Pracked,
    ProvisionalTracker,
    ProvisionalVerdict,
    RAck,
    ReliableProvisional,
    ReliableTimeout,
    option_tags,
    parse_rack,
)
from gateway.sip.transaction import TimerSettings


def _invite(extra: str = "") -> Request:
    raw = (
        "INVITE sip:bob@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKrel1\r\n"
        "Max-Forwards: 70\r\n"
        "To: <sip:bob@127.0.0.1>\r\n"
        "From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        "Call-ID: rel-1@127.0.0.1\r\n"
        "CSeq: 7 INVITE\r\n"
        "Contact: <sip:alice@127.0.0.1>\r\n"
        f"{extra}"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(raw.encode())
    assert isinstance(message, Request)
    return message


def _provisional(code: int = 180, *, rseq: int | None = 5, tag: str = "b1") -> Response:
    response = create_response(_invite(), code, to_tag=tag)
    if rseq is not None:
        response.headers.set("Require", "100rel")
        response.headers.set("RSeq", str(rseq))
    return response


def _prack(rack: str) -> Request:
    raw = (
        "PRACK sip:bob@127.0.0.1 SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bKprack\r\n"
        "To: <sip:bob@127.0.0.1>;tag=b1\r\n"
        "From: <sip:alice@127.0.0.1>;tag=a1\r\n"
        "Call-ID: rel-1@127.0.0.1\r\n"
        "CSeq: 8 PRACK\r\n"
        f"RAck: {rack}\r\n"
        "Content-Length: 0\r\n\r\n"
    )
    message = parse_message(raw.encode())
    assert isinstance(message, Request)
    return message


def test_option_tags_split_lists_and_instances() -> None:
    invite = _invite("Supported: 100rel, Timer\r\nk: replaces\r\nRequire: 100rel\r\n")
    assert option_tags(invite, "Supported") == {"100rel", "timer", "replaces"}
    assert option_tags(invite, "Require") == {"100rel"}


def test_tracker_pracks_each_rseq_once_in_order() -> None:
    tracker = ProvisionalTracker()
    assert tracker.receive(_provisional(rseq=None)) is ProvisionalVerdict.UNRELIABLE
    assert tracker.receive(_provisional(180, rseq=5)) is ProvisionalVerdict.PRACK
    assert tracker.receive(_provisional(180, rseq=5)) is ProvisionalVerdict.RETRANSMISSION
    assert tracker.receive(_provisional(183, rseq=7)) is ProvisionalVerdict.OUT_OF_ORDER
    assert tracker.receive(_provisional(183, rseq=4)) is ProvisionalVerdict.OUT_OF_ORDER
    assert tracker.receive(_provisional(183, rseq=6)) is ProvisionalVerdict.PRACK
    assert tracker.receive(_provisional(183, rseq=7)) is ProvisionalVerdict.PRACK


def test_tracker_keeps_one_sequence_per_early_dialog() -> None:
    tracker = ProvisionalTracker()
    assert tracker.receive(_provisional(rseq=5, tag="b1")) is ProvisionalVerdict.PRACK
    assert tracker.receive(_provisional(rseq=900, tag="b2")) is ProvisionalVerdict.PRACK
    assert tracker.receive(_provisional(rseq=6, tag="b1")) is ProvisionalVerdict.PRACK


def test_tracker_refuses_reliable_without_rseq() -> None:
    response = _provisional(rseq=None)
    response.headers.set("Require", "100rel")
    assert ProvisionalTracker().receive(response) is ProvisionalVerdict.INVALID


def test_rack_round_trip() -> None:
    assert parse_rack(_prack("5 7 INVITE")) == RAck(5, 7, "INVITE")
    assert str(RAck(5, 7, "INVITE")) == "5 7 INVITE"
    assert parse_rack(_prack("x 7 INVITE")) is None


TIMERS = TimerSettings(t1=0.5)


def test_uas_retransmits_with_doubling_until_pracked() -> None:
    reliable = ReliableProvisional(_provisional(rseq=42), TIMERS)
    reliable.start(0.0)
    assert len(reliable.messages_to_send()) == 1
    sent_at = []
    now = 0.0
    while (at := reliable.next_timer_at()) is not None and at < 3.6:
        now = at
        reliable.handle_timer(now)
        if reliable.messages_to_send():
            sent_at.append(now)
    assert sent_at == [0.5, 1.5, 3.5]  # T1, then 2*T1, 4*T1 later
    assert not reliable.receive(_prack("41 7 INVITE"), now)  # wrong RSeq: 481
    assert reliable.next_event() is None
    assert reliable.receive(_prack("42 7 INVITE"), now)
    assert reliable.next_event() == Pracked(RAck(42, 7, "INVITE"))
    assert reliable.next_timer_at() is None
    assert reliable.receive(_prack("42 7 INVITE"), now)  # a retransmitted PRACK: 200 again
    assert reliable.next_event() is None


def test_uas_gives_up_after_64_t1() -> None:
    reliable = ReliableProvisional(_provisional(rseq=1), TIMERS)
    reliable.start(10.0)
    sends, last = 0, 0.0
    for _ in range(100):  # bounded: the machine must finish well within this
        at = reliable.next_timer_at()
        if at is None:
            break
        last = at
        reliable.handle_timer(at)
        sends += len(reliable.messages_to_send())
    assert reliable.next_event() == ReliableTimeout()
    assert last == pytest.approx(10.0 + 64 * 0.5)
    assert sends == 7  # the first, then 0.5, 1.5, 3.5, 7.5, 15.5, 31.5 s after it


def test_uas_refuses_an_unreliable_response() -> None:
    with pytest.raises(ValueError, match="needs a 1xx with Require: 100rel and RSeq"):
        ReliableProvisional(_provisional(rseq=None), TIMERS)
