"""eSpeak NG engine: small, offline and always installable from distro packages."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import threading

from prompts.tts import TtsError, register_engine

__all__ = ["EspeakEngine"]

# Voice names look like "en-us", "en-us+f3", "mb-en1", "roa/it"; anything else is rejected so a
# configured voice can never be mistaken for an option.
_VOICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-./:]{0,63}")
_STDERR_LIMIT = 2000


class EspeakEngine:
    """Runs `espeak-ng --stdout` per prompt; text is an argv element after `--`, never a shell."""

    name = "espeak-ng"

    def __init__(
        self,
        *,
        binary: str = "espeak-ng",
        rate_wpm: int = 160,
        timeout_s: float = 15.0,
    ) -> None:
        if not 80 <= rate_wpm <= 450:
            raise ValueError(f"espeak-ng rate must be 80..450 words/min, got {rate_wpm}")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self.binary = binary
        self.rate_wpm = rate_wpm
        self.timeout_s = timeout_s
        self._identity: str | None = None
        self._identity_lock = threading.Lock()

    def cache_identity(self) -> str:
        """Version output plus speaking rate, so an engine upgrade or rate change re-renders.

        Runs `espeak-ng --version` once per instance; it takes milliseconds, so a blocking call
        is acceptable even when first reached from the event loop.
        """
        with self._identity_lock:
            if self._identity is None:
                version = self._run_version()
                self._identity = f"{self.name}|{version}|rate={self.rate_wpm}"
            return self._identity

    def _run_version(self) -> str:
        try:
            done = subprocess.run(
                [self.binary, "--version"],
                capture_output=True,
                timeout=self.timeout_s,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TtsError(f"cannot run {self.binary!r} --version: {exc}") from exc
        out = done.stdout.decode("utf-8", "replace").strip()
        if done.returncode != 0 or not out:
            raise TtsError(
                f"{self.binary!r} --version exited {done.returncode}: {_clip(done.stderr)}"
            )
        return " ".join(out.split())

    async def synthesize(self, text: str, *, voice: str) -> bytes:
        """Speak `text` into WAV bytes (espeak-ng's native 22050 Hz mono 16-bit)."""
        if not _VOICE_RE.fullmatch(voice):
            raise ValueError(f"invalid espeak-ng voice name {voice!r}")
        if not text.strip():
            raise ValueError("text to synthesize is empty")
        argv = [
            self.binary,
            "-v",
            voice,
            "-s",
            str(self.rate_wpm),
            "--stdout",
            "--",  # everything after this is text, even "-x" or "--help"
            text,
        ]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # own process group, so a kill reaches any children
            )
        except OSError as exc:
            raise TtsError(f"cannot start {self.binary!r}: {exc}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            await _kill(proc)
            raise TtsError(f"{self.binary!r} timed out after {self.timeout_s:g}s") from None
        except BaseException:
            # Cancellation: do not leave an orphaned synthesiser behind.
            await _kill(proc)
            raise
        if proc.returncode != 0:
            raise TtsError(
                f"{self.binary!r} exited {proc.returncode} for voice {voice!r}: {_clip(stderr)}"
            )
        # espeak-ng exits 0 for some failures; a RIFF header is the minimum proof of output.
        if len(stdout) <= 44 or not stdout.startswith(b"RIFF"):
            raise TtsError(
                f"{self.binary!r} produced no audio ({len(stdout)} bytes): {_clip(stderr)}"
            )
        return stdout


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill the engine's whole process group; a wrapper script's children hold our pipes."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()


def _clip(stderr: bytes) -> str:
    text = stderr.decode("utf-8", "replace").strip()
    return text[:_STDERR_LIMIT] or "(no stderr)"


register_engine(EspeakEngine.name, EspeakEngine)
