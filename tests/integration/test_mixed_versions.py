"""A rolling deploy runs the previous release and this one side by side on one database:
migrations are expand/contract (tests/unit/test_migrations_expand_only.py), and here the
previous release's own code, taken from git, serves on the schema this version migrated to,
next to a node of this version. Alerts accepted by either are paged by either, and an ack
through one answers for an alert the other accepted."""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel
from starlette.responses import Response

from storage.db import Database, alembic_config
from tests.conftest_escalation import REDIS_URL
from tests.fakes import FakeService, RecordedRequest
from tests.integration.peers import ackline_cli, cli_env, free_port
from tests.waiting import wait_until

pytest_plugins = ["tests.conftest_escalation"]

# The last release, whose code must keep working on this version's schema while a rolling
# deploy replaces it. Move it forward when a release is cut (and never past a commit whose
# schema a still-running release could not read).
PREVIOUS_RELEASE = "a798253455bb69853a2e361a3d056348bfba1415"
CHECKOUT = Path(__file__).resolve().parents[2]
KEY = "k-acme"


class Receiver(FakeService):
    """The responders' webhook endpoint."""

    def script_key(self, request: RecordedRequest) -> str:
        return request.path

    async def handle(self, request: RecordedRequest) -> Response:
        return Response(status_code=204)


def previous_release(into: Path) -> Path:
    """The previous release's source tree, from this checkout's git history."""
    found = subprocess.run(
        ["git", "-C", str(CHECKOUT), "cat-file", "-e", f"{PREVIOUS_RELEASE}^{{commit}}"],
        capture_output=True,
    )
    if found.returncode != 0:
        pytest.fail(
            f"release {PREVIOUS_RELEASE[:12]} is not in this clone's history "
            "(a shallow clone? `git fetch --unshallow`)"
        )
    archive = subprocess.run(
        ["git", "-C", str(CHECKOUT), "archive", "--format=tar", PREVIOUS_RELEASE],
        capture_output=True,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


@contextlib.contextmanager
def node(cmd: list[str], env: dict[str, str], cwd: Path, log: Path) -> Iterator[int]:
    """`ackline serve --role all` on its own HTTP and SIP ports; yields the HTTP port."""
    port = free_port()
    args = [*cmd, "serve", "--role", "all", "--no-webphone", "--http-port", str(port),
            "--port", str(free_port())]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def ready(client: httpx.AsyncClient, log: Path) -> None:
    for _ in range(300):
        with contextlib.suppress(httpx.HTTPError):
            if (await client.get("/readyz")).status_code == 200:
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"{client.base_url} never became ready:\n{await asyncio.to_thread(log.read_text)}")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


