"""Prometheus metrics of the carrier layer (process-global, like prometheus-client itself)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

TRUNK_UP = Gauge("ackline_trunk_up", "1 while OPTIONS probes say the trunk is up", ["trunk"])
TRUNK_REGISTERED = Gauge(
    "ackline_trunk_registered",
    "Trunks with register: 1 while the registrar holds this process's binding",
    ["trunk"],
)
TRUNK_BREAKER = Gauge(
    "ackline_trunk_breaker_state",
    "Live-call circuit breaker per trunk: 0 closed, 1 half-open, 2 open",
    ["trunk"],
)
TRUNK_ACTIVE = Gauge("ackline_trunk_active_calls", "Calls in progress per trunk", ["trunk"])
TRUNK_ATTEMPTS = Counter(
    "ackline_trunk_attempts_total",
    "Call attempts per trunk by how they ended",
    ["trunk", "outcome"],
)
TRUNK_SKIPPED = Counter(
    "ackline_trunk_skipped_total",
    "Trunks passed over for a call (at max_concurrent, max_cps, half-open trial busy)",
    ["trunk", "reason"],
)
HEALTH_CHANGES = Counter(
    "ackline_trunk_health_changes_total",
    "Health state changes per trunk (probe up/down, breaker, registration)",
    ["trunk", "aspect", "state"],
)
CALLS_REFUSED = Counter(
    "ackline_calls_refused_total",
    "Calls the toll-fraud guard refused before any carrier was touched",
    ["reason"],
)
