"""Labelled answering-machine test audio, generated with espeak-ng and sox at test time.

Humans say a short phrase and wait; machines speak a long greeting, some followed by a
beep (``sox synth 0.5 sine``). Voices, speeds, levels, leading silence and line noise
vary, so the detector is tested on more than one easy case. Every clip is 8 kHz mono
int16, the format a G.711 call delivers.
"""

from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from ivr.audio import write_wav
from prompts.audio import wav_to_pcm

RATE = 8000


@dataclass(frozen=True)
class Clip:
    """One labelled recording recipe."""

    name: str
    label: str  # "human" | "machine"
    text: str
    voice: str = "en-us"
    wpm: int = 160
    pitch: int = 50
    lead: float = 0.5  # seconds of silence before the speech
    volume: float = 0.8
    noise: float = 0.0  # white noise amplitude (fraction of full scale), 0 = clean line
    beep_hz: int = 0  # 0 = no beep
    repeat_after: float = 0.0  # human says the phrase again after this much silence
    tail: float = 3.0


HUMAN_CLIPS = [
    Clip("h01_hello", "human", "Hello?"),
    Clip("h02_alice", "human", "Yes, this is Alice.", "en-us+f3", 150, 60, lead=0.7),
    Clip("h03_bob", "human", "Hi, Bob here.", "en-gb", 170, lead=0.3, volume=0.5),
    Clip("h04_who", "human", "Hello, who is this?", "en-us+m3", 175, 40, lead=0.6),
    Clip("h05_yeah", "human", "Yeah?", "en+f2", 140, 70, lead=0.9, noise=0.01),
    Clip("h06_morning", "human", "Good morning.", "en-gb-scotland", 150, lead=0.4),
    Clip("h07_hello_twice", "human", "Hello?", "en-us+f4", 160, 65, repeat_after=1.3),
    Clip("h08_yes", "human", "Yes?", "en-029", 130, lead=0.5, volume=0.4, noise=0.006),
    Clip("h09_dave", "human", "Dave speaking.", "en-gb-x-rp", 160, 45, lead=0.8),
    Clip("h10_hi", "human", "Hi there.", "en-us+m7", 200, lead=0.3, noise=0.012),
    Clip("h11_erin", "human", "This is Erin.", "en-us+f1", 165, 55, lead=1.0, volume=0.6),
    Clip("h12_oncall", "human", "On call, go ahead.", "en-gb+m2", 185, lead=0.5),
    Clip("h13_noisy_line", "human", "Hello, yes?", "en-us+f2", 170, 60, lead=0.6, noise=0.04),
]

MACHINE_CLIPS = [
    Clip(
        "m01_voicemail_beep",
        "machine",
        "Hi, you have reached the voicemail of Alice Jones. Please leave a message after the tone.",
        beep_hz=1000,
    ),
    Clip(
        "m02_unavailable_beep",
        "machine",
        "The person you are calling is not available. Please leave your message after the beep.",
        "en-gb",
        150,
        lead=0.3,
        beep_hz=1000,
    ),
    Clip(
        "m03_bob_nobeep",
        "machine",
        "Hello, this is Bob. I can't take your call right now, "
        "leave a message and I will call you back.",
        "en-us+m3",
        190,
        40,
        lead=0.8,
    ),
    Clip(
        "m04_desk_beep_noise",
        "machine",
        "You have reached the on call desk of Example Corporation. "
        "Nobody is available to take your call.",
        "en-us+f3",
        170,
        60,
        noise=0.01,
        beep_hz=1000,
    ),
    Clip(
        "m05_carol_slow",
        "machine",
        "Hi, this is Carol. Sorry I missed you. Leave your name and number after the tone.",
        "en-us+f4",
        130,
        65,
        lead=0.4,
        volume=0.5,
        beep_hz=1000,
    ),
    Clip(
        "m06_fast_nobeep",
        "machine",
        "You've reached Dave in operations, I'm away from my phone, please leave a message.",
        "en-gb-x-rp",
        210,
        lead=0.6,
    ),
    Clip(
        "m07_mailbox_1400",
        "machine",
        "The mailbox you have dialled is full and cannot accept new messages at this time.",
        "en-029",
        160,
        lead=0.5,
        beep_hz=1400,
    ),
    Clip(
        "m08_erin_noise",
        "machine",
        "Hello, you have reached Erin. I am not able to answer, please leave a short message.",
        "en-us+f1",
        175,
        55,
        lead=1.0,
        noise=0.015,
        volume=0.6,
        beep_hz=1000,
    ),
    Clip(
        "m09_scottish_nobeep",
        "machine",
        "Thank you for calling the network operations centre. "
        "All our engineers are currently busy.",
        "en-gb-scotland",
        155,
        lead=0.3,
    ),
    Clip(
        "m10_quiet_beep",
        "machine",
        "Hi, it's Frank. Leave a message after the beep and I'll get back to you.",
        "en-us+m7",
        180,
        lead=0.7,
        volume=0.35,
        beep_hz=1000,
    ),
    Clip(
        "m11_greeting_pause",
        "machine",
        "Hello. You have reached the voicemail box of Grace Hopper, "
        "please record your message after the tone.",
        "en-gb+m2",
        165,
        lead=0.5,
        beep_hz=1000,
    ),
    Clip(
        "m12_long_slow_nobeep",
        "machine",
        "We are sorry, the subscriber you have called cannot be reached, please try again later.",
        "en",
        140,
        35,
        lead=0.4,
        noise=0.005,
    ),
    Clip(
        "m13_noisy_line_beep",
        "machine",
        "Hi, you have reached Henry. Please leave a message after the tone.",
        "en-us+m3",
        170,
        lead=0.5,
        noise=0.04,
        beep_hz=1000,
    ),
]

