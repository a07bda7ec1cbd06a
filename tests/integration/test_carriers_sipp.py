"""Carrier failover against several SIPp UAS instances on loopback, each acting as a carrier.

Each SIPp listens on its own port; the router dials them through ``Gateway.dial`` exactly
as in production. SIPp's exit code and message trace show which carriers saw an INVITE.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from carriers.health import HealthChange, HealthPolicy
from carriers.numbers import FraudRefused, InvalidNumber
from carriers.rotation import AttemptKind
from carriers.router import CarrierRouter, NoRouteAvailable, RoutedCall
from carriers.trunk import Trunk
from gateway.call import Gateway, GatewayConfig
from gateway.result import CallOutcome
from gateway.sip.transaction import TimerSettings
from tests.integration.peers import SippRun, free_port, sipp

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

TIMERS = TimerSettings(t1=0.05)  # timer B 3.2 s: abandoned INVITEs clear up quickly
NUMBER = "+14155550101"  # fictional (555-01xx)


@asynccontextmanager
async def gateway() -> AsyncIterator[Gateway]:
    config = GatewayConfig(host="127.0.0.1", udp_port=0, tcp_port=0, timers=TIMERS)
    async with Gateway(config) as gw:
        yield gw


@asynccontextmanager
async def router(gw: Gateway, trunks: list[Trunk], **options: Any) -> AsyncIterator[CarrierRouter]:
    options.setdefault("allowed_countries", ["US", "GB"])
    r = CarrierRouter(gw, trunks, options.pop("strategy", "priority"), **options)
    try:
        yield r
    finally:
        await r.close()


def carrier(name: str, peer: SippRun, **values: Any) -> Trunk:
    return Trunk.model_validate(
        {"name": name, "host": "127.0.0.1", "port": peer.port, "trying_timeout": 0.4, **values}
    )


def sipp_dir(tmp: Path, name: str) -> Path:
    path = tmp / name
    path.mkdir()
    return path


def invites_seen(peer: SippRun) -> int:
    """INVITEs SIPp received, from its message trace (no trace file: none)."""
    count = 0
    for path in peer.workdir.glob("*_messages.log"):
        text = path.read_text(errors="replace")
        count += len(re.findall(r"message received \[\d+\] bytes :\s*INVITE ", text))
    return count


def log_lines(peer: SippRun, prefix: str) -> list[str]:
    return [line for line in peer.log_lines() if line.startswith(prefix)]


async def sipp_exit(peer: SippRun, timeout: float = 10) -> int:
    return await asyncio.to_thread(peer.wait, timeout)


async def place(r: CarrierRouter, number: str = NUMBER, ring_timeout: float = 5) -> RoutedCall:
    return await asyncio.wait_for(r.place_call(number, ring_timeout=ring_timeout), 15)


def path_of(routed: RoutedCall | NoRouteAvailable) -> list[tuple[str, str, int | None]]:
    return [(a.trunk, a.outcome.value, a.sip_code) for a in routed.attempts]


# -- failover path ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_503_then_silent_then_answered(tmp_path: Path, transport: str) -> None:
    """The call lands on the healthy carrier; attempts record the path with reasons."""
    with ExitStack() as stack:
        failing = stack.enter_context(
            sipp(
                "uas_reject.xml",
                sipp_dir(tmp_path, "failing"),
                transport=transport,
                CODE="503",
                PHRASE="Service Unavailable",
            )
        )
        silent = stack.enter_context(
            sipp(
                "carrier_silent.xml",
                sipp_dir(tmp_path, "silent"),
                transport=transport,
                HOLD_MS="8000",
            )
        )
        healthy = stack.enter_context(
            sipp(
                "carrier_uas.xml", sipp_dir(tmp_path, "healthy"), transport=transport, RING_MS="50"
            )
        )
        trunks = [
            carrier("failing", failing, priority=1, transport=transport),
            carrier("silent", silent, priority=2, transport=transport, trying_timeout=0.3),
            carrier("healthy", healthy, priority=3, transport=transport),
        ]
        async with gateway() as gw, router(gw, trunks) as r:
            started = time.monotonic()
            routed = await place(r)
            setup = time.monotonic() - started
            assert routed.answered, routed.attempts
            assert routed.trunk == "healthy"
            assert r.active("healthy") == 1
            result = await asyncio.wait_for(routed.call.hangup(), 5)  # the test hangs up
            await asyncio.sleep(0)
            assert r.active("healthy") == 0
        assert await sipp_exit(failing) == 0, failing.logs()  # 503 was ACKed
        assert await sipp_exit(healthy) == 0, healthy.logs()  # ACK, then our BYE
        assert log_lines(silent, "INVITE swallowed"), silent.logs()  # it did get the INVITE
        assert invites_seen(healthy) == 1
    assert path_of(routed) == [
        ("failing", "carrier_error", 503),
        ("silent", "no_trying", None),
        ("healthy", "answered", 200),
    ]
    first, second, third = routed.attempts
    assert first.reason == "Service Unavailable"
    assert not first.final
    assert "trying_timeout 0.3 s" in second.reason
    assert not second.final
    assert 280 <= second.elapsed_ms < 1000, second
    assert third.final
    assert setup < 3.0  # 503 at once + 0.3 s of silence + answer
    assert result.outcome == CallOutcome.ANSWERED
    assert result.hangup_by == "local"
    assert routed.destination.e164 == NUMBER


@pytest.mark.parametrize(
    ("code", "phrase", "outcome"),
    [
        (486, "Busy Here", CallOutcome.BUSY),
        (600, "Busy Everywhere", CallOutcome.BUSY),
        (603, "Decline", CallOutcome.REJECTED),
        (480, "Temporarily Unavailable", CallOutcome.NO_ANSWER),
    ],
)
async def test_decline_is_final_second_carrier_never_rings(
    tmp_path: Path, code: int, phrase: str, outcome: CallOutcome
) -> None:
    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "first"), CODE=str(code), PHRASE=phrase) as first,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "second"), RING_MS="0") as second,
    ):
        trunks = [carrier("first", first, priority=1), carrier("second", second, priority=2)]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r)
        assert await sipp_exit(first) == 0, first.logs()
        assert invites_seen(first) == 1  # the trace check below does see INVITEs
        await asyncio.sleep(0.3)  # give a (wrong) second INVITE time to arrive
        assert second.process.poll() is None  # still waiting: it never got a call
        assert invites_seen(second) == 0, second.logs()
    assert path_of(routed) == [("first", routed.attempts[0].outcome.value, code)]
    assert routed.attempts[0].final
    assert routed.trunk == "first"
    assert not routed.answered
    assert routed.call.result is not None
    assert routed.call.result.outcome == outcome


@pytest.mark.parametrize("code", [403, 404, 408, 500, 502, 503])
async def test_carrier_errors_fail_over(tmp_path: Path, code: int) -> None:
    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "first"), CODE=str(code), PHRASE="Nope") as first,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "second"), RING_MS="0") as second,
    ):
        trunks = [carrier("first", first, priority=1), carrier("second", second, priority=2)]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r)
            await asyncio.wait_for(routed.call.hangup(), 5)
        assert await sipp_exit(second) == 0, second.logs()
    assert path_of(routed) == [("first", "carrier_error", code), ("second", "answered", 200)]


async def test_connection_refused_is_a_transport_error(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens: TCP connect is refused at once
    with sipp("carrier_uas.xml", sipp_dir(tmp_path, "up"), RING_MS="0") as up:
        trunks = [
            Trunk(name="dead", host="127.0.0.1", port=dead, transport="tcp", priority=1),
            carrier("up", up, priority=2),
        ]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r)
            await asyncio.wait_for(routed.call.hangup(), 5)
        assert await sipp_exit(up) == 0, up.logs()
    assert path_of(routed) == [("dead", "transport_error", None), ("up", "answered", 200)]
    assert "transport error" in routed.attempts[0].reason
    assert routed.attempts[0].elapsed_ms < 1000  # no waiting for trying_timeout


async def test_every_carrier_failing_raises_no_route(tmp_path: Path) -> None:
    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "a"), CODE="503", PHRASE="Overloaded") as a,
        sipp("carrier_silent.xml", sipp_dir(tmp_path, "b"), HOLD_MS="6000") as b,
    ):
        trunks = [carrier("a", a, priority=1), carrier("b", b, priority=2, trying_timeout=0.2)]
        async with gateway() as gw, router(gw, trunks) as r:
            with pytest.raises(NoRouteAvailable) as info:
                await place(r)
    message = str(info.value)
    assert "every trunk failed" in message
    assert "a: carrier_error 503 (Overloaded)" in message
    assert "b: no_trying (no response within trying_timeout 0.2 s)" in message
    assert path_of(info.value) == [("a", "carrier_error", 503), ("b", "no_trying", None)]


# -- guard, budgets, breaker, per-trunk settings -----------------------------------------------


async def test_fraud_and_invalid_numbers_never_reach_a_carrier(tmp_path: Path) -> None:
    with sipp("carrier_uas.xml", sipp_dir(tmp_path, "c"), RING_MS="0") as c:
        trunks = [carrier("c", c), carrier("us-only", c, allowed_countries=["US"])]
        async with gateway() as gw, router(gw, trunks, allowed_countries=["US", "GB"]) as r:
            with pytest.raises(FraudRefused, match="premium_rate"):
                await place(r, "+19005550100")
            with pytest.raises(FraudRefused, match="country DE"):
                await place(r, "+4930123456")  # phonenumbers' DE example number
            with pytest.raises(InvalidNumber):
                await place(r, "+15550100")
            trunks_gb = [carrier("us-only", c, allowed_countries=["US"])]
            async with router(gw, trunks_gb) as us_only:
                with pytest.raises(FraudRefused, match="no trunk allows calls to GB"):
                    await place(us_only, "+447400123456")  # GB example mobile
        await asyncio.sleep(0.2)
        assert invites_seen(c) == 0, c.logs()


async def test_number_format_and_caller_id_reach_the_carrier(tmp_path: Path) -> None:
    with sipp("carrier_uas.xml", sipp_dir(tmp_path, "c"), RING_MS="0") as c:
        trunks = [carrier("c", c, number_format="national", caller_id="+14155550100")]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r, "+1 415 555 0123")
            await asyncio.wait_for(routed.call.hangup(), 5)
        assert await sipp_exit(c) == 0, c.logs()
        lines = log_lines(c, "INVITE ")
    assert lines, lines
    assert "user=4155550123 " in lines[0], lines
    assert "caller=+14155550100" in lines[0], lines


async def test_trunk_digest_credentials_are_used(tmp_path: Path) -> None:
    with sipp("uas_auth_401.xml", sipp_dir(tmp_path, "auth"), QOP_PARAM=', qop="auth"') as auth:
        trunks = [carrier("auth", auth, username="alice", password="s3cret-for-tests")]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r)
            result = await asyncio.wait_for(routed.call.hangup(), 5)
        assert await sipp_exit(auth) == 0, auth.logs()
    assert routed.answered
    assert result.authenticated
    assert path_of(routed) == [("auth", "answered", 200)]


async def test_max_concurrent_moves_the_next_call_on(tmp_path: Path) -> None:
    with (
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "small"), RING_MS="0") as small,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "big"), RING_MS="0") as big,
    ):
        trunks = [
            carrier("small", small, priority=1, max_concurrent=1),
            carrier("big", big, priority=2),
        ]
        async with gateway() as gw, router(gw, trunks) as r:
            first = await place(r)
            second = await place(r, "+14155550102")
            assert (first.trunk, second.trunk) == ("small", "big")
            assert [(s.trunk, s.reason) for s in second.skipped] == [
                ("small", "max_concurrent reached (1)")
            ]
            await asyncio.wait_for(first.call.hangup(), 5)
            await asyncio.sleep(0)
            assert r.active("small") == 0
            await asyncio.wait_for(second.call.hangup(), 5)
        assert await sipp_exit(small) == 0
        assert await sipp_exit(big) == 0


async def test_max_cps_skips_a_trunk_over_budget(tmp_path: Path) -> None:
    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "slow"), CODE="486", PHRASE="Busy") as slow,
        sipp("uas_reject.xml", sipp_dir(tmp_path, "other"), CODE="486", PHRASE="Busy") as other,
    ):
        trunks = [
            carrier("slow", slow, priority=1, max_cps=0.2),  # one call, then 5 s until the next
            carrier("other", other, priority=2),
        ]
        async with gateway() as gw, router(gw, trunks) as r:
            first = await place(r)
            second = await place(r, "+14155550102")
    assert (first.trunk, second.trunk) == ("slow", "other")
    assert [(s.trunk, s.reason) for s in second.skipped] == [("slow", "max_cps reached (0.2/s)")]


async def test_breaker_opens_on_live_failures_then_half_opens(tmp_path: Path) -> None:
    changes: list[HealthChange] = []
    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "flaky"), CODE="500", PHRASE="Oops") as flaky,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "steady"), RING_MS="0", calls=3) as steady,
    ):
        trunks = [carrier("flaky", flaky, priority=1), carrier("steady", steady, priority=2)]
        policy = HealthPolicy(breaker_failures=1, breaker_cooldown=0.5)
        async with (
            gateway() as gw,
            router(gw, trunks, health=policy, on_health_change=changes.append) as r,
        ):
            first = await place(r)
            await asyncio.wait_for(first.call.hangup(), 5)
            second = await place(r, "+14155550102")  # breaker open: flaky not even tried
            await asyncio.wait_for(second.call.hangup(), 5)
            assert REGISTRY.get_sample_value("ackline_trunk_breaker_state", {"trunk": "flaky"}) == 2
            await asyncio.sleep(0.6)  # cool-down over: one trial goes to flaky (SIPp is gone)
            third = await place(r, "+14155550103")
            await asyncio.wait_for(third.call.hangup(), 5)
        assert await sipp_exit(steady) == 0, steady.logs()
    assert path_of(first) == [("flaky", "carrier_error", 500), ("steady", "answered", 200)]
    assert path_of(second) == [("steady", "answered", 200)]
    assert [(s.trunk, s.reason) for s in second.skipped] == [
        ("flaky", "breaker open (recent call failures)")
    ]
    assert [a.trunk for a in third.attempts] == ["flaky", "steady"]
    assert third.attempts[0].outcome in (AttemptKind.NO_TRYING, AttemptKind.TRANSPORT_ERROR)
    assert [(c.trunk, c.new) for c in changes] == [
        ("flaky", "open"),
        ("flaky", "half_open"),
        ("flaky", "open"),
    ]


# -- OPTIONS probing ---------------------------------------------------------------------------


@contextlib.contextmanager
def options_peer(tmp: Path, name: str, port: int) -> Iterator[SippRun]:
    with sipp("carrier_uas.xml", sipp_dir(tmp, name), port=port, calls=10_000, RING_MS="0") as p:
        yield p


async def wait_for_change(
    changes: list[HealthChange], count: int, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while len(changes) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}: {changes}")
        await asyncio.sleep(0.02)


async def test_probes_mark_a_killed_carrier_down_and_a_restarted_one_up(tmp_path: Path) -> None:
    port = free_port()
    changes: list[HealthChange] = []
    policy = HealthPolicy(down_after=3, up_after=2)
    trunks = [Trunk(name="probed", host="127.0.0.1", port=port, trying_timeout=0.2)]
    async with (
        gateway() as gw,
        router(gw, trunks, health=policy, on_health_change=changes.append) as r,
    ):
        prober = r.prober(interval=0.15)
        async with prober:
            with options_peer(tmp_path, "first", port) as peer:
                await asyncio.sleep(0.5)  # a few answered probes
                assert changes == []
                assert r.health.usable("probed")
                assert REGISTRY.get_sample_value("ackline_trunk_up", {"trunk": "probed"}) == 1
                peer.process.kill()
                killed_at = time.monotonic()
                peer.process.wait()
            await wait_for_change(changes, 1, 5, "probe down")
            down_after_s = time.monotonic() - killed_at
            assert (changes[0].aspect, changes[0].new) == ("probe", "down")
            assert "3 probes failed" in changes[0].reason
            assert REGISTRY.get_sample_value("ackline_trunk_up", {"trunk": "probed"}) == 0
            with pytest.raises(NoRouteAvailable, match=r"down \(OPTIONS probes failing\)"):
                await place(r)
            with options_peer(tmp_path, "restarted", port) as peer:
                restarted_at = time.monotonic()
                await wait_for_change(changes, 2, 5, "probe up")
                up_after_s = time.monotonic() - restarted_at
                assert (changes[1].aspect, changes[1].new) == ("probe", "up")
                assert REGISTRY.get_sample_value("ackline_trunk_up", {"trunk": "probed"}) == 1
                routed = await place(r)  # usable again
                assert routed.answered
                await asyncio.wait_for(routed.call.hangup(), 5)
        sent = prober.probes_sent
        await asyncio.sleep(0.4)
        assert prober.probes_sent == sent  # closed: no more probes
    # 3 failures at 0.15 s intervals, each waiting up to 0.2 s: about 1 s.
    assert down_after_s < 2.5, down_after_s
    assert up_after_s < 2.0, up_after_s
    assert len(changes) == 2  # no flapping in between


# -- abandoned and cancelled attempts are cleaned up ----------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_late_ringing_after_trying_timeout_is_cancelled(
    tmp_path: Path, transport: str
) -> None:
    """The silent carrier rings after we moved on: it gets a CANCEL, not a second call."""
    with (
        sipp(
            "carrier_late_ringing.xml",
            sipp_dir(tmp_path, "slow"),
            transport=transport,
            DELAY_MS="600",
        ) as slow,
        sipp(
            "carrier_uas.xml", sipp_dir(tmp_path, "fast"), transport=transport, RING_MS="0"
        ) as fast,
    ):
        trunks = [
            carrier("slow", slow, priority=1, transport=transport, trying_timeout=0.3),
            carrier("fast", fast, priority=2, transport=transport),
        ]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r)
            assert path_of(routed) == [("slow", "no_trying", None), ("fast", "answered", 200)]
            assert await sipp_exit(slow) == 0, slow.logs()  # CANCEL came, 487 was ACKed
            await asyncio.wait_for(routed.call.hangup(), 5)
        assert await sipp_exit(fast) == 0, fast.logs()
        assert log_lines(slow, "CANCEL CSeq 1"), slow.logs()


async def test_late_answer_after_trying_timeout_is_released(tmp_path: Path) -> None:
    """A 200 from a carrier we gave up on is ACKed and hung up at once (BYE)."""
    with (
        sipp("carrier_late_answer.xml", sipp_dir(tmp_path, "slow"), DELAY_MS="600") as slow,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "fast"), RING_MS="0") as fast,
    ):
        trunks = [
            carrier("slow", slow, priority=1, trying_timeout=0.3),
            carrier("fast", fast, priority=2),
        ]
        async with gateway() as gw, router(gw, trunks) as r:
            routed = await place(r)
            assert routed.trunk == "fast"
            assert routed.answered
            assert await sipp_exit(slow) == 0, slow.logs()  # ACK, then our BYE
            assert r.active("slow") == 0
            await asyncio.wait_for(routed.call.hangup(), 5)
        assert await sipp_exit(fast) == 0, fast.logs()
        assert log_lines(slow, "BYE received")


async def test_cancelling_place_call_cancels_the_ringing_invite(tmp_path: Path) -> None:
    """The alert was acknowledged elsewhere: the router's caller goes away mid-ring."""
    with sipp("uas_ring_cancel.xml", sipp_dir(tmp_path, "ringing")) as ringing:
        trunks = [carrier("ringing", ringing)]
        async with gateway() as gw, router(gw, trunks) as r:
            task = asyncio.ensure_future(r.place_call(NUMBER, ring_timeout=10))
            await asyncio.sleep(0.5)  # 100 + 180 arrived; the phone rings
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await sipp_exit(ringing, 5) == 0, ringing.logs()  # CANCEL, 487, ACK
            await asyncio.sleep(0.05)
            assert r.active("ringing") == 0
            assert r.health["ringing"].call_failures == 0  # no verdict on the carrier


