"""Slack channel: a Block Kit message with Acknowledge and Resolve buttons, via slack_sdk.

The buttons come back to the API as interactions (`/v1/webhooks/slack/interactions`),
verified with the app's signing secret and parsed by `parse_slack_interaction`; the
handler closes the alert and rewrites the message with `closed_blocks` to say who did.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.web.async_slack_response import AsyncSlackResponse

from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    RequestDeadline,
    SentMessages,
    ignore_progress,
)
from storage.models import AlertState

__all__ = [
    "SLACK_API_BASE",
    "SlackAction",
    "SlackChannel",
    "SlackPress",
    "SlackWebApi",
    "classify_slack_error",
    "closed_blocks",
    "outcome_line",
    "parse_slack_interaction",
    "verify_slack_request",
]

SLACK_API_BASE = "https://slack.com/api/"
ACTIONS_BLOCK = "ackline_actions"  # block ids let an update find and replace these blocks
OUTCOME_BLOCK = "ackline_outcome"
_MAX_SECTION_TEXT = 3000  # Block Kit's limit for a section's text
# Slack errors that a later attempt may not meet; every other `ok: false` is the request's
# own fault (bad token, unknown channel, archived channel) and will not heal by retrying.
_TRANSIENT_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)


class SlackAction(enum.StrEnum):
    """A button's action_id, and the alert state pressing it asks for."""

    ACKNOWLEDGE = "ackline_ack"
    RESOLVE = "ackline_resolve"

    @property
    def state(self) -> AlertState:
        if self is SlackAction.ACKNOWLEDGE:
            return AlertState.ACKNOWLEDGED
        return AlertState.RESOLVED


_BUTTONS = {
    SlackAction.ACKNOWLEDGE: ("Acknowledge", "primary"),
    SlackAction.RESOLVE: ("Resolve", "danger"),
}


def classify_slack_error(
    status: int, payload: Mapping[str, Any] | None, retry_after: str | None = None
) -> DeliveryResult:
    """Map a failed Web API call to the engine's vocabulary: 429, 5xx and Slack's own
    transient errors may heal; invalid_auth, channel_not_found and the like will not."""
    error = (payload or {}).get("error")
    error = error if isinstance(error, str) and error else f"http_{status}"
    details = {"error": error}
    if retry_after is not None:
        details["retry_after"] = retry_after
    retryable = status == 429 or status >= 500 or error in _TRANSIENT_ERRORS
    verdict = DeliveryStatus.FAILED_RETRYABLE if retryable else DeliveryStatus.FAILED_PERMANENT
    return DeliveryResult(verdict, f"slack_{error}", details=details)


class SlackWebApi:
    """A bot token and slack_sdk's AsyncWebClient; `api_base` points at a fake in tests.

    slack_sdk's own retries are off: the engine owns retrying, with the policy's backoff.
    """

    def __init__(self, token: str, *, api_base: str | None = None, timeout_s: float = 15.0) -> None:
        if not token:
            raise ValueError("Slack bot token is empty")
        self.client = AsyncWebClient(
            token=token,
            base_url=api_base or SLACK_API_BASE,
            timeout=max(1, round(timeout_s)),
            retry_handlers=[],
        )

    async def post_message(
        self, channel: str, text: str, blocks: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any] | DeliveryResult:
        return await _classified(
            self.client.chat_postMessage(
                channel=channel, text=text, blocks=[dict(b) for b in blocks], unfurl_links=False
            )
        )

    async def update_message(
        self, channel: str, ts: str, text: str, blocks: Sequence[Mapping[str, Any]]
    ) -> dict[str, Any] | DeliveryResult:
        return await _classified(
            self.client.chat_update(
                channel=channel, ts=ts, text=text, blocks=[dict(b) for b in blocks]
            )
        )


async def _classified(call: Awaitable[AsyncSlackResponse]) -> dict[str, Any] | DeliveryResult:
    """The response body on success, else a classified failure; never raises for network
    or API errors (and never puts the token-bearing request in a reason)."""
    try:
        response = await call
    except SlackApiError as exc:
        answer = exc.response
        # a SlackResponse, or aiohttp's own response when the body was not JSON
        status = getattr(answer, "status_code", None) or getattr(answer, "status", None)
        data = getattr(answer, "data", None)
        headers = getattr(answer, "headers", None) or {}
        return classify_slack_error(
            status if isinstance(status, int) else 0,
            data if isinstance(data, dict) else None,
            headers.get("Retry-After"),
        )
    except TimeoutError:
        return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "slack_timeout")
    except aiohttp.ClientError:
        return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "slack_connection_error")
    data = response.data
    return data if isinstance(data, dict) else {}


