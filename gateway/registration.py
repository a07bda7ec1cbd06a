"""Registering a contact of a running `Gateway` with a registrar: the asyncio side of
`gateway.sip.registration.Registration`.

The state machine decides; this only puts its REGISTERs through the gateway's endpoint
(each in a non-INVITE client transaction with its retransmissions), feeds back the final
responses, and wakes it at its timers on the event loop.

Over TCP or TLS with no listener of that kind (a TLS client has no certificate to listen
with) the contact is our end of a connection opened first, and the registrar sends its
calls back over that connection (as RFC 5626 clients behind NAT are reached). If it drops,
the next refresh opens a new one and registers the new contact in a fresh binding.

A registered TCP/TLS flow is kept alive with RFC 5626 CRLF pings (`gateway.sip.keepalive`):
a flow that stops answering (a NAT that forgot it, a hung registrar) is dropped within
the keep-alive bound instead of at the next refresh; the trunk counts as failed from then
until a new flow is registered, tried with the usual back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from sipmessage import URI, Request

from gateway.call import Gateway, resolve_target, tls_peer
from gateway.sip.auth import Credentials
from gateway.sip.keepalive import FlowFailed, KeepAlive, KeepAliveSettings
from gateway.sip.message import new_call_id, new_tag
from gateway.sip.registration import (
    Backoff,
    Event,
    Failed,
    Registered,
    Registration,
    RegistrationSettings,
    RegistrationState,
    StateChanged,
    Stopped,
)
from gateway.tls import TlsClientSettings
from gateway.transport import Peer

__all__ = ["RegisterTarget", "RegistrationClient"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegisterTarget:
    """Whom to register with and as whom (the SIP side of a trunk's ``register:``)."""

    registrar: URI  # sip:host[:port][;transport=tcp]
    user: str  # the AOR is sip:user@<registrar host>
    contact_user: str  # the user part of our Contact: what the registrar's calls dial
    transport: str = "udp"
    expires: int = 3600
    credentials: Credentials | None = None
    tls: TlsClientSettings | None = None  # transport tls: how to verify the registrar
    keepalive: KeepAliveSettings | None = None  # TCP/TLS: CRLF pings; None: none


class RegistrationClient:
    """Keeps one contact of ``gateway`` registered until `close`.

    ``on_event`` hears every `gateway.sip.registration` event (state changes, successes,
    failures with their back-off, the final `Stopped`); it must not raise, and is
    logged if it does. The gateway must be listening before `start`.
    """

    def __init__(
        self,
        gateway: Gateway,
        target: RegisterTarget,
        *,
        on_event: Callable[[Event], None] | None = None,
        backoff: Backoff | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.gateway = gateway
        self.target = target
        self.on_event = on_event
        self.backoff = backoff or Backoff()
        self.draw = draw
        self.registrar_host: str | None = None  # where the last REGISTER went (an IP)
        self.machine: Registration | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self.outcome: Stopped | None = None  # how the registration ended
        self._stopped = asyncio.Event()
        self._peer: Peer | None = None  # the registrar, resolved (TLS settings attached)
        self._connection_bound = False  # our contact is our end of a connection to it
        self._connecting: asyncio.Task[None] | None = None
        self._connect_failures = 0
        self._closing = False
        self.keepalive: KeepAlive | None = None  # of the registered flow, while one is
        self._keepalive_timer: asyncio.TimerHandle | None = None
        self._restart: asyncio.TimerHandle | None = None  # re-registering after a dead flow

    @property
    def state(self) -> RegistrationState:
        return self.machine.state if self.machine is not None else RegistrationState.UNREGISTERED

    def start(self) -> None:
        """Send the first REGISTER (the gateway is listening: its address is the Contact);
        over TCP/TLS with no such listener, open the connection first."""
        if self.machine is not None or self._connecting is not None or self._closing:
            return
        kind = self.target.transport
        if kind != "udp" and not self._listens(kind):
            self._connection_bound = True
            self._connecting = asyncio.ensure_future(self._connect_then_start())
            return
        self._begin(None)

    def _listens(self, kind: str) -> bool:
        try:
            self.gateway.endpoint.transport.local_address(kind)
        except OSError:
            return False
        return True

    def _begin(self, peer: Peer | None) -> None:
        """A new binding: a fresh machine whose Contact (and Vias) name our listener, or
        our end of the connection to ``peer``."""
        endpoint = self.gateway.endpoint
        kind = self.target.transport
        contact = endpoint.contact(kind, self.target.contact_user, peer=peer).uri
        registrar = self.target.registrar
        settings = RegistrationSettings(
            registrar=registrar,
            aor=URI(scheme="sip", user=self.target.user, host=registrar.host),
            contact=contact,
            call_id=new_call_id(self.gateway.config.advertised_host),
            from_tag=new_tag(),
            expires=self.target.expires,
            credentials=self.target.credentials,
            backoff=self.backoff,
        )
        self.machine = Registration(
            settings, new_via=lambda: endpoint.via(kind, peer), draw=self.draw
        )
        self.machine.start(self._now())
        self._pump()

    async def _resolve(self) -> Peer:
        registrar = self.target.registrar
        peer = tls_peer(
            await resolve_target(registrar, self.target.transport), registrar, self.target.tls
        )
        self._peer = peer
        return peer

    async def _connect_then_start(self) -> None:
        """Open the connection our contact will name, retrying with the back-off (the trunk
        reported failed meanwhile), then register over it."""
        try:
            while True:
                try:
                    peer = await self._resolve()
                    await self.gateway.endpoint.reach(peer)
                except (OSError, ValueError) as exc:
                    self._connect_failures += 1
                    reason = f"cannot connect to the registrar: {exc}"
                    retry_in = self.backoff.delay(self._connect_failures, self.draw())
                    if self._connect_failures == 1:
                        self._emit(StateChanged(self.state, RegistrationState.FAILED, reason))
                    self._emit(Failed(reason, retry_in))
                    await asyncio.sleep(retry_in)
                    continue
                self._connect_failures = 0
                self._begin(peer)
                return
        finally:
            self._connecting = None

    async def close(self, timeout: float = 2.0) -> bool:
        """Unregister, waiting at most ``timeout`` seconds; True when the registrar
        confirmed it. Either way nothing is sent afterwards."""
        self._closing = True
        self._stop_keepalive()
        if self._restart is not None:
            self._restart.cancel()
            self._restart = None
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        machine = self.machine
        if machine is None:
            return False
        machine.stop(self._now(), timeout)
        self._pump()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopped.wait(), timeout + 0.5)
        self._cancel_timer()
        for task in list(self._sends):
            task.cancel()
        await asyncio.gather(*self._sends, return_exceptions=True)
        return self.outcome is not None and self.outcome.unregistered

    # -- plumbing -----------------------------------------------------------------------------

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _pump(self) -> None:
        machine = self.machine
        assert machine is not None
        for request in machine.requests_to_send():
            task = asyncio.ensure_future(self._send(request))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
        while (event := machine.next_event()) is not None:
            if isinstance(event, Stopped):
                self.outcome = event
                self._stopped.set()
            elif isinstance(event, Registered):
                self._start_keepalive()
            self._emit(event)
        self._cancel_timer()
        at = machine.next_timer_at()
        if at is not None and not machine.stopped:
            self._timer = asyncio.get_running_loop().call_at(at, self._on_timer)

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                logger.exception("registration event handler failed")

    def _on_timer(self) -> None:
        self._timer = None
        assert self.machine is not None
        peer = self._peer
        if (
            self._connection_bound
            and not self._closing
            and peer is not None
            and not self.gateway.endpoint.transport.has_connection(peer)
        ):
            # Our contact named a connection that is gone: nothing can reach it any more.
            logger.info("registrar connection %s closed: registering a new contact", peer)
            self._stop_keepalive()
            self.machine = None
            self.start()
            return
        self.machine.handle_timer(self._now())
        self._pump()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def _send(self, request: Request) -> None:
        """One REGISTER transaction; its outcome goes back to the machine."""
        machine = self.machine
        assert machine is not None
        try:
            peer = self._peer if self._connection_bound and self._peer else await self._resolve()
            self.registrar_host = peer.host
            response = await self.gateway.endpoint.request(request, peer)
        except (OSError, ValueError) as exc:
            machine.no_response(request, self._now(), f"{type(exc).__name__}: {exc}")
        else:
            if response is None:
                machine.no_response(request, self._now(), "no answer (timer F)")
            else:
                machine.receive(response, self._now())
        if self.machine is machine:  # not a binding given up meanwhile (a dead flow)
            self._pump()

    # -- keep-alive -----------------------------------------------------------------------------

    def _start_keepalive(self) -> None:
        """Ping the registered flow, unless it is UDP, keep-alive is off or it is pinged."""
        settings = self.target.keepalive
        if settings is None or self.target.transport == "udp" or self.keepalive is not None:
            return
        if self._peer is None or self._closing:
            return
        self.keepalive = KeepAlive(settings, draw=self.draw)
        self.keepalive.start(self._now())
        self._pump_keepalive()

    def _stop_keepalive(self) -> None:
        if self.keepalive is not None:
            self.keepalive.stop()
            self.keepalive = None
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
            self._keepalive_timer = None

    def _pump_keepalive(self) -> None:
        keepalive, peer = self.keepalive, self._peer
        if keepalive is None or peer is None:
            return
        for _ in range(keepalive.pings_due()):
            try:
                self.gateway.endpoint.transport.ping(peer, lambda: self._on_pong(keepalive))
            except OSError as exc:
                keepalive.write_failed(self._now(), str(exc))
        if (event := keepalive.next_event()) is not None:
            self._flow_failed(event)
            return
        if self._keepalive_timer is not None:
            self._keepalive_timer.cancel()
        at = keepalive.next_timer_at()
        self._keepalive_timer = (
            None if at is None else asyncio.get_running_loop().call_at(at, self._on_keepalive)
        )

    def _on_keepalive(self) -> None:
        self._keepalive_timer = None
        if self.keepalive is not None:
            self.keepalive.handle_timer(self._now())
            self._pump_keepalive()

    def _on_pong(self, keepalive: KeepAlive) -> None:
        if keepalive is self.keepalive:
            keepalive.pong_received(self._now())
            self._pump_keepalive()

    def _flow_failed(self, event: FlowFailed) -> None:
        """The registered flow is dead: drop it, count the trunk down, and register a new
        flow after the back-off (further failures back off as usual from there)."""
        peer = self._peer
        old = self.state
        logger.warning("registrar flow %s is dead: %s", peer, event.reason)
        self._stop_keepalive()
        self._cancel_timer()
        self.machine = None  # the binding names a flow nobody can reach us on any more
        if peer is not None:
            self.gateway.endpoint.transport.drop(peer)
        self._connect_failures = 1  # a connect failing after this backs off from here
        retry_in = self.backoff.delay(1, self.draw())
        self._emit(StateChanged(old, RegistrationState.FAILED, event.reason))
        self._emit(Failed(event.reason, retry_in))
        self._restart = asyncio.get_running_loop().call_later(retry_in, self._restart_now)

    def _restart_now(self) -> None:
        self._restart = None
        if not self._closing:
            self.start()
