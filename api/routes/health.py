"""Liveness and readiness."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import RuntimeDep
from api.json_body import StrictJsonRoute
from escalation.runner import RedisBus

log = logging.getLogger(__name__)

router = APIRouter(route_class=StrictJsonRoute, tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request, runtime: RuntimeDep) -> JSONResponse:
    """Ready when the database answers and the process is not stopping: a stopping API
    turns unready first, so a load balancer stops sending it requests while it still
    answers them (`ACKLINE_UNREADY_GRACE`). Redis away only degrades: alerts are still
    accepted and paged (workers poll the database), and failing every node's check at once
    during a Redis failover would make the load balancer refuse what they could serve."""
    if getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "draining"}, 503)
    checks: dict[str, str] = {}
    try:
        await runtime.db.ping()
        checks["database"] = "ok"
    except Exception as exc:  # the answer says it; the traceback only with debug logging
        log.debug("readiness: database ping failed", exc_info=True)
        checks["database"] = f"error: {type(exc).__name__}"
    if isinstance(runtime.bus, RedisBus):
        try:
            await runtime.bus.ping()
            checks["redis"] = "ok"
        except Exception as exc:
            log.debug("readiness: Redis ping failed", exc_info=True)
            checks["redis"] = f"error: {type(exc).__name__}"
    if checks["database"] != "ok":
        return JSONResponse({"status": "unavailable", **checks}, 503)
    degraded = checks.get("redis", "ok") != "ok"
    return JSONResponse({"status": "degraded" if degraded else "ok", **checks}, 200)
