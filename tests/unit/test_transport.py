"""SipTransport over real loopback sockets, plus the sans-IO stream framer.

Two transports talk to each other (or a raw socket plays a misbehaving peer) so framing,
RFC 3581 Via stamping, response routing and robustness are checked end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from sipmessage import URI, Address, CSeq, Parameters

from gateway.sip.message import (
    BadRequest,
    Request,
    Response,
    Via,
    create_response,
    new_branch,
    new_call_id,
    new_tag,
    parse_message,
)
from gateway.transport import (
    FramingError,
    Peer,
    SipStreamFramer,
    SipTransport,
    StreamEvent,
    TcpLimits,
    TransportError,
)

LOOPBACK = "127.0.0.1"
WAIT = 3.0


def ipv6_loopback_available() -> bool:
    """True when ::1 can be bound, so IPv6 tests skip only on hosts without it."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def options(
    *,
    via_host: str = LOOPBACK,
    via_port: int | None = 5060,
    transport: str = "UDP",
    rport: bool = True,
    call_id: str | None = None,
    body: bytes = b"",
) -> Request:
    """A minimal valid OPTIONS request built through sipmessage."""
    request = Request("OPTIONS", URI.parse("sip:gateway@example.com"))
    params = (
        Parameters(branch=new_branch(), rport=None) if rport else Parameters(branch=new_branch())
    )
    request.via = [Via(transport=transport, host=via_host, port=via_port, parameters=params)]
    request.headers.set("Max-Forwards", "70")
    request.from_address = Address.parse(f"<sip:alice@example.com>;tag={new_tag()}")
    request.to_address = Address.parse("<sip:gateway@example.com>")
    request.call_id = call_id or new_call_id("example.com")
    request.cseq = CSeq(1, "OPTIONS")
    request.body = body
    request.content_length = len(body)
    return request


def raw(request: Request) -> bytes:
    return bytes(request)


class Node:
    """A transport whose handler queues everything it receives."""

    def __init__(
        self,
        *,
        max_message_size: int = 65535,
        tcp_limits: TcpLimits | None = None,
        on_bad_request: Callable[[BadRequest, Peer], None] | None = None,
    ) -> None:
        self.inbox: asyncio.Queue[tuple[Request | Response, Peer]] = asyncio.Queue()
        self.fail_next = 0
        self.transport = SipTransport(
            self.handle,
            max_message_size=max_message_size,
            tcp_limits=tcp_limits,
            on_bad_request=on_bad_request,
        )

    def handle(self, message: Request | Response, peer: Peer) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("handler bug")
        self.inbox.put_nowait((message, peer))

    async def next(self, timeout: float = WAIT) -> tuple[Request | Response, Peer]:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def nothing_more(self) -> None:
        await asyncio.sleep(0.05)
        assert self.inbox.empty()

    def udp(self) -> Peer:
        host, port = self.transport.local_address("udp")
        return Peer("udp", host, port)

    def tcp(self) -> Peer:
        host, port = self.transport.local_address("tcp")
        return Peer("tcp", host, port)


async def make_node(
    host: str = LOOPBACK,
    *,
    max_message_size: int = 65535,
    tcp_limits: TcpLimits | None = None,
    on_bad_request: Callable[[BadRequest, Peer], None] | None = None,
) -> Node:
    node = Node(
        max_message_size=max_message_size, tcp_limits=tcp_limits, on_bad_request=on_bad_request
    )
    await node.transport.listen_udp(host, 0)
    await node.transport.listen_tcp(host, 0)
    return node


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node]]:
    a = await make_node()
    b = await make_node(max_message_size=2048)
    yield a, b
    await a.transport.close()
    await b.transport.close()


@contextlib.contextmanager
def udp_socket(family: int = socket.AF_INET, host: str = LOOPBACK) -> Iterator[socket.socket]:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


