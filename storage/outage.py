"""What a failure says about our dependencies, and how to report a failure that repeats.

An outage of PostgreSQL or Redis shows up as a dozen exception types from three libraries
(asyncpg, SQLAlchemy wrapping it, redis-py) plus plain socket errors. The API answers all
of them the same way, 503 with Retry-After, and the worker backs off; this module is the
one place that tells "a dependency is down" apart from a bug, which stays a 500.
"""

from __future__ import annotations

import enum
import errno
import logging
import sqlite3
import time

import asyncpg  # type: ignore[import-untyped]
import redis.exceptions
import sqlalchemy.exc

from storage import metrics

# How long a client should wait before retrying a request refused for an outage: a
# database restart or a Redis failover takes seconds.
RETRY_AFTER_SECONDS = 5


class Dependency(enum.StrEnum):
    DATABASE = "database"
    REDIS = "redis"


# asyncpg: the connection is gone or the server refuses work (starting up, shutting down).
_PG_DOWN = (
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
)
# Socket errors of a connect that are not ConnectionError subclasses.
_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN})


def down_dependency(exc: BaseException) -> Dependency | None:
    """The dependency `exc` says is unreachable, or None when it is anything else.

    Follows the chain of causes: SQLAlchemy wraps the driver's error, and a socket error
    raised while connecting may be the cause of the error that reaches us."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError):
            return Dependency.REDIS
        if isinstance(current, (*_PG_DOWN, sqlalchemy.exc.TimeoutError)):
            return Dependency.DATABASE
        if isinstance(current, sqlalchemy.exc.DBAPIError):
            if current.connection_invalidated:
                return Dependency.DATABASE
            orig = current.orig
            if isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig):
                return Dependency.DATABASE  # SQLite busy beyond its timeout
            current = orig if orig is not None else current.__cause__
            continue
        if isinstance(current, ConnectionError | TimeoutError):
            return Dependency.DATABASE  # refused or timed-out connect (asyncpg raises these)
        if isinstance(current, OSError) and current.errno in _UNREACHABLE:
            return Dependency.DATABASE
        current = current.__cause__ or current.__context__
    return None


class FailureLog:
    """Logs a failure that may repeat many times a second (every ingest during a Redis
    outage) at most once per `interval`, with how many were not logged, and counts each
    one in `ackline_dependency_failures_total`."""

    def __init__(self, logger: logging.Logger, what: str, *, interval: float = 10.0) -> None:
        self.logger = logger
        self.what = what
        self.interval = interval
        self._last = float("-inf")
        self._quiet = 0

    def failed(self, exc: BaseException) -> None:
        dependency = down_dependency(exc)
        metrics.DEPENDENCY_FAILURES.labels(self.what, dependency or "other").inc()
        now = time.monotonic()
        if now - self._last < self.interval:
            self._quiet += 1
            return
        quiet, self._quiet, self._last = self._quiet, 0, now
        more = f" ({quiet} more since the last report)" if quiet else ""
        if dependency is None:
            self.logger.error("%s failed%s", self.what, more, exc_info=exc)
        else:
            self.logger.warning("%s failed, %s unavailable: %r%s", self.what, dependency, exc, more)
