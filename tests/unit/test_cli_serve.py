"""`ackline serve` helpers that need no sockets."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import yaml

from api.cli import _local_api_key
from api.settings import Settings


def test_local_api_key_is_private_and_survives_restarts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump({"company": "acme"}))
    settings = Settings(audit_dir=tmp_path / "var" / "audit", config_path=config)

    first = _local_api_key(settings)
    second = _local_api_key(settings)

    key_file = tmp_path / "var" / "api-key"
    assert first == second
    [(key, company)] = first.items()
    assert company == "acme"
    assert len(key) >= 32 and key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in capsys.readouterr().err
