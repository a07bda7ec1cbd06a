"""The engine's audit lines: who asked, from where, about which alert.

Built inside a transaction, written only after its commit (see effects.AfterCommit).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from escalation.records import AlertView


@dataclass(frozen=True)
class RequestContext:
    """Who asked, from where: copied into every audit line the request causes."""

    actor: str
    ip: str | None = None
    request_id: str | None = None


ENGINE = RequestContext("engine")


def audit_record(
    alert: AlertView, ctx: RequestContext, now: datetime, **rec: Any
) -> dict[str, Any]:
    """One audit line about `alert`; `rec` names the event and its details."""
    rec.setdefault("actor", ctx.actor)
    return {
        "ts": now.isoformat(),
        "alert_id": alert.id,
        "ip": ctx.ip,
        "request_id": ctx.request_id,
        "short_id": alert.short_id,
        "company": alert.company,
        **rec,
    }
