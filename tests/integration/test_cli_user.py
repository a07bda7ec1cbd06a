"""`ackline user add | list | disable`: console users made from the command line, the
password from a prompt or a file and never from argv."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import yaml

from escalation.users import Role, authenticate, get_user
from storage.db import Database
from tests.integration.peers import ackline_cli

pytest_plugins = ["tests.conftest_escalation"]

CONFIG = {
    "company": "acme",
    "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
}


def user_cli(
    tmp: Path, db_url: str, *args: str, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ACKLINE_DATABASE_URL": db_url, "ACKLINE_AUDIT_DIR": str(tmp / "audit"),
           "ACKLINE_CONFIG": str(tmp / "ackline.yaml")}  # fmt: skip
    return subprocess.run([*ackline_cli(), "user", *args], input=stdin, capture_output=True,
                          text=True, timeout=60, env=env)  # fmt: skip


async def test_user_add_list_disable(sqlite_url: str, tmp_path: Path) -> None:
    (tmp_path / "ackline.yaml").write_text(yaml.safe_dump(CONFIG))
    (tmp_path / "pw").write_text("correct horse battery\n")
    pw = str(tmp_path / "pw")
    added = user_cli(tmp_path, sqlite_url, "add", "Alice", "--role", "admin", "--company",
                     "acme", "--recipient", "alice", "--password-file", pw)  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert added.stdout == "user alice added: admin of acme, acks as alice\n"
    prompted = user_cli(tmp_path, sqlite_url, "add", "vic", "--role", "viewer",
                        stdin="viewer password\nviewer password\n")  # fmt: skip
    assert prompted.returncode == 0, prompted.stderr
    short = user_cli(tmp_path, sqlite_url, "add", "sam", "--role", "viewer", stdin="short\nshort\n")
    assert short.returncode == 2
    assert "at least 8 characters" in short.stderr
    unknown = user_cli(tmp_path, sqlite_url, "add", "rex", "--role", "responder", "--recipient",
                       "nobody", "--password-file", str(tmp_path / "pw"))  # fmt: skip
    assert unknown.returncode == 2
    assert "no recipient 'nobody' in acme" in unknown.stderr

    db = Database(sqlite_url)
    try:
        alice = await authenticate(db, "alice", "correct horse battery")
        assert alice is not None
        assert alice.role is Role.ADMIN
        assert alice.recipient_id == "alice"
        assert await authenticate(db, "vic", "viewer password") is not None
        assert await get_user(db, "sam") is None

        listed = user_cli(tmp_path, sqlite_url, "list", "--json")
        assert [(u["username"], u["role"], u["disabled"]) for u in json.loads(listed.stdout)] == [
            ("alice", "admin", False), ("vic", "viewer", False)]  # fmt: skip
        disabled = user_cli(tmp_path, sqlite_url, "disable", "vic")
        assert disabled.returncode == 0, disabled.stderr
        assert await authenticate(db, "vic", "viewer password") is None
        assert "vic" in user_cli(tmp_path, sqlite_url, "list").stdout
        assert user_cli(tmp_path, sqlite_url, "disable", "nobody").returncode == 2
    finally:
        await db.dispose()
    events = [json.loads(line)["event"] for line in (tmp_path / "audit" / "acme.jsonl").open()]
    assert events == ["user_added", "user_added", "user_disabled"]
