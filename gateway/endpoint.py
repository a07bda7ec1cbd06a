"""The SIP endpoint: glue between the asyncio transport and the sans-IO transactions.

It matches every message to its transaction, drives transaction timers from the event
loop (one ``call_at`` handle per live transaction, re-armed to the earliest deadline),
and hands new requests and transaction events to the user agent above it.

Requests that are refused before any work is done on them (malformed, untrusted, a flood,
a gateway shutting down) are answered statelessly: no transaction is created, so nothing
is kept and nothing is retransmitted for a peer that may never ACK (RFC 3261 8.2.7).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sipmessage import Address, Parameters, Request, Response, Via

from gateway.metrics import SIP_DROPPED_BY_REASON, SipDropReason, count_rejection
from gateway.sip.message import (
    BadRequest,
    Rejection,
    create_rejection,
    create_response,
    new_branch,
)
from gateway.sip.transaction import (
    ClientInviteTransaction,
    ClientNonInviteTransaction,
    Event,
    ResponseReceived,
    ServerInviteTransaction,
    ServerNonInviteTransaction,
    TimerSettings,
    TransactionTerminated,
    TransactionTimeout,
    TransportFailure,
    transaction_key,
)
from gateway.tls import TlsServerSettings
from gateway.transport import Peer, SipTransport, TcpLimits

logger = logging.getLogger(__name__)

ClientTransaction = ClientInviteTransaction | ClientNonInviteTransaction
ServerTransaction = ServerInviteTransaction | ServerNonInviteTransaction
EventHandler = Callable[[Event], None]


@dataclass(eq=False)
class ServerContext:
    """What the user agent needs to answer one incoming request."""

    endpoint: SipEndpoint
    request: Request
    source: Peer
    transaction: ServerTransaction | None  # None for an ACK to a 2xx (it has no transaction)
    on_event: EventHandler | None = None
    final_sent: bool = False
    cancelled: bool = False

    def respond(self, code: int, phrase: str | None = None, **kwargs: Any) -> Response:
        """Build a response to the request and send it through its transaction (see
        `send`: too late is a no-op)."""
        response = create_response(self.request, code, phrase, **kwargs)
        self.send(response)
        return response

    def send(self, response: Response) -> bool:
        """Send through the transaction; False (logged, nothing sent) when it is too late:
        after the final response, or on a transaction that ended (the caller may have
        cancelled while we were answering)."""
        if self.transaction is None:
            raise RuntimeError("an ACK cannot be answered")
        if not self.transaction.can_send(response.code):
            logger.debug(
                "not sending %s to %s %s: transaction is %s",
                response.code,
                self.request.method,
                self.request.call_id,
                self.transaction.state.value,
            )
            return False
        if response.code >= 200:
            self.final_sent = True
        self.endpoint.send_server_response(self, response)
        return True


RequestHandler = Callable[[ServerContext], None]
StrayResponseHandler = Callable[[Response, Peer], None]
# Looks at a new request before any transaction exists for it; a response it returns is
# sent statelessly and the request goes no further.
RequestScreen = Callable[[Request, Peer], Response | None]


@dataclass(eq=False)
class _ClientEntry:
    transaction: ClientTransaction
    peer: Peer
    on_event: EventHandler
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _ServerEntry:
    """A live server transaction. Once the final response is out the entry lets go of the
    context (its parsed request) and keeps only the owner's handler, which is weak where
    the owner is a call, and where re-sent final-response bytes go."""

    transaction: ServerTransaction
    source: Peer
    context: ServerContext | None
    timer: asyncio.TimerHandle | None = None
    on_event: EventHandler | None = None
    reply_to: Peer | None = None


class SipEndpoint:
    """One SIP endpoint: listening sockets, live transactions and their timers."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        advertise: str | None = None,
        timers: TimerSettings | None = None,
        on_request: RequestHandler | None = None,
        on_stray_response: StrayResponseHandler | None = None,
        screen: RequestScreen | None = None,
        tcp_limits: TcpLimits | None = None,
    ) -> None:
        self.host = host  # bound
        self.advertise = advertise  # in our Via and Contact instead of ``host``; None: host
        self.timers = timers or TimerSettings()
        self.on_request = on_request
        self.on_stray_response = on_stray_response
        self.screen = screen
        self.transport = SipTransport(
            self._on_message, on_bad_request=self._on_bad_request, tcp_limits=tcp_limits
        )
        self._clients: dict[str, _ClientEntry] = {}
        self._servers: dict[str, _ServerEntry] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def listen(
        self,
        *,
        udp_port: int | None = 0,
        tcp_port: int | None = None,
        tls_port: int | None = None,
        tls: TlsServerSettings | None = None,
    ) -> None:
        """Open the UDP, TCP and/or TLS listeners (port 0 picks a free port)."""
        self._loop = asyncio.get_running_loop()
        if udp_port is not None:
            await self.transport.listen_udp(self.host, udp_port)
        if tcp_port is not None:
            await self.transport.listen_tcp(self.host, tcp_port)
        if tls_port is not None:
            if tls is None:
                raise ValueError("listening on TLS needs a certificate (TlsServerSettings)")
            await self.transport.listen_tls(self.host, tls_port, tls)

    async def close(self) -> None:
        """Forget every transaction (a client transaction's owner hears a TransportFailure,
        so nobody waits for a response that can no longer arrive) and close the sockets."""
        for entry in list(self._clients.values()):
            if entry.timer:
                entry.timer.cancel()
        for entry in list(self._clients.values()):
            try:
                entry.on_event(TransportFailure())
            except Exception:
                logger.exception("client transaction event handler failed at close")
        for server in list(self._servers.values()):
            if server.timer:
                server.timer.cancel()
        self._clients.clear()
        self._servers.clear()
        for task in list(self._tasks):
            task.cancel()
        await self.transport.close()

    # -- identities -------------------------------------------------------------------

    def sent_by(self, transport: str, peer: Peer | None = None) -> tuple[str, int]:
        """Where peers reach us over ``transport``: the advertised address (the bound one
        when none is set) and the bound port. With no listener of a stream transport (a
        TLS client has no certificate to listen with), our end of the open connection to
        ``peer``: the peer sends its requests back over that connection."""
        try:
            host, port = self.transport.local_address(transport)
        except OSError:
            local = self.transport.connection_address(peer) if peer is not None else None
            if local is None:
                raise
            host, port = local
        return (self.advertise or host, port)

    async def reach(self, peer: Peer) -> None:
        """Make sure requests to ``peer`` can name us: a listener of its transport, or else
        (TCP/TLS) an open connection to it. OSError (a TLS verification failure, refused,
        timed out) when neither can be had."""
        try:
            self.transport.local_address(peer.transport)
        except OSError:
            if peer.transport.lower() == "udp":
                raise
            await self.transport.connect(peer)

    def via(self, transport: str, peer: Peer | None = None) -> Via:
        """A fresh top Via for a new client transaction (rport requested, RFC 3581)."""
        host, port = self.sent_by(transport, peer)
        return Via(
            transport=transport.upper(),
            host=_uri_host(host),
            port=port,
            parameters=Parameters(branch=new_branch(), rport=None),
        )

    def contact(
        self, transport: str, user: str = "ackline", *, sips: bool = False, peer: Peer | None = None
    ) -> Address:
        """Our Contact over ``transport``: ``sips:`` when the dialog is sips (RFC 3261
        8.1.1.8), else ``sip:`` with ``;transport=tcp|tls`` for a stream transport."""
        from sipmessage import URI

        host, port = self.sent_by(transport, peer)
        kind = transport.lower()
        if sips and kind == "tls":
            scheme, params = "sips", Parameters()
        elif kind in ("tcp", "tls"):
            scheme, params = "sip", Parameters(transport=kind)
        else:
            scheme, params = "sip", Parameters()
        return Address(
            uri=URI(scheme=scheme, user=user, host=_uri_host(host), port=port, parameters=params)
        )

    # -- client side --------------------------------------------------------------------

    def start_client_transaction(
        self, request: Request, peer: Peer, on_event: EventHandler
    ) -> ClientTransaction:
        """Send ``request`` in a new client transaction; events arrive through ``on_event``."""
        reliable = peer.transport != "udp"
        transaction: ClientTransaction
        if request.method == "INVITE":
            transaction = ClientInviteTransaction(request, reliable=reliable, timers=self.timers)
        else:
            transaction = ClientNonInviteTransaction(request, reliable=reliable, timers=self.timers)
        entry = _ClientEntry(transaction, peer, on_event)
        self._clients[transaction.key] = entry
        transaction.start(self.loop.time())
        self._pump_client(entry)
        return transaction

    async def request(self, request: Request, peer: Peer) -> Response | None:
        """Send a non-INVITE request and wait for its final response (None on timeout).

        Timer F ends the transaction; the extra wait bound only guards against a bug there.
        """
        future: asyncio.Future[Response | None] = self.loop.create_future()

        def on_event(event: Event) -> None:
            if future.done():
                return
            if isinstance(event, ResponseReceived) and event.response.code >= 200:
                future.set_result(event.response)
            elif isinstance(event, TransactionTimeout | TransportFailure):
                future.set_result(None)

        self.start_client_transaction(request, peer, on_event)
        try:
            return await asyncio.wait_for(
                future, self.timers.timer_f + self.transport.connect_timeout
            )
        except TimeoutError:
            logger.warning("%s to %s: no outcome after timer F", request.method, peer)
            return None

    async def cancel(
        self, invite: ClientInviteTransaction, cancel: Request, peer: Peer
    ) -> Response | None:
        """Send ``cancel`` for ``invite`` and bound the wait for the INVITE's final response
        to 64*T1 from now (RFC 3261 9.1); returns the CANCEL's own final response."""
        entry = self._clients.get(invite.key)
        if entry is not None and entry.transaction is invite:
            invite.cancel_sent(self.loop.time())
            self._pump_client(entry)
        return await self.request(cancel, peer)

    def send_stateless(self, message: Request | Response, peer: Peer) -> None:
        """Send outside any transaction (ACK for 2xx and its retransmissions)."""
        self._spawn(self._send(message, peer, None))

    def send_stateless_response(self, response: Response, source: Peer) -> None:
        """Answer a request without a transaction: sent once, never retransmitted."""
        self._spawn(self._send_response(response, source))

    def _pump_client(self, entry: _ClientEntry) -> None:
        transaction = entry.transaction
        for message in transaction.messages_to_send():
            self._spawn(self._send(message, entry.peer, entry))
        while (event := transaction.next_event()) is not None:
            if isinstance(event, TransactionTerminated):
                self._clients.pop(transaction.key, None)
            try:
                entry.on_event(event)
            except Exception:
                logger.exception("client transaction event handler failed")
            if _last_event_for_owner(transaction, event):
                # The transaction lingers (timer D/K: up to 32 s) only to absorb
                # retransmissions; its owner (a call, a waiting future) may go now.
                entry.on_event = _ignore
        self._arm(entry, transaction.next_timer_at(), self._client_timer)

    def _client_timer(self, entry: _ClientEntry) -> None:
        entry.timer = None
        entry.transaction.handle_timer(self.loop.time())
        self._pump_client(entry)

    # -- server side --------------------------------------------------------------------

    def send_server_response(self, context: ServerContext, response: Response) -> None:
        transaction = context.transaction
        assert transaction is not None
        transaction.send_response(response, self.loop.time())
        entry = self._servers.get(transaction.key)
        if entry is None or entry.transaction is not transaction:
            entry = _ServerEntry(transaction, context.source, context)
        self._pump_server(entry)

    def _pump_server(self, entry: _ServerEntry) -> None:
        transaction = entry.transaction
        for message in transaction.messages_to_send():
            if isinstance(message, bytes):
                if entry.reply_to is not None:
                    self._spawn(self._send_reply(message, entry.reply_to))
                continue
            try:
                entry.reply_to = self.transport.response_target(message, entry.source)
            except OSError as exc:
                logger.info("response to %s not routable: %s", entry.source, exc)
                continue
            self._spawn(self._send_reply(message, entry.reply_to))
        context = entry.context
        if context is not None and context.final_sent:
            # From here on the transaction only absorbs retransmissions (and, for a 2xx,
            # hands a late ACK up): the parsed request need not outlive the owner.
            entry.on_event, entry.context = context.on_event, None
        while (event := transaction.next_event()) is not None:
            if isinstance(event, TransactionTerminated):
                self._servers.pop(transaction.key, None)
            handler = entry.on_event if entry.context is None else entry.context.on_event
            if handler is not None:
                try:
                    handler(event)
                except Exception:
                    logger.exception("server transaction event handler failed")
        self._arm(entry, transaction.next_timer_at(), self._server_timer)

    def _server_timer(self, entry: _ServerEntry) -> None:
        entry.timer = None
        entry.transaction.handle_timer(self.loop.time())
        self._pump_server(entry)

    # -- receive path -------------------------------------------------------------------

    def _on_message(self, message: Request | Response, source: Peer) -> None:
        if isinstance(message, Response):
            self._on_response(message, source)
        else:
            self._on_request(message, source)

    def _on_response(self, response: Response, source: Peer) -> None:
        try:
            key = transaction_key(response)
        except ValueError:
            logger.debug("dropping response without usable Via from %s", source)
            return
        entry = self._clients.get(key)
        if entry is None:
            if self.on_stray_response is not None:
                self.on_stray_response(response, source)
            return
        entry.transaction.receive_response(response, self.loop.time())
        self._pump_client(entry)

    def _on_bad_request(self, bad: BadRequest, source: Peer) -> None:
        """A request the parser refused but that can be answered: say why, statelessly."""
        request, rejection = bad.request, bad.rejection
        if request.method == "ACK":
            SIP_DROPPED_BY_REASON[SipDropReason.MALFORMED].inc()
            return  # an ACK is never answered
        logger.debug("answering %s from %s: %s", request.method, source, bad)
        count_rejection(rejection.code)
        self.send_stateless_response(create_rejection(request, rejection), source)

    def _on_request(self, request: Request, source: Peer) -> None:
        try:
            key = transaction_key(request)
        except ValueError:
            logger.debug("dropping request without usable Via from %s", source)
            return
        existing = self._servers.get(key)
        if existing is not None:
            existing.transaction.receive_request(request, self.loop.time())
            self._pump_server(existing)
            return
        if request.method == "ACK":
            # An ACK for a 2xx is its own (transactionless) request: the dialog handles it.
            self._dispatch(ServerContext(self, request, source, None))
            return
        if self.screen is not None:
            try:
                refusal = self.screen(request, source)
            except Exception:
                logger.exception("request screen failed for %s", request.method)
                refusal = create_rejection(request, Rejection(500, "Server Internal Error"))
            if refusal is not None:
                self.send_stateless_response(refusal, source)
                return
        reliable = source.transport != "udp"
        transaction: ServerTransaction
        if request.method == "INVITE":
            transaction = ServerInviteTransaction(request, reliable=reliable, timers=self.timers)
        else:
            transaction = ServerNonInviteTransaction(request, reliable=reliable, timers=self.timers)
        context = ServerContext(self, request, source, transaction)
        self._servers[transaction.key] = _ServerEntry(transaction, source, context)
        if request.method == "CANCEL":
            self._on_cancel(context)
            return
        self._dispatch(context)

    def _on_cancel(self, cancel: ServerContext) -> None:
        """RFC 3261 §9.2: answer the CANCEL, then let the INVITE's owner send 487."""
        invite_key = transaction_key(cancel.request, method="INVITE")
        invite = self._servers.get(invite_key)
        context = invite.context if invite is not None else None
        if context is None or context.final_sent:
            cancel.respond(481)
            return
        cancel.respond(200)
        context.cancelled = True
        if context.on_event is not None:
            context.on_event(_CANCELLED)
        elif not context.final_sent:
            context.respond(487)

    def _dispatch(self, context: ServerContext) -> None:
        if self.on_request is None:
            if context.transaction is not None:
                context.respond(501)
            return
        try:
            self.on_request(context)
        except Exception:
            logger.exception("request handler failed for %s", context.request.method)
            if context.transaction is not None and not context.final_sent:
                context.respond(500)

    # -- plumbing -------------------------------------------------------------------

    def _arm(self, entry: Any, deadline: float | None, callback: Callable[[Any], None]) -> None:
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None
        if deadline is not None:
            entry.timer = self.loop.call_at(deadline, callback, entry)

    async def _send(
        self, message: Request | Response | bytes, peer: Peer, entry: _ClientEntry | None
    ) -> None:
        try:
            await self.transport.send(message, peer)
        except OSError as exc:
            logger.info("send to %s failed: %s", peer, exc)
            if entry is not None:
                entry.transaction.transport_error(self.loop.time())
                self._pump_client(entry)

    async def _send_response(self, response: Response, source: Peer) -> None:
        try:
            await self.transport.send_response(response, source)
        except OSError as exc:
            logger.info("response to %s failed: %s", source, exc)

    async def _send_reply(self, message: Response | bytes, target: Peer) -> None:
        try:
            await self.transport.send(message, target)
        except OSError as exc:
            logger.info("response to %s failed: %s", target, exc)

    def _spawn(self, coro: Any) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _ignore(event: Event) -> None:
    """The handler of a transaction whose owner has heard all it will act on."""


def _last_event_for_owner(transaction: ClientTransaction, event: Event) -> bool:
    """Nothing after ``event`` reaches the owner but retransmissions it ignores: a final
    response (an INVITE's 2xx excepted: its retransmissions need the caller's ACK again,
    RFC 6026), a timeout or a transport failure."""
    if isinstance(event, TransactionTimeout | TransportFailure | TransactionTerminated):
        return True
    if isinstance(event, ResponseReceived):
        code = event.response.code
        if isinstance(transaction, ClientInviteTransaction):
            return code >= 300
        return code >= 200
    return False


@dataclass(frozen=True)
class CancelReceived:
    """Pseudo-event given to an INVITE's owner when the caller cancelled it."""


_CANCELLED: Any = CancelReceived()


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
