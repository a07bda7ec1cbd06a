"""The ``ackline`` command line: place a test call, or run the service (API, worker, gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
import threading
from collections.abc import AsyncIterator, Generator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError

from api.loop import run as run_service
from api.settings import Settings, inbound_srtp
from carriers.config import CarrierConfig
from escalation.config import ConfigError
from escalation.users import Role as UserRole
from gateway.call import (
    Call,
    Gateway,
    GatewayConfig,
    advertised_address,
    parse_target,
    resolve_target,
    target_transport,
)
from gateway.media.srtp import SrtpMode, SrtpPolicy
from gateway.result import CallResult
from gateway.sip.auth import Credentials
from gateway.sip.transaction import TimerSettings
from gateway.tls import DEFAULT_SIPS_PORT, TlsClientSettings, TlsServerSettings
from ivr.flow import FlowError

if TYPE_CHECKING:
    from api.channels import Services
    from api.setup_health import SetupWarning
    from escalation.config import AcklineConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, help="ackline voice gateway")

EXIT_BAD_INPUT = 2
EXIT_UNREACHABLE = 3


class Unreachable(Exception):
    """The target refused the connection or answered with ICMP port unreachable."""


def local_address_for(host: str) -> str:
    """The local address the kernel would use to reach ``host`` (advertised in SIP/SDP)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
        except OSError:
            return "127.0.0.1"
        return str(probe.getsockname()[0])


