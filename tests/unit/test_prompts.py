"""Prompt rendering against the real espeak-ng binary, plus the audio and cache edge cases."""

from __future__ import annotations

import asyncio
import io
import stat
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from prompts import (
    EspeakEngine,
    Prompt,
    PromptCache,
    TtsEngine,
    TtsError,
    WavFormatError,
    engine_names,
    get_engine,
    pcm_to_wav,
    register_engine,
    to_telephony_pcm,
    wav_to_pcm,
)
from prompts.cache import MAX_TEXT_CHARS
from prompts.tts import ENGINES

ALERT = "Database down on eu-1. Press 1 to acknowledge"


class CountingEngine:
    """Wraps a real engine and counts how often synthesis actually runs."""

    def __init__(self, inner: TtsEngine) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0
        self.texts: list[str] = []

    def cache_identity(self) -> str:
        return self.inner.cache_identity()

    async def synthesize(self, text: str, *, voice: str) -> bytes:
        self.calls += 1
        self.texts.append(text)
        return await self.inner.synthesize(text, voice=voice)


class SineEngine:
    """A deterministic non-espeak engine: a tone whose length grows with the text."""

    name = "test-sine"

    def __init__(self, *, freq: float = 440.0, rate: int = 16000, version: str = "1") -> None:
        self.freq = freq
        self.rate = rate
        self.version = version
        self.calls = 0

    def cache_identity(self) -> str:
        return f"{self.name}|{self.version}|{self.freq}|{self.rate}"

    async def synthesize(self, text: str, *, voice: str) -> bytes:
        self.calls += 1
        n = np.arange(int(self.rate * 0.05 * len(text)))
        tone = (8000 * np.sin(2 * np.pi * self.freq * n / self.rate)).astype("<i2")
        stereo = np.column_stack([tone, tone]).reshape(-1)
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(2)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(stereo.tobytes())
        return buf.getvalue()


class GarbageEngine:
    name = "garbage"

    def cache_identity(self) -> str:
        return "garbage|1"

    async def synthesize(self, text: str, *, voice: str) -> bytes:
        return b"RIFF this is not really audio at all"


@pytest.fixture
def espeak() -> CountingEngine:
    return CountingEngine(EspeakEngine())


@pytest.fixture
def cache(tmp_path: Path, espeak: CountingEngine) -> PromptCache:
    return PromptCache(tmp_path / "prompts", espeak)


@pytest.fixture
def sine_registered() -> Iterator[None]:
    register_engine(SineEngine.name, SineEngine)
    yield
    ENGINES.pop(SineEngine.name, None)


def rms(pcm: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2)))


def dominant_hz(pcm: npt.NDArray[np.int16], rate: int = 8000) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64)))
    return float(np.fft.rfftfreq(pcm.size, 1 / rate)[int(np.argmax(spectrum))])


def wav_files(directory: Path) -> list[Path]:
    return sorted(directory.rglob("*.wav"))


# --- real espeak-ng rendering ---------------------------------------------------------------


