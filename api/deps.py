"""Shared objects of a running app and the FastAPI dependencies that hand them out."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request

from api.settings import Settings
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext
from escalation.config import AcklineConfig, load_config
from escalation.engine import Engine, EngineConfig
from escalation.runner import InProcessBus, RedisBus
from storage.db import Database


@dataclass
class Runtime:
    settings: Settings
    db: Database
    audit: AuditLog
    bus: InProcessBus | RedisBus
    engine: Engine
    config: AcklineConfig


def build_runtime(settings: Settings) -> Runtime:
    """Everything API and worker share; the YAML file is validated here, before serving."""
    config = load_config(settings.config_path) if settings.config_path else AcklineConfig()
    db = Database(settings.database_url)
    audit = AuditLog(settings.audit_dir, fsync=settings.audit_fsync)
    bus: InProcessBus | RedisBus = (
        RedisBus(settings.redis_url, settings.redis_prefix)
        if settings.redis_url
        else InProcessBus()
    )
    engine = Engine(
        db,
        audit,
        bus,
        EngineConfig(
            channel_defaults=config.channel_defaults,
            rate_limits=config.rate_limits,
            public_url=settings.public_url,
            ack_secret=settings.ack_secret,
            lease_seconds=settings.lease_seconds,
            store_path=settings.store_path,
        ),
    )
    return Runtime(settings, db, audit, bus, engine, config)


# Dependencies are `async def` on purpose: FastAPI runs plain `def` dependencies in a
# worker thread, two thread hand-offs per request for a dict lookup.


def runtime_of(request: Request) -> Runtime:
    """The running app's shared objects, for code that already holds the request."""
    runtime: Runtime = request.app.state.runtime
    return runtime


async def get_runtime(request: Request) -> Runtime:
    return runtime_of(request)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


@dataclass(frozen=True)
class Tenant:
    company: str
    api_key: str


async def get_tenant(
    runtime: RuntimeDep,
    x_api_key: Annotated[str | None, Header(description="API key; selects the company")] = None,
) -> Tenant:
    company = runtime.settings.api_keys.get(x_api_key or "")
    if x_api_key is None or company is None:
        raise HTTPException(401, "missing or unknown X-API-Key")
    return Tenant(company, x_api_key)


TenantDep = Annotated[Tenant, Depends(get_tenant)]


def request_id(request: Request) -> str:
    rid: str | None = getattr(request.state, "request_id", None)
    return rid or request.headers.get("x-request-id") or str(uuid.uuid4())


def context(request: Request, actor: str) -> RequestContext:
    ip = request.client.host if request.client else None
    return RequestContext(actor=actor, ip=ip, request_id=request_id(request))
