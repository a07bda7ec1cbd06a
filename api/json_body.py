"""Strict JSON request bodies: the constants Python's parser accepts beyond RFC 8259.

`json.loads` takes `NaN`, `Infinity` and `-Infinity` as numbers. None of them is JSON: a
client that sends one has a bug, the value cannot be written back out in a response (the
encoder refuses it), and in a trunk weight or a delay it would poison arithmetic. Every
route is built with `StrictJsonRoute`, so such a body is a 422 before any handler runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number: only finite numbers are accepted")


def parse_strict(body: bytes) -> Any:
    """`json.loads` without the non-standard constants; raises JSONDecodeError."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        # The position is not known here; the message names the offending constant.
        raise json.JSONDecodeError(str(exc), body.decode(errors="replace"), 0) from None


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_strict(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose JSON body is parsed by `parse_strict`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict
