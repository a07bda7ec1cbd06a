"""Inbound admission against SIPp as the caller: untrusted sources get 403, a trunk with
credentials must answer a digest challenge (SIPp computes it) before the call is taken."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sipmessage import Request

from gateway.admission import Decision, InboundGuard, TrustedTrunk
from gateway.call import Call, Gateway, GatewayConfig
from gateway.transport import Peer
from tests.integration.peers import sipp

pytestmark = pytest.mark.interop


async def run_caller(
    scenario: str, tmp: Path, guard: InboundGuard, timeout_s: int = 30, **values: str
) -> tuple[int, str, list[Decision], list[Call]]:
    refused: list[Decision] = []
    answered: list[Call] = []

    async def on_incoming(call: Call) -> None:
        answered.append(call)
        await asyncio.sleep(0.3)  # then hang up: the scenario waits for our BYE

    def on_refused(decision: Decision, request: Request, source: Peer) -> None:
        refused.append(decision)

    config = GatewayConfig(host="127.0.0.1", udp_port=0)
    async with Gateway(config, on_incoming=on_incoming, guard=guard, on_refused=on_refused) as gw:
        port = gw.address("udp")[1]
        # SIPp's digest uri defaults to host:port only; make it the Request-URI (RFC 3261 22.4)
        extra = ["-auth_uri", f"hotline@127.0.0.1:{port}"]
        with sipp(
            scenario, tmp, remote=f"127.0.0.1:{port}", extra=extra, timeout_s=timeout_s, **values
        ) as peer:
            code = await asyncio.to_thread(peer.wait, 20)
            logs = peer.logs()
    return code, logs, refused, answered


async def test_untrusted_source_gets_403_and_no_call(tmp_path: Path) -> None:
    guard = InboundGuard([TrustedTrunk.parse("carrier-a", ["127.0.0.2/32", "::1"])])
    code, logs, refused, answered = await run_caller("uac_refused.xml", tmp_path, guard, CODE="403")
    assert code == 0, logs
    assert answered == []
    assert [(d.code, d.reason, d.trunk) for d in refused] == [(403, "untrusted_source", None)]


async def test_trunk_with_credentials_must_pass_digest(tmp_path: Path) -> None:
    trunk = TrustedTrunk.parse("carrier-a", ["127.0.0.0/8"], users={"carrier-a": "s3cret"})
    code, logs, refused, answered = await run_caller(
        "uac_auth.xml", tmp_path, InboundGuard([trunk]), USER="carrier-a", PASSWORD="s3cret"
    )
    assert code == 0, logs  # challenged, then answered and hung up by us
    assert [(d.code, d.reason) for d in refused] == [(401, "authentication_required")]
    assert len(answered) == 1 and answered[0].answered


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
    assert [d.code for d in refused] == [401, 401]
