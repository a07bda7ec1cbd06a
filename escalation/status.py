"""The public status page's rules: what state a component is in, given the signals we
measured, and what its 90 days of samples say about uptime.

Pure functions over frozen values, time always passed in, so every threshold is tested
without a clock or a database. `escalation.statuspage` stores samples, incidents and
maintenance windows; the API gathers the signals (`api.status_sampler`).

Derivation rules (the defaults of `Thresholds`, documented in README "Status page"):

- API: the database does not answer -> major outage. Otherwise, over the last
  `api_window` of `/v1/` requests (only once there are `api_min_requests`), the share
  answered 5xx (503 included): >= 50 % major, >= 25 % partial, >= 5 % degraded.
- Dispatcher: the age of the oldest notification job that is due and not held by a worker
  (queue lag): >= 10 min major, >= 2 min partial, >= 30 s degraded; no database: major.
- Voice, per carrier trunk, from every calling process's view of it (OPTIONS probe and
  live-call breaker): probes failing -> major; breaker open -> partial; breaker half-open
  (one trial call) -> degraded. Several processes disagreeing: all major -> major, some
  down or open -> partial outage. No process reports the trunk -> no data.
- A channel (SMS, Telegram, Slack, email, webhook; voice without trunks): over the last
  `channel_window`, finished deliveries failed / all finished: 100 % (of at least
  `channel_min_attempts`) major, >= 50 % partial, >= 10 % degraded (or any failure
  below the minimum count). No deliveries -> operational: nothing says it is broken.
- An active maintenance window that names the component turns any of these into
  `maintenance`.
"""

from __future__ import annotations

import enum
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from carriers.health import BreakerState, ProbeState

__all__ = [
    "HISTORY_DAYS",
    "ApiSignal",
    "ChannelSignal",
    "Component",
    "ComponentKind",
    "ComponentState",
    "DayBar",
    "DispatcherSignal",
    "Impact",
    "IncidentStatus",
    "MaintenanceStatus",
    "Sample",
    "Thresholds",
    "TrunkView",
    "api_state",
    "channel_state",
    "daily_bars",
    "day_totals",
    "dispatcher_state",
    "maintenance_status",
    "overall_state",
    "trunk_state",
    "uptime",
    "with_maintenance",
    "worst",
]

HISTORY_DAYS = 90


class ComponentState(enum.StrEnum):
    OPERATIONAL = "operational"
    DEGRADED = "degraded"
    PARTIAL_OUTAGE = "partial_outage"
    MAJOR_OUTAGE = "major_outage"
    MAINTENANCE = "maintenance"

    @property
    def label(self) -> str:
        return _LABELS[self]

    @property
    def is_up(self) -> bool:
        """Counts as uptime: serving, if slowly, or down on purpose and announced."""
        return self in (self.OPERATIONAL, self.DEGRADED, self.MAINTENANCE)


_LABELS = {
    ComponentState.OPERATIONAL: "Operational",
    ComponentState.DEGRADED: "Degraded performance",
    ComponentState.PARTIAL_OUTAGE: "Partial outage",
    ComponentState.MAJOR_OUTAGE: "Major outage",
    ComponentState.MAINTENANCE: "Under maintenance",
}
# Which state wins when several are combined (a day's bar, the overall banner).
_RANK = {
    ComponentState.OPERATIONAL: 0,
    ComponentState.MAINTENANCE: 1,
    ComponentState.DEGRADED: 2,
    ComponentState.PARTIAL_OUTAGE: 3,
    ComponentState.MAJOR_OUTAGE: 4,
}


class ComponentKind(enum.StrEnum):
    API = "api"
    DISPATCHER = "dispatcher"
    VOICE_TRUNK = "voice_trunk"  # one per carrier trunk
    CHANNEL = "channel"  # a notification channel judged by its recent deliveries


