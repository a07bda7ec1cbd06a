"""The event loop long-running processes use: uvloop where it is installed.

A gateway's hundreds of RTP streams spend most of their time in the event loop's socket
machinery; uvloop (a declared dependency on POSIX) does that work in C, which showed as
fewer lost packets and faster call set-up under load. Plain asyncio remains the fallback.

Such a process also takes its start-up objects out of the garbage collector's sight once
it is up (`freeze_startup_objects`), and ends its background tasks with `cancel_and_wait`.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Coroutine
from typing import Any, TypeVar

from gateway.aio import cancel_and_wait

__all__ = ["cancel_and_wait", "freeze_startup_objects", "run"]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - e.g. Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def freeze_startup_objects() -> None:
    """Move everything alive now (modules, classes, the app, pools) to the collector's
    permanent generation, so a full collection no longer walks it: with the web, ORM and
    validation libraries loaded, each took 25-100 ms that every alert in flight waited out
    (one of 92 ms in the worker during a minute of the dispatch bench). Call it once the
    process is ready; what it creates later is collected as usual."""
    gc.collect()
    gc.freeze()
