"""Two in-process gateways on loopback: one runs a flow, the other plays the caller.

Real SIP and RTP over 127.0.0.1 between two ``gateway.call.Call`` objects, so flows are
tested against the same Call API production uses, but fast and scripted from Python.
Prompts come from :class:`ToneEngine`: short tones whose length follows the text, so a
test can tell prompts apart by duration and logs which texts were spoken.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.call import Call, CallEnded, Gateway, GatewayConfig
from gateway.media.session import MediaSessionClosed
from ivr.runner import FlowContext, FlowResult, FlowRunner
from prompts import PromptCache, pcm_to_wav


class ToneEngine:
    """A TTS stand-in: 40 ms of 440 Hz per word (at least 0.2 s), and a log of the texts."""

    name = "tone"

    def __init__(self) -> None:
        self.spoken: list[str] = []

    def cache_identity(self) -> str:
        return "tone-v1"

    async def synthesize(self, text: str, *, voice: str) -> bytes:
        self.spoken.append(text)
        seconds = max(0.2, 0.04 * len(text.split()))
        t = np.arange(int(seconds * 8000)) / 8000
        pcm = (3000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        return pcm_to_wav(pcm, 8000)


class TextLog:
    """Records every prompt the flow speaks, including cache hits (the engine sees misses)."""

    def __init__(self, cache: PromptCache) -> None:
        self.texts: list[str] = []
        original = cache.render

        async def render(text: str, *, voice: str | None = None) -> object:
            self.texts.append(text)
            return await original(text, voice=voice)

        cache.render = render  # type: ignore[method-assign,assignment]


@dataclass
class RecordingHooks:
    """FlowHooks that remember their calls; ``fail`` makes escalate raise."""

    alert_id: str | None = "alert-42"
    fail: bool = False
    escalations: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    webhooks: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    bridges: list[str] = field(default_factory=list)
    bridge_answers: bool = False  # True: pretend the target answered and hung up again

    async def escalate(
        self, ctx: FlowContext, policy: str, variables: Mapping[str, str]
    ) -> str | None:
        self.escalations.append((policy, dict(variables)))
        if self.fail:
            raise RuntimeError("escalation engine unavailable")
        return self.alert_id

    async def webhook(self, ctx: FlowContext, url: str, variables: Mapping[str, str]) -> None:
        self.webhooks.append((url, dict(variables)))

    async def bridge(self, ctx: FlowContext, target: str, ring_timeout: float) -> bool:
        self.bridges.append(target)
        return self.bridge_answers


@dataclass
class Loopback:
    """The gateway running the flow (``server``) and the calling side (``client``)."""

    server: Gateway
    client: Gateway
    prompts: TextLog
    results: asyncio.Queue[object]

    async def call(self, user: str = "+14155550142") -> Call:
        host, port = self.server.address("udp")
        call = await self.client.dial(f"sip:hotline@{host}:{port}", caller=user, ring_timeout=5)
        assert call.answered, call.result
        return call

    async def outcome(self, timeout: float = 20.0) -> object:
        """What the inbound handler returned."""
        return await asyncio.wait_for(self.results.get(), timeout)

    async def result(self, timeout: float = 20.0) -> FlowResult:
        result = await self.outcome(timeout)
        assert isinstance(result, FlowResult)
        return result


@contextlib.asynccontextmanager
async def loopback(
    tmp: Path, runner: FlowRunner | Callable[[Call], Awaitable[object]], **variables: str
) -> AsyncIterator[Loopback]:
    """Start both gateways; every inbound call runs ``runner`` (or the given coroutine)."""
    cache = PromptCache(tmp / "prompts", ToneEngine())
    log = TextLog(cache)
    results: asyncio.Queue[object] = asyncio.Queue()

    async def on_incoming(call: Call) -> None:
        result: object
        if isinstance(runner, FlowRunner):
            result = await runner.run(call, variables)
        else:
            result = await runner(call)
        results.put_nowait(result)

    server = Gateway(GatewayConfig(host="127.0.0.1"), prompts=cache, on_incoming=on_incoming)
    # The caller keeps what it heard, for tests comparing it with what the flow played.
    client = Gateway(
        GatewayConfig(host="127.0.0.1", caller="+14155550142", media_history_seconds=60.0),
        prompts=cache,
    )
    async with server, client:
        yield Loopback(server, client, log, results)


async def press(call: Call, digits: str, *, after: float = 0.0) -> None:
    """Press keys (RFC 4733) after a delay, from the caller's side.

    The flow may hang up as soon as it has the key, while the redundant end packets are
    still going out; that is not the caller's failure.
    """
    if after:
        await asyncio.sleep(after)
    with contextlib.suppress(CallEnded, MediaSessionClosed):
        await call.send_digits(digits)
