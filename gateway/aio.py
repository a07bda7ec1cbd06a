"""Small asyncio helpers every layer uses (imports run down, so they live at the bottom)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Stop a background task and wait until it has (its `finally` blocks have run)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
