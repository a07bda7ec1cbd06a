"""A scripted SIP phone for call-flow tests: call or answer, listen, press keys, assert.

QA engineers describe what a caller does ("wait for the greeting, press 1, describe the
outage after the tone, expect the line to drop within 30 s": keys, text spoken by TTS or
a WAV file) and get a pass/fail report per step, from a small YAML script
(`ackline softphone script.yaml`) or from Python/pytest through `Softphone` and `Leg`.
It is a full user agent of its own (our gateway core), so the flow under test sees real
SIP and RTP from another address and port.

Listening works on the decoded audio the phone receives: "audio" is 20 ms frames above
a level threshold, "silence" the opposite, so a script can wait for a prompt to start and
for it to end before pressing a key, like a person would.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from numpy.typing import NDArray
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.call import Call, Gateway, GatewayConfig
from gateway.media.dtmf import DtmfMethod
from gateway.media.session import MediaSessionClosed
from gateway.result import CallResult

__all__ = [
    "Leg",
    "ScriptError",
    "Softphone",
    "SoftphoneScript",
    "StepReport",
    "load_script",
    "run_script",
]

FRAME = 160  # 20 ms at 8 kHz


def dbfs(pcm: NDArray[np.int16]) -> float:
    """RMS level of a frame relative to full scale (digital silence is -inf)."""
    if pcm.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))
    return 20 * math.log10(rms / 32768.0) if rms > 0 else -math.inf


class _Ear:
    """Follows the received audio frame by frame: level, and how long it has been loud/quiet."""

    def __init__(self, threshold_dbfs: float) -> None:
        self.threshold = threshold_dbfs
        self.frames: list[NDArray[np.int16]] = []
        self._pending = np.zeros(0, dtype=np.int16)
        self.loud_frames = 0
        self.run_loud = 0  # consecutive frames above the threshold, up to now
        self.run_quiet = 0
        self.changed = asyncio.Event()

    def __call__(self, pcm: NDArray[np.int16]) -> None:
        data = np.concatenate([self._pending, pcm]) if self._pending.size else pcm
        whole = data.size - data.size % FRAME
        for start in range(0, whole, FRAME):
            frame = data[start : start + FRAME]
            self.frames.append(frame)
            if dbfs(frame) > self.threshold:
                self.loud_frames += 1
                self.run_loud += 1
                self.run_quiet = 0
            else:
                self.run_quiet += 1
                self.run_loud = 0
        self._pending = data[whole:].copy()
        self.changed.set()

    def heard(self) -> NDArray[np.int16]:
        return np.concatenate(self.frames) if self.frames else np.zeros(0, dtype=np.int16)


class Leg:
    """One call the softphone is on, with the means to listen and to press keys."""

    def __init__(self, call: Call, threshold_dbfs: float = -40.0) -> None:
        self.call = call
        self.ear = _Ear(threshold_dbfs)
        self._remove_listener: Callable[[], None] | None = None
        if call.media is not None:
            self._remove_listener = call.media.add_audio_listener(self.ear)

    @property
    def answered(self) -> bool:
        return self.call.answered

    @property
    def heard_ms(self) -> int:
        """How much of what was received was above the threshold."""
        return self.ear.loud_frames * 20

    def heard(self) -> NDArray[np.int16]:
        return self.ear.heard()

    async def _until(self, done: Callable[[], bool], timeout: float, what: str) -> float:
        started = time.monotonic()
        deadline = started + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {what} within {timeout:g} s")
            if self.call.ended.is_set():
                raise ConnectionError(f"the call ended while waiting for {what}")
            self.ear.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ear.changed.wait(), min(remaining, 0.1))
        return time.monotonic() - started

    async def wait_for_audio(self, *, timeout: float = 10.0, min_ms: int = 100) -> float:
        """Wait until `min_ms` of sound in a row arrives (a prompt starts); seconds waited."""
        frames = max(1, min_ms // 20)
        return await self._until(lambda: self.ear.run_loud >= frames, timeout, "audio")

    async def wait_for_silence(self, *, timeout: float = 30.0, min_ms: int = 800) -> float:
        """Wait until `min_ms` of quiet in a row (a prompt has ended); seconds waited."""
        frames = max(1, min_ms // 20)
        return await self._until(lambda: self.ear.run_quiet >= frames, timeout, "silence")

    async def send_dtmf(
        self, digits: str, *, method: DtmfMethod = DtmfMethod.RFC4733, duration_ms: int = 120
    ) -> None:
        await self.call.send_digits(digits, duration_ms=duration_ms, method=method)

    async def wait_hangup(self, timeout: float = 10.0) -> CallResult:
        """Wait for the far end to hang up."""
        return await self.call.wait_ended(timeout)

    async def hangup(self) -> CallResult:
        return await self.call.hangup()

    def save(self, path: Path) -> Path:
        """Write what the phone heard as an 8 kHz mono 16-bit WAV."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(8000)
            out.writeframes(self.heard().astype("<i2").tobytes())
        return path

    def close(self) -> None:
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None


