"""Each notification channel's provider, registered once: the settings that switch it on
and how it is built. `services_for`, the start-up warnings and /v1/setup/health all read
this registry, so a new channel is its module under escalation/channels plus one entry
here (voice is composed from carriers and the IVR in api.channels, so it stays there)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import AliasChoices

from api.settings import Settings
from escalation.channels.base import Channel
from gateway.call import Gateway


@dataclass
class BuildContext:
    """What a provider builds from; `closers` run when the worker stops."""

    settings: Settings
    gateway: Gateway | None
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class ChannelProvider:
    channels: tuple[str, ...]  # the channel names it provides
    needs: tuple[str, ...]  # Settings fields that must all be set
    build: Callable[[BuildContext], Mapping[str, Channel]]

    def enabled(self, settings: Settings) -> bool:
        return all(getattr(settings, name) for name in self.needs)

    def variables(self) -> str:
        """The environment variables that switch it on, for warnings and docs."""
        names = [_variable(name) for name in self.needs]
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _variable(field_name: str) -> str:
    alias = Settings.model_fields[field_name].validation_alias
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    assert isinstance(alias, str), field_name
    return alias


def _wav_tts(prompts: Any) -> Callable[[str], Awaitable[bytes]]:
    """The gateway's cached TTS as WAV bytes, for voice notes."""
    from prompts.audio import pcm_to_wav

    async def render(text: str) -> bytes:
        prompt = await prompts.render(text)
        return pcm_to_wav(prompt.pcm)

    return render


def _sms(ctx: BuildContext) -> Mapping[str, Channel]:
    from escalation.channels.sms import SmsChannel, TwilioSender

    s = ctx.settings
    assert s.twilio_account_sid
    assert s.twilio_auth_token
    senders = [
        TwilioSender(s.twilio_account_sid, s.twilio_auth_token, from_number=n)
        for n in s.twilio_from_numbers
    ]
    status_url = f"{s.public_url.rstrip('/')}/v1/webhooks/twilio/status" if s.public_url else None
    return {"sms": SmsChannel(senders, api_base=s.twilio_api_base, status_callback_url=status_url)}


def _telegram(ctx: BuildContext) -> Mapping[str, Channel]:
    from escalation.channels.telegram import (
        TELEGRAM_API_BASE,
        TelegramBotApi,
        TelegramChannel,
        TelegramVoiceChannel,
    )

    s = ctx.settings
    assert s.telegram_bot_token
    bot = TelegramBotApi(s.telegram_bot_token, api_base=s.telegram_api_base or TELEGRAM_API_BASE)
    ctx.closers.append(bot.aclose)
    channels: dict[str, Channel] = {"telegram": TelegramChannel(bot)}
    if ctx.gateway is not None and ctx.gateway.prompts is not None:  # speaks with its TTS
        channels["telegram_voice"] = TelegramVoiceChannel(bot, _wav_tts(ctx.gateway.prompts))
    return channels


def _slack(ctx: BuildContext) -> Mapping[str, Channel]:
    from escalation.channels.slack import SlackChannel, SlackWebApi

    s = ctx.settings
    assert s.slack_bot_token
    return {"slack": SlackChannel(SlackWebApi(s.slack_bot_token, api_base=s.slack_api_base))}


def _email(ctx: BuildContext) -> Mapping[str, Channel]:
    from escalation.channels.email import EmailChannel

    s = ctx.settings
    assert s.smtp_host
    assert s.smtp_from
    return {"email": EmailChannel(s.smtp_host, s.smtp_port, sender=s.smtp_from)}


def _webhook(ctx: BuildContext) -> Mapping[str, Channel]:
    from escalation.channels.webhook import WebhookChannel

    assert ctx.settings.webhook_secret
    webhook = WebhookChannel(ctx.settings.webhook_secret)
    ctx.closers.append(webhook.aclose)
    return {"webhook": webhook}


PROVIDERS: tuple[ChannelProvider, ...] = (
    ChannelProvider(
        ("sms",), ("twilio_account_sid", "twilio_auth_token", "twilio_from_numbers"), _sms
    ),
    ChannelProvider(("telegram", "telegram_voice"), ("telegram_bot_token",), _telegram),
    ChannelProvider(("slack",), ("slack_bot_token",), _slack),
    ChannelProvider(("email",), ("smtp_host", "smtp_from"), _email),
    ChannelProvider(("webhook",), ("webhook_secret",), _webhook),
)
