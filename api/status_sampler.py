"""The status page's live signals and its sampler.

`StatusCollector` measures what the rules in `escalation.status` judge: the database
answering and the share of `/v1/` requests answered 5xx (from this process's request
counter), the dispatcher's queue lag (the oldest due job no worker holds), every calling
process's view of each carrier trunk (in this process, or shared through Redis), and each
channel's recent delivery outcomes (from the database, so every node's deliveries
count). `Sampler` stores one sample per component per interval; with several nodes the
first to write an interval wins (`StatusService.record_samples`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, select

from api.deps import Runtime
from api.metrics import REQUESTS
from api.settings import Settings
from carriers.health import BreakerState, ProbeState
from carriers.shared_health import SharedTrunkHealth
from escalation.channels.base import DeliveryStatus
from escalation.config import AcklineConfig
from escalation.runner import RedisBus
from escalation.status import (
    ApiSignal,
    ChannelSignal,
    Component,
    ComponentKind,
    ComponentState,
    DispatcherSignal,
    Sample,
    Thresholds,
    TrunkView,
    api_state,
    channel_state,
    dispatcher_state,
    trunk_state,
    with_maintenance,
)
from escalation.statuspage import StatusService
from gateway.sip.registration import RegistrationState
from storage.models import Job, NotificationAttempt
from storage.outage import FailureLog

__all__ = ["ComponentStatus", "Sampler", "StatusCollector", "components_for", "operator_company"]

log = logging.getLogger(__name__)

QUERY_TIMEOUT = 5.0  # a signal that takes longer counts as its dependency being away
_SUCCEEDED = {
    DeliveryStatus.DELIVERED, DeliveryStatus.ACKNOWLEDGED, DeliveryStatus.ESCALATE,
    DeliveryStatus.RESOLVED, DeliveryStatus.SNOOZE, DeliveryStatus.NOT_ACKNOWLEDGED,
}  # fmt: skip
_FAILED = {DeliveryStatus.FAILED_RETRYABLE, DeliveryStatus.FAILED_PERMANENT}
_CHANNEL_NAMES = {
    "voice": "Voice calls", "sms": "SMS", "telegram": "Telegram", "slack": "Slack",
    "email": "Email", "webhook": "Webhooks",
}  # fmt: skip


def operator_company(settings: Settings, config: AcklineConfig) -> str:
    """ACKLINE_STATUS_OPERATOR, else the company of ackline.yaml, else the first API
    key's company."""
    if settings.status_operator:
        return settings.status_operator
    if settings.config_path is not None or not settings.api_keys:
        return config.company
    return next(iter(settings.api_keys.values()))


def components_for(settings: Settings, config: AcklineConfig) -> list[Component]:
    """What the page shows: a channel without its settings is not offered, so it is not
    shown either."""
    found = [
        Component("api", "API (alert ingest)", ComponentKind.API),
        Component("dispatcher", "Notification dispatcher", ComponentKind.DISPATCHER),
    ]
    if config.carriers is not None:
        found += [Component(f"voice-{t.name}", f"Voice calls via {t.name}",
                            ComponentKind.VOICE_TRUNK, t.name)
                  for t in config.carriers.trunks]  # fmt: skip
    configured = {
        "voice": config.carriers is None and bool(settings.voice_target),
        "sms": bool(settings.twilio_account_sid and settings.twilio_auth_token
                    and settings.twilio_from_numbers),
        "telegram": bool(settings.telegram_bot_token),
        "slack": bool(settings.slack_bot_token),
        "email": bool(settings.smtp_host and settings.smtp_from),
        "webhook": bool(settings.webhook_secret),
    }  # fmt: skip
    found += [Component(name, _CHANNEL_NAMES[name], ComponentKind.CHANNEL, name)
              for name, on in configured.items() if on]  # fmt: skip
    return found


@dataclass(frozen=True)
class ComponentStatus:
    component: Component
    state: ComponentState | None  # None: no data (e.g. no process reports the trunk)


