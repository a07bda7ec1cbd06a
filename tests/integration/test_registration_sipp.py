"""Registering trunks against SIPp playing the carrier's registrar on loopback.

Each scenario is one SIPp "call" (every REGISTER of a binding shares its Call-ID) and logs
each REGISTER it receives (CSeq, Call-ID, Expires, whether its credentials check out), so
the test sees what went over the wire; trunk health and registration events say what
ackline made of it. Time is short: expires of a few seconds, T1 50 ms (timer F 3.2 s),
and a back-off starting at 1 s with no jitter.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from carriers.health import HealthChange
from carriers.registration import TrunkRegistrations
from carriers.router import CarrierRouter
from carriers.trunk import Trunk
from gateway.call import Gateway, GatewayConfig
from gateway.sip.registration import Backoff, Event, Failed, Registered, RegistrationState
from gateway.sip.transaction import TimerSettings
from tests.integration.peers import SippRun, serve_gateway, sipp, wait_until
from tests.integration.test_registration_kamailio import tee_events

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

TIMERS = TimerSettings(t1=0.05)  # timer F 3.2 s: a silent registrar is noticed quickly
USER = "acme"
CONTACT_USER = "acme-in"
TRUNK = "carrier-a"


@dataclass
class Registering:
    """A gateway registering one trunk, with what happened to it, in order."""

    gateway: Gateway
    router: CarrierRouter
    registrations: TrunkRegistrations
    changes: asyncio.Queue[HealthChange] = field(default_factory=asyncio.Queue)
    events: asyncio.Queue[tuple[float, Event]] = field(default_factory=asyncio.Queue)

    async def state(self, state: RegistrationState, timeout: float) -> HealthChange:
        """The next registration change to ``state`` (others on the way are skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                change = await self.changes.get()
                if change.aspect == "registration" and change.new == state.value:
                    return change

    async def event(self, kind: type[Any], timeout: float) -> tuple[float, Any]:
        """The next registration event of type ``kind``, with when it happened."""
        async with asyncio.timeout(timeout):
            while True:
                at, event = await self.events.get()
                if isinstance(event, kind):
                    return at, event

    def usable(self) -> bool:
        """A method, not a property: the answer changes between two asserts on it."""
        return self.router.health.usable(TRUNK)


@asynccontextmanager
async def registering(
    port: int, password: str, *, transport: str = "udp", expires: int = 4
) -> AsyncIterator[Registering]:
    trunk = Trunk.model_validate(
        {"name": TRUNK, "host": "127.0.0.1", "port": port, "transport": transport,
         "register": {"username": USER, "password": password, "expires": expires,
                      "contact_user": CONTACT_USER}}
    )  # fmt: skip
    config = GatewayConfig(host="127.0.0.1", udp_port=0, tcp_port=0, timers=TIMERS)
    async with Gateway(config) as gw:
        changes: asyncio.Queue[HealthChange] = asyncio.Queue()
        router = CarrierRouter(
            gw, [trunk], allowed_countries=["US"], on_health_change=changes.put_nowait
        )
        registrations = TrunkRegistrations(
            gw, router.trunks, router.health, backoff=Backoff(1.0, 8.0), draw=lambda: 0.0
        )
        run = Registering(gw, router, registrations, changes)
        client = registrations.clients[TRUNK]
        tee_events(client, lambda event: run.events.put_nowait((time.monotonic(), event)))
        try:
            assert not run.usable()  # down until registered
            registrations.start()
            yield run
        finally:
            await registrations.close()
            await router.close()


@dataclass(frozen=True)
class SeenRegister:
    cseq: int
    call_id: str
    expires: int
    auth: str
    contact_expires: int | None
    at_ms: int


_LINE = re.compile(
    r"REGISTER cseq=(\d+) call-id=(\S+) expires=(\d+)(?: contact-expires=(\d+))? "
    r"auth=(\S+) at=(\d+)"
)


def registers(peer: SippRun) -> list[SeenRegister]:
    """The REGISTERs the SIPp registrar logged, in order."""
    seen = []
    for line in peer.log_lines():
        if (m := _LINE.search(line)) is not None:
            cseq, call_id, expires, contact_expires, auth, at = m.groups()
            seen.append(
                SeenRegister(
                    int(cseq), call_id, int(expires), auth,
                    int(contact_expires) if contact_expires else None, int(at),
                )
            )  # fmt: skip
    return seen


async def sipp_exit(peer: SippRun, timeout: float = 10) -> int:
    return await asyncio.to_thread(peer.wait, timeout)


def credentials() -> dict[str, str]:
    return {"USER": USER, "PASSWORD": secrets.token_hex(8), "NONCE": secrets.token_hex(12)}


# -- digest, refresh, unregister ----------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_401_then_200_refresh_before_expiry_and_unregister(
    tmp_path: Path, transport: str
) -> None:
    values = credentials()
    with sipp("registrar_auth.xml", tmp_path, transport=transport, fields=values) as peer:
        async with registering(peer.port, values["PASSWORD"], transport=transport) as run:
            change = await run.state(RegistrationState.REGISTERED, 5)
            assert change.old == "unregistered"
            assert change.reason == "registered for 4 s"
            assert run.usable()
            report = run.router.health_report(TRUNK)
            assert (report["registration"], report["usable"]) == ("registered", True)
            first_at, first = await run.event(Registered, 1)
            refreshed_at, refreshed = await run.event(Registered, 6)
            assert first.expires == refreshed.expires == 4
            assert 1.5 < refreshed_at - first_at < 3.5  # half-way, well before expiry
            assert run.usable()
        assert await sipp_exit(peer) == 0, peer.logs()
        assert not run.usable()
        assert run.router.health_report(TRUNK)["registration"] == "unregistered"
    seen = registers(peer)
    assert [r.cseq for r in seen] == [1, 2, 3, 4], peer.logs()
    assert len({r.call_id for r in seen}) == 1
    assert [r.expires for r in seen] == [4, 4, 4, 0]
    assert seen[-1].contact_expires == 0
    assert [r.auth for r in seen] == ["none", "true", "true", "true"], peer.logs()


