"""The console's status page desk: incidents with their updates, maintenance windows and
the subscribers told of them, for the status page operator's company.

Admins publish (what goes on the public page is the operator's word); responders and
viewers read. Every change goes through `StatusService`, the same calls as
/v1/status, with the signed-in person and their IP in its audit lines, and is checked
with the API's own request models, so both accept exactly the same things.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError

from api.routes.status import IncidentIn, IncidentUpdateIn, MaintenanceIn, RowId
from api.web.auth import (
    Admin,
    ConsoleUser,
    ConsoleUserDep,
    Forbidden,
    audit_context,
    render,
)
from api.web.status import StatusPage
from escalation.status import Impact, IncidentStatus, MaintenanceStatus
from escalation.statuspage import IncidentNotFound

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


RECENT_RESOLVED = 20
MAX_OPEN = 100
MAX_SUBSCRIBERS = 200  # listed; the count above the table says when there are more
CANCELLABLE = (MaintenanceStatus.SCHEDULED, MaintenanceStatus.IN_PROGRESS)
# The status an open incident's update form suggests next.
NEXT_STATUS = {
    IncidentStatus.INVESTIGATING: IncidentStatus.IDENTIFIED,
    IncidentStatus.IDENTIFIED: IncidentStatus.MONITORING,
    IncidentStatus.MONITORING: IncidentStatus.RESOLVED,
    IncidentStatus.RESOLVED: IncidentStatus.RESOLVED,
}


def _page(request: Request, user: ConsoleUser) -> StatusPage:
    """The status page, if this user's company runs it (other tenants have no say)."""
    page: StatusPage | None = getattr(request.app.state, "status_page", None)
    if page is None:
        raise HTTPException(503, "the status page is starting")
    if user.company != page.service.company:
        raise Forbidden("only the status page operator's company manages the status page")
    return page


def _errors(exc: ValidationError, prefix: str) -> dict[str, str]:
    """The API model's complaints, keyed by form field, worded for a person."""
    out: dict[str, str] = {}
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "form"
        if error["type"] in ("string_too_short", "missing"):
            message = "required"
        else:
            message = str(error["msg"]).removeprefix("Value error, ")
        out.setdefault(f"{prefix}.{field}", message)
    return out


def _check(
    model: type[BaseModel], values: Mapping[str, Any], prefix: str
) -> tuple[Any, dict[str, str]]:
    try:
        return model.model_validate(values), {}
    except ValidationError as exc:
        return None, _errors(exc, prefix)


