"""`integrations:` in ackline.yaml: formats, tokens, routes and their policies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from escalation.config import ConfigError, IntegrationFormat, load_config, parse_config


def _base(*integrations: dict[str, Any]) -> dict[str, Any]:
    return {
        "recipients": [{"id": "alice", "name": "Alice", "phone": "+14155550101"}],
        "policies": [
            {"name": "p", "steps": [{"recipients": ["alice"], "channels": ["voice"]}]},
            {"name": "db", "steps": [{"recipients": ["alice"], "channels": ["sms"]}]},
        ],
        "integrations": list(integrations),
    }


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "ackline.yaml")
    return info.value.errors


AM = {"name": "prom", "format": "alertmanager", "token_env": "PROM_TOKEN", "policy": "p"}


def test_an_integration_with_routes_loads() -> None:
    cfg = parse_config(
        _base({**AM, "routes": [{"match": {"team": "db"}, "policy": "db"},
                                {"severity": "info", "policy": "p"}]})
    )  # fmt: skip
    (integration,) = cfg.integrations
    assert integration.format is IntegrationFormat.ALERTMANAGER
    assert [r.policy for r in integration.routes] == ["db", "p"]


def test_unknown_policies_are_reported_where_they_are() -> None:
    bad = {**AM, "policy": "nope", "routes": [{"match": {"a": "b"}, "policy": "gone"}]}
    assert _errors(_base(bad)) == [
        "ackline.yaml: integrations[0].policy: unknown policy 'nope'",
        "ackline.yaml: integrations[0].routes[0].policy: unknown policy 'gone'",
    ]


def test_duplicate_names_are_rejected() -> None:
    assert _errors(_base(AM, AM)) == ["ackline.yaml: integrations[1]: duplicate integration 'prom'"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"token": "x" * 20}, "give exactly one of token and token_env"),
        ({"token_env": None}, "give exactly one of token and token_env"),
        ({"format": "generic"}, "mapping is required for the generic format, and only for it"),
        ({"mapping": {"title": "t"}}, "mapping is required for the generic format, and only"),
        ({"routes": [{"policy": "p"}]}, "a route needs match labels or a severity"),
        ({"routes": [{"severity": "urgent", "policy": "p"}]}, "routes[0].severity"),
        ({"format": "nagios"}, "format"),
        ({"token_env": None, "token": "short"}, "token"),
    ],
)
def test_mistakes_name_the_integration(change: dict[str, Any], message: str) -> None:
    (error,) = _errors(_base({**AM, **change}))
    assert error.startswith("ackline.yaml: integrations[0]"), error
    assert message in error, error


def test_the_example_file_shows_each_kind_of_integration() -> None:
    cfg = load_config(Path(__file__).resolve().parents[2] / "ackline.example.yaml")
    assert [(i.name, i.format) for i in cfg.integrations] == [
        ("prometheus", IntegrationFormat.ALERTMANAGER),
        ("uptime", IntegrationFormat.GENERIC),
    ]
    assert all(i.token is None and i.token_env for i in cfg.integrations)
