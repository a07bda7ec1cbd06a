"""A local Telegram Bot API for tests.

Serves `POST /bot<token>/<method>` for the methods ackline uses, accepting JSON, url-encoded
and multipart bodies as api.telegram.org does, and answers `{"ok": true, "result": ...}` or
`{"ok": false, "error_code": ..., "description": ...}` (429 adds `parameters.retry_after`).
One deliberate difference: a voice upload that is not OGG/Opus is refused, where Telegram
would also take MP3/M4A, because ackline must only ever send OGG/Opus.
Scripting keys (`match=`) are Bot API method names.
"""

from __future__ import annotations

import itertools
import json
import secrets
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response

from tests.fakes import FakeService, RecordedRequest, Scripted

__all__ = ["FakeTelegram", "TelegramFailure", "callback_query_update"]

_DESCRIPTIONS = {
    400: "Bad Request: chat not found",
    401: "Unauthorized",
    403: "Forbidden: bot was blocked by the user",
    404: "Not Found",
    429: "Too Many Requests: retry after {retry_after}",
    500: "Internal Server Error",
    502: "Bad Gateway",
}
_MAX_TEXT, _MAX_CAPTION, _MAX_CALLBACK_DATA = 4096, 1024, 64
_OPUS_GRANULE_RATE = 48_000


@dataclass(frozen=True)
class TelegramFailure:
    error_code: int
    description: str
    retry_after: int | None = None


def _fail(code: int, description: str, retry_after: int | None = None) -> JSONResponse:
    body: dict[str, Any] = {"ok": False, "error_code": code, "description": description}
    if retry_after is not None:
        body["parameters"] = {"retry_after": retry_after}
    return JSONResponse(body, status_code=code)


def _ok(result: Any) -> JSONResponse:
    return JSONResponse({"ok": True, "result": result})


def _keyboard_error(markup: Any) -> str | None:
    """What Telegram says about a bad inline keyboard, None if it is acceptable."""
    if isinstance(markup, str):
        try:
            markup = json.loads(markup)
        except ValueError:
            return "Bad Request: can't parse reply keyboard markup JSON object"
    rows = markup.get("inline_keyboard") if isinstance(markup, dict) else None
    if not isinstance(rows, list) or not all(isinstance(row, list) for row in rows):
        return "Bad Request: can't parse reply keyboard markup JSON object"
    for button in itertools.chain.from_iterable(rows):
        if not isinstance(button, dict) or not button.get("text"):
            return "Bad Request: can't parse inline keyboard button: Text is empty"
        data = button.get("callback_data")
        if data is not None and not 1 <= len(str(data).encode()) <= _MAX_CALLBACK_DATA:
            return "Bad Request: BUTTON_DATA_INVALID"
    return None


def _ogg_opus_duration(data: bytes) -> int | None:
    """Seconds of an OGG/Opus file from its last page's granule position; None if not one."""
    if not data.startswith(b"OggS") or b"OpusHead" not in data[:512]:
        return None
    last_page = data.rfind(b"OggS")
    granule: int = struct.unpack_from("<q", data, last_page + 6)[0]
    return max(1, round(granule / _OPUS_GRANULE_RATE))


def callback_query_update(
    data: str,
    *,
    user_id: int = 7_001_001,
    first_name: str = "Ada",
    username: str | None = "ada_oncall",
    chat_id: int = 7_001_001,
    message_id: int = 1,
) -> dict[str, Any]:
    """The Update Telegram POSTs to the bot's webhook when someone taps an inline button."""
    user: dict[str, Any] = {
        "id": user_id,
        "is_bot": False,
        "first_name": first_name,
        "language_code": "en",
    }
    if username is not None:
        user["username"] = username
    return {
        "update_id": secrets.randbelow(10**9),
        "callback_query": {
            "id": str(secrets.randbelow(10**18)),
            "from": user,
            "message": {
                "message_id": message_id,
                "from": {"id": 1, "is_bot": True, "first_name": "Ackline"},
                "chat": {"id": chat_id, "type": "private", "first_name": first_name},
                "date": int(time.time()),
                "text": "[CRITICAL] alert",
            },
            "chat_instance": str(-secrets.randbelow(10**18)),
            "data": data,
        },
    }


