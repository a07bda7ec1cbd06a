"""Content-addressed on-disk cache of rendered prompts, so each alert text is synthesised once."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import tempfile
import time
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from prompts.audio import TELEPHONY_RATE, WavFormatError, pcm_to_wav, to_telephony_pcm, wav_to_pcm
from prompts.tts import TtsEngine, TtsError

__all__ = ["FORMAT_VERSION", "MAX_TEXT_CHARS", "Prompt", "PromptCache", "normalise_text"]

log = logging.getLogger(__name__)

# Bump when the stored audio changes for the same engine output (resampler, format, ...).
FORMAT_VERSION = 1
MAX_TEXT_CHARS = 2000
# Rendered audio kept in memory and shared by every call playing it (~160 KB per 10 s).
MEMORY_BYTES = 32 * 2**20

_Signature = tuple[int, int, int]  # the file's inode, size and mtime_ns
_SETTLE_NS = 1_000_000_000


@dataclass(frozen=True, slots=True)
class _Held:
    signature: _Signature
    pcm: npt.NDArray[np.int16]
    settled: bool  # the file was older than _SETTLE_NS when its signature was taken


@dataclass(frozen=True, eq=False)
class Prompt:
    """A rendered prompt ready to packetise: 8 kHz mono int16 samples plus where they live.

    ``pcm`` is read-only: one array is shared by every call playing the same prompt."""

    text: str
    pcm: npt.NDArray[np.int16] = field(repr=False)
    path: Path
    cached: bool

    @property
    def duration_ms(self) -> int:
        return (len(self.pcm) * 1000) // TELEPHONY_RATE


def normalise_text(text: str) -> str:
    """Canonical spoken form: NFC, control characters dropped, whitespace collapsed.

    Texts differing only in layout sound identical, so they share one cache entry.
    """
    text = unicodedata.normalize("NFC", text)
    text = "".join(" " if unicodedata.category(ch) == "Cc" else ch for ch in text)
    return " ".join(text.split())


class PromptCache:
    """Renders text through a TTS engine once and serves later requests from disk.

    Files are keyed by engine identity, voice, normalised text and FORMAT_VERSION, written
    atomically, and validated on read; a damaged file is re-synthesised. Concurrent renders of
    the same key in one event loop share a single synthesis; separate processes may both
    synthesise, but os.replace makes the last complete file win.

    Decoded audio is also kept in memory (up to ``memory_bytes``, least recently used
    first out) as read-only arrays, so a thousand calls playing one alert share one copy
    instead of reading their own. The file stays the truth: each render checks its inode,
    size and mtime, and a file changed or damaged since is read (or synthesised) again.
    """

    def __init__(
        self,
        directory: Path,
        engine: TtsEngine,
        *,
        voice: str = "en-us",
        memory_bytes: int = MEMORY_BYTES,
    ) -> None:
        self.directory = Path(directory)
        self.engine = engine
        self.voice = voice
        self.memory_bytes = memory_bytes
        self._memory: OrderedDict[str, _Held] = OrderedDict()
        self._memory_used = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._lock_users: dict[str, int] = {}

    @staticmethod
    def default_directory() -> Path:
        """$ACKLINE_PROMPT_CACHE, else $XDG_CACHE_HOME/ackline/prompts (~/.cache by default)."""
        configured = os.environ.get("ACKLINE_PROMPT_CACHE")
        if configured:
            return Path(configured).expanduser()
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        return base / "ackline" / "prompts"

    def key(self, text: str, *, voice: str | None = None) -> str:
        """Cache key for `text`; raises ValueError for empty or over-long text."""
        return self._key(self._check_text(text), voice or self.voice)

    def path_for(self, text: str, *, voice: str | None = None) -> Path:
        """Where the prompt for `text` is (or would be) stored."""
        return self._path(self.key(text, voice=voice))

    async def render(self, text: str, *, voice: str | None = None) -> Prompt:
        """Return the prompt for `text`, synthesising only when no valid cached file exists."""
        spoken = self._check_text(text)
        voice = voice or self.voice
        key = self._key(spoken, voice)
        path = self._path(key)

        pcm = await self._load(key, path)
        if pcm is not None:
            return Prompt(spoken, pcm, path, cached=True)

        self._lock_users[key] = self._lock_users.get(key, 0) + 1
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                # Whoever held the lock before us has probably written the file.
                pcm = await self._load(key, path)
                if pcm is not None:
                    return Prompt(spoken, pcm, path, cached=True)
                wav = await self.engine.synthesize(spoken, voice=voice)
                pcm = await asyncio.to_thread(self._convert_and_store, wav, path)
                with contextlib.suppress(OSError):  # unremembered: the next render reads it
                    self._remember(key, _signature(await asyncio.to_thread(path.stat)), pcm)
                return Prompt(spoken, pcm, path, cached=False)
        finally:
            self._lock_users[key] -= 1
            if self._lock_users[key] == 0:
                del self._lock_users[key]
                del self._locks[key]

    async def _load(self, key: str, path: Path) -> npt.NDArray[np.int16] | None:
        """The audio of ``path``: the shared copy while the file is unchanged, else read."""
        try:
            signature = _signature(await asyncio.to_thread(path.stat))
        except FileNotFoundError:
            return None
        held = self._memory.get(key)
        if held is not None and held.signature == signature and held.settled:
            self._memory.move_to_end(key)
            return held.pcm
        pcm = await asyncio.to_thread(self._read, path)
        if pcm is None:
            return None
        if held is not None and np.array_equal(held.pcm, pcm):
            pcm = held.pcm  # unchanged after all: keep sharing the one copy
        # Had the file been replaced between stat and read, the next render's stat
        # differs from this signature and reads it again.
        self._remember(key, signature, pcm)
        return pcm

    def _remember(self, key: str, signature: _Signature, pcm: npt.NDArray[np.int16]) -> None:
        pcm.flags.writeable = False
        old = self._memory.pop(key, None)
        if old is not None:
            self._memory_used -= old.pcm.nbytes
        if pcm.nbytes > self.memory_bytes:
            return
        # A rewrite within the file system's timestamp granularity (a few ms) can keep size
        # and mtime; until the file is older than that, renders read it and compare.
        settled = time.time_ns() - signature[2] > _SETTLE_NS
        self._memory[key] = _Held(signature, pcm, settled)
        self._memory_used += pcm.nbytes
        while self._memory_used > self.memory_bytes:
            _, evicted = self._memory.popitem(last=False)
            self._memory_used -= evicted.pcm.nbytes

    def _check_text(self, text: str) -> str:
        spoken = normalise_text(text)
        if not spoken:
            raise ValueError("prompt text is empty")
        if len(spoken) > MAX_TEXT_CHARS:
            raise ValueError(f"prompt text is {len(spoken)} chars; the limit is {MAX_TEXT_CHARS}")
        return spoken

    def _key(self, spoken: str, voice: str) -> str:
        # JSON framing keeps fields unambiguous ("a|b" + "c" never equals "a" + "b|c").
        material = json.dumps(
            [FORMAT_VERSION, self.engine.cache_identity(), voice, spoken], ensure_ascii=False
        )
        return hashlib.sha256(material.encode("utf-8")).hexdigest()

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.wav"

    @staticmethod
    def _read(path: Path) -> npt.NDArray[np.int16] | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            pcm = wav_to_pcm(data, rate=TELEPHONY_RATE)
        except WavFormatError as exc:
            log.warning("discarding damaged prompt %s: %s", path, exc)
            return None
        if pcm.size == 0:
            log.warning("discarding empty prompt %s", path)
            return None
        return pcm

    @staticmethod
    def _convert_and_store(wav: bytes, path: Path) -> npt.NDArray[np.int16]:
        try:
            pcm = to_telephony_pcm(wav)
        except WavFormatError as exc:
            raise TtsError(f"engine returned unusable audio: {exc}") from exc
        if pcm.size == 0:
            raise TtsError("engine returned no audio samples")
        _atomic_write(path, pcm_to_wav(pcm, TELEPHONY_RATE))
        return pcm


def _signature(stat: os.stat_result) -> _Signature:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _atomic_write(path: Path, data: bytes) -> None:
    """Synced temp file + os.replace: readers see the old file or the whole new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem[:16]}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
