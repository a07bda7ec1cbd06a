"""Migrations after the last release only expand the schema: during a rolling deploy the
previous release still reads and writes it (tests/integration/test_mixed_versions.py runs
that release's code on it). Dropping or renaming a table or column, or adding a required
column without a default, waits for a later release (the contract step), once no running
release uses what it removes."""

from __future__ import annotations

import ast
from pathlib import Path

from storage.db import MIGRATIONS_DIR

# The schema head of the previous release (tests/integration/test_mixed_versions.py).
RELEASED_HEAD = "0005"
CONTRACTING = {"drop_table", "drop_column", "rename_table", "drop_constraint", "alter_column"}


def expand_violations(source: str) -> list[str]:
    """What an upgrade() does that a running older release could trip over."""
    tree = ast.parse(source)
    upgrades = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "upgrade"]
    found: list[tuple[int, str]] = []
    calls = [c for u in upgrades for c in ast.walk(u) if isinstance(c, ast.Call)]
    # A table the previous release does not know is never written by it: its columns
    # may be required.
    new_table_columns = {id(arg) for c in calls if _is_op(c, "create_table") for arg in c.args}
    for call in calls:
        func = call.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            continue
        if func.value.id == "op" and func.attr in CONTRACTING:
            found.append((call.lineno, f"op.{func.attr}"))
        if func.value.id == "op" and func.attr == "execute":
            found.append((call.lineno, "op.execute: raw SQL needs a review by hand"))
        if (
            func.value.id == "sa"
            and func.attr == "Column"
            and id(call) not in new_table_columns
            and _required_without_default(call)
        ):
            found.append((call.lineno, "a NOT NULL column without server_default"))
    return [f"{what} (line {line})" for line, what in sorted(found)]


def _is_op(call: ast.Call, name: str) -> bool:
    func = call.func
    return (
        isinstance(func, ast.Attribute)
        and isinstance(func.value, ast.Name)
        and func.value.id == "op"
        and func.attr == name
    )


def _required_without_default(column: ast.Call) -> bool:
    keywords = {k.arg: k.value for k in column.keywords}
    nullable = keywords.get("nullable")
    required = isinstance(nullable, ast.Constant) and nullable.value is False
    return required and "server_default" not in keywords


def _revision(path: Path) -> str:
    return path.name.split("_", 1)[0]


def migrations_after_release() -> list[Path]:
    return sorted(
        p for p in MIGRATIONS_DIR.glob("versions/[0-9]*.py") if _revision(p) > RELEASED_HEAD
    )


def test_the_released_head_is_a_migration_of_ours() -> None:
    assert any(_revision(p) == RELEASED_HEAD for p in MIGRATIONS_DIR.glob("versions/*.py"))


def test_migrations_after_the_release_only_expand() -> None:
    found = {p.name: expand_violations(p.read_text()) for p in migrations_after_release()}
    assert {name: v for name, v in found.items() if v} == {}


def test_the_check_catches_what_a_contracting_migration_does() -> None:
    source = """
def upgrade():
    op.add_column("alerts", sa.Column("team", sa.String(), nullable=True))
    op.add_column("alerts", sa.Column("tier", sa.Integer(), nullable=False, server_default="1"))
    op.create_index("ix_alerts_team", "alerts", ["team"])
    op.alter_column("alerts", "title", new_column_name="headline")
    op.add_column("alerts", sa.Column("owner", sa.String(), nullable=False))
    op.drop_column("alerts", "summary")
    op.create_table("teams", sa.Column("name", sa.String(), nullable=False))

def downgrade():
    op.drop_column("alerts", "team")
"""
    assert expand_violations(source) == [
        "op.alter_column (line 6)",
        "a NOT NULL column without server_default (line 7)",
        "op.drop_column (line 8)",
    ]
