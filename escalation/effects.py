"""Side effects of the engine's transactions, staged inside and run only after commit.

Audit lines, wake-ups and hang-ups cannot be rolled back, so a transaction collects
them in `Effects` and `AfterCommit` runs them once the change is durable.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Protocol

from escalation import metrics
from escalation.audit import AuditLog
from escalation.audit_records import RequestContext, audit_record
from escalation.core import CancelScope
from escalation.records import AlertView
from storage.outage import FailureLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CancelRequest:
    """After an ack/resolve commit: hang up these in-flight notifications of the alert."""

    alert_id: str
    notifications: tuple[tuple[str, str], ...]  # (notification id, channel)
    # time.time() of the commit, for cancel latency; None when a worker found the closed
    # alert by itself (its cancel never came)
    committed_at: float | None
    # CHAIN (a reassign): only the listed notifications stop, the alert's new ones go on
    scope: CancelScope = CancelScope.ALERT


class Bus(Protocol):
    """How committed changes reach workers (in-process event or Redis)."""

    async def jobs_added(self, jobs: Sequence[tuple[int, datetime]]) -> None: ...

    async def alert_closed(self, request: CancelRequest) -> None: ...


@dataclass
class NewJob:
    """A job this transaction created or re-timed; the bus learns about unowned ones."""

    id: int
    alert_id: str
    kind: str
    due_at: datetime
    owned: bool = False


@dataclass
class Effects:
    """What to do once the transaction has committed."""

    audit: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    jobs: list[NewJob] = field(default_factory=list)
    cancels: list[CancelRequest] = field(default_factory=list)
    closed: list[str] = field(default_factory=list)

    def record(self, alert: AlertView, ctx: RequestContext, now: datetime, **rec: Any) -> None:
        """Stage an audit line about `alert` (see audit_records.audit_record)."""
        self.audit[alert.company].append(audit_record(alert, ctx, now, **rec))


class AfterCommit:
    """Runs the side effects of committed transactions."""

    def __init__(self, audit: AuditLog, bus: Bus) -> None:
        self.audit = audit
        self.bus = bus
        self._audit_failures = FailureLog(log, "writing audit lines after a commit")
        self._wake_failures = FailureLog(log, "waking workers after a commit")
        self._cancel_failures = FailureLog(log, "announcing a closed alert to workers")

    async def run(self, fx: Effects) -> None:
        """Never raises: the change is durable, so the caller answers success whatever
        happens here (a 500 after the commit would tell a client to retry what is already
        stored). A lost audit line is logged and counted; a lost wake-up only delays the
        jobs until the workers' next poll; a lost cancel is found by the workers' check of
        their calls' alerts (`Worker._heartbeat`)."""
        for company, records in fx.audit.items():
            try:
                self.audit.write(company, records)
            except OSError as exc:
                self._audit_failures.failed(exc)
        waiting = [(j.id, j.due_at) for j in fx.jobs if not j.owned]
        if waiting:
            try:
                await self.bus.jobs_added(waiting)
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._wake_failures.failed(exc)
        for state in fx.closed:
            metrics.ALERTS_CLOSED.labels(state).inc()
        committed = time.time()
        for request in fx.cancels:
            try:
                await self.bus.alert_closed(replace(request, committed_at=committed))
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._cancel_failures.failed(exc)
