"""Finished transactions linger (timers D, I, J, K, L, M) holding no parsed message.

Each test keeps only a weak reference to the messages it handed the transaction, drops its
own strong ones and checks the message is gone while the transaction still absorbs or
answers retransmissions. The endpoint tests do the same over UDP on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

from sipmessage import URI, Request, Response

from gateway.endpoint import ServerContext, SipEndpoint
from gateway.sip.message import create_response, parse_message, to_wire
from gateway.sip.transaction import (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    ResponseReceived,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    TimerSettings,
    TransactionState,
)
from gateway.transport import Peer
from tests.unit.test_transaction import _events, _request, _response


def _gone(ref: weakref.ref[Request] | weakref.ref[Response]) -> bool:
    """True when nothing but cycles kept the message (collected), or nothing at all."""
    if ref() is None:
        return True
    gc.collect()
    return ref() is None


def test_client_invite_accepted_keeps_no_invite_and_still_passes_2xx_retransmissions() -> None:
    invite = _request()
    seen = weakref.ref(invite)
    txn = ClientInviteTransaction(invite, reliable=False)
    del invite
    txn.start(0.0)
    txn.messages_to_send()
    txn.receive_response(_response(200, "OK"), 1.0)
    _events(txn)
    assert txn.state is TransactionState.ACCEPTED
    assert not txn.holds_message
    assert seen() is None  # by reference counting alone: not even a cycle kept it
    txn.receive_response(_response(200, "OK"), 2.0)  # the ACK was lost
    events = _events(txn)
    assert [type(e) for e in events] == [ResponseReceived]  # the UAC core re-ACKs it


def test_client_invite_completed_keeps_only_the_ack_bytes_and_resends_them() -> None:
    invite = _request()
    seen = weakref.ref(invite)
    txn = ClientInviteTransaction(invite, reliable=False)
    del invite
    txn.start(0.0)
    txn.messages_to_send()
    busy = _response(486, "Busy Here")
    busy_seen = weakref.ref(busy)
    txn.receive_response(busy, 1.0)
    del busy
    _events(txn)
    [ack] = txn.messages_to_send()
    assert isinstance(ack, Request)
    ack_seen = weakref.ref(ack)
    wire = to_wire(ack)
    del ack
    assert txn.state is TransactionState.COMPLETED
    assert not txn.holds_message
    assert _gone(seen)
    assert _gone(busy_seen)
    assert _gone(ack_seen)
    txn.receive_response(_response(486, "Busy Here"), 2.0)
    assert txn.messages_to_send() == [wire]
    assert _events(txn) == []


def test_client_non_invite_completed_absorbs_retransmitted_final() -> None:
    bye = _request("BYE")
    seen = weakref.ref(bye)
    txn = ClientNonInviteTransaction(bye, reliable=False)
    del bye
    txn.start(0.0)
    txn.messages_to_send()
    txn.receive_response(_response(200, "OK", method="BYE"), 0.5)
    _events(txn)
    assert txn.state is TransactionState.COMPLETED
    assert not txn.holds_message
    assert _gone(seen)
    txn.receive_response(_response(200, "OK", method="BYE"), 1.0)
    assert txn.messages_to_send() == []
    assert _events(txn) == []
    assert txn.next_timer_at() == 0.5 + TimerSettings().timer_k


def test_server_invite_completed_resends_the_final_bytes_on_timer_g_and_retransmits() -> None:
    invite = _request()
    seen = weakref.ref(invite)
    txn = ServerInviteTransaction(invite, reliable=False)
    busy = create_response(invite, 486, to_tag="srv1")
    del invite
    busy_seen = weakref.ref(busy)
    wire = to_wire(busy)
    txn.send_response(busy, 0.0)
    assert txn.messages_to_send() == [busy]  # the first send is the TU's own message
    del busy
    assert not txn.holds_message
    assert _gone(seen)
    assert _gone(busy_seen)
    txn.handle_timer(0.5)  # timer G
    assert txn.messages_to_send() == [wire]
    txn.receive_request(_request(), 0.7)  # the INVITE again: the 486 did not arrive
    assert txn.messages_to_send() == [wire]


def test_server_non_invite_completed_resends_the_final_bytes() -> None:
    bye = _request("BYE")
    seen = weakref.ref(bye)
    txn = ServerNonInviteTransaction(bye, reliable=False)
    ok = create_response(bye, 200, to_tag="srv1")
    del bye
    ok_seen = weakref.ref(ok)
    wire = to_wire(ok)
    txn.send_response(ok, 0.0)
    txn.messages_to_send()
    del ok
    assert txn.state is TransactionState.COMPLETED
    assert not txn.holds_message
    assert _gone(seen)
    assert _gone(ok_seen)
    txn.receive_request(_request("BYE"), 1.0)
    assert txn.messages_to_send() == [wire]


def test_server_proceeding_keeps_its_provisional_until_the_final() -> None:
    invite = _request()
    txn = ServerInviteTransaction(invite, reliable=False)
    txn.send_response(create_response(invite, 180, to_tag="srv1"), 0.0)
    txn.messages_to_send()
    assert txn.holds_message  # a provisional is re-sent as it is until the final
    txn.send_response(create_response(invite, 200, to_tag="srv1"), 0.1)
    assert txn.state is TransactionState.ACCEPTED
    assert not txn.holds_message  # the TU, not the transaction, re-sends a 2xx


# -- the endpoint over UDP ----------------------------------------------------------------


def _raw(method: str, port: int, branch: str, *, to_tag: str | None = None) -> bytes:
    to = "<sip:ackline@127.0.0.1>" + (f";tag={to_tag}" if to_tag else "")
    return (
        f"{method} sip:ackline@127.0.0.1 SIP/2.0\r\n"
        f"Via: SIP/2.0/UDP 127.0.0.1:{port};branch={branch};rport\r\n"
        "Max-Forwards: 70\r\n"
        f"To: {to}\r\n"
        "From: <sip:peer@127.0.0.1>;tag=peer1\r\n"
        "Call-ID: linger-1@127.0.0.1\r\n"
        f"CSeq: 7 {method}\r\n"
        "Content-Length: 0\r\n"
        "\r\n"
    ).encode()


async def _recv(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 65535), 5.0)


async def test_endpoint_lingering_server_entry_keeps_no_request_and_re_answers() -> None:
    contexts: list[ServerContext] = []

    def on_request(ctx: ServerContext) -> None:
        contexts.append(ctx)
        ctx.respond(200, to_tag="gw1")

    endpoint = SipEndpoint(on_request=on_request)
    await endpoint.listen(udp_port=0)
    _, port = endpoint.transport.local_address("udp")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        bye = _raw("BYE", sock.getsockname()[1], "z9hG4bKlinger1")
        sock.sendto(bye, ("127.0.0.1", port))
        first = await _recv(sock)
        assert first.startswith(b"SIP/2.0 200")
        [ctx] = contexts
        seen = weakref.ref(ctx.request)
        contexts.clear()
        del ctx
        [entry] = endpoint._servers.values()  # lingering for timer J
        assert entry.context is None
        assert not entry.transaction.holds_message
        assert _gone(seen)
        sock.sendto(bye, ("127.0.0.1", port))  # our 200 was lost: the peer retransmits
        assert await _recv(sock) == first
        assert contexts == []  # absorbed: the handler did not see it again
    finally:
        sock.close()
        await endpoint.close()


async def test_endpoint_client_invite_rejected_keeps_only_ack_bytes_and_re_acks() -> None:
    endpoint = SipEndpoint()
    await endpoint.listen(udp_port=0)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    peer = Peer("udp", "127.0.0.1", sock.getsockname()[1])
    try:
        invite = Request("INVITE", URI.parse("sip:peer@127.0.0.1"))
        invite.via = [endpoint.via("udp")]
        invite.max_forwards = 70
        invite.headers.set("From", "<sip:ackline@127.0.0.1>;tag=gw1")
        invite.headers.set("To", "<sip:peer@127.0.0.1>")
        invite.call_id = "linger-2@127.0.0.1"
        invite.headers.set("CSeq", "1 INVITE")
        seen = weakref.ref(invite)
        finals: list[int] = []

        def on_event(event: object) -> None:
            if isinstance(event, ResponseReceived):
                finals.append(event.response.code)

        endpoint.start_client_transaction(invite, peer, on_event)
        del invite
        received = parse_message(await _recv(sock))
        assert isinstance(received, Request)
        assert received.method == "INVITE"
        busy = to_wire(create_response(received, 486, to_tag="peer1"))
        sock.sendto(busy, endpoint.transport.local_address("udp"))
        ack = await _recv(sock)
        assert ack.startswith(b"ACK ")
        assert finals == [486]
        [entry] = endpoint._clients.values()  # lingering for timer D
        assert entry.transaction.state is TransactionState.COMPLETED
        assert not entry.transaction.holds_message
        assert _gone(seen)
        sock.sendto(busy, endpoint.transport.local_address("udp"))  # our ACK was lost
        assert await _recv(sock) == ack
        assert finals == [486]
    finally:
        sock.close()
        await endpoint.close()
