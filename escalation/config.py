"""Recipients, groups and escalation policies: the typed model and the YAML loader.

The same pydantic models validate `ackline.yaml` and API payloads, so a policy that loads
from a file is exactly a policy the API accepts. Every validation problem is reported with
the path that caused it (``policies[0].steps[1].channels[0]: unknown channel 'fax'``) so an
operator can fix the file without reading code.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import phonenumbers
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from carriers.config import CarrierConfig, CarrierConfigError, load_carriers
from common.durations import Duration
from escalation.schedules import Override, Schedule
from gateway.media.srtp import SrtpMode

# Which contact field each channel needs; a channel not listed here is not accepted.
CHANNEL_CONTACT_FIELD: Mapping[str, str] = {
    "voice": "phone",
    "sms": "phone",
    "telegram": "telegram_chat_id",
    "telegram_voice": "telegram_chat_id",
    "email": "email",
    "webhook": "webhook_url",
    "slack": "slack_channel",
}
KNOWN_CHANNELS = tuple(CHANNEL_CONTACT_FIELD)
# A recipient's contact fields, each once: the config model, the table, the console form
# and the ContactPoint a channel gets all carry exactly these.
CONTACT_FIELDS = tuple(dict.fromkeys(CHANNEL_CONTACT_FIELD.values()))
# Where a shift reminder may go, in the order a recipient's default is picked. A reminder
# is a message, not a page: a call would run the ack menu for an alert that does not exist.
REMINDER_CHANNELS = ("sms", "telegram", "slack", "email", "webhook")

# What an alert's severity may be (AlertIn); integrations map their sources' labels onto it.
Severity = Literal["critical", "high", "medium", "low", "info"]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ConfigError(ValueError):
    """One or more problems in a configuration, each prefixed with where it is."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.errors))


