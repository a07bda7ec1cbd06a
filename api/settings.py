"""Runtime settings, read from the environment (12-factor) with embedded defaults.

With nothing set, ackline runs on SQLite under ./var with the worker inside the API
process; setting REDIS_URL (and a PostgreSQL ACKLINE_DATABASE_URL) lets API and workers
run as separate processes.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AliasChoices, Field, ValidationInfo, field_validator
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings.sources.utils import parse_env_vars

from escalation.unit_of_work import StorePath
from gateway.media.srtp import SrtpMode

_Choice = TypeVar("_Choice", bound=enum.Enum)


def parse_api_keys(text: str) -> dict[str, str]:
    """`key1:company1,key2:company2` -> {key: company}."""
    keys: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, company = item.rpartition(":")
        if not sep or not key or not company:
            raise ValueError(f"ACKLINE_API_KEYS entry {item!r} must look like key:company")
        keys[key] = company
    return keys


def redis_url_from_env(env: Mapping[str, str]) -> str | None:
    """REDIS_URL, or a redis+sentinel:// URL built from REDIS_SENTINELS (`host:port,...`)
    and REDIS_MASTER_NAME (default "mymaster"): HA Redis without writing the URL by hand.
    Both set is refused rather than one silently winning."""
    url = env.get("REDIS_URL") or None
    sentinels = (env.get("REDIS_SENTINELS") or "").strip()
    if not sentinels:
        return url
    if url:
        raise ValueError("set REDIS_URL or REDIS_SENTINELS, not both")
    from storage.redis_client import sentinel_url

    return sentinel_url(sentinels, (env.get("REDIS_MASTER_NAME") or "mymaster").strip())


def parse_rtp_ports(text: str) -> tuple[int, int]:
    """`20000-30000` -> (20000, 30000): where RTP sockets bind, the range a firewall or a
    container must open (UDP). RTP takes even ports, its RTCP the odd one above."""
    low_text, sep, high_text = text.strip().partition("-")
    try:
        low, high = int(low_text), int(high_text)
    except ValueError:
        low = high = -1
    if not sep or not 1024 <= low < high <= 65535:
        raise ValueError(
            f"ACKLINE_RTP_PORTS {text!r} must look like LOW-HIGH with 1024 <= LOW < HIGH <= 65535"
        )
    if low % 2:
        raise ValueError(f"ACKLINE_RTP_PORTS {text!r}: LOW must be even (RTP takes even ports)")
    return low, high


# Secrets that may come from a file named by NAME_FILE instead (Docker/Kubernetes secrets),
# so they stay out of `docker inspect`, the process environment and compose files.
FILE_SECRETS = (
    "ACKLINE_API_KEYS",
    "ACKLINE_ACK_SECRET",
    "ACKLINE_DATABASE_URL",
    "DATABASE_URL",
    "REDIS_URL",
    "ACKLINE_VOICE_AUTH_PASSWORD",
    "ACKLINE_WEBHOOK_SECRET",
    "ACKLINE_SESSION_SECRET",
    "TWILIO_AUTH_TOKEN",
    "TELEGRAM_BOT_TOKEN",
    "TELEGRAM_WEBHOOK_SECRET",
    "SLACK_BOT_TOKEN",
    "SLACK_SIGNING_SECRET",
)


def with_file_secrets(env: Mapping[str, str]) -> Mapping[str, str]:
    """``env`` with each NAME_FILE of `FILE_SECRETS` read into NAME (surrounding whitespace
    dropped); setting both is refused, as one would silently win."""
    named = [name for name in FILE_SECRETS if env.get(f"{name}_FILE")]
    if not named:
        return env
    out = dict(env)
    for name in named:
        path = env[f"{name}_FILE"]
        if env.get(name):
            raise ValueError(f"set {name} or {name}_FILE, not both")
        try:
            out[name] = Path(path).read_text().strip()
        except OSError as exc:
            raise ValueError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
    return out


def _choice(kind: type[_Choice], variable: str, value: str) -> _Choice:
    """One of an enum's values, spelt in any case: a typo is refused by name rather than
    silently read as some default."""
    try:
        return kind(value.strip().lower())
    except ValueError:
        choices = ", ".join(str(m.value) for m in kind)
        raise ValueError(f"{variable} must be one of {choices}, not {value!r}") from None


def parse_srtp_mode(value: str) -> SrtpMode:
    """``ACKLINE_SIP_SRTP``: required, optional or off (a typo must not turn SRTP off)."""
    return _choice(SrtpMode, "ACKLINE_SIP_SRTP", value)


DEFAULT_INBOUND_SRTP = SrtpMode.OPTIONAL


def inbound_srtp(cli: SrtpMode | None, env: SrtpMode | None, yaml: SrtpMode | None) -> SrtpMode:
    """The inbound SRTP policy of `ackline serve`: ``--srtp``, else ``ACKLINE_SIP_SRTP``,
    else ``inbound_srtp`` in ackline.yaml, else optional. One rule, so a deployment that
    sets it in the file can still override it for one process."""
    for chosen in (cli, env, yaml):
        if chosen is not None:
            return chosen
    return DEFAULT_INBOUND_SRTP


def parse_store_path(value: str) -> StorePath:
    """``ACKLINE_STORE_PATH``: fast or session."""
    return _choice(StorePath, "ACKLINE_STORE_PATH", value)


def parse_numbers(text: str) -> tuple[str, ...]:
    """`TWILIO_FROM_NUMBERS`: comma-separated, blanks dropped."""
    return tuple(n.strip() for n in text.split(",") if n.strip())


# Settings fields whose variable is not plain pydantic input, each with its parser.
TEXT_PARSERS: Mapping[str, Callable[[str], Any]] = {
    "api_keys": parse_api_keys,
    "rtp_ports": parse_rtp_ports,
    "twilio_from_numbers": parse_numbers,
    "sip_srtp": parse_srtp_mode,
    "store_path": parse_store_path,
}


class Settings(BaseSettings):
    """Every setting once: its type, bound, default and environment variable side by side.

    `Settings(...)` takes field names and reads nothing else (tests, embedded use);
    `Settings.from_env()` reads the environment. An empty variable counts as unset.
    """

    model_config = SettingsConfigDict(env_ignore_empty=True, populate_by_name=True)

    database_url: str = Field(
        default="sqlite:///var/ackline.db",
        validation_alias=AliasChoices("ACKLINE_DATABASE_URL", "DATABASE_URL"),
    )
    redis_url: str | None = None
    redis_prefix: str = Field(default="ackline", validation_alias="ACKLINE_REDIS_PREFIX")
    # ackline.yaml, loaded into the database at start
    config_path: Path | None = Field(default=None, validation_alias="ACKLINE_CONFIG")
    # API key -> company (tenant)
    api_keys: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, validation_alias="ACKLINE_API_KEYS"
    )
    audit_dir: Path = Field(default=Path("var/audit"), validation_alias="ACKLINE_AUDIT_DIR")
    audit_fsync: bool = Field(default=False, validation_alias="ACKLINE_AUDIT_FSYNC")
    # how Twilio/Telegram/email links reach us
    public_url: str | None = Field(default=None, validation_alias="ACKLINE_PUBLIC_URL")
    # signs one-click ack links
    ack_secret: str | None = Field(default=None, repr=False, validation_alias="ACKLINE_ACK_SECRET")
    # validates X-Twilio-Signature
    twilio_auth_token: str | None = Field(
        default=None, repr=False, validation_alias="TWILIO_AUTH_TOKEN"
    )
    # X-Telegram-Bot-Api-Secret-Token
    telegram_secret: str | None = Field(
        default=None, repr=False, validation_alias="TELEGRAM_WEBHOOK_SECRET"
    )
    # None: run the worker in-process unless Redis is set
    embedded_worker: bool | None = Field(default=None, validation_alias="ACKLINE_EMBEDDED_WORKER")
    lease_seconds: float = Field(default=30.0, validation_alias="ACKLINE_LEASE_SECONDS")
    # PostgreSQL: the engine's asyncpg fast path (prepared SQL where it measurably helps)
    # or SQLAlchemy only; SQLite always takes the session.
    store_path: StorePath = Field(default=StorePath.FAST, validation_alias="ACKLINE_STORE_PATH")
    poll_interval: float = Field(default=1.0, validation_alias="ACKLINE_POLL_INTERVAL")
    # SIGTERM: the process stops taking work, lets deliveries in flight end, hands the
    # rest back to other workers and exits within this many seconds.
    drain_timeout: float = Field(default=10.0, gt=0, validation_alias="ACKLINE_DRAIN_TIMEOUT")
    # SIGTERM: before it stops, the API answers /readyz 503 for this many seconds while it
    # still serves, so a load balancer takes it out of rotation first (0: stop at once).
    unready_grace: float = Field(default=0.0, ge=0, le=60, validation_alias="ACKLINE_UNREADY_GRACE")
    migrate_on_start: bool = Field(default=True, validation_alias="ACKLINE_MIGRATE")
    # The gateway's SIP address (listen and advertise).
    sip_host: str = Field(default="127.0.0.1", validation_alias="ACKLINE_SIP_HOST")
    # Where RTP sockets bind (parse_rtp_ports).
    rtp_ports: Annotated[tuple[int, int], NoDecode] = Field(
        default=(20000, 30000), validation_alias="ACKLINE_RTP_PORTS"
    )
    sip_port: int = Field(default=5060, validation_alias="ACKLINE_SIP_PORT")
    # RFC 3261 T1: every SIP timer scales with it.
    sip_t1: float = Field(default=0.5, gt=0, le=4, validation_alias="ACKLINE_SIP_T1")
    # Any call, inbound ones included, ends after this many seconds.
    sip_max_call: float = Field(default=3600.0, gt=0, validation_alias="ACKLINE_SIP_MAX_CALL")
    # Inbound calls at once; more get 503.
    sip_max_inbound_calls: int = Field(
        default=500, ge=1, validation_alias="ACKLINE_SIP_MAX_INBOUND_CALLS"
    )
    # RFC 4028 session timer of calls without a trunk's own (inbound ones): the interval
    # asked for and the smallest accepted (422 below it); 90 s at least.
    sip_session_expires: int = Field(
        default=1800, ge=90, le=86400, validation_alias="ACKLINE_SIP_SESSION_EXPIRES"
    )
    sip_min_se: int = Field(default=90, ge=90, le=86400, validation_alias="ACKLINE_SIP_MIN_SE")
    # SDES SRTP of inbound (hotline) calls: offered and accepted over TLS only, as SDES keys
    # travel inside the SIP message; ``required`` refuses plain RTP (and any call not
    # arriving over TLS) with 488, ``off`` refuses SRTP offers. None: not set here (see
    # `inbound_srtp` for what wins).
    sip_srtp: SrtpMode | None = Field(default=None, validation_alias="ACKLINE_SIP_SRTP")
    # Channels: each is built only when its settings are present (api/channels.py).
    # The voice channel dials this, e.g. sip:{number}@127.0.0.1:5090.
    voice_target: str | None = Field(default=None, validation_alias="ACKLINE_VOICE_TARGET")
    voice_auth_user: str | None = Field(default=None, validation_alias="ACKLINE_VOICE_AUTH_USER")
    voice_auth_password: str | None = Field(
        default=None, repr=False, validation_alias="ACKLINE_VOICE_AUTH_PASSWORD"
    )
    voice_ring_timeout: float = Field(default=30.0, validation_alias="ACKLINE_VOICE_RING_TIMEOUT")
    # an answered alert call ends after this
    voice_max_call: float = Field(default=300.0, gt=0, validation_alias="ACKLINE_VOICE_MAX_CALL")
    # answering-machine detection before the ack prompt
    voice_amd: bool = Field(default=False, validation_alias="ACKLINE_VOICE_AMD")
    # left after the beep; None: hang up
    voice_machine_message: str | None = Field(
        default=None, validation_alias="ACKLINE_VOICE_MACHINE_MESSAGE"
    )
    twilio_account_sid: str | None = Field(default=None, validation_alias="TWILIO_ACCOUNT_SID")
    twilio_from_numbers: Annotated[tuple[str, ...], NoDecode] = Field(
        default=(), validation_alias="TWILIO_FROM_NUMBERS"
    )
    # None: Twilio itself
    twilio_api_base: str | None = Field(default=None, validation_alias="TWILIO_API_BASE")
    telegram_bot_token: str | None = Field(
        default=None, repr=False, validation_alias="TELEGRAM_BOT_TOKEN"
    )
    # None: the public Bot API
    telegram_api_base: str | None = Field(default=None, validation_alias="TELEGRAM_API_BASE")
    slack_bot_token: str | None = Field(
        default=None, repr=False, validation_alias="SLACK_BOT_TOKEN"
    )
    # verifies interactions
    slack_signing_secret: str | None = Field(
        default=None, repr=False, validation_alias="SLACK_SIGNING_SECRET"
    )
    # None: slack.com's Web API
    slack_api_base: str | None = Field(default=None, validation_alias="SLACK_API_BASE")
    smtp_host: str | None = Field(default=None, validation_alias="ACKLINE_SMTP_HOST")
    smtp_port: int = Field(default=25, validation_alias="ACKLINE_SMTP_PORT")
    smtp_from: str | None = Field(default=None, validation_alias="ACKLINE_SMTP_FROM")
    webhook_secret: str | None = Field(
        default=None, repr=False, validation_alias="ACKLINE_WEBHOOK_SECRET"
    )
    # Signs web console session cookies; None: a random one kept in var/session-secret.
    # Several API processes behind one name must share it.
    session_secret: str | None = Field(
        default=None, repr=False, validation_alias="ACKLINE_SESSION_SECRET"
    )
    # seconds without a request
    console_idle_timeout: float = Field(
        default=8 * 3600.0, gt=0, validation_alias="ACKLINE_CONSOLE_IDLE_TIMEOUT"
    )
    # The public status page (api/web/status.py): whose incidents it shows (None: the
    # company of ackline.yaml, else the first API key's), how often component states are
    # sampled, and whether outages open and resolve incidents by themselves.
    status_operator: str | None = Field(default=None, validation_alias="ACKLINE_STATUS_OPERATOR")
    status_sample_interval: float = Field(
        default=60.0, gt=0, validation_alias="ACKLINE_STATUS_SAMPLE_INTERVAL"
    )
    status_auto_incidents: bool = Field(
        default=False, validation_alias="ACKLINE_STATUS_AUTO_INCIDENTS"
    )

    @property
    def run_embedded_worker(self) -> bool:
        return self.embedded_worker if self.embedded_worker is not None else not self.redis_url

    @field_validator(*TEXT_PARSERS, mode="before")
    @classmethod
    def _from_text(cls, value: Any, info: ValidationInfo) -> Any:
        """A variable's text goes through its field's parser (its errors name the variable);
        values given in code are taken as they are."""
        if not isinstance(value, str):
            return value
        assert info.field_name is not None
        return TEXT_PARSERS[info.field_name](value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only what the constructor is given: the environment is read by `from_env`,
        from the mapping it is handed, so tests never pick up the machine's variables."""
        return (init_settings,)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """The settings of `env` (default: the process environment), with NAME_FILE
        secrets read in, REDIS_SENTINELS turned into a URL and ./ackline.yaml as the
        configuration when ACKLINE_CONFIG is unset. Raises ValueError naming the variable."""
        values = with_file_secrets(os.environ if env is None else env)
        source = EnvSettingsSource(cls, case_sensitive=False, env_ignore_empty=True)
        source.env_vars = parse_env_vars(values, False, True, None)
        found: dict[str, Any] = source()
        found["redis_url"] = redis_url_from_env(values)
        if "ACKLINE_CONFIG" not in found and Path("ackline.yaml").exists():
            found["ACKLINE_CONFIG"] = "ackline.yaml"
        return cls(**found)