async def test_config_builds_a_working_router(tmp_path: Path) -> None:
    from carriers.config import load_carriers

    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "a"), CODE="502", PHRASE="Bad Gateway") as a,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "b"), RING_MS="0") as b,
    ):
        config = load_carriers(
            f"""
carriers:
  strategy: quality
  allowed_countries: [US]
  breaker: {{failures: 5, cooldown: 10s}}
  trunks:
    - {{name: a, host: 127.0.0.1, port: {a.port}, priority: 1, trying_timeout: 500ms}}
    - {{name: b, host: 127.0.0.1, port: {b.port}, priority: 2}}
"""
        )
        async with gateway() as gw:
            r = config.router(gw)
            try:
                routed = await place(r)
                await asyncio.wait_for(routed.call.hangup(), 5)
            finally:
                await r.close()
        assert await sipp_exit(b) == 0, b.logs()
    assert path_of(routed) == [("a", "carrier_error", 502), ("b", "answered", 200)]
    assert r.strategy.name == "quality"
    assert r.health.policy.breaker_failures == 5
    assert r.quality.samples("a") == 1
    assert r.quality.failure_rate("a") == 1.0  # fed live
    assert r.quality.asr("b") == 1.0


# -- the voice channel's Dialer shape -------------------------------------------------------------


