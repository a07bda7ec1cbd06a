"""Read the company's audit trail: filtered JSON, or CSV for one recipient group."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Response

from api.deps import RuntimeDep, TenantDep
from api.json_body import StrictJsonRoute
from escalation import crud
from escalation.audit import STABLE_FIELDS

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1", tags=["audit"])
CSV_FIELDS = (*STABLE_FIELDS, "event", "recipient_id")


@router.get("/audit")
async def get_audit(
    runtime: RuntimeDep,
    tenant: TenantDep,
    alert_id: str | None = None,
    channel: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(1000, ge=1, le=100_000),
) -> list[dict[str, Any]]:
    """Audit records in the order they were written (oldest first)."""
    out = []
    for rec in runtime.audit.read(
        tenant.company, alert_id=alert_id, channel=channel, since=since, until=until
    ):
        out.append(rec)
        if len(out) >= limit:
            break
    return out


@router.get("/audit.csv", response_class=Response)
async def get_audit_csv(
    runtime: RuntimeDep,
    tenant: TenantDep,
    group: str,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Response:
    """Every notification event addressed to a member of `group`, as CSV."""
    groups = {g.name: g for g in await crud.list_groups(runtime.db, tenant.company)}
    if group not in groups:
        raise HTTPException(404, f"group {group!r} not found")
    members = set(groups[group].members)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for rec in runtime.audit.read(tenant.company, since=since, until=until):
        if rec.get("recipient_id") in members:
            writer.writerow(rec)
    return Response(
        buf.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="audit-{group}.csv"'},
    )
