"""Telegram channels over httpx against the local Bot API fake; voice uses espeak-ng + ffmpeg."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from escalation.channels.base import DeliveryStatus
from escalation.channels.telegram import (
    OpusEncodeError,
    TelegramBotApi,
    TelegramChannel,
    TelegramVoiceChannel,
    wav_to_ogg_opus,
)
from tests.fakes import free_port, make_notification
from tests.fakes.telegram_server import FakeTelegram

CHAT = "7001001"
KEYBOARD = {
    "inline_keyboard": [
        [{"text": "Acknowledge", "callback_data": "ack:5d0c1e7a-2b44-4f0e-8c61-9a3b7e2f4d10"}]
    ]
}


@pytest.fixture
async def telegram() -> AsyncIterator[FakeTelegram]:
    async with FakeTelegram() as fake:
        yield fake


@pytest.fixture
async def bot(telegram: FakeTelegram) -> AsyncIterator[TelegramBotApi]:
    api = TelegramBotApi(telegram.token, api_base=telegram.url, timeout_s=2)
    yield api
    await api.aclose()


async def _run(*argv: str, stdin: bytes = b"") -> bytes:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), 30)
    assert proc.returncode == 0, err.decode()
    return out


async def espeak_8k_wav(text: str) -> bytes:
    """Real TTS as the prompt pipeline hands it over: espeak-ng resampled to 8 kHz WAV."""
    wav = await _run("espeak-ng", "--stdout", "--", text)
    return await _run(
        "ffmpeg", "-hide_banner", "-loglevel", "error", "-i", "pipe:0", "-ar", "8000",
        "-f", "wav", "pipe:1", stdin=wav,
    )  # fmt: skip


async def test_send_message_with_acknowledge_button(
    telegram: FakeTelegram, bot: TelegramBotApi
) -> None:
    result = await TelegramChannel(bot).send(make_notification("telegram", telegram_chat_id=CHAT))

    assert result.status is DeliveryStatus.DELIVERED
    [request] = telegram.requests
    assert request.method == "POST"
    assert request.path == f"/bot{telegram.token}/sendMessage"
    assert request.headers["content-type"] == "application/json"
    assert request.json == {
        "chat_id": CHAT,
        "text": "[CRITICAL] Checkout API error rate 12%\n"
        "5xx ratio above 5% for 10 minutes on checkout-api in eu-west-1.\nAlert 7F3K",
        "reply_markup": KEYBOARD,
    }
    assert result.provider_id == "1"
    assert telegram.messages[(CHAT, 1)]["reply_markup"] == KEYBOARD


@pytest.mark.parametrize(
    ("code", "status", "description"),
    [
        (403, DeliveryStatus.FAILED_PERMANENT, "Forbidden: bot was blocked by the user"),
        (400, DeliveryStatus.FAILED_PERMANENT, "Bad Request: chat not found"),
        (500, DeliveryStatus.FAILED_RETRYABLE, "Internal Server Error"),
        (502, DeliveryStatus.FAILED_RETRYABLE, "Bad Gateway"),
    ],
)
async def test_api_errors_are_classified(
    telegram: FakeTelegram,
    bot: TelegramBotApi,
    code: int,
    status: DeliveryStatus,
    description: str,
) -> None:
    telegram.fail_next(code, match="sendMessage")

    result = await TelegramChannel(bot).send(make_notification("telegram", telegram_chat_id=CHAT))

    assert (result.status, result.reason) == (status, f"telegram_{code}")
    assert result.details == {"description": description}


async def test_flood_limit_is_retryable_with_retry_after(
    telegram: FakeTelegram, bot: TelegramBotApi
) -> None:
    telegram.fail_next(429, retry_after=7)

    result = await TelegramChannel(bot).send(make_notification("telegram", telegram_chat_id=CHAT))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_RETRYABLE, "telegram_429")
    assert result.details == {
        "description": "Too Many Requests: retry after 7",
        "retry_after": "7",
    }


async def test_wrong_token_is_permanent(telegram: FakeTelegram) -> None:
    bot = TelegramBotApi("123:not-the-token", api_base=telegram.url)
    try:
        result = await TelegramChannel(bot).send(
            make_notification("telegram", telegram_chat_id=CHAT)
        )
    finally:
        await bot.aclose()

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "telegram_401")


async def test_timeout_and_unreachable_api_are_retryable(telegram: FakeTelegram) -> None:
    slow = TelegramBotApi(telegram.token, api_base=telegram.url, timeout_s=0.3)
    down = TelegramBotApi(telegram.token, api_base=f"http://127.0.0.1:{free_port()}")
    telegram.stall_next(1.0)
    notification = make_notification("telegram", telegram_chat_id=CHAT)
    try:
        timed_out = await TelegramChannel(slow).send(notification)
        refused = await TelegramChannel(down).send(notification)
    finally:
        await slow.aclose()
        await down.aclose()

    assert (timed_out.status, timed_out.reason) == (
        DeliveryStatus.FAILED_RETRYABLE,
        "telegram_timeout",
    )
    assert (refused.status, refused.reason) == (
        DeliveryStatus.FAILED_RETRYABLE,
        "telegram_connection_error",
    )


async def test_cancel_removes_the_acknowledge_button(
    telegram: FakeTelegram, bot: TelegramBotApi
) -> None:
    channel = TelegramChannel(bot)
    notification = make_notification("telegram", telegram_chat_id=CHAT)
    await channel.send(notification)

    await channel.cancel(notification.notification_id)
    await channel.cancel(notification.notification_id)  # second cancel has nothing left to do

    edits = [r for r in telegram.requests if r.path.endswith("/editMessageReplyMarkup")]
    assert [e.json for e in edits] == [
        {"chat_id": CHAT, "message_id": 1, "reply_markup": {"inline_keyboard": []}}
    ]
    assert "reply_markup" not in telegram.messages[(CHAT, 1)]


async def test_answer_callback_query(telegram: FakeTelegram, bot: TelegramBotApi) -> None:
    assert await bot.answer_callback_query("4382bfdwdsb323b2d9", "Acknowledged")
    assert telegram.requests[-1].json == {
        "callback_query_id": "4382bfdwdsb323b2d9",
        "text": "Acknowledged",
    }


async def test_voice_note_is_ogg_opus_speech_with_button(
    telegram: FakeTelegram, bot: TelegramBotApi, tmp_path: Path
) -> None:
    spoken: list[str] = []

    async def tts(text: str) -> bytes:
        spoken.append(text)
        return await espeak_8k_wav(text)

    channel = TelegramVoiceChannel(bot, tts)
    result = await channel.send(make_notification("telegram_voice", telegram_chat_id=CHAT))

    assert result.status is DeliveryStatus.DELIVERED, result
    assert spoken == [
        "critical alert. Checkout API error rate 12%. "
        "5xx ratio above 5% for 10 minutes on checkout-api in eu-west-1."
    ]
    [request] = telegram.requests
    assert request.path == f"/bot{telegram.token}/sendVoice"
    assert request.headers["content-type"].startswith("multipart/form-data; boundary=")
    assert dict(request.form) == {
        "chat_id": CHAT,
        "caption": "[CRITICAL] Checkout API error rate 12%\nAlert 7F3K",
        "reply_markup": json.dumps(KEYBOARD),
    }
    voice = request.files["voice"]
    assert (voice.filename, voice.content_type) == ("alert.ogg", "audio/ogg")
    uploaded = tmp_path / "voice.ogg"
    uploaded.write_bytes(voice.data)
    probe = json.loads(
        await _run(
            "ffprobe", "-v", "error", "-show_format", "-show_streams", "-of", "json", str(uploaded)
        )
    )
    assert probe["format"]["format_name"] == "ogg"
    [stream] = probe["streams"]
    assert (stream["codec_name"], stream["channels"]) == ("opus", 1)
    assert float(probe["format"]["duration"]) > 2.0  # a sentence, not a blip
    assert telegram.messages[(CHAT, 1)]["voice"]["duration"] >= 2


async def test_tts_failure_is_permanent_without_api_call(
    telegram: FakeTelegram, bot: TelegramBotApi
) -> None:
    async def broken_tts(text: str) -> bytes:
        raise RuntimeError("synthesiser crashed")

    channel = TelegramVoiceChannel(bot, broken_tts)
    result = await channel.send(make_notification("telegram_voice", telegram_chat_id=CHAT))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "tts_failed")
    assert telegram.requests == []


async def test_unencodable_audio_is_permanent_without_api_call(
    telegram: FakeTelegram, bot: TelegramBotApi
) -> None:
    async def not_wav(text: str) -> bytes:
        return b"RIFF but not really a wave file"

    channel = TelegramVoiceChannel(bot, not_wav)
    result = await channel.send(make_notification("telegram_voice", telegram_chat_id=CHAT))

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_PERMANENT,
        "opus_encode_failed",
    )
    assert telegram.requests == []


async def test_missing_ffmpeg_is_permanent_and_explained(
    telegram: FakeTelegram, bot: TelegramBotApi
) -> None:
    channel = TelegramVoiceChannel(bot, espeak_8k_wav, ffmpeg="/nonexistent/ffmpeg")
    result = await channel.send(make_notification("telegram_voice", telegram_chat_id=CHAT))

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_PERMANENT,
        "opus_encode_failed",
    )
    assert result.details["error"].startswith("cannot start '/nonexistent/ffmpeg'")
    assert telegram.requests == []


async def test_encoder_timeout_raises_encode_error() -> None:
    wav = await espeak_8k_wav("a long enough sentence to take more than no time at all")
    with pytest.raises(OpusEncodeError, match="timed out"):
        await wav_to_ogg_opus(wav, timeout_s=0.001)


async def test_missing_chat_id_is_permanent(telegram: FakeTelegram, bot: TelegramBotApi) -> None:
    result = await TelegramChannel(bot).send(make_notification("telegram"))

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_PERMANENT,
        "no_telegram_chat_id",
    )
    assert telegram.requests == []
