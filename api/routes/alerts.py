"""Alert ingest, list, lookup, ack, resolve, escalate and reassign."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from pydantic import AwareDatetime

from api.deps import Runtime, RuntimeDep, TenantDep, context
from api.json_body import StrictJsonRoute
from api.routes.schemas import (
    AlertAccepted,
    AlertOut,
    AlertPage,
    AlertSummary,
    Error,
    ReassignIn,
)
from escalation.alert_input import AlertIn
from escalation.audit_records import RequestContext
from escalation.config import Severity
from escalation.engine import AlertClosed, BadTarget
from escalation.listing import AlertFilter, BadCursor, Cursor, SortOrder, list_alerts
from escalation.plan_cache import UnknownPolicy
from escalation.timeline import Timeline, build_timeline
from storage.models import Alert, AlertState

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/alerts", tags=["alerts"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Error}, 404: {"model": Error}, 409: {"model": Error}, 422: {"model": Error}
}  # fmt: skip


@router.post("", status_code=202, response_model=AlertAccepted, responses=_ERRORS)
async def create_alert(
    body: AlertIn,
    request: Request,
    response: Response,
    runtime: RuntimeDep,
    tenant: TenantDep,
    idempotency_key: Annotated[
        str | None, Header(max_length=255, description="Repeat-safe key: one alert per key")
    ] = None,
) -> AlertAccepted:
    """Accept an alert. Answers only after the alert and its first step are committed;
    a repeated Idempotency-Key (or an open alert with the same dedup_key) returns the
    first alert and pages nobody again."""
    try:
        result = await runtime.engine.ingest(
            tenant.company,
            tenant.api_key,
            idempotency_key,
            body,
            context(request, f"api:{tenant.company}"),
        )
    except UnknownPolicy as exc:
        raise HTTPException(422, f"unknown policy {exc.args[0]!r}") from None
    if not result.created:
        response.headers["Idempotent-Replayed"] = "true"
    a = result.alert
    return AlertAccepted(id=a.id, short_id=a.short_id, state=a.state,
                         deduplicated=result.deduplicated)  # fmt: skip


def _invalid(field: str, message: str) -> RequestValidationError:
    """A 422 in the shape of FastAPI's own, naming the query field."""
    return RequestValidationError(
        [{"loc": ("query", field), "msg": message, "type": "value_error"}]
    )


@router.get("", response_model=AlertPage, responses=_ERRORS)
async def list_alerts_route(
    runtime: RuntimeDep,
    tenant: TenantDep,
    state: Annotated[list[AlertState] | None, Query(description="Repeatable")] = None,
    policy: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    severity: Severity | None = None,
    since: Annotated[AwareDatetime | None, Query(description="created_at >= (ISO 8601)")] = None,
    until: Annotated[AwareDatetime | None, Query(description="created_at <= (ISO 8601)")] = None,
    q: Annotated[
        str | None, Query(min_length=1, max_length=200, description="In title or summary")
    ] = None,
    acked_by: Annotated[str | None, Query(min_length=1, max_length=200)] = None,
    sort: SortOrder = SortOrder.DESC,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> AlertPage:
    """The company's alerts by created_at (newest first unless sort=asc), a page at a
    time: pass `next_cursor` back as `cursor`. `counts` ignore the state filter, so a
    console can show every state's number next to the filtered list."""
    if since is not None and until is not None and since > until:
        raise _invalid("until", "must not be before since")
    filt = AlertFilter(tenant.company, policy, severity, since, until, q, acked_by)
    try:
        after = Cursor.decode(cursor) if cursor is not None else None
        page = await list_alerts(runtime.db, filt, state or [], sort, limit, after)
    except BadCursor as exc:
        raise _invalid("cursor", str(exc)) from None
    return AlertPage(
        alerts=[AlertSummary.of_alert(a) for a in page.alerts],
        next_cursor=page.next_cursor,
        counts=page.counts,
    )


@router.get("/{alert_id}", response_model=AlertOut, responses=_ERRORS)
async def get_alert(alert_id: str, runtime: RuntimeDep, tenant: TenantDep) -> AlertOut:
    got = await runtime.engine.get_alert(alert_id, tenant.company)
    if got is None:
        raise HTTPException(404, "alert not found")
    return AlertOut.of(*got)


@router.get("/{alert_id}/timeline", response_model=Timeline, responses=_ERRORS)
async def get_timeline(alert_id: str, runtime: RuntimeDep, tenant: TenantDep) -> Timeline:
    """The alert's path from the audit trail: ingest, steps, every attempt (channel,
    trunk, SIP code, delivery state), retries, fallbacks, rate limits, escalations,
    reassignments, ack, resolve, in time order."""
    if await runtime.engine.get_alert(alert_id, tenant.company) is None:
        raise HTTPException(404, "alert not found")
    return build_timeline(alert_id, runtime.audit.read(tenant.company, alert_id=alert_id))


@router.get(
    "/{alert_id}/recording",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"audio/wav": {}}}, 410: {"model": Error}},
)
async def get_recording(alert_id: str, runtime: RuntimeDep, tenant: TenantDep) -> FileResponse:
    """The caller's recorded message of a hotline alert (8 kHz WAV)."""
    got = await runtime.engine.get_alert(alert_id, tenant.company)
    if got is None:
        raise HTTPException(404, "alert not found")
    return recording_response(runtime, got[0])


