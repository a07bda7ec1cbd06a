"""Retention of the recordings a flow's record node leaves (ivr.runner): which WAV files
are old enough to go. The hotline (api.hotline) applies it and audits each deletion."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

__all__ = ["expire_recordings"]


def expire_recordings(
    directory: Path,
    retention: float,
    now: float,
    on_deleted: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Delete the WAV files in `directory` last written more than `retention` seconds
    before `now`; a recording still being written is fresh by definition. Several
    gateways may share the directory, so a file another one deleted first is no error.
    `on_deleted` hears of each file as soon as it is gone (a crash midway leaves no
    deletion unrecorded but the one under way)."""
    expired = []
    try:
        candidates = list(directory.glob("*.wav"))
    except FileNotFoundError:
        return []
    for path in candidates:
        try:
            if not path.is_file() or now - path.stat().st_mtime <= retention:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        if on_deleted is not None:
            on_deleted(path)
        expired.append(path)
    return sorted(expired)
