"""Trunks with ``register:``: one registration per trunk and process, tied into trunk
health (a trunk is down while not registered) and into inbound admission (the calls the
registrar sends to our contact are that trunk's).

Every process with a gateway registers its own contact (its own address and port) under
the trunk's address-of-record, as several phones of one SIP account do; the registrar
then holds one binding per process and delivers calls to one or all of them, as its
policy says. A process that stops removes only its own binding.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Callable, Sequence

from sipmessage import URI

from carriers.health import HealthBoard
from carriers.trunk import Trunk
from gateway.admission import InboundGuard
from gateway.call import Gateway
from gateway.registration import RegisterTarget, RegistrationClient
from gateway.sip.registration import (
    Backoff,
    ContactBindings,
    Event,
    Failed,
    Registered,
    StateChanged,
    Stopped,
)

__all__ = ["UNREGISTER_TIMEOUT", "TrunkRegistrations", "register_target"]

logger = logging.getLogger(__name__)

UNREGISTER_TIMEOUT = 2.0  # seconds a stopping process waits for its unregisters


def register_target(trunk: Trunk) -> RegisterTarget:
    """The SIP side of ``trunk.register``."""
    user = trunk.registration_user()
    register = trunk.registration
    if user is None or register is None:
        raise ValueError(f"trunk {trunk.name} does not register")
    return RegisterTarget(
        registrar=URI.parse(trunk.registrar_uri()),
        user=user,
        contact_user=register.contact_user or user,
        transport=trunk.transport,
        expires=register.expires,
        credentials=trunk.registration_credentials(),
        tls=trunk.tls_client(),
        keepalive=register.keepalive_settings(trunk.transport),
    )


def _ip(host: str | None) -> str | None:
    if host is None:
        return None
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


class TrunkRegistrations:
    """The registrations of every registering trunk in ``trunks``, reported to ``board``.

    Built before the gateway listens (each trunk counts as down from then on); `start`
    once it does, `close` before it stops (the unregisters go out through it).
    """

    def __init__(
        self,
        gateway: Gateway,
        trunks: Sequence[Trunk],
        board: HealthBoard,
        *,
        backoff: Backoff | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.gateway = gateway
        self.board = board
        self.bindings = ContactBindings()
        self.clients: dict[str, RegistrationClient] = {}
        self._trunks = {t.name: t for t in trunks if t.kind == "sip" and t.registration is not None}
        for name, trunk in self._trunks.items():
            board.expect_registration(name)
            self.clients[name] = RegistrationClient(
                gateway,
                register_target(trunk),
                on_event=self._listener(name),
                backoff=backoff,
                draw=draw,
            )

    def __bool__(self) -> bool:
        return bool(self.clients)

    def start(self) -> None:
        """Admit calls to our contacts (a gateway without a guard gets one that only adds
        this, with the default flood limit), then send the first REGISTERs."""
        if self.gateway.guard is None:
            self.gateway.guard = InboundGuard((), bindings=self.bindings)
        else:
            self.gateway.guard.bindings = self.bindings
        for client in self.clients.values():
            client.start()

    async def close(self, timeout: float = UNREGISTER_TIMEOUT) -> None:
        """Unregister every trunk at once, within ``timeout`` seconds altogether."""
        results = await asyncio.gather(
            *(client.close(timeout) for client in self.clients.values()), return_exceptions=True
        )
        for name, result in zip(self.clients, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("unregistering trunk %s failed", name, exc_info=result)

    def _listener(self, name: str) -> Callable[[Event], None]:
        return lambda event: self._on_event(name, event)

    def _on_event(self, name: str, event: Event) -> None:
        trunk = self._trunks[name]
        client = self.clients[name]
        contact_user = client.target.contact_user
        if isinstance(event, Registered):
            sources = {h for h in (client.registrar_host, _ip(trunk.host)) if h is not None}
            self.bindings.bind(contact_user, name, sources, event.until)
        elif isinstance(event, Failed):
            logger.info(
                "trunk %s: registration failed (%s); next attempt in %.1f s",
                name,
                event.reason,
                event.retry_in,
            )
        elif isinstance(event, StateChanged):
            self.board.registration_result(name, event.new, event.reason)
        elif isinstance(event, Stopped):
            self.bindings.unbind(contact_user)
            logger.info(
                "trunk %s: %s",
                name,
                "unregistered" if event.unregistered else f"not unregistered: {event.reason}",
            )