@dataclass(frozen=True)
class Component:
    """What the page shows: `id` is public (badge URLs, JSON), `name` the display name;
    `source` is the trunk or channel name behind it."""

    id: str
    name: str
    kind: ComponentKind
    source: str = ""


class IncidentStatus(enum.StrEnum):
    INVESTIGATING = "investigating"
    IDENTIFIED = "identified"
    MONITORING = "monitoring"
    RESOLVED = "resolved"


class Impact(enum.StrEnum):
    NONE = "none"
    MINOR = "minor"
    MAJOR = "major"
    CRITICAL = "critical"


class MaintenanceStatus(enum.StrEnum):
    SCHEDULED = "scheduled"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Thresholds:
    api_window: float = 300.0  # seconds of requests judged
    api_min_requests: int = 10
    api_degraded: float = 0.05
    api_partial: float = 0.25
    api_major: float = 0.50
    lag_degraded: float = 30.0  # seconds the oldest due job has waited
    lag_partial: float = 120.0
    lag_major: float = 600.0
    channel_window: float = 900.0
    channel_min_attempts: int = 3
    channel_degraded: float = 0.10
    channel_partial: float = 0.50


@dataclass(frozen=True)
class ApiSignal:
    database_ok: bool
    requests: int  # /v1/ requests answered in the window
    errors: int  # of them, answered 5xx


@dataclass(frozen=True)
class DispatcherSignal:
    database_ok: bool
    oldest_due_age: float | None  # seconds; None: nothing is waiting


@dataclass(frozen=True)
class TrunkView:
    """One calling process's view of one trunk."""

    probe: ProbeState
    breaker: BreakerState
    registered: bool = True  # a registering trunk not registered takes no calls


@dataclass(frozen=True)
class ChannelSignal:
    succeeded: int
    failed: int


def api_state(signal: ApiSignal, t: Thresholds = Thresholds()) -> ComponentState:
    if not signal.database_ok:
        return ComponentState.MAJOR_OUTAGE
    if signal.requests < t.api_min_requests:
        return ComponentState.OPERATIONAL
    return _by_ratio(signal.errors / signal.requests, t.api_degraded, t.api_partial, t.api_major)


def dispatcher_state(signal: DispatcherSignal, t: Thresholds = Thresholds()) -> ComponentState:
    if not signal.database_ok:
        return ComponentState.MAJOR_OUTAGE
    lag = signal.oldest_due_age or 0.0
    if lag >= t.lag_major:
        return ComponentState.MAJOR_OUTAGE
    if lag >= t.lag_partial:
        return ComponentState.PARTIAL_OUTAGE
    if lag >= t.lag_degraded:
        return ComponentState.DEGRADED
    return ComponentState.OPERATIONAL


def _one_view(view: TrunkView) -> ComponentState:
    if view.probe is ProbeState.DOWN or not view.registered:
        return ComponentState.MAJOR_OUTAGE
    if view.breaker is BreakerState.OPEN:
        return ComponentState.PARTIAL_OUTAGE
    if view.breaker is BreakerState.HALF_OPEN:
        return ComponentState.DEGRADED
    return ComponentState.OPERATIONAL


def trunk_state(views: Sequence[TrunkView]) -> ComponentState | None:
    """None when no process reports the trunk: no data, not "up"."""
    if not views:
        return None
    states = [_one_view(v) for v in views]
    if all(s is ComponentState.MAJOR_OUTAGE for s in states):
        return ComponentState.MAJOR_OUTAGE
    if any(s in (ComponentState.MAJOR_OUTAGE, ComponentState.PARTIAL_OUTAGE) for s in states):
        return ComponentState.PARTIAL_OUTAGE
    return worst(states)


def channel_state(signal: ChannelSignal, t: Thresholds = Thresholds()) -> ComponentState:
    total = signal.succeeded + signal.failed
    if signal.failed == 0:
        return ComponentState.OPERATIONAL
    if total < t.channel_min_attempts:
        return ComponentState.DEGRADED
    ratio = signal.failed / total
    if ratio >= 1.0:
        return ComponentState.MAJOR_OUTAGE
    if ratio >= t.channel_partial:
        return ComponentState.PARTIAL_OUTAGE
    if ratio >= t.channel_degraded:
        return ComponentState.DEGRADED
    return ComponentState.OPERATIONAL


