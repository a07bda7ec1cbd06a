"""A local Slack Web API for tests, and the interaction requests Slack sends back.

Serves `POST /api/<method>` for chat.postMessage and chat.update with a bearer token, and
answers as slack.com does: HTTP 200 with `{"ok": true, ...}` or `{"ok": false, "error":
...}`, except rate limits, which are HTTP 429 with a Retry-After header. Blocks are checked
against the Block Kit limits ackline could trip over. Posting to a user id answers with
the id of the DM channel, as Slack does. Scripting keys (`match=`) are API method names.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from starlette.responses import JSONResponse, Response

from tests.fakes import FakeService, RecordedRequest, Scripted

__all__ = ["FakeSlack", "SlackFailure", "interaction_request"]

_BLOCK_TYPES = {"section", "context", "actions", "divider", "header"}
_MAX_BLOCKS, _MAX_SECTION_TEXT, _MAX_BUTTON_TEXT, _MAX_VALUE = 50, 3000, 75, 2000


@dataclass(frozen=True)
class SlackFailure:
    error: str
    status: int = 200
    retry_after: int | None = None


def _fail(error: str, status: int = 200, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"ok": False, "error": error}, status_code=status, headers=headers)


def _blocks_error(blocks: Any) -> str | None:
    """Why Slack would answer invalid_blocks, None if the blocks are acceptable."""
    if not isinstance(blocks, list) or len(blocks) > _MAX_BLOCKS:
        return "invalid_blocks"
    action_ids: list[str] = []
    for block in blocks:
        if not isinstance(block, dict) or block.get("type") not in _BLOCK_TYPES:
            return "invalid_blocks"
        if block["type"] == "section":
            text = block.get("text")
            size = len(text.get("text", "")) if isinstance(text, dict) else 0
            if not 1 <= size <= _MAX_SECTION_TEXT:
                return "invalid_blocks"
        for element in block.get("elements", []) if block["type"] == "actions" else []:
            label = element.get("text", {})
            if element.get("type") != "button" or label.get("type") != "plain_text":
                return "invalid_blocks"
            if not 1 <= len(label.get("text", "")) <= _MAX_BUTTON_TEXT:
                return "invalid_blocks"
            if len(str(element.get("value", ""))) > _MAX_VALUE:
                return "invalid_blocks"
            if element.get("style") not in (None, "primary", "danger"):
                return "invalid_blocks"
            action_ids.append(str(element.get("action_id", "")))
    if len(action_ids) != len(set(action_ids)):
        return "invalid_blocks"  # action ids must be unique within a message
    return None


class FakeSlack(FakeService):
    def __init__(self, *channels: str, token: str | None = None) -> None:
        super().__init__()
        self.token = token or f"xoxb-{secrets.randbelow(10**12)}-{secrets.token_hex(12)}"
        self.channels = set(channels)  # ids that exist; user ids (U...) open a DM
        self.messages: dict[tuple[str, str], dict[str, Any]] = {}  # (channel id, ts)
        self._seq = itertools.count(1)
        self._failures: Scripted[SlackFailure] = Scripted()

    def fail_next(
        self,
        error: str,
        *,
        status: int = 200,
        retry_after: int | None = None,
        count: int = 1,
        match: str | None = None,
    ) -> None:
        """Answer the next `count` calls (of method `match`) with a Web API error."""
        self._failures.push(SlackFailure(error, status, retry_after), count=count, match=match)

    def script_key(self, request: RecordedRequest) -> str:
        return request.path.rpartition("/")[2]

    async def handle(self, request: RecordedRequest) -> Response:
        method = request.path.removeprefix("/api/")
        auth = request.headers.get("authorization")
        if auth is None:
            return _fail("not_authed")
        if not hmac.compare_digest(auth, f"Bearer {self.token}"):
            return _fail("invalid_auth")
        failure = self._failures.take(method)
        if failure is not None:
            return _fail(failure.error, failure.status, failure.retry_after)
        params: dict[str, Any] = dict(request.form)
        if isinstance(request.json, dict):
            params.update(request.json)
        handlers = {"chat.postMessage": self._post_message, "chat.update": self._update}
        handler = handlers.get(method)
        if handler is None:
            return _fail("unknown_method", 404)
        return handler(params)

    def _conversation(self, channel: Any) -> str | None:
        name = str(channel or "")
        if name not in self.channels:
            return None
        return "D" + name[1:] if name.startswith("U") else name

    def _content_error(self, params: Mapping[str, Any]) -> str | None:
        if "blocks" in params and (error := _blocks_error(params["blocks"])):
            return error
        if not params.get("text") and not params.get("blocks"):
            return "no_text"
        return None

    def _post_message(self, params: Mapping[str, Any]) -> Response:
        channel = self._conversation(params.get("channel"))
        if channel is None:
            return _fail("channel_not_found")
        if error := self._content_error(params):
            return _fail(error)
        ts = f"{int(time.time())}.{next(self._seq):06d}"
        message = {"type": "message", "user": "UACKLINEBOT", "ts": ts, "bot_id": "BACKLINE"}
        message |= {k: params[k] for k in ("text", "blocks") if k in params}
        self.messages[(channel, ts)] = message
        return JSONResponse({"ok": True, "channel": channel, "ts": ts, "message": message})

    def _update(self, params: Mapping[str, Any]) -> Response:
        channel, ts = str(params.get("channel", "")), str(params.get("ts", ""))
        message = self.messages.get((channel, ts))
        if message is None:
            known = {c for c, _ in self.messages}
            return _fail("message_not_found" if channel in known else "channel_not_found")
        if error := self._content_error(params):
            return _fail(error)
        message |= {k: params[k] for k in ("text", "blocks") if k in params}
        return JSONResponse({"ok": True, "channel": channel, "ts": ts, "text": message["text"]})


def interaction_request(
    message: Mapping[str, Any],
    channel: str,
    action_id: str,
    signing_secret: str,
    *,
    user_id: str = "U07ADA0001",
    timestamp: int | None = None,
) -> tuple[bytes, dict[str, str]]:
    """The body and headers Slack POSTs to the Request URL when `action_id` is pressed on
    `message` (as the fake stored it), signed with `signing_secret` at `timestamp`."""
    [action] = [
        {**e, "block_id": b["block_id"], "action_ts": f"{time.time():.6f}"}
        for b in message["blocks"]
        if b["type"] == "actions"
        for e in b["elements"]
        if e["action_id"] == action_id
    ]
    payload = {
        "type": "block_actions",
        "user": {"id": user_id, "username": "ada", "name": "ada", "team_id": "T07ACME01"},
        "api_app_id": "A07ACKLINE",
        "token": "verification-token-unused",
        "container": {
            "type": "message",
            "message_ts": message["ts"],
            "channel_id": channel,
            "is_ephemeral": False,
        },
        "trigger_id": f"{secrets.randbelow(10**12)}.{secrets.token_hex(8)}",
        "team": {"id": "T07ACME01", "domain": "acme"},
        "channel": {"id": channel, "name": "ops"},
        "message": dict(message),
        "response_url": "https://hooks.slack.com/actions/T07ACME01/1/abc",
        "actions": [action],
    }
    body = urlencode({"payload": json.dumps(payload)}).encode()
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hmac.new(signing_secret.encode(), b"v0:" + ts.encode() + b":" + body, hashlib.sha256)
    headers = {
        "Content-Type": "application/x-www-form-urlencoded",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": f"v0={digest.hexdigest()}",
    }
    return body, headers