# -- 423 Interval Too Brief ---------------------------------------------------------------------


async def test_423_then_retry_with_min_expires(tmp_path: Path) -> None:
    with sipp("registrar_423.xml", tmp_path, MIN_EXPIRES="60") as peer:
        async with registering(peer.port, "unused", expires=4) as run:
            change = await run.state(RegistrationState.REGISTERED, 5)
            assert change.reason == "registered for 60 s"  # Min-Expires, kept
            _, registered = await run.event(Registered, 1)
            assert registered.expires == 60
            assert run.usable()
        assert await sipp_exit(peer) == 0, peer.logs()
    seen = registers(peer)
    assert [(r.cseq, r.expires) for r in seen] == [(1, 4), (2, 60), (3, 0)], peer.logs()
    assert len({r.call_id for r in seen}) == 1


# -- failures, back-off, recovery ---------------------------------------------------------------


async def test_503_backs_off_then_recovers(tmp_path: Path) -> None:
    with sipp("registrar_503.xml", tmp_path) as peer:
        async with registering(peer.port, "unused") as run:
            failed = await run.state(RegistrationState.FAILED, 5)
            assert failed.reason == "503 Service Unavailable"
            _, event = await run.event(Failed, 1)
            assert event.retry_in == 1.0  # the first back-off step (no jitter here)
            assert not run.usable()
            assert run.router.health_report(TRUNK)["registration"] == "failed"
            recovered = await run.state(RegistrationState.REGISTERED, 5)
            assert recovered.old == "failed"
            assert run.usable()
        assert await sipp_exit(peer) == 0, peer.logs()
    seen = registers(peer)
    assert [(r.cseq, r.expires) for r in seen] == [(1, 4), (2, 4), (3, 0)], peer.logs()
    assert 950 <= seen[1].at_ms - seen[0].at_ms < 2000  # the back-off, not at once


