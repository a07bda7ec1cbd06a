"""Payload parsing, severity words, routing and token checks of inbound integrations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from escalation.config import IntegrationSettings
from escalation.crud import StoredIntegration, token_digest
from escalation.inbound import (
    AlertStatus,
    PayloadError,
    UnknownIntegration,
    authenticate,
    parse,
    policy_for,
    severity_of,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "integrations"


def _fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def _settings(**kw: Any) -> IntegrationSettings:
    return IntegrationSettings.model_validate(
        {"name": "src", "format": "alertmanager", "policy": "default", **kw}
    )


def test_each_alert_of_a_group_is_its_own_alert_keyed_by_fingerprint() -> None:
    alerts = parse(_settings(), _fixture("alertmanager_firing.json"))
    assert [(a.status, a.dedup_key, a.severity) for a in alerts] == [
        (AlertStatus.FIRING, "3c2c3d2e5a7f4b10", "critical"),
        (AlertStatus.FIRING, "9a0e4f6b1c2d3e4f", "medium"),
    ]
    (resolved,) = parse(_settings(), _fixture("alertmanager_resolved.json"))
    assert (resolved.status, resolved.dedup_key) == (AlertStatus.RESOLVED, "3c2c3d2e5a7f4b10")


def test_grafana_is_not_read_as_alertmanager() -> None:
    grafana = _fixture("grafana_firing.json")
    with pytest.raises(PayloadError) as info:
        parse(_settings(), grafana)
    assert info.value.errors == ["version: Input should be '4'"]
    alerts = parse(_settings(format="grafana"), grafana)
    assert [a.dedup_key for a in alerts] == ["c6eadffa33fcdf37", "bc97ff14869b13e3"]
    assert alerts[0].details["silence_url"].startswith("https://play.grafana.org/alerting/")


@pytest.mark.parametrize(
    ("payload", "errors"),
    [
        ([], ["(top level): must be a JSON object"]),
        ({**_fixture("alertmanager_firing.json"), "alerts": [{"status": "pending"}]},
         ["alerts[0].status: Input should be 'firing' or 'resolved'",
          "alerts[0].labels: Field required", "alerts[0].fingerprint: Field required"]),
    ],
)  # fmt: skip
def test_wrong_shapes_name_every_field(payload: object, errors: list[str]) -> None:
    with pytest.raises(PayloadError) as info:
        parse(_settings(), payload)
    assert info.value.errors == errors


@pytest.mark.parametrize(
    ("word", "severity"),
    [("critical", "critical"), ("ERROR", "high"), ("warning", "medium"), ("minor", "low"),
     ("info", "info"), ("none", "info"), (None, "critical"), ("p5-whatever", "critical")],
)  # fmt: skip
def test_severity_words(word: str | None, severity: str) -> None:
    assert severity_of(word) == severity


def test_the_first_matching_route_wins() -> None:
    settings = _settings(routes=[
        {"match": {"team": "db"}, "severity": "critical", "policy": "db-critical"},
        {"match": {"team": "db"}, "policy": "db"},
        {"severity": "medium", "policy": "quiet"},
    ])  # fmt: skip
    db1, db2 = parse(settings, _fixture("alertmanager_firing.json"))
    assert (policy_for(settings, db1), policy_for(settings, db2)) == ("db-critical", "db")
    other = parse(_settings(), _fixture("grafana_firing.json") | {"version": "4"})
    assert {policy_for(settings, a) for a in other} == {"default"}


def test_generic_paths_reach_into_lists_and_resolve_by_value() -> None:
    settings = _settings(format="generic", mapping={
        "title": "items.0.title", "dedup_key": "items.0.id", "status": "state",
        "resolved_values": ["OK"],
    })  # fmt: skip
    (alert,) = parse(settings, {"state": "OK", "items": [{"title": "disk", "id": 7}]})
    assert (alert.status, alert.title, alert.dedup_key) == (AlertStatus.RESOLVED, "disk", "7")
    assert alert.labels == {"state": "OK", "items.0.title": "disk", "items.0.id": "7"}
    with pytest.raises(PayloadError) as info:
        parse(settings, {"state": "OK", "items": [{"title": {"nested": 1}}]})
    assert info.value.errors == [
        "items.0.title: must be a non-empty string or number (mapping.title)",
        "items.0.id: missing (mapping.dedup_key)",
        "dedup_key: a resolved alert needs a dedup key (mapping.dedup_key)",
    ]


def test_tokens_pick_the_integration_and_nothing_else_does() -> None:
    acme = StoredIntegration("acme", _settings(), token_digest("acme-secret-token"))
    globex = StoredIntegration("globex", _settings(token_env="GLOBEX_TOKEN"), None)
    env = {"GLOBEX_TOKEN": "globex-secret-token"}
    assert authenticate([acme, globex], "acme-secret-token", env) is acme
    assert authenticate([acme, globex], "globex-secret-token", env) is globex
    for token in ("acme-secret-token!", "", None):
        with pytest.raises(UnknownIntegration):
            authenticate([acme, globex], token, env)
    with pytest.raises(UnknownIntegration):  # the variable is unset: nobody gets in
        authenticate([globex], "", {})
