"""Telegram Bot API channels: a text page with an Acknowledge button, and a spoken page.

Both go through one `TelegramBotApi` so the error classification (429 with retry_after,
5xx, blocked chats) lives in one place. The button's callback query comes back to the API's
webhook, which checks the secret token and acknowledges via `parse_telegram_update`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

from escalation.channels.base import (
    REQUEST_DEADLINE,
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    RequestDeadline,
    SentMessages,
    ignore_progress,
)

log = logging.getLogger(__name__)

__all__ = [
    "TELEGRAM_API_BASE",
    "OpusEncodeError",
    "TelegramAck",
    "TelegramBotApi",
    "TelegramChannel",
    "TelegramUser",
    "TelegramVoiceChannel",
    "check_telegram_secret",
    "classify_telegram_error",
    "parse_telegram_update",
    "wav_to_ogg_opus",
]

TELEGRAM_API_BASE = "https://api.telegram.org"
ACK_CALLBACK_PREFIX = "ack:"

Tts = Callable[[str], Awaitable[bytes]]


class OpusEncodeError(RuntimeError):
    """ffmpeg could not turn the TTS WAV into OGG/Opus."""


def classify_telegram_error(
    status: int, payload: Mapping[str, Any] | None, retry_after_header: str | None = None
) -> DeliveryResult:
    """Map a failed Bot API call to the engine's vocabulary; 429/5xx may heal, 4xx will not."""
    payload = payload or {}
    code = payload.get("error_code", status)
    code = code if isinstance(code, int) else status
    details: dict[str, str] = {}
    if isinstance(payload.get("description"), str):
        details["description"] = payload["description"]
    parameters = payload.get("parameters")
    parameters = parameters if isinstance(parameters, dict) else {}
    retry_after = parameters.get("retry_after", retry_after_header)
    if retry_after is not None:
        details["retry_after"] = str(retry_after)
    if "migrate_to_chat_id" in parameters:  # group upgraded to a supergroup: new chat id
        details["migrate_to_chat_id"] = str(parameters["migrate_to_chat_id"])
    retryable = code == 429 or code >= 500
    verdict = DeliveryStatus.FAILED_RETRYABLE if retryable else DeliveryStatus.FAILED_PERMANENT
    return DeliveryResult(verdict, f"telegram_{code}", details=details)


class TelegramBotApi:
    """A bot token plus an HTTP client; `api_base` points at a local Bot API server or fake."""

    def __init__(
        self,
        token: str,
        *,
        api_base: str = TELEGRAM_API_BASE,
        timeout_s: float = 15.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if not token:
            raise ValueError("Telegram bot token is empty")
        self._url = f"{api_base.rstrip('/')}/bot{token}/"
        self._client = client or httpx.AsyncClient(timeout=timeout_s)
        self._owns_client = client is None

    async def call(
        self,
        method: str,
        *,
        json_body: Mapping[str, Any] | None = None,
        form: Mapping[str, str] | None = None,
        files: Mapping[str, tuple[str, bytes, str]] | None = None,
    ) -> dict[str, Any] | DeliveryResult:
        """The `result` object on success, else a classified failure; never raises for
        network or API errors (and never puts the URL, which holds the token, in a reason)."""
        try:
            if files is not None:
                response = await self._client.post(self._url + method, data=form, files=files)
            else:
                response = await self._client.post(self._url + method, json=json_body)
        except httpx.TimeoutException:
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "telegram_timeout")
        except httpx.TransportError:
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "telegram_connection_error")
        try:
            payload = response.json()
        except ValueError:  # a proxy's HTML error page
            payload = None
        if not isinstance(payload, dict):
            payload = None
        if response.is_success and payload and payload.get("ok") is True:
            result = payload.get("result")
            return result if isinstance(result, dict) else {"value": result}
        return classify_telegram_error(
            response.status_code, payload, response.headers.get("Retry-After")
        )

    async def answer_callback_query(self, callback_query_id: str, text: str) -> bool:
        """Stop the button's spinner and show `text`; the webhook handler calls this."""
        outcome = await self.call(
            "answerCallbackQuery", json_body={"callback_query_id": callback_query_id, "text": text}
        )
        return not isinstance(outcome, DeliveryResult)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def _ack_keyboard(alert_id: str) -> dict[str, Any]:
    button = {"text": "Acknowledge", "callback_data": f"{ACK_CALLBACK_PREFIX}{alert_id}"}
    return {"inline_keyboard": [[button]]}


class _TelegramChannelBase(RequestDeadline, abc.ABC):
    """Shared send skeleton; subclasses only say which Bot API call carries the page."""

    name: str

    def __init__(self, bot: TelegramBotApi) -> None:
        self.bot = bot
        self._sent: SentMessages[tuple[str, int]] = SentMessages()

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        chat_id = notification.contact.telegram_chat_id
        if not chat_id:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_telegram_chat_id")
        outcome = await self._deliver(chat_id, notification)
        if isinstance(outcome, DeliveryResult):
            return outcome
        message_id = outcome.get("message_id")
        if not isinstance(message_id, int):
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "telegram_bad_response")
        self._sent.add(notification.notification_id, (chat_id, message_id))
        return DeliveryResult(
            DeliveryStatus.DELIVERED, "sent", str(message_id), {"chat_id": chat_id}
        )

    @abc.abstractmethod
    async def _deliver(self, chat_id: str, n: Notification) -> dict[str, Any] | DeliveryResult:
        """Make the Bot API call that carries the page to `chat_id`."""

    async def cancel(self, notification_id: str) -> None:
        """Remove the Acknowledge button from pages this process sent for the notification,
        so nobody taps a stale button; best effort, the engine ignores late acks anyway."""
        for chat_id, message_id in self._sent.pop(notification_id):
            await self.bot.call(
                "editMessageReplyMarkup",
                json_body={
                    "chat_id": chat_id,
                    "message_id": message_id,
                    "reply_markup": {"inline_keyboard": []},
                },
            )


class TelegramChannel(_TelegramChannelBase):
    """Channel "telegram": a text message with an inline Acknowledge button."""

    name = "telegram"

    async def _deliver(self, chat_id: str, n: Notification) -> dict[str, Any] | DeliveryResult:
        if not n.is_alert:  # nothing to acknowledge: no button
            body = {"chat_id": chat_id, "text": f"{n.headline}\n{n.summary}"}
            return await self.bot.call("sendMessage", json_body=body)
        text = f"{n.headline}\n{n.summary}\nAlert {n.alert_short_id}"
        return await self.bot.call(
            "sendMessage",
            json_body={"chat_id": chat_id, "text": text, "reply_markup": _ack_keyboard(n.alert_id)},
        )


class TelegramVoiceChannel(_TelegramChannelBase):
    """Channel "telegram_voice": the summary spoken as a voice note, with the same button.

    `tts` returns WAV bytes (the prompt pipeline's 8 kHz WAV; any rate works). A local
    rendering failure is permanent: retrying a broken synthesiser wastes the responder's
    time, falling back to another channel does not.
    """

    name = "telegram_voice"

    def __init__(
        self,
        bot: TelegramBotApi,
        tts: Tts,
        *,
        ffmpeg: str = "ffmpeg",
        encode_timeout_s: float = 30.0,
    ) -> None:
        super().__init__(bot)
        self._tts = tts
        self._ffmpeg = ffmpeg
        self._encode_timeout_s = encode_timeout_s

    def deadline(self, notification: Notification) -> float:
        """Speaking and encoding the note come before the upload."""
        return self._encode_timeout_s + REQUEST_DEADLINE

    async def _deliver(self, chat_id: str, n: Notification) -> dict[str, Any] | DeliveryResult:
        speech = f"{n.severity} alert. {n.title}. {n.summary}"
        try:
            wav = await self._tts(speech)
        except Exception:  # any synthesiser failure means: use another channel
            log.warning("synthesising the voice note failed", exc_info=True)
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "tts_failed")
        try:
            ogg = await wav_to_ogg_opus(wav, ffmpeg=self._ffmpeg, timeout_s=self._encode_timeout_s)
        except OpusEncodeError as exc:
            return DeliveryResult(
                DeliveryStatus.FAILED_PERMANENT, "opus_encode_failed", details={"error": str(exc)}
            )
        form = {
            "chat_id": chat_id,
            "caption": f"{n.headline}\nAlert {n.alert_short_id}",
            "reply_markup": json.dumps(_ack_keyboard(n.alert_id)),
        }
        return await self.bot.call(
            "sendVoice", form=form, files={"voice": ("alert.ogg", ogg, "audio/ogg")}
        )


async def wav_to_ogg_opus(wav: bytes, *, ffmpeg: str = "ffmpeg", timeout_s: float = 30.0) -> bytes:
    """Encode a WAV file as a mono OGG/Opus voice note (what Telegram plays inline)."""
    argv = [ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "wav", "-i", "pipe:0"]
    argv += ["-ac", "1", "-c:a", "libopus", "-b:a", "24k", "-application", "voip"]
    argv += ["-f", "ogg", "pipe:1"]
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise OpusEncodeError(f"cannot start {ffmpeg!r}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(wav), timeout_s)
    except BaseException as exc:  # timeout or cancellation: leave no ffmpeg behind
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        if isinstance(exc, TimeoutError):
            raise OpusEncodeError(f"{ffmpeg!r} timed out after {timeout_s:g}s") from None
        raise
    if proc.returncode != 0 or not out.startswith(b"OggS") or b"OpusHead" not in out[:512]:
        detail = err.decode("utf-8", "replace").strip()[-300:]
        raise OpusEncodeError(f"ffmpeg exited {proc.returncode}: {detail or 'no OGG/Opus output'}")
    return out


@dataclass(frozen=True)
class TelegramUser:
    id: int
    username: str | None
    display_name: str


class TelegramAck(NamedTuple):
    alert_id: str
    user: TelegramUser
    callback_query_id: str  # pass to TelegramBotApi.answer_callback_query


def parse_telegram_update(update: Mapping[str, Any]) -> TelegramAck | None:
    """The ack in an Update from the webhook, or None for anything else (messages, other
    buttons, malformed input): the handler just answers 200 so Telegram stops retrying."""
    query = update.get("callback_query")
    if not isinstance(query, dict):
        return None
    data, sender, query_id = query.get("data"), query.get("from"), query.get("id")
    if not (isinstance(data, str) and data.startswith(ACK_CALLBACK_PREFIX)):
        return None
    if not isinstance(sender, dict) or not isinstance(sender.get("id"), int):
        return None
    if not isinstance(query_id, str):
        return None
    alert_id = data.removeprefix(ACK_CALLBACK_PREFIX)
    if not alert_id:
        return None
    names = [sender.get("first_name"), sender.get("last_name")]
    username = sender.get("username")
    user = TelegramUser(
        id=sender["id"],
        username=username if isinstance(username, str) else None,
        display_name=" ".join(n for n in names if isinstance(n, str)) or str(sender["id"]),
    )
    return TelegramAck(alert_id, user, query_id)


def check_telegram_secret(header_value: str | None, expected: str) -> bool:
    """Compare X-Telegram-Bot-Api-Secret-Token in constant time; an unset secret never
    matches, so a misconfiguration fails closed."""
    if not header_value or not expected:
        return False
    return hmac.compare_digest(header_value.encode(), expected.encode())
