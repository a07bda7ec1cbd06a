"""Answering-machine detection from the first seconds of audio the callee sends.

A person who picks up says something short ("Hello?", "Yes, this is Alice") and waits; a
voicemail greeting talks for several seconds without a long pause and often ends in a
beep. The detector segments 20 ms frames into speech and silence by energy and applies
those timing rules, plus a tone detector for the beep:

* a steady single tone (``beep_min_hz``..``beep_max_hz``, ``beep_min_duration`` long) → machine
* speech running longer than ``greeting`` seconds without an ``after_greeting_silence`` → machine
* speech, then ``after_greeting_silence`` of silence → human
* no speech within ``initial_silence`` → unknown (a silent pick-up: do not guess)
* nothing decided within ``max_analysis`` → unknown

The speech threshold follows the line's noise floor (the minimum frame energy over the last
``noise_window`` seconds) plus a margin, bounded on both sides, so hiss on a line is not
taken for an endless greeting.

The DTMF Goertzel detector in gateway.media.dtmf does not fit the beep: it looks for a pair
of tones at eight fixed keypad frequencies and rejects single tones by design, while beeps
vary in pitch from one voicemail system to the next; here an FFT per frame finds the peak.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ivr.audio import FRAME_SAMPLES, SAMPLE_RATE, AudioStream, VoiceActivity

if TYPE_CHECKING:
    from gateway.call import Call

__all__ = [
    "AmdConfig",
    "AmdDecision",
    "AmdDetector",
    "AmdResult",
    "classify",
    "detect_on_call",
]

logger = logging.getLogger(__name__)

FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE


class AmdDecision(StrEnum):
    HUMAN = "human"
    MACHINE = "machine"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class AmdConfig:
    """Timing rules and thresholds; all times in seconds."""

    initial_silence: float = 2.5  # no speech by then: unknown
    greeting: float = 1.8  # a human greeting is shorter than this
    after_greeting_silence: float = 0.8  # silence that ends a human greeting
    min_word: float = 0.1  # voiced runs shorter than this are clicks, not speech
    max_analysis: float = 5.0  # give up (unknown) after this much audio
    min_speech_db: float = -45.0  # frames below this are silence whatever the noise floor
    max_threshold_db: float = -30.0  # frames above this are speech whatever the noise floor
    speech_margin_db: float = 10.0  # speech must be this far above the noise floor
    noise_window: float = 1.5
    beep: bool = True
    beep_min_hz: float = 400.0
    beep_max_hz: float = 2100.0
    beep_min_duration: float = 0.12
    beep_purity: float = 0.85  # share of a frame's energy within ±100 Hz of the peak
    end_of_greeting_silence: float = 1.2  # machine without beep: greeting over after this

    def __post_init__(self) -> None:
        for name in ("initial_silence", "greeting", "after_greeting_silence", "max_analysis"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AMD {name} must be positive")
        if not 0 < self.beep_min_hz < self.beep_max_hz < SAMPLE_RATE / 2:
            raise ValueError("AMD beep band must lie within 0..4000 Hz")
        if not 0 < self.beep_purity <= 1:
            raise ValueError("AMD beep_purity must be in (0, 1]")


@dataclass(frozen=True)
class AmdResult:
    """The verdict and the evidence; times are seconds from the start of the audio."""

    decision: AmdDecision
    reason: str  # beep | long_greeting | short_greeting | initial_silence | max_analysis
    decided_at: float
    greeting: float  # length of the first utterance as measured when deciding
    beep_at: float | None = None

    @property
    def is_machine(self) -> bool:
        return self.decision is AmdDecision.MACHINE


def _frames(seconds: float) -> int:
    """Whole 20 ms frames in ``seconds`` (at least one)."""
    return max(1, round(seconds / FRAME_SECONDS))


class AmdDetector:
    """Streaming detector: feed received audio, get a result as soon as the rules decide.

    ``feed`` accepts chunks of any length and returns the result once (the call that
    decides); the detector keeps listening afterwards so ``beep_at`` and ``greeting_over``
    can tell a flow when to start speaking after a voicemail greeting.
    """

    def __init__(self, config: AmdConfig | None = None) -> None:
        self.config = config or AmdConfig()
        c = self.config
        self.result: AmdResult | None = None
        self.beep_at: float | None = None
        self._pending = np.zeros(0, dtype=np.int16)
        self._frame = 0  # frames analysed
        self._vad = VoiceActivity(
            min_db=c.min_speech_db,
            max_db=c.max_threshold_db,
            margin_db=c.speech_margin_db,
            window=_frames(c.noise_window),
        )
        self._min_word = _frames(c.min_word)
        self._run = 0  # consecutive voiced frames
        self._utterance_start: int | None = None  # frame index where the first speech began
        self._last_voiced: int | None = None  # frame index just after the latest speech frame
        self._tone_run = 0
        self._tone_bin = -1
        self._window = np.hanning(FRAME_SAMPLES)
        freqs = np.fft.rfftfreq(FRAME_SAMPLES, 1.0 / SAMPLE_RATE)
        self._band = np.nonzero((freqs >= c.beep_min_hz) & (freqs <= c.beep_max_hz))[0]
        self._beep_frames = _frames(c.beep_min_duration)

    @property
    def elapsed(self) -> float:
        return self._frame * FRAME_SECONDS

    @property
    def speech_heard(self) -> bool:
        return self._utterance_start is not None

    @property
    def silence(self) -> float:
        """Seconds of silence since the last speech (or since the start)."""
        since = self._last_voiced if self._last_voiced is not None else 0
        return 0.0 if self._run >= self._min_word else (self._frame - since) * FRAME_SECONDS

    @property
    def greeting_over(self) -> bool:
        """A voicemail is ready to record: its beep sounded, or its greeting stopped."""
        return self.beep_at is not None or (
            self.speech_heard and self.silence >= self.config.end_of_greeting_silence
        )

    def feed(self, pcm: NDArray[Any]) -> AmdResult | None:
        """Analyse more audio; returns the result in the call where it is reached."""
        data = np.concatenate((self._pending, np.asarray(pcm, dtype=np.int16).reshape(-1)))
        count = len(data) // FRAME_SAMPLES
        self._pending = data[count * FRAME_SAMPLES :]
        decided: AmdResult | None = None
        for index in range(count):
            frame = data[index * FRAME_SAMPLES : (index + 1) * FRAME_SAMPLES]
            outcome = self._step(frame)
            if outcome is not None and decided is None:
                decided = outcome
        return decided

    def finish(self) -> AmdResult:
        """The audio ended: treat the rest of the analysis time as silence and decide."""
        silent = np.zeros(FRAME_SAMPLES, dtype=np.int16)
        limit = _frames(self.config.max_analysis) + 1
        while self.result is None and self._frame <= limit:
            self._step(silent)
        assert self.result is not None
        return self.result

    # -- per frame ------------------------------------------------------------------

    def _step(self, frame: NDArray[np.int16]) -> AmdResult | None:
        c = self.config
        voiced = self._vad.is_speech(frame)
        if c.beep and self.beep_at is None and self._vad.last_db >= c.min_speech_db:
            self._detect_tone(frame)
        elif c.beep:
            self._tone_run = 0
        self._frame += 1
        if voiced:
            self._run += 1
            if self._run >= self._min_word:
                if self._utterance_start is None:
                    self._utterance_start = self._frame - self._run
                self._last_voiced = self._frame
        else:
            self._run = 0
        if self.result is not None:
            return None
        result = self._decide()
        if result is not None:
            self.result = result
        return result

    def _detect_tone(self, frame: NDArray[np.int16]) -> None:
        samples = frame.astype(np.float64)
        spectrum = np.abs(np.fft.rfft((samples - samples.mean()) * self._window)) ** 2
        total = float(spectrum.sum())
        if total <= 0 or len(self._band) == 0:
            self._tone_run = 0
            return
        peak = int(self._band[np.argmax(spectrum[self._band])])
        around = float(spectrum[max(0, peak - 2) : peak + 3].sum())
        if around / total >= self.config.beep_purity and (
            self._tone_run == 0 or abs(peak - self._tone_bin) <= 1
        ):
            self._tone_run += 1
            self._tone_bin = peak
            if self._tone_run >= self._beep_frames:
                self.beep_at = (self._frame + 1 - self._tone_run) * FRAME_SECONDS
        else:
            self._tone_run = 0

    def _greeting_length(self) -> float:
        if self._utterance_start is None or self._last_voiced is None:
            return 0.0
        return (self._last_voiced - self._utterance_start) * FRAME_SECONDS

    def _decide(self) -> AmdResult | None:
        c = self.config
        now = self.elapsed
        greeting = self._greeting_length()

        def verdict(decision: AmdDecision, reason: str) -> AmdResult:
            return AmdResult(decision, reason, now, greeting, self.beep_at)

        if self.beep_at is not None:
            return verdict(AmdDecision.MACHINE, "beep")
        if self._utterance_start is None:
            if now >= c.initial_silence:
                return verdict(AmdDecision.UNKNOWN, "initial_silence")
        elif greeting > c.greeting:
            return verdict(AmdDecision.MACHINE, "long_greeting")
        elif self.silence >= c.after_greeting_silence:
            return verdict(AmdDecision.HUMAN, "short_greeting")
        if now >= c.max_analysis:
            return verdict(AmdDecision.UNKNOWN, "max_analysis")
        return None


def classify(pcm: NDArray[Any], config: AmdConfig | None = None) -> AmdResult:
    """Classify 8 kHz int16 audio from its start; audio ending early counts as silence."""
    detector = AmdDetector(config)
    result = detector.feed(pcm)
    return result if result is not None else detector.finish()


async def detect_on_call(
    call: Call,
    config: AmdConfig | None = None,
    *,
    wait_for_greeting_end: float = 0.0,
) -> tuple[AmdResult, AmdDetector]:
    """Run the detector on a live call's received audio until it decides.

    With ``wait_for_greeting_end`` > 0 a machine verdict waits (at most that many seconds
    more) until the greeting is over, so a message spoken next lands after the beep. If the
    call ends first the detector decides on what it heard.
    """
    detector = AmdDetector(config)
    result: AmdResult | None = None
    async with AudioStream(call) as stream:
        while result is None:
            frame = await stream.read()
            if frame is None:
                break
            result = detector.feed(frame)
        if result is None:
            result = detector.finish()
        elif result.is_machine and wait_for_greeting_end > 0:
            limit = detector.elapsed + wait_for_greeting_end
            while not detector.greeting_over and detector.elapsed < limit:
                frame = await stream.read()
                if frame is None:
                    break
                detector.feed(frame)
        logger.info(
            "call %s: AMD %s (%s) at %.2f s, greeting %.2f s, %d silent frames filled",
            call.call_id,
            result.decision.value,
            result.reason,
            result.decided_at,
            result.greeting,
            stream.filled_frames,
        )
    return result, detector
