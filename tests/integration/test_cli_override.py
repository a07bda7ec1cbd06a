"""`ackline override add`: an override stored where the API and the engine find it."""

from __future__ import annotations

import asyncio
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import yaml

from escalation import crud
from escalation.config import load_config
from escalation.schedules import oncall
from storage.db import Database
from tests.integration.peers import ackline_cli

pytest_plugins = ["tests.conftest_escalation"]

CONFIG = {
    "company": "acme",
    "recipients": [
        {"id": "alice", "name": "Alice", "phone": "+14155550101"},
        {"id": "bob", "name": "Bob", "phone": "+14155550102"},
    ],
    "schedules": [{"name": "payments", "time_zone": "Europe/Berlin", "layers": [
        {"name": "primary", "rotation": "daily", "start": "2026-01-01",
         "participants": ["alice"]},
    ]}],
}  # fmt: skip


def override(tmp: Path, db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACKLINE_DATABASE_URL": db_url,
           "ACKLINE_CONFIG": str(tmp / "ackline.yaml")}  # fmt: skip
    return subprocess.run(
        [*ackline_cli(), "override", "add", *args],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


async def test_override_add_puts_someone_on_call(db_url: str, tmp_path: Path) -> None:
    (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(CONFIG))
    db = Database(db_url)
    try:
        await db.migrate()
        await crud.sync_config(db, load_config(tmp_path / "ackline.yaml"))
        window = ["--start", "2026-02-02T09:00+01:00", "--end", "2026-02-03T09:00+01:00"]
        done = await asyncio.to_thread(
            override, tmp_path, db_url, "payments", "--recipient", "bob", *window
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("override 1: bob on call for payments from 2026-02-02T09:00")
        [stored] = await crud.list_overrides(db, "acme", "payments")
        [schedule] = await crud.list_schedules(db, "acme")
        at = datetime(2026, 2, 2, 12, tzinfo=UTC)
        assert oncall(schedule, [stored], at).recipients == ("bob",)

        unknown = await asyncio.to_thread(
            override, tmp_path, db_url, "payments", "--recipient", "zed", *window
        )
        assert unknown.returncode == 2
        assert "override.recipient: unknown recipient 'zed'" in unknown.stderr
        naive = await asyncio.to_thread(
            override, tmp_path, db_url, "payments", "--recipient", "bob",
            "--start", "2026-02-02T09:00", "--end", "2026-02-03T09:00+01:00",
        )  # fmt: skip
        assert naive.returncode == 2
        assert "start: Input should have timezone info" in naive.stderr
        assert len(await crud.list_overrides(db, "acme")) == 1
    finally:
        await db.dispose()


async def test_overrides_in_the_file_are_stored_once_however_often_it_syncs(
    db_url: str, tmp_path: Path
) -> None:
    cover = {
        "schedule": "payments",
        "recipient": "bob",
        "start": "2026-02-02T09:00:00+01:00",
        "end": "2026-02-03T09:00:00+01:00",
    }
    path = tmp_path / "ackline.yaml"
    path.write_text(yaml.safe_dump(CONFIG | {"overrides": [cover]}))  # fmt: skip
    db = Database(db_url)
    try:
        await db.migrate()
        for _ in range(2):  # two starts
            await crud.sync_config(db, load_config(path))
        [stored] = await crud.list_overrides(db, "acme")
        assert (stored.recipient, stored.start) == ("bob", datetime(2026, 2, 2, 8, tzinfo=UTC))
    finally:
        await db.dispose()