def normalize_phone(value: str) -> str:
    """E.164 only: a number without country code is ambiguous at 3 a.m."""
    if not value.startswith("+"):
        raise ValueError(f"phone {value!r} must be in E.164 form, e.g. +14155550123")
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException as exc:
        raise ValueError(f"phone {value!r} is not a phone number: {exc}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError(f"phone {value!r} is not a valid number")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


class Backoff(enum.StrEnum):
    LINEAR = "linear"
    EXPONENTIAL = "exponential"


class RetryPolicy(BaseModel):
    """How one channel retries before handing over to its fallback.

    Delay after failed attempt n (1-based): linear ``base * (1 + factor * (n - 1))``,
    exponential ``base * factor ** (n - 1)``, both capped at ``max``. ``retry_on``, when
    set, restricts retries to failures whose reason starts with one of the prefixes;
    other failures go straight to the fallback (email: only SMTP 4xx are retried).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    attempts: int = Field(default=1, ge=1, le=20)
    backoff: Backoff = Backoff.EXPONENTIAL
    base: Duration = 30.0
    factor: float = Field(default=2.0, ge=0, le=10)
    max: Duration = 600.0
    fallback_channel: str | None = None
    retry_on: tuple[str, ...] | None = None

    @field_validator("fallback_channel")
    @classmethod
    def _known_fallback(cls, value: str | None) -> str | None:
        if value is not None and value not in CHANNEL_CONTACT_FIELD:
            raise ValueError(f"unknown channel {value!r} (known: {', '.join(KNOWN_CHANNELS)})")
        return value

    def delay(self, failed_attempt: int) -> float:
        n = max(1, failed_attempt)
        if self.backoff is Backoff.LINEAR:
            raw = self.base * (1 + self.factor * (n - 1))
        else:
            raw = self.base * self.factor ** (n - 1)
        return float(min(self.max, raw))

    def retries(self, reason: str) -> bool:
        """Whether a retryable failure with this reason may be retried on this channel."""
        return self.retry_on is None or any(reason.startswith(p) for p in self.retry_on)


# Shipped defaults: voice 3x exponential -> telegram_voice 2x linear -> sms 2x (the SMS
# channel rotates providers between attempts); telegram 2x; email retries SMTP 4xx only.
DEFAULT_RETRY: Mapping[str, RetryPolicy] = {
    "voice": RetryPolicy(
        attempts=3, backoff=Backoff.EXPONENTIAL, base=30, factor=2, max=300,
        fallback_channel="telegram_voice",
    ),
    "telegram_voice": RetryPolicy(
        attempts=2, backoff=Backoff.LINEAR, base=30, factor=1, max=120, fallback_channel="sms"
    ),
    "sms": RetryPolicy(attempts=2, backoff=Backoff.LINEAR, base=60, factor=1, max=300),
    "telegram": RetryPolicy(attempts=2, backoff=Backoff.LINEAR, base=30, factor=1, max=120),
    "email": RetryPolicy(
        attempts=3, backoff=Backoff.EXPONENTIAL, base=60, factor=2, max=900, retry_on=("smtp_4",)
    ),
    "webhook": RetryPolicy(attempts=3, backoff=Backoff.EXPONENTIAL, base=10, factor=3, max=300),
    "slack": RetryPolicy(attempts=2, backoff=Backoff.LINEAR, base=30, factor=1, max=120),
}  # fmt: skip


def _slug(value: str, what: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{what} {value!r} must be lowercase letters, digits, '_', '.', '-' (max 64)"
        )
    return value


class Recipient(BaseModel):
    """A person (or rota) and every way to reach them."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str = Field(min_length=1, max_length=200)
    phone: str | None = None
    telegram_chat_id: str | None = None
    email: str | None = None
    webhook_url: str | None = None
    slack_channel: str | None = None  # a Slack channel, DM or user id (C..., D..., U...)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _slug(value, "recipient id")

    @field_validator("phone")
    @classmethod
    def _phone(cls, value: str | None) -> str | None:
        return None if value is None else normalize_phone(value)

    @field_validator("telegram_chat_id", mode="before")
    @classmethod
    def _chat(cls, value: object) -> str | None:
        if value is None:
            return None
        text = str(value)
        if not re.fullmatch(r"-?\d{1,20}|@[A-Za-z][A-Za-z0-9_]{4,31}", text):
            raise ValueError(f"telegram chat id {text!r} must be a number or an @channel name")
        return text

    @field_validator("slack_channel")
    @classmethod
    def _slack(cls, value: str | None) -> str | None:
        """Ids, not names: a renamed channel must not silently stop receiving pages."""
        if value is not None and not re.fullmatch(r"[CDGUW][A-Z0-9]{6,20}", value):
            raise ValueError(f"slack channel {value!r} must be a channel or user id (C0123ABCD)")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value is not None and not _EMAIL.match(value):
            raise ValueError(f"email {value!r} is not an address")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"webhook url {value!r} must be an http(s) URL")
        return value

    @model_validator(mode="after")
    def _reachable(self) -> Recipient:
        if not any(getattr(self, f) for f in CONTACT_FIELDS):
            raise ValueError(f"recipient {self.id!r} has no contact point")
        return self

    def reachable_on(self, channel: str) -> bool:
        return getattr(self, CHANNEL_CONTACT_FIELD[channel]) is not None


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    members: list[str] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value, "group name")


class Step(BaseModel):
    """Everyone targeted is notified on every listed channel at once; then wait `delay`.

    `schedules` page whoever is on call when the step fires, not when the alert started."""

    model_config = ConfigDict(extra="forbid")

    recipients: list[str] = Field(default_factory=list)
    groups: list[str] = Field(default_factory=list)
    schedules: list[str] = Field(default_factory=list)
    channels: list[str] = Field(min_length=1)
    delay: Duration = 300.0

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        for ch in value:
            if ch not in CHANNEL_CONTACT_FIELD:
                raise ValueError(f"unknown channel {ch!r} (known: {', '.join(KNOWN_CHANNELS)})")
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value

    @model_validator(mode="after")
    def _targets(self) -> Step:
        if not self.recipients and not self.groups and not self.schedules:
            raise ValueError("a step needs at least one recipient, group or schedule")
        return self


