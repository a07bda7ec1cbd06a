"""RFC 3261 §17 / RFC 6026 transaction state machines driven by recorded message flows."""

from __future__ import annotations

import pytest
from sipmessage import Request, Response

from gateway.sip.message import create_response, parse_message, to_wire
from gateway.sip.transaction import (
    AckReceived,
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    Event,
    ResponseReceived,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    TimerSettings,
    TransactionError,
    TransactionState,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
    transaction_key,
)

BRANCH = "z9hG4bK776asdhds"
CALL_ID = "a84b4c76e66710@pc33.atlanta.example.com"


def _request(
    method: str = "INVITE",
    *,
    transport: str = "UDP",
    branch: str = BRANCH,
    cseq_method: str | None = None,
    to_tag: str | None = None,
) -> Request:
    to = "Bob <sip:bob@biloxi.example.com>" + (f";tag={to_tag}" if to_tag else "")
    raw = (
        f"{method} sip:bob@biloxi.example.com SIP/2.0\r\n"
        f"Via: SIP/2.0/{transport} pc33.atlanta.example.com:5060;branch={branch}\r\n"
        "Max-Forwards: 70\r\n"
        "Route: <sip:proxy.atlanta.example.com;lr>\r\n"
        f"To: {to}\r\n"
        "From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        f"Call-ID: {CALL_ID}\r\n"
        f"CSeq: 314159 {cseq_method or method}\r\n"
        "Contact: <sip:alice@pc33.atlanta.example.com>\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    )
    message = parse_message(raw.encode())
    assert isinstance(message, Request)
    return message


def _response(
    code: int,
    phrase: str,
    *,
    method: str = "INVITE",
    transport: str = "UDP",
    to_tag: str | None = "a6c85cf",
    branch: str = BRANCH,
) -> Response:
    to = "Bob <sip:bob@biloxi.example.com>" + (f";tag={to_tag}" if to_tag else "")
    raw = (
        f"SIP/2.0 {code} {phrase}\r\n"
        f"Via: SIP/2.0/{transport} pc33.atlanta.example.com:5060;branch={branch}"
        ";received=192.0.2.101\r\n"
        f"To: {to}\r\n"
        "From: Alice <sip:alice@atlanta.example.com>;tag=1928301774\r\n"
        f"Call-ID: {CALL_ID}\r\n"
        f"CSeq: 314159 {method}\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    )
    message = parse_message(raw.encode())
    assert isinstance(message, Response)
    return message


def _events(
    txn: ClientInviteTransaction
    | ClientNonInviteTransaction
    | ServerInviteTransaction
    | ServerNonInviteTransaction,
) -> list[Event]:
    out = []
    while (event := txn.next_event()) is not None:
        out.append(event)
    return out


def _state(
    txn: ClientInviteTransaction
    | ClientNonInviteTransaction
    | ServerInviteTransaction
    | ServerNonInviteTransaction,
) -> TransactionState:
    """Read the state through a call so mypy does not narrow it across steps."""
    return txn.state


def _codes(events: list[Event]) -> list[int]:
    return [e.response.code for e in events if isinstance(e, ResponseReceived)]


def _run_timers(
    txn: ClientInviteTransaction | ClientNonInviteTransaction | ServerInviteTransaction,
    until: float,
) -> list[float]:
    """Tick exactly at each deadline up to ``until``; return when something was sent."""
    sent_at: list[float] = []
    while (at := txn.next_timer_at()) is not None and at <= until:
        txn.handle_timer(at)
        sent_at.extend(at for _ in txn.messages_to_send())
    return sent_at


# --- timers -----------------------------------------------------------------------------


def test_timer_settings_derive_from_t1_t4() -> None:
    timers = TimerSettings(t1=0.25, t2=2.0, t4=3.0)
    assert (timers.timer_b, timers.timer_f, timers.timer_h, timers.timer_j) == (16, 16, 16, 16)
    assert (timers.timer_l, timers.timer_m) == (16, 16)
    assert (timers.timer_i, timers.timer_k) == (3.0, 3.0)
    assert timers.timer_d == 32.0


@pytest.mark.parametrize(("t1", "t2", "t4"), [(0, 4, 5), (0.5, 0.1, 5), (0.5, 4, 0)])
def test_timer_settings_reject_nonsense(t1: float, t2: float, t4: float) -> None:
    with pytest.raises(ValueError, match="invalid SIP timer settings"):
        TimerSettings(t1=t1, t2=t2, t4=t4)


# --- client INVITE ----------------------------------------------------------------------


def test_client_invite_100_180_200_moves_to_accepted_and_passes_2xx_retransmissions() -> None:
    invite = _request()
    txn = ClientInviteTransaction(invite, reliable=False)
    txn.start(0.0)
    assert txn.messages_to_send() == [invite]
    assert _state(txn) is TransactionState.CALLING

    txn.receive_response(_response(100, "Trying", to_tag=None), 0.1)
    assert _state(txn) is TransactionState.PROCEEDING
    # Proceeding stops timer A and B: nothing is ever retransmitted, nothing times out.
    assert txn.next_timer_at() is None
    txn.receive_response(_response(180, "Ringing"), 2.0)
    txn.receive_response(_response(200, "OK"), 5.0)
    assert _state(txn) is TransactionState.ACCEPTED
    assert _codes(_events(txn)) == [100, 180, 200]
    # The UAC core, not the transaction, ACKs a 2xx.
    assert txn.messages_to_send() == []
    assert txn.next_timer_at() == pytest.approx(5.0 + 32.0)  # timer M

    txn.receive_response(_response(200, "OK"), 6.0)
    txn.receive_response(_response(180, "Ringing"), 6.1)  # late provisional: absorbed
    assert _codes(_events(txn)) == [200]
    assert txn.messages_to_send() == []

    txn.handle_timer(36.9)
    assert _state(txn) is TransactionState.ACCEPTED
    txn.handle_timer(37.0)
    assert _state(txn) is TransactionState.TERMINATED
    assert _events(txn) == [TransactionTerminated()]


def test_client_invite_cancelled_without_final_response_times_out_after_64_t1() -> None:
    """RFC 3261 9.1: a peer that rang (Proceeding: timers A and B are off) and then never
    answers our CANCEL would keep the transaction forever; 64*T1 after the CANCEL it ends."""
    txn = ClientInviteTransaction(_request(), reliable=False)
    txn.start(0.0)
    txn.receive_response(_response(180, "Ringing"), 0.2)
    _events(txn)
    assert txn.next_timer_at() is None
    txn.cancel_sent(10.0)
    assert txn.next_timer_at() == pytest.approx(10.0 + 32.0)
    txn.cancel_sent(20.0)  # a second notice does not push the limit out
    txn.handle_timer(41.9)
    assert _state(txn) is TransactionState.PROCEEDING
    txn.handle_timer(42.0)
    assert _state(txn) is TransactionState.TERMINATED
    assert _events(txn) == [TransactionTimeout("cancel"), TransactionTerminated()]


def test_client_invite_487_after_cancel_clears_the_cancel_limit() -> None:
    txn = ClientInviteTransaction(_request(), reliable=True)
    txn.start(0.0)
    txn.receive_response(_response(180, "Ringing"), 0.2)
    txn.cancel_sent(5.0)
    txn.receive_response(_response(487, "Request Terminated"), 5.1)
    assert _state(txn) is TransactionState.TERMINATED  # reliable: no timer D
    assert _codes(_events(txn)) == [180, 487]
    assert txn.next_timer_at() is None
    txn.cancel_sent(6.0)  # too late to matter
    assert txn.next_timer_at() is None


def test_client_invite_486_builds_ack_and_absorbs_retransmitted_final() -> None:
    invite = _request()
    txn = ClientInviteTransaction(invite, reliable=False)
    txn.start(0.0)
    txn.messages_to_send()
    txn.receive_response(_response(180, "Ringing"), 1.0)
    txn.receive_response(_response(486, "Busy Here"), 3.0)
    assert _state(txn) is TransactionState.COMPLETED
    assert _codes(_events(txn)) == [180, 486]

    sent = txn.messages_to_send()
    assert len(sent) == 1
    wire = bytes(sent[0])
    ack = parse_message(wire)  # what actually goes on the wire
    assert isinstance(ack, Request)
    assert ack.method == "ACK"
    assert ack.uri == invite.uri
    assert len(ack.via) == 1
    assert ack.via[0] == invite.via[0]
    assert ack.via[0].parameters["branch"] == BRANCH
    assert ack.call_id == CALL_ID
    assert ack.from_address == invite.from_address
    assert ack.to_address.parameters["tag"] == "a6c85cf"
    assert ack.to_address.uri == invite.to_address.uri
    assert str(ack.cseq) == "314159 ACK"
    assert ack.route == invite.route
    assert ack.max_forwards == 70
    assert ack.content_length == 0
    assert ack.body == b""
    assert transaction_key(ack) == txn.key

    # Our ACK got lost: the server retransmits 486; we re-ACK without bothering the TU.
    txn.receive_response(_response(486, "Busy Here"), 4.0)
    assert txn.messages_to_send() == [wire]  # re-sent as the bytes sent first
    assert _events(txn) == []
    assert _state(txn) is TransactionState.COMPLETED

    assert txn.next_timer_at() == pytest.approx(3.0 + 32.0)  # timer D
    txn.handle_timer(35.0)
    assert _state(txn) is TransactionState.TERMINATED
    assert _events(txn) == [TransactionTerminated()]
    txn.receive_response(_response(486, "Busy Here"), 36.0)
    assert txn.messages_to_send() == []


def test_client_invite_timer_a_doubles_and_timer_b_times_out_at_32s() -> None:
    txn = ClientInviteTransaction(_request(), reliable=False)
    txn.start(10.0)
    assert len(txn.messages_to_send()) == 1
    sent_at = _run_timers(txn, until=100.0)
    # Intervals 0.5, 1, 2, 4, 8, 16 (A is uncapped); B fires at 64*T1 = 32 s.
    assert sent_at == [10.5, 11.5, 13.5, 17.5, 25.5, 41.5]
    assert _state(txn) is TransactionState.TERMINATED
    assert _events(txn) == [TransactionTimeout("B"), TransactionTerminated()]


def test_client_invite_late_tick_sends_one_retransmission_not_a_burst() -> None:
    txn = ClientInviteTransaction(_request(), reliable=False)
    txn.start(0.0)
    txn.messages_to_send()
    txn.handle_timer(3.0)  # A was due at 0.5; the event loop stalled
    assert len(txn.messages_to_send()) == 1
    assert txn.next_timer_at() == pytest.approx(4.0)  # rearmed 1 s (doubled) after now


def test_client_invite_over_tcp_never_retransmits_and_skips_timer_d() -> None:
    invite = _request(transport="TCP")
    txn = ClientInviteTransaction(invite, reliable=True)
    txn.start(0.0)
    assert txn.messages_to_send() == [invite]
    assert txn.next_timer_at() == pytest.approx(32.0)  # only B
    txn.receive_response(_response(486, "Busy Here", transport="TCP"), 1.0)
    [ack] = txn.messages_to_send()
    assert isinstance(ack, Request)
    assert ack.method == "ACK"
    assert _state(txn) is TransactionState.TERMINATED  # D = 0 on reliable transports
    assert _codes(_events(txn)[:1]) == [486]
    assert txn.next_timer_at() is None


def test_client_invite_tcp_timeout_without_any_response() -> None:
    txn = ClientInviteTransaction(_request(transport="TCP"), reliable=True)
    txn.start(0.0)
    txn.messages_to_send()
    assert _run_timers(txn, until=60.0) == []
    assert _events(txn) == [TransactionTimeout("B"), TransactionTerminated()]


def test_client_invite_rejects_foreign_response_and_use_before_start() -> None:
    txn = ClientInviteTransaction(_request(), reliable=False)
    with pytest.raises(TransactionError):
        txn.receive_response(_response(180, "Ringing"), 0.0)
    txn.start(0.0)
    with pytest.raises(TransactionError):
        txn.start(0.0)
    with pytest.raises(TransactionError):
        txn.receive_response(_response(180, "Ringing", branch="z9hG4bKother"), 0.1)
    with pytest.raises(TransactionError):
        ClientInviteTransaction(_request("OPTIONS"), reliable=False)


def test_transport_error_terminates_once() -> None:
    txn = ClientInviteTransaction(_request(), reliable=False)
    txn.start(0.0)
    txn.transport_error(0.01)
    assert _state(txn) is TransactionState.TERMINATED
    assert txn.next_timer_at() is None
    txn.transport_error(0.02)
    txn.handle_timer(100.0)
    assert _events(txn) == [TransportFailure(), TransactionTerminated()]

    server = ServerNonInviteTransaction(_request("BYE"), reliable=True)
    server.transport_error(0.0)
    assert _events(server) == [TransportFailure(), TransactionTerminated()]
    with pytest.raises(TransactionError):
        server.send_response(create_response(_request("BYE"), 200), 0.1)


# --- client non-INVITE ------------------------------------------------------------------


def test_client_non_invite_timer_e_is_capped_at_t2_and_f_times_out() -> None:
    txn = ClientNonInviteTransaction(_request("OPTIONS"), reliable=False)
    txn.start(0.0)
    assert len(txn.messages_to_send()) == 1
    sent_at = _run_timers(txn, until=100.0)
    # 0.5, 1, 2, 4, then T2 = 4 s forever; F at 32 s.
    assert sent_at == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert _events(txn) == [TransactionTimeout("F"), TransactionTerminated()]


def test_client_non_invite_proceeding_retransmits_every_t2_then_completes() -> None:
    request = _request("OPTIONS")
    txn = ClientNonInviteTransaction(request, reliable=False)
    txn.start(0.0)
    txn.messages_to_send()
    txn.receive_response(_response(100, "Trying", method="OPTIONS", to_tag=None), 0.2)
    assert _state(txn) is TransactionState.PROCEEDING
    # The E already armed for 0.5 still fires; after that, every T2.
    assert _run_timers(txn, until=9.0) == [0.5, 4.5, 8.5]
    txn.receive_response(_response(200, "OK", method="OPTIONS"), 9.0)
    assert _state(txn) is TransactionState.COMPLETED
    assert _codes(_events(txn)) == [100, 200]
    txn.receive_response(_response(200, "OK", method="OPTIONS"), 9.5)  # absorbed
    assert _events(txn) == []
    assert txn.messages_to_send() == []
    assert txn.next_timer_at() == pytest.approx(14.0)  # timer K = T4
    txn.handle_timer(14.0)
    assert _events(txn) == [TransactionTerminated()]


def test_client_non_invite_over_tcp_terminates_on_final() -> None:
    txn = ClientNonInviteTransaction(_request("BYE", transport="TCP"), reliable=True)
    txn.start(0.0)
    assert len(txn.messages_to_send()) == 1
    assert txn.next_timer_at() == pytest.approx(32.0)  # F only, no E
    txn.receive_response(_response(200, "OK", method="BYE", transport="TCP"), 0.3)
    assert _state(txn) is TransactionState.TERMINATED  # K = 0
    assert _codes(_events(txn)[:1]) == [200]
    assert txn.next_timer_at() is None


# --- server INVITE ----------------------------------------------------------------------


def test_server_invite_486_retransmits_with_timer_g_until_ack() -> None:
    invite = _request()
    txn = ServerInviteTransaction(invite, reliable=False)
    assert _state(txn) is TransactionState.PROCEEDING
    assert txn.messages_to_send() == []  # no automatic 100 Trying
    txn.receive_request(_request(), 0.2)  # retransmission with nothing to repeat
    assert txn.messages_to_send() == []

    ringing = create_response(invite, 180, to_tag="srv1")
    txn.send_response(ringing, 0.5)
    assert txn.messages_to_send() == [ringing]
    txn.receive_request(_request(), 0.7)
    assert txn.messages_to_send() == [ringing]

    busy = create_response(invite, 486, to_tag="srv1")
    txn.send_response(busy, 1.0)
    assert _state(txn) is TransactionState.COMPLETED
    assert txn.messages_to_send() == [busy]
    # G: 0.5, 1, 2, 4, 4 ... (capped at T2)
    assert _run_timers(txn, until=12.0) == [1.5, 2.5, 4.5, 8.5]
    txn.receive_request(_request(), 12.2)  # INVITE retransmission in Completed
    assert txn.messages_to_send() == [to_wire(busy)]

    ack = _request("ACK", to_tag="srv1")
    txn.receive_request(ack, 12.3)
    assert _state(txn) is TransactionState.CONFIRMED
    assert _events(txn) == [AckReceived(ack)]
    txn.receive_request(_request("ACK", to_tag="srv1"), 12.4)  # absorbed
    txn.receive_request(_request(), 12.5)  # absorbed too
    assert txn.messages_to_send() == []
    assert _events(txn) == []
    assert txn.next_timer_at() == pytest.approx(12.3 + 5.0)  # timer I = T4
    txn.handle_timer(17.3)
    assert _events(txn) == [TransactionTerminated()]


def test_server_invite_timer_h_fires_without_ack() -> None:
    invite = _request()
    txn = ServerInviteTransaction(invite, reliable=False)
    txn.send_response(create_response(invite, 603, to_tag="srv1"), 0.0)
    txn.messages_to_send()
    sent_at = _run_timers(txn, until=100.0)
    assert sent_at == [0.5, 1.5, 3.5, 7.5, 11.5, 15.5, 19.5, 23.5, 27.5, 31.5]
    assert _events(txn) == [TransactionTimeout("H"), TransactionTerminated()]


def test_server_invite_over_tcp_has_no_g_and_no_i() -> None:
    invite = _request(transport="TCP")
    txn = ServerInviteTransaction(invite, reliable=True)
    txn.send_response(create_response(invite, 486, to_tag="srv1"), 0.0)
    assert txn.next_timer_at() == pytest.approx(32.0)  # H only
    txn.receive_request(_request("ACK", transport="TCP", to_tag="srv1"), 0.1)
    assert _state(txn) is TransactionState.TERMINATED
    assert [type(e) for e in _events(txn)] == [AckReceived, TransactionTerminated]


def test_server_invite_2xx_goes_to_accepted_and_tu_retransmits() -> None:
    invite = _request()
    txn = ServerInviteTransaction(invite, reliable=False)
    ok = create_response(invite, 200, to_tag="srv1")
    txn.send_response(ok, 1.0)
    assert _state(txn) is TransactionState.ACCEPTED
    assert txn.messages_to_send() == [ok]
    assert txn.next_timer_at() == pytest.approx(33.0)  # only timer L, no G
    txn.receive_request(_request(), 1.2)  # retransmitted INVITE absorbed (RFC 6026)
    assert txn.messages_to_send() == []
    txn.send_response(ok, 1.5)  # the TU's own 2xx retransmission
    assert txn.messages_to_send() == [ok]
    with pytest.raises(TransactionError):
        txn.send_response(create_response(invite, 486, to_tag="srv1"), 2.0)
    # An ACK reusing the INVITE branch is handed up, not swallowed.
    ack = _request("ACK", to_tag="srv1")
    txn.receive_request(ack, 2.0)
    assert _events(txn) == [AckReceived(ack)]
    txn.handle_timer(33.0)
    assert _state(txn) is TransactionState.TERMINATED
    assert _events(txn) == [TransactionTerminated()]


def test_server_invite_can_send_tells_what_is_still_possible() -> None:
    """The TU asks before answering (a CANCEL may have ended the INVITE meanwhile, or
    timer L the Accepted state) rather than catching TransactionError."""
    invite = _request()
    txn = ServerInviteTransaction(invite, reliable=True)
    assert txn.can_send(180)
    assert txn.can_send(200)
    assert txn.can_send(487)
    txn.send_response(create_response(invite, 487, to_tag="srv1"), 0.0)
    assert not txn.can_send(200)
    assert not txn.can_send(180)
    accepted = ServerInviteTransaction(invite, reliable=False)
    accepted.send_response(create_response(invite, 200, to_tag="srv1"), 0.0)
    assert accepted.can_send(200)
    assert not accepted.can_send(486)
    accepted.handle_timer(32.0)  # timer L
    assert _state(accepted) is TransactionState.TERMINATED
    assert not accepted.can_send(200)
    bye = _request("BYE")
    non_invite = ServerNonInviteTransaction(bye, reliable=True)
    assert non_invite.can_send(200)
    non_invite.send_response(create_response(bye, 200), 0.0)
    assert not non_invite.can_send(200)


def test_server_transactions_reject_foreign_messages() -> None:
    invite = _request()
    txn = ServerInviteTransaction(invite, reliable=False)
    with pytest.raises(TransactionError):
        txn.send_response(create_response(_request(branch="z9hG4bKother"), 180), 0.0)
    with pytest.raises(TransactionError):
        txn.receive_request(_request("CANCEL"), 0.0)
    with pytest.raises(TransactionError):
        ServerNonInviteTransaction(invite, reliable=False)


# --- server non-INVITE ------------------------------------------------------------------


def test_server_non_invite_answers_retransmissions_until_timer_j() -> None:
    bye = _request("BYE")
    txn = ServerNonInviteTransaction(bye, reliable=False)
    assert _state(txn) is TransactionState.TRYING
    txn.receive_request(_request("BYE"), 0.1)  # Trying: nothing to repeat
    assert txn.messages_to_send() == []
    ok = create_response(bye, 200, to_tag="srv1")
    txn.send_response(ok, 0.2)
    assert _state(txn) is TransactionState.COMPLETED
    assert txn.messages_to_send() == [ok]
    txn.receive_request(_request("BYE"), 1.0)
    assert txn.messages_to_send() == [to_wire(ok)]
    with pytest.raises(TransactionError):
        txn.send_response(create_response(bye, 500), 1.1)
    assert txn.next_timer_at() == pytest.approx(32.2)  # timer J = 64*T1
    txn.handle_timer(32.2)
    assert _state(txn) is TransactionState.TERMINATED
    assert _events(txn) == [TransactionTerminated()]
    txn.receive_request(_request("BYE"), 33.0)
    assert txn.messages_to_send() == []


def test_server_non_invite_provisional_then_final_over_tcp() -> None:
    request = _request("REGISTER", transport="TCP")
    txn = ServerNonInviteTransaction(request, reliable=True)
    trying = create_response(request, 100)
    txn.send_response(trying, 0.0)
    assert _state(txn) is TransactionState.PROCEEDING
    txn.receive_request(_request("REGISTER", transport="TCP"), 0.1)
    assert txn.messages_to_send() == [trying, trying]
    txn.send_response(create_response(request, 200), 0.2)
    assert _state(txn) is TransactionState.TERMINATED  # J = 0
    assert _events(txn) == [TransactionTerminated()]


# --- matching ---------------------------------------------------------------------------


def test_transaction_key_matching_rules() -> None:
    invite_key = transaction_key(_request())
    assert transaction_key(_request("ACK", to_tag="x")) == invite_key  # ACK for non-2xx
    assert transaction_key(_response(486, "Busy Here")) == invite_key
    cancel = _request("CANCEL")
    assert transaction_key(cancel) != invite_key
    assert transaction_key(cancel) == transaction_key(_response(200, "OK", method="CANCEL"))
    assert transaction_key(cancel, method="INVITE") == invite_key  # what CANCEL targets
    # ACK for a 2xx is its own transaction with a new branch.
    assert transaction_key(_request("ACK", branch="z9hG4bKnew")) != invite_key
    assert transaction_key(_request("OPTIONS")) != invite_key


def test_transaction_key_sent_by_and_default_port() -> None:
    raw = (
        "OPTIONS sip:bob@biloxi.example.com SIP/2.0\r\n"
        "Via: SIP/2.0/UDP {sent_by};branch=z9hG4bKabc\r\n"
        "To: <sip:bob@biloxi.example.com>\r\n"
        "From: <sip:alice@atlanta.example.com>;tag=1\r\n"
        "Call-ID: c1\r\n"
        "CSeq: 1 OPTIONS\r\n"
        "Content-Length: 0\r\n\r\n"
    )

    def key(sent_by: str) -> str:
        message = parse_message(raw.format(sent_by=sent_by).encode())
        assert isinstance(message, Request)
        return transaction_key(message)

    assert key("Host.Example.com") == key("host.example.com:5060")
    assert key("host.example.com:5070") != key("host.example.com")


def test_transaction_key_falls_back_for_rfc2543_branches() -> None:
    invite = _request(branch="legacy1")
    ack = _request("ACK", branch="legacy1", to_tag="x")
    assert transaction_key(invite) == transaction_key(ack)
    assert transaction_key(invite) != transaction_key(_request("BYE", branch="legacy1"))
    txn = ServerInviteTransaction(invite, reliable=False)
    txn.send_response(create_response(invite, 486, to_tag="x"), 0.0)
    txn.receive_request(ack, 0.1)
    assert _state(txn) is TransactionState.CONFIRMED
