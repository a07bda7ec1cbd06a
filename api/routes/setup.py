"""What in this installation's setup would page nobody (api.setup_health), for a console
banner: the list `ackline serve` printed at start-up."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.deps import RuntimeDep, TenantDep
from api.json_body import StrictJsonRoute
from api.setup_health import SetupCode, SetupWarning

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1", tags=["setup"])


class SetupWarningOut(BaseModel):
    code: SetupCode
    message: str
    subject: str


class SetupHealthOut(BaseModel):
    ok: bool  # no warnings
    warnings: list[SetupWarningOut]


@router.get("/setup/health", response_model=SetupHealthOut)
async def setup_health(request: Request, runtime: RuntimeDep, tenant: TenantDep) -> SetupHealthOut:
    """The start-up warnings. Those about ackline.yaml's policies, people and schedules go
    only to the company the file belongs to; the installation-wide ones to everyone."""
    found: list[SetupWarning] = request.app.state.setup_warnings or []
    own = tenant.company == runtime.config.company
    shown = [w for w in found if own or w.code.is_global]
    return SetupHealthOut(
        ok=not shown,
        warnings=[
            SetupWarningOut(code=w.code, message=w.message, subject=w.subject) for w in shown
        ],
    )