def _mrkdwn(text: str) -> str:
    """Slack's three control characters escaped, so an alert cannot mention @channel."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _actions(alert_id: str, actions: Sequence[SlackAction]) -> dict[str, Any]:
    buttons = [
        {
            "type": "button",
            "action_id": action.value,
            "text": {"type": "plain_text", "text": _BUTTONS[action][0]},
            "style": _BUTTONS[action][1],
            "value": alert_id,
        }
        for action in actions
    ]
    return {"type": "actions", "block_id": ACTIONS_BLOCK, "elements": buttons}


def alert_blocks(n: Notification) -> list[dict[str, Any]]:
    text = f"*{_mrkdwn(n.headline)}*\n{_mrkdwn(n.summary)}"[:_MAX_SECTION_TEXT]
    if not n.is_alert:  # a reminder: nothing to acknowledge or resolve
        return [{"type": "section", "text": {"type": "mrkdwn", "text": text}}]
    return [
        {"type": "section", "text": {"type": "mrkdwn", "text": text}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": f"Alert {n.alert_short_id}"}]},
        _actions(n.alert_id, list(SlackAction)),
    ]


def closed_blocks(
    blocks: Sequence[Mapping[str, Any]], alert_id: str, state: AlertState, outcome: str
) -> list[dict[str, Any]]:
    """The message's blocks with `outcome` in place of the buttons; an acknowledged alert
    keeps its Resolve button, since whoever acked usually resolves it from there."""
    kept = [dict(b) for b in blocks if b.get("block_id") not in (ACTIONS_BLOCK, OUTCOME_BLOCK)]
    kept.append(
        {
            "type": "context",
            "block_id": OUTCOME_BLOCK,
            "elements": [{"type": "mrkdwn", "text": outcome}],
        }
    )
    if state is AlertState.ACKNOWLEDGED:
        kept.append(_actions(alert_id, [SlackAction.RESOLVE]))
    return kept


def outcome_line(state: AlertState, actor: str | None) -> str:
    """What the message says once the alert is closed; Slack users are mentioned."""
    if actor and actor.startswith("slack:"):
        who = f"<@{actor.removeprefix('slack:')}>"
    else:
        who = _mrkdwn(actor or "someone")
    if state is AlertState.ACKNOWLEDGED:
        return f":white_check_mark: Acknowledged by {who}"
    if state is AlertState.RESOLVED:
        return f":heavy_check_mark: Resolved by {who}"
    return f"Alert is {state.value}."


@dataclass(frozen=True)
class _Posted:
    channel: str  # where it landed: a user id is answered with the DM's channel id
    ts: str
    text: str
    blocks: list[dict[str, Any]]


class SlackChannel(RequestDeadline):
    """Channel "slack": posts to `ContactPoint.slack_channel` (a channel or user id)."""

    name = "slack"

    def __init__(self, api: SlackWebApi) -> None:
        self.api = api
        self._sent: SentMessages[_Posted] = SentMessages()

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        channel = notification.contact.slack_channel
        if not channel:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_slack_channel")
        text = f"{notification.headline}: {notification.summary}"  # notifications, screen readers
        blocks = alert_blocks(notification)
        outcome = await self.api.post_message(channel, text, blocks)
        if isinstance(outcome, DeliveryResult):
            return outcome
        ts, posted_in = outcome.get("ts"), outcome.get("channel")
        if not isinstance(ts, str) or not isinstance(posted_in, str):
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "slack_bad_response")
        self._sent.add(notification.notification_id, _Posted(posted_in, ts, text, blocks))
        return DeliveryResult(DeliveryStatus.DELIVERED, "sent", ts, {"channel": posted_in})

    async def cancel(self, notification_id: str) -> None:
        """Take the buttons off messages this process sent for the notification; best
        effort, a late press only finds the alert already closed."""
        for posted in self._sent.pop(notification_id):
            blocks = [b for b in posted.blocks if b.get("block_id") != ACTIONS_BLOCK]
            await self.api.update_message(posted.channel, posted.ts, posted.text, blocks)


@dataclass(frozen=True)
class SlackPress:
    """A press of one of our buttons, as an interaction payload reports it."""

    action: SlackAction
    alert_id: str
    user_id: str
    channel: str | None  # where the message is, for chat.update
    ts: str | None
    text: str
    blocks: list[dict[str, Any]]


def verify_slack_request(
    body: bytes, timestamp: str | None, signature: str | None, signing_secret: str
) -> bool:
    """Slack's v0 request signature: HMAC-SHA256 over "v0:{timestamp}:{body}", compared in
    constant time, with the timestamp within five minutes so a capture cannot be replayed."""
    if timestamp is None or not timestamp.isdigit():
        return False
    return SignatureVerifier(signing_secret).is_valid(body, timestamp, signature)


def parse_slack_interaction(body: bytes) -> SlackPress | None:
    """The button press in a form-encoded interaction body; None for anything else."""
    try:
        [raw] = parse_qs(body.decode(), strict_parsing=True).get("payload", [])
        payload = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("type") != "block_actions":
        return None
    actions, user = payload.get("actions"), payload.get("user")
    if not isinstance(actions, list) or not actions or not isinstance(actions[0], dict):
        return None
    action_id, alert_id = actions[0].get("action_id"), actions[0].get("value")
    user_id = user.get("id") if isinstance(user, dict) else None
    if action_id not in set(SlackAction) or not isinstance(alert_id, str) or not alert_id:
        return None
    if not isinstance(user_id, str) or not user_id:
        return None
    container = _dict(payload.get("container"))
    message = _dict(payload.get("message"))
    channel = container.get("channel_id") or _dict(payload.get("channel")).get("id")
    ts = container.get("message_ts") or message.get("ts")
    blocks = message.get("blocks")
    return SlackPress(
        SlackAction(action_id),
        alert_id,
        user_id,
        channel if isinstance(channel, str) else None,
        ts if isinstance(ts, str) else None,
        str(message.get("text") or ""),
        [b for b in blocks if isinstance(b, dict)] if isinstance(blocks, list) else [],
    )


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}