async def test_silent_registrar_times_out_backs_off_then_recovers(tmp_path: Path) -> None:
    with sipp("registrar_silent.xml", tmp_path) as peer:
        async with registering(peer.port, "unused") as run:
            started = time.monotonic()
            failed = await run.state(RegistrationState.FAILED, 10)
            assert failed.reason == "no answer (timer F)"
            assert time.monotonic() - started >= TIMERS.timer_f - 0.1
            assert not run.usable()
            await run.state(RegistrationState.REGISTERED, 5)
            assert run.usable()
        assert await sipp_exit(peer) == 0, peer.logs()
    seen = registers(peer)
    assert [(r.cseq, r.expires) for r in seen] == [(1, 4), (2, 4), (3, 0)], peer.logs()
    assert seen[1].at_ms - seen[0].at_ms >= (TIMERS.timer_f + 1.0) * 1000 - 100
    assert received(peer, "REGISTER", cseq=1) > 3  # timer E resent the unanswered one


def received(peer: SippRun, method: str, *, cseq: int) -> int:
    """How many ``method`` requests with CSeq ``cseq`` SIPp's message trace shows."""
    count = 0
    for path in peer.workdir.glob("*_messages.log"):
        for block in path.read_text(errors="replace").split("message received")[1:]:
            if (
                re.match(rf" \[\d+\] bytes :\s*{method} ", block)
                and f"CSeq: {cseq} {method}" in block
            ):
                count += 1
    return count


# -- ackline serve ------------------------------------------------------------------------------


def test_serve_registers_on_start_and_unregisters_on_sigterm(tmp_path: Path) -> None:
    """The whole wiring: `ackline serve` registers the trunk once it listens (audited), and
    a SIGTERM unregisters it before the gateway stops."""
    values = credentials()
    (tmp_path / "sipp").mkdir()
    with sipp("registrar_auth.xml", tmp_path / "sipp", fields=values) as peer:
        carriers = {
            "allowed_countries": ["US"],
            "trunks": [
                {"name": TRUNK, "host": "127.0.0.1", "port": peer.port,
                 "register": {"username": USER, "password_env": "ACKLINE_TEST_REGISTER_PASSWORD",
                              "expires": 4}},
            ],
        }  # fmt: skip
        (tmp_path / "ackline.yaml").write_text(yaml.safe_dump({"carriers": carriers}))
        env = {
            "ACKLINE_CONFIG": str(tmp_path / "ackline.yaml"),
            "ACKLINE_DATABASE_URL": f"sqlite:///{tmp_path}/ackline.db",
            "ACKLINE_AUDIT_DIR": str(tmp_path / "audit"),
            "ACKLINE_TEST_REGISTER_PASSWORD": values["PASSWORD"],
        }
        with serve_gateway(tmp_path, env=env) as (_port, proc):
            # registered (401, then 200), then refreshed two seconds later
            wait_until(lambda: len(registers(peer)) >= 3 or proc.poll() is not None, 15,
                       "the registration and its refresh")  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        assert peer.wait(10) == 0, peer.logs()
    seen = registers(peer)
    assert [(r.cseq, r.expires, r.auth) for r in seen] == [
        (1, 4, "none"), (2, 4, "true"), (3, 4, "true"), (4, 0, "true")
    ], peer.logs()  # fmt: skip
    audit = [
        json.loads(line)
        for path in (tmp_path / "audit").glob("*.jsonl")
        for line in path.read_text().splitlines()
    ]
    registration = [
        (a["previous"], a["status"]) for a in audit
        if a.get("event") == "trunk_health" and a.get("aspect") == "registration"
    ]  # fmt: skip
    assert registration == [("unregistered", "registered"), ("registered", "unregistered")]
