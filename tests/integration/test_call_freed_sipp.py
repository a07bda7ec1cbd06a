"""Calls are freed by reference counting alone once they end, against SIPp.

With the cyclic garbage collector off, the `Call`, its `Dialog` and its `MediaSession`
must be gone soon after the call ends, outbound (our BYE, the peer's BYE, our CANCEL at
the ring timeout, no answer at all) and inbound (our BYE, the caller's CANCEL, a caller
that never PRACKs). A reference cycle left through a callback, a timer, a future or a
bound method would keep them until a full collection pass, and those passes stall the
event loop when hundreds of calls a second leave garbage behind.
"""

from __future__ import annotations

import asyncio
import gc
import types
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.call import Call, Gateway, GatewayConfig
from gateway.result import CallOutcome
from gateway.sip.transaction import TimerSettings
from tests.integration.peers import dtmf_pcap, sipp
from tests.waiting import wait_until

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

T1 = TimerSettings(t1=0.05)
Refs = dict[str, weakref.ref[Any]]


@pytest.fixture
def no_cycle_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def refs_of(call: Call) -> Refs:
    refs: Refs = {"call": weakref.ref(call)}
    if call.dialog is not None:
        refs["dialog"] = weakref.ref(call.dialog)
    if call.media is not None:
        refs["media"] = weakref.ref(call.media)
    return refs


def cycle_through(obj: object, depth: int = 10) -> str:
    """A reference path from ``obj`` back to itself, for the failure message."""
    seen: set[int] = set()

    def walk(node: object, path: list[object]) -> list[object] | None:
        if len(path) > depth:
            return None
        for child in gc.get_referents(node):
            if child is obj:
                return [*path, child]
            if isinstance(child, type | types.ModuleType) or id(child) in seen:
                continue
            seen.add(id(child))
            found = walk(child, [*path, child])
            if found is not None:
                return found
        return None

    path = walk(obj, [obj])
    if path is None:
        holders = ", ".join(
            _name(r) for r in gc.get_referrers(obj) if not isinstance(r, types.FrameType)
        )
        return f"no cycle through it; held by {holders}"
    names = []
    for node, following in zip(path, [*path[1:], None], strict=True):
        if isinstance(node, dict):
            names.append("[" + ",".join(str(k) for k, v in node.items() if v is following) + "]")
        elif isinstance(node, types.FrameType):
            names.append(f"frame {node.f_code.co_qualname}")
        else:
            names.append(type(node).__name__)
    return " -> ".join(names)


async def all_freed(refs: Refs, gateway: Gateway) -> None:
    """Every weakref dead within a bound, the cycle collector never having run."""
    assert not gc.isenabled()
    # the media's close task and its socket's last callbacks
    await wait_until(
        lambda: not gateway._media_closing and all(r() is None for r in refs.values()),
        5,
        "every weakref dead",
        interval=0.02,
    )
    # (a timeout above fails the test; the message below names the cycle when one is left)


async def check_freed(refs: Refs, gateway: Gateway) -> None:
    try:
        await all_freed(refs, gateway)
    except TimeoutError:
        alive = {name: r() for name, r in refs.items() if r() is not None}
        details = "; ".join(f"{name}: {cycle_through(obj)}" for name, obj in alive.items())
        del alive
        pytest.fail(f"still alive without the cycle collector: {details}")


def _name(node: object) -> str:
    if isinstance(node, dict):
        owners = [
            type(o).__name__ for o in gc.get_referrers(node) if getattr(o, "__dict__", None) is node
        ]
        return f"the __dict__ of {'/'.join(owners) or '?'}"
    code = getattr(node, "gi_code", None) or getattr(node, "cr_code", None)
    if code is not None:
        return f"{type(node).__name__} {code.co_qualname}"
    if isinstance(node, types.CellType):
        return "cell of " + "/".join(type(r).__name__ for r in gc.get_referrers(node))
    return type(node).__name__


