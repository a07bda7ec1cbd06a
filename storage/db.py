"""Database engine, sessions and migrations for SQLite (embedded) and PostgreSQL.

PostgreSQL may be given as one host or, for a primary with standbys, in libpq's multi-host
form, `postgresql://h1:5432,h2:5432/ackline?target_session_attrs=read-write`: every new
connection goes to whichever host takes writes now, so a failover needs no restart. A
connection that meets a read-only server (the old primary, demoted) is dropped like one
whose server died, and the next attempt finds the new primary.

SQLite transactions start with BEGIN IMMEDIATE so a transaction that reads an alert and
then writes it holds the write lock from its first statement: the same serialisation
PostgreSQL gets from `SELECT ... FOR UPDATE` on the alert row, without SQLITE_BUSY
upgrade failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import urllib.parse
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg  # type: ignore[import-untyped]
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event, exc, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
log = logging.getLogger(__name__)
# A pooled connection idle for longer than this is pinged before use. Busy connections are
# not: a ping is three round trips (BEGIN, SELECT, ROLLBACK), more than half of a whole
# alert ingest. A server restart under load still only costs the statement that meets the
# dead socket: SQLAlchemy then invalidates every connection pooled before it.
PING_AFTER_IDLE = 2.0


def async_url(url: str) -> str:
    """Accept plain `sqlite:///` / `postgresql://` URLs and pick the async drivers."""
    for plain, driver in (
        ("sqlite://", "sqlite+aiosqlite://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
    ):
        if url.startswith(plain):
            return driver + url[len(plain) :]
    return url


class PgHost(NamedTuple):
    host: str
    port: int


# libpq's values; asyncpg knows the same ones.
SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


def driver_dsn(url: str) -> str:
    """The `postgresql://` DSN asyncpg connects with, from any spelling we accept.

    asyncpg parses libpq's multi-host form and `target_session_attrs` itself; SQLAlchemy's
    URL parser cannot, so the engine hands the DSN to asyncpg as it is."""
    for prefix in ("postgresql+asyncpg://", "postgres+asyncpg://", "postgresql://",
                   "postgres://"):  # fmt: skip
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    raise ValueError(f"not a PostgreSQL URL: {url.split('://')[0]}://...")


def database_hosts(url: str) -> list[PgHost]:
    """The hosts of a PostgreSQL URL in the order connections try them (port 5432 when
    none is given). Checked at start-up: asyncpg only parses the DSN when it connects, so
    a typo would otherwise show as an outage instead of a configuration error."""
    parts = urllib.parse.urlsplit(driver_dsn(url))
    netloc = parts.netloc.rpartition("@")[2]
    query = urllib.parse.parse_qs(parts.query)
    for attrs in query.get("target_session_attrs", []):
        if attrs not in SESSION_ATTRS:
            raise ValueError(f"target_session_attrs={attrs!r}: expected one of "
                             f"{', '.join(SESSION_ATTRS)}")  # fmt: skip
    if not netloc:  # a Unix socket or a host given as ?host=
        return [PgHost(h, 5432) for h in ",".join(query.get("host", [])).split(",") if h]
    hosts = []
    for item in netloc.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest.removeprefix(":")
        else:
            host, _, port = item.partition(":")
        if not host:
            raise ValueError(f"empty host in {netloc!r}")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"bad port {port!r} for host {host!r}")
        hosts.append(PgHost(urllib.parse.unquote(host), int(port) if port else 5432))
    return hosts


class StandbyConnectionError(ConnectionError):
    """A pooled connection's server refused a write: it is no longer the primary."""


class NoPrimaryError(ConnectionError):
    """No host of the URL takes writes right now (a failover is under way). A
    ConnectionError, so it reads as a database outage: 503 and retry, not a bug."""


async def connect_primary(*args: Any, **kwargs: Any) -> Any:
    """`asyncpg.connect`, with "no host matches target_session_attrs" told as an outage."""
    try:
        return await asyncpg.connect(*args, **kwargs)
    except asyncpg.exceptions.TargetServerAttributeNotMatched as e:
        raise NoPrimaryError(str(e)) from e


