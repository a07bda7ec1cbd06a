"""Dialog state built from recorded INVITE/200 exchanges (RFC 3261 §12)."""

from __future__ import annotations

import pytest
from sipmessage import Address, Message, Parameters, Request, Response, Via

from gateway.result import CallOutcome, classify_final
from gateway.sip.dialog import Dialog, DialogError, DialogState
from gateway.sip.message import create_response, parse_message

INVITE = (
    b"INVITE sip:+15550100@127.0.0.1:5090 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKinv1;rport\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "ackline" <sip:ackline@127.0.0.1>;tag=loc1\r\n'
    b"To: <sip:+15550100@127.0.0.1:5090>\r\n"
    b"Call-ID: c1@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:ackline@127.0.0.1:5070>\r\n"
    b"Content-Length: 0\r\n\r\n"
)

OK_WITH_ROUTES = (
    b"SIP/2.0 200 OK\r\n"
    b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKinv1;rport=5070\r\n"
    b"Record-Route: <sip:p2.test;lr>\r\n"
    b"Record-Route: <sip:p1.test;lr>\r\n"
    b'From: "ackline" <sip:ackline@127.0.0.1>;tag=loc1\r\n'
    b"To: <sip:+15550100@127.0.0.1:5090>;tag=rem1\r\n"
    b"Call-ID: c1@127.0.0.1\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:uas@127.0.0.1:5090;transport=udp>\r\n"
    b"Content-Length: 0\r\n\r\n"
)


def via() -> Via:
    return Via("UDP", "127.0.0.1", 5070, Parameters(branch="z9hG4bKx", rport=None))


def parse(data: bytes) -> Request | Response:
    return parse_message(data)


def test_uac_dialog_from_2xx_reverses_record_route_and_uses_contact() -> None:
    invite, ok = parse(INVITE), parse(OK_WITH_ROUTES)
    assert isinstance(invite, Request)
    assert isinstance(ok, Response)
    dialog = Dialog.from_uac_response(invite, ok)
    assert dialog.state is DialogState.CONFIRMED
    assert (dialog.local_tag, dialog.remote_tag) == ("loc1", "rem1")
    assert [str(a.uri) for a in dialog.route_set] == ["sip:p1.test;lr", "sip:p2.test;lr"]
    assert str(dialog.remote_target) == "sip:uas@127.0.0.1:5090;transport=udp"
    assert str(dialog.destination()) == "sip:p1.test;lr"  # loose router first

    bye = dialog.create_request("BYE", via())
    again = Message.parse(bytes(bye))
    assert isinstance(again, Request)
    assert again.method == "BYE"
    assert str(again.uri) == "sip:uas@127.0.0.1:5090;transport=udp"
    assert again.cseq.sequence == 2
    assert again.cseq.method == "BYE"
    assert again.from_address.parameters["tag"] == "loc1"
    assert again.to_address.parameters["tag"] == "rem1"
    assert [str(r.uri) for r in again.route] == ["sip:p1.test;lr", "sip:p2.test;lr"]
    assert again.via[0].parameters["branch"] != "z9hG4bKx"  # new transaction, new branch


def test_ack_for_2xx_reuses_invite_cseq_with_new_branch() -> None:
    invite, ok = parse(INVITE), parse(OK_WITH_ROUTES)
    assert isinstance(invite, Request)
    assert isinstance(ok, Response)
    dialog = Dialog.from_uac_response(invite, ok)
    ack = dialog.create_ack(via())
    assert ack.cseq.sequence == 1
    assert ack.cseq.method == "ACK"
    dialog.create_request("INFO", via())
    assert dialog.create_ack(via()).cseq.sequence == 1  # INFO does not move the INVITE CSeq


