"""PostgreSQL URLs: libpq's multi-host form reaches asyncpg unchanged, a malformed one is
refused at start-up, and the errors of a failover read as an outage, not a bug."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import pytest
import sqlalchemy.exc

from storage.db import (
    Database,
    NoPrimaryError,
    PgHost,
    StandbyConnectionError,
    database_hosts,
    driver_dsn,
    is_broken_connection,
    is_read_only_error,
)
from storage.outage import Dependency, down_dependency

MULTI = "postgresql://h1:5432,h2:5433/ackline?target_session_attrs=read-write"


@pytest.mark.parametrize(
    ("url", "dsn"),
    [
        (MULTI, MULTI),
        ("postgres://u:p@db/ackline", "postgresql://u:p@db/ackline"),
        ("postgresql+asyncpg://db:6432/ackline", "postgresql://db:6432/ackline"),
        ("postgres+asyncpg://db/x", "postgresql://db/x"),
    ],
)
def test_driver_dsn_is_the_libpq_form(url: str, dsn: str) -> None:
    assert driver_dsn(url) == dsn


def test_driver_dsn_refuses_other_databases() -> None:
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        driver_dsn("sqlite:///var/ackline.db")


@pytest.mark.parametrize(
    ("url", "hosts"),
    [
        (MULTI, [PgHost("h1", 5432), PgHost("h2", 5433)]),
        ("postgresql://u:p%40ss@a,b:6000/db", [PgHost("a", 5432), PgHost("b", 6000)]),
        ("postgresql://127.0.0.1:5432/db", [PgHost("127.0.0.1", 5432)]),
        ("postgresql://[::1]:5434,[fe80::1]/db", [PgHost("::1", 5434), PgHost("fe80::1", 5432)]),
        ("postgresql:///db?host=/run/a,/run/b", [PgHost("/run/a", 5432), PgHost("/run/b", 5432)]),
    ],
)
def test_hosts_in_connection_order(url: str, hosts: list[PgHost]) -> None:
    assert database_hosts(url) == hosts


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("postgresql://h1:5432,:5433/db", "empty host"),
        ("postgresql://h1:54x2/db", "bad port"),
        ("postgresql://h1:70000/db", "bad port"),
        ("postgresql://h1,h2/db?target_session_attrs=writable", "target_session_attrs"),
    ],
)
def test_malformed_urls_are_refused(url: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        database_hosts(url)


async def test_the_engine_takes_a_multi_host_url_without_connecting() -> None:
    """SQLAlchemy's own URL parser cannot read the multi-host form; the engine gets its
    connections from asyncpg instead, so constructing it must not parse (or connect)."""
    db = Database(MULTI)
    try:
        assert db.dsn == MULTI
        assert not db.is_sqlite
    finally:
        await db.dispose()


def test_a_malformed_url_fails_the_database_at_construction() -> None:
    with pytest.raises(ValueError, match="bad port"):
        Database("postgresql://h1:5432,h2:x/db")


def test_read_only_errors_are_recognised_through_wrappers() -> None:
    refused = asyncpg.exceptions.ReadOnlySQLTransactionError(
        "cannot execute INSERT in a read-only transaction"
    )
    assert is_read_only_error(refused)
    wrapped = sqlalchemy.exc.DBAPIError("INSERT", None, refused)
    assert is_read_only_error(wrapped)
    assert not is_read_only_error(asyncpg.exceptions.UniqueViolationError("dup"))
    assert not is_read_only_error(None)


def test_a_confused_protocol_state_is_a_broken_connection_and_other_client_errors_bugs() -> None:
    confused = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 11; another operation (2) is in progress"
    )
    assert is_broken_connection(confused)
    assert is_broken_connection(sqlalchemy.exc.DBAPIError("SELECT", None, confused))
    assert is_broken_connection(asyncpg.exceptions.ProtocolError("unexpected message"))
    assert not is_broken_connection(asyncpg.exceptions.InternalClientError("something else"))
    assert not is_broken_connection(asyncpg.exceptions.OutdatedSchemaCacheError("schema"))


def test_failover_errors_read_as_a_database_outage() -> None:
    """Both are answered 503 with Retry-After by the API and backed off by the worker."""
    for exc in (NoPrimaryError("no host takes writes"), StandbyConnectionError("read-only")):
        assert down_dependency(exc) is Dependency.DATABASE
