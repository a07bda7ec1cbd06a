"""baresip, a second independent SIP/RTP stack, against our gateway in both directions."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Literal

import pytest

from gateway.call import Call, Gateway, GatewayConfig
from gateway.result import CallResult
from prompts import EspeakEngine, PromptCache
from tests.integration.baresip_peer import baresip_uac, baresip_uas

pytestmark = [pytest.mark.interop, pytest.mark.timeout(40)]

PROMPT = "Database down on eu-1. Press 1 to acknowledge, 2 to escalate."


def prompt_cache(tmp_path: Path) -> PromptCache:
    return PromptCache(tmp_path / "prompts", EspeakEngine())


@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_gateway_calls_baresip_which_presses_a_digit(
    tmp_path: Path, transport: Literal["udp", "tcp"]
) -> None:
    config = GatewayConfig(
        host="127.0.0.1",
        udp_port=0 if transport == "udp" else None,
        tcp_port=0 if transport == "tcp" else None,
    )
    with baresip_uas(tmp_path, dtmf="1", dtmf_delay_s=1.0, transport=transport) as peer:
        async with Gateway(config, prompts=prompt_cache(tmp_path)) as gateway:
            call = await gateway.dial(peer.uri, transport=transport, ring_timeout=10)
            assert call.answered
            digits = await call.gather(PROMPT, max_digits=1, timeout=15)
            result = await call.hangup()
        await asyncio.to_thread(peer.wait_closed, 10.0)
        assert peer.closed_by_remote, peer.log_text()  # baresip saw our BYE
    assert digits == "1"
    assert result.outcome.value == "answered"
    assert result.dtmf_method == "rfc4733"
    assert result.codec in ("PCMU", "PCMA")
    assert result.hangup_by == "local"


async def test_baresip_calls_gateway_and_presses_digits(tmp_path: Path) -> None:
    finished: list[CallResult] = []

    async def on_incoming(call: Call) -> None:
        await call.gather(PROMPT, max_digits=2, timeout=15)

    config = GatewayConfig(host="127.0.0.1", udp_port=0)
    gateway = Gateway(
        config,
        prompts=prompt_cache(tmp_path),
        on_incoming=on_incoming,
        on_call_ended=finished.append,
    )
    async with gateway:
        host, port = gateway.address("udp")
        target = f"sip:hotline@{host}:{port}"
        with baresip_uac(tmp_path, target, dtmf="42", dtmf_delay_s=1.0) as peer:
            await asyncio.to_thread(peer.wait_established, 10.0)
            await asyncio.to_thread(peer.wait_closed, 20.0)
            assert peer.closed_by_remote, peer.log_text()  # we hung up after two digits
        for _ in range(50):
            if finished:
                break
            await asyncio.sleep(0.05)
    assert len(finished) == 1
    result = finished[0]
    assert result.direction == "inbound"
    assert result.digits == "42"
    assert result.dtmf_method == "rfc4733"
    assert result.hangup_by == "local"
