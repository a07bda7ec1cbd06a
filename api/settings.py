"""Runtime settings, read from the environment (12-factor) with embedded defaults.

With nothing set, ackline runs on SQLite under ./var with the worker inside the API
process; setting REDIS_URL (and a PostgreSQL ACKLINE_DATABASE_URL) lets API and workers
run as separate processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel, Field

from gateway.media.srtp import SrtpMode


def _bool(value: str | None, default: bool) -> bool:
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


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


def parse_srtp_mode(value: str) -> SrtpMode:
    """``ACKLINE_SIP_SRTP``: required, optional or off (a typo must not turn SRTP off)."""
    try:
        return SrtpMode(value.strip().lower())
    except ValueError:
        choices = ", ".join(m.value for m in SrtpMode)
        raise ValueError(f"ACKLINE_SIP_SRTP must be one of {choices}, not {value!r}") from None


DEFAULT_INBOUND_SRTP = SrtpMode.OPTIONAL


def inbound_srtp(cli: SrtpMode | None, env: SrtpMode | None, yaml: SrtpMode | None) -> SrtpMode:
    """The inbound SRTP policy of `ackline serve`: ``--srtp``, else ``ACKLINE_SIP_SRTP``,
    else ``inbound_srtp`` in ackline.yaml, else optional. One rule, so a deployment that
    sets it in the file can still override it for one process."""
    for chosen in (cli, env, yaml):
        if chosen is not None:
            return chosen
    return DEFAULT_INBOUND_SRTP


class Settings(BaseModel):
    database_url: str = "sqlite:///var/ackline.db"
    redis_url: str | None = None
    redis_prefix: str = "ackline"
    config_path: Path | None = None  # ackline.yaml; loaded into the database at start
    api_keys: dict[str, str] = Field(default_factory=dict)  # API key -> company (tenant)
    audit_dir: Path = Path("var/audit")
    audit_fsync: bool = False
    public_url: str | None = None  # how Twilio/Telegram/email links reach us
    ack_secret: str | None = Field(default=None, repr=False)  # signs one-click ack links
    twilio_auth_token: str | None = Field(default=None, repr=False)  # validates X-Twilio-Signature
    telegram_secret: str | None = Field(
        default=None, repr=False
    )  # expected X-Telegram-Bot-Api-Secret-Token
    embedded_worker: bool | None = None  # None: run the worker in-process unless Redis is set
    lease_seconds: float = 30.0
    poll_interval: float = 1.0
    # SIGTERM: the process stops taking work, lets deliveries in flight end, hands the
    # rest back to other workers and exits within this many seconds.
    drain_timeout: float = Field(default=10.0, gt=0)
    # SIGTERM: before it stops, the API answers /readyz 503 for this many seconds while it
    # still serves, so a load balancer takes it out of rotation first (0: stop at once).
    unready_grace: float = Field(default=0.0, ge=0, le=60)
    migrate_on_start: bool = True
    # Channels: each is built only when its settings are present (api/channels.py).
    sip_host: str = "127.0.0.1"  # the gateway's SIP address (listen and advertise)
    rtp_ports: tuple[int, int] = (20000, 30000)  # ACKLINE_RTP_PORTS, see parse_rtp_ports
    sip_port: int = 5060
    sip_t1: float = Field(default=0.5, gt=0, le=4)  # RFC 3261 T1: every SIP timer scales with it
    sip_max_call: float = Field(default=3600.0, gt=0)  # any call, inbound ones included, ends by
    sip_max_inbound_calls: int = Field(default=500, ge=1)  # at once; more get 503
    # RFC 4028 session timer of calls without a trunk's own (inbound ones): the interval
    # asked for and the smallest accepted (422 below it); 90 s at least.
    sip_session_expires: int = Field(default=1800, ge=90, le=86400)
    sip_min_se: int = Field(default=90, ge=90, le=86400)
    # SDES SRTP of inbound (hotline) calls: offered and accepted over TLS only, as SDES keys
    # travel inside the SIP message; ``required`` refuses plain RTP (and any call not
    # arriving over TLS) with 488, ``off`` refuses SRTP offers. None: not set here (see
    # `inbound_srtp` for what wins).
    sip_srtp: SrtpMode | None = None
    voice_target: str | None = None  # e.g. sip:{number}@127.0.0.1:5090
    voice_auth_user: str | None = None
    voice_auth_password: str | None = Field(default=None, repr=False)
    voice_ring_timeout: float = 30.0
    voice_max_call: float = Field(default=300.0, gt=0)  # an answered alert call ends after this
    voice_amd: bool = False  # answering-machine detection before the ack prompt
    voice_machine_message: str | None = None  # left after the beep; None: hang up
    twilio_account_sid: str | None = None
    twilio_from_numbers: tuple[str, ...] = ()
    twilio_api_base: str | None = None  # None: Twilio itself
    telegram_bot_token: str | None = Field(default=None, repr=False)
    telegram_api_base: str | None = None  # None: the public Bot API
    slack_bot_token: str | None = Field(default=None, repr=False)
    slack_signing_secret: str | None = Field(default=None, repr=False)  # verifies interactions
    slack_api_base: str | None = None  # None: slack.com's Web API
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str | None = None
    webhook_secret: str | None = Field(default=None, repr=False)
    # Signs web console session cookies; None: a random one kept in var/session-secret.
    # Several API processes behind one name must share it.
    session_secret: str | None = Field(default=None, repr=False)
    console_idle_timeout: float = Field(default=8 * 3600.0, gt=0)  # seconds without a request
    # The public status page (api/web/status.py): whose incidents it shows (None: the
    # company of ackline.yaml, else the first API key's), how often component states are
    # sampled, and whether outages open and resolve incidents by themselves.
    status_operator: str | None = None
    status_sample_interval: float = Field(default=60.0, gt=0)
    status_auto_incidents: bool = False

    @property
    def run_embedded_worker(self) -> bool:
        return self.embedded_worker if self.embedded_worker is not None else not self.redis_url

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        e = with_file_secrets(os.environ if env is None else env)
        config = e.get("ACKLINE_CONFIG") or (
            "ackline.yaml" if Path("ackline.yaml").exists() else ""
        )
        worker = e.get("ACKLINE_EMBEDDED_WORKER")
        return cls(
            database_url=e.get("ACKLINE_DATABASE_URL")
            or e.get("DATABASE_URL")
            or cls().database_url,
            redis_url=redis_url_from_env(e),
            redis_prefix=e.get("ACKLINE_REDIS_PREFIX", "ackline"),
            config_path=Path(config) if config else None,
            api_keys=parse_api_keys(e.get("ACKLINE_API_KEYS", "")),
            audit_dir=Path(e.get("ACKLINE_AUDIT_DIR", "var/audit")),
            audit_fsync=_bool(e.get("ACKLINE_AUDIT_FSYNC"), False),
            public_url=e.get("ACKLINE_PUBLIC_URL") or None,
            ack_secret=e.get("ACKLINE_ACK_SECRET") or None,
            twilio_auth_token=e.get("TWILIO_AUTH_TOKEN") or None,
            telegram_secret=e.get("TELEGRAM_WEBHOOK_SECRET") or None,
            embedded_worker=None if worker in (None, "") else _bool(worker, True),
            lease_seconds=float(e.get("ACKLINE_LEASE_SECONDS", "30")),
            poll_interval=float(e.get("ACKLINE_POLL_INTERVAL", "1")),
            drain_timeout=float(e.get("ACKLINE_DRAIN_TIMEOUT", "10")),
            unready_grace=float(e.get("ACKLINE_UNREADY_GRACE", "0")),
            migrate_on_start=_bool(e.get("ACKLINE_MIGRATE"), True),
            sip_host=e.get("ACKLINE_SIP_HOST", "127.0.0.1"),
            rtp_ports=parse_rtp_ports(e.get("ACKLINE_RTP_PORTS") or "20000-30000"),
            sip_port=int(e.get("ACKLINE_SIP_PORT", "5060")),
            sip_t1=float(e.get("ACKLINE_SIP_T1", "0.5")),
            sip_max_call=float(e.get("ACKLINE_SIP_MAX_CALL", "3600")),
            sip_max_inbound_calls=int(e.get("ACKLINE_SIP_MAX_INBOUND_CALLS", "500")),
            sip_session_expires=int(e.get("ACKLINE_SIP_SESSION_EXPIRES", "1800")),
            sip_min_se=int(e.get("ACKLINE_SIP_MIN_SE", "90")),
            sip_srtp=parse_srtp_mode(srtp) if (srtp := e.get("ACKLINE_SIP_SRTP")) else None,
            voice_target=e.get("ACKLINE_VOICE_TARGET") or None,
            voice_auth_user=e.get("ACKLINE_VOICE_AUTH_USER") or None,
            voice_auth_password=e.get("ACKLINE_VOICE_AUTH_PASSWORD") or None,
            voice_ring_timeout=float(e.get("ACKLINE_VOICE_RING_TIMEOUT", "30")),
            voice_max_call=float(e.get("ACKLINE_VOICE_MAX_CALL", "300")),
            voice_amd=_bool(e.get("ACKLINE_VOICE_AMD"), False),
            voice_machine_message=e.get("ACKLINE_VOICE_MACHINE_MESSAGE") or None,
            twilio_account_sid=e.get("TWILIO_ACCOUNT_SID") or None,
            twilio_from_numbers=tuple(
                n.strip() for n in e.get("TWILIO_FROM_NUMBERS", "").split(",") if n.strip()
            ),
            twilio_api_base=e.get("TWILIO_API_BASE") or None,
            telegram_bot_token=e.get("TELEGRAM_BOT_TOKEN") or None,
            telegram_api_base=e.get("TELEGRAM_API_BASE") or None,
            slack_bot_token=e.get("SLACK_BOT_TOKEN") or None,
            slack_signing_secret=e.get("SLACK_SIGNING_SECRET") or None,
            slack_api_base=e.get("SLACK_API_BASE") or None,
            smtp_host=e.get("ACKLINE_SMTP_HOST") or None,
            smtp_port=int(e.get("ACKLINE_SMTP_PORT", "25")),
            smtp_from=e.get("ACKLINE_SMTP_FROM") or None,
            webhook_secret=e.get("ACKLINE_WEBHOOK_SECRET") or None,
            session_secret=e.get("ACKLINE_SESSION_SECRET") or None,
            console_idle_timeout=float(e.get("ACKLINE_CONSOLE_IDLE_TIMEOUT", "28800")),
            status_operator=e.get("ACKLINE_STATUS_OPERATOR") or None,
            status_sample_interval=float(e.get("ACKLINE_STATUS_SAMPLE_INTERVAL") or "60"),
            status_auto_incidents=_bool(e.get("ACKLINE_STATUS_AUTO_INCIDENTS"), False),
        )