class VoiceOptions(BaseModel):
    """How this policy's alert calls behave: the ack menu's patience and keys, answering-
    machine detection, or an IVR flow of its own (its outcomes acknowledged / escalate /
    resolved / snoozed / machine are understood; anything else means not acknowledged).

    `resolve_key` offers 3 (resolve); `snooze` offers 4, which pauses the chain for that
    long, in whole minutes (off by default: a snoozed page is a quiet one)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompts: int = Field(default=3, ge=1, le=10)
    digit_timeout: Duration = 6.0
    amd: bool = False
    machine_message: str | None = Field(default=None, max_length=500)  # None: hang up
    flow: Path | None = None  # a flow YAML file instead of the built-in ack flow
    resolve_key: bool = True
    snooze: Duration | None = None

    @field_validator("snooze")
    @classmethod
    def _snooze(cls, value: float | None) -> float | None:
        if value is not None and not (60 <= value <= 24 * 3600 and value % 60 == 0):
            raise ValueError("snooze must be whole minutes, from 1m to 24h")
        return value


class Policy(BaseModel):
    """Ordered steps, repeated `repeat` more times, bounded by hard caps."""

    model_config = ConfigDict(extra="forbid")

    name: str
    steps: list[Step] = Field(min_length=1, max_length=50)
    repeat: int = Field(default=0, ge=0, le=20)
    max_duration: Duration = 4 * 3600.0
    max_notifications: int = Field(default=100, ge=1, le=10_000)
    retry: dict[str, RetryPolicy] = Field(default_factory=dict)
    voice: VoiceOptions | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value, "policy name")

    @field_validator("max_duration")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("max_duration must be positive")
        return value

    @field_validator("retry")
    @classmethod
    def _retry_channels(cls, value: dict[str, RetryPolicy]) -> dict[str, RetryPolicy]:
        for ch in value:
            if ch not in CHANNEL_CONTACT_FIELD:
                raise ValueError(f"unknown channel {ch!r} (known: {', '.join(KNOWN_CHANNELS)})")
        return value

    @property
    def snooze(self) -> float | None:
        """How long 4 on the phone pauses the chain; None when not offered."""
        return self.voice.snooze if self.voice is not None else None

    def retry_for(self, defaults: Mapping[str, RetryPolicy]) -> dict[str, RetryPolicy]:
        """The effective per-channel retry map: shipped < file defaults < this policy."""
        return {**DEFAULT_RETRY, **defaults, **self.retry}


class RateLimitMode(enum.StrEnum):
    HOLD = "hold"  # delay the notification until the window has room
    BUNDLE = "bundle"  # delay, then deliver held notifications together as one


class RateLimit(BaseModel):
    """At most `max` notifications per recipient on one channel within `window`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max: int = Field(ge=1, le=10_000)
    window: Duration
    mode: RateLimitMode = RateLimitMode.HOLD

    @field_validator("window")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("window must be positive")
        return value


class HotlineNumber(BaseModel):
    """What an inbound number (DID) runs: a flow (built-in name or YAML file) and the
    policy its escalate/bridge nodes use."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: str = "hotline"  # "hotline" (built-in) or a path to a flow YAML file
    policy: str


class TrustedSource(BaseModel):
    """A carrier allowed to send inbound calls: its addresses, optionally a digest login."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    sources: list[str] = Field(min_length=1)  # addresses or CIDR networks
    username: str | None = None
    password_env: str | None = None  # the password comes from this environment variable

    @model_validator(mode="after")
    def _login(self) -> TrustedSource:
        if (self.username is None) != (self.password_env is None):
            raise ValueError("username and password_env go together")
        return self


class HotlineConfig(BaseModel):
    """Inbound calls: which flow each number runs, who may call in, how fast."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    numbers: dict[str, HotlineNumber] = Field(min_length=1)  # DID or "default" -> flow
    trusted: list[TrustedSource] | None = None  # None: the carriers' IP-literal trunk hosts
    recordings_dir: Path = Path("var/recordings")
    # callers' messages are personal data: kept this long, then deleted (None: kept)
    recordings_retention: Duration | None = None
    invite_rate: float = Field(default=5.0, gt=0)  # new INVITEs per second per source
    invite_burst: int = Field(default=10, ge=1)

    @field_validator("recordings_retention")
    @classmethod
    def _retention(cls, value: float | None) -> float | None:
        if value is not None and value < 1:
            raise ValueError("recordings_retention is at least 1s (or omitted: keep them)")
        return value

    def number_for(self, did: str) -> HotlineNumber | None:
        return self.numbers.get(did) or self.numbers.get("default")


class IntegrationFormat(enum.StrEnum):
    ALERTMANAGER = "alertmanager"  # Prometheus Alertmanager webhook_config, version "4"
    GRAFANA = "grafana"  # Grafana unified alerting webhook contact point
    GENERIC = "generic"  # any JSON, read through a FieldMapping


class IntegrationRoute(BaseModel):
    """Alerts whose labels all match (and, if given, whose severity is this) page `policy`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    match: dict[str, str] = Field(default_factory=dict)
    severity: Severity | None = None
    policy: str

    @model_validator(mode="after")
    def _condition(self) -> IntegrationRoute:
        if not self.match and self.severity is None:
            raise ValueError("a route needs match labels or a severity")
        return self


class FieldMapping(BaseModel):
    """Where a generic payload keeps each field: dotted paths such as ``alert.title``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    title: str
    summary: str | None = None
    severity: str | None = None
    dedup_key: str | None = None
    status: str | None = None
    resolved_values: list[str] = Field(default_factory=lambda: ["resolved"], min_length=1)


class IntegrationSettings(BaseModel):
    """An inbound alert source as stored and shown: everything but its token."""

    model_config = ConfigDict(extra="forbid")

    name: str
    format: IntegrationFormat
    token_env: str | None = None  # the token comes from this environment variable
    policy: str
    routes: list[IntegrationRoute] = Field(default_factory=list)
    mapping: FieldMapping | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value, "integration name")

    @model_validator(mode="after")
    def _mapping(self) -> IntegrationSettings:
        if (self.mapping is None) == (self.format is IntegrationFormat.GENERIC):
            raise ValueError("mapping is required for the generic format, and only for it")
        return self

    def policies(self) -> list[tuple[str, str]]:
        """(where, policy name) of every policy this integration can page."""
        return [("policy", self.policy)] + [
            (f"routes[{i}].policy", r.policy) for i, r in enumerate(self.routes)
        ]


class Integration(IntegrationSettings):
    """An integration as configured: the token inline (API) or from the environment
    (``token_env``, files), so a YAML file under version control need hold no secret."""

    token: str | None = Field(default=None, min_length=16, max_length=256)

    @model_validator(mode="after")
    def _one_token(self) -> Integration:
        if (self.token is None) == (self.token_env is None):
            raise ValueError("give exactly one of token and token_env")
        return self

    def settings(self) -> IntegrationSettings:
        return IntegrationSettings.model_validate(self.model_dump(exclude={"token"}))


def integration_errors(integration: IntegrationSettings, policies: Iterable[str]) -> list[str]:
    """Dangling policy references; shared by the file loader and the API."""
    known = set(policies)
    return [
        f"{where}: unknown policy {name!r}"
        for where, name in integration.policies()
        if name not in known
    ]


class AcklineConfig(BaseModel):
    """The whole `ackline.yaml`; cross-references are checked by `validate_references`."""

    model_config = ConfigDict(extra="forbid")

    company: str = "default"
    recipients: list[Recipient] = Field(default_factory=list)
    groups: list[Group] = Field(default_factory=list)
    policies: list[Policy] = Field(default_factory=list)
    channel_defaults: dict[str, RetryPolicy] = Field(default_factory=dict)
    # keys: a channel name, or "default" for every channel without its own entry
    rate_limits: dict[str, RateLimit] = Field(default_factory=dict)
    # trunks, rotation, probing, fraud policy: validated by carriers.config (parse_config)
    carriers: CarrierConfig | None = Field(default=None, exclude=True)
    hotline: HotlineConfig | None = None
    integrations: list[Integration] = Field(default_factory=list)
    schedules: list[Schedule] = Field(default_factory=list)
    overrides: list[Override] = Field(default_factory=list)  # in creation order
    # Where alert calls go without carriers (ACKLINE_VOICE_TARGET wins over it): lets a
    # file such as ackline.demo.yaml ring a softphone on this machine by itself.
    voice_target: str | None = None
    # SDES SRTP of inbound calls to `ackline serve` (required | optional | off);
    # ACKLINE_SIP_SRTP and --srtp win over it, optional when none is set.
    inbound_srtp: Annotated[SrtpMode | None, BeforeValidator(SrtpMode.from_yaml)] = None

    @field_validator("voice_target")
    @classmethod
    def _voice_target(cls, value: str | None) -> str | None:
        if value is not None and not (value.startswith("sip:") and "{number}" in value):
            raise ValueError("voice_target is a SIP URI template with {number}, e.g. "
                             "sip:{number}@127.0.0.1:5070")  # fmt: skip
        return value

    @field_validator("channel_defaults", "rate_limits")
    @classmethod
    def _channel_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for ch in value:
            if ch != "default" and ch not in CHANNEL_CONTACT_FIELD:
                raise ValueError(f"unknown channel {ch!r} (known: {', '.join(KNOWN_CHANNELS)})")
        return value

    def rate_limit_for(self, channel: str) -> RateLimit | None:
        return self.rate_limits.get(channel) or self.rate_limits.get("default")


def reference_errors(
    policies: Iterable[tuple[str, Policy]],
    recipients: Mapping[str, Recipient],
    groups: Mapping[str, Group],
    channel_defaults: Mapping[str, RetryPolicy],
    schedules: Collection[str] = (),
) -> list[str]:
    """Problems a single model cannot see: dangling references, unreachable steps, cycles.

    Shared by the file loader and the API so both reject the same things the same way.
    """
    errors: list[str] = []
    for where, policy in policies:
        for i, step in enumerate(policy.steps):
            at = f"{where}.steps[{i}]"
            for j, rid in enumerate(step.recipients):
                if rid not in recipients:
                    errors.append(f"{at}.recipients[{j}]: unknown recipient {rid!r}")
            for j, gname in enumerate(step.groups):
                if gname not in groups:
                    errors.append(f"{at}.groups[{j}]: unknown group {gname!r}")
            for j, sname in enumerate(step.schedules):
                if sname not in schedules:
                    errors.append(f"{at}.schedules[{j}]: unknown schedule {sname!r}")
        retry = policy.retry_for(channel_defaults)
        for channel in retry:
            seen = [channel]
            nxt = retry[channel].fallback_channel
            while nxt is not None:
                if nxt in seen:
                    chain = " -> ".join([*seen, nxt])
                    errors.append(f"{where}.retry: fallback cycle {chain}")
                    break
                seen.append(nxt)
                nxt = retry[nxt].fallback_channel if nxt in retry else None
    return errors


def schedule_errors(where: str, schedule: Schedule, recipients: Collection[str]) -> list[str]:
    """A schedule's participants must be known recipients, its reminder channel one a
    reminder can take (file and API alike)."""
    errors = [
        f"{where}.layers[{i}].participants[{j}]: unknown recipient {rid!r}"
        for i, layer in enumerate(schedule.layers)
        for j, rid in enumerate(layer.participants)
        if rid not in recipients
    ]
    channel = schedule.reminder.channel if schedule.reminder is not None else None
    if channel is not None and channel not in REMINDER_CHANNELS:
        errors.append(
            f"{where}.reminder.channel: {channel!r} cannot carry a reminder "
            f"(one of: {', '.join(REMINDER_CHANNELS)})"
        )
    return errors


def override_errors(
    where: str, override: Override, schedules: Collection[str], recipients: Collection[str]
) -> list[str]:
    """An override names a known schedule and known recipients."""
    errors = []
    if override.schedule not in schedules:
        errors.append(f"{where}.schedule: unknown schedule {override.schedule!r}")
    for field_name in ("recipient", "replaces"):
        rid = getattr(override, field_name)
        if rid is not None and rid not in recipients:
            errors.append(f"{where}.{field_name}: unknown recipient {rid!r}")
    return errors


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """pydantic's errors as `path: message` lines, with the offending id when known."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        path = _loc(tuple(err["loc"]))
        lines.append(f"{prefix}{path}: {msg}" if path else f"{prefix}{msg}")
    return lines


