"""Property tests: hostile bytes never escape as anything but ValueError or a dropped frame.

``parse_message`` must only ever raise ValueError, and live UDP/TCP transports fed the
same inputs must keep their event loop healthy and still deliver the next valid message.
The transport runs on its own loop in a thread so one loop lives across all examples,
which is what a long-running gateway sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import socket
import threading
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.sip.message import Request, Response, parse_message
from gateway.transport import Peer, SipTransport

T = TypeVar("T")

LOOPBACK = "127.0.0.1"

INVITE = (
    b"INVITE sip:bob@example.com SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP 192.0.2.4:5060;branch=z9hG4bK74bf9;rport\r\n"
    b"Via: SIP/2.0/TCP proxy.example.com;branch=z9hG4bK1;received=[2001:db8::9]\r\n"
    b"Max-Forwards: 70\r\n"
    b'From: "Alice" <sip:alice@example.com>;tag=9fxced76sl\r\n'
    b"To: <sip:bob@example.com>\r\n"
    b"Call-ID: 3848276298220188511@example.com\r\n"
    b"CSeq: 1 INVITE\r\n"
    b"Contact: <sip:alice@192.0.2.4;transport=tcp>\r\n"
    b"Content-Type: application/sdp\r\n"
    b"Content-Length: 31\r\n"
    b"\r\n"
    b"v=0\r\no=- 0 0 IN IP4 192.0.2.4\r\n"
)
RESPONSE = (
    b"SIP/2.0 200 OK\r\n"
    b"v: SIP/2.0/UDP [2001:db8::1]:5070;branch=z9hG4bKnashds8;received=192.0.2.1\r\n"
    b"f: <sip:alice@example.com>;tag=88sja8x\r\n"
    b"t: <sip:bob@example.com>;tag=a6c85cf\r\n"
    b"i: a84b4c76e66710\r\n"
    b"CSeq: 314159 OPTIONS\r\n"
    b"l: 0\r\n"
    b"\r\n"
)
ACK = (
    b"ACK sip:bob@192.0.2.8 SIP/2.0\r\n"
    b"Via: SIP/2.0/UDP client.example.com:5060;branch=z9hG4bK776asdhds\r\n"
    b"From: <sip:alice@example.com>;tag=1928301774\r\n"
    b"To: <sip:bob@example.com>;tag=a6c85cf\r\n"
    b"Call-ID: a84b4c76e66710@client.example.com\r\n"
    b"CSeq: 314159 ACK\r\n"
    b"Content-Length: 0\r\n"
    b"\r\n"
)
TEMPLATES = [INVITE, RESPONSE, ACK]


def test_templates_are_valid() -> None:
    """The mutation seeds must parse, or the mutations would test nothing interesting."""
    for template in TEMPLATES:
        parse_message(template)


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    """A valid message put through a few realistic corruptions."""
    data = bytearray(draw(st.sampled_from(TEMPLATES)))
    operations = draw(
        st.lists(
            st.sampled_from(["flip", "truncate", "duplicate", "length", "non_utf8", "splice"]),
            min_size=1,
            max_size=4,
        )
    )
    for operation in operations:
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        if operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "truncate":
            del data[position:]
        elif operation == "duplicate":
            lines = bytes(data).split(b"\r\n")
            index = draw(st.integers(0, len(lines) - 1))
            lines.insert(index, lines[index])
            data = bytearray(b"\r\n".join(lines))
        elif operation == "length":
            value = draw(
                st.one_of(
                    st.integers(0, 10**30).map(lambda n: str(n).encode()),
                    st.sampled_from([b"-1", b"+5", b"1e3", b"\xd9\xa3", b"", b"0x10", b" 7 "]),
                )
            )
            for name in (b"Content-Length: ", b"l: "):
                start = bytes(data).find(name)
                if start >= 0:
                    end = bytes(data).find(b"\r\n", start)
                    data[start + len(name) : end if end >= 0 else len(data)] = value
                    break
        elif operation == "non_utf8":
            data[position:position] = draw(st.binary(min_size=1, max_size=4)).translate(
                bytes(range(128, 256)) * 2
            )
        else:
            data[position:position] = draw(st.binary(max_size=32))
    return bytes(data)


def parse_or_value_error(data: bytes) -> Request | Response | None:
    try:
        return parse_message(data)
    except ValueError:
        return None


@settings(max_examples=400, deadline=1000)
@given(st.binary(max_size=2048))
def test_parse_random_bytes_only_raises_value_error(data: bytes) -> None:
    parse_or_value_error(data)


@settings(max_examples=600, deadline=1000)
@given(mutated_messages())
def test_parse_mutated_messages_only_raises_value_error(data: bytes) -> None:
    message = parse_or_value_error(data)
    if message is not None:
        assert isinstance(message, Request | Response)
        assert message.via  # parse_message promises a usable top Via


class _ErrorRecorder(logging.Handler):
    """Collects ERROR records: the transport logs at that level only on its own bugs."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class LiveTarget:
    """A SipTransport listening on UDP and TCP, running on a loop in its own thread."""

    def __init__(self, errors: _ErrorRecorder) -> None:
        self.errors = errors
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.inbox: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.transport = self.call(self._start())
        self.udp = self.transport.local_address("udp")
        self.tcp = self.transport.local_address("tcp")
        self.probes = 0

    async def _start(self) -> SipTransport:
        transport = SipTransport(self._handle, max_message_size=4096)
        await transport.listen_udp(LOOPBACK, 0)
        await transport.listen_tcp(LOOPBACK, 0)
        return transport

    def _handle(self, message: Request | Response, peer: Peer) -> None:
        self.inbox.put(message.call_id)

    def call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def probe(self) -> bytes:
        """A fresh valid request whose Call-ID identifies this example."""
        self.probes += 1
        call_id = f"probe-{self.probes}@fuzz"
        return ACK.replace(b"a84b4c76e66710@client.example.com", call_id.encode())

    def expect_probe(self, probe: bytes) -> None:
        """Wait (bounded) for ``probe``; fuzz inputs that happen to be valid are skipped."""
        wanted = parse_message(probe).call_id
        delivered = False
        deadline = time.monotonic() + 5.0
        while not delivered and (remaining := deadline - time.monotonic()) > 0:
            try:
                delivered = self.inbox.get(timeout=remaining) == wanted
            except queue.Empty:
                break
        assert delivered, "probe not delivered in time"
        assert self.thread.is_alive()
        assert self.loop.is_running()
        assert self.loop_errors == []
        assert self.errors.records == [], [r.getMessage() for r in self.errors.records]

    def stop(self) -> None:
        self.call(self.transport.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()


@pytest.fixture(scope="module")
def live() -> Iterator[LiveTarget]:
    recorder = _ErrorRecorder()
    transport_logger = logging.getLogger("gateway.transport")
    transport_logger.addHandler(recorder)
    target = LiveTarget(recorder)
    try:
        yield target
    finally:
        target.stop()
        transport_logger.removeHandler(recorder)


hostile_inputs = st.one_of(st.binary(max_size=6000), mutated_messages())
live_settings = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@live_settings
@given(data=hostile_inputs)
def test_live_udp_survives_hostile_datagrams(live: LiveTarget, data: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        if data:
            sock.sendto(data, live.udp)
        probe = live.probe()
        sock.sendto(probe, live.udp)
        live.expect_probe(probe)


@live_settings
@given(data=hostile_inputs, cuts=st.lists(st.integers(1, 6000), max_size=5))
def test_live_tcp_survives_hostile_streams(live: LiveTarget, data: bytes, cuts: list[int]) -> None:
    with socket.create_connection(live.tcp, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = 0
        # The gateway may close a hostile stream before all of it is written (a bad
        # Content-Length is answered 400 and the connection closed): a later write then
        # meets a closed socket, which is the gateway defending itself, not a failure.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for cut in sorted(cuts):  # the same bytes, split into several writes
                sock.sendall(data[start:cut])
                start = max(start, cut)
            sock.sendall(data[start:])
    # The hostile connection may rightly be waiting for more or closed; a new one must work.
    with socket.create_connection(live.tcp, timeout=5) as sock:
        probe = live.probe()
        sock.sendall(probe)
        live.expect_probe(probe)
