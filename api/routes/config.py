"""CRUD for recipients, groups and policies (the same validation as ackline.yaml)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Response

from api.deps import RuntimeDep, TenantDep
from api.json_body import StrictJsonRoute
from api.routes.schemas import Error
from escalation import crud
from escalation.config import (
    ConfigError,
    Group,
    Integration,
    IntegrationSettings,
    Policy,
    Recipient,
)

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1", tags=["configuration"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error}, 404: {"model": Error}, 409: {"model": Error}, 422: {"model": Error}
}  # fmt: skip


def _key_matches(path_key: str, body_key: str) -> None:
    if path_key != body_key:
        raise HTTPException(422, f"the path says {path_key!r} but the body says {body_key!r}")


async def _checked(call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except ConfigError as exc:
        raise HTTPException(422, exc.errors) from None
    except crud.Conflict as exc:
        raise HTTPException(409, str(exc)) from None


# -- recipients


@router.get("/recipients", response_model=list[Recipient])
async def list_recipients(runtime: RuntimeDep, tenant: TenantDep) -> list[Recipient]:
    return await crud.list_recipients(runtime.db, tenant.company)


@router.get("/recipients/{rid}", response_model=Recipient, responses=_ERRORS)
async def get_recipient(rid: str, runtime: RuntimeDep, tenant: TenantDep) -> Recipient:
    for r in await crud.list_recipients(runtime.db, tenant.company):
        if r.id == rid:
            return r
    raise HTTPException(404, "recipient not found")


@router.post("/recipients", status_code=201, response_model=Recipient, responses=_ERRORS)
async def create_recipient(body: Recipient, runtime: RuntimeDep, tenant: TenantDep) -> Recipient:
    if any(r.id == body.id for r in await crud.list_recipients(runtime.db, tenant.company)):
        raise HTTPException(409, f"recipient {body.id!r} exists; use PUT to replace it")
    await crud.put_recipient(runtime.db, tenant.company, body)
    return body


@router.put("/recipients/{rid}", response_model=Recipient, responses=_ERRORS)
async def put_recipient(
    rid: str, body: Recipient, runtime: RuntimeDep, tenant: TenantDep
) -> Recipient:
    _key_matches(rid, body.id)
    await crud.put_recipient(runtime.db, tenant.company, body)
    return body


@router.delete("/recipients/{rid}", status_code=204, responses=_ERRORS)
async def delete_recipient(rid: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    if not await _checked(lambda: crud.delete(runtime.db, tenant.company, "recipient", rid)):
        raise HTTPException(404, "recipient not found")
    return Response(status_code=204)


# -- groups


@router.get("/groups", response_model=list[Group])
async def list_groups(runtime: RuntimeDep, tenant: TenantDep) -> list[Group]:
    return await crud.list_groups(runtime.db, tenant.company)


@router.put("/groups/{name}", response_model=Group, responses=_ERRORS)
async def put_group(name: str, body: Group, runtime: RuntimeDep, tenant: TenantDep) -> Group:
    _key_matches(name, body.name)
    await _checked(lambda: crud.put_group(runtime.db, tenant.company, body))
    return body


@router.delete("/groups/{name}", status_code=204, responses=_ERRORS)
async def delete_group(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    if not await _checked(lambda: crud.delete(runtime.db, tenant.company, "group", name)):
        raise HTTPException(404, "group not found")
    return Response(status_code=204)


# -- policies


@router.get("/policies", response_model=list[Policy])
async def list_policies(runtime: RuntimeDep, tenant: TenantDep) -> list[Policy]:
    return await crud.list_policies(runtime.db, tenant.company)


@router.get("/policies/{name}", response_model=Policy, responses=_ERRORS)
async def get_policy(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Policy:
    for p in await crud.list_policies(runtime.db, tenant.company):
        if p.name == name:
            return p
    raise HTTPException(404, "policy not found")


async def _put_policy(body: Policy, runtime: RuntimeDep, tenant: TenantDep) -> Policy:
    defaults = runtime.config.channel_defaults
    await _checked(lambda: crud.put_policy(runtime.db, tenant.company, body, defaults))
    return body


@router.post("/policies", status_code=201, response_model=Policy, responses=_ERRORS)
async def create_policy(body: Policy, runtime: RuntimeDep, tenant: TenantDep) -> Policy:
    if any(p.name == body.name for p in await crud.list_policies(runtime.db, tenant.company)):
        raise HTTPException(409, f"policy {body.name!r} exists; use PUT to replace it")
    return await _put_policy(body, runtime, tenant)


@router.put("/policies/{name}", response_model=Policy, responses=_ERRORS)
async def put_policy(name: str, body: Policy, runtime: RuntimeDep, tenant: TenantDep) -> Policy:
    _key_matches(name, body.name)
    return await _put_policy(body, runtime, tenant)


@router.delete("/policies/{name}", status_code=204, responses=_ERRORS)
async def delete_policy(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    if not await _checked(lambda: crud.delete(runtime.db, tenant.company, "policy", name)):
        raise HTTPException(404, "policy not found")
    return Response(status_code=204)


# -- integrations (inbound alert sources; POST /v1/integrations/{name} is their webhook)


@router.get("/integrations", response_model=list[IntegrationSettings])
async def list_integrations(runtime: RuntimeDep, tenant: TenantDep) -> list[IntegrationSettings]:
    """Tokens are never shown: only their digest is stored."""
    return await crud.list_integrations(runtime.db, tenant.company)


@router.get("/integrations/{name}", response_model=IntegrationSettings, responses=_ERRORS)
async def get_integration(name: str, runtime: RuntimeDep, tenant: TenantDep) -> IntegrationSettings:
    for i in await crud.list_integrations(runtime.db, tenant.company):
        if i.name == name:
            return i
    raise HTTPException(404, "integration not found")


async def _put_integration(
    body: Integration, runtime: RuntimeDep, tenant: TenantDep
) -> IntegrationSettings:
    await _checked(lambda: crud.put_integration(runtime.db, tenant.company, body))
    return body.settings()


@router.post(
    "/integrations", status_code=201, response_model=IntegrationSettings, responses=_ERRORS
)
async def create_integration(
    body: Integration, runtime: RuntimeDep, tenant: TenantDep
) -> IntegrationSettings:
    if any(i.name == body.name for i in await crud.list_integrations(runtime.db, tenant.company)):
        raise HTTPException(409, f"integration {body.name!r} exists; use PUT to replace it")
    return await _put_integration(body, runtime, tenant)


@router.put("/integrations/{name}", response_model=IntegrationSettings, responses=_ERRORS)
async def put_integration(
    name: str, body: Integration, runtime: RuntimeDep, tenant: TenantDep
) -> IntegrationSettings:
    _key_matches(name, body.name)
    return await _put_integration(body, runtime, tenant)


@router.delete("/integrations/{name}", status_code=204, responses=_ERRORS)
async def delete_integration(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    if not await crud.delete(runtime.db, tenant.company, "integration", name):
        raise HTTPException(404, "integration not found")
    return Response(status_code=204)
