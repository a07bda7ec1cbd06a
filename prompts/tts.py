"""TTS engine interface and a name -> factory registry so engines can be swapped by config."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "ENGINES",
    "EngineFactory",
    "TtsEngine",
    "TtsError",
    "engine_names",
    "get_engine",
    "register_engine",
]


class TtsError(RuntimeError):
    """Speech synthesis failed (engine missing, crashed, timed out or produced no audio)."""


@runtime_checkable
class TtsEngine(Protocol):
    """What the prompt cache needs from a speech synthesiser."""

    name: str

    def cache_identity(self) -> str:
        """Engine name, version and output-affecting settings; part of every cache key."""
        ...

    async def synthesize(self, text: str, *, voice: str) -> bytes:
        """Return a complete WAV file (any rate, width or channel count)."""
        ...


EngineFactory = Callable[..., TtsEngine]

ENGINES: dict[str, EngineFactory] = {}
_lock = threading.Lock()


def register_engine(name: str, factory: EngineFactory, *, replace: bool = False) -> None:
    """Make an engine available to `get_engine`; refuses silent overrides of an existing name."""
    if not name or name != name.strip():
        raise ValueError(f"invalid engine name {name!r}")
    with _lock:
        if name in ENGINES and not replace and ENGINES[name] is not factory:
            raise ValueError(f"TTS engine {name!r} is already registered")
        ENGINES[name] = factory


def get_engine(name: str, **options: Any) -> TtsEngine:
    """Build the engine registered as `name`, passing `options` to its factory."""
    with _lock:
        factory = ENGINES.get(name)
        known = sorted(ENGINES)
    if factory is None:
        raise TtsError(f"unknown TTS engine {name!r}; registered: {', '.join(known) or 'none'}")
    return factory(**options)


def engine_names() -> list[str]:
    """Registered engine names, for CLI help and config validation."""
    with _lock:
        return sorted(ENGINES)
