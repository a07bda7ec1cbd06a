"""Start-up setup warnings: what in this configuration would page nobody, said up front.

A policy that pages on a channel without a provider, a person without the contact a
step needs, voice with nowhere to ring: each of these is only discovered at 3 a.m. as
`channel_unavailable` or `no_contact` in an alert's audit. `setup_warnings` finds them
from the settings and the YAML configuration alone (pure, the clock and the writability
probe injected); `ackline serve` prints them and the API serves them at
`GET /v1/setup/health`, for a console banner.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from api.channel_providers import PROVIDERS
from api.settings import Settings
from escalation.config import CHANNEL_CONTACT_FIELD, AcklineConfig, Policy, Recipient
from escalation.schedules import shifts

__all__ = [
    "CHANNEL_SETTINGS",
    "SetupCode",
    "SetupWarning",
    "audit_dir_writable",
    "available_channels",
    "setup_warnings",
]

# What enables each channel: voice's route, and each registered provider's variables.
CHANNEL_SETTINGS = {
    "voice": "ACKLINE_VOICE_TARGET (or voice_target / carriers: trunks in ackline.yaml)",
    **{name: p.variables() for p in PROVIDERS for name in p.channels},
}
# How far ahead an empty schedule is looked for: a rota nobody is on for a week is broken.
SCHEDULE_LOOKAHEAD = timedelta(days=7)


class SetupCode(enum.StrEnum):
    CHANNEL_UNAVAILABLE = "channel_unavailable"  # a step pages on a channel not configured
    FALLBACK_UNAVAILABLE = "fallback_unavailable"  # a retry fallback is not configured
    NO_CONTACT = "no_contact"  # a step's recipient lacks the contact its channel needs
    NO_VOICE_ROUTE = "no_voice_route"  # no carrier trunk and no voice target
    AUDIT_DIR_NOT_WRITABLE = "audit_dir_not_writable"
    SCHEDULE_EMPTY = "schedule_empty"  # a schedule puts nobody on call

    @property
    def is_global(self) -> bool:
        """About the whole installation, not one company's policies (every tenant sees it)."""
        return self in (SetupCode.NO_VOICE_ROUTE, SetupCode.AUDIT_DIR_NOT_WRITABLE)


@dataclass(frozen=True)
class SetupWarning:
    code: SetupCode
    message: str  # one line, says what to set or change
    subject: str  # what it is about: "policy critical", "recipient bob", "voice", ...

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code.value, "message": self.message, "subject": self.subject}


def voice_route(settings: Settings, config: AcklineConfig) -> bool:
    return bool(config.carriers is not None or settings.voice_target or config.voice_target)


def available_channels(settings: Settings, config: AcklineConfig) -> set[str]:
    """The channels a worker with these settings has: api.channels.services_for builds
    exactly these (voice and telegram_voice also need a gateway in the process)."""
    out = {name for p in PROVIDERS if p.enabled(settings) for name in p.channels}
    if voice_route(settings, config):
        out.add("voice")
    return out


def audit_dir_writable(path: Path) -> bool:
    """The directory, or the nearest existing parent it would be created in, is writable."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


def _step_targets(
    policy: Policy, step_index: int, config: AcklineConfig
) -> Iterator[tuple[str, str]]:
    """(recipient id, how the step reaches them) of one step, schedules' rotas included."""
    step = policy.steps[step_index]
    groups = {g.name: g for g in config.groups}
    schedules = {s.name: s for s in config.schedules}
    for rid in step.recipients:
        yield rid, "recipient"
    for name in step.groups:
        for rid in groups[name].members if name in groups else ():
            yield rid, f"group {name}"
    for name in step.schedules:
        for rid in schedules[name].participants() if name in schedules else ():
            yield rid, f"schedule {name}"


