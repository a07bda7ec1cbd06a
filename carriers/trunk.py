"""Carrier trunks: where outbound calls leave, and how each carrier wants numbers written.

A ``Trunk`` is configuration only (no state): health, budgets and statistics live in the
router so one trunk definition can be reloaded without losing them.
"""

from __future__ import annotations

import contextlib
import enum
import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from common.durations import parse_duration
from gateway.media.srtp import SrtpMode, SrtpPolicy
from gateway.sip.auth import Credentials
from gateway.sip.keepalive import DEFAULT_PONG_TIMEOUT, KeepAliveSettings
from gateway.sip.session_timer import (
    DEFAULT_SESSION_EXPIRES,
    MIN_SE_FLOOR,
    SessionTimerSettings,
)
from gateway.tls import DEFAULT_SIPS_PORT, TlsClientSettings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")
_CALLER_ID = re.compile(r"^\+?[A-Za-z0-9._-]{1,32}$")
_TECH_PREFIX = re.compile(r"^[0-9*#]{1,16}$")
_ACCOUNT_SID = re.compile(r"^AC[0-9a-f]{32}$")
_SIP_USER = re.compile(r"^[A-Za-z0-9+._~-]{1,64}$")  # unreserved: no escaping in a URI


def check_countries(codes: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """Validate ISO 3166 alpha-2 codes against the regions phonenumbers knows."""
    bad = [code for code in codes if code not in phonenumbers.SUPPORTED_REGIONS]
    if bad:
        raise ValueError(f"unknown ISO 3166 alpha-2 country code(s): {', '.join(bad)}")
    return tuple(codes)


def _country_list(value: object) -> object:
    """Codes as YAML lists them, in any case; a bare string is a mistake, not a list."""
    if isinstance(value, str):
        raise ValueError("allowed_countries is a list of ISO 3166 alpha-2 codes")
    if isinstance(value, list | tuple):
        return tuple(str(code).strip().upper() for code in value)
    return value


# An allowed_countries list, per trunk and deployment-wide: upper-cased, each code known.
CountryCodes = Annotated[
    tuple[str, ...], BeforeValidator(_country_list), AfterValidator(check_countries)
]


class NumberFormat(str, enum.Enum):
    """How the carrier expects the dialled number in the request URI's user part."""

    E164 = "e164"  # +14155550101
    NATIONAL = "national"  # 4155550101 (the national number with the national prefix)
    TECH_PREFIX = "tech_prefix"  # <prefix>14155550101: carriers that route on a prefix


def _check_host(value: str) -> str:
    """A hostname or an IP address (no port); IPv6 without brackets."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(value.strip("[]")))
    if not _HOST.match(value):
        raise ValueError(f"invalid host {value!r} (a hostname or IP address, no port)")
    return value


def _register_flag(value: object) -> object:
    """``register: true`` is the registration with every default; false is none."""
    if value is True:
        return {}
    if value is False:
        return None
    return value


class RegisterSettings(BaseModel):
    """``register:`` of a SIP trunk: keep a binding at the carrier's registrar, which then
    sends the trunk's inbound calls to us. Omitted keys come from the trunk."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    username: str | None = None  # default: the trunk's username
    password: SecretStr | None = None  # password_env; default: the trunk's password
    registrar: str | None = None  # host or host:port; default: the trunk's host and port
    expires: int = Field(default=3600, ge=1, le=2**31 - 1)  # seconds asked for
    contact_user: str | None = None  # user part of our Contact; default: the username
    # TCP/TLS: seconds between RFC 5626 CRLF keep-alive pings on the registered connection
    # (each drawn from 80-100 % of it); 0 turns them off. No pong within keepalive_timeout
    # and the connection is dropped and a new one registered.
    keepalive: float = Field(default=30.0, ge=0, le=3600)
    keepalive_timeout: float = Field(default=DEFAULT_PONG_TIMEOUT, gt=0, le=60)

    def keepalive_settings(self, transport: str) -> KeepAliveSettings | None:
        """The keep-alive of a registration over ``transport``; None over UDP or when off."""
        if transport == "udp" or self.keepalive == 0:
            return None
        return KeepAliveSettings(interval=self.keepalive, pong_timeout=self.keepalive_timeout)

    @field_validator("username", "contact_user")
    @classmethod
    def _check_user(cls, value: str | None) -> str | None:
        if value is not None and not _SIP_USER.match(value):
            raise ValueError(f"invalid SIP user {value!r} (1-64 of A-Z a-z 0-9 + . _ ~ -)")
        return value

    @field_validator("registrar")
    @classmethod
    def _check_registrar(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host, port = split_hostport(value)
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(value: str, default_port: int = 5060) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]:port`` -> (host, port), validated."""
    text = value.strip()
    host, port_text = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    port = default_port
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise ValueError(f"invalid port in {value!r}")
        port = int(port_text)
    return _check_host(host), port


class TlsSettings(BaseModel):
    """``tls:`` of a trunk with ``transport: tls``: whom to trust and who we are.

    Verification is on by default; ``verify: false`` accepts any certificate (and so gives
    SRTP keys to whoever answers the connection), for a lab only."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = None  # PEM CA bundle; default: the system's CAs
    verify: bool = True
    client_cert: Path | None = None  # PEM certificate (chain) for mutual TLS
    client_key: Path | None = None  # default: the key is in client_cert
    server_name: str | None = None  # name checked against the certificate; default: host

    @model_validator(mode="after")
    def _check(self) -> TlsSettings:
        self.client().check_files()
        return self

    def client(self) -> TlsClientSettings:
        return TlsClientSettings(
            ca_file=self.ca_file,
            verify=self.verify,
            client_cert=self.client_cert,
            client_key=self.client_key,
            server_name=self.server_name,
        )


class Trunk(BaseModel):
    """One carrier trunk. Unknown keys are errors so typos in YAML do not pass silently."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    kind: Literal["sip", "twilio"] = "sip"
    host: str | None = None  # sip: the carrier's SIP server (required)
    port: int = Field(default=5060, ge=1, le=65535)  # 5061 with transport: tls
    transport: Literal["udp", "tcp", "tls"] = "udp"
    tls: TlsSettings | None = None  # transport: tls only; default: verify with system CAs
    # required | optional | off (SDES, RFC 4568)
    srtp: Annotated[SrtpMode, BeforeValidator(SrtpMode.from_yaml)] = SrtpMode.OFF
    # SDES keys travel inside the SIP message: without TLS anyone on the path reads them
    srtp_without_tls: bool = False
    username: str | None = None
    password: SecretStr | None = None
    caller_id: str | None = None
    number_format: NumberFormat = NumberFormat.E164
    tech_prefix: str | None = None
    allowed_countries: CountryCodes = ()  # empty: only the deployment-wide list applies
    max_concurrent: int | None = Field(default=None, ge=1)
    max_cps: float | None = Field(default=None, gt=0)
    enabled: bool = True
    priority: int = 100  # lower goes first
    weight: int = Field(default=1, ge=1, le=10_000)
    trying_timeout: float = Field(default=2.0, gt=0, le=60)  # seconds to wait for any response
    # RFC 4028 session timer: the interval our INVITEs ask for (refreshed at half of it
    # when the carrier makes us the refresher) and the smallest we accept; 90 s at least.
    session_expires: int = Field(default=DEFAULT_SESSION_EXPIRES, ge=MIN_SE_FLOOR, le=86400)
    min_se: int = Field(default=MIN_SE_FLOOR, ge=MIN_SE_FLOOR, le=86400)
    # twilio: calls through the REST API of this account; caller_id is the From number
    account_sid: str | None = None
    auth_token: SecretStr | None = None
    api_base: str | None = None  # another API endpoint (a regional edge, a proxy, a test fake)
    # sip: register with the carrier (calls to us arrive on the registered contact);
    # ``register:`` in YAML (a field of that name would shadow ABCMeta.register)
    registration: Annotated[RegisterSettings | None, BeforeValidator(_register_flag)] = Field(
        default=None, alias="register"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_port(cls, data: Any) -> Any:
        """SIP over TLS listens on 5061 (RFC 3261 26.2.2) unless the trunk says otherwise."""
        if isinstance(data, dict) and data.get("transport") == "tls" and "port" not in data:
            return {**data, "port": DEFAULT_SIPS_PORT}
        return data

    @field_validator("name")
    @classmethod
    def _check_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("trunk names are 1-64 of A-Z a-z 0-9 _ . - (used in metrics labels)")
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        return None if value is None else _check_host(value)

    @field_validator("trying_timeout", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("caller_id")
    @classmethod
    def _check_caller_id(cls, value: str | None) -> str | None:
        if value is not None and not _CALLER_ID.match(value):
            raise ValueError(f"invalid caller_id {value!r} (e.g. +14155550100)")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Trunk:
        if self.number_format is NumberFormat.TECH_PREFIX:
            if self.tech_prefix is None or not _TECH_PREFIX.match(self.tech_prefix):
                raise ValueError("number_format tech_prefix needs tech_prefix: 1-16 of 0-9 * #")
        elif self.tech_prefix is not None:
            raise ValueError("tech_prefix is only used with number_format: tech_prefix")
        if (self.username is None) != (self.password is None):
            raise ValueError("digest authentication needs both username and password")
        if self.session_expires < self.min_se:
            raise ValueError("session_expires must not be below min_se")
        if self.kind == "sip":
            self._check_sip()
        else:
            self._check_twilio()
        return self

    def _check_sip(self) -> None:
        if self.host is None:
            raise ValueError("a sip trunk needs host (the carrier's SIP server)")
        twilio_only = [
            k for k in ("account_sid", "auth_token", "api_base") if getattr(self, k) is not None
        ]
        if twilio_only:
            raise ValueError(f"{', '.join(twilio_only)}: twilio trunks only")
        if self.registration is not None and self.registration_user() is None:
            raise ValueError("register needs a username (register.username or the trunk's)")
        if self.tls is not None and self.transport != "tls":
            raise ValueError("tls: settings need transport: tls")
        self.srtp_policy().check(self.transport)

    def _check_twilio(self) -> None:
        if self.account_sid is None or not _ACCOUNT_SID.match(self.account_sid):
            raise ValueError("a twilio trunk needs account_sid (AC followed by 32 hex digits)")
        if self.auth_token is None or not self.auth_token.get_secret_value():
            raise ValueError("a twilio trunk needs auth_token")
        if self.caller_id is None or not self.caller_id.startswith("+"):
            raise ValueError("a twilio trunk needs caller_id: one of the account's numbers, E.164")
        sip_keys = {"host": self.host, "username": self.username, "register": self.registration}
        sip_only = [k for k, v in sip_keys.items() if v is not None]
        if sip_only or self.number_format is not NumberFormat.E164:
            raise ValueError(
                f"{', '.join(sip_only or ['number_format'])}: sip trunks only "
                "(Twilio takes E.164 numbers over its REST API)"
            )
        if self.api_base is not None and not re.match(r"^https?://[^/\s]+/?$", self.api_base):
            raise ValueError(f"invalid api_base {self.api_base!r} (e.g. https://host:port)")

    # -- derived -----------------------------------------------------------------------

    def allows_country(self, region: str) -> bool:
        return not self.allowed_countries or region in self.allowed_countries

    def tls_client(self) -> TlsClientSettings | None:
        """How to verify this trunk over TLS (None: not a TLS trunk)."""
        if self.transport != "tls":
            return None
        return self.tls.client() if self.tls is not None else TlsClientSettings()

    def session_timer(self) -> SessionTimerSettings:
        """What calls through this trunk ask for (Session-Expires, Min-SE)."""
        return SessionTimerSettings(self.session_expires, self.min_se)

    def srtp_policy(self) -> SrtpPolicy:
        return SrtpPolicy(self.srtp, allow_cleartext_keys=self.srtp_without_tls)

    def credentials(self) -> Credentials | None:
        if self.username is None or self.password is None:
            return None
        return Credentials(self.username, self.password.get_secret_value())

    def registration_user(self) -> str | None:
        """As whom ``register:`` registers (its username, else the trunk's)."""
        if self.registration is None:
            return None
        return self.registration.username or self.username

    def registration_credentials(self) -> Credentials | None:
        """The digest login of the registration: its own password, else the trunk's."""
        user = self.registration_user()
        register = self.registration
        if user is None or register is None:
            return None
        password = register.password or self.password
        return Credentials(user, password.get_secret_value()) if password is not None else None

    def registrar(self) -> tuple[str, int]:
        """Where REGISTERs go: ``register.registrar``, else the trunk's host and port."""
        if self.registration is not None and self.registration.registrar is not None:
            return split_hostport(self.registration.registrar)
        if self.host is None:
            raise ValueError(f"trunk {self.name} is a {self.kind} trunk: it has no SIP address")
        return self.host, self.port

    def registrar_uri(self) -> str:
        """The REGISTER Request-URI: the registrar's domain (no user part)."""
        host, port = self.registrar()
        if ":" in host:
            host = f"[{host}]"
        return f"sip:{host}:{port}{self._transport_param()}"

    def dial_string(self, number: phonenumbers.PhoneNumber | str) -> str:
        """The user part this carrier expects for ``number`` (E.164 string or parsed)."""
        parsed = phonenumbers.parse(number) if isinstance(number, str) else number
        e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
        if self.number_format is NumberFormat.E164:
            return e164
        if self.number_format is NumberFormat.NATIONAL:
            national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
            return re.sub(r"[^0-9]", "", national)
        assert self.tech_prefix is not None
        return self.tech_prefix + e164.lstrip("+")

    def request_uri(self, number: phonenumbers.PhoneNumber | str) -> str:
        """The SIP request URI for ``number`` through this trunk."""
        user = quote(self.dial_string(number), safe="+*")  # '#' must be escaped (RFC 3261 §25)
        return f"sip:{user}@{self._hostport()}{self._transport_param()}"

    def probe_uri(self) -> str:
        """Where OPTIONS health probes go: the trunk itself, no user part."""
        return f"sip:{self._hostport()}{self._transport_param()}"

    def _hostport(self) -> str:
        host = self.host
        if host is None:
            raise ValueError(f"trunk {self.name} is a {self.kind} trunk: it has no SIP address")
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def _transport_param(self) -> str:
        return "" if self.transport == "udp" else f";transport={self.transport}"
