"""Operational changes to trunks (enable/disable, priority, weight, budgets), kept in the
database so the API, the CLI and every worker see the same trunks.

A trunk's identity (host, port, credentials) stays in ackline.yaml; what an operator
changes at 3 a.m. ("take carrier B out") is an override on top of it, applied by running
workers within `reload_interval` seconds, and kept across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import delete, func, select
from sqlmodel import col

from carriers.trunk import Trunk
from common.durations import parse_duration
from storage.db import Database
from storage.models import TrunkOverrideRow

__all__ = ["TrunkChanges", "TrunkStore", "apply_overrides"]

logger = logging.getLogger(__name__)


class TrunkChanges(BaseModel):
    """The fields an operator may change at run time; anything else needs the YAML."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool | None = None
    priority: int | None = None
    weight: int | None = Field(default=None, ge=1, le=10_000)
    max_cps: float | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, ge=1)
    trying_timeout: float | None = Field(default=None, gt=0, le=60)

    @field_validator("trying_timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return None if value is None else parse_duration(value)

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


def apply_overrides(
    trunks: Sequence[Trunk], overrides: Mapping[str, Mapping[str, Any]]
) -> list[Trunk]:
    """The configured trunks with their stored changes applied (unknown names ignored)."""
    out = []
    for trunk in trunks:
        changes = overrides.get(trunk.name)
        if changes:
            valid = TrunkChanges.model_validate(changes).as_dict()
            trunk = trunk.model_copy(update=valid)
        out.append(trunk)
    return out


class TrunkStore:
    """Reads and writes trunk overrides; `watch` re-applies them as they change."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def overrides(self) -> dict[str, dict[str, Any]]:
        async with self.db.session() as s:
            rows = (await s.execute(select(TrunkOverrideRow))).scalars().all()
        return {row.name: dict(row.changes or {}) for row in rows}

    async def version(self) -> datetime | None:
        """When anything last changed (cheap enough to poll)."""
        async with self.db.session() as s:
            value: datetime | None = (
                await s.execute(select(func.max(col(TrunkOverrideRow.updated_at))))
            ).scalar_one_or_none()
        return value

    async def change(self, name: str, changes: TrunkChanges, actor: str) -> dict[str, Any]:
        """Merge `changes` into the trunk's stored overrides; returns the result."""
        async with self.db.session() as s, s.begin():
            row = await s.get(TrunkOverrideRow, name)
            merged = {**(row.changes if row is not None else {}), **changes.as_dict()}
            now = datetime.now(UTC)
            if row is None:
                s.add(TrunkOverrideRow(name=name, changes=merged, updated_at=now, updated_by=actor))
            else:
                row.changes, row.updated_at, row.updated_by = merged, now, actor
        return merged

    async def reset(self, name: str) -> bool:
        """Forget every change to `name` (back to its YAML definition)."""
        async with self.db.session() as s, s.begin():
            result = await s.execute(
                delete(TrunkOverrideRow).where(col(TrunkOverrideRow.name) == name)
            )
        return bool(getattr(result, "rowcount", 0))

    async def watch(
        self,
        configured: Sequence[Trunk],
        apply: Callable[[list[Trunk]], None],
        *,
        interval: float = 2.0,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Apply the overrides now, then again whenever they change, until `stop`."""
        stop = stop or asyncio.Event()
        seen: object = object()
        failing = False
        while not stop.is_set():
            try:
                version = await self.version()
                if version != seen:
                    apply(apply_overrides(configured, await self.overrides()))
                    seen = version
            except Exception as exc:  # a database blip: keep the trunks we have, try again
                if not failing:  # once per outage, not every `interval`
                    logger.warning("reading trunk overrides failed, keeping the trunks as "
                                   "they are until it works again: %r", exc,
                                   exc_info=True)  # fmt: skip
                failing = True
            else:
                if failing:
                    logger.warning("reading trunk overrides works again")
                failing = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def trunk_change_record(
    trunk: str,
    status: str,
    reason: str,
    actor: str,
    changes: Mapping[str, Any] | None = None,
    *,
    ip: str | None = None,
    request_id: str | None = None,
) -> dict[str, Any]:
    """The audit line of an operator's change to a trunk (the API's and the CLI's alike)."""
    record: dict[str, Any] = {
        "event": "trunk_changed",
        "status": status,
        "reason": reason,
        "actor": actor,
        "ip": ip,
        "request_id": request_id,
        "trunk": trunk,
    }
    if changes is not None:
        record["changes"] = dict(changes)
    return record
