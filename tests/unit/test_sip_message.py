"""parse_message: what can be answered (BadRequest with a reason) versus what is dropped,
and the stateless answers built from broken requests."""

from __future__ import annotations

import traceback
from collections.abc import Callable

import pytest
from sipmessage import Address, MediaType, Via

from gateway.sip.message import (
    BadRequest,
    Rejection,
    Request,
    create_rejection,
    parse_message,
    stateless_tag,
    top_via,
)

INVITE = (
    b"INVITE sip:hotline@127.0.0.1:5060 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKmsg1;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b"From: <sip:+15550101@127.0.0.2>;tag=f1\r\n"
    b"To: <sip:hotline@127.0.0.1:5060>\r\n"
    b"Call-ID: msg-1@127.0.0.2\r\n"
    b"CSeq: 7 INVITE\r\n"
    b"Contact: <sip:caller@127.0.0.2:5062>\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)


def bad(data: bytes) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse_message(data)
    return caught.value


@pytest.mark.parametrize(
    ("old", "new", "phrase"),
    [
        (b"sip:hotline@127.0.0.1:5060 SIP", b"sip:@@ SIP", "Invalid Request-URI"),
        (b"Call-ID: msg-1@127.0.0.2\r\n", b"", "Missing Call-ID"),
        (b"Call-ID: msg-1@127.0.0.2", b"Call-ID:  ", "Missing Call-ID"),
        (b"From: <sip:+15550101@127.0.0.2>;tag=f1\r\n", b"", "Missing From header"),
        (b"To: <sip:hotline@127.0.0.1:5060>", b"To: <<>", "Invalid To header"),
        (b"CSeq: 7 INVITE\r\n", b"", "Missing CSeq"),
        (b"CSeq: 7 INVITE", b"CSeq: seven INVITE", "Invalid CSeq"),
        (b"CSeq: 7 INVITE", b"CSeq: 2147483648 INVITE", "Invalid CSeq"),
        (b"CSeq: 7 INVITE", b"CSeq: 7 BYE", "CSeq method does not match the request"),
        (b"Max-Forwards: 70", b"Max-Forwards: -1", "Invalid Max-Forwards"),
        (b"Max-Forwards: 70", b"Max-Forwards: 70\r\nVia: garbage", "Invalid Via header"),
    ],
)
def test_answerable_faults_become_bad_request_with_a_reason(
    old: bytes, new: bytes, phrase: str
) -> None:
    assert old in INVITE
    error = bad(INVITE.replace(old, new))
    assert (error.rejection.code, error.rejection.phrase) == (400, phrase)
    # The answer copies what the request has, so the sender can match it by its Via.
    response = create_rejection(error.request, error.rejection)
    assert bytes(response).startswith(f"SIP/2.0 400 {phrase}\r\n".encode())
    assert top_via(response).parameters["branch"] == "z9hG4bKmsg1"
    for name in ("From", "Call-ID", "CSeq"):
        assert response.headers.get(name) == error.request.headers.get(name)


NO_VIA = "no usable Via header"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            INVITE.replace(b"Via: SIP/2.0/UDP 127.0.0.2:5062;branch=z9hG4bKmsg1;rport\r\n", b""),
            NO_VIA,
        ),
        # an empty first Via header beside a good one: once an IndexError in Via stamping
        (INVITE.replace(b"Via: SIP", b"Via: \r\nVia: SIP"), NO_VIA),
        (INVITE.replace(b"Via: SIP/2.0/UDP", b"Via: SIP/2.0/UDP,"), "Via is not valid"),
        (
            INVITE.replace(b"sip:hotline@127.0.0.1:5060 SIP", b"sip:@@ SIP").replace(
                b"Via:", b"V:x"
            ),
            "Via is not valid",
        ),
        # no colon: unparseable
        (INVITE.replace(b"Max-Forwards: 70", b"Max-Forwards 70"), "not enough values to unpack"),
    ],
)
def test_unanswerable_requests_are_plain_value_errors(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        parse_message(data)
    assert not isinstance(caught.value, BadRequest)


def test_ack_with_wrong_cseq_method_is_not_usable() -> None:
    ack = INVITE.replace(b"INVITE sip:", b"ACK sip:")
    assert bad(ack).rejection.phrase == "CSeq method does not match the request"
    assert isinstance(parse_message(ack.replace(b"7 INVITE", b"7 ACK")), Request)


def test_stateless_answers_keep_one_to_tag_for_retransmissions() -> None:
    first = parse_message(INVITE)
    again = parse_message(INVITE)
    other = parse_message(INVITE.replace(b"z9hG4bKmsg1", b"z9hG4bKmsg2"))
    assert isinstance(first, Request)
    assert isinstance(again, Request)
    assert isinstance(other, Request)
    assert stateless_tag(first) == stateless_tag(again) != stateless_tag(other)
    rejection = Rejection(415, "Unsupported Media Type", (("Accept", "application/sdp"),))
    response = create_rejection(first, rejection)
    assert response.to_address.parameters["tag"] == stateless_tag(first)
    assert response.headers["Accept"] == "application/sdp"
    assert response.call_id == "msg-1@127.0.0.2"
    assert str(response.cseq) == "7 INVITE"


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (Address.parse, "<sip:a@127.0.0.9> junk"),
        (Via.parse, "SIP/2.0/UDP 127.0.0.9:5060 junk"),
        (MediaType.parse, "application/sdp junk"),
    ],
)
def test_a_flood_of_bad_headers_leaves_no_growing_traceback_behind(
    parse: Callable[[str], object], text: str
) -> None:
    """sipmessage raises one shared exception per header type (Address, Via, media type);
    each raise chained its frames onto that one object's traceback, kept for the life of
    the process (30,000 bad From headers from a stranger: +300 MB, never given back).
    Every bad header is now an error of its own."""
    depths = []
    for _ in range(200):
        with pytest.raises(ValueError, match="is not valid") as caught:
            parse(text)
        depths.append(len(traceback.extract_tb(caught.value.__traceback__)))
    assert depths[-1] == depths[0] < 20
    bad_from = INVITE.replace(b"tag=f1", b"tag=f1 junk")
    assert bad(bad_from).rejection.phrase == "Invalid From header"


def test_folded_header_lines_are_joined_to_their_header() -> None:
    """RFC 3261 7.3.1: a line starting with whitespace continues the header above it (RFC
    4475's wsinv and esc01 fold theirs); such a message parsed as nothing at all."""
    folded = INVITE.replace(
        b"Contact: <sip:caller@127.0.0.2:5062>\r\n",
        b"Contact:\r\n   <sip:caller@127.0.0.2:5062>\r\nSubject: a\r\n\tlong subject\r\n",
    )
    request = parse_message(folded)
    assert isinstance(request, Request)
    assert str(request.contact[0].uri) == "sip:caller@127.0.0.2:5062"
    assert request.headers.get("Subject") == "a long subject"
