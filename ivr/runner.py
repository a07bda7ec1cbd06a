"""Runs a validated :class:`~ivr.flow.Flow` on a live :class:`gateway.call.Call`.

The runner owns only sequencing: prompts, digit collection and barge-in come from the
Call API, received audio from :class:`ivr.audio.AudioStream`, and everything that
touches the rest of the system (paging people, notifying services) goes through the
application's :class:`FlowHooks`, so the escalation engine can plug in without the IVR
knowing about it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, assert_never

import numpy as np
from numpy.typing import NDArray
from sipmessage import URI

from gateway.call import Call, CallEnded
from gateway.result import CallResult
from ivr.amd import AmdConfig, AmdDecision, AmdResult, detect_on_call
from ivr.audio import FRAME_SAMPLES, SAMPLE_RATE, AudioStream, VoiceActivity, write_wav
from ivr.flow import (
    AmdNode,
    BridgeNode,
    EscalateNode,
    Flow,
    GatherNode,
    HangupNode,
    MenuNode,
    Node,
    PlayNode,
    RecordNode,
    SayNode,
    WebhookNode,
    placeholders,
    render_text,
)
from prompts.audio import to_telephony_pcm

__all__ = ["FlowContext", "FlowHooks", "FlowResult", "FlowRunner"]

logger = logging.getLogger(__name__)

_BEEP = (0.3 * 32767 * np.sin(2 * np.pi * 1000 * np.arange(3200) / SAMPLE_RATE)).astype(np.int16)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
_TRAILING_SILENCE_KEPT = 0.5  # seconds left at the end of a recording ended by silence


class FlowHooks(Protocol):
    """What a flow needs from the application; called from ``escalate``/``webhook`` nodes."""

    async def escalate(
        self, ctx: FlowContext, policy: str, variables: Mapping[str, str]
    ) -> str | None:
        """Start an escalation under ``policy``; returns the alert id, if one was created."""
        ...

    async def webhook(self, ctx: FlowContext, url: str, variables: Mapping[str, str]) -> None:
        """Deliver the flow's variables to ``url``."""
        ...

    async def bridge(self, ctx: FlowContext, target: str, ring_timeout: float) -> bool:
        """Connect the caller to ``target``; True once a bridged conversation took place
        (returns when it ended), False when nobody answered."""
        ...


@dataclass
class FlowContext:
    """The state of one flow run, shared with hooks."""

    call: Call
    flow: Flow
    variables: dict[str, str]
    path: list[str] = field(default_factory=list)
    recordings: list[Path] = field(default_factory=list)
    outcome: str | None = None
    amd: AmdResult | None = None
    node_id: str = ""


@dataclass(frozen=True)
class FlowResult:
    """How a run went.

    ``ended_by``: flow (an end or hangup node), caller (hung up first), error (a hook, file
    or prompt failed; see ``error``), step_limit (``max_steps``), not_answered.
    """

    flow: str
    outcome: str
    path: list[str]
    variables: dict[str, str]
    recordings: list[Path]
    ended_by: str
    error: str | None = None
    amd: AmdResult | None = None
    call_result: CallResult | None = None


class _Stop(Exception):
    """Internal: the flow ends here (``ended_by`` says why)."""

    def __init__(self, ended_by: str, error: str | None = None) -> None:
        super().__init__(ended_by)
        self.ended_by = ended_by
        self.error = error


def _party(uri_text: str) -> str:
    """The user part of a SIP URI (usually the phone number), or the text itself."""
    try:
        user = URI.parse(uri_text).user
    except ValueError:
        return uri_text
    return user or uri_text


