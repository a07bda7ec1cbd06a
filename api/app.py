"""The FastAPI application and the standalone worker entry point.

`create_app(settings, channels)` serves the API; with the embedded defaults (no Redis) it
also runs the worker in-process so `ackline serve` is one process on SQLite.
`run_worker(settings, channels)` runs a worker alone (scale-out with PostgreSQL + Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Mapping
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from api import metrics, web, webphone
from api.deps import Runtime, build_runtime
from api.loop import freeze_startup_objects
from api.routes import (
    alerts,
    audit,
    carriers,
    config,
    health,
    integrations,
    schedules,
    setup,
    status,
    twilio_voice,
    webhooks,
)
from api.settings import Settings
from api.setup_health import setup_warnings
from api.web import auth as console_auth
from api.web import console, console_admin, console_incidents
from api.web import status as status_web
from escalation.channels.base import Channel
from escalation.crud import sync_config
from escalation.runner import Worker
from storage.outage import RETRY_AFTER_SECONDS, FailureLog, down_dependency

log = logging.getLogger(__name__)


async def start_runtime(settings: Settings) -> Runtime:
    runtime = build_runtime(settings)
    if settings.migrate_on_start:
        await runtime.db.migrate()
    if settings.config_path is not None:
        await sync_config(runtime.db, runtime.config)
    for warning in await runtime.db.vacuum_warnings():
        log.warning("%s", warning)
    if not runtime.db.is_sqlite:
        await runtime.engine.warm_up()  # connections opened and primed before the first alert
    freeze_startup_objects()
    return runtime


async def stop_runtime(runtime: Runtime) -> None:
    await runtime.engine.shutdown()
    await runtime.bus.close()
    await runtime.db.dispose()
    runtime.audit.close()


# Of the drain timeout, what the process needs after the worker has drained: the gateway's
# hang-ups, closing pools and connections.
TEARDOWN_RESERVE = 3.0


def _worker(runtime: Runtime, channels: Mapping[str, Channel]) -> Worker:
    settings = runtime.settings
    return Worker(
        runtime.engine,
        runtime.bus,
        channels,
        poll_interval=settings.poll_interval,
        drain_timeout=max(1.0, settings.drain_timeout - TEARDOWN_RESERVE),
    )


def create_app(settings: Settings, channels: Mapping[str, Channel]) -> FastAPI:
    """The API; `channels` are used only when the worker runs inside this process."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await start_runtime(settings)
        app.state.runtime = runtime
        if app.state.setup_warnings is None:  # `ackline serve` sets the list it printed
            app.state.setup_warnings = setup_warnings(
                settings, runtime.config, now=runtime.engine.clock()
            )
        stop = asyncio.Event()
        task = None
        if settings.run_embedded_worker:
            task = asyncio.create_task(_worker(runtime, channels).run(stop), name="worker")
        try:
            async with status_web.running_status_page(app, runtime, channels):
                yield
        finally:
            stop.set()
            if task is not None:
                await task
            await stop_runtime(runtime)

    app = FastAPI(
        title="ackline",
        version="0.1.0",
        summary="On-call paging: alerts, escalation policies, acknowledgements, audit",
        lifespan=lifespan,
    )

    app.state.setup_warnings = None  # list[SetupWarning] once started (GET /v1/setup/health)
    app.add_middleware(metrics.RequestMiddleware)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """Say exactly which field is wrong; nothing has been changed."""
        return JSONResponse({"detail": [_validation_message(e) for e in exc.errors()]}, 422)

    for error in _DEPENDENCY_ERRORS:
        app.add_exception_handler(error, _dependency_failure)

    for router in (alerts.router, config.router, carriers.router, audit.router, webhooks.router,
                   integrations.router, twilio_voice.router, health.router,
                   metrics.router, schedules.router, setup.router, status.router,
                   status_web.router):  # fmt: skip
        app.include_router(router)
    app.include_router(webphone.router)  # off until app.state.webphone is set
    console_auth.install(app)
    app.include_router(console.router)
    app.include_router(console_incidents.router)
    app.include_router(console_admin.router)
    web.mount_static(app)
    return app


def _validation_message(error: Mapping[str, Any]) -> str:
    where = ".".join(str(p) for p in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    cause = error.get("ctx", {}).get("error")
    if error.get("type") == "json_invalid" and cause:
        message = f"{message}: {cause}"
    return f"{where}: {message}"


# What a request meets when PostgreSQL or Redis is unreachable (see storage.outage).
_DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    asyncpg.exceptions.PostgresError,
    asyncpg.exceptions.InterfaceError,
    redis.exceptions.RedisError,
    OSError,
)


async def _dependency_failure(request: Request, exc: Exception) -> JSONResponse:
    """503 with Retry-After when a dependency is down: nothing was stored (or, if the
    connection broke during the commit, at most the one alert a retry with the same
    Idempotency-Key finds again). Anything else from these libraries is a bug: logged
    with its traceback and answered 500 without one."""
    dependency = down_dependency(exc)
    if dependency is None:
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error"}, 500)
    _outages.failed(exc)
    return JSONResponse(
        {"detail": f"{dependency} unavailable, retry later", "unavailable": dependency.value,
         "retry_after": RETRY_AFTER_SECONDS},
        503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )  # fmt: skip


_outages = FailureLog(log, "an API request")


async def run_worker(
    settings: Settings, channels: Mapping[str, Channel], *, stop: asyncio.Event | None = None
) -> None:
    """Run one worker until `stop` is set (by default: SIGINT/SIGTERM); in-flight
    notifications get time to finish."""
    runtime = await start_runtime(settings)
    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
    try:
        await _worker(runtime, channels).run(stop)
    finally:
        await stop_runtime(runtime)