def hotline_sources_from_carriers(cfg: AcklineConfig) -> list[TrustedSource]:
    """The outbound trunks whose host is an IP address also count as inbound sources."""
    out = []
    for trunk in cfg.carriers.trunks if cfg.carriers else []:
        if trunk.host is None:  # a REST trunk (Twilio) sends no SIP
            continue
        try:
            ipaddress.ip_address(trunk.host)
        except ValueError:
            continue
        out.append(TrustedSource(name=trunk.name, sources=[trunk.host]))
    return out


def _carrier_errors(cfg: AcklineConfig, section: object) -> list[str]:
    """Load the `carriers:` section (it has its own loader) into `cfg`; its problems."""
    if section is None:
        return []
    try:
        cfg.carriers = load_carriers({"carriers": section})
    except CarrierConfigError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]
        return [line for line in lines if line.startswith("carriers")] or lines
    return []


def _hotline_errors(cfg: AcklineConfig) -> list[str]:
    """Hotline numbers must page known policies and someone must be trusted to call in."""
    if cfg.hotline is None:
        return []
    errors: list[str] = []
    policies = {p.name for p in cfg.policies}
    for did, number in cfg.hotline.numbers.items():
        if number.policy not in policies:
            errors.append(f"hotline.numbers[{did}].policy: unknown policy {number.policy!r}")
    if cfg.hotline.trusted is None and not hotline_sources_from_carriers(cfg):
        errors.append(
            "hotline.trusted: no trusted sources: list the carriers allowed to call in "
            "(or give carrier trunks with IP address hosts)"
        )
    return errors


