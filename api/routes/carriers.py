"""Carrier trunks for telecom admins: list them with their health, change them at run
time (enable, disable, priority, weight, budgets), and probe one now.

Trunks are defined in ackline.yaml; changes made here are stored overrides that every
worker applies within seconds and that survive restarts. Passwords are never returned.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request

from api.deps import RuntimeDep, TenantDep, context
from api.json_body import StrictJsonRoute
from api.routes.schemas import Error
from carriers.health import probe_ok
from carriers.router import CarrierRouter
from carriers.shared_health import SharedTrunkHealth
from carriers.store import TrunkChanges, TrunkStore, apply_overrides, trunk_change_record
from carriers.trunk import Trunk
from escalation.audit_records import RequestContext
from escalation.runner import RedisBus

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1/carriers", tags=["carriers"])
_ERRORS: dict[int | str, dict[str, object]] = {
    401: {"model": Error}, 404: {"model": Error}, 422: {"model": Error}, 503: {"model": Error}
}  # fmt: skip


def _trunks(runtime: Any) -> list[Trunk]:
    carriers = runtime.config.carriers
    if carriers is None:
        raise HTTPException(404, "no carriers are configured (ackline.yaml has no carriers:)")
    trunks: list[Trunk] = carriers.trunks
    return trunks


def in_process_router(request: Request) -> CarrierRouter | None:
    """The router of this process's gateway (`ackline serve` sets it), if any."""
    found: CarrierRouter | None = getattr(request.app.state, "carriers_router", None)
    return found


async def _workers_health(runtime: Any) -> dict[str, dict[str, Any]]:
    """What each calling process reports through Redis (scale-out); {} without Redis."""
    bus = runtime.bus
    if not isinstance(bus, RedisBus):
        return {}
    return await SharedTrunkHealth(bus.redis, runtime.settings.redis_prefix, "").read()