def is_read_only_error(exc: BaseException | None) -> bool:
    """The server refused a write because it is (now) a standby or read-only: after a
    failover the old primary comes back as a standby, and its connections must go."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
            return True
        if getattr(exc, "sqlstate", None) == _READ_ONLY_SQLSTATE:
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


_READ_ONLY_SQLSTATE = "25006"  # read_only_sql_transaction


def is_broken_connection(exc: BaseException | None) -> bool:
    """asyncpg's own protocol state is confused, which a failover causes: the server's
    "terminating connection" arrives on an idle pooled connection just before its socket
    closes, and the next statement on it fails with "cannot switch to state ...". The
    connection is useless, like a closed one; any other client error is a bug."""
    while exc is not None:
        if isinstance(exc, asyncpg.exceptions.ProtocolError) or (
            type(exc) is asyncpg.exceptions.InternalClientError
            and str(exc).startswith("cannot switch to state")
        ):
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__
    return False


class Database:
    """One async engine plus a session factory; `migrate()` brings the schema to head."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = async_url(url)
        self.is_sqlite = self.url.startswith("sqlite")
        self.dsn = ""  # PostgreSQL: what asyncpg connects with (both pools)
        kwargs: dict[str, Any] = {"echo": echo}
        engine_url = self.url
        if self.is_sqlite:
            # One connection: in-process transactions queue on the pool (an asyncio wait)
            # instead of sleeping in SQLite's busy handler, which backs off up to 100 ms.
            kwargs.update(connect_args={"timeout": 30}, pool_size=1, max_overflow=0)
        else:
            self.dsn = driver_dsn(url)
            database_hosts(self.dsn)  # a malformed URL fails here, not at the first connect
            engine_url = "postgresql+asyncpg://"
            kwargs.update(
                pool_size=pool_size,
                max_overflow=pool_size,
                async_creator=self._orm_connection,
            )
        self.engine: AsyncEngine = create_async_engine(engine_url, **kwargs)
        if self.is_sqlite:
            _sqlite_immediate_transactions(self.engine)
        else:
            _ping_idle_connections(self.engine, PING_AFTER_IDLE)
            _read_only_is_a_disconnect(self.engine)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)
        self.pool_size = pool_size
        self._driver_pool: Any = None
        self._driver_lock = asyncio.Lock()

    def session(self) -> AsyncSession:
        return self.sessionmaker()

    async def _orm_connection(self) -> Any:
        """A connection for SQLAlchemy, made by asyncpg from the DSN (multi-host aware).

        The ORM's statements are prepared and cached per connection too; a generic plan
        settled on while the tables were empty would scan them whole for the connection's
        life (the driver pool plans once, under DRIVER_PLANNER)."""
        return await connect_primary(
            self.dsn,
            server_settings={"plan_cache_mode": "force_custom_plan", **DURABLE_COMMITS},
            **CONNECTION_LIMITS,
        )

    async def driver_pool(self) -> Any:
        """PostgreSQL only: a plain asyncpg pool for the few hot transactions that are
        written as prepared SQL (an alert ingest). Taking a connection from it costs a
        fraction of a SQLAlchemy checkout; `json` goes in as text, like SQLAlchemy's.

        All its connections are opened up front and kept: an alert storm, typically after
        a quiet spell, would otherwise wait for each new connection (connect, auth, codec
        lookup: ~10 ms apiece), which showed as the worst second of the dispatch bench."""
        if self.is_sqlite:
            raise RuntimeError("no driver pool on SQLite")
        if self._driver_pool is None:
            async with self._driver_lock:
                if self._driver_pool is None:
                    self._driver_pool = await asyncpg.create_pool(
                        self.dsn,
                        connect=connect_primary,
                        min_size=self.pool_size,
                        max_size=self.pool_size,
                        init=_driver_codecs,
                        # A transaction is always closed before release (asyncpg rolls
                        # back one that is not); nothing else is set on these sessions,
                        # so skip the reset query and its round trip.
                        reset=_keep_session,
                        max_inactive_connection_lifetime=0,
                        server_settings={**DRIVER_PLANNER, **DURABLE_COMMITS},
                        **CONNECTION_LIMITS,
                    )
        return self._driver_pool

    @contextlib.asynccontextmanager
    async def driver_connection(self) -> AsyncIterator[Any]:
        """A connection of the driver pool for one transaction. When it turns out to be
        dead (the server restarted or failed over), every pooled connection is: they are
        all replaced on their next use, so an outage costs one failed request, not one
        per pooled connection. A server that turned read-only (a demoted primary) counts
        as dead too, and is reported as a lost connection: an outage, answered 503."""
        pool = await self.driver_pool()
        try:
            async with pool.acquire() as raw:
                yield raw
        except _CONNECTION_LOST:
            await pool.expire_connections()
            raise
        except asyncpg.exceptions.ReadOnlySQLTransactionError as e:
            await pool.expire_connections()
            raise StandbyConnectionError(f"the server no longer takes writes: {e}") from e
        except asyncpg.exceptions.InternalClientError as e:
            if not is_broken_connection(e):
                raise
            await pool.expire_connections()
            raise StandbyConnectionError(f"the connection broke: {e}") from e

    @contextlib.asynccontextmanager
    async def every_driver_connection(self) -> AsyncIterator[list[Any]]:
        """All of the driver pool's connections at once (each held until the block ends),
        to prepare or set something on every one of them."""
        pool = await self.driver_pool()
        held = [await pool.acquire() for _ in range(pool.get_size())]
        try:
            yield held
        finally:
            for raw in held:
                await pool.release(raw)

    async def serialize(self, txn: AsyncConnection | AsyncSession, name: str) -> None:
        """Hold the lock `name` until `txn` ends, so processes doing the same read-then-write
        (two starters syncing one config file) take turns. SQLite's BEGIN IMMEDIATE already
        serialises every writer; PostgreSQL gets a transaction-scoped advisory lock."""
        if not self.is_sqlite:
            key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")
            await txn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})

    async def migrate(self, revision: str = "head") -> None:
        """Upgrade the schema; concurrent starters take turns."""
        async with self.engine.begin() as conn:
            await self.serialize(conn, "ackline-migrate")
            await conn.run_sync(run_migrations, revision)

    async def vacuum_warnings(self) -> list[str]:
        """PostgreSQL: what keeps dead rows from being cleaned up. Every sent notification
        and fired timer leaves a dead row version in `jobs`; with autovacuum off nothing
        reclaims them, so the tables and their indexes grow until someone runs VACUUM."""
        if self.is_sqlite:
            return []
        async with self.engine.connect() as conn:
            server = (await conn.execute(text("SHOW autovacuum"))).scalar_one()
            tables = (await conn.execute(text(
                "SELECT c.relname FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind = 'r' "
                "AND EXISTS (SELECT FROM unnest(c.reloptions) o "  # any spelling of false
                "WHERE o ~* '^autovacuum_enabled=(f(a(l(se?)?)?)?|no?|off?|0)$') "
                "ORDER BY c.relname"
            ))).scalars().all()  # fmt: skip
        warnings = []
        if server != "on":
            warnings.append(
                "autovacuum is off on this PostgreSQL server: nothing reclaims the dead rows "
                "that every sent notification leaves; schedule VACUUM ANALYZE or turn it on"
            )
        if tables:
            warnings.append(f"autovacuum is disabled on table(s) {', '.join(tables)}")
        return warnings

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        if self._driver_pool is not None:
            await self._driver_pool.close()
            self._driver_pool = None
        await self.engine.dispose()


