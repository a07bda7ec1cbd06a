"""Local stand-ins for internet services: real HTTP servers on 127.0.0.1 speaking the
provider's wire format, so the real client code (Twilio SDK, httpx) runs end to end.

`FakeService` runs an ASGI handler with uvicorn inside the test's event loop, records every
request and can be scripted to stall or fail the next N requests.
"""

from __future__ import annotations

import abc
import asyncio
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Self, TypeVar

import uvicorn
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from escalation.channels.base import ContactPoint, Notification

__all__ = [
    "FakeService",
    "RecordedRequest",
    "Scripted",
    "UploadedFile",
    "free_port",
    "make_notification",
]

T = TypeVar("T")

_START_TIMEOUT_S = 5.0


def free_port() -> int:
    """A port nothing listens on right now (for servers that insist on binding themselves,
    and for connection-refused cases)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def make_notification(channel: str, *, attempt: int = 1, **contact: str) -> Notification:
    """A realistic page for channel tests; `contact` sets ContactPoint fields."""
    return Notification(
        notification_id="0b8f6a52-6c1e-4b8e-9a57-3f1f0c2d9e11",
        alert_id="5d0c1e7a-2b44-4f0e-8c61-9a3b7e2f4d10",
        alert_short_id="7F3K",
        channel=channel,
        contact=ContactPoint(recipient_id="r-ada", name="Ada Lovelace", **contact),
        title="Checkout API error rate 12%",
        summary="5xx ratio above 5% for 10 minutes on checkout-api in eu-west-1.",
        severity="critical",
        attempt=attempt,
        ack_url="https://ackline.example/ack/TOKEN",
        details={"runbook": "https://runbooks.example/checkout"},
    )


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake received it; headers have lower-case names."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    form: Mapping[str, str] = field(default_factory=dict)
    files: Mapping[str, UploadedFile] = field(default_factory=dict)
    json: Any = None


async def _record(request: Request) -> RecordedRequest:
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    form: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    payload: Any = None
    if content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        async with request.form() as data:
            for key, value in data.multi_items():
                if isinstance(value, UploadFile):
                    files[key] = UploadedFile(
                        value.filename or "", value.content_type or "", await value.read()
                    )
                else:
                    form[key] = value
    elif content_type.startswith("application/json") and body:
        payload = await request.json()
    return RecordedRequest(
        method=request.method,
        path=request.url.path,
        query=dict(request.query_params),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=body,
        form=form,
        files=files,
        json=payload,
    )


@dataclass
class _Script(Generic[T]):
    value: T
    remaining: int
    match: str | None


class Scripted(Generic[T]):
    """A queue of "the next N matching requests get X"; `match` None matches all."""

    def __init__(self) -> None:
        self._items: list[_Script[T]] = []

    def push(self, value: T, *, count: int, match: str | None) -> None:
        if count < 1:
            raise ValueError("count must be >= 1")
        self._items.append(_Script(value, count, match))

    def take(self, key: str) -> T | None:
        for item in self._items:
            if item.match is None or item.match == key:
                item.remaining -= 1
                if item.remaining == 0:
                    self._items.remove(item)
                return item.value
        return None


class FakeService(abc.ABC):
    """`async with Fake() as fake:` serves on `fake.url` until the block ends."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self._stalls: Scripted[float] = Scripted()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._port = 0

    @property
    def url(self) -> str:
        if not self._port:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._port}"

    def stall_next(self, seconds: float, *, count: int = 1, match: str | None = None) -> None:
        """Delay the next `count` matching answers, to drive client timeouts."""
        self._stalls.push(seconds, count=count, match=match)

    @abc.abstractmethod
    def script_key(self, request: RecordedRequest) -> str:
        """What `match=` in scripting calls is compared with (account, API method...)."""

    @abc.abstractmethod
    async def handle(self, request: RecordedRequest) -> Response:
        """Answer like the real service would."""

    async def _endpoint(self, request: Request) -> Response:
        recorded = await _record(request)
        self.requests.append(recorded)
        delay = self._stalls.take(self.script_key(recorded))
        if delay:
            await asyncio.sleep(delay)
        return await self.handle(recorded)

    async def __aenter__(self) -> Self:
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])])
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets created so, and
        # without it every response with a body waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _START_TIMEOUT_S
        while not self._server.started:
            if self._task.done() or loop.time() > deadline:
                sock.close()
                raise RuntimeError(f"{type(self).__name__} did not start")
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        assert self._task is not None
        self._server.should_exit = True
        await asyncio.wait_for(self._task, timeout=10)