def describe(
    trunk: Trunk,
    overrides: dict[str, Any],
    router: CarrierRouter | None,
    workers: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """A trunk as an admin sees it: its settings (no secrets), overrides, live health:
    this process's (`health`) and, with Redis, every calling process's
    (`health_by_process`: host/pid -> the same fields, plus when it was reported)."""
    secrets: dict[str, Any] = {"password": True, "auth_token": True, "registration": {"password"}}
    out = trunk.model_dump(mode="json", by_alias=True, exclude=secrets)  # as in the YAML
    out["has_password"] = trunk.password is not None or trunk.auth_token is not None
    out["overrides"] = overrides
    out["health"] = router.health_report(trunk.name) if router is not None else None
    out["health_by_process"] = {
        process: {**report["trunks"][trunk.name], "reported_at": report["at"]}
        for process, report in sorted(workers.items())
        if trunk.name in report.get("trunks", {})
    }
    return out


async def _current(runtime: Any, name: str) -> tuple[Trunk, dict[str, Any]]:
    configured = {t.name: t for t in _trunks(runtime)}
    if name not in configured:
        raise HTTPException(404, f"no trunk {name!r}")
    overrides = await TrunkStore(runtime.db).overrides()
    [trunk] = apply_overrides([configured[name]], overrides)
    return trunk, overrides.get(name, {})


# -- what the routes do, shared with the console's carriers page (api.web.console_admin)


async def trunk_views(runtime: Any, live: CarrierRouter | None) -> list[dict[str, Any]]:
    """Every configured trunk with its overrides applied, as `describe` shows it."""
    overrides = await TrunkStore(runtime.db).overrides()
    workers = await _workers_health(runtime)
    return [
        describe(t, overrides.get(t.name, {}), live, workers)
        for t in apply_overrides(_trunks(runtime), overrides)
    ]


async def trunk_view(runtime: Any, name: str, live: CarrierRouter | None) -> dict[str, Any]:
    trunk, overrides = await _current(runtime, name)
    return describe(trunk, overrides, live, await _workers_health(runtime))


async def change_trunk(
    runtime: Any, name: str, changes: TrunkChanges, ctx: RequestContext, company: str
) -> None:
    """Store an operator's change to a trunk and audit it (404/422 before any write)."""
    await _current(runtime, name)
    if not changes.as_dict():
        raise HTTPException(422, "nothing to change")
    merged = await TrunkStore(runtime.db).change(name, changes, ctx.actor)
    runtime.audit.write(
        company,
        [trunk_change_record(name, "changed", ",".join(sorted(merged)), ctx.actor,
                             changes.as_dict(), ip=ctx.ip, request_id=ctx.request_id)],
    )  # fmt: skip


async def reset_trunk(runtime: Any, name: str, ctx: RequestContext, company: str) -> None:
    """Forget a trunk's overrides (back to ackline.yaml) and audit it."""
    await _current(runtime, name)
    await TrunkStore(runtime.db).reset(name)
    runtime.audit.write(
        company,
        [trunk_change_record(name, "reset", "overrides_cleared", ctx.actor,
                             ip=ctx.ip, request_id=ctx.request_id)],
    )  # fmt: skip


async def probe_trunk(runtime: Any, name: str, live: CarrierRouter | None) -> dict[str, Any]:
    """One probe of the trunk now, from this process's gateway (503 without one)."""
    trunk, _ = await _current(runtime, name)
    if live is None:
        raise HTTPException(503, "no SIP gateway runs in this process (use ackline serve)")
    return await probe_once(live, trunk)


# -- routes


@router.get("", responses=_ERRORS)
async def list_carriers(
    request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> list[dict[str, Any]]:
    """Every configured trunk with its overrides applied."""
    return await trunk_views(runtime, in_process_router(request))


@router.get("/{name}", responses=_ERRORS)
async def get_carrier(
    name: str, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> dict[str, Any]:
    return await trunk_view(runtime, name, in_process_router(request))


@router.patch("/{name}", responses=_ERRORS)
async def change_carrier(
    name: str, changes: TrunkChanges, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> dict[str, Any]:
    """Change a trunk without a restart (e.g. `{"enabled": false}` takes it out of rotation
    for new calls; calls in progress are not touched). Audited."""
    ctx = context(request, f"api:{tenant.company}")
    await change_trunk(runtime, name, changes, ctx, tenant.company)
    return await trunk_view(runtime, name, in_process_router(request))


@router.delete("/{name}/overrides", responses=_ERRORS)
async def reset_carrier(
    name: str, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> dict[str, Any]:
    """Back to the trunk's ackline.yaml definition. Audited."""
    await reset_trunk(runtime, name, context(request, f"api:{tenant.company}"), tenant.company)
    return await trunk_view(runtime, name, in_process_router(request))


@router.post("/{name}/test", responses=_ERRORS)
async def test_carrier(
    name: str, request: Request, runtime: RuntimeDep, tenant: TenantDep
) -> dict[str, Any]:
    """Send one OPTIONS probe to the trunk now (needs the gateway in this process)."""
    return await probe_trunk(runtime, name, in_process_router(request))


async def probe_once(router: CarrierRouter, trunk: Trunk) -> dict[str, Any]:
    """One OPTIONS to `trunk`: answered or not, the SIP code and the round trip."""
    started = time.monotonic()
    if trunk.kind != "sip":
        if router.twilio is None:
            return {"trunk": trunk.name, "ok": None, "sip_code": None, "rtt_ms": None,
                    "detail": f"not probed: a {trunk.kind} trunk is checked through its API by "
                              "a process that places calls"}  # fmt: skip
        ok, detail = await router.twilio.probe(trunk)
        rtt_ms = round((time.monotonic() - started) * 1000, 1)
        return {"trunk": trunk.name, "ok": ok, "sip_code": None, "rtt_ms": rtt_ms,
                "detail": detail}  # fmt: skip
    code: int | None = None
    detail = ""
    try:
        response = await asyncio.wait_for(
            router.gateway.options(
                trunk.probe_uri(), transport=trunk.transport, tls=trunk.tls_client()
            ),
            trunk.trying_timeout,
        )
        code = response.code if response is not None else None
    except TimeoutError:
        detail = f"no answer within {trunk.trying_timeout:g} s"
    except (OSError, ValueError) as exc:
        detail = f"{type(exc).__name__}: {exc}"
    return {
        "trunk": trunk.name,
        "ok": probe_ok(code),
        "sip_code": code,
        "rtt_ms": round((time.monotonic() - started) * 1000, 1),
        "detail": detail or (f"answered {code}" if code is not None else "no answer"),
    }
