"""Builds the notification channels a worker can use from its settings.

A channel whose provider is not configured is simply absent: the engine then records
`channel_unavailable` for it and takes the fallback, instead of pretending to deliver.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from api.channel_providers import PROVIDERS, BuildContext
from api.loop import cancel_and_wait
from api.settings import Settings
from api.voice_channel import AckMenu, CarrierDialer, Dialer, SipUriDialer, VoiceChannel
from carriers.budgets import RedisBudgets
from carriers.health import HealthChange
from carriers.registration import TrunkRegistrations
from carriers.router import CarrierRouter
from carriers.store import TrunkStore
from carriers.trunk import Trunk
from carriers.turns import turns_for
from carriers.twilio_voice import CallEvents, TwilioVoice
from escalation.audit import AuditLog
from escalation.channels.base import Channel
from escalation.config import AcklineConfig, ConfigError, load_config
from gateway.call import Gateway
from gateway.sip.auth import Credentials
from ivr.flow import Flow, load_flow
from ivr.twiml import twiml_errors
from storage.db import Database


def audit_trunk_health(audit: AuditLog, config: AcklineConfig, change: HealthChange) -> None:
    """A trunk going down or up (probes) or its breaker opening is part of the record."""
    audit.write(
        config.company,
        [
            {
                "event": "trunk_health",
                "status": change.new,
                "reason": change.reason,
                "actor": "carriers",
                "trunk": change.trunk,
                "aspect": change.aspect,
                "previous": change.old,
            }
        ],
    )


def _share_trunk_health(
    url: str, prefix: str, router: CarrierRouter
) -> Callable[[], Awaitable[None]]:
    """Publish this process's trunk health for the API (carriers.shared_health)."""
    from carriers.shared_health import SharedTrunkHealth, process_name, publish_trunk_health
    from storage.redis_client import async_client

    redis = async_client(url)
    shared = SharedTrunkHealth(redis, prefix, process_name())
    task = asyncio.create_task(publish_trunk_health(shared, router), name="trunk-health")

    async def close() -> None:
        await cancel_and_wait(task)
        await redis.aclose()

    return close


async def _watch_overrides(
    settings: Settings, db: Database, trunks: Sequence[Trunk], router: CarrierRouter
) -> Callable[[], Awaitable[None]]:
    """Apply the operators' trunk changes (API/CLI) now and whenever they change; the
    database is closed with the watch."""
    if settings.migrate_on_start:
        await db.migrate()
    stop = asyncio.Event()
    task = asyncio.create_task(TrunkStore(db).watch(trunks, router.update_trunks, stop=stop))

    async def close() -> None:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        await db.dispose()

    return close


def _async(close: Callable[[], None]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        close()

    return run


def default_ack_flow(settings: Settings) -> Flow:
    """The ack flow of policies without `voice:` options (ACKLINE_VOICE_AMD...)."""
    return AckMenu(amd=settings.voice_amd, machine_message=settings.voice_machine_message).flow()


def policy_flows(config: AcklineConfig) -> dict[str, Flow]:
    """The ack flow each policy with `voice:` options runs (a broken flow file fails here,
    at start, not at 3 a.m. on the first call)."""
    flows: dict[str, Flow] = {}
    for policy in config.policies:
        options = policy.voice
        if options is None:
            continue
        if options.flow is not None:
            flows[policy.name] = load_flow(options.flow)
        else:
            flows[policy.name] = AckMenu(
                prompts=options.prompts,
                digit_timeout=options.digit_timeout,
                amd=options.amd,
                machine_message=options.machine_message,
                resolve=options.resolve_key,
                snooze=options.snooze,
            ).flow()
    return flows


def _check_twilio_ready(settings: Settings, config: AcklineConfig) -> None:
    """Refuse to start rather than fail the first Twilio call at 3 a.m."""
    if not settings.public_url:
        raise ConfigError(
            ["twilio trunks need ACKLINE_PUBLIC_URL: Twilio fetches the call flow from it"]
        )
    flows = {"default": default_ack_flow(settings), **policy_flows(config)}
    errors = [f"policy {name}: {e}" for name, flow in flows.items() for e in twiml_errors(flow)]
    if errors:
        raise ConfigError(f"{e} (a twilio trunk may carry its calls)" for e in errors)


@dataclass
class Services:
    """What a process that pages people needs: the channels, and the dialer the voice
    channel uses (the hotline bridges callers with the same one)."""

    config: AcklineConfig
    channels: dict[str, Channel] = field(default_factory=dict)
    dialer: Dialer | None = None
    router: CarrierRouter | None = None  # when calls go out through carrier trunks
    twilio_events: CallEvents | None = None  # Twilio call webhooks -> the calls they report
    # Trunks with register: started once the gateway listens, closed before it stops
    registrations: TrunkRegistrations | None = None


@contextlib.asynccontextmanager
async def services_for(settings: Settings, gateway: Gateway | None) -> AsyncIterator[Services]:
    """The configured channels, closed again when the worker stops."""
    config = load_config(settings.config_path) if settings.config_path else AcklineConfig()
    services = Services(config)
    channels = services.channels
    closers: list[Any] = []
    twilio: TwilioVoice | None = None
    if config.carriers is not None and any(t.kind == "twilio" for t in config.carriers.trunks):
        events = CallEvents(settings.redis_url, settings.redis_prefix)
        await events.start()
        closers.append(events.close)
        services.twilio_events = events
        if gateway is not None:  # this process places calls
            _check_twilio_ready(settings, config)
            assert settings.public_url is not None
            twilio = TwilioVoice(events, settings.public_url)
    if gateway is not None and config.carriers is not None:
        audit = AuditLog(settings.audit_dir, fsync=settings.audit_fsync)
        closers.append(_async(audit.close))
        budgets = (
            RedisBudgets(settings.redis_url, settings.redis_prefix)
            if settings.redis_url
            else None  # one process: its own budgets
        )
        db = Database(settings.database_url)  # trunk overrides and, without Redis, turns
        router = config.carriers.router(
            gateway,
            on_health_change=lambda change: audit_trunk_health(audit, config, change),
            budgets=budgets,
            twilio=twilio,
            turns=turns_for(settings.redis_url, settings.redis_prefix, db),
        )
        prober = router.prober(interval=config.carriers.probe.interval)
        prober.start()
        closers += [prober.close, router.close]
        services.dialer = CarrierDialer(router)
        services.router = router
        registrations = TrunkRegistrations(gateway, router.trunks, router.health)
        services.registrations = registrations if registrations else None
        closers.append(await _watch_overrides(settings, db, config.carriers.trunks, router))
        if settings.redis_url:  # scale-out: the API shows what each worker sees
            closers.append(_share_trunk_health(settings.redis_url, settings.redis_prefix, router))
    elif gateway is not None and (target := settings.voice_target or config.voice_target):
        credentials = (
            Credentials(settings.voice_auth_user, settings.voice_auth_password or "")
            if settings.voice_auth_user
            else None
        )
        services.dialer = SipUriDialer(gateway, target, credentials)
    if services.dialer is not None:
        channels["voice"] = VoiceChannel(
            services.dialer,
            ring_timeout=settings.voice_ring_timeout,
            max_call=settings.voice_max_call,
            flow=default_ack_flow(settings),
            flows=policy_flows(config),
        )
    built = BuildContext(settings, gateway)
    for provider in PROVIDERS:
        if provider.enabled(settings):
            channels.update(provider.build(built))
    closers += built.closers
    try:
        yield services
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                await close()
