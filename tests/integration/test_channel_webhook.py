"""WebhookChannel over httpx against a local receiving HTTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest
from starlette.responses import Response

from escalation.channels.base import DeliveryStatus
from escalation.channels.signing import verify_webhook
from escalation.channels.webhook import WebhookChannel
from tests.fakes import FakeService, RecordedRequest, Scripted, free_port, make_notification

SECRET = "whsec_test_secret"


class Receiver(FakeService):
    """A customer endpoint: 204 unless told otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: Scripted[tuple[int, dict[str, str]]] = Scripted()

    def script_key(self, request: RecordedRequest) -> str:
        return request.path

    async def handle(self, request: RecordedRequest) -> Response:
        status, headers = self.replies.take(request.path) or (204, {})
        return Response(status_code=status, headers=headers)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    async with Receiver() as server:
        yield server


@pytest.fixture
async def channel() -> AsyncIterator[WebhookChannel]:
    webhook = WebhookChannel(SECRET, timeout_s=2)
    yield webhook
    await webhook.aclose()


async def test_posts_signed_json(receiver: Receiver, channel: WebhookChannel) -> None:
    notification = make_notification("webhook", webhook_url=f"{receiver.url}/hooks/pager")

    result = await channel.send(notification)

    assert (result.status, result.reason) == (DeliveryStatus.DELIVERED, "http_204")
    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", "/hooks/pager")
    assert request.headers["content-type"] == "application/json"
    assert json.loads(request.body) == {
        "alert_id": notification.alert_id,
        "short_id": "7F3K",
        "title": notification.title,
        "summary": notification.summary,
        "severity": "critical",
        "details": {"runbook": "https://runbooks.example/checkout"},
        "notification_id": notification.notification_id,
        "attempt": 1,
        "recipient_id": "r-ada",
        "ack_url": "https://ackline.example/ack/TOKEN",
        "kind": "alert",
    }
    # Verify as a receiver would, from the documented scheme alone (Stripe's).
    header = request.headers["x-ackline-signature"]
    fields = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(
        SECRET.encode(), fields["t"].encode() + b"." + request.body, hashlib.sha256
    ).hexdigest()
    assert fields["v1"] == expected
    assert abs(int(fields["t"]) - time.time()) < 60
    assert verify_webhook(header, request.body, SECRET, now=time.time())
    assert not verify_webhook(header, request.body + b" ", SECRET, now=time.time())


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, DeliveryStatus.DELIVERED),
        (202, DeliveryStatus.DELIVERED),
        (408, DeliveryStatus.FAILED_RETRYABLE),
        (429, DeliveryStatus.FAILED_RETRYABLE),
        (500, DeliveryStatus.FAILED_RETRYABLE),
        (503, DeliveryStatus.FAILED_RETRYABLE),
        (400, DeliveryStatus.FAILED_PERMANENT),
        (401, DeliveryStatus.FAILED_PERMANENT),
        (404, DeliveryStatus.FAILED_PERMANENT),
        (410, DeliveryStatus.FAILED_PERMANENT),
    ],
)
async def test_status_codes_are_classified(
    receiver: Receiver, channel: WebhookChannel, status: int, verdict: DeliveryStatus
) -> None:
    receiver.replies.push((status, {}), count=1, match=None)

    result = await channel.send(make_notification("webhook", webhook_url=receiver.url + "/h"))

    assert (result.status, result.reason) == (verdict, f"http_{status}")


async def test_retry_after_is_passed_on(receiver: Receiver, channel: WebhookChannel) -> None:
    receiver.replies.push((429, {"Retry-After": "30"}), count=1, match=None)

    result = await channel.send(make_notification("webhook", webhook_url=receiver.url + "/h"))

    assert result.status is DeliveryStatus.FAILED_RETRYABLE
    assert result.details == {"retry_after": "30"}


async def test_redirect_is_not_followed(receiver: Receiver, channel: WebhookChannel) -> None:
    receiver.replies.push((307, {"Location": f"{receiver.url}/elsewhere"}), count=1, match=None)

    result = await channel.send(make_notification("webhook", webhook_url=receiver.url + "/h"))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "http_307")
    assert [r.path for r in receiver.requests] == ["/h"]


async def test_timeout_is_retryable(receiver: Receiver) -> None:
    webhook = WebhookChannel(SECRET, timeout_s=0.3)
    receiver.stall_next(1.0)
    try:
        result = await webhook.send(make_notification("webhook", webhook_url=receiver.url))
    finally:
        await webhook.aclose()

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_RETRYABLE, "timeout")


@pytest.mark.parametrize(
    ("url", "verdict", "reason"),
    [
        ("http://127.0.0.1:{closed_port}/h", DeliveryStatus.FAILED_RETRYABLE, "connection_error"),
        ("ftp://127.0.0.1/h", DeliveryStatus.FAILED_PERMANENT, "invalid_url"),
        ("http://", DeliveryStatus.FAILED_PERMANENT, "invalid_url"),
        (None, DeliveryStatus.FAILED_PERMANENT, "no_webhook_url"),
    ],
)
async def test_unusable_targets(
    channel: WebhookChannel, url: str | None, verdict: DeliveryStatus, reason: str
) -> None:
    notification = make_notification("webhook")
    target = url.format(closed_port=free_port()) if url else None
    notification = replace(notification, contact=replace(notification.contact, webhook_url=target))

    result = await channel.send(notification)

    assert (result.status, result.reason) == (verdict, reason)
