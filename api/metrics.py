"""HTTP metrics and the /metrics endpoint (engine metrics live in escalation.metrics, the
storage layer's in storage.metrics)."""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.json_body import StrictJsonRoute

REQUESTS = Counter("ackline_http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "ackline_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)

router = APIRouter(route_class=StrictJsonRoute)


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


class RequestMiddleware:
    """Request ids and HTTP metrics as plain ASGI (no per-request task or body copy).

    Metrics are labelled by route template, not raw path, so alert ids don't explode
    cardinality; the request id (X-Request-Id, or a new one) lands in every audit line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = next((v.decode() for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = rid or str(uuid.uuid4())
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            template = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            LATENCY.labels(method, template).observe(time.perf_counter() - start)
            REQUESTS.labels(method, template, str(status)).inc()
