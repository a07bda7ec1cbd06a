"""Alerts pushed by monitoring systems: Alertmanager and Grafana webhooks, generic JSON.

A payload is checked whole, and turned into one `AlertIn` per alert, before the first of
them is ingested: a payload that is wrong anywhere changes nothing. Firing alerts go
through `Engine.ingest` with the source's fingerprint as dedup key (a repeat pages nobody);
resolved ones close the open alert with that key the way POST /v1/alerts/{id}/resolve does.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, assert_never

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlmodel import col

from escalation import crud
from escalation.alert_input import AlertIn
from escalation.audit_records import RequestContext
from escalation.config import (
    FieldMapping,
    IntegrationFormat,
    IntegrationSettings,
    Severity,
    format_validation_error,
)
from escalation.engine import Engine
from escalation.plan_cache import UnknownPolicy
from storage.models import Alert, AlertState
from storage.outage import FailureLog

log = logging.getLogger(__name__)
_TITLE_MAX = 300
_SUMMARY_MAX = 4000

# Severity words monitoring rules use, onto ackline's; unknown or missing: critical (a
# page that is louder than needed beats one that is quieter).
SEVERITY_WORDS: Mapping[str, Severity] = {
    "critical": "critical", "crit": "critical", "page": "critical", "fatal": "critical",
    "emergency": "critical", "disaster": "critical",
    "high": "high", "error": "high", "err": "high", "major": "high",
    "medium": "medium", "warning": "medium", "warn": "medium", "average": "medium",
    "low": "low", "minor": "low",
    "info": "info", "informational": "info", "notice": "info", "none": "info",
}  # fmt: skip
DEFAULT_SEVERITY: Severity = "critical"


def severity_of(word: str | None) -> Severity:
    return SEVERITY_WORDS.get((word or "").strip().lower(), DEFAULT_SEVERITY)


class PayloadError(ValueError):
    """The payload is not what its format documents; each error names the field."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__("; ".join(errors))


class UnknownIntegration(LookupError):
    """No integration of that name takes this token (which of the two is not said)."""


class PayloadOutcome(enum.StrEnum):
    RECEIVED = "received"
    REJECTED = "rejected"


class AlertStatus(enum.StrEnum):
    FIRING = "firing"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class InboundAlert:
    """One alert of a payload, in ackline's terms."""

    status: AlertStatus
    dedup_key: str | None
    title: str
    summary: str
    severity: Severity
    labels: Mapping[str, str]  # what routes match
    details: dict[str, Any]


# -- Alertmanager webhook_config (version "4") and Grafana's webhook contact point


class _AlertmanagerAlert(BaseModel):
    model_config = ConfigDict(extra="ignore")

    status: AlertStatus
    labels: dict[str, str]
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: str | None = None
    endsAt: str | None = None
    generatorURL: str | None = None
    fingerprint: str = Field(min_length=1, max_length=255)


class _GrafanaAlert(_AlertmanagerAlert):
    valueString: str | None = None
    dashboardURL: str | None = None
    panelURL: str | None = None
    silenceURL: str | None = None


class _GroupPayload(BaseModel):
    """What Alertmanager's webhook and Grafana's (built on it) have in common."""

    model_config = ConfigDict(extra="ignore")

    groupKey: str
    truncatedAlerts: int = Field(default=0, ge=0)
    status: AlertStatus
    receiver: str
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str | None = None
    alerts: Sequence[_AlertmanagerAlert]


class _AlertmanagerPayload(_GroupPayload):
    version: Literal["4"]


class _GrafanaPayload(_GroupPayload):
    version: str  # Grafana sends "1"
    title: str | None = None
    state: str | None = None
    message: str | None = None
    orgId: int | None = None
    alerts: Sequence[_GrafanaAlert]


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _grouped(payload: _GroupPayload) -> list[InboundAlert]:
    out = []
    for a in payload.alerts:
        name = a.labels.get("alertname") or payload.groupKey or "alert"
        summary = a.annotations.get("summary")
        details: dict[str, Any] = {
            "labels": a.labels, "annotations": a.annotations, "starts_at": a.startsAt,
            "generator_url": a.generatorURL, "fingerprint": a.fingerprint,
            "external_url": payload.externalURL, "receiver": payload.receiver,
        }  # fmt: skip
        if isinstance(a, _GrafanaAlert):
            details |= {
                "value": a.valueString, "dashboard_url": a.dashboardURL,
                "panel_url": a.panelURL, "silence_url": a.silenceURL,
            }  # fmt: skip
        out.append(
            InboundAlert(
                status=a.status,
                dedup_key=a.fingerprint,
                title=_clip(f"{name}: {summary}" if summary else name, _TITLE_MAX),
                summary=_clip(a.annotations.get("description") or summary or "", _SUMMARY_MAX),
                severity=severity_of(a.labels.get("severity")),
                labels=a.labels,
                details={k: v for k, v in details.items() if v is not None},
            )
        )
    return out


