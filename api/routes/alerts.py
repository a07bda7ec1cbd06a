"""Alert ingest, lookup, ack and resolve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response
from fastapi.responses import FileResponse

from api.deps import RuntimeDep, TenantDep, context
from api.json_body import StrictJsonRoute
from api.routes.schemas import AlertAccepted, AlertOut, Error
from escalation.engine import AlertIn, UnknownPolicy
from escalation.models import AlertState

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


@router.get("/{alert_id}", response_model=AlertOut, responses=_ERRORS)
async def get_alert(alert_id: str, runtime: RuntimeDep, tenant: TenantDep) -> AlertOut:
    got = await runtime.engine.get_alert(alert_id, tenant.company)
    if got is None:
        raise HTTPException(404, "alert not found")
    return AlertOut.of(*got)


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
    hotline = runtime.config.hotline
    recording = got[0].details.get("recording")
    if hotline is None or not isinstance(recording, str):
        raise HTTPException(404, "this alert has no recording")
    # details are client input too: serve only files the hotline itself wrote
    root = hotline.recordings_dir.resolve()
    path = Path(recording).resolve()
    if not path.is_relative_to(root):
        raise HTTPException(404, "this alert has no recording")
    if not path.is_file():  # deleted by hotline.recordings_retention (or by hand)
        raise HTTPException(410, "this alert's recording has been deleted")
    return FileResponse(path, media_type="audio/wav", filename=path.name)


async def _close(
    alert_id: str, state: AlertState, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> AlertOut:
    actor = request.headers.get("x-actor") or f"api:{tenant.company}"
    alert = await runtime.engine.close(
        alert_id, state, context(request, actor), company=tenant.company, reason="api"
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
