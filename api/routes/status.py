"""The status page's operator API: incidents with their updates and maintenance windows,
for the operator company only (`ACKLINE_STATUS_OPERATOR`); other tenants get 403.

Changes go through `escalation.statuspage.StatusService`, which audits them and tells
the subscribers; the console calls the same service.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from pydantic import AfterValidator, BaseModel, Field

from api.deps import TenantDep, context
from api.json_body import StrictJsonRoute
from api.routes.schemas import Error
from api.web.status import StatusPage, incident_json, maintenance_json
from escalation.audit_records import RequestContext
from escalation.status import Impact, IncidentStatus
from escalation.status_subscribers import (
    RateLimited,
    StatusSubscriptions,
    SubscriberKind,
    SubscriptionError,
)
from escalation.statuspage import IncidentNotFound

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/status", tags=["status page"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Error}, 403: {"model": Error}, 404: {"model": Error}, 422: {"model": Error}
}  # fmt: skip


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a time zone (e.g. 2026-04-06T09:00:00Z)")
    return value


def _printable(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


Aware = Annotated[datetime, AfterValidator(_aware)]
Text = Annotated[str, AfterValidator(_printable)]
ComponentId = Annotated[str, Field(max_length=80)]
RowId = Annotated[int, Path(ge=1, le=2_147_483_647)]


class IncidentIn(BaseModel):
    title: Text = Field(min_length=1, max_length=300)
    body: Text = Field(min_length=1, max_length=10_000, description="the first update's text")
    status: IncidentStatus = IncidentStatus.INVESTIGATING
    impact: Impact = Impact.MINOR
    components: list[ComponentId] = Field(default_factory=list, max_length=100)


class IncidentUpdateIn(BaseModel):
    status: IncidentStatus
    body: Text = Field(min_length=1, max_length=10_000)
    impact: Impact | None = None


class MaintenanceIn(BaseModel):
    title: Text = Field(min_length=1, max_length=300)
    body: Text = Field(default="", max_length=10_000)
    starts_at: Aware
    ends_at: Aware
    components: list[ComponentId] = Field(default_factory=list, max_length=100)


async def operator(request: Request, tenant: TenantDep) -> tuple[StatusPage, RequestContext]:
    """The status page and who acts; only the operator company may publish."""
    page: StatusPage | None = getattr(request.app.state, "status_page", None)
    if page is None:
        raise HTTPException(503, "the status page is starting")
    if tenant.company != page.service.company:
        raise HTTPException(403, "only the status page operator's API keys may do this")
    return page, context(request, f"api:{tenant.company}")


OperatorDep = Annotated[tuple[StatusPage, RequestContext], Depends(operator)]


def _check_components(page: StatusPage, components: list[str]) -> None:
    unknown = page.unknown_components(components)
    if unknown:
        known = ", ".join(c.id for c in page.collector.components)
        raise HTTPException(422, f"unknown components: {', '.join(unknown)} (known: {known})")


@router.get("/components", responses=_ERRORS)
async def list_components(op: OperatorDep) -> list[dict[str, Any]]:
    """The components incidents and maintenance windows may name, with their state now."""
    page, _ = op
    return [
        {"id": s.component.id, "name": s.component.name, "kind": s.component.kind.value,
         "state": s.state.value if s.state else None}
        for s in await page.collector.current()
    ]  # fmt: skip


@router.get("/incidents", responses=_ERRORS)
async def list_incidents(
    op: OperatorDep, open_only: bool = False, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> list[dict[str, Any]]:
    page, _ = op
    return [
        incident_json(i) for i in await page.service.incidents(limit=limit, open_only=open_only)
    ]


@router.post("/incidents", status_code=201, responses=_ERRORS)
async def create_incident(body: IncidentIn, op: OperatorDep) -> dict[str, Any]:
    """Publish an incident with its first update. Audited; subscribers are told."""
    page, by = op
    _check_components(page, body.components)
    incident = await page.service.create_incident(
        body.title, body=body.body, impact=body.impact, status=body.status,
        components=body.components, by=by,
    )  # fmt: skip
    return incident_json(incident)


@router.get("/incidents/{incident_id}", responses=_ERRORS)
async def get_incident(incident_id: RowId, op: OperatorDep) -> dict[str, Any]:
    page, _ = op
    try:
        return incident_json(await page.service.incident(incident_id))
    except IncidentNotFound as exc:
        raise HTTPException(404, str(exc)) from None


@router.post("/incidents/{incident_id}/updates", status_code=201, responses=_ERRORS)
async def update_incident(
    incident_id: RowId, body: IncidentUpdateIn, op: OperatorDep
) -> dict[str, Any]:
    """investigating -> identified -> monitoring -> resolved, each with a text."""
    page, by = op
    try:
        incident = await page.service.update_incident(
            incident_id, status=body.status, body=body.body, impact=body.impact, by=by
        )
    except IncidentNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    return incident_json(incident)


@router.get("/maintenances", responses=_ERRORS)
async def list_maintenances(op: OperatorDep, current_only: bool = False) -> list[dict[str, Any]]:
    page, _ = op
    now = page.service.clock()
    return [maintenance_json(m, now)
            for m in await page.service.maintenances(current_only=current_only)]  # fmt: skip


@router.post("/maintenances", status_code=201, responses=_ERRORS)
async def create_maintenance(body: MaintenanceIn, op: OperatorDep) -> dict[str, Any]:
    """Schedule a window; while it runs its components show `maintenance`. Audited."""
    page, by = op
    _check_components(page, body.components)
    if body.ends_at <= body.starts_at:
        raise HTTPException(422, "ends_at must be after starts_at")
    window = await page.service.create_maintenance(
        body.title, starts_at=body.starts_at, ends_at=body.ends_at,
        components=body.components, body=body.body, by=by,
    )  # fmt: skip
    page.collector.forget()
    return maintenance_json(window, page.service.clock())


@router.post("/maintenances/{maintenance_id}/cancel", responses=_ERRORS)
async def cancel_maintenance(maintenance_id: RowId, op: OperatorDep) -> dict[str, Any]:
    page, by = op
    try:
        window = await page.service.cancel_maintenance(maintenance_id, by=by)
    except IncidentNotFound as exc:
        raise HTTPException(404, str(exc)) from None
    page.collector.forget()
    return maintenance_json(window, page.service.clock())


class SubscriberIn(BaseModel):
    kind: SubscriberKind
    address: Text = Field(min_length=1, max_length=2000, description=(
        "email address, E.164 number (sms), chat id (telegram), or an https URL "
        "(webhook, slack incoming webhook)"))  # fmt: skip


def _subscriptions(page: StatusPage) -> StatusSubscriptions:
    if page.subscriptions is None:
        raise HTTPException(
            404, "subscriptions need ACKLINE_PUBLIC_URL and ACKLINE_ACK_SECRET (their links)"
        )
    return page.subscriptions


@router.post("/subscribers", status_code=201, responses={**_ERRORS, 429: {"model": Error}})
async def add_subscriber(body: SubscriberIn, op: OperatorDep) -> dict[str, Any]:
    """Sign someone up for incident updates. Email still confirms by a link sent to it
    (double opt-in); other kinds the operator adds are active at once."""
    page, by = op
    subscriptions = _subscriptions(page)
    try:
        found = await subscriptions.subscribe(
            body.kind, body.address, by=by, source=None, confirmed=True
        )
    except SubscriptionError as exc:
        raise HTTPException(422, str(exc)) from None
    except RateLimited as exc:
        raise HTTPException(429, str(exc)) from None
    return {"id": found.id, "kind": found.kind.value, "confirmed": found.confirmed}


@router.get("/subscribers", responses=_ERRORS)
async def list_subscribers(op: OperatorDep) -> list[dict[str, Any]]:
    """Active subscribers (confirmed, not unsubscribed)."""
    page, _ = op
    return [{"id": s.id, "kind": s.kind.value, "address": s.address}
            for s in await _subscriptions(page).subscribers()]  # fmt: skip