# Every transaction commits durably unless it says otherwise (only bookkeeping a crash
# would merely repeat does: see escalation.pg_sql.PG_ASYNC_COMMIT). Set on each connection, so a
# server tuned with `synchronous_commit = off` (a common setting) cannot turn an answered
# 202 or an ack into one a crash takes back.
DURABLE_COMMITS = {"synchronous_commit": "on"}
# An unreachable server fails a connect within `timeout` seconds, and a statement that
# hangs (a network partition, a lock held by a stuck session) within `command_timeout`,
# so a request answers 503 instead of hanging (asyncpg's defaults: 60 s and never).
CONNECTION_LIMITS = {"timeout": 5.0, "command_timeout": 30.0}

_CONNECTION_LOST = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
)

# The driver connections keep their prepared statements, each planned once (generic
# plans): planning the claim afresh took longer than running it (0.46 ms against 0.33 ms);
# planned once, PostgreSQL's CPU in the dispatch bench fell by an eighth and the worker's
# by a tenth. A generic plan made while the tables are
# young (a fresh install under its first alert storm, or a server without autovacuum,
# where ANALYZE never runs) would scan them whole for the connection's life; every
# statement on this pool looks its rows up by key, so the planner is told to take plain
# index scans and nested loops only, which is the right plan at any table size. Not
# bitmap scans either: one never marks the dead row versions its index still lists as
# dead (a plain index scan does, the first time it meets them), so until a VACUUM each
# claim revisited every job already sent, and without autovacuum that grew all day.
DRIVER_PLANNER = {
    "plan_cache_mode": "force_generic_plan",
    "enable_seqscan": "off",
    "enable_bitmapscan": "off",
    "enable_hashjoin": "off",
    "enable_mergejoin": "off",
}