def _directory(
    cfg: AcklineConfig,
) -> tuple[dict[str, Recipient], dict[str, Group], set[str], list[str]]:
    """Recipients, groups and schedules by name, and the problems of each (duplicates,
    unknown members, bad schedules and overrides) in the document's order."""
    errors: list[str] = []
    recipients: dict[str, Recipient] = {}
    for i, r in enumerate(cfg.recipients):
        if r.id in recipients:
            errors.append(f"recipients[{i}]: duplicate recipient id {r.id!r}")
        recipients[r.id] = r
    groups: dict[str, Group] = {}
    for i, g in enumerate(cfg.groups):
        if g.name in groups:
            errors.append(f"groups[{i}]: duplicate group {g.name!r}")
        groups[g.name] = g
        for j, member in enumerate(g.members):
            if member not in recipients:
                errors.append(f"groups[{i}].members[{j}]: unknown recipient {member!r}")
    schedules: set[str] = set()
    for i, sch in enumerate(cfg.schedules):
        if sch.name in schedules:
            errors.append(f"schedules[{i}]: duplicate schedule {sch.name!r}")
        schedules.add(sch.name)
        errors += schedule_errors(f"schedules[{i}]", sch, recipients)
    for i, o in enumerate(cfg.overrides):
        errors += override_errors(f"overrides[{i}]", o, schedules, recipients)
    return recipients, groups, schedules, errors


def _policy_and_integration_errors(cfg: AcklineConfig) -> list[str]:
    """Duplicate policies and integrations, and integrations naming unknown policies."""
    errors: list[str] = []
    names: set[str] = set()
    for i, p in enumerate(cfg.policies):
        if p.name in names:
            errors.append(f"policies[{i}]: duplicate policy {p.name!r}")
        names.add(p.name)
    seen_integrations: set[str] = set()
    for i, integration in enumerate(cfg.integrations):
        if integration.name in seen_integrations:
            errors.append(f"integrations[{i}]: duplicate integration {integration.name!r}")
        seen_integrations.add(integration.name)
        errors += [f"integrations[{i}].{e}" for e in integration_errors(integration, names)]
    return errors


def parse_config(data: object, source: str = "<config>") -> AcklineConfig:
    """Validate a parsed YAML document; raise ConfigError listing every problem."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{source}: the top level must be a mapping"])
    data = dict(data)
    carriers_section = data.pop("carriers", None)
    try:
        cfg = AcklineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{source}: ")) from None
    errors = _carrier_errors(cfg, carriers_section) + _hotline_errors(cfg)
    recipients, groups, schedules, directory_errors = _directory(cfg)
    errors += directory_errors
    errors += _policy_and_integration_errors(cfg)
    errors += reference_errors(
        ((f"policies[{i}]", p) for i, p in enumerate(cfg.policies)),
        recipients,
        groups,
        cfg.channel_defaults,
        schedules,
    )
    if errors:
        raise ConfigError(f"{source}: {e}" for e in errors)
    return cfg


def load_config(path: str | Path) -> AcklineConfig:
    """Read and validate `ackline.yaml`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{p}: not valid YAML: {exc}"]) from None
    return parse_config(data, str(p))
