"""The contract between the escalation engine and every notification channel.

The engine decides who, when and how often; a channel only knows how to deliver one
notification and report what happened, classified so the engine can retry, fall back or
stop without knowing provider details.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

T = TypeVar("T")


class DeliveryStatus(str, enum.Enum):
    """Outcome of one delivery attempt, as the engine needs it."""

    DELIVERED = "delivered"  # handed to the provider/person; an ack may still come later
    ACKNOWLEDGED = "acknowledged"  # acknowledged within the attempt (voice: pressed 1)
    ESCALATE = "escalate"  # the recipient asked to escalate now (voice: pressed 2)
    RESOLVED = "resolved"  # resolved within the attempt (voice: pressed 3)
    SNOOZE = "snooze"  # the recipient asked to pause the chain (voice: pressed 4)
    NOT_ACKNOWLEDGED = "not_acknowledged"  # reached, but no ack (no digit, wrong digits, voicemail)
    FAILED_RETRYABLE = "failed_retryable"  # busy, no answer, 5xx, timeout, provider 429/5xx
    FAILED_PERMANENT = "failed_permanent"  # invalid number, 4xx from provider, blocked chat
    CANCELLED = "cancelled"  # stopped because the alert was acknowledged or resolved meanwhile


@dataclass(frozen=True)
class ContactPoint:
    """Where a recipient can be reached; a channel uses the field it needs."""

    recipient_id: str
    name: str
    phone: str | None = None  # E.164
    telegram_chat_id: str | None = None
    email: str | None = None
    webhook_url: str | None = None
    slack_channel: str | None = None


class NotificationKind(str, enum.Enum):
    """What a message is: a page for an alert, or a heads-up with nothing to acknowledge
    (channels then leave out their Acknowledge buttons and "reply 1" hints)."""

    ALERT = "alert"
    SHIFT_REMINDER = "shift_reminder"


@dataclass(frozen=True)
class Notification:
    """One attempt to reach one recipient on one channel for one alert (or, with
    `kind` SHIFT_REMINDER, one reminder: `alert_id` is then empty)."""

    notification_id: str  # uuid, stable across retries of the same attempt chain
    alert_id: str
    alert_short_id: str  # what a human types back ("ACK 7F3K")
    channel: str
    contact: ContactPoint
    title: str
    summary: str
    severity: str
    attempt: int  # 1-based within this channel's retry policy
    ack_url: str | None = None  # signed one-click link (email/webhook)
    details: Mapping[str, str] = field(default_factory=dict)
    policy: str = ""  # the escalation policy paging (per-policy channel behaviour)
    kind: NotificationKind = NotificationKind.ALERT

    @property
    def is_alert(self) -> bool:
        return self.kind is NotificationKind.ALERT

    @property
    def headline(self) -> str:
        """The first line of every text page, so all chat channels read alike."""
        if not self.is_alert:
            return self.title
        return f"[{self.severity.upper()}] {self.title}"


@dataclass(frozen=True)
class DeliveryResult:
    status: DeliveryStatus
    reason: str  # machine-readable cause, e.g. "busy", "sip_503", "telegram_403", "voicemail"
    provider_id: str | None = None  # call id, Twilio SID, Telegram message id
    details: Mapping[str, str] = field(default_factory=dict)


class SentMessages(Generic[T]):
    """The chat messages this process sent per notification, so `cancel` can take their
    buttons away; bounded, as a process pages for months and cancel is best effort."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._sent: OrderedDict[str, list[T]] = OrderedDict()

    def add(self, notification_id: str, message: T) -> None:
        self._sent.setdefault(notification_id, []).append(message)
        self._sent.move_to_end(notification_id)
        while len(self._sent) > self._limit:
            self._sent.popitem(last=False)

    def pop(self, notification_id: str) -> list[T]:
        return self._sent.pop(notification_id, [])


class Progress(enum.Enum):
    """What a channel tells the worker while a delivery is still under way."""

    # A person picked up. Recorded at once: if the worker is lost before the result is,
    # the attempt is not placed a second time (they would be rung twice for one attempt);
    # it counts as answered without a key, and the policy decides what follows.
    ANSWERED = "answered"


ProgressSink = Callable[[Progress], None]


def ignore_progress(_progress: Progress) -> None:
    """The progress sink of a delivery nobody tracks (a channel used on its own)."""


# The bound of a delivery that is one request to a provider: connect, send, read the
# answer, with the provider's own timeouts well inside it.
REQUEST_DEADLINE = 60.0


class RequestDeadline:
    """`Channel.deadline` of a channel whose delivery is one request to a provider."""

    def deadline(self, notification: Notification) -> float:
        return REQUEST_DEADLINE


class Channel(Protocol):
    """A delivery mechanism. Implementations must never raise for provider failures:
    they classify them into a DeliveryResult so the engine can decide."""

    name: str

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult: ...

    async def cancel(self, notification_id: str) -> None:
        """Stop an in-flight delivery (hang up a ringing or answered call politely)."""
        ...

    def deadline(self, notification: Notification) -> float:
        """The hard upper bound of one delivery, in seconds: past it the worker cancels
        the send and records it as failed (retryable), so no attempt stays open."""
        ...
