"""The ``carriers:`` section of ackline.yaml: trunks, route strategy, fraud policy, probing.

    carriers:
      strategy: priority            # priority | round_robin | weighted | least_active | quality
      routes:                       # optional named subsets, e.g. ackline call --route cheap
        cheap: {trunks: [backup], strategy: round_robin}
      allowed_countries: [US, CA]   # required: calls anywhere else are refused
      probe: {interval: 5s, down_after: 3, up_after: 2}
      breaker: {failures: 3, cooldown: 30s}
      trunks:
        - {name: primary, host: sip.carrier-a.example, transport: tcp, priority: 10}
        - {name: backup, host: 192.0.2.10, port: 5080, password_env: BACKUP_SIP_PASSWORD, ...}

Errors name the offending key (``carriers.trunks[1] (backup).port: ...``) because the
person reading them is editing YAML, not Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from carriers.budgets import Budgets, CallBudget
from carriers.health import HealthChange, HealthPolicy
from carriers.numbers import REFUSED_TYPES, type_from_name, type_name
from carriers.router import CarrierRouter, TrunkGateway
from carriers.trunk import CountryCodes, Trunk, check_countries
from carriers.turns import ALL_TRUNKS, Turns
from carriers.twilio_voice import TwilioVoice
from common.durations import parse_duration


class CarrierConfigError(ValueError):
    """The carriers section is invalid; the message lists every problem found."""


class ProbeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    interval: float = Field(default=5.0, gt=0)
    timeout: float | None = Field(default=None, gt=0)  # default: each trunk's trying_timeout
    down_after: int = Field(default=3, ge=1)
    up_after: int = Field(default=2, ge=1)

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return None if value is None else parse_duration(value)


class BreakerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    failures: int = Field(default=3, ge=1)
    cooldown: float = Field(default=30.0, ge=0)

    @field_validator("cooldown", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return parse_duration(value)


Strategy = Literal["priority", "round_robin", "weighted", "least_active", "quality"]


class RouteSettings(BaseModel):
    """A named subset of the trunks with its own strategy (``ackline call --route NAME``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    trunks: tuple[str, ...] = Field(min_length=1)
    strategy: Strategy | None = None  # default: the carriers' strategy


class CallBudgetSettings(BaseModel):
    """The toll-fraud guard's hourly call budgets (null: no limit)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    per_hour: int | None = Field(default=600, ge=1)
    per_number_per_hour: int | None = Field(default=20, ge=1)

    def budget(self) -> CallBudget:
        return CallBudget(self.per_hour, self.per_number_per_hour)


SECRET_KEYS = ("password", "auth_token")


def _secret_from_env(item: dict[str, Any], key: str) -> None:
    env_key = f"{key}_env"
    if env_key not in item:
        return
    env = str(item.pop(env_key))
    if key in item:
        raise ValueError(f"give either {key} or {env_key}, not both")
    secret = os.environ.get(env)
    if secret is None:
        raise ValueError(f"{env_key} {env} is not set in the environment")
    item[key] = secret


class CarrierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    trunks: list[Trunk] = Field(min_length=1)
    strategy: Strategy = "priority"
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    allowed_countries: CountryCodes = Field(min_length=1)
    refused_types: tuple[str, ...] = tuple(sorted(type_name(t) for t in REFUSED_TYPES))
    default_region: str | None = None  # lets numbers be written nationally; E.164 otherwise
    probe: ProbeSettings = ProbeSettings()
    breaker: BreakerSettings = BreakerSettings()
    call_budget: CallBudgetSettings = CallBudgetSettings()

    @field_validator("trunks", mode="before")
    @classmethod
    def _resolve_secrets(cls, value: object) -> object:
        """``password_env: NAME`` (``auth_token_env`` for Twilio) reads the secret from the
        environment, not the file."""
        if not isinstance(value, list):
            return value
        out: list[object] = []
        for item in value:
            if isinstance(item, Mapping):
                item = dict(item)
                for secret_key in SECRET_KEYS:
                    _secret_from_env(item, secret_key)
                if isinstance(item.get("register"), Mapping):  # register.password_env
                    item["register"] = dict(item["register"])
                    _secret_from_env(item["register"], "password")
            out.append(item)
        return out

    @field_validator("default_region")
    @classmethod
    def _check_region(cls, value: str | None) -> str | None:
        return None if value is None else check_countries([value.upper()])[0]

    @field_validator("refused_types")
    @classmethod
    def _check_types(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            type_from_name(name)
        return value

    @model_validator(mode="after")
    def _check_trunks(self) -> CarrierConfig:
        names = [t.name for t in self.trunks]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate trunk names: {', '.join(duplicates)}")
        if not any(t.enabled for t in self.trunks):
            raise ValueError("every trunk is disabled: no call could be placed")
        for route, settings in self.routes.items():
            unknown = [n for n in settings.trunks if n not in names]
            if unknown:
                raise ValueError(f"route {route!r} names unknown trunks: {', '.join(unknown)}")
        return self

    def health_policy(self) -> HealthPolicy:
        return HealthPolicy(
            down_after=self.probe.down_after,
            up_after=self.probe.up_after,
            breaker_failures=self.breaker.failures,
            breaker_cooldown=self.breaker.cooldown,
        )

    def refused_type_values(self) -> frozenset[int]:
        return frozenset(type_from_name(name) for name in self.refused_types)

    def router(
        self,
        gateway: TrunkGateway,
        *,
        route: str | None = None,
        on_health_change: Callable[[HealthChange], None] | None = None,
        budgets: Budgets | None = None,
        twilio: TwilioVoice | None = None,
        turns: Turns | None = None,
    ) -> CarrierRouter:
        """A router over every trunk, or over the trunks of the named ``route``; ``turns``
        shares its round-robin position with every other process (carriers.turns)."""
        trunks, strategy = self.trunks, self.strategy
        if route is not None:
            settings = self.routes.get(route)
            if settings is None:
                known = ", ".join(sorted(self.routes)) or "none configured"
                raise ValueError(f"unknown route {route!r} (routes: {known})")
            trunks = [t for t in self.trunks if t.name in settings.trunks]
            strategy = settings.strategy or self.strategy
        return CarrierRouter(
            gateway,
            trunks,
            strategy,
            allowed_countries=self.allowed_countries,
            refused_types=self.refused_type_values(),
            health=self.health_policy(),
            on_health_change=on_health_change,
            default_region=self.default_region,
            budgets=budgets,
            twilio=twilio,
            call_budget=self.call_budget.budget(),
            turns=turns,
            route=route or ALL_TRUNKS,
        )


def load_carriers(source: Mapping[str, Any] | str | Path) -> CarrierConfig:
    """Read the ``carriers:`` section from a parsed mapping, YAML text or a YAML file."""
    if isinstance(source, Path):
        try:
            text = source.read_text()
        except OSError as exc:
            raise CarrierConfigError(f"cannot read {source}: {exc}") from None
        source = text
    if isinstance(source, str):
        try:
            data = yaml.safe_load(source)
        except yaml.YAMLError as exc:
            raise CarrierConfigError(f"invalid YAML: {exc}") from None
    else:
        data = source
    if not isinstance(data, Mapping) or "carriers" not in data:
        raise CarrierConfigError("no carriers: section in the configuration")
    section = data["carriers"]
    if not isinstance(section, Mapping):
        raise CarrierConfigError("carriers: must be a mapping (trunks, strategy, ...)")
    try:
        return CarrierConfig.model_validate(dict(section))
    except ValidationError as exc:
        raise CarrierConfigError(_describe(exc, section)) from None


def _describe(exc: ValidationError, section: Mapping[str, Any]) -> str:
    lines = []
    trunks = section.get("trunks")
    for error in exc.errors():
        parts = ["carriers"]
        loc = list(error["loc"])
        for index, key in enumerate(loc):
            if isinstance(key, int):
                label = f"[{key}]"
                if index > 0 and loc[index - 1] == "trunks" and isinstance(trunks, list):
                    item = trunks[key] if key < len(trunks) else None
                    if isinstance(item, Mapping) and "name" in item:
                        label += f" ({item['name']})"
                parts[-1] += label
            else:
                parts.append(str(key))
        message = str(error["msg"]).removeprefix("Value error, ")
        lines.append(f"{'.'.join(parts)}: {message}")
    return "invalid carriers configuration:\n  " + "\n  ".join(lines)