async def test_render_produces_telephony_audio(cache: PromptCache, espeak: CountingEngine) -> None:
    prompt = await cache.render(ALERT)

    assert isinstance(prompt, Prompt)
    assert prompt.cached is False
    assert espeak.calls == 1
    assert prompt.text == ALERT
    assert prompt.pcm.dtype == np.int16
    assert prompt.pcm.ndim == 1
    assert 1000 <= prompt.duration_ms <= 8000
    assert prompt.duration_ms == len(prompt.pcm) * 1000 // 8000
    assert rms(prompt.pcm) > 500  # speech, not silence or dither
    assert int(np.max(np.abs(prompt.pcm.astype(np.int32)))) > 5000

    with wave.open(str(prompt.path), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (8000, 1, 2)
        assert w.getnframes() == len(prompt.pcm)
    assert prompt.path.parent.name == prompt.path.stem[:2]
    assert prompt.path.is_relative_to(cache.directory)


async def test_second_render_is_served_from_disk(
    tmp_path: Path, cache: PromptCache, espeak: CountingEngine
) -> None:
    first = await cache.render(ALERT)
    second = await cache.render(ALERT)

    assert espeak.calls == 1
    assert second.cached is True
    assert second.path == first.path
    np.testing.assert_array_equal(second.pcm, first.pcm)

    # A fresh cache (e.g. after a restart) on the same directory also skips synthesis.
    restarted_engine = CountingEngine(EspeakEngine())
    restarted = PromptCache(cache.directory, restarted_engine)
    third = await restarted.render(ALERT)
    assert restarted_engine.calls == 0
    assert third.cached is True
    np.testing.assert_array_equal(third.pcm, first.pcm)


async def test_whitespace_variants_share_one_entry(
    cache: PromptCache, espeak: CountingEngine
) -> None:
    a = await cache.render(ALERT)
    b = await cache.render("  Database  down on\neu-1.\tPress 1 to acknowledge \n")
    assert espeak.calls == 1
    assert b.cached is True
    assert b.path == a.path
    assert b.text == ALERT


async def test_voice_and_text_select_different_files(
    cache: PromptCache, espeak: CountingEngine
) -> None:
    us = await cache.render("Press 1 to acknowledge")
    gb = await cache.render("Press 1 to acknowledge", voice="en-gb")
    other = await cache.render("Press 2 to escalate")

    assert espeak.calls == 3
    assert len({us.path, gb.path, other.path}) == 3
    assert wav_files(cache.directory) == sorted([us.path, gb.path, other.path])
    assert not np.array_equal(us.pcm, other.pcm)
    assert cache.path_for("Press 1 to acknowledge", voice="en-gb") == gb.path
    assert cache.path_for("Press 1 to acknowledge") == us.path


async def test_engine_identity_is_part_of_the_key(tmp_path: Path) -> None:
    engine = EspeakEngine()
    identity = engine.cache_identity()
    assert identity.startswith("espeak-ng|")
    assert "rate=160" in identity
    assert engine.cache_identity() is identity  # computed once

    slow = PromptCache(tmp_path, EspeakEngine(rate_wpm=120))
    normal = PromptCache(tmp_path, engine)
    assert slow.path_for(ALERT) != normal.path_for(ALERT)
    p_slow, p_normal = await slow.render(ALERT), await normal.render(ALERT)
    assert p_slow.duration_ms > p_normal.duration_ms


async def test_renders_share_one_read_only_copy(
    cache: PromptCache, espeak: CountingEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = await cache.render(ALERT)
    second = await cache.render(ALERT)  # file just written: read and compared, then shared
    assert second.pcm is first.pcm
    assert not first.pcm.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        first.pcm[0] = 1
    monkeypatch.setattr("prompts.cache._SETTLE_NS", 0)
    settled = await cache.render(ALERT)  # served from memory without reading the file
    assert settled.pcm is first.pcm
    assert settled.cached is True
    # A file replaced by another (new inode) is read again, not served from memory.
    replacement = first.path.with_suffix(".new")
    replacement.write_bytes(pcm_to_wav(first.pcm[: len(first.pcm) // 2]))
    replacement.replace(first.path)
    shorter = await cache.render(ALERT)
    assert len(shorter.pcm) == len(first.pcm) // 2
    assert espeak.calls == 1


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "empty", "wrong_rate"],
)
async def test_damaged_cache_file_is_resynthesised(
    cache: PromptCache, espeak: CountingEngine, damage: str
) -> None:
    good = await cache.render(ALERT)
    original = good.path.read_bytes()
    if damage == "garbage":
        good.path.write_bytes(b"\x00garbage, not a wav file" * 10)
    elif damage == "truncated":
        good.path.write_bytes(original[: len(original) // 2])
    elif damage == "empty":
        good.path.write_bytes(b"")
    else:
        good.path.write_bytes(pcm_to_wav(good.pcm, rate=16000))

    again = await cache.render(ALERT)

    assert espeak.calls == 2
    assert again.cached is False
    assert again.path == good.path
    np.testing.assert_array_equal(again.pcm, good.pcm)  # espeak-ng is deterministic
    assert good.path.read_bytes() == original
    assert (await cache.render(ALERT)).cached is True
    assert espeak.calls == 2


async def test_concurrent_renders_synthesise_once(
    cache: PromptCache, espeak: CountingEngine
) -> None:
    prompts = await asyncio.gather(*(cache.render(ALERT) for _ in range(8)))

    assert espeak.calls == 1
    assert sum(not p.cached for p in prompts) == 1
    for p in prompts:
        np.testing.assert_array_equal(p.pcm, prompts[0].pcm)
    assert wav_files(cache.directory) == [prompts[0].path]
    assert cache._locks == {}  # per-key locks are released once nobody waits


async def test_concurrent_renders_of_different_texts_each_synthesise(
    cache: PromptCache, espeak: CountingEngine
) -> None:
    texts = [f"Incident {n} on eu-1" for n in range(4)]
    prompts = await asyncio.gather(*(cache.render(t) for t in texts * 2))
    assert espeak.calls == 4
    assert sorted(espeak.texts) == sorted(texts)
    assert len({p.path for p in prompts}) == 4


@pytest.mark.parametrize("text", ["-5 degrees in rack 4", "--help", "-v en-gb --stdout"])
async def test_text_starting_with_dash_is_spoken(cache: PromptCache, text: str) -> None:
    prompt = await cache.render(text)
    assert prompt.text == text
    assert prompt.duration_ms > 400
    assert rms(prompt.pcm) > 500


async def test_no_temp_files_are_left_behind(cache: PromptCache) -> None:
    await cache.render(ALERT)
    await cache.render("Press 1 to acknowledge")
    leftovers = [p for p in cache.directory.rglob("*") if p.is_file() and p.suffix != ".wav"]
    assert leftovers == []


# --- failures -------------------------------------------------------------------------------


async def test_missing_binary_raises_tts_error(tmp_path: Path) -> None:
    engine = EspeakEngine(binary=str(tmp_path / "no-such-espeak-ng"))
    with pytest.raises(TtsError, match="no-such-espeak-ng"):
        await engine.synthesize("hello", voice="en-us")
    with pytest.raises(TtsError, match="--version"):
        engine.cache_identity()
    with pytest.raises(TtsError):
        await PromptCache(tmp_path / "c", engine).render("hello")
    assert not (tmp_path / "c").exists()


async def test_unknown_voice_reports_stderr(cache: PromptCache) -> None:
    with pytest.raises(TtsError, match="does not exist"):
        await cache.render(ALERT, voice="xx-nonexistent")
    assert wav_files(cache.directory) == []


async def test_voice_that_looks_like_an_option_is_rejected(cache: PromptCache) -> None:
    with pytest.raises(ValueError, match="voice"):
        await cache.render(ALERT, voice="--stdout")


async def test_hung_engine_times_out(tmp_path: Path) -> None:
    script = tmp_path / "fake-espeak"
    script.write_text("#!/bin/sh\nsleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    engine = EspeakEngine(binary=str(script), timeout_s=0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TtsError, match="timed out"):
        await engine.synthesize("hello", voice="en-us")
    assert loop.time() - started < 5


async def test_engine_output_that_is_not_audio_is_not_cached(tmp_path: Path) -> None:
    cache = PromptCache(tmp_path, GarbageEngine())
    with pytest.raises(TtsError, match="unusable audio"):
        await cache.render(ALERT)
    assert await asyncio.to_thread(lambda: [p for p in tmp_path.rglob("*") if p.is_file()]) == []


@pytest.mark.parametrize("text", ["", "   ", "\n\t", "\x00\x07"])
async def test_empty_text_is_rejected(
    cache: PromptCache, espeak: CountingEngine, text: str
) -> None:
    with pytest.raises(ValueError, match="empty"):
        await cache.render(text)
    assert espeak.calls == 0


async def test_overlong_text_is_rejected(cache: PromptCache, espeak: CountingEngine) -> None:
    assert len(cache.key("a" * MAX_TEXT_CHARS)) == 64  # exactly at the limit is accepted
    with pytest.raises(ValueError, match="limit"):
        cache.key("a" * (MAX_TEXT_CHARS + 1))
    with pytest.raises(ValueError, match="limit"):
        await cache.render("a" * (MAX_TEXT_CHARS + 1))
    assert espeak.calls == 0


# --- engine registry ------------------------------------------------------------------------


async def test_custom_engine_plugs_in_via_registry(tmp_path: Path, sine_registered: None) -> None:
    assert "espeak-ng" in engine_names()
    assert isinstance(get_engine("espeak-ng"), EspeakEngine)
    assert SineEngine.name in engine_names()

    engine = get_engine(SineEngine.name, freq=1000.0, rate=16000)
    assert isinstance(engine, SineEngine)
    cache = PromptCache(tmp_path, engine)
    prompt = await cache.render("twenty characters!!!")

    assert engine.calls == 1
    assert prompt.duration_ms == 1000  # 0.05 s per character
    assert abs(dominant_hz(prompt.pcm) - 1000) <= 2
    assert (await cache.render("twenty characters!!!")).cached is True
    assert engine.calls == 1

    # Upgrading the engine changes its identity, so old prompts are not reused.
    upgraded = PromptCache(tmp_path, get_engine(SineEngine.name, freq=1000.0, version="2"))
    fresh = await upgraded.render("twenty characters!!!")
    assert fresh.cached is False
    assert fresh.path != prompt.path


def test_registry_rejects_duplicates_and_unknown_names(sine_registered: None) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_engine(SineEngine.name, GarbageEngine)
    register_engine(SineEngine.name, SineEngine)  # re-registering the same factory is harmless
    register_engine(SineEngine.name, GarbageEngine, replace=True)
    assert isinstance(get_engine(SineEngine.name), GarbageEngine)
    with pytest.raises(TtsError, match="unknown TTS engine 'piper'"):
        get_engine("piper")


# --- audio conversion -----------------------------------------------------------------------


def tone(freq: float, rate: int, seconds: float = 1.0, amp: float = 10000) -> npt.NDArray[np.int16]:
    n = np.arange(int(rate * seconds))
    return (amp * np.sin(2 * np.pi * freq * n / rate)).astype(np.int16)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
def test_in_band_tone_survives_conversion(rate: int) -> None:
    pcm = to_telephony_pcm(pcm_to_wav(tone(1000, rate), rate))
    assert pcm.dtype == np.int16
    assert abs(len(pcm) - 8000) <= 1
    assert abs(dominant_hz(pcm) - 1000) <= 1
    steady = pcm[400:-400]
    assert rms(steady) == pytest.approx(10000 / np.sqrt(2), rel=0.01)


@pytest.mark.parametrize(("freq", "rate"), [(6000, 22050), (5000, 16000), (9000, 44100)])
def test_out_of_band_energy_is_filtered_not_aliased(freq: int, rate: int) -> None:
    # A linear-interpolation resampler would fold these into the voice band at ~80% amplitude.
    pcm = to_telephony_pcm(pcm_to_wav(tone(freq, rate), rate))
    assert rms(pcm[400:-400]) < 10000 / np.sqrt(2) * 0.001


def test_stereo_and_8bit_input_is_downmixed() -> None:
    left = tone(500, 16000)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.column_stack([left, left]).reshape(-1).astype("<i2").tobytes())
    pcm = to_telephony_pcm(buf.getvalue())
    assert abs(dominant_hz(pcm) - 500) <= 1
    assert rms(pcm[400:-400]) == pytest.approx(rms(left), rel=0.02)

    eight = io.BytesIO()
    with wave.open(eight, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(1)
        w.setframerate(8000)
        w.writeframes(((left[::2].astype(np.int32) >> 8) + 128).astype(np.uint8).tobytes())
    pcm8 = to_telephony_pcm(eight.getvalue())
    assert abs(dominant_hz(pcm8) - 500) <= 1
    assert abs(int(np.mean(pcm8))) < 300  # unsigned 8-bit bias removed


def test_undecodable_audio_raises() -> None:
    with pytest.raises(WavFormatError):
        to_telephony_pcm(b"definitely not audio")


def test_wav_round_trip_and_strict_reading() -> None:
    pcm = tone(440, 8000, 0.25)
    data = pcm_to_wav(pcm)
    np.testing.assert_array_equal(wav_to_pcm(data), pcm)
    assert wav_to_pcm(pcm_to_wav(pcm, 16000), rate=None).size == pcm.size

    with pytest.raises(WavFormatError, match="truncated"):
        wav_to_pcm(data[:-10])
    with pytest.raises(WavFormatError, match="16000 Hz"):
        wav_to_pcm(pcm_to_wav(pcm, 16000))
    with pytest.raises(WavFormatError):
        wav_to_pcm(b"RIFF")
    with pytest.raises(ValueError, match="int16"):
        pcm_to_wav(pcm.astype(np.float32))


def test_default_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ACKLINE_PROMPT_CACHE", str(tmp_path / "custom"))
    assert PromptCache.default_directory() == tmp_path / "custom"
    monkeypatch.delenv("ACKLINE_PROMPT_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert PromptCache.default_directory() == Path.home() / ".cache" / "ackline" / "prompts"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert PromptCache.default_directory() == tmp_path / "xdg" / "ackline" / "prompts"