def test_2xx_without_to_tag_or_contact_cannot_create_dialog() -> None:
    invite = parse(INVITE)
    assert isinstance(invite, Request)
    no_tag = parse(OK_WITH_ROUTES.replace(b";tag=rem1", b""))
    no_contact = parse(
        OK_WITH_ROUTES.replace(b"Contact: <sip:uas@127.0.0.1:5090;transport=udp>\r\n", b"")
    )
    assert isinstance(no_tag, Response)
    assert isinstance(no_contact, Response)
    with pytest.raises(DialogError):
        Dialog.from_uac_response(invite, no_tag)
    with pytest.raises(DialogError):
        Dialog.from_uac_response(invite, no_contact)


def test_strict_route_is_refused() -> None:
    invite = parse(INVITE)
    ok = parse(OK_WITH_ROUTES.replace(b"<sip:p1.test;lr>", b"<sip:p1.test>"))
    assert isinstance(invite, Request)
    assert isinstance(ok, Response)
    dialog = Dialog.from_uac_response(invite, ok)
    with pytest.raises(DialogError):
        dialog.destination()


def test_uas_dialog_matches_requests_and_orders_cseq() -> None:
    invite = parse(INVITE)
    assert isinstance(invite, Request)
    contact = Address.parse("<sip:gw@127.0.0.1:5090>")
    dialog = Dialog.from_uas_request(invite, "uas9", contact)
    assert dialog.remote_cseq == 1
    assert str(dialog.remote_target) == "sip:ackline@127.0.0.1:5070"

    bye_bytes = (
        INVITE.replace(b"INVITE sip", b"BYE sip")
        .replace(b"CSeq: 1 INVITE", b"CSeq: 2 BYE")
        .replace(
            b"To: <sip:+15550100@127.0.0.1:5090>", b"To: <sip:+15550100@127.0.0.1:5090>;tag=uas9"
        )
    )
    bye = parse(bye_bytes)
    assert isinstance(bye, Request)
    assert dialog.matches(bye)
    assert dialog.receive_request(bye) is True
    assert dialog.receive_request(bye) is False  # same CSeq again: out of order
    other = parse(bye_bytes.replace(b"tag=uas9", b"tag=other"))
    assert not dialog.matches(other)

    ours = dialog.create_request("BYE", via())
    assert ours.cseq.sequence == 1  # UAS starts its own CSeq space
    assert ours.from_address.parameters["tag"] == "uas9"
    assert ours.to_address.parameters["tag"] == "loc1"


def test_create_response_copies_headers_and_adds_to_tag() -> None:
    invite = parse(INVITE)
    assert isinstance(invite, Request)
    ringing = create_response(invite, 180, to_tag="t1")
    again = Message.parse(bytes(ringing))
    assert isinstance(again, Response)
    assert again.code == 180
    assert again.phrase == "Ringing"
    assert again.to_address.parameters["tag"] == "t1"
    assert again.call_id == "c1@127.0.0.1"
    assert str(again.cseq) == "1 INVITE"
    assert again.via[0].parameters["branch"] == "z9hG4bKinv1"
    assert again.content_length == 0


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (200, CallOutcome.ANSWERED),
        (486, CallOutcome.BUSY),
        (600, CallOutcome.BUSY),
        (480, CallOutcome.NO_ANSWER),
        (408, CallOutcome.NO_ANSWER),
        (603, CallOutcome.REJECTED),
        (404, CallOutcome.REJECTED),
        (302, CallOutcome.FAILED),
        (503, CallOutcome.FAILED),
        (500, CallOutcome.FAILED),
    ],
)
def test_final_code_classification(code: int, outcome: CallOutcome) -> None:
    assert classify_final(code) is outcome


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (INVITE.replace(b"CSeq: 1 INVITE", b"CSeq: 1 BYE"), "CSeq method does not match"),
        (
            INVITE.replace(b"Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKinv1;rport\r\n", b""),
            "no usable Via header",
        ),
        (INVITE.replace(b"Call-ID: c1@127.0.0.1\r\n", b""), "Missing Call-ID"),
        (OK_WITH_ROUTES.replace(b"SIP/2.0 200 OK", b"SIP/2.0 999 Odd"), "code out of range: 999"),
    ],
)
def test_parse_message_rejects_unusable_messages(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_message(data)
