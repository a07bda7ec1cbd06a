"""The asyncio edge of the sans-IO SIP stack: UDP socket, TCP listener and connections.

Everything above this module (transactions, dialogs, calls) is pure state machines; this
is the only place that touches sockets. It frames the byte stream, hands every frame to
``parse_message`` (the single SIP parser), stamps ``received``/``rport`` on requests
(RFC 3261 18.2.1, RFC 3581) and routes responses back (RFC 3261 18.2.2). Whatever a peer
sends, the protocol callbacks never raise: bad input is logged, counted and dropped, or,
when it is a request that can be answered, handed to ``on_bad_request`` to be refused.

Inbound TCP is bounded (``TcpLimits``): connections in all and per source address are
capped (the excess is closed at once), a connection must complete a message soon after it
starts one, and one with no traffic at all for long is closed.

TLS (RFC 3261 section 26) is the same stream handling over asyncio's ssl: its own listener
(`listen_tls`), connections keyed apart from TCP ones, reused the same way, a bounded
handshake, and the peer's certificate verified with the ``TlsClientSettings`` a ``Peer``
carries (system CAs and the target's host name when it carries none).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from sipmessage import Parameters

from gateway.metrics import (
    SIP_DROPPED_BY_REASON,
    TCP_CLOSED_BY_REASON,
    SipDropReason,
    TcpCloseReason,
)
from gateway.result import FailureCause
from gateway.sip.message import (
    BadRequest,
    Request,
    Response,
    Via,
    parse_message,
    to_wire,
    top_via,
)
from gateway.tls import (
    DEFAULT_SIPS_PORT,
    TLS_HANDSHAKE_TIMEOUT,
    TlsClientSettings,
    TlsServerSettings,
    describe_tls_error,
    tls_failure_cause,
)

__all__ = [
    "DEFAULT_SIP_PORT",
    "MAX_UDP_PAYLOAD",
    "STREAM_TRANSPORTS",
    "FramingError",
    "MessageHandler",
    "Peer",
    "SipStreamFramer",
    "SipTransport",
    "StreamEvent",
    "TcpLimits",
    "TransportError",
    "TransportStats",
]

logger = logging.getLogger(__name__)

DEFAULT_SIP_PORT = 5060
# Largest UDP payload over IPv4; bigger messages must go over TCP (RFC 3261 18.1.1).
MAX_UDP_PAYLOAD = 65507
# A peer that stops reading must not make us buffer without bound.
MAX_TCP_WRITE_BUFFER = 1 << 20
# Oversized messages are logged at most this often (seconds), with how many were dropped.
OVERSIZE_LOG_INTERVAL = 10.0
# Transports carried over a connection (framed by SipStreamFramer, reliable).
STREAM_TRANSPORTS = frozenset({"tcp", "tls"})
# Why the last connect to a peer failed, kept for this many peers (oldest forgotten).
MAX_CONNECT_ERRORS = 256

_HEADER_END = b"\r\n\r\n"
_PONG = b"\r\n"


@dataclass(frozen=True)
class Peer:
    """Where a message came from or goes to; ``host`` is an IP (bare, no brackets) or name."""

    transport: str  # "udp" | "tcp" | "tls"
    host: str
    port: int
    # TLS only: how to verify the peer (None: system CAs, the host as name). Not part of
    # the identity: a connection to the address is reused whatever settings opened it.
    tls: TlsClientSettings | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


MessageHandler = Callable[[Request | Response, Peer], None]
BadRequestHandler = Callable[[BadRequest, Peer], None]


@dataclass(frozen=True)
class TcpLimits:
    """Bounds on inbound TCP connections, so that holding sockets open costs a peer more
    than it costs us. Connections we open ourselves are not counted."""

    max_connections: int = 1024  # inbound connections in all
    max_per_source: int = 32  # inbound connections from one address
    message_timeout: float = 10.0  # to complete a message begun (or a first one)
    idle_timeout: float = 600.0  # with no traffic either way (RFC 5626 keep-alives count)

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.max_per_source < 1:
            raise ValueError(f"TCP connection caps must be at least 1: {self}")
        if self.message_timeout <= 0 or self.idle_timeout <= 0:
            raise ValueError(f"TCP timeouts must be positive: {self}")

    @property
    def sweep_interval(self) -> float:
        """How often connections are checked: a quarter of the shorter timeout, 50 ms..1 s."""
        return min(1.0, max(0.05, min(self.message_timeout, self.idle_timeout) / 4))


class TransportError(OSError):
    """Sending failed (no listener, refused or timed-out connect, closed transport);
    ``cause`` says what kind of connect failure it was, when it was one."""

    def __init__(self, message: str, *, cause: FailureCause | None = None) -> None:
        super().__init__(message)
        self.cause = cause


@dataclass
class TransportStats:
    """Counters for monitoring; ``tcp_connections`` counts connections opened since start."""

    received: int = 0
    sent: int = 0
    dropped_malformed: int = 0
    dropped_oversize: int = 0
    rejected_malformed: int = 0  # requests handed to on_bad_request to be answered
    tcp_connections: int = 0
    tcp_refused: int = 0  # inbound connections closed at once: over a cap
    tcp_timed_out: int = 0  # inbound connections closed: incomplete message or idle
    handler_errors: int = 0


class StreamEvent(enum.Enum):
    """Non-message frames the stream framer reports."""

    PING = "ping"  # RFC 5626 double-CRLF keep-alive, to be answered with a single CRLF
    PONG = "pong"  # a single CRLF: the answer to our ping, or one before a start line
    OVERSIZE = "oversize"  # a message above the size cap was skipped


class FramingError(ValueError):
    """The stream can no longer be split into messages, so the connection must be closed."""

    def __init__(self, reason: str, *, oversize: bool = False) -> None:
        super().__init__(reason)
        self.oversize = oversize


def _content_length(head: bytes) -> int | None:
    """Read Content-Length (or compact ``l``) from a header block, for framing only.

    Returns None when absent; raises ValueError when unusable or given twice differently,
    since then the message boundary cannot be trusted.
    """
    found: int | None = None
    for line in head.split(b"\r\n")[1:]:
        if line[:1] in (b" ", b"\t"):
            continue  # folded continuation of the previous header
        name, sep, value = line.partition(b":")
        if not sep or name.rstrip().lower() not in (b"content-length", b"l"):
            continue
        text = value.strip()
        if not text.isdigit() or len(text) > 10:
            raise ValueError(f"invalid Content-Length {text[:20]!r}")
        length = int(text)
        if found is not None and found != length:
            raise ValueError("conflicting Content-Length headers")
        found = length
    return found


class SipStreamFramer:
    """Split a TCP byte stream into SIP messages (RFC 3261 18.3, RFC 5626 keep-alives).

    Sans-IO so the tricky cases (split reads, pipelined messages, oversize skipping) are
    testable without sockets. Memory stays bounded by ``max_message_size``: an oversized
    message whose length is known is skipped byte-wise instead of buffered.
    """

    def __init__(self, max_message_size: int) -> None:
        self._max = max_message_size
        self._buffer = bytearray()
        self._skip = 0
        self._scan_from = 0
        self._pending = 0  # size of a message whose header is in, awaiting its body
        self._failed = False
        # We pinged: a lone CRLF is the pong, not the first half of a ping split in two.
        self.awaiting_pong = False

    def expect_pong(self) -> None:
        """We just pinged: a lone CRLF from now on is the pong. One held back from before
        (as a possible first half of a ping) was a stray: dropped, so that it does not
        join the pong into what would read as a ping."""
        self.awaiting_pong = True
        if self._buffer == b"\r\n" and not self._pending and not self._skip:
            self._buffer.clear()

    @property
    def partial(self) -> bool:
        """True while part of a message (or of a keep-alive) is buffered or being skipped."""
        return bool(self._buffer) or bool(self._pending) or bool(self._skip)

    def feed(self, data: bytes) -> list[bytes | StreamEvent | FramingError]:
        """Add received bytes; return complete frames in order.

        A ``FramingError`` is always the last item and the framer ignores input after it.
        """
        if self._failed:
            return []
        self._buffer += data
        frames: list[bytes | StreamEvent | FramingError] = []
        buffer = self._buffer
        # Each pass consumes bytes, or records a pending message that the next consumes, or
        # breaks: the loop is bounded by the buffer size.
        while buffer:
            if self._skip:
                count = min(self._skip, len(buffer))
                del buffer[:count]
                self._skip -= count
                self._scan_from = 0
                continue
            if self._pending:
                if len(buffer) < self._pending:
                    break
                frames.append(bytes(buffer[: self._pending]))
                del buffer[: self._pending]
                self._pending = 0
                continue
            if buffer.startswith(_HEADER_END):
                del buffer[:4]
                frames.append(StreamEvent.PING)
                self._scan_from = 0
                continue
            if buffer == b"\r\n" and self.awaiting_pong:
                del buffer[:2]
                frames.append(StreamEvent.PONG)
                self._scan_from = 0
                continue
            if _HEADER_END.startswith(buffer):
                break  # possibly a ping split across reads
            if buffer.startswith(b"\r\n"):
                del buffer[:2]  # a pong, or CRLF before a start line (RFC 3261 7.5)
                frames.append(StreamEvent.PONG)
                self._scan_from = 0
                continue
            end = buffer.find(_HEADER_END, self._scan_from)
            if end < 0:
                if len(buffer) > self._max:
                    error = FramingError("header block exceeds size limit", oversize=True)
                    return self._fail(frames, error)
                self._scan_from = max(0, len(buffer) - 3)
                break
            try:
                length = _content_length(bytes(buffer[:end]))
            except ValueError as exc:
                return self._fail(frames, FramingError(str(exc)))
            if length is None:
                return self._fail(frames, FramingError("missing Content-Length on a stream"))
            head = end + len(_HEADER_END)
            total = head + length
            if total > self._max:
                del buffer[:head]
                self._skip = length
                self._scan_from = 0
                frames.append(StreamEvent.OVERSIZE)
                continue
            self._pending = total  # emitted by the branch above, now or after more reads
            self._scan_from = 0
        return frames

    def _fail(
        self, frames: list[bytes | StreamEvent | FramingError], error: FramingError
    ) -> list[bytes | StreamEvent | FramingError]:
        self._failed = True
        self._buffer.clear()
        frames.append(error)
        return frames


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse an IP literal (brackets allowed), unmapping ``::ffff:a.b.c.d``; None for names."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _normalize_host(host: str) -> str:
    """Canonical form used as connection key and in Peer: bare IP text or lower-case name."""
    address = _ip(host)
    return str(address) if address is not None else host.strip("[]").lower()


def _via_received_value(host: str) -> str:
    """``received`` value; IPv6 is bracketed because sipmessage only reads it back that way."""
    return f"[{host}]" if ":" in host else host


def _stamp_via(request: Request, source: Peer) -> None:
    """Add ``received``/``rport`` to the top Via (RFC 3261 18.2.1, RFC 3581 section 4).

    Only the top Via is re-serialised, with the new values appended verbatim: sipmessage
    would percent-encode an IPv6 ``received`` and other hops' Vias must stay untouched.
    ValueError when there is no usable top Via (the caller drops the request).
    """
    raw = request.headers.getlist("Via")
    first_line = Via.parse_many(raw[0]) if raw else []
    if not first_line:
        raise ValueError("request has no usable top Via")
    top = first_line[0]
    params = top.parameters
    changes: dict[str, str] = {}
    if "rport" in params and params["rport"] is None:
        # RFC 3581: received is mandatory with rport, even when equal to sent-by.
        changes["rport"] = str(source.port)
        changes["received"] = _via_received_value(source.host)
    elif _ip(top.host) is None or _ip(top.host) != _ip(source.host):
        changes["received"] = _via_received_value(source.host)
    if not changes:
        return
    kept = Parameters(**{key: value for key, value in params.items() if key not in changes})
    text = str(Via(transport=top.transport, host=top.host, port=top.port, parameters=kept))
    text += "".join(f";{key}={value}" for key, value in changes.items())
    first = ", ".join([text, *(str(via) for via in first_line[1:])])
    request.headers.setlist("Via", [first, *raw[1:]])


def _key(transport: str, host: str, port: int) -> tuple[str, str, int]:
    """Connection map key: (kind, normalised host, port)."""
    return (transport.lower(), _normalize_host(host), port)


def _valid_port(value: str | None) -> int | None:
    if value is None or not value.isascii() or not value.isdigit():
        return None
    port = int(value)
    return port if 0 < port < 65536 else None


class _DatagramProtocol(asyncio.DatagramProtocol):
    """Feeds datagrams to the owner; nothing a peer sends may escape this callback."""

    def __init__(self, owner: SipTransport) -> None:
        self._owner = owner
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        try:
            self._owner._on_datagram(data, addr)
        except Exception:
            logger.exception("unexpected error handling a UDP datagram from %s", addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable...) for earlier sendto calls; retransmission timers
        # in the transaction layer deal with the consequence.
        logger.debug("UDP socket error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class _StreamProtocol(asyncio.Protocol):
    """One TCP or TLS connection, inbound or outbound: framing, keep-alive answers, writes.

    For TLS, asyncio calls ``connection_made`` only once the handshake is done."""

    def __init__(self, owner: SipTransport, *, kind: str = "tcp", inbound: bool = False) -> None:
        self._owner = owner
        self.kind = kind
        self._framer = SipStreamFramer(owner.max_message_size)
        self.inbound = inbound
        self.counted = False  # holds a place under the inbound caps
        self.transport: asyncio.Transport | None = None
        self.peer: Peer | None = None
        self._loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = self._loop.create_future()
        self.opened_at = self._loop.time()
        self.last_traffic = self.opened_at
        self.partial_since: float | None = None  # a message begun but not complete since
        self.completed_any = False
        self._on_pong: Callable[[], None] | None = None  # our ping's, called once

    def expired(self, now: float, limits: TcpLimits) -> TcpCloseReason | None:
        """Why this inbound connection should be closed at ``now``, if it should."""
        started = self.partial_since if self.completed_any else self.opened_at
        if started is not None and now - started > limits.message_timeout:
            return TcpCloseReason.INCOMPLETE
        if now - self.last_traffic > limits.idle_timeout:
            return TcpCloseReason.IDLE
        return None

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if not peername or self._owner.closed:
            self.transport.abort()
            return
        self.peer = Peer(self.kind, _normalize_host(str(peername[0])), int(peername[1]))
        if self.inbound and not self._owner._admit_inbound(self):
            self.transport.abort()
            return
        self._owner._register(self)

    def data_received(self, data: bytes) -> None:
        try:
            self._on_data(data)
        except Exception:
            logger.exception("unexpected error on TCP connection from %s", self.peer)
            if self.transport is not None:
                self.transport.abort()

    def _on_data(self, data: bytes) -> None:
        if self.peer is None or self.transport is None:
            return
        now = self._loop.time()
        self.last_traffic = now
        frames = self._framer.feed(data)
        if any(isinstance(frame, bytes) for frame in frames):
            self.completed_any = True
            self.partial_since = None
        if not self._framer.partial:
            self.partial_since = None
        elif self.partial_since is None:
            self.partial_since = now
        for frame in frames:
            if self.transport.is_closing():
                return  # the handler closed us (or the transport shut down)
            if isinstance(frame, bytes):
                self._owner._deliver(frame, self.peer)
            elif frame is StreamEvent.PING:
                self.transport.write(_PONG)
            elif frame is StreamEvent.PONG:
                self._pong()
            elif frame is StreamEvent.OVERSIZE:
                self._owner._count_oversize(self.peer, "message above size limit skipped")
            else:
                if frame.oversize:
                    self._owner._count_oversize(self.peer, str(frame))
                else:
                    self._owner.stats.dropped_malformed += 1
                logger.warning("closing TCP connection from %s: %s", self.peer, frame)
                self.transport.close()

    def eof_received(self) -> bool | None:
        return None  # close our side too: SIP has no use for half-open connections

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._unregister(self)
        if not self.lost.done():
            self.lost.set_result(None)

    def ping(self, on_pong: Callable[[], None]) -> None:
        """Write an RFC 5626 keep-alive ping; ``on_pong`` is called when a CRLF comes back.
        A CRLF that nobody awaits (a stray one before a start line) is ignored."""
        self.write(_HEADER_END)
        self._on_pong = on_pong
        self._framer.expect_pong()

    def _pong(self) -> None:
        self._framer.awaiting_pong = False
        callback, self._on_pong = self._on_pong, None
        if callback is not None:
            callback()

    def write(self, data: bytes) -> None:
        """Queue ``data``; refuse when the connection is gone or the peer stopped reading."""
        transport = self.transport
        if transport is None or transport.is_closing():
            raise TransportError(f"TCP connection to {self.peer} is closed")
        if transport.get_write_buffer_size() > MAX_TCP_WRITE_BUFFER:
            transport.abort()
            raise TransportError(f"TCP peer {self.peer} is not reading; connection dropped")
        transport.write(data)
        self.last_traffic = self._loop.time()


class SipTransport:
    """Owns the UDP socket and TCP listener/connections of one SIP endpoint."""

    def __init__(
        self,
        handler: MessageHandler,
        *,
        max_message_size: int = 65535,
        connect_timeout: float = 5.0,
        on_bad_request: BadRequestHandler | None = None,
        tcp_limits: TcpLimits | None = None,
    ) -> None:
        if max_message_size <= 0:
            raise ValueError("max_message_size must be positive")
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.tcp_limits = tcp_limits or TcpLimits()
        self.stats = TransportStats()
        self._oversize_log_at = 0.0
        self._oversize_logged = 0
        self._handler = handler
        self._on_bad_request = on_bad_request
        self._inbound: set[_StreamProtocol] = set()
        self._inbound_per_source: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._closed = False
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_protocol: _DatagramProtocol | None = None
        self._udp_address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._tcp_address: tuple[str, int] | None = None
        self._tls_server: asyncio.Server | None = None
        self._tls_address: tuple[str, int] | None = None
        # keyed (kind, host, port): a TLS and a TCP connection never stand in for each other
        self._connections: dict[tuple[str, str, int], _StreamProtocol] = {}
        self._connecting: dict[tuple[str, str, int], asyncio.Task[_StreamProtocol]] = {}
        self._connect_errors: OrderedDict[tuple[str, str, int], TransportError] = OrderedDict()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- lifecycle -------------------------------------------------------------------

    async def listen_udp(self, host: str, port: int) -> tuple[str, int]:
        """Bind the UDP socket (port 0 picks one); it also sends, for symmetric signalling."""
        self._check_open()
        if self._udp is not None:
            raise TransportError("already listening on UDP")
        loop = asyncio.get_running_loop()
        try:
            transport, protocol = await loop.create_datagram_endpoint(
                lambda: _DatagramProtocol(self), local_addr=(host.strip("[]"), port)
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on UDP {host}:{port}: {exc}") from exc
        self._udp = transport
        self._udp_protocol = protocol
        sockname = transport.get_extra_info("sockname")
        self._udp_address = (str(sockname[0]), int(sockname[1]))
        return self._udp_address

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Open the TCP listener (port 0 picks one); returns the first bound address."""
        self._check_open()
        if self._server is not None:
            raise TransportError("already listening on TCP")
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: _StreamProtocol(self, inbound=True), host.strip("[]") or None, port
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on TCP {host}:{port}: {exc}") from exc
        self._server = server
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep_inbound(), name="sip-tcp-sweeper")
        sockname = server.sockets[0].getsockname()
        self._tcp_address = (str(sockname[0]), int(sockname[1]))
        return self._tcp_address

    async def listen_tls(
        self, host: str, port: int, settings: TlsServerSettings
    ) -> tuple[str, int]:
        """Open the TLS listener (port 0 picks one) with our certificate; inbound TLS
        connections share the TCP caps and timeouts, handshakes are bounded."""
        self._check_open()
        if self._tls_server is not None:
            raise TransportError("already listening on TLS")
        try:
            context = settings.context()
        except (OSError, ValueError) as exc:
            raise TransportError(f"cannot load the TLS certificate: {exc}") from exc
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: _StreamProtocol(self, kind="tls", inbound=True),
                host.strip("[]") or None,
                port,
                ssl=context,
                ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
            )
        except OSError as exc:
            raise TransportError(f"cannot listen on TLS {host}:{port}: {exc}") from exc
        self._tls_server = server
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep_inbound(), name="sip-tcp-sweeper")
        sockname = server.sockets[0].getsockname()
        self._tls_address = (str(sockname[0]), int(sockname[1]))
        return self._tls_address

    def local_address(self, transport: str) -> tuple[str, int]:
        """Bound (host, port) of the listener, for Via sent-by and Contact."""
        kind = transport.lower()
        addresses = {"udp": self._udp_address, "tcp": self._tcp_address, "tls": self._tls_address}
        address = addresses.get(kind)
        if address is None:
            raise TransportError(f"not listening on {transport!r}")
        return address

    async def connect(self, peer: Peer) -> tuple[str, int]:
        """Open (or reuse) the TCP/TLS connection to ``peer``; returns its local address,
        which is where a client with no listener of that kind is reached (Via, Contact)."""
        self._check_open()
        connection = await self._stream_connection(peer)
        local = self.connection_address(peer)
        if local is None:
            raise TransportError(f"connection to {peer} closed at once")
        assert connection.usable
        return local

    def connection_address(self, peer: Peer) -> tuple[str, int] | None:
        """Our end of the open TCP/TLS connection to ``peer``, if there is one."""
        connection = self._find_connection(_key(peer.transport, peer.host, peer.port))
        if connection is None or connection.transport is None:
            return None
        sockname = connection.transport.get_extra_info("sockname")
        return (str(sockname[0]), int(sockname[1])) if sockname else None

    def connect_error(self, peer: Peer) -> str | None:
        """Why the last connection attempt to ``peer`` failed (TLS verification, refused,
        timed out), until a later one succeeds; None when it did not fail."""
        error = self._connect_errors.get(_key(peer.transport, peer.host, peer.port))
        return str(error) if error is not None else None

    def connect_failure(self, peer: Peer) -> FailureCause | None:
        """The kind of `connect_error` (a certificate that did not verify...), if any."""
        error = self._connect_errors.get(_key(peer.transport, peer.host, peer.port))
        return error.cause if error is not None else None

    async def close(self) -> None:
        """Stop listening and close every connection; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for task in list(self._connecting.values()):
            task.cancel()
        waiters: list[asyncio.Future[None]] = []
        if self._udp is not None and self._udp_protocol is not None:
            self._udp.close()
            waiters.append(self._udp_protocol.lost)
        for server in (self._server, self._tls_server):
            if server is not None:
                server.close()
        for connection in set(self._connections.values()):
            if connection.transport is not None:
                connection.transport.close()
            waiters.append(connection.lost)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await asyncio.gather(*waiters)
                for server in (self._server, self._tls_server):
                    if server is not None:
                        await server.wait_closed()
        self._connections.clear()

    # -- sending ---------------------------------------------------------------------

    async def send(self, message: Request | Response | bytes, peer: Peer) -> None:
        """Send ``message`` to ``peer``, fixing Content-Length first (bytes go as they are:
        a lingering transaction's re-send of a message it serialised before).

        UDP leaves from the listening socket so replies come back to it (RFC 3581).
        TCP and TLS reuse any open connection to the peer, inbound ones included.
        """
        self._check_open()
        if not 0 < peer.port < 65536:
            raise TransportError(f"invalid port in {peer}")
        if isinstance(message, bytes):
            data = message
        else:
            try:
                data = to_wire(message)
            except (ValueError, TypeError) as exc:
                raise TransportError(f"cannot serialise message for {peer}: {exc}") from exc
        kind = peer.transport.lower()
        if kind == "udp":
            await self._send_udp(data, peer)
        elif kind in STREAM_TRANSPORTS:
            connection = await self._stream_connection(peer)
            connection.write(data)
        else:
            raise TransportError(f"unsupported transport {peer.transport!r}")
        self.stats.sent += 1

    async def send_response(self, response: Response, request_source: Peer) -> None:
        """Send a response where `response_target` routes it."""
        await self.send(response, self.response_target(response, request_source))

    def response_target(self, response: Response, request_source: Peer) -> Peer:
        """Route a response per RFC 3261 18.2.2 and RFC 3581.

        TCP/TLS: the connection the request arrived on, else a new one to ``received`` (or
        sent-by host) and the sent-by port (5061 for TLS). UDP: ``received`` (or sent-by host) and
        ``rport`` (or ``maddr`` / sent-by port, default 5060).
        """
        try:
            via = top_via(response)
        except (ValueError, IndexError) as exc:
            raise TransportError(f"response has no usable Via: {exc}") from exc
        received = via.parameters.get("received")
        host = received.strip("[]") if received else via.host.strip("[]")
        kind = request_source.transport.lower()
        if kind in STREAM_TRANSPORTS:
            if self.has_connection(request_source):
                return request_source
            port = via.port or (DEFAULT_SIPS_PORT if kind == "tls" else DEFAULT_SIP_PORT)
            return Peer(kind, host, port, request_source.tls)
        sent_by_port = via.port or DEFAULT_SIP_PORT
        rport = _valid_port(via.parameters.get("rport"))
        maddr = via.parameters.get("maddr")
        if rport is not None:
            return Peer("udp", host, rport)
        if maddr:
            return Peer("udp", maddr.strip("[]"), sent_by_port)
        return Peer("udp", host, sent_by_port)

    async def _send_udp(self, data: bytes, peer: Peer) -> None:
        udp = self._udp
        if udp is None or udp.is_closing():
            raise TransportError("not listening on UDP")
        if len(data) > MAX_UDP_PAYLOAD:
            raise TransportError(f"{len(data)} bytes is too large for UDP; use TCP")
        sock = cast(socket.socket, udp.get_extra_info("socket"))
        host = peer.host.strip("[]")
        address = _ip(host)
        if address is None:
            loop = asyncio.get_running_loop()
            try:
                infos = await loop.getaddrinfo(
                    host, peer.port, family=sock.family, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                raise TransportError(f"cannot resolve {host!r}: {exc}") from exc
            if not infos:
                raise TransportError(f"cannot resolve {host!r}")
            address = _ip(str(infos[0][4][0]))
            if address is None:
                raise TransportError(f"cannot resolve {host!r}")
        if sock.family == socket.AF_INET6 and address.version == 4:
            target = f"::ffff:{address}"
        elif sock.family == socket.AF_INET and address.version == 6:
            raise TransportError(f"cannot reach IPv6 {peer} from an IPv4 UDP socket")
        else:
            target = str(address)
        udp.sendto(data, (target, peer.port))

    def ping(self, peer: Peer, on_pong: Callable[[], None]) -> None:
        """Send an RFC 5626 keep-alive ping on the open connection to ``peer``; ``on_pong``
        is called once its pong arrives. TransportError when there is no such connection
        or the write is refused: the flow is dead already."""
        connection = self._find_connection(_key(peer.transport, peer.host, peer.port))
        if connection is None:
            raise TransportError(f"no open connection to {peer}")
        connection.ping(on_pong)

    def drop(self, peer: Peer) -> None:
        """Abort the connection to ``peer`` (a flow found dead): nothing more is sent on
        it, and whoever sends to ``peer`` next opens a new one."""
        key = _key(peer.transport, peer.host, peer.port)
        connection = self._connections.get(key)
        if connection is not None and connection.transport is not None:
            connection.transport.abort()

    def has_connection(self, peer: Peer) -> bool:
        """True while a usable TCP/TLS connection to ``peer`` is open (inbound or ours)."""
        return self._find_connection(_key(peer.transport, peer.host, peer.port)) is not None

    def _find_connection(self, key: tuple[str, str, int]) -> _StreamProtocol | None:
        connection = self._connections.get(key)
        return connection if connection is not None and connection.usable else None

    async def _stream_connection(self, peer: Peer) -> _StreamProtocol:
        """An open connection to ``peer``; concurrent senders share one connect."""
        key = _key(peer.transport, peer.host, peer.port)
        connection = self._find_connection(key)
        if connection is not None:
            return connection
        task = self._connecting.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._connect(key, peer.tls))
            self._connecting[key] = task
            task.add_done_callback(lambda done: self._connect_done(key, done))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or not current.cancelling()):
                # close() cancelled the shared connect, not this sender: report it as such.
                raise TransportError(f"transport closed while connecting to {key}") from None
            raise

    def _connect_done(self, key: tuple[str, str, int], task: asyncio.Task[_StreamProtocol]) -> None:
        if self._connecting.get(key) is task:
            del self._connecting[key]
        if task.cancelled():
            return
        # retrieved here so a sender that gave up does not leave it unseen
        error = task.exception()
        if error is None:
            self._connect_errors.pop(key, None)
            return
        if not isinstance(error, TransportError):
            error = TransportError(str(error), cause=FailureCause.CONNECT)
        self._connect_errors[key] = error
        self._connect_errors.move_to_end(key)
        while len(self._connect_errors) > MAX_CONNECT_ERRORS:
            self._connect_errors.popitem(last=False)

    async def _connect(
        self, key: tuple[str, str, int], tls: TlsClientSettings | None
    ) -> _StreamProtocol:
        kind, host, port = key
        loop = asyncio.get_running_loop()
        options: dict[str, Any] = {}
        if kind == "tls":
            settings = tls or TlsClientSettings()
            try:
                options["ssl"] = settings.context()
            except (OSError, ValueError) as exc:
                raise TransportError(f"cannot use the TLS settings for {kind}:{host}:{port}: "
                                     f"{exc}") from exc  # fmt: skip
            options["server_hostname"] = settings.server_name or host
            options["ssl_handshake_timeout"] = min(TLS_HANDSHAKE_TIMEOUT, self.connect_timeout)
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _StreamProtocol(self, kind=kind), host, port, **options
                )
        except (OSError, ValueError) as exc:  # TimeoutError, refused, ssl.SSLError
            secure = kind == "tls"
            reason = describe_tls_error(exc) if secure else repr(exc)
            cause = tls_failure_cause(exc) if secure else FailureCause.CONNECT
            raise TransportError(
                f"cannot connect to {kind}:{host}:{port}: {reason}", cause=cause
            ) from exc
        if not protocol.usable:
            raise TransportError(f"connection to {kind}:{host}:{port} closed at once")
        if _ip(host) is None:
            self._connections[key] = protocol  # reachable under the name it was asked for
        return protocol

    def _check_open(self) -> None:
        if self._closed:
            raise TransportError("transport is closed")

    # -- receiving -------------------------------------------------------------------

    def _admit_inbound(self, connection: _StreamProtocol) -> bool:
        """Count an accepted connection under the caps, or refuse it (counted, logged)."""
        assert connection.peer is not None
        host = connection.peer.host
        limits = self.tcp_limits
        reason: TcpCloseReason | None = None
        if len(self._inbound) >= limits.max_connections:
            reason = TcpCloseReason.GLOBAL_CAP
        elif self._inbound_per_source.get(host, 0) >= limits.max_per_source:
            reason = TcpCloseReason.SOURCE_CAP
        if reason is not None:
            self.stats.tcp_refused += 1
            TCP_CLOSED_BY_REASON[reason].inc()
            logger.debug("refusing TCP connection from %s: %s", connection.peer, reason.value)
            return False
        connection.counted = True
        self._inbound.add(connection)
        self._inbound_per_source[host] = self._inbound_per_source.get(host, 0) + 1
        return True

    def _release_inbound(self, connection: _StreamProtocol) -> None:
        if not connection.counted or connection.peer is None:
            return
        connection.counted = False
        self._inbound.discard(connection)
        host = connection.peer.host
        left = self._inbound_per_source.get(host, 0) - 1
        if left > 0:
            self._inbound_per_source[host] = left
        else:
            self._inbound_per_source.pop(host, None)

    async def _sweep_inbound(self) -> None:
        """Close inbound connections past their message or idle timeout, until close()."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self.tcp_limits.sweep_interval)
            now = loop.time()
            for connection in list(self._inbound):
                reason = connection.expired(now, self.tcp_limits)
                if reason is None or connection.transport is None:
                    continue
                self.stats.tcp_timed_out += 1
                TCP_CLOSED_BY_REASON[reason].inc()
                logger.debug("closing TCP connection from %s: %s", connection.peer, reason.value)
                self._release_inbound(connection)
                connection.transport.abort()

    def _register(self, connection: _StreamProtocol) -> None:
        assert connection.peer is not None
        peer = connection.peer
        self._connections[(peer.transport, peer.host, peer.port)] = connection
        self.stats.tcp_connections += 1
        logger.debug("%s connection with %s opened", peer.transport.upper(), peer)

    def _unregister(self, connection: _StreamProtocol) -> None:
        self._release_inbound(connection)
        for key in [key for key, value in self._connections.items() if value is connection]:
            del self._connections[key]
        if connection.peer is not None:
            logger.debug("TCP connection with %s closed", connection.peer)

    def _on_datagram(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        """UDP framing: Content-Length bounds the message, trailing bytes are ignored."""
        peer = Peer("udp", _normalize_host(str(addr[0])), int(addr[1]))
        if len(data) > self.max_message_size:
            self._count_oversize(peer, f"{len(data)}-byte datagram")
            return
        data = data.lstrip(b"\r\n")
        if not data:
            return  # keep-alive
        end = data.find(_HEADER_END)
        if end < 0:
            self._count_malformed(peer, "no end of headers")
            return
        try:
            length = _content_length(data[:end])
        except ValueError as exc:
            self._count_malformed(peer, str(exc))
            return
        if length is not None:
            total = end + len(_HEADER_END) + length
            if total > len(data):
                self._count_malformed(peer, "body shorter than Content-Length")
                return
            data = data[:total]
        self._deliver(data, peer)

    def _deliver(self, data: bytes, peer: Peer) -> None:
        """Parse one framed message, stamp the Via of requests, hand it to the handler."""
        try:
            message = parse_message(data)
            if isinstance(message, Request):
                _stamp_via(message, peer)
        except BadRequest as bad:
            self._reject(bad, peer)
            return
        except ValueError as exc:
            self._count_malformed(peer, str(exc))
            return
        except Exception:
            logger.exception("parser failed unexpectedly on a message from %s", peer)
            self._count_malformed(peer, "parser error")
            return
        self.stats.received += 1
        try:
            self._handler(message, peer)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("SIP message handler failed on a message from %s", peer)

    def _reject(self, bad: BadRequest, peer: Peer) -> None:
        """Hand an answerable bad request up, its Via stamped so the answer finds the peer."""
        try:
            _stamp_via(bad.request, peer)
        except ValueError as exc:
            self._count_malformed(peer, str(exc))
            return
        if self._on_bad_request is None:
            self._count_malformed(peer, str(bad))
            return
        self.stats.rejected_malformed += 1
        try:
            self._on_bad_request(bad, peer)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("bad request handler failed on a message from %s", peer)

    def _count_malformed(self, peer: Peer, reason: str) -> None:
        self.stats.dropped_malformed += 1
        SIP_DROPPED_BY_REASON[SipDropReason.MALFORMED].inc()
        logger.debug("dropped malformed SIP message from %s: %s", peer, reason)

    def _count_oversize(self, peer: Peer, reason: str) -> None:
        self.stats.dropped_oversize += 1
        SIP_DROPPED_BY_REASON[SipDropReason.OVERSIZE].inc()
        # a peer can send these as fast as it likes: one line per interval, with a count
        now = time.monotonic()
        if now >= self._oversize_log_at:
            more = self.stats.dropped_oversize - self._oversize_logged - 1
            logger.warning("dropped oversized SIP message from %s: %s%s", peer, reason,
                           f" ({more} more since the last report)" if more else "")  # fmt: skip
            self._oversize_log_at = now + OVERSIZE_LOG_INTERVAL
            self._oversize_logged = self.stats.dropped_oversize