def recording_of(runtime: Runtime, alert: Alert) -> Path | None:
    """The hotline recording an alert names, if the hotline itself wrote it there:
    details are client input too, so a path outside the recordings folder is ignored."""
    hotline = runtime.config.hotline
    recording = alert.details.get("recording")
    if hotline is None or not isinstance(recording, str):
        return None
    path = Path(recording).resolve()
    return path if path.is_relative_to(hotline.recordings_dir.resolve()) else None


def recording_response(runtime: Runtime, alert: Alert) -> FileResponse:
    """The recording as audio/wav (404 without one, 410 once it has been deleted)."""
    path = recording_of(runtime, alert)
    if path is None:
        raise HTTPException(404, "this alert has no recording")
    if not path.is_file():  # deleted by hotline.recordings_retention (or by hand)
        raise HTTPException(410, "this alert's recording has been deleted")
    return FileResponse(path, media_type="audio/wav", filename=path.name)


def _actor(request: Request, tenant: TenantDep) -> RequestContext:
    """Who acts (X-Actor, else the company's API key) and from where, for the audit."""
    return context(request, request.headers.get("x-actor") or f"api:{tenant.company}")


async def _close(
    alert_id: str, state: AlertState, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> AlertOut:
    alert = await runtime.engine.close(
        alert_id, state, _actor(request, tenant), company=tenant.company, reason="api"
    )
    if alert is None:
        raise HTTPException(404, "alert not found")
    if alert.state != state.value:
        raise HTTPException(409, f"alert is {alert.state}")
    return AlertOut.of(alert)


@router.post("/{alert_id}/ack", response_model=AlertOut, responses=_ERRORS)
async def ack_alert(
    alert_id: str, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> AlertOut:
    """Acknowledge: every pending and scheduled notification is cancelled at once."""
    return await _close(alert_id, AlertState.ACKNOWLEDGED, request, runtime, tenant)


@router.post("/{alert_id}/resolve", response_model=AlertOut, responses=_ERRORS)
async def resolve_alert(
    alert_id: str, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> AlertOut:
    """Resolve (e.g. the monitor recovered): stops the chain like an ack."""
    return await _close(alert_id, AlertState.RESOLVED, request, runtime, tenant)


@router.post("/{alert_id}/escalate", response_model=AlertOut, responses=_ERRORS)
async def escalate_alert(
    alert_id: str, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> AlertOut:
    """Page the next step now (what pressing 2 on a call does); 409 once it is closed.
    Past the policy's last step nobody is left to page: the alert may come back exhausted."""
    try:
        alert = await runtime.engine.escalate(alert_id, _actor(request, tenant),
                                              company=tenant.company)  # fmt: skip
    except AlertClosed as exc:
        raise HTTPException(409, f"alert is {exc.args[0]}") from None
    if alert is None:
        raise HTTPException(404, "alert not found")
    return AlertOut.of(alert)


@router.post("/{alert_id}/reassign", response_model=AlertOut, responses=_ERRORS)
async def reassign_alert(
    alert_id: str, body: ReassignIn, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> AlertOut:
    """Hand the alert to other recipients or groups: the old chain's pending pages are
    cancelled (calls in progress hung up) and the policy starts over for them, first
    step now; 409 once it is closed, 422 for unknown recipients or groups."""
    try:
        alert = await runtime.engine.reassign(
            alert_id, body.recipients, body.groups, _actor(request, tenant),
            company=tenant.company,
        )  # fmt: skip
    except AlertClosed as exc:
        raise HTTPException(409, f"alert is {exc.args[0]}") from None
    except BadTarget as exc:
        raise HTTPException(422, str(exc)) from None
    if alert is None:
        raise HTTPException(404, "alert not found")
    return AlertOut.of(alert)
