"""A registering trunk against Kamailio's registrar (digest auth, 423 below its
Min-Expires), and a call to the registered user through Kamailio reaching ackline as
that trunk's call, which no other rule would have let in."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from carriers.health import HealthChange
from carriers.registration import TrunkRegistrations
from carriers.router import CarrierRouter
from carriers.trunk import Trunk
from gateway.admission import InboundGuard, RefusalReport, TrustedTrunk
from gateway.call import Call, Gateway, GatewayConfig
from gateway.registration import RegistrationClient
from gateway.sip.registration import Backoff, Event, Registered, RegistrationState
from gateway.sip.transaction import TimerSettings
from tests.integration.kamailio import Kamailio, kamailio
from tests.integration.peers import sipp

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

USER = "acme"
CONTACT_USER = "acme-in"
TRUNK = "kam"
MIN_EXPIRES = 6


def trunk(registrar: Kamailio, password: str) -> Trunk:
    return Trunk.model_validate(
        {"name": TRUNK, "host": "127.0.0.1", "port": registrar.port,
         "register": {"username": USER, "password": password, "expires": 2,
                      "contact_user": CONTACT_USER}}
    )  # fmt: skip


async def until_state(
    changes: asyncio.Queue[HealthChange], state: RegistrationState, timeout: float
) -> HealthChange:
    async with asyncio.timeout(timeout):
        while True:
            change = await changes.get()
            if change.aspect == "registration" and change.new == state.value:
                return change


def tee_events(client: RegistrationClient, sink: Callable[[Event], object]) -> None:
    """Lets the test see every registration event after the trunk's own wiring has."""
    wiring = client.on_event
    assert wiring is not None

    def tee(event: Event) -> None:
        wiring(event)
        sink(event)

    client.on_event = tee


def bound(registrar: Kamailio, contact: str) -> bool:
    """Does Kamailio's location table hold ``contact``?"""
    return contact in registrar.rpc("ul.dump")


async def test_register_with_digest_and_423_then_a_call_via_kamailio_is_the_trunks(
    tmp_path: Path,
) -> None:
    password = secrets.token_hex(8)
    (tmp_path / "kamailio").mkdir()
    (tmp_path / "caller").mkdir()
    with kamailio(
        tmp_path / "kamailio", user=USER, password=password, min_expires=MIN_EXPIRES
    ) as registrar:
        calls: list[Call] = []

        async def on_incoming(call: Call) -> None:
            calls.append(call)
            await asyncio.sleep(0.3)  # then we hang up: the caller waits for our BYE

        refused: list[RefusalReport] = []
        # Only a PBX elsewhere is trusted: Kamailio's address is let in by the binding alone.
        guard = InboundGuard([TrustedTrunk.parse("pbx", ["192.0.2.5"])])
        config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TimerSettings(t1=0.05))
        async with Gateway(
            config, on_incoming=on_incoming, guard=guard, on_refused=refused.append
        ) as gw:
            changes: asyncio.Queue[HealthChange] = asyncio.Queue()
            router = CarrierRouter(gw, [trunk(registrar, password)], allowed_countries=["US"],
                                   on_health_change=changes.put_nowait)  # fmt: skip
            registrations = TrunkRegistrations(
                gw, router.trunks, router.health, backoff=Backoff(1.0, 8.0), draw=lambda: 0.0
            )
            refreshed: asyncio.Queue[Event] = asyncio.Queue()
            client = registrations.clients[TRUNK]
            tee_events(client, refreshed.put_nowait)
            contact = f"sip:{CONTACT_USER}@127.0.0.1:{gw.address('udp')[1]}"
            registrations.start()
            try:
                change = await until_state(changes, RegistrationState.REGISTERED, 10)
                # asked for 2 s, told 423 Min-Expires 6, registered for 6
                assert change.reason == f"registered for {MIN_EXPIRES} s", registrar.logs()
                assert client.machine is not None
                assert client.machine.expires == MIN_EXPIRES
                assert router.health.usable(TRUNK)
                assert bound(registrar, contact), registrar.rpc("ul.dump")

                # A caller dials the trunk's user at Kamailio; Kamailio finds our contact.
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
                assert call.trunk == TRUNK  # admitted as the registered trunk's call
                assert call.dialed == CONTACT_USER
                assert refused == []

                # The refresh (half of 6 s) goes through too, on the reused nonce.
                async with asyncio.timeout(8):
                    while not isinstance(await refreshed.get(), Registered):
                        pass
                    while not isinstance(await refreshed.get(), Registered):
                        pass
                assert router.health.usable(TRUNK)
            finally:
                await registrations.close()
                await router.close()
            assert router.health["kam"].registration is RegistrationState.UNREGISTERED
            assert client.outcome is not None
            assert client.outcome.unregistered
            assert not bound(registrar, contact), registrar.rpc("ul.dump")
        # 401, 423, 200, the refresh on the reused nonce (no second challenge), unregister
        assert register_cseqs(registrar) == [1, 2, 3, 4, 5], registrar.logs()


def register_cseqs(registrar: Kamailio) -> list[int]:
    """The CSeq of every REGISTER Kamailio's script logged, in order."""
    return [int(n) for n in re.findall(r"REGISTER \S+ from \S+ cseq (\d+)", registrar.logs())]


async def test_wrong_password_is_refused_by_kamailio_and_the_trunk_stays_down(
    tmp_path: Path,
) -> None:
    with kamailio(tmp_path, user=USER, password=secrets.token_hex(8), min_expires=1) as registrar:
        config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=TimerSettings(t1=0.05))
        async with Gateway(config) as gw:
            changes: asyncio.Queue[HealthChange] = asyncio.Queue()
            router = CarrierRouter(gw, [trunk(registrar, "wrong-" + secrets.token_hex(4))],
                                   allowed_countries=["US"],
                                   on_health_change=changes.put_nowait)  # fmt: skip
            registrations = TrunkRegistrations(gw, router.trunks, router.health, draw=lambda: 0.0)
            registrations.start()
            try:
                change = await until_state(changes, RegistrationState.FAILED, 10)
                assert change.reason.startswith("authentication failed: credentials for realm")
                assert not router.health.usable(TRUNK)
                assert "not registered: failed" in router._unusable_reason(router.trunks[0])
            finally:
                await registrations.close()
                await router.close()
            assert "acme" not in registrar.rpc("ul.dump")