async def test_carrier_dialer_hands_out_every_attempt(tmp_path: Path) -> None:
    from api.voice_channel import CarrierDialer

    with (
        sipp("uas_reject.xml", sipp_dir(tmp_path, "a"), CODE="503", PHRASE="Down") as a,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "b"), RING_MS="0") as b,
    ):
        trunks = [carrier("a", a, priority=1), carrier("b", b, priority=2)]
        seen: list[Any] = []
        routes: list[RoutedCall] = []
        async with gateway() as gw, router(gw, trunks) as r:
            dialer = CarrierDialer(r, on_routed=routes.append)
            dialed = await asyncio.wait_for(
                dialer.dial(NUMBER, ring_timeout=5, on_call=seen.append), 15
            )
            call = dialed.call
            assert call.answered
            assert dialed.details["trunk"] == "b"
            assert dialed.details["trunks_tried"] == "a:503,b:200"
            await asyncio.wait_for(call.hangup(), 5)
        assert await sipp_exit(b) == 0, b.logs()
    assert len(seen) == 2
    assert seen[1] is call
    assert seen[0] is not call
    assert [path_of(route) for route in routes] == [
        [("a", "carrier_error", 503), ("b", "answered", 200)]
    ]


async def test_hanging_up_the_current_attempt_ends_routing(tmp_path: Path) -> None:
    """What VoiceChannel.cancel does: hang up the call on_call handed out, mid-ring."""
    from api.voice_channel import CarrierDialer

    with (
        sipp("uas_ring_cancel.xml", sipp_dir(tmp_path, "ringing")) as ringing,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "other"), RING_MS="0") as other,
    ):
        trunks = [carrier("ringing", ringing, priority=1), carrier("other", other, priority=2)]
        seen: list[Any] = []
        async with gateway() as gw, router(gw, trunks) as r:
            dialing = asyncio.ensure_future(
                CarrierDialer(r).dial(NUMBER, ring_timeout=10, on_call=seen.append)
            )
            await asyncio.sleep(0.5)
            await asyncio.wait_for(seen[0].hangup(), 5)  # CANCEL
            call = (await asyncio.wait_for(dialing, 5)).call
        assert await sipp_exit(ringing) == 0, ringing.logs()
        await asyncio.sleep(0.2)
        assert invites_seen(other) == 0, other.logs()
    assert call is seen[0]
    assert len(seen) == 1
    assert call.result is not None
    assert call.result.outcome == CallOutcome.CANCELLED