class FakeTelegram(FakeService):
    def __init__(self, token: str | None = None) -> None:
        super().__init__()
        self.bot_id = 6_000_000_000 + secrets.randbelow(10**8)
        self.token = token or f"{self.bot_id}:{secrets.token_urlsafe(26)[:35]}"
        self.messages: dict[tuple[str, int], dict[str, Any]] = {}  # (chat id, message id)
        self._message_ids = itertools.count(1)
        self._failures: Scripted[TelegramFailure] = Scripted()

    def fail_next(
        self,
        error_code: int,
        *,
        description: str | None = None,
        retry_after: int | None = None,
        count: int = 1,
        match: str | None = None,
    ) -> None:
        """Answer the next `count` calls (of method `match`) with a Bot API error."""
        if error_code == 429 and retry_after is None:
            retry_after = 5
        text = description or _DESCRIPTIONS[error_code].format(retry_after=retry_after)
        self._failures.push(
            TelegramFailure(error_code, text, retry_after), count=count, match=match
        )

    def script_key(self, request: RecordedRequest) -> str:
        return request.path.rpartition("/")[2]

    @staticmethod
    def params(request: RecordedRequest) -> dict[str, Any]:
        """Parameters however they were sent: query string, JSON or form fields."""
        merged: dict[str, Any] = dict(request.query)
        merged.update(request.form)
        if isinstance(request.json, dict):
            merged.update(request.json)
        return merged

    async def handle(self, request: RecordedRequest) -> Response:
        prefix, _, method = request.path.removeprefix("/bot").rpartition("/")
        if not request.path.startswith("/bot") or prefix != self.token:
            return _fail(401, "Unauthorized")
        failure = self._failures.take(method)
        if failure is not None:
            return _fail(failure.error_code, failure.description, failure.retry_after)
        params = self.params(request)
        handlers = {
            "getMe": self._get_me,
            "sendMessage": self._send_message,
            "sendVoice": self._send_voice,
            "editMessageReplyMarkup": self._edit_reply_markup,
            "answerCallbackQuery": self._answer_callback_query,
        }
        handler = handlers.get(method)
        if handler is None:
            return _fail(404, "Not Found")
        return handler(params, request)

    def _get_me(self, params: Mapping[str, Any], request: RecordedRequest) -> Response:
        return _ok({"id": self.bot_id, "is_bot": True, "first_name": "Ackline"})

    def _new_message(self, params: Mapping[str, Any], **content: Any) -> dict[str, Any]:
        chat_id = str(params["chat_id"])
        message: dict[str, Any] = {
            "message_id": next(self._message_ids),
            "from": {"id": self.bot_id, "is_bot": True, "first_name": "Ackline"},
            "chat": {"id": int(chat_id) if chat_id.lstrip("-").isdigit() else chat_id},
            "date": int(time.time()),
            **content,
        }
        if "reply_markup" in params:
            markup = params["reply_markup"]
            message["reply_markup"] = json.loads(markup) if isinstance(markup, str) else markup
        self.messages[(chat_id, message["message_id"])] = message
        return message

    def _common_error(self, params: Mapping[str, Any]) -> Response | None:
        if not params.get("chat_id"):
            return _fail(400, "Bad Request: chat_id is empty")
        if "reply_markup" in params and (error := _keyboard_error(params["reply_markup"])):
            return _fail(400, error)
        return None

    def _send_message(self, params: Mapping[str, Any], request: RecordedRequest) -> Response:
        if error := self._common_error(params):
            return error
        text = str(params.get("text") or "")
        if not text.strip():
            return _fail(400, "Bad Request: message text is empty")
        if len(text) > _MAX_TEXT:
            return _fail(400, "Bad Request: message is too long")
        return _ok(self._new_message(params, text=text))

    def _send_voice(self, params: Mapping[str, Any], request: RecordedRequest) -> Response:
        if error := self._common_error(params):
            return error
        upload = request.files.get("voice")
        if upload is None:
            return _fail(400, "Bad Request: there is no voice in the request")
        caption = str(params.get("caption") or "")
        if len(caption) > _MAX_CAPTION:
            return _fail(400, "Bad Request: message caption is too long")
        duration = _ogg_opus_duration(upload.data)
        if duration is None:
            return _fail(400, "Bad Request: wrong file type: voice must be OGG/Opus")
        voice = {
            "duration": duration,
            "mime_type": "audio/ogg",
            "file_id": secrets.token_urlsafe(48),
            "file_unique_id": secrets.token_urlsafe(12),
            "file_size": len(upload.data),
        }
        return _ok(self._new_message(params, voice=voice, caption=caption))

    def _edit_reply_markup(self, params: Mapping[str, Any], request: RecordedRequest) -> Response:
        message = self.messages.get((str(params.get("chat_id")), int(params.get("message_id", 0))))
        if message is None:
            return _fail(400, "Bad Request: message to edit not found")
        markup = params.get("reply_markup", {"inline_keyboard": []})
        markup = json.loads(markup) if isinstance(markup, str) else markup
        if message.get("reply_markup", {"inline_keyboard": []}) == markup:
            return _fail(
                400,
                "Bad Request: message is not modified: specified new message content and "
                "reply markup are exactly the same as a current content and reply markup "
                "of the message",
            )
        if markup.get("inline_keyboard"):
            message["reply_markup"] = markup
        else:
            message.pop("reply_markup", None)
        return _ok(message)

    def _answer_callback_query(
        self, params: Mapping[str, Any], request: RecordedRequest
    ) -> Response:
        if not params.get("callback_query_id"):
            return _fail(400, "Bad Request: QUERY_ID_INVALID")
        return _ok(True)