# -- generic JSON through a FieldMapping

_MISSING = object()


def _at(data: object, path: str) -> object:
    """The value at a dotted path (``alert.labels.team``, ``items.0.id``), or _MISSING."""
    for part in path.split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return _MISSING
    return data


_FLAT_DEPTH = 16  # routes match fields this deep at most; the walk stays off the C stack


def _flat(data: object, prefix: str = "", depth: int = 0) -> dict[str, str]:
    """Every scalar of the payload by its dotted path: generic routes match these."""
    if depth > _FLAT_DEPTH:
        return {}
    if isinstance(data, dict):
        items: list[tuple[str, object]] = [(str(k), v) for k, v in data.items()]
    elif isinstance(data, list):
        items = [(str(i), v) for i, v in enumerate(data)]
    else:
        return {} if data is None else {prefix: _text(data)}
    out: dict[str, str] = {}
    for key, value in items:
        out |= _flat(value, f"{prefix}.{key}" if prefix else key, depth + 1)
    return out


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _generic(mapping: FieldMapping, payload: dict[str, Any]) -> list[InboundAlert]:
    errors: list[str] = []

    def scalar(what: str, path: str | None, required: bool) -> str | None:
        if path is None:
            return None
        value = _at(payload, path)
        if value is _MISSING or value is None:
            if required:
                errors.append(f"{path}: missing (mapping.{what})")
            return None
        if isinstance(value, dict | list) or (required and _text(value).strip() == ""):
            errors.append(f"{path}: must be a non-empty string or number (mapping.{what})")
            return None
        return _text(value)

    title = scalar("title", mapping.title, True)
    summary = scalar("summary", mapping.summary, False)
    severity = scalar("severity", mapping.severity, False)
    dedup_key = scalar("dedup_key", mapping.dedup_key, mapping.dedup_key is not None)
    status_value = scalar("status", mapping.status, False)
    resolved = status_value is not None and status_value in mapping.resolved_values
    if resolved and dedup_key is None:
        errors.append("dedup_key: a resolved alert needs a dedup key (mapping.dedup_key)")
    if errors or title is None:
        raise PayloadError(errors)
    return [
        InboundAlert(
            status=AlertStatus.RESOLVED if resolved else AlertStatus.FIRING,
            dedup_key=dedup_key if dedup_key is None else _clip(dedup_key, 255),
            title=_clip(title, _TITLE_MAX),
            summary=_clip(summary or "", _SUMMARY_MAX),
            severity=severity_of(severity),
            labels=_flat(payload),
            details={"payload": payload},
        )
    ]


def parse(integration: IntegrationSettings, payload: object) -> list[InboundAlert]:
    """Every alert of a payload; PayloadError naming the fields if any part is wrong."""
    fmt = integration.format
    if not isinstance(payload, dict):
        raise PayloadError(["(top level): must be a JSON object"])
    try:
        match fmt:
            case IntegrationFormat.ALERTMANAGER:
                return _grouped(_AlertmanagerPayload.model_validate(payload))
            case IntegrationFormat.GRAFANA:
                return _grouped(_GrafanaPayload.model_validate(payload))
            case IntegrationFormat.GENERIC:
                assert integration.mapping is not None  # the model requires it
                return _generic(integration.mapping, payload)
            case _:
                assert_never(fmt)
    except ValidationError as exc:
        raise PayloadError(format_validation_error(exc)) from None


def policy_for(integration: IntegrationSettings, alert: InboundAlert) -> str:
    """The first matching route's policy, else the integration's own."""
    for route in integration.routes:
        labels_match = all(alert.labels.get(k) == v for k, v in route.match.items())
        if labels_match and route.severity in (None, alert.severity):
            return route.policy
    return integration.policy


# -- receiving


def authenticate(
    candidates: list[crud.StoredIntegration], token: str | None, environ: Mapping[str, str]
) -> crud.StoredIntegration:
    """The integration this token belongs to. Digests are compared in constant time, and
    every candidate is compared, so neither a name nor a token prefix can be probed."""
    given = crud.token_digest(token or "")
    found = None
    for candidate in candidates:
        expected = candidate.token_sha256
        env = candidate.settings.token_env
        if expected is None and env is not None and environ.get(env):
            expected = crud.token_digest(environ[env])
        if expected is not None and hmac.compare_digest(given, expected) and token:
            found = candidate
    if found is None:
        raise UnknownIntegration
    return found