def _by_ratio(ratio: float, degraded: float, partial: float, major: float) -> ComponentState:
    if ratio >= major:
        return ComponentState.MAJOR_OUTAGE
    if ratio >= partial:
        return ComponentState.PARTIAL_OUTAGE
    if ratio >= degraded:
        return ComponentState.DEGRADED
    return ComponentState.OPERATIONAL


def with_maintenance(
    state: ComponentState | None, component: str, under_maintenance: Iterable[str]
) -> ComponentState | None:
    """A component named by an active maintenance window is `maintenance`, whatever its
    signals say: the outage was announced."""
    return ComponentState.MAINTENANCE if component in set(under_maintenance) else state


def worst(states: Iterable[ComponentState]) -> ComponentState:
    return max(states, key=_RANK.__getitem__, default=ComponentState.OPERATIONAL)


def overall_state(states: Iterable[ComponentState | None]) -> ComponentState:
    """The banner: the worst known component state (no data counts as nothing)."""
    return worst(s for s in states if s is not None)


def maintenance_status(
    starts_at: datetime, ends_at: datetime, now: datetime, cancelled: bool = False
) -> MaintenanceStatus:
    if cancelled:
        return MaintenanceStatus.CANCELLED
    if now < starts_at:
        return MaintenanceStatus.SCHEDULED
    if now < ends_at:
        return MaintenanceStatus.IN_PROGRESS
    return MaintenanceStatus.COMPLETED


# -- history ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """A component's state over `seconds` starting at `at` (one sampler interval)."""

    component: str
    at: datetime
    seconds: int
    state: ComponentState


@dataclass(frozen=True)
class DayBar:
    """One day of one component (UTC). `sampled` 0 means no data, not up."""

    day: date
    sampled: int = 0  # seconds with a sample
    up: int = 0  # of them, operational, degraded or maintenance
    seconds_by_state: Mapping[ComponentState, int] = field(default_factory=dict)

    @property
    def has_data(self) -> bool:
        return self.sampled > 0

    @property
    def uptime(self) -> float | None:
        return self.up / self.sampled if self.sampled else None

    @property
    def worst(self) -> ComponentState | None:
        seen = [s for s, n in self.seconds_by_state.items() if n > 0]
        return worst(seen) if seen else None


Totals = Mapping[date, Mapping[ComponentState, int]]


def day_totals(samples: Iterable[Sample]) -> dict[str, dict[date, dict[ComponentState, int]]]:
    """Seconds per component, UTC day and state: what the database's GROUP BY returns."""
    out: dict[str, dict[date, dict[ComponentState, int]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(int))
    )
    for s in samples:
        out[s.component][s.at.astimezone(UTC).date()][s.state] += s.seconds
    return {c: {d: dict(by) for d, by in days.items()} for c, days in out.items()}


def daily_bars(totals: Totals, today: date, days: int = HISTORY_DAYS) -> list[DayBar]:
    """`days` bars, oldest first, ending with `today` (UTC); days without samples are
    empty bars ("no data")."""
    bars = []
    for back in range(days - 1, -1, -1):
        day = today - timedelta(days=back)
        by_state = {ComponentState(s): n for s, n in totals.get(day, {}).items()}
        sampled = sum(by_state.values())
        up = sum(n for s, n in by_state.items() if s.is_up)
        bars.append(DayBar(day, sampled, up, by_state))
    return bars


def uptime(bars: Iterable[DayBar]) -> float | None:
    """Seconds up / seconds sampled over the bars; None when nothing was sampled."""
    sampled = up = 0
    for bar in bars:
        sampled += bar.sampled
        up += bar.up
    return up / sampled if sampled else None
