"""Prometheus metrics of the storage layer (process-global, like prometheus-client itself).

The engine's own metrics live in escalation.metrics."""

from __future__ import annotations

from prometheus_client import Counter

DEPENDENCY_FAILURES = Counter(
    "ackline_dependency_failures_total",
    "Operations that failed, by operation and the dependency found unavailable (or other)",
    ["operation", "dependency"],
)