async def test_errors_keep_the_voice_channel_classification(tmp_path: Path) -> None:
    """InvalidNumber / FraudRefused are ValueError (permanent), NoRouteAvailable OSError."""
    trunks = [Trunk(name="nowhere", host="127.0.0.1", port=free_port(), transport="tcp")]
    async with gateway() as gw, router(gw, trunks) as r:
        for number, message in [
            ("+15550100", "not a valid phone number"),  # InvalidNumber
            ("+19005550100", "refusing to call"),  # FraudRefused
        ]:
            with pytest.raises(ValueError, match=message):
                await place(r, number)
        with pytest.raises(OSError, match="every trunk failed"):
            await place(r)


async def test_an_hourly_call_budget_refuses_before_any_carrier_is_touched(tmp_path: Path) -> None:
    from carriers.budgets import CallBudget

    with sipp("carrier_uas.xml", sipp_dir(tmp_path, "c"), calls=3, RING_MS="0") as c:
        budget = CallBudget(per_hour=None, per_number_per_hour=2)
        async with gateway() as gw, router(gw, [carrier("c", c)], call_budget=budget) as r:
            for _ in range(2):
                routed = await place(r)
                await asyncio.wait_for(routed.call.hangup(), 5)
            with pytest.raises(FraudRefused, match="hourly budget for this number spent"):
                await place(r)
            other = await place(r, "+14155550102")  # a different number still goes out
            assert other.call.answered
            await asyncio.wait_for(other.call.hangup(), 5)
        assert await sipp_exit(c) == 0, c.logs()
    assert invites_seen(c) == 3