@pytest.mark.timeout(180)
async def test_the_previous_release_and_this_one_serve_one_schema_together(
    tmp_path: Path, pg_url: str, redis_prefix: str, receiver: Receiver
) -> None:
    old_tree = previous_release(tmp_path / "previous")
    # This version's migrations run first, as the first new node of a rolling deploy would.
    db = Database(pg_url)
    try:
        await db.migrate()
    finally:
        await db.dispose()
    config: dict[str, Any] = {
        "company": "acme",
        "recipients": [{"id": "ops", "name": "Ops", "webhook_url": f"{receiver.url}/page"}],
        "policies": [{"name": "p", "steps": [{"recipients": ["ops"], "channels": ["webhook"],
                                              "delay": "10m"}]}],
    }  # fmt: skip
    (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(config))
    env = cli_env(tmp_path) | {
        "ACKLINE_CONFIG": str(tmp_path / "ackline.yaml"),
        "ACKLINE_DATABASE_URL": pg_url,
        "REDIS_URL": REDIS_URL,
        "ACKLINE_REDIS_PREFIX": redis_prefix,
        "ACKLINE_API_KEYS": f"{KEY}:acme",
        "ACKLINE_WEBHOOK_SECRET": "whsec_mixed_versions",
        "ACKLINE_MIGRATE": "0",  # the old release must not touch the new schema
    }
    # PYTHONPATH puts the old tree before this checkout's editable install.
    old_env = env | {"PYTHONPATH": str(old_tree), "ACKLINE_AUDIT_DIR": str(tmp_path / "a-old")}
    new_env = env | {"ACKLINE_AUDIT_DIR": str(tmp_path / "a-new")}
    old_cmd = [sys.executable, "-c", "import api.cli; assert api.cli.__file__.startswith("
               f"{str(old_tree)!r}), api.cli.__file__; api.cli.main()"]  # fmt: skip
    with (
        node(old_cmd, old_env, old_tree, tmp_path / "old.log") as old_port,
        node(ackline_cli(), new_env, tmp_path, tmp_path / "new.log") as new_port,
    ):
        headers = {"X-API-Key": KEY}
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{old_port}", headers=headers) as old,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{new_port}", headers=headers) as new,
        ):
            await ready(old, tmp_path / "old.log")
            await ready(new, tmp_path / "new.log")
            accepted: dict[str, httpx.AsyncClient] = {}
            for i in range(20):
                api = (old, new)[i % 2]
                answer = await api.post("/v1/alerts", json={"title": f"mixed {i}", "policy": "p"})
                assert answer.status_code == 202, answer.text
                accepted[answer.json()["id"]] = api

            # a timeout is not an error here: the assert below names what is missing
            with contextlib.suppress(TimeoutError):
                await wait_until(
                    lambda: len(receiver.requests) >= len(accepted), 30, "pages", interval=0.1
                )
            paged = [r for r in receiver.requests if r.path == "/page"]
            assert len(paged) == len(accepted), (tmp_path / "old.log").read_text()

            # Each release reads and acks what the other accepted.
            for alert_id, by in accepted.items():
                other = new if by is old else old
                seen = await other.get(f"/v1/alerts/{alert_id}")
                assert seen.status_code == 200, seen.text
                acked = await other.post(f"/v1/alerts/{alert_id}/ack")
                assert acked.status_code == 200, acked.text
                assert acked.json()["state"] == "acknowledged"
            for alert_id, by in accepted.items():
                assert (await by.get(f"/v1/alerts/{alert_id}")).json()["state"] == "acknowledged"


def _heads(conn: Connection) -> tuple[str, ...]:
    return tuple(MigrationContext.configure(conn).get_current_heads())


def _schema_diff(conn: Connection) -> list[Any]:
    ctx = MigrationContext.configure(conn, opts={"compare_type": True})
    return list(compare_metadata(ctx, SQLModel.metadata))


@pytest.mark.timeout(120)
async def test_a_schema_the_previous_release_migrated_upgrades_to_this_head(
    tmp_path: Path, db_url: str
) -> None:
    """The previous release ran its migrations from another place in the tree (before
    storage/ there was escalation/migrations); alembic knows them by revision only, so
    every revision it wrote is one of ours and the database upgrades in place to this
    release's head, matching this release's tables."""
    old_tree = previous_release(tmp_path / "previous")
    migrate = ("import asyncio, sys; from escalation import db; "
               "assert db.__file__.startswith(sys.argv[2]), db.__file__; "
               "asyncio.run(db.Database(sys.argv[1]).migrate())")  # fmt: skip
    old = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", migrate, db_url, str(old_tree)],
        env=cli_env(tmp_path) | {"PYTHONPATH": str(old_tree)},
        cwd=old_tree,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert old.returncode == 0, old.stderr
    script = ScriptDirectory.from_config(alembic_config())
    ours = {rev.revision for rev in script.walk_revisions()}
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            before = await conn.run_sync(_heads)
        assert before, before
        assert set(before) <= ours, before
        await db.migrate()
        async with db.engine.connect() as conn:
            after = await conn.run_sync(_heads)
            assert after == (script.get_current_head(),)
            assert await conn.run_sync(_schema_diff) == []
    finally:
        await db.dispose()