def check_udp_reachable(host: str, port: int, wait: float = 0.2) -> None:
    """Detect a closed UDP port up front (ICMP port unreachable) instead of after timer B.

    Sends an RFC 5626 CRLF keep-alive on a connected socket; a SIP peer ignores it, while a
    closed port makes the kernel report ECONNREFUSED on the socket.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(wait)
        try:
            sock.connect((host, port))
            sock.send(b"\r\n\r\n")
            sock.recv(2048)
        except ConnectionRefusedError:
            raise Unreachable(f"nothing is listening on udp {host}:{port}") from None
        except (TimeoutError, OSError):
            return


def _prompt_cache(voice: str) -> Any:
    from prompts.cache import PromptCache
    from prompts.espeak import EspeakEngine

    return PromptCache(PromptCache.default_directory(), EspeakEngine(), voice=voice)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def call(
    target: Annotated[
        str,
        typer.Argument(
            help="SIP URI (sip:+15550100@127.0.0.1:5090), or a phone number to route "
            "through the configured carrier trunks"
        ),
    ],
    say: Annotated[str | None, typer.Option(help="text to speak (repeated until digits)")] = None,
    gather: Annotated[int, typer.Option(min=0, max=32, help="digits to collect")] = 0,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for digits")] = 15.0,
    ring_timeout: Annotated[float, typer.Option(min=0.1, help="seconds to ring")] = 30.0,
    auth_user: Annotated[str | None, typer.Option(help="digest username")] = None,
    auth_password: Annotated[str | None, typer.Option(help="digest password")] = None,
    transport: Annotated[
        str | None, typer.Option(help="udp, tcp or tls (default: tls for sips:, else udp)")
    ] = None,
    tls_ca_file: Annotated[
        Path | None,
        typer.Option(help="CA bundle to verify a TLS peer with (default: the system's CAs)"),
    ] = None,
    srtp: Annotated[
        SrtpMode, typer.Option(help="SDES SRTP: required, optional or off (TLS only)")
    ] = SrtpMode.OFF,
    bind: Annotated[
        str | None, typer.Option(help="local address (default: route to target)")
    ] = None,
    voice: Annotated[str, typer.Option(help="espeak-ng voice")] = "en-us",
    route: Annotated[
        str | None, typer.Option(help="carrier route for a phone number (carriers.routes)")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(envvar="ACKLINE_CONFIG", help="ackline.yaml with the carriers: section"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Place one call, speak, collect digits, hang up and report the result."""
    _setup_logging(verbose)
    if not target.strip().lower().startswith(("sip:", "sips:")) and _looks_like_number(target):
        _call_number(target, route, config, say, gather, timeout, ring_timeout, voice, as_json)
        return
    if route is not None:
        typer.echo("error: --route applies to phone numbers, not SIP URIs", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    try:
        uri = parse_target(target)
        kind = target_transport(uri, transport)
        tls = TlsClientSettings(ca_file=tls_ca_file) if kind == "tls" else None
        if tls is not None:
            tls.check_files()
        srtp_policy = SrtpPolicy(srtp)
        srtp_policy.check(kind)
        if (auth_user is None) != (auth_password is None):
            raise ValueError("--auth-user and --auth-password go together")
        settings = Settings.from_env()
    except (ValueError, ValidationError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    credentials = Credentials(auth_user, auth_password) if auth_user and auth_password else None
    try:
        result = asyncio.run(
            _call(
                uri_text=str(uri),
                kind=kind,
                say=say,
                gather=gather,
                timeout=timeout,
                ring_timeout=ring_timeout,
                credentials=credentials,
                bind=bind,
                voice=voice,
                tls=tls,
                srtp=srtp_policy,
                settings=settings,
            )
        )
    except Unreachable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    _print_result(result, as_json)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
        return
    line = (
        f"{result['outcome']} ({result['sip_code']} {result['reason']}) "
        f"pdd={result['pdd_ms']}ms duration={result['duration_ms']}ms "
        f"digits={result['digits'] or '-'} via {result['dtmf_method'] or '-'}"
    )
    if "trunks_tried" in result:
        tried = ", ".join(
            f"{a['trunk']}={a['sip_code'] or a['outcome']}" for a in result["trunks_tried"]
        )
        line += f" trunk={result['trunk'] or '-'} tried: {tried or '-'}"
    if result.get("redirected_to"):
        line += f" redirected: {' -> '.join(result['redirected_to'])}"
    typer.echo(line)


def _looks_like_number(target: str) -> bool:
    digits = [c for c in target if c.isdigit()]
    return len(digits) >= 3 and all(c.isdigit() or c in "+-(). " for c in target.strip())


def _carriers_config(path: Path | None) -> CarrierConfig:
    from escalation.config import load_config

    source = path or (Path("ackline.yaml") if Path("ackline.yaml").exists() else None)
    if source is None:
        raise ValueError(
            "a phone number needs carrier trunks: set ACKLINE_CONFIG or pass --config "
            "(an ackline.yaml with a carriers: section)"
        )
    loaded = load_config(source).carriers
    if loaded is None:
        raise ValueError(f"{source} has no carriers: section")
    return loaded


def _call_number(
    number: str,
    route: str | None,
    config_path: Path | None,
    say: str | None,
    gather: int,
    timeout: float,
    ring_timeout: float,
    voice: str,
    as_json: bool,
) -> None:
    """A phone number goes out through the trunks; the result names the trunks tried."""
    from carriers.numbers import FraudRefused, InvalidNumber
    from carriers.router import NoRouteAvailable

    try:
        carriers = _carriers_config(config_path)
        settings = Settings.from_env()
    except (ValueError, ValidationError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        result = asyncio.run(
            _route_call(
                carriers, settings, number, route, say, gather, timeout, ring_timeout, voice
            )
        )
    except (InvalidNumber, FraudRefused) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except NoRouteAvailable as exc:
        typer.echo(f"error: {exc}", err=True)
        if as_json:
            tried = [_attempt_dict(a) for a in exc.attempts]
            typer.echo(json.dumps({"outcome": "failed", "reason": str(exc), "trunk": None,
                                   "trunks_tried": tried}, sort_keys=True))  # fmt: skip
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except ValueError as exc:  # e.g. an unknown route
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    _print_result(result, as_json)


def _attempt_dict(attempt: Any) -> dict[str, Any]:
    return {
        "trunk": attempt.trunk,
        "outcome": attempt.outcome.value,
        "sip_code": attempt.sip_code,
        "reason": attempt.reason,
        "elapsed_ms": attempt.elapsed_ms,
    }


@contextlib.asynccontextmanager
async def _shared_trunk_state(settings: Settings) -> AsyncIterator[tuple[dict[str, Any], Any]]:
    """What the workers go by besides ackline.yaml: the operators' trunk overrides (the
    database) and the round-robin turns (Redis, else the database): (overrides, turns).

    Unreadable overrides are a warning, not a failed test call: the YAML trunks are used."""
    from carriers.store import TrunkStore
    from carriers.turns import turns_for
    from storage.db import Database

    _make_sqlite_dir(settings)
    db = Database(settings.database_url)
    try:
        try:
            if settings.migrate_on_start:
                await db.migrate()
            overrides: dict[str, Any] = await TrunkStore(db).overrides()
        except Exception as exc:  # a database away: say so, call with the YAML trunks
            typer.echo(
                f"warning: trunk overrides unavailable ({exc!r}); "
                "calling with the trunks of the configuration as they are",
                err=True,
            )
            logging.getLogger(__name__).debug("reading trunk overrides failed", exc_info=True)
            overrides = {}
        yield overrides, turns_for(settings.redis_url, settings.redis_prefix, db)
    finally:
        await db.dispose()


def _freeze_startup_heap() -> None:
    """Move what start-up built (modules, configuration, rendered prompts) out of the
    collector's sight: a full collection then walks only what calls and alerts allocate
    since, and so stalls the event loop for less (bench.calls --gc-freeze)."""
    gc.collect()
    gc.freeze()


def _cli_gateway_config(settings: Settings, **kwargs: Any) -> GatewayConfig:
    """The gateway of one CLI call: SIP timers and the session timer of dials without a
    trunk's own (ACKLINE_SIP_T1, ACKLINE_SIP_SESSION_EXPIRES, ACKLINE_SIP_MIN_SE) as
    ``serve`` has them."""
    return GatewayConfig(
        timers=TimerSettings(t1=settings.sip_t1),
        session_expires=settings.sip_session_expires,
        min_se=settings.sip_min_se,
        **kwargs,
    )


async def _route_call(
    carriers: CarrierConfig,
    settings: Settings,
    number: str,
    route: str | None,
    say: str | None,
    gather: int,
    timeout: float,
    ring_timeout: float,
    voice: str,
) -> dict[str, Any]:
    hosts = {t.host for t in carriers.trunks if t.host is not None}
    host = local_address_for(sorted(hosts)[0]) if hosts else "127.0.0.1"
    prompts = _prompt_cache(voice) if say else None
    if prompts is not None:
        await prompts.render(say)
    from carriers.budgets import RedisBudgets
    from carriers.store import apply_overrides

    gateway_config = _cli_gateway_config(settings, host=host, udp_port=0, tcp_port=0)
    # With Redis, trunk budgets (max_concurrent, max_cps) and per-number call budgets are
    # shared by every process: a call from the CLI counts against them as a worker's does.
    budgets = (
        RedisBudgets(settings.redis_url, settings.redis_prefix) if settings.redis_url else None
    )
    async with (
        _shared_trunk_state(settings) as (overrides, turns),
        Gateway(gateway_config, prompts=prompts) as gw,
    ):
        try:
            router = carriers.router(gw, route=route, turns=turns, budgets=budgets)
        except ValueError:  # an unknown route: no router to close the budgets' connection
            if budgets is not None:
                await budgets.close()
            raise
        router.update_trunks(apply_overrides(router.trunks, overrides))  # as the workers do
        try:
            # the prompt and keys go over our own RTP: SIP trunks only
            routed = await router.place_call(number, ring_timeout=ring_timeout, needs_media=True)
            if isinstance(routed.call, Call) and routed.call.answered:
                await _converse(routed.call, say=say, gather=gather, timeout=timeout)
            result = (await routed.call.hangup()).to_dict()
        finally:
            await router.close(grace=1.0)
    result["trunk"] = routed.trunk
    result["trunks_tried"] = [_attempt_dict(a) for a in routed.attempts]
    result["destination"] = number
    return result


async def _call(
    *,
    uri_text: str,
    kind: str,
    say: str | None,
    gather: int,
    timeout: float,
    ring_timeout: float,
    credentials: Credentials | None,
    bind: str | None,
    voice: str,
    tls: TlsClientSettings | None = None,
    srtp: SrtpPolicy | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    uri = parse_target(uri_text)
    peer = await resolve_target(uri, kind)
    if kind == "udp":
        await asyncio.to_thread(check_udp_reachable, peer.host, peer.port)
    host = bind or local_address_for(peer.host)
    config = _cli_gateway_config(
        settings or Settings(),
        host=host,
        udp_port=0 if kind == "udp" else None,
        tcp_port=0 if kind == "tcp" else None,
    )
    prompts = _prompt_cache(voice) if say else None
    if prompts is not None:
        await prompts.render(say)  # synthesize before dialing: no dead air after answer
    async with Gateway(config, prompts=prompts) as gateway:
        active = await gateway.dial(
            uri,
            credentials=credentials,
            ring_timeout=ring_timeout,
            transport=kind,
            tls=tls,
            srtp=srtp,
        )
        if active.result is not None and active.result.reason.startswith("transport error"):
            raise Unreachable(f"cannot reach {uri_text} over {kind}: {active.result.reason}")
        if active.answered:
            await _converse(active, say=say, gather=gather, timeout=timeout)
        result = await active.hangup()
    return result.to_dict()


async def _converse(active: Call, *, say: str | None, gather: int, timeout: float) -> None:
    with contextlib.suppress(Exception):
        if say and gather:
            await active.gather(say, max_digits=gather, timeout=timeout)
        elif say:
            await active.play(say)
        elif gather:
            await active.collect(gather, timeout)


class Role(enum.StrEnum):
    ALL = "all"  # API + worker + gateway in one process (the embedded default)
    API = "api"  # HTTP API only; workers run elsewhere (PostgreSQL + Redis)
    WORKER = "worker"  # claims and delivers notifications; places calls with its own gateway
    GATEWAY = "gateway"  # answers inbound calls only


@app.command()
def serve(
    role: Annotated[Role, typer.Option(help="what this process runs")] = Role.ALL,
    host: Annotated[
        str, typer.Option(envvar="ACKLINE_SIP_HOST", help="address SIP and RTP bind to")
    ] = "127.0.0.1",
    advertise: Annotated[
        str | None,
        typer.Option(
            envvar="ACKLINE_SIP_ADVERTISE",
            help="address peers are told in Via, Contact and SDP (default: --host; "
            "required when --host is 0.0.0.0 or ::)",
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            envvar="ACKLINE_SIP_PORT",
            help="SIP port, UDP and TCP (default 5060; a worker alone picks a free one)",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="ACKLINE_SIP_TLS_CERT",
            help="PEM certificate (chain) to listen for SIP over TLS with",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="ACKLINE_SIP_TLS_KEY", help="its PEM key (default: in --tls-cert)"),
    ] = None,
    tls_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            envvar="ACKLINE_SIP_TLS_PORT",
            help="SIP over TLS port (with --tls-cert)",
        ),
    ] = DEFAULT_SIPS_PORT,
    srtp: Annotated[
        SrtpMode | None,
        typer.Option(
            help="SDES SRTP of inbound calls: required, optional or off (over TLS only); "
            "wins over ACKLINE_SIP_SRTP, which wins over inbound_srtp in ackline.yaml "
            "(default optional)",
            case_sensitive=False,
        ),
    ] = None,
    http_host: Annotated[str, typer.Option(envvar="ACKLINE_HTTP_HOST")] = "127.0.0.1",
    http_port: Annotated[int, typer.Option(min=1, max=65535, envvar="ACKLINE_HTTP_PORT")] = 8080,
    greeting: Annotated[str, typer.Option(help="text spoken to callers")] = (
        "Welcome to ackline. Press 1 to acknowledge, 2 to escalate."
    ),
    gather: Annotated[int, typer.Option(min=0, max=32, help="digits to collect")] = 1,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds to wait for digits")] = 15.0,
    voice: Annotated[str, typer.Option(help="espeak-ng voice")] = "en-us",
    webphone: Annotated[
        bool, typer.Option(help="serve the browser softphone at /webphone (role all)")
    ] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run ackline: API, escalation worker and SIP gateway, together or one role each.

    Settings come from the environment (see README): ACKLINE_DATABASE_URL, REDIS_URL,
    ACKLINE_CONFIG, ACKLINE_API_KEYS, ACKLINE_VOICE_TARGET and the channel credentials.
    """
    _setup_logging(verbose)
    try:
        settings = Settings.from_env()
    except (ValueError, ValidationError) as exc:
        typer.echo(f"error: bad settings: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if role is not Role.API:
        try:
            advertised_address(host, advertise)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
    try:
        srtp_mode = _inbound_srtp(role, srtp, settings)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if role in (Role.ALL, Role.API) and not settings.api_keys:
        settings = settings.model_copy(update={"api_keys": _local_api_key(settings)})
    sip_port = port if port is not None else (0 if role is Role.WORKER else 5060)
    tls: TlsServerSettings | None = None
    if tls_cert is not None:
        tls = TlsServerSettings(tls_cert, tls_key)
        try:
            tls.check_files()
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
    elif tls_key is not None:
        typer.echo("error: --tls-key needs --tls-cert", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    inbound = Inbound(greeting, gather, timeout)
    try:
        run_service(
            _serve(
                role, settings, host, sip_port, http_host, http_port, inbound, voice, webphone,
                advertise=advertise, tls=tls, tls_port=tls_port, srtp=srtp_mode,
            )
        )  # fmt: skip
    except (ConfigError, FlowError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except OSError as exc:
        typer.echo(f"error: cannot listen: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None


def _inbound_srtp(role: Role, cli: SrtpMode | None, settings: Settings) -> SrtpMode:
    """`inbound_srtp` with the file's value read only when it could matter (a process with
    a gateway, neither --srtp nor ACKLINE_SIP_SRTP given). ConfigError for a bad file."""
    from escalation.config import load_config

    yaml_mode: SrtpMode | None = None
    path = settings.config_path
    if role is not Role.API and cli is None and settings.sip_srtp is None and path is not None:
        yaml_mode = load_config(path).inbound_srtp
    return inbound_srtp(cli, settings.sip_srtp, yaml_mode)


def _local_api_key(settings: Settings) -> dict[str, str]:
    """With no ACKLINE_API_KEYS, make one key for the configured company and keep it in
    var/api-key (mode 0600), so a first `make run` is usable and the key survives restarts."""
    from escalation.config import AcklineConfig, load_config

    config = load_config(settings.config_path) if settings.config_path else AcklineConfig()
    path = settings.audit_dir.parent / "api-key"
    if path.exists():
        key = path.read_text().strip()
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
    print(
        f"no ACKLINE_API_KEYS set: use X-API-Key from {path} (company {config.company!r})",
        file=sys.stderr,
        flush=True,
    )
    return {key: config.company}


@dataclass(frozen=True)
class Inbound:
    """What the gateway does with an inbound call until IVR flows take over."""

    greeting: str
    gather: int
    timeout: float

    async def __call__(self, incoming: Call) -> None:
        if self.gather:
            await incoming.gather(self.greeting, max_digits=self.gather, timeout=self.timeout)
        else:
            await incoming.play(self.greeting)


async def _serve(
    role: Role,
    settings: Settings,
    host: str,
    sip_port: int,
    http_host: str,
    http_port: int,
    inbound: Inbound,
    voice: str,
    webphone: bool = True,
    advertise: str | None = None,
    tls: TlsServerSettings | None = None,
    tls_port: int = DEFAULT_SIPS_PORT,
    srtp: SrtpMode = SrtpMode.OPTIONAL,
) -> None:
    from api.app import create_app, run_worker
    from api.channels import services_for

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if not stop.is_set():
            stop.set()
            _exit_after(settings.unready_grace + settings.drain_timeout + EXIT_GRACE)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    prompts = _prompt_cache(voice)

    def on_call_ended(result: CallResult) -> None:
        print(json.dumps(result.to_dict(), sort_keys=True), flush=True)

    async with contextlib.AsyncExitStack() as stack:
        gateway: Gateway | None = None
        if role is not Role.API:
            # A worker hangs its own calls up while it drains; what the gateway still
            # holds at its stop (inbound calls) gets what is left of the drain timeout.
            calls_left = 1.0 if role is not Role.GATEWAY else settings.drain_timeout - 2.0
            gateway = Gateway(
                GatewayConfig(
                    host=host,
                    advertise=advertise,
                    udp_port=sip_port,
                    tcp_port=sip_port,
                    tls_port=tls_port if tls is not None else None,
                    tls=tls,
                    rtp_ports=settings.rtp_ports,
                    timers=TimerSettings(t1=settings.sip_t1),
                    max_call_duration=settings.sip_max_call,
                    max_inbound_calls=settings.sip_max_inbound_calls,
                    session_expires=settings.sip_session_expires,
                    min_se=settings.sip_min_se,
                    srtp=SrtpPolicy(srtp),
                    drain_timeout=max(1.0, calls_left),
                ),
                prompts=prompts,
                on_call_ended=on_call_ended,
            )
        services = await stack.enter_async_context(services_for(settings, gateway))
        warnings = _say_setup(role, settings, services.config)
        if gateway is not None:
            if role in (Role.ALL, Role.GATEWAY):
                await _answer_with(gateway, services, settings, inbound, prompts, stack)
            await gateway.start()
            stack.push_async_callback(gateway.stop)
            if services.registrations is not None:  # unregistered before the gateway stops
                services.registrations.start()
                stack.push_async_callback(services.registrations.close)
            udp = gateway.address("udp")
            if tls is not None:
                secure = gateway.address("tls")
                print(f"sip listening on {secure[0]}:{secure[1]} (tls)", file=sys.stderr,
                      flush=True)  # fmt: skip
            print(f"sip listening on {udp[0]}:{udp[1]} (udp, tcp), advertised as "
                  f"{gateway.config.advertised_host}, rtp {'-'.join(map(str, settings.rtp_ports))}",
                  file=sys.stderr, flush=True)  # fmt: skip
        _freeze_startup_heap()
        if role is Role.GATEWAY:
            await stop.wait()
            return
        if role is Role.WORKER:
            await run_worker(settings, services.channels, stop=stop)
            return
        embedded = settings.model_copy(update={"embedded_worker": role is Role.ALL})
        api = create_app(embedded, services.channels)
        api.state.setup_warnings = warnings  # GET /v1/setup/health
        api.state.carriers_router = services.router  # live trunk health for /v1/carriers
        api.state.twilio_events = services.twilio_events  # Twilio call webhooks -> calls
        if webphone and gateway is not None:
            from api.webphone import Webphone

            api.state.webphone = Webphone(gateway)
            stack.push_async_callback(api.state.webphone.close)
        server = _SignalFreeServer(
            uvicorn.Config(
                api, host=http_host, port=http_port, log_level="warning", lifespan="on",
                # open keep-alive connections must not hold the drain up
                timeout_graceful_shutdown=1,
            )
        )  # fmt: skip
        served = asyncio.create_task(server.serve())
        stopped = asyncio.create_task(stop.wait())
        print(f"api listening on http://{http_host}:{http_port}", file=sys.stderr, flush=True)
        await asyncio.wait({served, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set() and not served.done() and settings.unready_grace > 0:
            api.state.draining = True  # /readyz 503: the load balancer moves on
            print(f"api unready; stopping in {settings.unready_grace:g}s", file=sys.stderr,
                  flush=True)  # fmt: skip
            await asyncio.wait({served}, timeout=settings.unready_grace)
        server.should_exit = True
        stopped.cancel()
        await served


def _say_setup(role: Role, settings: Settings, config: AcklineConfig) -> list[SetupWarning]:
    """On stderr, before anything pages: which channels this setup has, and every setup
    warning (api.setup_health), one `warning:` line each. A gateway alone pages nobody."""
    from api.setup_health import CHANNEL_SETTINGS, available_channels, setup_warnings

    found = setup_warnings(settings, config, now=datetime.now(UTC))
    if role is Role.GATEWAY:
        return found
    available = available_channels(settings, config)
    missing = [c for c in CHANNEL_SETTINGS if c not in available]
    print(f"channels: {', '.join(sorted(available)) or 'none'}; not configured: "
          f"{', '.join(missing) or 'none'}", file=sys.stderr)  # fmt: skip
    for warning in found:
        print(f"warning: {warning.message}", file=sys.stderr)
    sys.stderr.flush()
    return found


# After the drain timeout, how long the process may still take before it is cut short.
EXIT_GRACE = 2.0


class _SignalFreeServer(uvicorn.Server):
    """uvicorn replaces the process's SIGTERM handler while it serves and stops at once:
    `_serve` owns the signals, so the API can turn unready and keep serving first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None]:
        yield


def _exit_after(seconds: float) -> None:
    """A stop promises an exit within the drain timeout. Whatever still hangs after it
    (a dependency that never answers a close) is cut short: the process exits with status
    1, and the leases of sends it did not hand back run out for other workers to take."""

    def expire() -> None:
        print(f"error: still stopping after {seconds:g}s; exiting now", file=sys.stderr,
              flush=True)  # fmt: skip
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


async def _answer_with(
    gateway: Gateway,
    services: Services,
    settings: Settings,
    inbound: Inbound,
    prompts: Any,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Inbound calls run the hotline flows when ackline.yaml has a hotline: section (only
    from trusted sources, into the escalation engine); otherwise the greeting."""
    from api.app import start_runtime, stop_runtime
    from api.hotline import Hotline
    from api.loop import cancel_and_wait

    if services.config.hotline is None:
        await prompts.render(inbound.greeting)
        gateway.on_incoming = inbound
        return
    runtime = await start_runtime(settings)
    stack.push_async_callback(stop_runtime, runtime)
    hotline = Hotline(
        services.config, runtime.engine, runtime.audit, gateway, dialer=services.dialer
    )
    gateway.on_incoming = hotline.on_incoming
    gateway.guard = hotline.guard
    gateway.on_refused = hotline.on_refused
    retention = asyncio.create_task(hotline.keep_retention(), name="recordings-retention")
    stack.push_async_callback(cancel_and_wait, retention)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def drill(ctx: typer.Context) -> None:
    """Run a game-day drill on a local HA topology: db-primary-crash, db-switchover,
    redis-master-crash, node-crash, carrier-outage or rolling-restart (`ackline drill
    --help` for the options). Needs a source checkout: the drills start PostgreSQL,
    Redis, HAProxy and SIPp themselves (bench/drill.py)."""
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "bench" / "drill.py").exists() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))  # the console script does not look in the checkout
    try:
        from bench.drill import main as drill_main
    except ImportError:
        typer.echo("error: drills run from a source checkout of ackline (bench/drill.py)",
                   err=True)  # fmt: skip
        raise typer.Exit(EXIT_BAD_INPUT) from None
    raise typer.Exit(drill_main(list(ctx.args)))


@app.command()
def softphone(
    script: Annotated[Path, typer.Argument(help="YAML call-flow script", exists=False)],
    target: Annotated[str | None, typer.Option(help="override the script's `call:` URI")] = None,
    listen: Annotated[
        str | None, typer.Option(help="override the script's `listen:` HOST:PORT (answer)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    voice: Annotated[str, typer.Option(help="espeak-ng voice of `say` steps")] = "en-us",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run a scripted call-flow test: call (or answer), listen, press keys, speak, check
    outcomes.

    Exit status 0 when every step and expectation passed, 1 when one failed, 2 for a bad
    script.
    """
    from gateway.softphone import ScriptError, load_script, run_script

    _setup_logging(verbose)
    try:
        parsed = load_script(script)
        if listen is not None:
            parsed = type(parsed).model_validate({**parsed.model_dump(), "listen": listen})
    except ScriptError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except ValidationError:
        typer.echo(f"error: --listen {listen!r} must be HOST:PORT", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None

    def ready(address: tuple[str, int]) -> None:
        """Say when calls can come in: a first run starts the phone, then pages it."""
        if parsed.answer:
            print(f"softphone waiting for a call on {address[0]}:{address[1]} "
                  f"(up to {parsed.ring_timeout:g} s)", file=sys.stderr, flush=True)  # fmt: skip

    try:
        report = asyncio.run(
            run_script(parsed, target=target, prompts=_prompt_cache(voice), on_ready=ready)
        )
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    if as_json:
        typer.echo(json.dumps(report.to_dict(), sort_keys=True))
    else:
        for step in report.steps:
            typer.echo(
                f"{'ok  ' if step.ok else 'FAIL'} {step.step} ({step.elapsed_ms} ms) {step.detail}"
            )
        typer.echo("passed" if report.ok else "failed")
    if not report.ok:
        raise typer.Exit(1)


carriers_app = typer.Typer(no_args_is_help=True, help="carrier trunks: list, test, enable, disable")
app.add_typer(carriers_app, name="carriers")


def _carriers_runtime() -> tuple[Settings, CarrierConfig]:
    try:
        settings = Settings.from_env()
        return settings, _carriers_config(settings.config_path)
    except (ValueError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


async def _with_store(settings: Settings, action: Any) -> Any:
    from carriers.store import TrunkStore
    from storage.db import Database

    _make_sqlite_dir(settings)
    db = Database(settings.database_url)
    try:
        if settings.migrate_on_start:
            await db.migrate()
        return await action(TrunkStore(db))
    finally:
        await db.dispose()


@carriers_app.command("list")
def carriers_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """The configured trunks with the changes operators made (from the database)."""
    from api.routes.carriers import describe
    from carriers.store import apply_overrides

    settings, carriers = _carriers_runtime()

    async def read(store: Any) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        overrides: dict[str, dict[str, Any]] = await store.overrides()
        return overrides, await _shared_trunk_health(settings)

    overrides, workers = asyncio.run(_with_store(settings, read))
    rows = [
        describe(t, overrides.get(t.name, {}), None, workers)
        for t in apply_overrides(carriers.trunks, overrides)
    ]
    if as_json:
        typer.echo(json.dumps(rows, sort_keys=True))
        return
    for row in rows:
        state = "enabled " if row["enabled"] else "disabled"
        changed = f" (changed: {', '.join(sorted(row['overrides']))})" if row["overrides"] else ""
        seen = "; ".join(
            f"{process}: probe {h['probe']}, breaker {h['breaker']}"
            + (f", registration {h['registration']}" if h.get("registration") else "")
            for process, h in row["health_by_process"].items()
        )
        typer.echo(
            f"{row['name']:<16} {state} {row['transport']}:{row['host']}:{row['port']} "
            f"priority={row['priority']} weight={row['weight']}{changed}"
            + (f" [{seen}]" if seen else "")
        )


async def _shared_trunk_health(settings: Settings) -> dict[str, dict[str, Any]]:
    """Each worker's trunk health, when they share it through Redis (REDIS_URL)."""
    if not settings.redis_url:
        return {}
    from carriers.shared_health import SharedTrunkHealth
    from storage.redis_client import async_client

    redis = async_client(settings.redis_url)
    try:
        return await SharedTrunkHealth(redis, settings.redis_prefix, "").read()
    finally:
        await redis.aclose()


def _set_enabled(name: str, enabled: bool) -> None:
    from carriers.store import TrunkChanges, trunk_change_record
    from escalation.audit import AuditLog
    from escalation.config import load_config

    settings, carriers = _carriers_runtime()
    if name not in {t.name for t in carriers.trunks}:
        typer.echo(f"error: no trunk {name!r}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    actor = f"cli:{os.environ.get('USER') or os.getuid()}"

    changes = TrunkChanges(enabled=enabled)

    async def write(store: Any) -> None:
        await store.change(name, changes, actor)

    asyncio.run(_with_store(settings, write))
    company = load_config(settings.config_path).company if settings.config_path else "default"
    audit = AuditLog(settings.audit_dir, fsync=settings.audit_fsync)
    try:
        audit.write(
            company, [trunk_change_record(name, "changed", "enabled", actor, changes.as_dict())]
        )
    finally:
        audit.close()
    typer.echo(f"{name} {'enabled' if enabled else 'disabled'} (workers apply it within seconds)")


@carriers_app.command("enable")
def carriers_enable(name: Annotated[str, typer.Argument(help="trunk name")]) -> None:
    """Put a trunk back into rotation, without a restart."""
    _set_enabled(name, True)


@carriers_app.command("disable")
def carriers_disable(name: Annotated[str, typer.Argument(help="trunk name")]) -> None:
    """Take a trunk out of rotation for new calls, without a restart."""
    _set_enabled(name, False)


@carriers_app.command("test")
def carriers_test(
    name: Annotated[str | None, typer.Argument(help="trunk name (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Probe trunks with SIP OPTIONS now; exit 1 if any did not answer."""
    from api.routes.carriers import probe_once

    _settings, carriers = _carriers_runtime()
    trunks = [t for t in carriers.trunks if name is None or t.name == name]
    if not trunks:
        typer.echo(f"error: no trunk {name!r}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)

    async def probe_all() -> list[dict[str, Any]]:
        sip_hosts = [t.host for t in trunks if t.host is not None]
        host = local_address_for(sip_hosts[0]) if sip_hosts else "127.0.0.1"
        config = GatewayConfig(host=host, udp_port=0, tcp_port=0)
        async with Gateway(config) as gateway:
            router = carriers.router(gateway)
            try:
                return [await probe_once(router, t) for t in trunks]
            finally:
                await router.close()

    results = asyncio.run(probe_all())
    for result in results:
        if as_json:
            typer.echo(json.dumps(result, sort_keys=True))
        else:
            mark = {True: "ok  ", False: "FAIL", None: "skip"}[result["ok"]]
            rtt = f" ({result['rtt_ms']} ms)" if result["rtt_ms"] is not None else ""
            typer.echo(f"{mark} {result['trunk']:<16} {result['detail']}{rtt}")
    if any(r["ok"] is False for r in results):
        raise typer.Exit(1)


override_app = typer.Typer(no_args_is_help=True, help="on-call schedule overrides")
app.add_typer(override_app, name="override")


@override_app.command("add")
def override_add(
    schedule: Annotated[str, typer.Argument(help="schedule name")],
    recipient: Annotated[str, typer.Option(help="recipient id on call instead")],
    start: Annotated[str, typer.Option(help="ISO 8601 with offset, e.g. 2026-03-20T09:00+01:00")],
    end: Annotated[str, typer.Option(help="ISO 8601 with offset")],
    replaces: Annotated[
        str | None, typer.Option(help="only while this recipient would be on call")
    ] = None,
    company: Annotated[str | None, typer.Option(help="default: the config's company")] = None,
) -> None:
    """Put someone on call for a while; it wins over the rota and every earlier override."""
    from escalation import crud
    from escalation.config import format_validation_error, load_config
    from escalation.schedules import Override
    from storage.db import Database

    try:
        settings = Settings.from_env()
        if company is None:
            company = load_config(settings.config_path).company if settings.config_path else None
        override = Override.model_validate({
            "schedule": schedule, "recipient": recipient, "replaces": replaces,
            "start": start, "end": end,
        })  # fmt: skip
    except ValidationError as exc:
        for line in format_validation_error(exc):
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    except (ValueError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    actor = f"cli:{os.environ.get('USER') or os.getuid()}"

    async def add() -> Override:
        db = Database(settings.database_url)
        try:
            if settings.migrate_on_start:
                await db.migrate()
            return await crud.add_override(db, company or "default", override, actor)
        finally:
            await db.dispose()

    try:
        stored = asyncio.run(add())
    except ConfigError as exc:
        for line in exc.errors:
            typer.echo(f"error: {line}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    instead = f" instead of {replaces}" if replaces else ""
    typer.echo(
        f"override {stored.id}: {recipient} on call for {schedule}{instead} "
        f"from {stored.start.isoformat()} to {stored.end.isoformat()}"
    )


user_app = typer.Typer(no_args_is_help=True, help="web console users: add, list, disable")
app.add_typer(user_app, name="user")


def _make_sqlite_dir(settings: Settings) -> None:
    """The embedded SQLite file's directory: on a first run var/ may not exist yet."""
    sqlite_file = settings.database_url.removeprefix("sqlite:///")
    if sqlite_file != settings.database_url:
        Path(sqlite_file).parent.mkdir(parents=True, exist_ok=True)


def _user_db_action(action: Any) -> Any:
    """Run `action(settings, db)` on a migrated database; bad settings exit 2."""
    from storage.db import Database

    try:
        settings = Settings.from_env()
    except (ValueError, ValidationError) as exc:
        typer.echo(f"error: bad settings: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None

    _make_sqlite_dir(settings)

    async def run() -> Any:
        db = Database(settings.database_url)
        try:
            if settings.migrate_on_start:
                await db.migrate()
            return await action(settings, db)
        finally:
            await db.dispose()

    return asyncio.run(run())


def _cli_actor() -> str:
    return f"cli:{os.environ.get('USER') or os.getuid()}"


def _audit_user_change(settings: Settings, company: str, event: str, username: str,
                       **extra: Any) -> None:  # fmt: skip
    from escalation.audit import AuditLog

    audit = AuditLog(settings.audit_dir, fsync=settings.audit_fsync)
    try:
        audit.write(company, [{"event": event, "status": "ok", "actor": _cli_actor(),
                               "user": username, **extra}])  # fmt: skip
    finally:
        audit.close()


def _read_password(password_file: Path | None) -> str:
    """From a file (its first line) or a hidden prompt: never from argv, where `ps` and
    shell history would show it."""
    if password_file is not None:
        try:
            lines = password_file.read_text().splitlines()
        except OSError as exc:
            typer.echo(f"error: cannot read {password_file}: {exc.strerror}", err=True)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        return lines[0] if lines else ""
    password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@user_app.command("add")
def user_add(
    username: Annotated[str, typer.Argument(help="sign-in name (a-z, 0-9, . _ -)")],
    role: Annotated[UserRole, typer.Option(help="admin, responder or viewer")],
    company: Annotated[str | None, typer.Option(help="default: the config's company")] = None,
    recipient: Annotated[
        str | None, typer.Option(help="recipient id their acks are attributed to")
    ] = None,
    password_file: Annotated[
        Path | None, typer.Option(help="read the password from this file's first line")
    ] = None,
) -> None:
    """Add a web console user; the password is prompted for (or read from a file)."""
    from escalation.config import load_config
    from escalation.crud import sync_config
    from escalation.users import UserError, add_user

    password = _read_password(password_file)

    async def add(settings: Settings, db: Any) -> Any:
        owner = company
        if settings.config_path is not None:
            # as `serve` does at start: recipients from the file exist before the first start
            config = load_config(settings.config_path)
            await sync_config(db, config)
            owner = owner or config.company
        return await add_user(db, owner or "default", username, password, role, _cli_actor(),
                              recipient)  # fmt: skip

    try:
        user = _user_db_action(add)
    except (UserError, ConfigError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    _audit_user_change(Settings.from_env(), user.company, "user_added", user.username,
                       role=user.role.value, recipient_id=user.recipient_id)  # fmt: skip
    linked = f", acks as {user.recipient_id}" if user.recipient_id else ""
    typer.echo(f"user {user.username} added: {user.role.value} of {user.company}{linked}")


@user_app.command("list")
def user_list(
    company: Annotated[str | None, typer.Option(help="only this company's users")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Console users with their company, role, recipient and whether they are disabled."""
    from escalation.users import list_users

    async def read(_settings: Settings, db: Any) -> Any:
        return await list_users(db, company)

    users = _user_db_action(read)
    rows = [{"username": u.username, "company": u.company, "role": u.role.value,
             "recipient_id": u.recipient_id, "disabled": u.disabled} for u in users]  # fmt: skip
    if as_json:
        typer.echo(json.dumps(rows, sort_keys=True))
        return
    for row in rows:
        state = "disabled" if row["disabled"] else "active"
        typer.echo(f"{row['username']:<20} {row['company']:<12} {row['role']:<10} {state:<8} "
                   f"{row['recipient_id'] or '-'}")  # fmt: skip


@user_app.command("disable")
def user_disable(username: Annotated[str, typer.Argument(help="sign-in name")]) -> None:
    """Disable a console user: their open sessions end on their next request."""
    from escalation.users import update_user

    async def disable(_settings: Settings, db: Any) -> Any:
        return await update_user(db, username.strip().lower(), _cli_actor(), disabled=True)

    user = _user_db_action(disable)
    if user is None:
        typer.echo(f"error: no user {username!r}", err=True)
        raise typer.Exit(EXIT_BAD_INPUT)
    _audit_user_change(Settings.from_env(), user.company, "user_disabled", user.username)
    typer.echo(f"user {user.username} disabled (signed out everywhere)")


def main() -> None:
    app()
