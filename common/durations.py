"""Durations as people write them in YAML: 30, "90s", "500ms", "5m", "1h30m".

One parser for every configuration section (policies, carriers, hotline) so the same
text means the same everywhere. No imports from the rest of the project: anything may
use it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["Duration", "parse_duration"]

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_PLAIN = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_HINT = "a duration is a number of seconds or a string like '500ms', '30s', '5m', '1h30m'"


def parse_duration(value: object) -> float:
    """Seconds from a number, or a string of number+unit parts (ms, s, m, h, d)."""
    if isinstance(value, bool):
        raise ValueError(_HINT)
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        if _PLAIN.fullmatch(text):
            seconds = float(text)
        else:
            parts = _PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(f"invalid duration {value!r}: {_HINT}")
            seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)
    else:
        raise ValueError(_HINT)
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
