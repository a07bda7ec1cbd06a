"""Inbound admission against SIPp as the caller: untrusted sources get 403, a trunk with
credentials must answer a digest challenge (SIPp computes it) before the call is taken.
Refusals are reported aggregated (RefusalReport: the first at once, the rest counted)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.admission import InboundGuard, RefusalReport, TrustedTrunk
from gateway.call import Call, Gateway, GatewayConfig
from tests.integration.peers import sipp

pytestmark = pytest.mark.interop


async def run_caller(
    scenario: str, tmp: Path, guard: InboundGuard, timeout_s: int = 30, **values: str
) -> tuple[int, str, list[RefusalReport], list[Call]]:
    answered: list[Call] = []

    async def on_incoming(call: Call) -> None:
        answered.append(call)
        await asyncio.sleep(0.3)  # then hang up: the scenario waits for our BYE

    refused: list[RefusalReport] = []
    config = GatewayConfig(host="127.0.0.1", udp_port=0)
    async with Gateway(
        config, on_incoming=on_incoming, guard=guard, on_refused=refused.append
    ) as gw:
        port = gw.address("udp")[1]
        # SIPp's digest uri defaults to host:port only; make it the Request-URI (RFC 3261 22.4)
        extra = ["-auth_uri", f"hotline@127.0.0.1:{port}"]
        with sipp(
            scenario,
            tmp,
            remote=f"127.0.0.1:{port}",
            extra=extra,
            timeout_s=timeout_s,
            fields=values,
        ) as peer:
            code = await asyncio.to_thread(peer.wait, 20)
            logs = peer.logs()
    return code, logs, refused, answered


async def test_untrusted_source_gets_403_and_no_call(tmp_path: Path) -> None:
    guard = InboundGuard([TrustedTrunk.parse("carrier-a", ["127.0.0.2/32", "::1"])])
    code, logs, refused, answered = await run_caller("uac_refused.xml", tmp_path, guard, CODE="403")
    assert code == 0, logs
    assert answered == []
    assert [(r.code, r.reason, r.trunk, r.count) for r in refused] == [
        (403, "untrusted_source", None, 1)
    ]


async def test_trunk_with_credentials_must_pass_digest(tmp_path: Path) -> None:
    trunk = TrustedTrunk.parse("carrier-a", ["127.0.0.0/8"], users={"carrier-a": "s3cret"})
    code, logs, refused, answered = await run_caller(
        "uac_auth.xml", tmp_path, InboundGuard([trunk]), USER="carrier-a", PASSWORD="s3cret"
    )
    assert code == 0, logs  # challenged, then answered and hung up by us
    assert [(r.code, r.reason, r.count) for r in refused] == [(401, "authentication_required", 1)]
    assert len(answered) == 1
    assert answered[0].answered


async def test_wrong_password_is_never_answered(tmp_path: Path) -> None:
    trunk = TrustedTrunk.parse("carrier-a", ["127.0.0.1"], users={"carrier-a": "s3cret"})
    code, _logs, refused, answered = await run_caller(
        "uac_auth.xml",
        tmp_path,
        InboundGuard([trunk]),
        timeout_s=4,
        USER="carrier-a",
        PASSWORD="guess",
    )
    assert code != 0  # SIPp never got its 200
    assert answered == []
    # The first challenge is reported at once; the others (the wrong answer, and SIPp's
    # retransmissions of it, each refused again: refusals keep no state) are one line
    # with their count, flushed at stop.
    first, rest = refused
    assert (first.code, first.first, first.count) == (401, True, 1)
    assert (rest.code, rest.first) == (401, False)
    assert rest.count >= 1


async def test_untrusted_flood_gets_403_every_time_never_503(tmp_path: Path) -> None:
    """SIPp floods from an untrusted address far beyond the per-source budget (rate 2/s,
    burst 3): the ACL answers first, so every call gets 403 (a 503 would fail the call in
    the scenario), statelessly, and is reported as one line at once plus one counted."""
    guard = InboundGuard([TrustedTrunk.parse("carrier-a", ["127.0.0.2"])], rate=2.0, burst=3)
    refused: list[RefusalReport] = []
    config = GatewayConfig(host="127.0.0.1", udp_port=0)
    async with Gateway(config, on_incoming=lambda c: asyncio.sleep(0), guard=guard,
                       on_refused=refused.append) as gw:  # fmt: skip
        port = gw.address("udp")[1]
        extra = ["-r", "100", "-l", "20"]  # 100 calls/s, up to 20 at once
        with sipp("uac_refused.xml", tmp_path, remote=f"127.0.0.1:{port}", calls=60,
                  extra=extra, CODE="403") as peer:  # fmt: skip
            assert await asyncio.to_thread(peer.wait, 30) == 0, peer.logs()
        assert gw.endpoint._servers == {}
        assert len(guard._buckets) == 0
        invites = gw.endpoint.transport.stats.received - 60  # every call also sent its ACK
    assert [(r.code, r.reason) for r in refused] == [(403, "untrusted_source")] * 2
    assert refused[0].first
    assert refused[0].count == 1
    assert sum(r.count for r in refused) == invites >= 60