OutboundCase = tuple[str, dict[str, str], Callable[[Call], Awaitable[None]], CallOutcome]


async def _hang_up(call: Call) -> None:
    await asyncio.sleep(0.2)
    await call.hangup()


async def _wait_ended(call: Call) -> None:
    await call.ended.wait()


OUTBOUND: dict[str, OutboundCase] = {
    "our-bye": ("uas_answer_wait_bye.xml", {}, _hang_up, CallOutcome.ANSWERED),
    "their-bye": (
        "uas_remote_bye.xml",
        {"PAUSE_MS": "300", "CODECS": "0"},
        _wait_ended,
        CallOutcome.ANSWERED,
    ),
    "our-cancel": ("uas_ring_cancel.xml", {}, _wait_ended, CallOutcome.NO_ANSWER),
    "no-answer": ("uas_ring_silent.xml", {"HOLD_MS": "4000"}, _wait_ended, CallOutcome.NO_ANSWER),
}


@pytest.mark.parametrize("case", list(OUTBOUND))
async def test_an_outbound_call_is_freed_by_reference_counting(
    tmp_path: Path, case: str, no_cycle_collector: None
) -> None:
    scenario, values, finish, outcome = OUTBOUND[case]
    async with Gateway(GatewayConfig(host="127.0.0.1", udp_port=0, timers=T1)) as gw:
        with sipp(scenario, tmp_path, fields=values) as peer:

            async def one_call() -> Refs:
                call = await gw.dial(f"sip:+14155550100@127.0.0.1:{peer.port}", ring_timeout=0.5)
                await finish(call)
                assert call.result is not None, call.result
                assert call.result.outcome is outcome, call.result
                if outcome is CallOutcome.ANSWERED:
                    assert call.dialog is not None
                    assert call.media is not None
                return refs_of(call)

            refs = await one_call()
            await check_freed(refs, gw)


INBOUND: dict[str, tuple[str, dict[str, str], CallOutcome, int]] = {
    # the caller waits for our BYE after its digit
    "our-bye": ("uac_dtmf.xml", {"PAUSE_MS": "200"}, CallOutcome.ANSWERED, 0),
    "their-cancel": ("uac_cancel.xml", {}, CallOutcome.CANCELLED, 3000),
    "no-prack": ("uac_100rel_no_prack.xml", {"WAIT_MS": "6000"}, CallOutcome.FAILED, 0),
}


@pytest.mark.parametrize("case", list(INBOUND))
async def test_an_inbound_call_is_freed_by_reference_counting(
    tmp_path: Path, case: str, no_cycle_collector: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    scenario, values, outcome, ring_ms = INBOUND[case]
    if scenario == "uac_dtmf.xml":
        values = {**values, "PCAP": str(dtmf_pcap("1"))}
    refs: Refs = {}
    take = Call._take

    def watched_take(call: Call, ctx: Any) -> None:  # the call, from its INVITE on
        refs["call"] = weakref.ref(call)
        take(call, ctx)

    monkeypatch.setattr(Call, "_take", watched_take)

    async def on_incoming(call: Call) -> None:  # answered: its dialog and media exist
        refs.update(refs_of(call))
        await call.collect(max_digits=1, timeout=5)

    config = GatewayConfig(host="127.0.0.1", udp_port=0, timers=T1, answer_ring_ms=ring_ms)
    async with Gateway(config, on_incoming=on_incoming) as gw:
        ended: asyncio.Queue[Any] = asyncio.Queue()
        gw.on_call_ended = ended.put_nowait
        host, port = gw.address("udp")
        with sipp(scenario, tmp_path, remote=f"{host}:{port}", fields=values) as peer:
            result = await asyncio.wait_for(ended.get(), 15)
            assert await asyncio.to_thread(peer.wait, 15) == 0, peer.logs()
        assert result.outcome is outcome, result
        assert "call" in refs
        if outcome is CallOutcome.ANSWERED:
            assert {"dialog", "media"} <= set(refs)
        await check_freed(refs, gw)