class FlowRunner:
    """Executes ``flow`` on calls; one runner can serve many calls at once.

    ``recordings_dir`` is where ``record`` nodes write WAV files, ``files_dir`` what
    relative ``play`` paths are resolved against, ``voice`` the TTS voice (the prompt
    cache's default when None). The call is hung up when the flow ends unless
    ``hangup_at_end`` is False (e.g. to chain another flow).
    """

    def __init__(
        self,
        flow: Flow,
        hooks: FlowHooks | None = None,
        *,
        recordings_dir: Path | None = None,
        files_dir: Path | None = None,
        voice: str | None = None,
        hangup_at_end: bool = True,
        on_outcome: Callable[[str], None] | None = None,
    ) -> None:
        if hooks is None and any(flow.uses(t) for t in ("escalate", "webhook", "bridge")):
            raise ValueError(f"flow {flow.name!r} has escalate/webhook/bridge nodes but no hooks")
        if recordings_dir is None and flow.uses("record"):
            raise ValueError(f"flow {flow.name!r} records audio: give recordings_dir")
        self.flow = flow
        self.hooks = hooks
        self.recordings_dir = recordings_dir
        self.files_dir = files_dir
        self.voice = voice
        self.hangup_at_end = hangup_at_end
        # Told as soon as a node sets the outcome, before the rest of the flow (a goodbye)
        # plays: an acknowledgement must not wait for the thank-you message.
        self.on_outcome = on_outcome
        self._files: dict[Path, NDArray[np.int16]] = {}

    def _set_outcome(self, ctx: FlowContext, outcome: str) -> None:
        ctx.outcome = outcome
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                logger.exception("on_outcome hook failed")

    async def run(self, call: Call, variables: Mapping[str, object] | None = None) -> FlowResult:
        """Run the flow from its start node until it ends, the caller hangs up or it fails."""
        values = dict(self.flow.variables)
        values.update(self._call_variables(call))
        values.update({key: "" if v is None else str(v) for key, v in (variables or {}).items()})
        ctx = FlowContext(call=call, flow=self.flow, variables=values)
        ended_by, error = "flow", None
        node_id: str | None = self.flow.start if call.answered else None
        if node_id is None:
            ended_by = "not_answered"
        steps = 0
        try:
            while node_id is not None:
                if call.ended.is_set():
                    raise _Stop("caller")
                steps += 1
                if steps > self.flow.max_steps:
                    logger.warning("flow %s: step limit reached at %s", self.flow.name, node_id)
                    raise _Stop("step_limit")
                node = self.flow.node(node_id)
                ctx.node_id = node_id
                ctx.path.append(node_id)
                if node.outcome is not None:
                    self._set_outcome(ctx, node.outcome)
                node_id = await self._execute(ctx, node)
        except _Stop as stop:
            ended_by, error = stop.ended_by, stop.error
        except CallEnded:
            ended_by = "caller"
        except Exception as exc:  # a broken prompt or file must still yield a result
            logger.exception("call %s: flow %s failed", call.call_id, self.flow.name)
            ended_by, error = "error", f"node {ctx.node_id!r}: {type(exc).__name__}: {exc}"
        result = call.result
        if ended_by == "flow" and result is not None and result.hangup_by == "remote":
            ended_by = "caller"
        if self.hangup_at_end and not call.ended.is_set():
            await call.hangup()
        outcome = ctx.outcome or self.flow.default_outcome
        logger.info(
            "call %s: flow %s ended (%s) with %s via %s",
            call.call_id,
            self.flow.name,
            ended_by,
            outcome,
            " > ".join(ctx.path),
        )
        return FlowResult(
            flow=self.flow.name,
            outcome=outcome,
            path=list(ctx.path),
            variables=dict(ctx.variables),
            recordings=list(ctx.recordings),
            ended_by=ended_by,
            error=error,
            amd=ctx.amd,
            call_result=call.result,
        )

    @staticmethod
    def _call_variables(call: Call) -> dict[str, str]:
        remote = _party(call.target)
        values = {"call_id": call.call_id, "direction": call.direction, "remote": remote}
        if call.direction == "inbound":
            values["caller"] = remote
        else:
            values["callee"] = remote
        return values

    # -- nodes ---------------------------------------------------------------------

    async def _execute(self, ctx: FlowContext, node: Node) -> str | None:
        match node:
            case SayNode():
                await self._say(ctx, node.text, barge_in=node.barge_in)
                return node.next
            case PlayNode():
                await ctx.call.play(self._file(node.file), barge_in=node.barge_in)
                return node.next
            case MenuNode():
                return await self._menu(ctx, node)
            case GatherNode():
                return await self._gather(ctx, node)
            case RecordNode():
                return await self._record(ctx, node)
            case AmdNode():
                return await self._amd(ctx, node)
            case EscalateNode():
                return await self._escalate(ctx, node)
            case WebhookNode():
                return await self._webhook(ctx, node)
            case BridgeNode():
                return await self._bridge(ctx, node)
            case HangupNode():
                await ctx.call.hangup()
                return None
            case unreachable:
                assert_never(unreachable)

    def _text(self, ctx: FlowContext, text: str) -> str:
        missing = [name for name in placeholders(text) if name not in ctx.variables]
        if missing:
            logger.warning("flow %s node %s: no value for %s", self.flow.name, ctx.node_id, missing)
        return render_text(text, ctx.variables)

    async def _say(self, ctx: FlowContext, text: str, *, barge_in: bool = True) -> bool:
        """Speak ``text`` with variables filled in; False when a key cut it short."""
        spoken = self._text(ctx, text)
        if not spoken.strip(" .,"):
            return True
        prompts = ctx.call.gateway.prompts
        if prompts is None:
            raise ValueError("flows that speak need a prompt cache (Gateway(prompts=...))")
        prompt = await prompts.render(spoken, voice=self.voice)
        return await ctx.call.play(prompt, barge_in=barge_in)

    async def _prompt(self, ctx: FlowContext, node: MenuNode | GatherNode | RecordNode) -> None:
        if node.say is not None:
            await self._say(ctx, node.say)
        elif node.play is not None:
            await ctx.call.play(self._file(node.play), barge_in=True)

    def _file(self, name: str) -> NDArray[np.int16]:
        path = Path(name)
        if not path.is_absolute() and self.files_dir is not None:
            path = self.files_dir / path
        pcm = self._files.get(path)
        if pcm is None:
            pcm = self._files[path] = to_telephony_pcm(path.read_bytes())
        return pcm

    async def _menu(self, ctx: FlowContext, node: MenuNode) -> str | None:
        call = ctx.call
        for attempt in range(node.retries + 1):
            await self._prompt(ctx, node)
            digit = await call.collect(1, node.timeout, terminators="")
            if digit in node.choices:
                ctx.variables[f"{ctx.node_id}_choice"] = digit
                return node.choices[digit]
            if call.ended.is_set():
                raise _Stop("caller")
            if attempt < node.retries:
                retry_prompt = node.invalid_prompt if digit else node.no_input_prompt
                if retry_prompt is not None:
                    await self._say(ctx, retry_prompt)
        return node.on_failure

    async def _gather(self, ctx: FlowContext, node: GatherNode) -> str | None:
        call = ctx.call
        for attempt in range(node.retries + 1):
            await self._prompt(ctx, node)
            digits = await call.collect(node.max_digits, node.timeout, node.terminators)
            if node.min_digits <= len(digits) <= node.max_digits:
                ctx.variables[node.variable] = digits
                return node.next
            if call.ended.is_set():
                raise _Stop("caller")
            if attempt < node.retries and node.invalid_prompt is not None:
                await self._say(ctx, node.invalid_prompt)
        return node.on_failure

    async def _record(self, ctx: FlowContext, node: RecordNode) -> str | None:
        call = ctx.call
        await self._prompt(ctx, node)
        await call.collect(64, 0.0, terminators="")  # keys pressed before the tone do not count
        if node.beep:
            await call.play(_BEEP)
        frames: list[NDArray[np.int16]] = []
        reason = "max_length"
        vad = VoiceActivity()
        speech_seen = False
        silent = 0
        limit = round(node.max_length * SAMPLE_RATE / FRAME_SAMPLES)
        silence_limit = round(node.silence_timeout * SAMPLE_RATE / FRAME_SAMPLES)
        initial_limit = round(node.initial_timeout * SAMPLE_RATE / FRAME_SAMPLES)
        async with AudioStream(call) as stream:
            key = asyncio.ensure_future(self._wait_key(call, node.finish_on_key, node.max_length))
            try:
                while len(frames) < limit:
                    if key.done():
                        reason = "key"
                        break
                    frame = await stream.read()
                    if frame is None:
                        reason = "hangup"
                        break
                    frames.append(frame)
                    if vad.is_speech(frame):
                        speech_seen, silent = True, 0
                    else:
                        silent += 1
                    if not speech_seen and silent >= initial_limit:
                        reason = "no_speech"
                        break
                    if speech_seen and silence_limit and silent >= silence_limit:
                        reason = "silence"
                        break
            finally:
                key.cancel()
        if reason == "silence" and speech_seen:
            keep = round(_TRAILING_SILENCE_KEPT * SAMPLE_RATE / FRAME_SAMPLES)
            del frames[max(1, len(frames) - silent + keep) :]
        if not frames:
            return node.next if not call.ended.is_set() else None
        path = self._recording_path(ctx)
        pcm = np.concatenate(frames)
        await asyncio.to_thread(write_wav, path, pcm)
        ctx.recordings.append(path)
        ctx.variables[node.variable] = str(path)
        ctx.variables[f"{node.variable}_seconds"] = f"{len(pcm) / SAMPLE_RATE:.1f}"
        ctx.variables[f"{node.variable}_ended_by"] = reason
        logger.info(
            "call %s: recorded %.1f s to %s (%s)",
            call.call_id,
            len(pcm) / SAMPLE_RATE,
            path,
            reason,
        )
        return node.next

    @staticmethod
    async def _wait_key(call: Call, keys: str, timeout: float) -> str | None:
        """Wait for one of ``keys``; other keys are ignored. None on timeout or hangup."""
        deadline = call.loop.time() + timeout
        while not call.ended.is_set():
            remaining = deadline - call.loop.time()
            if remaining <= 0:
                return None
            await call.collect(1, remaining, terminators=keys)
            if call.terminated_by is not None:
                return call.terminated_by
        return None

    def _recording_path(self, ctx: FlowContext) -> Path:
        assert self.recordings_dir is not None
        call_part = _UNSAFE.sub("_", ctx.call.call_id)[:48] or "call"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        name = f"{stamp}-{call_part}-{ctx.node_id}-{len(ctx.recordings) + 1}.wav"
        return self.recordings_dir / name

    async def _amd(self, ctx: FlowContext, node: AmdNode) -> str | None:
        overrides = {k: v for k, v in node.settings.model_dump().items() if v is not None}
        config = dataclasses.replace(AmdConfig(), **overrides)
        wait = node.beep_timeout if node.wait_for_beep and node.on_machine is not None else 0.0
        result, _detector = await detect_on_call(ctx.call, config, wait_for_greeting_end=wait)
        ctx.amd = result
        ctx.variables["amd_result"] = result.decision.value
        ctx.variables["amd_reason"] = result.reason
        if result.decision is AmdDecision.MACHINE:
            self._set_outcome(ctx, node.outcome or "machine")
            return node.on_machine
        if result.decision is AmdDecision.HUMAN:
            return node.on_human
        return node.on_unknown if node.on_unknown is not None else node.on_human

    async def _escalate(self, ctx: FlowContext, node: EscalateNode) -> str | None:
        assert self.hooks is not None
        policy = self._text(ctx, node.policy)
        try:
            alert_id = await self.hooks.escalate(ctx, policy, dict(ctx.variables))
        except Exception as exc:
            logger.warning(
                "call %s: escalate hook failed at node %r",
                ctx.call.call_id,
                ctx.node_id,
                exc_info=True,
            )
            return self._hook_failed(ctx, node.on_error, "escalate", exc)
        if alert_id is not None:
            ctx.variables[node.variable] = str(alert_id)
        return node.next

    async def _webhook(self, ctx: FlowContext, node: WebhookNode) -> str | None:
        assert self.hooks is not None
        url = self._text(ctx, node.url)
        try:
            await self.hooks.webhook(ctx, url, dict(ctx.variables))
        except Exception as exc:
            logger.warning(
                "call %s: webhook hook failed at node %r",
                ctx.call.call_id,
                ctx.node_id,
                exc_info=True,
            )
            return self._hook_failed(ctx, node.on_error, "webhook", exc)
        return node.next

    async def _bridge(self, ctx: FlowContext, node: BridgeNode) -> str | None:
        assert self.hooks is not None
        target = self._text(ctx, node.to)
        ringback: asyncio.Future[Any] | None = None
        if node.say is not None:
            ringback = asyncio.ensure_future(self._say(ctx, node.say, barge_in=False))
        try:
            connected = await self.hooks.bridge(ctx, target, node.ring_timeout)
        except Exception as exc:
            logger.warning(
                "call %s: bridge hook failed at node %r",
                ctx.call.call_id,
                ctx.node_id,
                exc_info=True,
            )
            return self._hook_failed(ctx, node.on_error, "bridge", exc)
        finally:
            if ringback is not None and not ringback.done():
                ringback.cancel()
                with contextlib.suppress(BaseException):
                    await ringback
        ctx.variables[f"{ctx.node_id}_connected"] = "yes" if connected else "no"
        if connected and node.connected_outcome is not None:
            self._set_outcome(ctx, node.connected_outcome)
        return node.next if connected else node.on_no_answer

    def _hook_failed(
        self, ctx: FlowContext, on_error: str | None, hook: str, exc: Exception
    ) -> str | None:
        """A failed hook (logged by the caller, with its traceback) goes to ``on_error``;
        without one the flow stops as an error."""
        message = f"{hook} hook failed at node {ctx.node_id!r}: {exc!r}"
        ctx.variables["error"] = message
        if on_error is None:
            raise _Stop("error", message)
        return on_error
