"""Whose turn it is in a round-robin route, shared by every process that places calls.

Each worker, and each `ackline call`, is a process of its own: a turn counter in memory
would send every one of them to the first trunk first. The counter therefore lives where
the workers already share state: Redis when it is configured (one INCR per call), else
the database (one UPDATE per call, the table ``route_turns``), which the CLI reaches as the
workers do through ACKLINE_DATABASE_URL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col

from storage.db import Database
from storage.models import RouteTurnRow

__all__ = ["DatabaseTurns", "RedisTurns", "Turns", "turns_for"]

TURN_TIMEOUT = 1.0  # seconds; past this the router falls back to its own counter
ALL_TRUNKS = "*"  # the key of the route over every trunk (no --route; not a route name)


class Turns(Protocol):
    async def next_turn(self, route: str) -> int:
        """0 for the first call of ``route`` ever, then 1, 2, ... across all processes."""
        ...

    async def close(self) -> None: ...


class RedisTurns:
    """One counter per route in Redis, ``<prefix>:route:<route>:turn``."""

    def __init__(self, url: str, prefix: str = "ackline") -> None:
        from storage.redis_client import async_client

        self.redis: Any = async_client(
            url, socket_connect_timeout=TURN_TIMEOUT, socket_timeout=TURN_TIMEOUT
        )
        self.prefix = f"{prefix}:route"

    async def next_turn(self, route: str) -> int:
        return int(await self.redis.incr(f"{self.prefix}:{route}:turn")) - 1

    async def close(self) -> None:
        await self.redis.aclose()


class DatabaseTurns:
    """One row per route in ``route_turns``; the UPDATE's row lock orders concurrent calls."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def next_turn(self, route: str) -> int:
        try:
            return await self._advance(route)
        except IntegrityError:  # a concurrent first call inserted the row: it exists now
            return await self._advance(route)

    async def _advance(self, route: str) -> int:
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                update(RouteTurnRow)
                .where(col(RouteTurnRow.route) == route)
                .values(turn=col(RouteTurnRow.turn) + 1, updated_at=datetime.now(UTC))
                .returning(col(RouteTurnRow.turn))
            )
            turn = result.scalar_one_or_none()
            if turn is None:
                s.add(RouteTurnRow(route=route, turn=0, updated_at=datetime.now(UTC)))
                turn = 0
        return int(turn)

    async def close(self) -> None:
        """The database belongs to whoever passed it in."""


def turns_for(redis_url: str | None, redis_prefix: str, db: Database) -> Turns:
    """Redis when the deployment has it, else the database."""
    return RedisTurns(redis_url, redis_prefix) if redis_url else DatabaseTurns(db)
