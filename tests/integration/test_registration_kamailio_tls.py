"""A trunk registering over TLS with Kamailio's registrar (its tls module, a certificate
made for this run): the certificate verified against the trunk's ``ca_file``, digest auth,
a refresh, a call from Kamailio to our contact over that TLS connection admitted as the
trunk's call, and the unregister on shutdown. A registrar whose certificate the CA file
does not vouch for is never sent a REGISTER."""

from __future__ import annotations

import asyncio
import re
import secrets
from pathlib import Path

import pytest

from carriers.health import HealthChange
from carriers.registration import TrunkRegistrations
from carriers.router import CarrierRouter
from carriers.trunk import Trunk
from gateway.admission import InboundGuard, RefusalReport, TrustedTrunk
from gateway.call import Call, Gateway, GatewayConfig
from gateway.sip.keepalive import KeepAliveSettings, KeepAliveState
from gateway.sip.registration import Backoff, Event, Failed, Registered, RegistrationState
from gateway.sip.transaction import TimerSettings
from tests.integration.fault_proxy import FaultProxy
from tests.integration.kamailio import Kamailio, kamailio
from tests.integration.peers import sipp
from tests.integration.test_registration_kamailio import (
    bound,
    register_cseqs,
    tee_events,
    until_state,
)
from tests.tls_certs import make_pki

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

USER = "acme"
CONTACT_USER = "acme-in"
TRUNK = "kamtls"


def tls_trunk(registrar: Kamailio, password: str, ca_file: Path) -> Trunk:
    return Trunk.model_validate(
        {"name": TRUNK, "host": "127.0.0.1", "port": registrar.tls_port, "transport": "tls",
         "tls": {"ca_file": str(ca_file)},
         "register": {"username": USER, "password": password, "expires": 6,
                      "contact_user": CONTACT_USER}}
    )  # fmt: skip


async def test_register_over_tls_then_a_call_over_that_connection_is_the_trunks(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    password = secrets.token_hex(8)
    (tmp_path / "kamailio").mkdir()
    (tmp_path / "caller").mkdir()
    with kamailio(
        tmp_path / "kamailio", user=USER, password=password, min_expires=1, tls=pki
    ) as registrar:
        calls: list[Call] = []

        async def on_incoming(call: Call) -> None:
            calls.append(call)
            await asyncio.sleep(0.3)  # then we hang up: the caller waits for our BYE

        refused: list[RefusalReport] = []
        guard = InboundGuard([TrustedTrunk.parse("pbx", ["192.0.2.5"])])
        # No TLS listener (no certificate of ours): the contact is our end of the connection.
        config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TimerSettings(t1=0.05))
        async with Gateway(
            config, on_incoming=on_incoming, guard=guard, on_refused=refused.append
        ) as gw:
            changes: asyncio.Queue[HealthChange] = asyncio.Queue()
            router = CarrierRouter(gw, [tls_trunk(registrar, password, pki.ca_cert)],
                                   allowed_countries=["US"],
                                   on_health_change=changes.put_nowait)  # fmt: skip
            registrations = TrunkRegistrations(
                gw, router.trunks, router.health, backoff=Backoff(1.0, 8.0), draw=lambda: 0.0
            )
            events: asyncio.Queue[Event] = asyncio.Queue()
            client = registrations.clients[TRUNK]
            tee_events(client, events.put_nowait)
            registrations.start()
            try:
                change = await until_state(changes, RegistrationState.REGISTERED, 10)
                assert change.reason == "registered for 6 s", registrar.logs()
                assert client.machine is not None
                contact = client.machine.settings.contact
                assert contact.parameters.get("transport") == "tls"
                assert bound(registrar, f"sip:{CONTACT_USER}@127.0.0.1:{contact.port}")
                dump = registrar.rpc("ul.dump")
                assert "tls:127.0.0.1" in dump.lower(), dump  # the binding's socket is TLS

                # A caller dials the trunk's user at Kamailio over UDP; Kamailio relays the
                # INVITE to our contact over the TLS connection we registered on.
                with sipp(
                    "uac_via_registrar.xml",
                    tmp_path / "caller",
                    remote=f"127.0.0.1:{registrar.port}",
                    USER=USER,
                ) as caller:
                    assert await asyncio.to_thread(caller.wait, 20) == 0, (
                        caller.logs() + registrar.logs()
                    )
                [call] = calls
                assert call.trunk == TRUNK
                assert call.dialed == CONTACT_USER
                assert call.result is not None
                assert call.result.transport == "tls"
                assert refused == []

                # The refresh (half of 6 s) goes over the same connection and contact: the
                # second Registered (the first was the initial registration's).
                async with asyncio.timeout(8):
                    for _ in range(2):
                        while not isinstance(await events.get(), Registered):
                            pass
                assert client.machine.settings.contact == contact
                assert router.health.usable(TRUNK)
            finally:
                await registrations.close()
                await router.close()
            assert router.health[TRUNK].registration is RegistrationState.UNREGISTERED
            assert client.outcome is not None
            assert client.outcome.unregistered
            assert CONTACT_USER not in registrar.rpc("ul.dump")
        # 401, 200, the refresh, the unregister: all four over the one TLS connection
        assert register_cseqs(registrar) == [1, 2, 3, 4], registrar.logs()
        sources = re.findall(r"REGISTER \S+ from 127\.0\.0\.1:(\d+) ", registrar.logs())
        assert sources == [str(contact.port)] * 4, registrar.logs()