ALL_CLIPS = HUMAN_CLIPS + MACHINE_CLIPS


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)


def _speech(clip: Clip, workdir: Path) -> NDArray[np.int16]:
    raw = workdir / f"{clip.name}.raw.wav"
    narrow = workdir / f"{clip.name}.8k.wav"
    _run(
        [
            "espeak-ng",
            "-v",
            clip.voice,
            "-s",
            str(clip.wpm),
            "-p",
            str(clip.pitch),
            "-w",
            str(raw),
            "--",
            clip.text,
        ]
    )
    # sox's band-limited resampler, then the level: the far end's phone is not espeak.
    _run(
        [
            "sox",
            str(raw),
            "-r",
            str(RATE),
            "-c",
            "1",
            "-b",
            "16",
            str(narrow),
            "vol",
            str(clip.volume),
        ]
    )
    return wav_to_pcm(narrow.read_bytes(), rate=RATE)


def _tone(hz: int, workdir: Path) -> NDArray[np.int16]:
    path = workdir / f"beep_{hz}.wav"
    if not path.exists():
        _run(
            [
                "sox",
                "-n",
                "-r",
                str(RATE),
                "-c",
                "1",
                "-b",
                "16",
                str(path),
                "synth",
                "0.5",
                "sine",
                str(hz),
                "vol",
                "0.5",
            ]
        )
    return wav_to_pcm(path.read_bytes(), rate=RATE)


def _silence(seconds: float) -> NDArray[np.int16]:
    return np.zeros(round(seconds * RATE), dtype=np.int16)


def _noise(clip: Clip, samples: int, workdir: Path) -> NDArray[np.int16]:
    path = workdir / f"{clip.name}.noise.wav"
    _run(
        [
            "sox",
            "-n",
            "-r",
            str(RATE),
            "-c",
            "1",
            "-b",
            "16",
            str(path),
            "synth",
            f"{samples / RATE:.4f}",
            "whitenoise",
            "vol",
            str(clip.noise),
        ]
    )
    noise = wav_to_pcm(path.read_bytes(), rate=RATE)
    return np.resize(noise, samples)


def render(clip: Clip, workdir: Path) -> Path:
    """Render one clip to ``workdir/<name>.wav`` (kept if already there) and return it."""
    out = workdir / f"{clip.name}.wav"
    if out.exists():
        return out
    speech = _speech(clip, workdir)
    parts = [_silence(clip.lead), speech]
    if clip.repeat_after:
        parts += [_silence(clip.repeat_after), speech]
    if clip.beep_hz:
        parts += [_silence(0.3), _tone(clip.beep_hz, workdir)]
    parts.append(_silence(clip.tail))
    pcm = np.concatenate(parts).astype(np.int32)
    if clip.noise:
        pcm += _noise(clip, len(pcm), workdir)
    pcm16 = np.clip(pcm, -32768, 32767).astype(np.int16)
    tmp = out.with_suffix(".tmp")
    write_wav(tmp, pcm16)
    tmp.replace(out)
    return out


def build_corpus(workdir: Path) -> dict[str, Path]:
    """Render every clip (in parallel, two at a time: the machine has two cores)."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed: run `make test`")
    workdir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        paths = list(pool.map(lambda clip: render(clip, workdir), ALL_CLIPS))
    return {clip.name: path for clip, path in zip(ALL_CLIPS, paths, strict=True)}


def load(path: Path) -> NDArray[np.int16]:
    return wav_to_pcm(path.read_bytes(), rate=RATE)


@pytest.fixture(scope="session", name="corpus")
def corpus_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The labelled clips, rendered once per test session (import this fixture to use it)."""
    return build_corpus(tmp_path_factory.getbasetemp() / "amd-corpus")