class RequestWindow:
    """`/v1/` requests and 5xx answers over the last `window` seconds, from the
    cumulative Prometheus counter (no work per request): deltas between readings."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self.clock = clock
        self._readings: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=4096)

    @staticmethod
    def _totals() -> tuple[int, int]:
        total = errors = 0
        for family in REQUESTS.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                if not str(sample.labels.get("route", "")).startswith("/v1/"):
                    continue
                total += int(sample.value)
                if str(sample.labels.get("status", "")).startswith("5"):
                    errors += int(sample.value)
        return total, errors

    def read(self) -> tuple[int, int]:
        now = self.clock()
        total, errors = self._totals()
        self._readings.append((now, total, errors))
        while len(self._readings) > 1 and self._readings[1][0] <= now - self.window:
            self._readings.popleft()
        _, first_total, first_errors = self._readings[0]
        return total - first_total, errors - first_errors


class StatusCollector:
    """Current component states, measured at most once per `cache_for` seconds (the page
    is public: a flood of page views must not become a flood of queries)."""

    def __init__(
        self,
        runtime: Runtime,
        service: StatusService,
        components: Sequence[Component],
        *,
        app_state: Any = None,
        thresholds: Thresholds | None = None,
        cache_for: float = 5.0,
    ) -> None:
        self.runtime = runtime
        self.service = service
        self.components = list(components)
        self.app_state = app_state
        self.thresholds = thresholds = thresholds or Thresholds()
        self.cache_for = cache_for
        self.requests = RequestWindow(thresholds.api_window)
        self._cached: tuple[float, list[ComponentStatus]] | None = None
        self._lock = asyncio.Lock()
        self._failures = FailureLog(log, "measuring the status page's signals")

    def component(self, component_id: str) -> Component | None:
        return next((c for c in self.components if c.id == component_id), None)

    def forget(self) -> None:
        """The next reading measures again (a maintenance window just changed)."""
        self._cached = None

    async def current(self, *, fresh: bool = False) -> list[ComponentStatus]:
        async with self._lock:
            now = time.monotonic()
            if not fresh and self._cached is not None and now - self._cached[0] < self.cache_for:
                return self._cached[1]
            found = await self._measure()
            self._cached = (time.monotonic(), found)
            return found

    async def _measure(self) -> list[ComponentStatus]:
        t = self.thresholds
        database_ok = await self._bounded(self._ping(), False)
        requests, errors = self.requests.read()
        lag = await self._bounded(self._oldest_due_age(), None) if database_ok else None
        outcomes = await self._bounded(self._channel_outcomes(), {}) if database_ok else {}
        maintenance = await self._bounded(self.service.under_maintenance(), set()) \
            if database_ok else set()  # fmt: skip
        views = await self._trunk_views()
        out = []
        for c in self.components:
            state: ComponentState | None
            if c.kind is ComponentKind.API:
                state = api_state(ApiSignal(bool(database_ok), requests, errors), t)
            elif c.kind is ComponentKind.DISPATCHER:
                state = dispatcher_state(DispatcherSignal(bool(database_ok), lag), t)
            elif c.kind is ComponentKind.VOICE_TRUNK:
                state = trunk_state(views.get(c.source, []))
            else:
                state = channel_state(outcomes.get(c.source, ChannelSignal(0, 0)), t)
            out.append(ComponentStatus(c, with_maintenance(state, c.id, maintenance)))
        return out

    async def _bounded(self, work: Any, failed: Any) -> Any:
        """A signal's value, or `failed` when it errs or takes over QUERY_TIMEOUT."""
        try:
            result = await asyncio.wait_for(work, QUERY_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
            self._failures.failed(exc)
            return failed
        return result

    async def _ping(self) -> bool:
        await self.runtime.db.ping()
        return True

    async def _oldest_due_age(self) -> float | None:
        now = self.service.clock()
        query = select(sa.func.min(col(Job.due_at))).where(
            ~col(Job.done),
            col(Job.due_at) <= now,
            sa.or_(col(Job.lease_until).is_(None), col(Job.lease_until) < now),
        )
        async with self.runtime.db.session() as s:
            oldest: Any = await s.scalar(query)
        if oldest is None:
            return None
        if isinstance(oldest, str):  # SQLite aggregates lose the column type
            oldest = datetime.fromisoformat(oldest)
        if oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        age: float = max(0.0, (now - oldest).total_seconds())
        return age

    async def _channel_outcomes(self) -> dict[str, ChannelSignal]:
        since = self.service.clock() - timedelta(seconds=self.thresholds.channel_window)
        query = (
            select(NotificationAttempt.channel, NotificationAttempt.status, sa.func.count())
            .where(col(NotificationAttempt.finished_at) >= since)
            .group_by(col(NotificationAttempt.channel), col(NotificationAttempt.status))
        )
        counts: dict[str, list[int]] = {}
        async with self.runtime.db.session() as s:
            for channel, status, n in (await s.execute(query)).all():
                pair = counts.setdefault(channel, [0, 0])
                if status in _SUCCEEDED:
                    pair[0] += int(n)
                elif status in _FAILED:
                    pair[1] += int(n)
        return {c: ChannelSignal(ok, failed) for c, (ok, failed) in counts.items()}

    async def _trunk_views(self) -> dict[str, list[TrunkView]]:
        """Every calling process's view (Redis), else this process's router's."""
        reports: list[Mapping[str, Any]] = []
        bus = self.runtime.bus
        if isinstance(bus, RedisBus):
            shared = SharedTrunkHealth(bus.redis, self.runtime.settings.redis_prefix, "")
            reports = [r.get("trunks", {}) for r in (await shared.read()).values()]
        router = getattr(self.app_state, "carriers_router", None)
        if not reports and router is not None:
            reports = [{t.name: router.health_report(t.name) for t in router.trunks}]
        views: dict[str, list[TrunkView]] = {}
        for report in reports:
            for name, health in report.items():
                if (view := trunk_view(health)) is not None:
                    views.setdefault(name, []).append(view)
        return views


def trunk_view(health: Mapping[str, Any]) -> TrunkView | None:
    """One process's health report of a trunk (carriers.router.health_report); None for a
    report a newer release shaped differently. A trunk that registers counts only while
    registered; `registration` is None for one that does not register."""
    try:
        return TrunkView(
            ProbeState(health["probe"]),
            BreakerState(health["breaker"]),
            registered=health.get("registration") in (None, RegistrationState.REGISTERED.value),
        )
    except (KeyError, ValueError, TypeError):
        return None


def interval_start(now: datetime, interval: float) -> datetime:
    """The start of the sampling interval `now` falls in, the same on every node."""
    epoch = now.timestamp()
    return datetime.fromtimestamp(epoch - epoch % interval, UTC)


class Sampler:
    """Every `interval` seconds: measure, store one sample per component, and with
    `auto_incidents` open or resolve automatic incidents."""

    def __init__(
        self,
        collector: StatusCollector,
        interval: float,
        *,
        auto_incidents: bool = False,
    ) -> None:
        self.collector = collector
        self.interval = interval
        self.auto_incidents = auto_incidents
        self.samples_written = 0
        self._failures = FailureLog(log, "sampling the status page")

    async def sample_once(self) -> list[ComponentStatus]:
        statuses = await self.collector.current(fresh=True)
        service = self.collector.service
        at = interval_start(service.clock(), self.interval)
        seconds = max(1, round(self.interval))
        samples = [Sample(s.component.id, at, seconds, s.state)
                   for s in statuses if s.state is not None]  # fmt: skip
        self.samples_written += await service.record_samples(samples)
        if self.auto_incidents:
            for s in statuses:
                if s.state in (ComponentState.MAJOR_OUTAGE, ComponentState.PARTIAL_OUTAGE):
                    await service.open_auto_incident(s.component.id, s.component.name, s.state)
                elif s.state is not None and s.state is not ComponentState.MAINTENANCE:
                    await service.resolve_auto_incident(s.component.id, s.component.name)
        return statuses

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`; a failed round (the database away) is logged and the next one
        tries again."""
        while not stop.is_set():
            try:
                await self.sample_once()
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                self._failures.failed(exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
