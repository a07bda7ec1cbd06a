"""Small asyncio helpers every layer uses (imports run down, so they live at the bottom)."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Stop a background task and wait until it has (its `finally` blocks have run)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def weak_method(method: Callable[[T], None]) -> Callable[[T], None]:
    """A callback that calls the bound ``method`` while its object lives, and else does
    nothing: handed to a longer-lived holder (the endpoint keeps a finished transaction and
    its handler up to 32 s, timer D), it neither keeps the object alive that long nor
    closes a reference cycle through that holder, so the object goes by reference counting
    alone (no full garbage collection pass, which stalls the event loop under load)."""
    ref = weakref.WeakMethod(method)

    def call(arg: T) -> None:
        bound = ref()
        if bound is not None:
            bound(arg)

    return call