async def test_a_registrar_certificate_the_ca_file_does_not_vouch_for_gets_no_register(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other", name="other")
    password = secrets.token_hex(8)
    (tmp_path / "kamailio").mkdir()
    with kamailio(
        tmp_path / "kamailio", user=USER, password=password, min_expires=1, tls=pki
    ) as registrar:
        config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TimerSettings(t1=0.05))
        async with Gateway(config) as gw:
            changes: asyncio.Queue[HealthChange] = asyncio.Queue()
            router = CarrierRouter(gw, [tls_trunk(registrar, password, other.ca_cert)],
                                   allowed_countries=["US"],
                                   on_health_change=changes.put_nowait)  # fmt: skip
            registrations = TrunkRegistrations(gw, router.trunks, router.health, draw=lambda: 0.0)
            registrations.start()
            try:
                change = await until_state(changes, RegistrationState.FAILED, 10)
                assert "TLS certificate verification failed" in change.reason, change.reason
                assert not router.health.usable(TRUNK)
            finally:
                await registrations.close()
                await router.close()
        assert register_cseqs(registrar) == [], registrar.logs()


async def test_a_dropped_registrar_connection_is_replaced_and_its_new_contact_registered(
    tmp_path: Path,
) -> None:
    pki = make_pki(tmp_path / "pki")
    password = secrets.token_hex(8)
    (tmp_path / "kamailio").mkdir()
    with kamailio(
        tmp_path / "kamailio", user=USER, password=password, min_expires=1, tls=pki
    ) as registrar:
        config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TimerSettings(t1=0.05))
        async with Gateway(config) as gw:
            router = CarrierRouter(gw, [tls_trunk(registrar, password, pki.ca_cert)],
                                   allowed_countries=["US"])  # fmt: skip
            registrations = TrunkRegistrations(gw, router.trunks, router.health, draw=lambda: 0.0)
            client = registrations.clients[TRUNK]
            events: asyncio.Queue[Event] = asyncio.Queue()
            tee_events(client, events.put_nowait)
            registrations.start()
            try:
                async with asyncio.timeout(10):
                    while not isinstance(await events.get(), Registered):
                        pass
                assert client.machine is not None
                first = client.machine.settings.contact
                # The registrar's end goes away (a NAT timeout, a restart): drop our side.
                transport = gw.endpoint.transport
                [connection] = [c for c in transport._connections.values() if c.usable]
                assert connection.transport is not None
                connection.transport.abort()
                async with asyncio.timeout(8):  # the refresh, due at half of 6 s
                    while not isinstance(await events.get(), Registered):
                        pass
                second = client.machine.settings.contact
                assert second.port != first.port
                dump = registrar.rpc("ul.dump")
                assert f"sip:{CONTACT_USER}@127.0.0.1:{second.port}" in dump, dump
                assert router.health.usable(TRUNK)
            finally:
                await registrations.close()
                await router.close()
            assert client.outcome is not None
            assert client.outcome.unregistered


