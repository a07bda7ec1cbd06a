"""Inbound alert sources: Alertmanager, Grafana or any JSON posts to its integration's URL.

The caller proves itself with the integration's token (``?token=``, ``Authorization:
Bearer`` or ``X-Integration-Token``), not an API key: monitoring systems are configured
with a URL and perhaps a header, and each one gets a secret of its own.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from pydantic import BaseModel

from api.deps import RuntimeDep, context
from api.json_body import StrictJsonRoute, parse_strict
from api.routes.schemas import Error
from escalation import crud, inbound
from escalation.plan_cache import UnknownPolicy

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/integrations", tags=["integrations"])


class PayloadReceived(BaseModel):
    created: int
    deduplicated: int
    resolved: int
    unmatched: int  # resolved alerts with no open alert of their fingerprint
    alerts: list[str]


def _token(query: str | None, authorization: str | None, header: str | None) -> str | None:
    if header:
        return header
    scheme, _, credentials = (authorization or "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return query


@router.post(
    "/{name}",
    response_model=PayloadReceived,
    responses={
        400: {"model": Error}, 401: {"model": Error}, 409: {"model": Error},
        422: {"model": Error},
    },
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": {}}}}},
)  # fmt: skip
async def receive(
    name: str,
    request: Request,
    runtime: RuntimeDep,
    token: Annotated[str | None, Query(description="The integration's token")] = None,
    authorization: Annotated[str | None, Header(description="Bearer <token>")] = None,
    x_integration_token: Annotated[str | None, Header()] = None,
) -> PayloadReceived:
    """An alert source's webhook: firing alerts are ingested (deduplicated by fingerprint),
    resolved ones resolve their open alert. A payload wrong anywhere changes nothing."""
    candidates = await crud.integrations_named(runtime.db, name)
    try:
        source = inbound.authenticate(
            candidates, _token(token, authorization, x_integration_token), os.environ
        )
    except inbound.UnknownIntegration:
        raise HTTPException(401, "unknown integration or wrong token") from None
    try:
        payload: Any = parse_strict(await request.body())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise HTTPException(400, f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise HTTPException(
            400, "the body is not JSON this server reads: nested too deep"
        ) from None
    ctx = context(request, inbound.actor(source.settings))
    try:
        done = await inbound.receive(runtime.engine, source, payload, ctx)
    except inbound.PayloadError as exc:
        raise HTTPException(422, exc.errors) from None
    except UnknownPolicy as exc:
        policy = exc.args[0]
        raise HTTPException(409, f"the integration routes to unknown policy {policy!r}") from None
    return PayloadReceived(
        created=done.created, deduplicated=done.deduplicated, resolved=done.resolved,
        unmatched=done.unmatched, alerts=done.alert_ids,
    )  # fmt: skip
