"""What a client sends to open an alert, and the ids it is known by."""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from escalation.config import Severity

_SHORT_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L: read aloud and typed
_MAX_DETAILS_BYTES = 16_384


class AlertIn(BaseModel):
    """Body of POST /v1/alerts."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=300)
    summary: str = Field(default="", max_length=4000)
    severity: Severity = "critical"
    policy: str = Field(min_length=1, max_length=64)
    dedup_key: str | None = Field(default=None, min_length=1, max_length=255)
    details: dict[str, Any] = Field(default_factory=dict)

    @field_validator("details")
    @classmethod
    def _small(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(json.dumps(value, default=str)) > _MAX_DETAILS_BYTES:
            raise ValueError(f"details must serialise to at most {_MAX_DETAILS_BYTES} bytes")
        return value


def short_id() -> str:
    return "".join(secrets.choice(_SHORT_ALPHABET) for _ in range(6))


def api_key_hash(api_key: str) -> str:
    """Idempotency keys are stored per API key, never the key itself."""
    return hashlib.sha256(api_key.encode()).hexdigest()
