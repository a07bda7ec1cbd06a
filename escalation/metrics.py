"""Prometheus metrics of the engine (process-global, like prometheus-client itself)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

ALERTS_INGESTED = Counter(
    "ackline_alerts_ingested_total", "Alerts accepted by POST /v1/alerts", ["result"]
)
ALERTS_CLOSED = Counter("ackline_alerts_closed_total", "Alert state changes", ["state"])
NOTIFICATIONS = Counter(
    "ackline_notifications_total", "Delivery results by channel", ["channel", "status"]
)
DISPATCH_LAG = Histogram(
    "ackline_dispatch_lag_seconds",
    "Time from a notification's due time to its hand-off to the channel",
    buckets=_LATENCY_BUCKETS,
)
CANCEL_LATENCY = Histogram(
    "ackline_cancel_seconds",
    "Time from an ack/resolve commit to channel.cancel() of an in-flight notification",
    buckets=_LATENCY_BUCKETS,
)
RATE_LIMITED = Counter(
    "ackline_rate_limited_total", "Notifications held or bundled by a rate limit", ["mode"]
)
SENDS_GIVEN_UP = Counter(
    "ackline_sends_given_up_total",
    "Deliveries still running at their channel's deadline, hung up and recorded as failed",
    ["channel"],
)
