"""Answering-machine detection on labelled espeak-ng/sox audio and synthetic edge cases."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from gateway.media.dtmf import dtmf_tone
from gateway.media.g711 import alaw_decode, alaw_encode, ulaw_decode, ulaw_encode
from ivr.amd import AmdConfig, AmdDecision, AmdDetector, classify
from tests.ivr_audio import (  # noqa: F401 - corpus is a fixture
    ALL_CLIPS,
    HUMAN_CLIPS,
    MACHINE_CLIPS,
    RATE,
    Clip,
    corpus_fixture,
    load,
)

pytestmark = pytest.mark.timeout(120)


def silence(seconds: float) -> NDArray[np.int16]:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


def tone(hz: float, seconds: float, amplitude: float = 0.5) -> NDArray[np.int16]:
    t = np.arange(round(seconds * RATE)) / RATE
    return (amplitude * 32767 * np.sin(2 * np.pi * hz * t)).astype(np.int16)


def g711(pcm: NDArray[np.int16], codec: str) -> NDArray[np.int16]:
    """What the far end's audio looks like after the call's codec."""
    if codec == "PCMU":
        return ulaw_decode(ulaw_encode(pcm))
    return alaw_decode(alaw_encode(pcm))


def score(corpus: dict[str, Path], clips: list[Clip], codec: str | None) -> list[str]:
    """Names of the clips classified wrongly."""
    wrong = []
    for clip in clips:
        pcm = load(corpus[clip.name])
        result = classify(pcm if codec is None else g711(pcm, codec))
        if result.decision.value != clip.label:
            wrong.append(f"{clip.name}: {result}")
    return wrong


def test_corpus_is_labelled_and_varied(corpus: dict[str, Path]) -> None:
    assert len(HUMAN_CLIPS) >= 10
    assert len(MACHINE_CLIPS) >= 10
    assert len({clip.voice for clip in ALL_CLIPS}) >= 8
    assert len({clip.wpm for clip in ALL_CLIPS}) >= 8
    assert sum(1 for c in MACHINE_CLIPS if c.beep_hz) >= 5
    assert sum(1 for c in MACHINE_CLIPS if not c.beep_hz) >= 3
    assert sum(1 for c in ALL_CLIPS if c.noise) >= 6
    for clip in ALL_CLIPS:
        pcm = load(corpus[clip.name])
        spoken = len(pcm) / RATE - clip.lead - clip.tail  # espeak adds ~0.3 s of its own
        if clip.label == "human":
            assert spoken < 2.5 + (clip.repeat_after + 2.5 if clip.repeat_after else 0), clip
        else:
            assert spoken > 3.0, clip  # a real greeting, not a short phrase


@pytest.mark.parametrize("codec", [None, "PCMU", "PCMA"])
def test_at_least_nine_in_ten_of_each_class(corpus: dict[str, Path], codec: str | None) -> None:
    for clips in (HUMAN_CLIPS, MACHINE_CLIPS):
        wrong = score(corpus, clips, codec)
        correct = len(clips) - len(wrong)
        assert correct >= 0.9 * len(clips), wrong


def test_decides_early(corpus: dict[str, Path]) -> None:
    config = AmdConfig()
    for clip in ALL_CLIPS:
        pcm = load(corpus[clip.name])
        result = classify(pcm, config)
        assert result.decided_at < config.max_analysis, (clip.name, result)
        if result.decision is AmdDecision.HUMAN:
            # "Hello?" then the pause: decided by the pause, not by waiting for more.
            assert result.decided_at <= clip.lead + result.greeting + 1.0, (clip.name, result)
        elif result.decision is AmdDecision.MACHINE:
            speech_end = len(pcm) / RATE - clip.tail - (0.8 if clip.beep_hz else 0)
            assert result.decided_at < speech_end - 1.0, (clip.name, result)  # mid-greeting


@pytest.mark.parametrize("chunk", [160, 37, 800, 4000])
def test_streaming_matches_the_pure_function(corpus: dict[str, Path], chunk: int) -> None:
    for clip in (HUMAN_CLIPS[1], MACHINE_CLIPS[0], MACHINE_CLIPS[2]):
        pcm = load(corpus[clip.name])
        expected = classify(pcm)
        detector = AmdDetector()
        decided = [r for i in range(0, len(pcm), chunk) if (r := detector.feed(pcm[i : i + chunk]))]
        assert decided == [expected]  # reported exactly once
        assert detector.result == expected


def test_detector_keeps_listening_for_the_beep(corpus: dict[str, Path]) -> None:
    for clip in MACHINE_CLIPS:
        pcm = load(corpus[clip.name])
        detector = AmdDetector()
        detector.feed(pcm)
        assert detector.greeting_over, clip.name
        if clip.beep_hz:
            beep_start = len(pcm) / RATE - clip.tail - 0.5
            assert detector.beep_at == pytest.approx(beep_start, abs=0.1), clip.name
        else:
            assert detector.beep_at is None, clip.name
    for clip in HUMAN_CLIPS:
        detector = AmdDetector()
        detector.feed(load(corpus[clip.name]))
        assert detector.beep_at is None, clip.name  # speech is never taken for a tone


@pytest.mark.parametrize("hz", [440, 1000, 1400, 2000])
def test_beep_alone_is_a_machine(hz: int) -> None:
    result = classify(np.concatenate((silence(0.6), tone(hz, 0.5), silence(2))))
    assert (result.decision, result.reason) == (AmdDecision.MACHINE, "beep")
    assert result.beep_at == pytest.approx(0.6, abs=0.05)
    assert result.decided_at < 0.6 + 0.25  # within ~120 ms of tone onset, plus framing


def test_beep_detection_can_be_switched_off() -> None:
    audio = np.concatenate((silence(0.6), tone(1000, 0.5), silence(2)))
    result = classify(audio, AmdConfig(beep=False))
    assert result.reason != "beep"
    assert result.beep_at is None


def test_dtmf_and_short_blips_are_not_beeps() -> None:
    key = np.concatenate((silence(0.5), dtmf_tone("5", 400), silence(2)))
    assert classify(key).reason != "beep"
    blip = np.concatenate((silence(0.5), tone(1000, 0.06), silence(2)))
    assert classify(blip).reason != "beep"


def test_silence_and_steady_hiss_are_unknown() -> None:
    result = classify(silence(6))
    assert (result.decision, result.reason) == (AmdDecision.UNKNOWN, "initial_silence")
    assert result.decided_at == pytest.approx(2.5, abs=0.03)
    hiss = np.random.default_rng(5).normal(0, 1000, 6 * RATE).astype(np.int16)  # ~ -30 dBFS
    assert classify(hiss).decision is AmdDecision.UNKNOWN


def test_audio_ending_early_counts_as_silence() -> None:
    hello = tone(300, 0.4, 0.2) * np.hanning(round(0.4 * RATE))
    result = classify(np.concatenate((silence(0.3), hello.astype(np.int16))))
    assert result.decision is AmdDecision.HUMAN


def test_parameters_change_the_verdict(corpus: dict[str, Path]) -> None:
    alice = load(corpus["h02_alice"])  # "Yes, this is Alice." ~1.4 s
    assert classify(alice).decision is AmdDecision.HUMAN
    assert classify(alice, AmdConfig(greeting=0.8)).decision is AmdDecision.MACHINE
    late = np.concatenate((silence(3.0), alice))
    assert classify(late).reason == "initial_silence"
    patient = AmdConfig(initial_silence=4.0, max_analysis=8.0)
    assert classify(late, patient).decision is AmdDecision.HUMAN


@pytest.mark.parametrize(
    "kwargs",
    [{"greeting": 0}, {"max_analysis": -1}, {"beep_min_hz": 3000, "beep_max_hz": 2000}],
)
def test_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="AMD"):
        AmdConfig(**kwargs)
