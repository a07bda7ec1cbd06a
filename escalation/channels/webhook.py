"""Signed JSON POSTs to a customer endpoint (chat-ops bots, ticketing, another pager).

The receiver proves the call came from us and is fresh with `signing.verify_webhook`; the
notification id lets it drop duplicates when we retry. Redirects are not followed: a signed
page must go only where it was configured to go.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    RequestDeadline,
    ignore_progress,
)
from escalation.channels.signing import SIGNATURE_HEADER, sign_webhook

__all__ = ["WebhookChannel", "classify_webhook_status", "webhook_payload"]


def webhook_payload(n: Notification) -> dict[str, Any]:
    """The JSON document a receiver gets; fields are only ever added, never repurposed."""
    return {
        "alert_id": n.alert_id,
        "short_id": n.alert_short_id,
        "title": n.title,
        "summary": n.summary,
        "severity": n.severity,
        "details": dict(n.details),
        "notification_id": n.notification_id,
        "attempt": n.attempt,
        "recipient_id": n.contact.recipient_id,
        "ack_url": n.ack_url,
        "kind": n.kind.value,  # "alert", or "shift_reminder" (alert_id then empty)
    }


def classify_webhook_status(status: int) -> DeliveryStatus:
    """2xx delivered; 408, 429 and 5xx may heal; anything else (4xx, 3xx) will not."""
    if 200 <= status < 300:
        return DeliveryStatus.DELIVERED
    if status in (408, 429) or status >= 500:
        return DeliveryStatus.FAILED_RETRYABLE
    return DeliveryStatus.FAILED_PERMANENT


class WebhookChannel(RequestDeadline):
    """Channel "webhook": POSTs to `ContactPoint.webhook_url`, signed with `secret`."""

    name = "webhook"

    def __init__(
        self,
        secret: str | bytes,
        *,
        timeout_s: float = 10.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ValueError("webhook signing secret is empty")
        self._secret = secret
        self._client = client or httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._owns_client = client is None
        self._clock = clock

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        url = notification.contact.webhook_url
        if not url:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_webhook_url")
        return await self.post_signed(url, webhook_payload(notification))

    async def post_signed(self, url: str, payload: Mapping[str, Any]) -> DeliveryResult:
        """POST any JSON document signed as a page is (the status page's subscribers get
        incident updates this way), classified like a page's delivery."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "ackline-webhook/1",
            SIGNATURE_HEADER: sign_webhook(body, self._secret, int(self._clock())),
        }
        try:
            response = await self._client.post(
                url, content=body, headers=headers, follow_redirects=False
            )
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "invalid_url")
        except httpx.TimeoutException:
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "timeout")
        except httpx.TransportError:
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "connection_error")
        details: dict[str, str] = {}
        if "Retry-After" in response.headers:
            details["retry_after"] = response.headers["Retry-After"]
        status = classify_webhook_status(response.status_code)
        return DeliveryResult(status, f"http_{response.status_code}", details=details)

    async def cancel(self, notification_id: str) -> None:
        """A POST that was answered cannot be undone; nothing is queued here to stop."""

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()
