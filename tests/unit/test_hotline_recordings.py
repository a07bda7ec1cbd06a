"""Hotline recordings are kept for `recordings_retention`, then deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from escalation.config import HotlineConfig
from ivr.recordings import expire_recordings

NOW = 1_800_000_000.0
DAY = 86400.0


def _file(directory: Path, name: str, age: float) -> Path:
    path = directory / name
    path.write_bytes(b"RIFF")
    os.utime(path, (NOW - age, NOW - age))
    return path


def test_only_recordings_older_than_the_retention_are_deleted(tmp_path: Path) -> None:
    old = _file(tmp_path, "20260101T000000-call-record-1.wav", 31 * DAY)
    older = _file(tmp_path, "20251201T000000-call-record-1.wav", 60 * DAY)
    fresh = _file(tmp_path, "20261201T000000-call-record-1.wav", 29 * DAY)
    other = _file(tmp_path, "notes.txt", 90 * DAY)  # not a recording
    (tmp_path / "sub.wav").mkdir()  # not a file
    os.utime(tmp_path / "sub.wav", (NOW - 90 * DAY, NOW - 90 * DAY))

    heard: list[Path] = []
    assert expire_recordings(tmp_path, 30 * DAY, NOW, heard.append) == sorted([old, older])
    assert sorted(heard) == sorted([old, older])  # each reported once, as it went
    assert not old.exists()
    assert not older.exists()
    assert fresh.exists()
    assert other.exists()
    assert (tmp_path / "sub.wav").is_dir()
    assert expire_recordings(tmp_path, 30 * DAY, NOW) == []  # nothing left to expire


def test_a_missing_directory_expires_nothing(tmp_path: Path) -> None:
    assert expire_recordings(tmp_path / "none", DAY, NOW) == []


def test_retention_is_parsed_as_a_duration_and_bounded() -> None:
    numbers = {"default": {"policy": "p"}}
    assert HotlineConfig.model_validate({"numbers": numbers}).recordings_retention is None
    parsed = HotlineConfig.model_validate({"numbers": numbers, "recordings_retention": "30d"})
    assert parsed.recordings_retention == 30 * DAY
    for bad in ("0s", "500ms", "-1d", "soon"):
        with pytest.raises(ValidationError, match=r"recordings_retention|duration"):
            HotlineConfig.model_validate({"numbers": numbers, "recordings_retention": bad})