@dataclass
class Received:
    """What one payload did; written to the audit trail as it is returned."""

    created: int = 0
    deduplicated: int = 0
    resolved: int = 0
    unmatched: int = 0  # resolved, but no open alert had its dedup key
    alert_ids: list[str] = field(default_factory=list)


_audit_failures = FailureLog(log, "writing an integration's audit line")


def _audit(
    engine: Engine, source: crud.StoredIntegration, ctx: RequestContext,
    outcome: PayloadOutcome, **rec: Any,
) -> None:  # fmt: skip
    line = {
        "ts": engine.clock().isoformat(), "status": outcome.value, "actor": ctx.actor,
        "ip": ctx.ip, "request_id": ctx.request_id, "event": "integration_payload",
        "reason": source.settings.format.value, "integration": source.settings.name,
        "format": source.settings.format.value, "company": source.company, **rec,
    }  # fmt: skip
    try:
        engine.audit.write(source.company, [line])
    except OSError as exc:
        _audit_failures.failed(exc)


def actor(integration: IntegrationSettings) -> str:
    return f"integration:{integration.name}"


async def _open_alert(engine: Engine, company: str, dedup_key: str) -> str | None:
    async with engine.db.session() as s:
        found = await s.execute(
            select(col(Alert.id)).where(
                col(Alert.company) == company, col(Alert.open_dedup_key) == dedup_key
            )
        )
        return found.scalar_one_or_none()


async def _prepare(
    engine: Engine, source: crud.StoredIntegration, payload: object
) -> list[tuple[InboundAlert, AlertIn]]:
    """Everything that can be wrong with the payload, found before anything is stored."""
    integration = source.settings
    alerts = parse(integration, payload)
    known = {p.name for p in await crud.list_policies(engine.db, source.company)}
    out, errors = [], []
    for i, alert in enumerate(alerts):
        policy = policy_for(integration, alert)
        if alert.status is AlertStatus.FIRING and policy not in known:
            raise UnknownPolicy(policy)  # deleted behind the integration's back
        try:
            body = AlertIn(
                title=alert.title, summary=alert.summary, severity=alert.severity,
                policy=policy, dedup_key=alert.dedup_key,
                details={**alert.details, "source": actor(integration)},
            )  # fmt: skip
        except ValidationError as exc:
            errors += format_validation_error(exc, f"alerts[{i}].")
            continue
        out.append((alert, body))
    if errors:
        raise PayloadError(errors)
    return out


async def receive(
    engine: Engine, source: crud.StoredIntegration, payload: object, ctx: RequestContext
) -> Received:
    """Ingest or resolve every alert of an authenticated payload, then audit it."""
    try:
        prepared = await _prepare(engine, source, payload)
    except (PayloadError, UnknownPolicy) as exc:
        unknown = [f"unknown policy {exc.args[0]!r}"]
        errors = exc.errors if isinstance(exc, PayloadError) else unknown
        _audit(engine, source, ctx, PayloadOutcome.REJECTED, errors=errors)
        raise
    done = Received()
    key = f"{actor(source.settings)}@{source.company}"  # only hashed, for idempotency keys
    for alert, body in prepared:
        match alert.status:
            case AlertStatus.FIRING:
                result = await engine.ingest(source.company, key, None, body, ctx)
                done.alert_ids.append(result.alert.id)
                if result.created:
                    done.created += 1
                else:
                    done.deduplicated += 1
            case AlertStatus.RESOLVED:
                assert alert.dedup_key is not None  # parse() requires one
                alert_id = await _open_alert(engine, source.company, alert.dedup_key)
                closed = None
                if alert_id is not None:
                    closed = await engine.close(
                        alert_id, AlertState.RESOLVED, ctx, company=source.company,
                        reason=ctx.actor,
                    )  # fmt: skip
                if closed is not None and closed.state == AlertState.RESOLVED.value:
                    done.alert_ids.append(closed.id)
                    done.resolved += 1
                else:
                    done.unmatched += 1
            case _:
                assert_never(alert.status)
    _audit(
        engine, source, ctx, PayloadOutcome.RECEIVED, created=done.created,
        deduplicated=done.deduplicated, resolved=done.resolved, unmatched=done.unmatched,
        alerts=done.alert_ids,
    )  # fmt: skip
    return done