async def test_a_black_holed_registrar_flow_is_found_by_keepalive_and_registered_anew(
    tmp_path: Path,
) -> None:
    """RFC 5626 CRLF keep-alive against Kamailio: its pongs keep the flow up; once the path
    swallows everything (a relay the test controls, between us and Kamailio's TLS port)
    the missing pong drops the flow within the keep-alive bound, the trunk is down while
    new connections go nowhere, and once the path is back a new flow is registered."""
    pki = make_pki(tmp_path / "pki")
    password = secrets.token_hex(8)
    (tmp_path / "kamailio").mkdir()
    with kamailio(
        tmp_path / "kamailio", user=USER, password=password, min_expires=1, tls=pki
    ) as registrar:
        assert registrar.tls_port is not None
        async with FaultProxy("127.0.0.1", registrar.tls_port) as path:
            trunk = Trunk.model_validate(
                {"name": TRUNK, "host": "127.0.0.1", "port": path.port, "transport": "tls",
                 "tls": {"ca_file": str(pki.ca_cert)},
                 "register": {"username": USER, "password": password, "expires": 600,
                              "contact_user": CONTACT_USER,
                              "keepalive": 1.0, "keepalive_timeout": 1.0}}
            )  # fmt: skip
            config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TimerSettings(t1=0.05))
            async with Gateway(config) as gw:
                changes: asyncio.Queue[HealthChange] = asyncio.Queue()
                router = CarrierRouter(gw, [trunk], allowed_countries=["US"],
                                       on_health_change=changes.put_nowait)  # fmt: skip
                registrations = TrunkRegistrations(
                    gw, router.trunks, router.health, backoff=Backoff(1.0, 4.0), draw=lambda: 0.0
                )
                client = registrations.clients[TRUNK]
                events: list[Event] = []
                tee_events(client, events.append)
                registrations.start()
                try:
                    await until_state(changes, RegistrationState.REGISTERED, 10)
                    assert client.machine is not None
                    first = client.machine.settings.contact
                    # Kamailio answers the pings: five intervals go by and the flow stands.
                    await asyncio.sleep(5.0)
                    assert client.keepalive is not None
                    assert client.keepalive.state is not KeepAliveState.FAILED
                    assert not any(isinstance(e, Failed) for e in events), events
                    assert router.health.usable(TRUNK)

                    path.blackhole()
                    cut_at = asyncio.get_running_loop().time()
                    bound = KeepAliveSettings(1.0, pong_timeout=1.0).detection_bound
                    change = await until_state(changes, RegistrationState.FAILED, bound + 2)
                    detected_in = asyncio.get_running_loop().time() - cut_at
                    assert detected_in <= bound + 0.5, detected_in
                    assert change.reason.startswith("keep-alive: no pong"), change.reason
                    assert not router.health.usable(TRUNK)

                    # New connections go nowhere either (the TLS handshake times out):
                    # the trunk stays down, retried with the back-off.
                    await asyncio.sleep(3.0)
                    assert not router.health.usable(TRUNK)

                    await path.restore()
                    await until_state(changes, RegistrationState.REGISTERED, 20)
                    second = client.machine.settings.contact
                    assert second.port != first.port
                    dump = registrar.rpc("ul.dump")
                    assert f"sip:{CONTACT_USER}@127.0.0.1:{second.port}" in dump, dump
                    assert router.health.usable(TRUNK)
                finally:
                    await registrations.close()
                    await router.close()
                assert client.outcome is not None
                assert client.outcome.unregistered
