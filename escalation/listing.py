"""A company's alerts, filtered and paged with a keyset cursor (GET /v1/alerts).

Pages are cut on (created_at, id), not on an offset: alerts created while someone pages
through the list never shift a row onto the next page twice or off it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, assert_never

from sqlalchemy import and_, func, or_, select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from storage.db import Database
from storage.models import Alert, AlertState


class SortOrder(enum.StrEnum):
    DESC = "desc"  # newest first
    ASC = "asc"


@dataclass(frozen=True)
class AlertFilter:
    """Every filter but the state one, which the per-state counts leave out."""

    company: str
    policy: str | None = None
    severity: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    q: str | None = None
    acked_by: str | None = None

    def where(self) -> list[ColumnElement[bool]]:
        conds = [col(Alert.company) == self.company]
        if self.policy is not None:
            conds.append(col(Alert.policy) == self.policy)
        if self.severity is not None:
            conds.append(col(Alert.severity) == self.severity)
        if self.since is not None:
            conds.append(col(Alert.created_at) >= self.since)
        if self.until is not None:
            conds.append(col(Alert.created_at) <= self.until)
        if self.q is not None:
            conds.append(
                or_(
                    col(Alert.title).icontains(self.q, autoescape=True),
                    col(Alert.summary).icontains(self.q, autoescape=True),
                )
            )
        if self.acked_by is not None:
            conds.append(col(Alert.acked_by) == self.acked_by)
        return conds


class BadCursor(ValueError):
    pass


@dataclass(frozen=True)
class Cursor:
    """Where the previous page ended; opaque to clients (URL-safe base64 of JSON)."""

    sort: SortOrder
    created_at: datetime
    id: str

    def encode(self) -> str:
        data = {"s": self.sort.value, "t": self.created_at.isoformat(), "i": self.id}
        return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            data = json.loads(raw)
            cursor = cls(SortOrder(data["s"]), datetime.fromisoformat(data["t"]), str(data["i"]))
        except (binascii.Error, ValueError, TypeError, KeyError) as exc:
            raise BadCursor("not a cursor this list returned") from exc
        if cursor.created_at.tzinfo is None:
            raise BadCursor("not a cursor this list returned")
        return cursor

    def after(self) -> ColumnElement[bool]:
        """Rows that come after this cursor in its order."""
        created, id_ = col(Alert.created_at), col(Alert.id)
        match self.sort:
            case SortOrder.DESC:
                return or_(created < self.created_at,
                           and_(created == self.created_at, id_ < self.id))  # fmt: skip
            case SortOrder.ASC:
                return or_(created > self.created_at,
                           and_(created == self.created_at, id_ > self.id))  # fmt: skip
            case _:
                assert_never(self.sort)


@dataclass
class AlertPage:
    alerts: list[Alert]
    next_cursor: str | None
    counts: dict[str, int]


async def list_alerts(
    db: Database,
    filt: AlertFilter,
    states: Sequence[AlertState],
    sort: SortOrder,
    limit: int,
    cursor: Cursor | None = None,
) -> AlertPage:
    """One page of alerts and, for the same filters except state, how many per state."""
    if cursor is not None and cursor.sort is not sort:
        raise BadCursor(f"the cursor belongs to sort={cursor.sort.value}")
    conds = filt.where()
    query = select(Alert).where(*conds)
    if states:
        query = query.where(col(Alert.state).in_([s.value for s in states]))
    if cursor is not None:
        query = query.where(cursor.after())
    order: list[Any]
    match sort:
        case SortOrder.DESC:
            order = [col(Alert.created_at).desc(), col(Alert.id).desc()]
        case SortOrder.ASC:
            order = [col(Alert.created_at).asc(), col(Alert.id).asc()]
        case _:
            assert_never(sort)
    query = query.order_by(*order).limit(limit + 1)  # one more: is there a next page?
    counting = select(col(Alert.state), func.count()).where(*conds).group_by(col(Alert.state))
    async with db.session() as s:
        alerts = list((await s.scalars(query)).all())
        counted = {str(state): int(n) for state, n in (await s.execute(counting)).all()}
    next_cursor = None
    if len(alerts) > limit:
        alerts = alerts[:limit]
        last = alerts[-1]
        next_cursor = Cursor(sort, last.created_at, last.id).encode()
    counts = {state.value: counted.get(state.value, 0) for state in AlertState}
    return AlertPage(alerts, next_cursor, counts)