async def _driver_codecs(conn: Any) -> None:
    await conn.set_type_codec("json", encoder=str, decoder=json.loads, schema="pg_catalog")


async def _keep_session(_conn: Any) -> None:
    return None


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def run_migrations(connection: Connection, revision: str = "head") -> None:
    """Upgrade to `revision`; a schema already past what this release knows is left as it
    is. Migrations only expand between releases, so during a rolling deploy (or a roll
    back) an older node runs on its successor's schema instead of refusing to start."""
    cfg = alembic_config(connection)
    known = ScriptDirectory.from_config(cfg)
    current = MigrationContext.configure(connection).get_current_heads()
    ours = {script.revision for script in known.walk_revisions()}
    unknown = [rev for rev in current if rev not in ours]
    if unknown:
        log.warning("the database schema (%s) is newer than this release knows (head %s): "
                    "running on it without migrating", ", ".join(unknown),
                    known.get_current_head())  # fmt: skip
        return
    command.upgrade(cfg, revision)


def _ping_idle_connections(engine: AsyncEngine, idle: float) -> None:
    """`pool_pre_ping`, but only for connections that sat in the pool for `idle` seconds."""
    dialect = engine.sync_engine.dialect

    @event.listens_for(engine.sync_engine.pool, "checkin")
    def _checkin(_dbapi_conn: Any, record: Any) -> None:
        if record is not None:
            record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine.sync_engine.pool, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("checked_in")
        if since is None or time.monotonic() - since < idle:
            return
        try:
            alive = dialect.do_ping(dbapi_conn)
        except Exception as e:
            raise exc.DisconnectionError() from e  # the pool retries with a new connection
        if not alive:
            raise exc.DisconnectionError()


def _read_only_is_a_disconnect(engine: AsyncEngine) -> None:
    """A statement refused as read-only (or meeting a connection the server's shutdown
    broke) marks its connection dead, which makes SQLAlchemy invalidate every pooled
    connection opened before it (all to the old primary) and answer with
    `connection_invalidated` set: an outage (503), not a bug (500)."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _handle_error(ctx: Any) -> None:
        if is_read_only_error(ctx.original_exception) or is_broken_connection(
            ctx.original_exception
        ):
            ctx.is_disconnect = True


def _sqlite_immediate_transactions(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