async def _render(
    request: Request,
    user: ConsoleUser,
    *,
    errors: dict[str, str] | None = None,
    form: dict[str, Any] | None = None,
    done: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    page = _page(request, user)
    service = page.service
    now = service.clock()
    recent = [i for i in await service.incidents(limit=RECENT_RESOLVED * 2) if i.resolved]
    subscribers = None
    if page.subscriptions is not None:
        subscribers = await page.subscriptions.subscribers(active_only=False,
                                                           limit=MAX_SUBSCRIBERS + 1)  # fmt: skip
    return render(request, "console/incidents.html", {
        "nav": "incidents", "open": await service.incidents(open_only=True, limit=MAX_OPEN),
        "recent": recent[:RECENT_RESOLVED], "maintenances": await service.maintenances(),
        "components": page.collector.components, "impacts": list(Impact),
        "statuses": list(IncidentStatus), "next_status": NEXT_STATUS, "now": now,
        "cancellable": CANCELLABLE, "subscribers": subscribers,
        "max_subscribers": MAX_SUBSCRIBERS, "errors": errors or {}, "form": form or {},
        "done": done,
    }, user, status_code=status_code)  # fmt: skip


def _unknown(page: StatusPage, components: list[str], key: str) -> dict[str, str]:
    unknown = page.unknown_components(components)
    return {key: f"unknown components: {', '.join(unknown)}"} if unknown else {}


def _done(what: str) -> RedirectResponse:
    return RedirectResponse(f"/console/incidents?done={quote(what)}", 303)


@router.get("/console/incidents", response_class=HTMLResponse)
async def incidents_page(
    request: Request, user: ConsoleUserDep, done: str | None = None
) -> HTMLResponse:
    return await _render(request, user, done=done)


@router.post("/console/incidents")
async def create_incident(
    request: Request,
    user: Admin,
    title: Annotated[str, Form(max_length=1000)] = "",
    body: Annotated[str, Form(max_length=20_000)] = "",
    impact: Annotated[str, Form(max_length=20)] = "",
    components: Annotated[list[str] | None, Form()] = None,
) -> Response:
    """Publish an incident with its first update (investigating)."""
    page = _page(request, user)
    chosen = components or []
    form = {"title": title, "body": body, "impact": impact, "components": chosen}
    values = {"title": title.strip(), "body": body.strip(), "impact": impact,
              "components": chosen}  # fmt: skip
    incident, errors = _check(IncidentIn, values, "new")
    errors = errors or _unknown(page, chosen, "new.components")
    if errors:
        return await _render(request, user, errors=errors, form={"new": form}, status_code=422)
    created = await page.service.create_incident(
        incident.title, body=incident.body, impact=incident.impact, status=incident.status,
        components=incident.components, by=audit_context(request, user),
    )  # fmt: skip
    return _done(f"incident {created.id} published")


@router.post("/console/incidents/{incident_id}/updates")
async def update_incident(
    request: Request,
    incident_id: RowId,
    user: Admin,
    status: Annotated[str, Form(max_length=20)] = "",
    body: Annotated[str, Form(max_length=20_000)] = "",
    resolve: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    """A timestamped update with a new status; the Resolve button sends `resolved`."""
    page = _page(request, user)
    if resolve:
        status = IncidentStatus.RESOLVED.value
    update, errors = _check(IncidentUpdateIn, {"status": status, "body": body.strip()},
                            str(incident_id))  # fmt: skip
    if errors:
        form = {str(incident_id): {"status": status, "body": body}}
        return await _render(request, user, errors=errors, form=form, status_code=422)
    try:
        await page.service.update_incident(incident_id, status=update.status, body=update.body,
                                           by=audit_context(request, user))  # fmt: skip
    except IncidentNotFound:
        raise HTTPException(404, "no such incident") from None
    return _done(f"incident {incident_id} {update.status.value}")


@router.post("/console/maintenances")
async def create_maintenance(
    request: Request,
    user: Admin,
    title: Annotated[str, Form(max_length=1000)] = "",
    body: Annotated[str, Form(max_length=20_000)] = "",
    components: Annotated[list[str] | None, Form()] = None,
    starts_at: Annotated[str, Form(max_length=64)] = "",
    ends_at: Annotated[str, Form(max_length=64)] = "",
    starts_local: Annotated[str, Form(max_length=64)] = "",
    ends_local: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    """`starts_at`/`ends_at` are ISO 8601 with the browser's UTC offset (the page's
    script fills them from the local-time inputs `*_local`, kept for a re-shown form)."""
    page = _page(request, user)
    chosen = components or []
    form = {"title": title, "body": body, "components": chosen, "starts_local": starts_local,
            "ends_local": ends_local}  # fmt: skip
    values = {"title": title.strip(), "body": body.strip(), "components": chosen,
              "starts_at": starts_at or None, "ends_at": ends_at or None}  # fmt: skip
    window, errors = _check(MaintenanceIn, values, "m")
    errors = errors or _unknown(page, chosen, "m.components")
    created = None
    if not errors:
        try:
            created = await page.service.create_maintenance(
                window.title, starts_at=window.starts_at, ends_at=window.ends_at,
                components=window.components, body=window.body, by=audit_context(request, user),
            )  # fmt: skip
        except ValueError:  # the service's own rule: it ends after it starts
            errors = {"m.ends_at": "must be after the start"}
    if created is None:
        return await _render(request, user, errors=errors, form={"m": form}, status_code=422)
    page.collector.forget()  # its components show "maintenance" from its start
    return _done(f"maintenance {created.id} scheduled")


@router.post("/console/maintenances/{maintenance_id}/cancel")
async def cancel_maintenance(request: Request, maintenance_id: RowId, user: Admin) -> Response:
    page = _page(request, user)
    try:
        await page.service.cancel_maintenance(maintenance_id, by=audit_context(request, user))
    except IncidentNotFound:
        raise HTTPException(404, "no such maintenance window") from None
    page.collector.forget()
    return _done(f"maintenance {maintenance_id} cancelled")