async def recv_datagram(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    return await asyncio.wait_for(loop.sock_recv(sock, 65535), WAIT)


async def tcp_client(peer: Peer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(peer.host, peer.port)


async def wait_until(condition: Callable[[], bool]) -> None:
    for _ in range(300):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def top_params(message: Request | Response) -> dict[str, str | None]:
    return dict(message.via[0].parameters)


# -- UDP ------------------------------------------------------------------------------


async def test_udp_options_round_trip_with_rport(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    _a_host, a_port = a.transport.local_address("udp")
    request = options(via_host="client.invalid", via_port=9, rport=True)
    await a.transport.send(request, b.udp())

    received, source = await b.next()
    assert isinstance(received, Request)
    assert source == Peer("udp", LOOPBACK, a_port)
    assert top_params(received)["received"] == LOOPBACK
    assert top_params(received)["rport"] == str(a_port)

    # Sent-by is unresolvable and port 9: only received/rport can route this back to a.
    await b.transport.send_response(create_response(received, 200), source)
    response, from_peer = await a.next()
    assert isinstance(response, Response)
    assert response.code == 200
    assert response.call_id == request.call_id
    assert from_peer == b.udp()
    assert a.transport.stats.sent == 1
    assert a.transport.stats.received == 1
    assert b.transport.stats.sent == 1
    assert b.transport.stats.received == 1


async def test_udp_response_without_rport_goes_to_received_and_sent_by_port(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    _, a_port = a.transport.local_address("udp")
    with udp_socket() as sock:
        # Sent from another port: without rport the reply must follow Via, not the source.
        request = options(via_host="client.invalid", via_port=a_port, rport=False)
        sock.sendto(raw(request), (b.udp().host, b.udp().port))
        received, source = await b.next()
        assert source.port == sock.getsockname()[1]
        assert top_params(received)["received"] == LOOPBACK
        assert "rport" not in top_params(received)
        assert isinstance(received, Request)
        await b.transport.send_response(create_response(received, 200), source)
    response, _ = await a.next()
    assert isinstance(response, Response)
    assert response.call_id == request.call_id


async def test_udp_rport_reply_reaches_the_source_port(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    with udp_socket() as sock:
        request = options(via_host=LOOPBACK, via_port=9, rport=True)
        sock.sendto(raw(request), (b.udp().host, b.udp().port))
        received, source = await b.next()
        # RFC 3581: received is present even though it equals sent-by.
        assert top_params(received)["received"] == LOOPBACK
        assert isinstance(received, Request)
        await b.transport.send_response(create_response(received, 180), source)
        reply = parse_message(await recv_datagram(sock))
    assert isinstance(reply, Response)
    assert reply.code == 180


async def test_no_received_when_sent_by_matches_and_no_rport(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    _, a_port = a.transport.local_address("udp")
    await a.transport.send(options(via_port=a_port, rport=False), b.udp())
    received, _ = await b.next()
    assert "received" not in top_params(received)


async def test_udp_bytes_beyond_content_length_ignored(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    with udp_socket() as sock:
        data = raw(options(body=b"hello")) + b"\xff\xfe trailing junk"
        sock.sendto(data, (b.udp().host, b.udp().port))
        received, _ = await b.next()
    assert received.body == b"hello"
    assert b.transport.stats.dropped_malformed == 0


async def test_udp_keepalives_ignored(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    with udp_socket() as sock:
        for keepalive in (b"\r\n\r\n", b"\r\n"):
            sock.sendto(keepalive, (b.udp().host, b.udp().port))
        good = options()
        sock.sendto(raw(good), (b.udp().host, b.udp().port))
        received, _ = await b.next()
    assert received.call_id == good.call_id
    stats = b.transport.stats
    assert (stats.received, stats.dropped_malformed, stats.dropped_oversize) == (1, 0, 0)


async def test_udp_malformed_and_oversize_dropped_then_good_delivered(
    nodes: tuple[Node, Node],
) -> None:
    _, b = nodes
    valid = raw(options())
    no_call_id = valid.replace(b"Call-ID:", b"X-Call-ID:")
    truncated = raw(options(body=b"0123456789"))[:-4]
    bad_cl = valid.replace(b"Content-Length: 0", b"Content-Length: zero")
    non_utf8 = valid.replace(b"Max-Forwards: 70", b"Max-Forwards: \xc3\x28")
    oversize = raw(options(body=b"x" * 3000))
    bad = [b"\x00\x01garbage", no_call_id, truncated, bad_cl, non_utf8, valid[:40]]
    with udp_socket() as sock:
        for datagram in [*bad, oversize]:
            sock.sendto(datagram, (b.udp().host, b.udp().port))
        good = options()
        sock.sendto(raw(good), (b.udp().host, b.udp().port))
        received, _ = await b.next()
    assert received.call_id == good.call_id
    assert b.transport.stats.dropped_malformed == len(bad)
    assert b.transport.stats.dropped_oversize == 1
    assert b.transport.stats.received == 1
    await b.nothing_more()


async def test_an_oversize_flood_is_counted_in_full_and_logged_once(
    nodes: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    """A peer can send oversized datagrams as fast as it likes: each is counted, the log
    gets one line per interval instead of one per datagram."""
    _, b = nodes
    oversize = raw(options(body=b"x" * 3000))
    with caplog.at_level(logging.WARNING, logger="gateway.transport"), udp_socket() as sock:
        for i in range(50):
            sock.sendto(oversize, (b.udp().host, b.udp().port))
            if i % 10 == 9:
                await asyncio.sleep(0.01)  # within the socket's receive buffer
        good = options()
        sock.sendto(raw(good), (b.udp().host, b.udp().port))
        received, _ = await b.next()
    assert received.call_id == good.call_id
    assert b.transport.stats.dropped_oversize == 50
    lines = [r for r in caplog.records if "oversized" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]


async def test_request_without_usable_top_via_is_dropped_and_counted(
    nodes: tuple[Node, Node], caplog: pytest.LogCaptureFixture
) -> None:
    """An empty first Via header beside a good one used to raise IndexError in the Via
    stamping (logged as a parser failure); it is a malformed request like any other."""
    _, b = nodes
    valid = raw(options())
    empty_first = valid.replace(b"Via: ", b"Via: \r\nVia: ", 1)
    with udp_socket() as sock:
        sock.sendto(empty_first, (b.udp().host, b.udp().port))
        good = options()
        sock.sendto(raw(good), (b.udp().host, b.udp().port))
        received, _ = await b.next()
    assert received.call_id == good.call_id
    assert b.transport.stats.dropped_malformed == 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_answerable_bad_request_is_handed_up_with_its_via_stamped() -> None:
    refused: list[tuple[BadRequest, Peer]] = []
    node = await make_node(on_bad_request=lambda bad, peer: refused.append((bad, peer)))
    try:
        mismatch = raw(options()).replace(b"1 OPTIONS", b"1 BYE")
        with udp_socket() as sock:
            sock.sendto(mismatch, (node.udp().host, node.udp().port))
            await wait_until(lambda: bool(refused))
            port = sock.getsockname()[1]
        [(bad, peer)] = refused
        assert bad.rejection.phrase == "CSeq method does not match the request"
        assert peer == Peer("udp", LOOPBACK, port)
        assert top_params(bad.request)["rport"] == str(port)
        assert node.transport.stats.rejected_malformed == 1
        assert node.transport.stats.dropped_malformed == 0
    finally:
        await node.transport.close()


async def test_handler_exception_does_not_kill_udp(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    b.fail_next = 1
    await a.transport.send(options(call_id="first"), b.udp())
    await a.transport.send(options(call_id="second"), b.udp())
    received, _ = await b.next()
    assert received.call_id == "second"
    assert b.transport.stats.handler_errors == 1


async def test_udp_send_errors(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    fresh = SipTransport(lambda m, p: None)
    with pytest.raises(TransportError):
        await fresh.send(options(), Peer("udp", LOOPBACK, 5060))
    with pytest.raises(TransportError):
        await a.transport.send(options(), Peer("sctp", LOOPBACK, 5060))
    with pytest.raises(TransportError):
        await a.transport.send(options(), Peer("udp", LOOPBACK, 0))
    with pytest.raises(TransportError):
        await a.transport.send(options(body=b"x" * 70000), Peer("udp", LOOPBACK, 5060))
    assert a.transport.stats.sent == 0


# -- TCP ------------------------------------------------------------------------------


async def test_tcp_round_trip_reuses_the_connection(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    _, a_tcp_port = a.transport.local_address("tcp")
    request = options(transport="TCP", via_port=a_tcp_port)
    await a.transport.send(request, b.tcp())
    received, source = await b.next()
    assert isinstance(received, Request)
    assert source.transport == "tcp"
    assert source.port != a_tcp_port
    assert top_params(received)["rport"] == str(source.port)

    await b.transport.send_response(create_response(received, 200), source)
    response, _ = await a.next()
    assert isinstance(response, Response)
    assert response.call_id == request.call_id

    # A new request from b to the inbound peer goes down the same connection.
    await b.transport.send(options(transport="TCP", call_id="reverse"), source)
    reverse, _ = await a.next()
    assert reverse.call_id == "reverse"
    await a.transport.send(options(transport="TCP", call_id="again"), b.tcp())
    again, _ = await b.next()
    assert again.call_id == "again"
    assert a.transport.stats.tcp_connections == 1
    assert b.transport.stats.tcp_connections == 1


async def test_tcp_concurrent_sends_share_one_connect(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    await asyncio.gather(*(a.transport.send(options(transport="TCP"), b.tcp()) for _ in range(5)))
    for _ in range(5):
        await b.next()
    assert a.transport.stats.tcp_connections == 1


async def test_tcp_response_falls_back_to_sent_by_when_connection_gone(
    nodes: tuple[Node, Node],
) -> None:
    a, b = nodes
    _, a_tcp_port = a.transport.local_address("tcp")
    _reader, writer = await tcp_client(b.tcp())
    request = options(transport="TCP", via_host="client.invalid", via_port=a_tcp_port)
    writer.write(raw(request))
    await writer.drain()
    received, source = await b.next()
    writer.close()
    await writer.wait_closed()
    # Private lookup: the only way to know b has noticed the close before replying.
    await wait_until(lambda: not b.transport.has_connection(source))

    assert isinstance(received, Request)
    await b.transport.send_response(create_response(received, 200), source)
    response, _ = await a.next()
    assert isinstance(response, Response)
    assert response.call_id == request.call_id
    assert b.transport.stats.tcp_connections == 2  # the raw client's, then the fallback


async def test_tcp_message_split_byte_by_byte(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    _reader, writer = await tcp_client(b.tcp())
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    request = options(transport="TCP", body=b"v=0\r\n")
    for byte in raw(request):
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.0005)
    received, _ = await b.next()
    assert received.call_id == request.call_id
    assert received.body == b"v=0\r\n"
    writer.close()


async def test_tcp_several_messages_in_one_write(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    _reader, writer = await tcp_client(b.tcp())
    ids = [f"pipelined-{i}" for i in range(4)]
    blob = b"\r\n".join(raw(options(transport="TCP", call_id=i, body=b"ab")) for i in ids)
    writer.write(blob)
    await writer.drain()
    got = [(await b.next())[0].call_id for _ in ids]
    assert got == ids
    writer.close()


async def test_tcp_keepalive_ping_gets_pong(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    reader, writer = await tcp_client(b.tcp())
    writer.write(b"\r\n\r\n")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
    writer.write(raw(options(transport="TCP", call_id="after-ping")))
    await writer.drain()
    received, _ = await b.next()
    assert received.call_id == "after-ping"
    writer.close()


async def test_tcp_stray_crlfs_are_ignored_and_not_answered(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    reader, writer = await tcp_client(b.tcp())
    writer.write(b"\r\n" + raw(options(transport="TCP", call_id="after-crlf")) + b"\r\n")
    await writer.drain()
    received, _ = await b.next()
    assert received.call_id == "after-crlf"
    writer.write(b"\r\n\r\n")  # a ping, after the trailing stray CRLF: three CRLFs
    await writer.drain()
    # One ping answered with one pong; the CRLF left over is ignored, not answered.
    assert await asyncio.wait_for(reader.readexactly(2), WAIT) == b"\r\n"
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(1), 0.2)
    writer.close()


async def test_tcp_malformed_and_oversize_skipped_on_same_connection(
    nodes: tuple[Node, Node],
) -> None:
    _, b = nodes
    _reader, writer = await tcp_client(b.tcp())
    wrong_cseq = raw(options(transport="TCP")).replace(b"1 OPTIONS", b"1 INVITE")
    non_utf8 = raw(options(transport="TCP")).replace(b"Max-Forwards: 70", b"Max-Forwards: \xff")
    oversize = raw(options(transport="TCP", body=b"y" * 5000))
    writer.write(wrong_cseq + non_utf8 + oversize)
    writer.write(raw(options(transport="TCP", call_id="survivor")))
    await writer.drain()
    received, _ = await b.next()
    assert received.call_id == "survivor"
    assert b.transport.stats.dropped_malformed == 2
    assert b.transport.stats.dropped_oversize == 1
    writer.write(raw(options(transport="TCP", call_id="still-open")))
    await writer.drain()
    assert (await b.next())[0].call_id == "still-open"
    writer.close()


async def test_tcp_missing_content_length_closes_connection(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    reader, writer = await tcp_client(b.tcp())
    writer.write(raw(options(transport="TCP")).replace(b"Content-Length: 0\r\n", b""))
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    assert b.transport.stats.dropped_malformed == 1
    writer.close()

    reader, writer = await tcp_client(b.tcp())
    writer.write(raw(options(transport="TCP", call_id="new-connection")))
    await writer.drain()
    assert (await b.next())[0].call_id == "new-connection"
    writer.close()


async def test_tcp_endless_header_closes_connection(nodes: tuple[Node, Node]) -> None:
    _, b = nodes
    reader, writer = await tcp_client(b.tcp())
    writer.write(b"OPTIONS sip:x@example.com SIP/2.0\r\n" + b"X-Pad: " + b"a" * 4000)
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    assert b.transport.stats.dropped_oversize == 1
    writer.close()


async def test_handler_exception_does_not_kill_tcp(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    b.fail_next = 1
    await a.transport.send(options(transport="TCP", call_id="first"), b.tcp())
    await a.transport.send(options(transport="TCP", call_id="second"), b.tcp())
    assert (await b.next())[0].call_id == "second"
    assert b.transport.stats.handler_errors == 1


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float = WAIT) -> bool:
    """True when the other side closed the connection (EOF or reset) within ``timeout``."""
    try:
        return await asyncio.wait_for(reader.read(), timeout) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


async def open_from(node: Node, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    peer = node.tcp()
    return await asyncio.open_connection(peer.host, peer.port, local_addr=(source, 0))


async def test_tcp_connections_are_capped_per_source_and_in_all() -> None:
    node = await make_node(tcp_limits=TcpLimits(max_connections=5, max_per_source=3))
    writers: list[asyncio.StreamWriter] = []
    try:
        first = [await open_from(node, "127.0.0.1") for _ in range(5)]
        writers += [w for _, w in first]
        closed = [await closed_by_peer(r, 0.5) for r, _ in first]
        assert sorted(closed) == [False] * 3 + [True] * 2  # the per-source cap is 3
        second = [await open_from(node, "127.0.0.2") for _ in range(3)]
        writers += [w for _, w in second]
        closed = [await closed_by_peer(r, 0.5) for r, _ in second]
        assert sorted(closed) == [False] * 2 + [True]  # 5 in all
        assert node.transport.stats.tcp_refused == 3
        # An accepted connection works; closing one frees a place for a newcomer.
        writer = next(w for r, w in first if not r.at_eof())
        writer.write(raw(options(transport="TCP", call_id="within-cap")))
        await writer.drain()
        assert (await node.next())[0].call_id == "within-cap"
        writer.close()
        await wait_until(lambda: len(node.transport._inbound) == 4)
        _reader, writer = await open_from(node, "127.0.0.3")
        writers.append(writer)
        writer.write(raw(options(transport="TCP", call_id="newcomer")))
        await writer.drain()
        assert (await node.next())[0].call_id == "newcomer"
    finally:
        for writer in writers:
            writer.close()
        await node.transport.close()


async def test_tcp_connection_that_never_completes_a_message_is_closed() -> None:
    node = await make_node(tcp_limits=TcpLimits(message_timeout=0.3))
    try:
        half = raw(options(transport="TCP"))[:60]
        stalled_reader, stalled = await tcp_client(node.tcp())
        stalled.write(half)  # half a message, then nothing
        silent_reader, silent = await tcp_client(node.tcp())  # nothing at all
        done_reader, done = await tcp_client(node.tcp())
        done.write(raw(options(transport="TCP", call_id="complete")))
        late_reader, late = await tcp_client(node.tcp())
        late.write(raw(options(transport="TCP", call_id="first")) + half)  # then stalls
        assert await closed_by_peer(stalled_reader, 10)
        assert await closed_by_peer(silent_reader, 10)
        assert await closed_by_peer(late_reader, 10)
        assert not await closed_by_peer(done_reader, 1.0)  # a finished message is no stall
        assert node.transport.stats.tcp_timed_out == 3
        assert {(await node.next())[0].call_id for _ in range(2)} == {"complete", "first"}
        for writer in (stalled, silent, late):
            writer.close()
        # The listener is unharmed: a normal exchange on a new connection still works.
        _reader, writer = await tcp_client(node.tcp())
        writer.write(raw(options(transport="TCP", call_id="after")))
        await writer.drain()
        assert (await node.next())[0].call_id == "after"
        writer.close()
        done.close()
    finally:
        await node.transport.close()


async def test_tcp_idle_timeout_counts_keepalives_as_traffic() -> None:
    node = await make_node(tcp_limits=TcpLimits(message_timeout=30, idle_timeout=1.5))
    try:
        quiet_reader, quiet = await tcp_client(node.tcp())
        quiet.write(raw(options(transport="TCP", call_id="quiet")))
        alive_reader, alive = await tcp_client(node.tcp())
        alive.write(raw(options(transport="TCP", call_id="alive")))
        for _ in range(15):  # 3 s of RFC 5626 pings, twice the idle timeout
            alive.write(b"\r\n\r\n")
            assert await asyncio.wait_for(alive_reader.readexactly(2), WAIT) == b"\r\n"
            await asyncio.sleep(0.2)
        assert await closed_by_peer(quiet_reader, 10)
        assert not alive_reader.at_eof()
        alive.write(raw(options(transport="TCP", call_id="still-alive")))
        await alive.drain()
        ids = {(await node.next())[0].call_id for _ in range(3)}
        assert ids == {"quiet", "alive", "still-alive"}
        assert node.transport.stats.tcp_timed_out == 1
        quiet.close()
        alive.close()
    finally:
        await node.transport.close()


def test_tcp_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="TCP connection caps must be at least 1"):
        TcpLimits(max_connections=0)
    with pytest.raises(ValueError, match="TCP timeouts must be positive"):
        TcpLimits(message_timeout=0)


async def test_content_length_corrected_before_sending(nodes: tuple[Node, Node]) -> None:
    a, b = nodes
    request = options(transport="TCP", body=b"v=0\r\n")
    request.content_length = 999  # a wrong value would wedge TCP framing
    await a.transport.send(request, b.tcp())
    await a.transport.send(options(transport="TCP", call_id="next"), b.tcp())
    first, _ = await b.next()
    assert first.body == b"v=0\r\n"
    assert first.content_length == 5
    assert (await b.next())[0].call_id == "next"


async def test_send_to_closed_tcp_port_raises_quickly(nodes: tuple[Node, Node]) -> None:
    a, _ = nodes
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(TransportError):
        await a.transport.send(options(transport="TCP"), Peer("tcp", LOOPBACK, port))
    assert time.monotonic() - started < 2.0
    assert a.transport.stats.sent == 0


async def test_close_shuts_everything_down() -> None:
    node = await make_node()
    reader, writer = await tcp_client(node.tcp())
    await wait_until(lambda: node.transport.stats.tcp_connections == 1)
    await node.transport.close()
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
    with pytest.raises(TransportError):
        await node.transport.send(options(), Peer("udp", LOOPBACK, 5060))
    with pytest.raises(TransportError):
        await node.transport.listen_udp(LOOPBACK, 0)
    await node.transport.close()  # idempotent


async def test_local_address_before_listen_raises() -> None:
    transport = SipTransport(lambda m, p: None)
    with pytest.raises(TransportError):
        transport.local_address("udp")
    with pytest.raises(TransportError):
        transport.local_address("sctp")
    await transport.close()


# -- IPv6 -----------------------------------------------------------------------------


@pytest.mark.skipif(not ipv6_loopback_available(), reason="host has no IPv6 loopback")
async def test_ipv6_loopback_udp_and_tcp() -> None:
    a = await make_node("::1")
    b = await make_node("::1")
    try:
        assert a.transport.local_address("udp")[0] == "::1"
        _, a_port = a.transport.local_address("udp")
        request = options(via_host="client.invalid", via_port=9)
        await a.transport.send(request, Peer("udp", "[::1]", b.udp().port))
        received, source = await b.next()
        assert source == Peer("udp", "::1", a_port)
        assert top_params(received)["received"] == "[::1]"
        assert top_params(received)["rport"] == str(a_port)
        # The stamped Via must survive a round trip through the parser unencoded.
        assert ";received=[::1];" in received.headers["Via"] + ";"
        assert isinstance(received, Request)
        await b.transport.send_response(create_response(received, 200), source)
        response, _ = await a.next()
        assert isinstance(response, Response)
        assert response.call_id == request.call_id

        _, a_tcp = a.transport.local_address("tcp")
        tcp_request = options(transport="TCP", via_host="[::1]", via_port=a_tcp)
        await a.transport.send(tcp_request, b.tcp())
        tcp_received, tcp_source = await b.next()
        assert tcp_source.host == "::1"
        assert isinstance(tcp_received, Request)
        await b.transport.send_response(create_response(tcp_received, 200), tcp_source)
        tcp_response, _ = await a.next()
        assert tcp_response.call_id == tcp_request.call_id
    finally:
        await a.transport.close()
        await b.transport.close()


# -- stream framer (sans-IO) ----------------------------------------------------------


def test_framer_byte_by_byte() -> None:
    message = raw(options(transport="TCP", body=b"\r\n\r\n0123456789"))
    framer = SipStreamFramer(65535)
    frames: list[bytes | StreamEvent | FramingError] = []
    for byte in message:
        frames += framer.feed(bytes([byte]))
    assert frames == [message]


def test_framer_pipelined_pings_and_compact_length() -> None:
    first = raw(options(transport="TCP", body=b"abc"))
    compact = raw(options(transport="TCP", body=b"xyz")).replace(b"Content-Length:", b"l :")
    framer = SipStreamFramer(65535)
    frames = framer.feed(b"\r\n\r\n" + first + b"\r\n" + compact + b"\r\n\r")
    # The CRLF before a start line reads as a pong: acted on only when we pinged.
    assert frames == [StreamEvent.PING, first, StreamEvent.PONG, compact]
    assert framer.feed(b"\n") == [StreamEvent.PING]  # ping split across reads


def test_framer_skips_oversize_without_buffering_it() -> None:
    big = raw(options(transport="TCP", body=b"z" * 1000))
    small = raw(options(transport="TCP"))
    framer = SipStreamFramer(600)
    frames: list[bytes | StreamEvent | FramingError] = []
    for start in range(0, len(big + small), 64):
        frames += framer.feed((big + small)[start : start + 64])
    assert frames == [StreamEvent.OVERSIZE, small]


@pytest.mark.parametrize(
    ("header", "oversize"),
    [
        (b"", False),  # no Content-Length at all
        (b"Content-Length: 5\r\nl: 6\r\n", False),
        (b"Content-Length: -1\r\n", False),
        (b"Content-Length: \xd9\xa3\r\n", False),  # non-ASCII digit
        (b"X-Long: " + b"a" * 700 + b"\r\n", True),
    ],
)
def test_framer_unrecoverable_streams(header: bytes, oversize: bool) -> None:
    framer = SipStreamFramer(600)
    data = b"OPTIONS sip:x@example.com SIP/2.0\r\n" + header
    if not oversize:
        data += b"\r\n"
    frames = framer.feed(data)
    assert len(frames) == 1
    error = frames[0]
    assert isinstance(error, FramingError)
    assert error.oversize is oversize
    assert framer.feed(raw(options(transport="TCP"))) == []


def hang_connects(monkeypatch: pytest.MonkeyPatch) -> asyncio.Event:
    """Make the running loop's TCP connects hang, as towards a silent host, off the wire."""
    started = asyncio.Event()

    async def never_connects(*args: object, **kwargs: object) -> None:
        started.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", never_connects)
    return started


async def test_connect_timeout_raises_transport_error(monkeypatch: pytest.MonkeyPatch) -> None:
    transport = SipTransport(lambda m, p: None, connect_timeout=0.1)
    hang_connects(monkeypatch)
    started = time.monotonic()
    with pytest.raises(TransportError):
        await transport.send(options(transport="TCP"), Peer("tcp", LOOPBACK, 5060))
    assert time.monotonic() - started < 2.0
    await transport.close()


async def test_close_during_connect_raises_transport_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = await make_node()
    started = hang_connects(monkeypatch)
    peer = Peer("tcp", LOOPBACK, 5060)
    sending = asyncio.ensure_future(node.transport.send(options(transport="TCP"), peer))
    await asyncio.wait_for(started.wait(), WAIT)
    await node.transport.close()
    with pytest.raises(TransportError):
        await asyncio.wait_for(sending, WAIT)