def _channel_warnings(config: AcklineConfig, available: Collection[str]) -> list[SetupWarning]:
    out: list[SetupWarning] = []
    recipients: dict[str, Recipient] = {r.id: r for r in config.recipients}
    for policy in config.policies:
        subject = f"policy {policy.name}"
        retry = policy.retry_for(config.channel_defaults)
        used: list[str] = []
        for i, step in enumerate(policy.steps):
            for channel in step.channels:
                if channel not in used:
                    used.append(channel)
                if channel not in available:
                    out.append(SetupWarning(
                        SetupCode.CHANNEL_UNAVAILABLE,
                        f"policy {policy.name} step {i + 1} pages on {channel}, which is not "
                        f"configured: set {CHANNEL_SETTINGS[channel]}",
                        subject,
                    ))  # fmt: skip
                    continue
                field = CHANNEL_CONTACT_FIELD[channel]
                seen: set[str] = set()
                for rid, via in _step_targets(policy, i, config):
                    r = recipients.get(rid)
                    if r is None or rid in seen or r.reachable_on(channel):
                        continue
                    seen.add(rid)
                    out.append(SetupWarning(
                        SetupCode.NO_CONTACT,
                        f"policy {policy.name} step {i + 1} pages {rid} ({via}) on {channel}, "
                        f"but {rid} has no {field}",
                        f"recipient {rid}",
                    ))  # fmt: skip
        fallbacks: list[tuple[str, str]] = []
        for channel in used:
            nxt, hops = retry[channel].fallback_channel if channel in retry else None, 0
            while nxt is not None and hops < len(retry) + 1:
                if nxt not in used and nxt not in [f for _, f in fallbacks]:
                    fallbacks.append((channel, nxt))
                nxt = retry[nxt].fallback_channel if nxt in retry else None
                hops += 1
        for channel, fallback in fallbacks:
            if fallback not in available:
                out.append(SetupWarning(
                    SetupCode.FALLBACK_UNAVAILABLE,
                    f"policy {policy.name}: {channel} falls back to {fallback}, which is not "
                    f"configured: set {CHANNEL_SETTINGS[fallback]} (or change the fallback in "
                    f"channel_defaults)",
                    subject,
                ))  # fmt: skip
    return out


def _schedule_warnings(config: AcklineConfig, now: datetime) -> list[SetupWarning]:
    out = []
    for schedule in config.schedules:
        subject = f"schedule {schedule.name}"
        if not schedule.participants():
            out.append(SetupWarning(
                SetupCode.SCHEDULE_EMPTY, f"schedule {schedule.name} has no participants",
                subject,
            ))  # fmt: skip
            continue
        ahead = shifts(schedule, config.overrides, now, now + SCHEDULE_LOOKAHEAD)
        if all(s.recipient is None for s in ahead):
            out.append(SetupWarning(
                SetupCode.SCHEDULE_EMPTY,
                f"schedule {schedule.name} puts nobody on call in the next "
                f"{SCHEDULE_LOOKAHEAD.days} days (check its layers' start and restrictions)",
                subject,
            ))  # fmt: skip
    return out


def setup_warnings(
    settings: Settings,
    config: AcklineConfig,
    *,
    now: datetime,
    writable: Callable[[Path], bool] = audit_dir_writable,
) -> list[SetupWarning]:
    """Everything in this setup that would page nobody, in a stable order."""
    available = available_channels(settings, config)
    out: list[SetupWarning] = []
    if not voice_route(settings, config):
        out.append(SetupWarning(
            SetupCode.NO_VOICE_ROUTE,
            "voice has nowhere to ring: no carrier trunk (carriers: in ackline.yaml) and no "
            "voice target (ACKLINE_VOICE_TARGET, or voice_target in ackline.yaml)",
            "voice",
        ))  # fmt: skip
    if not writable(settings.audit_dir):
        out.append(SetupWarning(
            SetupCode.AUDIT_DIR_NOT_WRITABLE,
            f"the audit directory {settings.audit_dir} is not writable: set ACKLINE_AUDIT_DIR "
            f"or fix its permissions",
            f"audit_dir {settings.audit_dir}",
        ))  # fmt: skip
    out += _channel_warnings(config, available)
    out += _schedule_warnings(config, now)
    return out
