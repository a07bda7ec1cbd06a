"""The status page's records: component samples, incidents with their updates, and
maintenance windows, for the operator company (`ACKLINE_STATUS_OPERATOR`).

`StatusService` is what the API and the console call to publish an incident or a
maintenance window; every change is an audit line (`status_incident`,
`status_maintenance`) and, once committed, is handed to the listeners (subscriber
notifications). The rules of what a state means live in `escalation.status`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.status import (
    ComponentState,
    Impact,
    IncidentStatus,
    MaintenanceStatus,
    Sample,
    maintenance_status,
)
from storage.db import Database
from storage.models import (
    StatusIncidentRow,
    StatusIncidentUpdateRow,
    StatusMaintenanceRow,
    StatusSampleRow,
    utcnow,
)

__all__ = [
    "Incident",
    "IncidentNotFound",
    "IncidentUpdate",
    "Maintenance",
    "StatusService",
    "UpdateListener",
]

log = logging.getLogger(__name__)


class IncidentNotFound(LookupError):
    """No such incident or maintenance window for the operator company."""


@dataclass(frozen=True)
class IncidentUpdate:
    id: int
    status: IncidentStatus
    body: str
    created_at: datetime


@dataclass(frozen=True)
class Incident:
    id: int
    title: str
    impact: Impact
    status: IncidentStatus
    components: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None
    automatic: bool
    updates: tuple[IncidentUpdate, ...]  # newest first

    @property
    def resolved(self) -> bool:
        return self.status is IncidentStatus.RESOLVED


@dataclass(frozen=True)
class Maintenance:
    id: int
    title: str
    body: str
    components: tuple[str, ...]
    starts_at: datetime
    ends_at: datetime
    cancelled_at: datetime | None

    def status(self, now: datetime) -> MaintenanceStatus:
        return maintenance_status(self.starts_at, self.ends_at, now, self.cancelled_at is not None)


# Told of every incident change after it is committed: (incident, the new update).
UpdateListener = Callable[[Incident, IncidentUpdate], Awaitable[None]]


def _incident(row: StatusIncidentRow, updates: Iterable[StatusIncidentUpdateRow]) -> Incident:
    assert row.id is not None
    return Incident(
        id=row.id,
        title=row.title,
        impact=Impact(row.impact),
        status=IncidentStatus(row.status),
        components=tuple(row.components or ()),
        created_at=row.created_at,
        updated_at=row.updated_at,
        resolved_at=row.resolved_at,
        automatic=row.created_by == AUTO_ACTOR,
        updates=tuple(
            IncidentUpdate(u.id or 0, IncidentStatus(u.status), u.body, u.created_at)
            for u in sorted(updates, key=lambda u: (u.created_at, u.id or 0), reverse=True)
        ),
    )


def _maintenance(row: StatusMaintenanceRow) -> Maintenance:
    assert row.id is not None
    return Maintenance(row.id, row.title, row.body, tuple(row.components or ()), row.starts_at,
                       row.ends_at, row.cancelled_at)  # fmt: skip


AUTO_ACTOR = "status:automatic"
AUTOMATIC = RequestContext(AUTO_ACTOR)


class StatusService:
    """Incidents, maintenance windows and samples of one operator company."""

    def __init__(
        self,
        db: Database,
        audit: AuditLog,
        company: str,
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.db = db
        self.audit = audit
        self.company = company
        self.clock = clock
        self.listeners: list[UpdateListener] = []

    # -- samples -------------------------------------------------------------------------

    async def record_samples(self, samples: Sequence[Sample]) -> int:
        """Store one interval's samples; a (component, interval) another node already
        stored is left as it is. Returns how many rows this call added."""
        if not samples:
            return 0
        rows = [
            {"component": s.component, "at": s.at, "day": s.at.date().isoformat(),
             "seconds": s.seconds, "state": s.state.value}
            for s in samples
        ]  # fmt: skip
        insert = sqlite_insert if self.db.is_sqlite else pg_insert
        statement = insert(StatusSampleRow).values(rows).on_conflict_do_nothing()
        async with self.db.session() as s, s.begin():
            result = await s.execute(statement)
        return int(getattr(result, "rowcount", 0) or 0)

    async def day_totals(self, since: date) -> dict[str, dict[date, dict[ComponentState, int]]]:
        """Seconds per component, UTC day and state from `since` on (one GROUP BY)."""
        query = (
            select(StatusSampleRow.component, StatusSampleRow.day, StatusSampleRow.state,
                   sa.func.sum(StatusSampleRow.seconds))
            .where(col(StatusSampleRow.day) >= since.isoformat())
            .group_by(col(StatusSampleRow.component), col(StatusSampleRow.day),
                      col(StatusSampleRow.state))
        )  # fmt: skip
        out: dict[str, dict[date, dict[ComponentState, int]]] = {}
        async with self.db.session() as s:
            for component, day, state, seconds in (await s.execute(query)).all():
                try:
                    known = ComponentState(state)
                except ValueError:
                    continue  # a state a newer release wrote
                by_day = out.setdefault(component, {})
                by_day.setdefault(date.fromisoformat(day), {})[known] = int(seconds or 0)
        return out

    # -- incidents -----------------------------------------------------------------------

    async def create_incident(
        self,
        title: str,
        *,
        body: str,
        impact: Impact = Impact.MINOR,
        status: IncidentStatus = IncidentStatus.INVESTIGATING,
        components: Sequence[str] = (),
        by: RequestContext,
        auto_key: str | None = None,
    ) -> Incident:
        now = self.clock()
        row = StatusIncidentRow(
            company=self.company, title=title, impact=impact.value, status=status.value,
            components=list(components), created_at=now, updated_at=now,
            resolved_at=now if status is IncidentStatus.RESOLVED else None, created_by=by.actor,
            open_auto_key=auto_key,
        )  # fmt: skip
        async with self.db.session() as s, s.begin():
            s.add(row)
            await s.flush()
            assert row.id is not None
            update = StatusIncidentUpdateRow(incident_id=row.id, status=status.value, body=body,
                                             created_at=now, created_by=by.actor)  # fmt: skip
            s.add(update)
        incident = _incident(row, [update])
        self._audit("status_incident", "created", by, incident.id, incident_status=status.value,
                    title=title, impact=impact.value, components=list(components))  # fmt: skip
        await self._tell(incident)
        return incident

    async def update_incident(
        self,
        incident_id: int,
        *,
        status: IncidentStatus,
        body: str,
        by: RequestContext,
        impact: Impact | None = None,
        auto_key: str | None = None,
    ) -> Incident:
        """A timestamped update; `resolved` closes the incident (a later update may
        reopen it). With `auto_key`, only while that automatic incident is still open
        (several nodes' samplers may see the recovery; one resolves it)."""
        now = self.clock()
        async with self.db.session() as s, s.begin():
            row = await s.get(StatusIncidentRow, incident_id, with_for_update=True)
            if row is None or row.company != self.company:
                raise IncidentNotFound(f"no incident {incident_id}")
            if auto_key is not None and row.open_auto_key != auto_key:
                raise IncidentNotFound(f"automatic incident {incident_id} is already resolved")
            row.status = status.value
            row.updated_at = now
            if impact is not None:
                row.impact = impact.value
            if status is IncidentStatus.RESOLVED:
                row.resolved_at = row.resolved_at or now
                row.open_auto_key = None
            else:
                row.resolved_at = None
            s.add(
                StatusIncidentUpdateRow(incident_id=incident_id, status=status.value, body=body,
                                        created_at=now, created_by=by.actor)
            )  # fmt: skip
            await s.flush()
            query = select(StatusIncidentUpdateRow).where(
                col(StatusIncidentUpdateRow.incident_id) == incident_id
            )
            updates = (await s.execute(query)).scalars().all()
            incident = _incident(row, updates)
        self._audit("status_incident", "updated", by, incident_id, incident_status=status.value,
                    impact=incident.impact.value)  # fmt: skip
        await self._tell(incident)
        return incident

    async def incident(self, incident_id: int) -> Incident:
        found = await self._incidents(sa.and_(col(StatusIncidentRow.id) == incident_id), 1)
        if not found:
            raise IncidentNotFound(f"no incident {incident_id}")
        return found[0]

    async def incidents(self, *, limit: int = 50, open_only: bool = False) -> list[Incident]:
        """Newest first."""
        where = col(StatusIncidentRow.resolved_at).is_(None) if open_only else sa.true()
        return await self._incidents(where, limit)

    async def _incidents(self, where: Any, limit: int) -> list[Incident]:
        async with self.db.session() as s:
            rows = (await s.execute(
                select(StatusIncidentRow)
                .where(col(StatusIncidentRow.company) == self.company, where)
                .order_by(col(StatusIncidentRow.created_at).desc(),
                          col(StatusIncidentRow.id).desc())
                .limit(limit)
            )).scalars().all()  # fmt: skip
            ids = [r.id for r in rows]
            updates: dict[int, list[StatusIncidentUpdateRow]] = {i: [] for i in ids if i}
            if ids:
                for u in (await s.execute(select(StatusIncidentUpdateRow).where(
                        col(StatusIncidentUpdateRow.incident_id).in_(ids)))).scalars():  # fmt: skip
                    updates[u.incident_id].append(u)
        return [_incident(r, updates.get(r.id or 0, [])) for r in rows]

    async def open_auto_incident(self, component: str, name: str, state: ComponentState) -> bool:
        """An automatic incident for a component gone to an outage, unless one is open
        (on any node: the unique open key). True when this call opened it."""
        impact = Impact.CRITICAL if state is ComponentState.MAJOR_OUTAGE else Impact.MAJOR
        async with self.db.session() as s:
            open_one = await s.scalar(select(StatusIncidentRow.id).where(
                col(StatusIncidentRow.company) == self.company,
                col(StatusIncidentRow.open_auto_key) == component))  # fmt: skip
        if open_one is not None:
            return False
        try:
            await self.create_incident(
                f"{name}: {state.label.lower()}", impact=impact, components=[component],
                body=f"{name} is in {state.label.lower()}, detected automatically. "
                     "We are investigating.",
                by=AUTOMATIC, auto_key=component,
            )  # fmt: skip
        except IntegrityError:
            return False  # another node opened it first
        return True

    async def resolve_auto_incident(self, component: str, name: str) -> bool:
        """Resolve the component's open automatic incident, if any. True when resolved."""
        async with self.db.session() as s:
            open_one = await s.scalar(select(StatusIncidentRow.id).where(
                col(StatusIncidentRow.company) == self.company,
                col(StatusIncidentRow.open_auto_key) == component))  # fmt: skip
        if open_one is None:
            return False
        try:
            await self.update_incident(
                open_one, status=IncidentStatus.RESOLVED, by=AUTOMATIC,
                body=f"{name} has recovered.", auto_key=component,
            )  # fmt: skip
        except IncidentNotFound:
            return False  # another node resolved it first
        return True

    # -- maintenance -----------------------------------------------------------------------

    async def create_maintenance(
        self,
        title: str,
        *,
        starts_at: datetime,
        ends_at: datetime,
        components: Sequence[str] = (),
        body: str = "",
        by: RequestContext,
    ) -> Maintenance:
        if ends_at <= starts_at:
            raise ValueError("ends_at must be after starts_at")
        row = StatusMaintenanceRow(
            company=self.company, title=title, body=body, components=list(components),
            starts_at=starts_at, ends_at=ends_at, created_at=self.clock(), created_by=by.actor,
        )  # fmt: skip
        async with self.db.session() as s, s.begin():
            s.add(row)
        window = _maintenance(row)
        self._audit("status_maintenance", "created", by, window.id, title=title,
                    starts_at=starts_at.isoformat(), ends_at=ends_at.isoformat(),
                    components=list(components))  # fmt: skip
        return window

    async def cancel_maintenance(self, maintenance_id: int, *, by: RequestContext) -> Maintenance:
        async with self.db.session() as s, s.begin():
            row = await s.get(StatusMaintenanceRow, maintenance_id)
            if row is None or row.company != self.company:
                raise IncidentNotFound(f"no maintenance window {maintenance_id}")
            row.cancelled_at = row.cancelled_at or self.clock()
        self._audit("status_maintenance", "cancelled", by, maintenance_id)
        return _maintenance(row)

    async def maintenances(
        self, *, current_only: bool = False, limit: int = 50
    ) -> list[Maintenance]:
        """Soonest first; `current_only`: not over and not cancelled."""
        query = select(StatusMaintenanceRow).where(
            col(StatusMaintenanceRow.company) == self.company)  # fmt: skip
        if current_only:
            query = query.where(col(StatusMaintenanceRow.ends_at) > self.clock(),
                                col(StatusMaintenanceRow.cancelled_at).is_(None))  # fmt: skip
        query = query.order_by(col(StatusMaintenanceRow.starts_at).desc()).limit(limit)
        async with self.db.session() as s:
            rows = (await s.execute(query)).scalars().all()
        return sorted((_maintenance(r) for r in rows), key=lambda m: (m.starts_at, m.id))

    async def under_maintenance(self) -> set[str]:
        """Components an active maintenance window names, now."""
        now = self.clock()
        return {
            c
            for m in await self.maintenances(current_only=True)
            if m.status(now) is MaintenanceStatus.IN_PROGRESS
            for c in m.components
        }

    # -- helpers ---------------------------------------------------------------------------

    def _audit(self, event: str, status: str, by: RequestContext, ref: int, **fields: Any) -> None:
        record = {"event": event, "status": status, "actor": by.actor, "ip": by.ip,
                  "request_id": by.request_id, "status_id": ref, **fields}  # fmt: skip
        self.audit.write(self.company, [record])

    async def _tell(self, incident: Incident) -> None:
        """Listeners must not fail the change they are told of: it is committed."""
        for listener in self.listeners:
            try:
                await listener(incident, incident.updates[0])
            except Exception:
                log.exception("status listener failed for incident %s", incident.id)