class Softphone:
    """A user agent of its own on loopback or any address; `call` out or `answer` calls."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        transport: str = "udp",
        threshold_dbfs: float = -40.0,
        prompts: Any = None,
    ) -> None:
        """`prompts` (a prompts.cache.PromptCache) lets a leg's call play text."""
        self.transport = transport
        self.threshold = threshold_dbfs
        self._incoming: asyncio.Queue[tuple[Leg, asyncio.Event]] = asyncio.Queue()
        config = GatewayConfig(
            host=host,
            udp_port=port if transport == "udp" else None,
            tcp_port=port if transport == "tcp" else None,
            caller="softphone",
            caller_name="ackline softphone",
        )
        self.gateway = Gateway(config, on_incoming=self._on_incoming, prompts=prompts)

    async def __aenter__(self) -> Softphone:
        await self.gateway.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.gateway.stop()

    @property
    def address(self) -> tuple[str, int]:
        return self.gateway.address(self.transport)

    async def _on_incoming(self, call: Call) -> None:
        done = asyncio.Event()
        await self._incoming.put((Leg(call, self.threshold), done))
        ender = asyncio.ensure_future(call.ended.wait())
        waiter = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait({ender, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ender.cancel()
            waiter.cancel()

    @contextlib.asynccontextmanager
    async def call(self, target: str, *, ring_timeout: float = 15.0) -> AsyncIterator[Leg]:
        """Place a call; the leg is hung up when the block ends (if still up)."""
        call = await self.gateway.dial(target, ring_timeout=ring_timeout, transport=self.transport)
        leg = Leg(call, self.threshold)
        try:
            yield leg
        finally:
            leg.close()
            if not call.ended.is_set():
                await call.hangup()

    @contextlib.asynccontextmanager
    async def answer(self, *, timeout: float = 15.0) -> AsyncIterator[Leg]:
        """Wait for a call to ring in (it is answered by the gateway core) and hand it over."""
        leg, done = await asyncio.wait_for(self._incoming.get(), timeout)
        try:
            yield leg
        finally:
            leg.close()
            done.set()
            if not leg.call.ended.is_set():
                await leg.call.hangup()


# -- scripts ----------------------------------------------------------------------------------


class ScriptError(ValueError):
    """The script file is not valid; the message names the step and field."""


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WaitAudio(_Step):
    wait_audio: float = Field(gt=0, description="timeout in seconds")
    min_ms: int = Field(default=100, ge=20)


class WaitSilence(_Step):
    wait_silence: float = Field(gt=0, description="timeout in seconds")
    min_ms: int = Field(default=800, ge=20)


class Dtmf(_Step):
    dtmf: str
    method: Literal[DtmfMethod.RFC4733, DtmfMethod.SIP_INFO, DtmfMethod.INBAND] = DtmfMethod.RFC4733
    duration_ms: int = Field(default=120, ge=40, le=2000)

    @field_validator("dtmf")
    @classmethod
    def _keys(cls, value: str) -> str:
        if not value or any(c not in "0123456789*#ABCD" for c in value.upper()):
            raise ValueError("dtmf must be keys from 0-9, *, #, A-D")
        return value.upper()


class Sleep(_Step):
    sleep: float = Field(ge=0, le=300)


class Play(_Step):
    """Speak into the call from a WAV file (any rate and channels; relative paths are
    taken from the script's directory), e.g. the message left at a `record` node."""

    play: Path


class Say(_Step):
    """Speak text into the call (TTS), for flows that record or listen to the caller."""

    say: str = Field(min_length=1, max_length=1000)


class ExpectHangup(_Step):
    expect_hangup: float = Field(gt=0, description="timeout in seconds")


class Hangup(_Step):
    hangup: Literal[True]


Step = WaitAudio | WaitSilence | Dtmf | Sleep | Play | Say | ExpectHangup | Hangup


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    answered: bool | None = None
    hangup_by: Literal["local", "remote"] | None = None
    min_heard_ms: int | None = Field(default=None, ge=0)
    digits: str | None = None  # every key the phone received, in order, by any method


class SoftphoneScript(BaseModel):
    """`call: URI` places a call; `answer: true` waits for one instead."""

    model_config = ConfigDict(extra="forbid")

    call: str | None = None
    answer: bool = False
    listen: Annotated[str, Field(pattern=r"^[^:]+:\d+$")] | None = None  # host:port (answer)
    transport: Literal["udp", "tcp"] = "udp"
    ring_timeout: float = Field(default=15.0, gt=0)
    threshold_dbfs: float = Field(default=-40.0, le=0)
    steps: list[Step] = Field(default_factory=list)
    record: Path | None = None
    expect: Expect = Field(default_factory=Expect)

    @model_validator(mode="after")
    def _one_mode(self) -> SoftphoneScript:
        if (self.call is None) == (not self.answer):
            raise ValueError("a script needs exactly one of `call: URI` or `answer: true`")
        return self


def load_script(path: Path) -> SoftphoneScript:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ScriptError(f"{path}: {exc}") from None
    try:
        script = SoftphoneScript.model_validate(data)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ScriptError(f"{path}: " + "; ".join(lines)) from None
    for n, step in enumerate(script.steps):
        if isinstance(step, Play):
            step.play = path.parent / step.play  # an absolute path stays as it is
            if not step.play.is_file():
                raise ScriptError(f"{path}: steps.{n}.play: no such file {step.play}")
    return script


@dataclass
class StepReport:
    step: str
    ok: bool
    elapsed_ms: int
    detail: str = ""


@dataclass
class ScriptReport:
    ok: bool
    steps: list[StepReport] = field(default_factory=list)
    result: dict[str, Any] | None = None
    heard_ms: int = 0
    recording: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "steps": [s.__dict__ for s in self.steps],
            "heard_ms": self.heard_ms,
            "recording": self.recording,
            "result": self.result,
        }


def _describe(step: Step) -> str:
    return " ".join(f"{k}={v}" for k, v in step.model_dump().items())


async def _run_step(leg: Leg, step: Step) -> str:
    if isinstance(step, WaitAudio):
        return (
            f"after {await leg.wait_for_audio(timeout=step.wait_audio, min_ms=step.min_ms):.2f} s"
        )
    if isinstance(step, WaitSilence):
        waited = await leg.wait_for_silence(timeout=step.wait_silence, min_ms=step.min_ms)
        return f"after {waited:.2f} s"
    if isinstance(step, Dtmf):
        if leg.call.ended.is_set():
            raise ConnectionError("the call ended before the keys were sent")
        try:
            await leg.send_dtmf(step.dtmf, method=step.method, duration_ms=step.duration_ms)
        except MediaSessionClosed:
            # The flow reacted to the key's first packets and hung up: the key got through.
            return f"sent {step.dtmf} via {step.method}; the far end hung up during it"
        return f"sent {step.dtmf} via {step.method}"
    if isinstance(step, Sleep):
        await asyncio.sleep(step.sleep)
        return ""
    if isinstance(step, Play | Say):
        if leg.call.ended.is_set():
            raise ConnectionError("the call ended before it could be spoken to")
        audio = _wav_pcm(step.play) if isinstance(step, Play) else step.say
        try:
            whole = await leg.call.play(audio)
        except MediaSessionClosed:
            whole = False
        return f"played {'to the end' if whole else 'in part: the call ended or it was cut'}"
    if isinstance(step, ExpectHangup):
        result = await leg.wait_hangup(step.expect_hangup)
        return f"{result.hangup_by or 'no'} hangup: {result.reason}"
    await leg.hangup()
    return "hung up"


async def _run_leg(leg: Leg, script: SoftphoneScript, report: ScriptReport) -> None:
    for step in script.steps:
        started = time.monotonic()
        try:
            detail = await _run_step(leg, step)
            ok = True
        except (TimeoutError, ConnectionError, RuntimeError) as exc:
            detail, ok = str(exc) or type(exc).__name__, False
        report.steps.append(
            StepReport(_describe(step), ok, int((time.monotonic() - started) * 1000), detail)
        )
        if not ok:
            report.ok = False
            return


def _wav_pcm(path: Path) -> NDArray[np.int16]:
    from prompts.audio import WavFormatError, to_telephony_pcm

    try:
        return to_telephony_pcm(path.read_bytes())
    except (OSError, WavFormatError) as exc:
        raise RuntimeError(f"cannot play {path}: {exc}") from None


def _check_expectations(script: SoftphoneScript, leg: Leg, report: ScriptReport) -> None:
    exp = script.expect
    result = leg.call.result
    checks: list[tuple[str, bool, str]] = []
    if exp.answered is not None:
        checks.append(("expect answered", leg.answered == exp.answered, f"answered={leg.answered}"))
    if exp.hangup_by is not None:
        got = result.hangup_by if result else None
        checks.append(("expect hangup_by", got == exp.hangup_by, f"hangup_by={got}"))
    if exp.min_heard_ms is not None:
        checks.append(
            ("expect min_heard_ms", leg.heard_ms >= exp.min_heard_ms, f"heard {leg.heard_ms} ms")
        )
    if exp.digits is not None:
        got_digits = leg.call.digits
        checks.append(("expect digits", got_digits == exp.digits, f"received {got_digits!r}"))
    for name, ok, detail in checks:
        report.steps.append(StepReport(name, ok, 0, detail))
        report.ok = report.ok and ok


async def run_script(
    script: SoftphoneScript,
    *,
    target: str | None = None,
    prompts: Any = None,
    on_ready: Callable[[tuple[str, int]], None] | None = None,
) -> ScriptReport:
    """Run a script to its end; the report says which step failed and why. `prompts`
    (a prompts.cache.PromptCache) speaks the `say` steps; `on_ready` is told the phone's
    address once it listens (a script that answers can be called from then on)."""
    if prompts is None and any(isinstance(step, Say) for step in script.steps):
        raise ValueError("`say` steps need a text-to-speech prompt cache")
    report = ScriptReport(ok=True)
    host, port = "127.0.0.1", 0
    if script.listen:
        host, _, port_text = script.listen.rpartition(":")
        port = int(port_text)
    async with Softphone(
        host=host,
        port=port,
        transport=script.transport,
        threshold_dbfs=script.threshold_dbfs,
        prompts=prompts,
    ) as phone:
        if on_ready is not None:
            on_ready(phone.address)
        if script.answer:
            session = phone.answer(timeout=script.ring_timeout)
        else:
            session = phone.call(target or script.call or "", ring_timeout=script.ring_timeout)
        try:
            async with session as leg:
                if leg.answered:
                    await _run_leg(leg, script, report)
                elif script.expect.answered is not False:
                    report.ok = False
                    reason = leg.call.result.reason if leg.call.result else "not answered"
                    report.steps.append(StepReport("answer", False, 0, reason))
                if script.record is not None:
                    report.recording = str(leg.save(script.record))
                report.heard_ms = leg.heard_ms
        except TimeoutError:
            report.ok = False
            report.steps.append(StepReport("answer", False, 0, "no call rang in"))
            return report
        if not leg.call.ended.is_set():
            await leg.call.hangup()
        _check_expectations(script, leg, report)
        report.result = leg.call.result.to_dict() if leg.call.result else None
    return report