async def test_quality_learns_time_to_acknowledgement_from_alert_calls(tmp_path: Path) -> None:
    """A responder's key through trunk "keys" raises its score; a trunk whose answered
    calls never deliver a key (DTMF lost on the way) sinks below it."""
    from api.voice_channel import AckMenu, CarrierDialer, VoiceChannel
    from escalation.channels.base import DeliveryStatus
    from prompts import EspeakEngine, PromptCache
    from tests.fakes import make_notification
    from tests.integration.peers import dtmf_pcap

    prompts = PromptCache(tmp_path / "prompts", EspeakEngine())
    scenario = {"CODECS": "0", "RING_MS": "0", "PAUSE_MS": "600"}
    with (
        sipp("uas_answer_dtmf.xml", sipp_dir(tmp_path, "keys"), PCAP=str(dtmf_pcap("1")),
             fields=scenario) as keys,
        sipp("carrier_uas.xml", sipp_dir(tmp_path, "mute"), RING_MS="0") as mute,
    ):  # fmt: skip
        trunks = [carrier("keys", keys, priority=1), carrier("mute", mute, priority=2)]
        config = GatewayConfig(host="127.0.0.1", udp_port=0, tcp_port=0, timers=TIMERS)
        async with Gateway(config, prompts=prompts) as gw, router(gw, trunks) as r:
            channel = VoiceChannel(CarrierDialer(r), menu=AckMenu(prompts=1, digit_timeout=1))
            acked = await asyncio.wait_for(
                channel.send(make_notification("voice", phone=NUMBER)), 30
            )
            assert acked.status is DeliveryStatus.ACKNOWLEDGED, acked
            r.update_trunks([trunks[0].model_copy(update={"enabled": False}), trunks[1]])
            silent = await asyncio.wait_for(
                channel.send(make_notification("voice", phone=NUMBER)), 30
            )
            assert silent.status is DeliveryStatus.NOT_ACKNOWLEDGED, silent
            assert silent.details["trunk"] == "mute"
            keyed, never = r.quality.ack_score("keys"), r.quality.ack_score("mute")
    assert keyed is not None
    assert keyed > 0.8
    assert never == 0.0
