"""SMS through Twilio Messaging with the official SDK, rotating across several senders.

A page must not depend on one number or one account: a sender that is throttled, down or
misconfigured is skipped for the next one within the same attempt, while an error about
the recipient (invalid number, opted out) stops at once because no sender can fix it.
The blocking SDK runs in a worker thread so the event loop never waits on the network.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import requests
from twilio.base.exceptions import (  # type: ignore[import-untyped]
    TwilioException,
    TwilioRestException,
    TwilioServiceException,
)
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from carriers.twilio_api import twilio_client
from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    RequestDeadline,
    ignore_progress,
)

__all__ = [
    "InboundSms",
    "SmsChannel",
    "SmsStatusUpdate",
    "TwilioSender",
    "classify_twilio_error",
    "parse_inbound_sms",
    "parse_sms_status_callback",
    "sms_body",
    "validate_twilio_signature",
]

# Errors caused by the sending account or number, not by the recipient: another sender may
# work. 20003 authentication, 20404 wrong account, 21212 invalid From, 21606 From not
# SMS-capable, 21611 From's queue full, 30002 account suspended.
_SENDER_ERRORS = frozenset({20003, 20404, 21212, 21606, 21611, 30002})
# Delivery-report codes worth another try later: 30001 queue overflow, 30003 handset
# unreachable (off, no signal), 30008 unknown carrier error, 30017 carrier congestion.
_RETRYABLE_DELIVERY_ERRORS = frozenset({30001, 30003, 30008, 30017})

_ACK_RE = re.compile(r"\s*(?:1|ack(?:\s+#?([a-z0-9][a-z0-9-]{0,31}))?)\s*[.!]*\s*", re.I)


@dataclass(frozen=True)
class TwilioSender:
    """One way to send: an account plus either a From number or a Messaging Service."""

    account_sid: str
    auth_token: str
    from_number: str | None = None
    messaging_service_sid: str | None = None

    def __post_init__(self) -> None:
        if (self.from_number is None) == (self.messaging_service_sid is None):
            raise ValueError("a sender needs exactly one of from_number, messaging_service_sid")

    @property
    def label(self) -> str:
        return f"{self.account_sid}/{self.from_number or self.messaging_service_sid}"


def sms_body(notification: Notification) -> str:
    """What a responder reads and can answer with one keystroke."""
    if not notification.is_alert:
        return f"{notification.title} — {notification.summary}"
    return (
        f"[{notification.severity.upper()}] {notification.title} — "
        f"reply 1 or ACK {notification.alert_short_id} to acknowledge"
    )


def classify_twilio_error(status: int, code: int | None) -> tuple[DeliveryStatus, bool]:
    """(status, try the next sender) for a Twilio API error response."""
    if status >= 500 or status == 429 or code == 20429:
        return DeliveryStatus.FAILED_RETRYABLE, True
    if code in _SENDER_ERRORS or status in (401, 403):
        return DeliveryStatus.FAILED_PERMANENT, True
    return DeliveryStatus.FAILED_PERMANENT, False


class SmsChannel(RequestDeadline):
    """Channel "sms". Attempt N starts with sender N (round robin) and falls through the rest."""

    name = "sms"

    def __init__(
        self,
        senders: Sequence[TwilioSender],
        *,
        api_base: str | None = None,
        timeout_s: float = 10.0,
        status_callback_url: str | None = None,
    ) -> None:
        if not senders:
            raise ValueError("SmsChannel needs at least one TwilioSender")
        self._senders = list(senders)
        self._status_callback_url = status_callback_url
        self._clients = [
            twilio_client(s.account_sid, s.auth_token, api_base=api_base, timeout=timeout_s)
            for s in self._senders
        ]

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        phone = notification.contact.phone
        if not phone:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_phone")
        return await self.send_text(phone, sms_body(notification), notification.attempt)

    async def send_text(self, phone: str, body: str, attempt: int = 1) -> DeliveryResult:
        """Any text through the senders (the status page's subscribers get incident
        updates this way); attempt N starts with sender N."""
        start = (attempt - 1) % len(self._senders)
        order = [(start + i) % len(self._senders) for i in range(len(self._senders))]
        failures: list[tuple[DeliveryResult, str]] = []
        for index in order:
            result, try_next = await asyncio.to_thread(self._send_one, index, phone, body)
            if result.status is DeliveryStatus.DELIVERED or not try_next:
                return result
            failures.append((result, self._senders[index].label))
        # Every sender failed: retryable if any failure may heal, so the engine retries.
        retryable = [r for r, _ in failures if r.status is DeliveryStatus.FAILED_RETRYABLE]
        final = (retryable or [r for r, _ in failures])[-1]
        tried = ";".join(f"{label}={r.reason}" for r, label in failures)
        return DeliveryResult(final.status, final.reason, details={**final.details, "tried": tried})

    def _send_one(self, index: int, to: str, body: str) -> tuple[DeliveryResult, bool]:
        sender = self._senders[index]
        options: dict[str, str] = {"to": to, "body": body}
        if sender.from_number:
            options["from_"] = sender.from_number
        else:
            options["messaging_service_sid"] = str(sender.messaging_service_sid)
        if self._status_callback_url:
            options["status_callback"] = self._status_callback_url
        try:
            message = self._clients[index].messages.create(**options)
        except (TwilioRestException, TwilioServiceException) as exc:
            status, try_next = classify_twilio_error(int(exc.status), exc.code)
            reason = f"twilio_{exc.code or exc.status}"
            return DeliveryResult(status, reason, details={"sender": sender.label}), try_next
        except requests.Timeout:
            return _retryable("twilio_timeout", sender), True
        except (requests.RequestException, TwilioException):
            return _retryable("twilio_connection_error", sender), True
        details = {"sender": sender.label, "twilio_status": str(message.status)}
        return DeliveryResult(DeliveryStatus.DELIVERED, "queued", str(message.sid), details), False

    async def cancel(self, notification_id: str) -> None:
        """A handed-over SMS cannot be recalled; an in-flight send stops at the next sender
        when the engine cancels its task, so there is nothing to do here."""


def _retryable(reason: str, sender: TwilioSender) -> DeliveryResult:
    return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, reason, details={"sender": sender.label})


class InboundSms(NamedTuple):
    phone: str
    short_id: str | None  # None: "1"/"ACK" alone, meaning the latest alert paged to `phone`
    is_ack: bool


def parse_inbound_sms(form: Mapping[str, str]) -> InboundSms:
    """Read Twilio's inbound-message webhook form: "1", "ACK" or "ACK <short id>" acknowledge."""
    phone = form.get("From", "").strip()
    match = _ACK_RE.fullmatch(form.get("Body", ""))
    if match is None:
        return InboundSms(phone, None, False)
    short_id = match.group(1)
    return InboundSms(phone, short_id.upper() if short_id else None, True)


class SmsStatusUpdate(NamedTuple):
    message_sid: str
    result: DeliveryResult


def parse_sms_status_callback(form: Mapping[str, str]) -> SmsStatusUpdate | None:
    """Classify Twilio's StatusCallback form; None until the message reaches a final state.

    "delivered" confirms the hand-off; "undelivered"/"failed" arrive minutes after the API
    accepted the message and should move the engine to its retry or fallback.
    """
    sid, status = form.get("MessageSid", ""), form.get("MessageStatus", "")
    if not sid:
        return None
    if status == "delivered":
        return SmsStatusUpdate(sid, DeliveryResult(DeliveryStatus.DELIVERED, "delivered", sid))
    if status not in ("undelivered", "failed"):
        return None
    code = form.get("ErrorCode", "")
    retryable = code.isdigit() and int(code) in _RETRYABLE_DELIVERY_ERRORS
    verdict = DeliveryStatus.FAILED_RETRYABLE if retryable else DeliveryStatus.FAILED_PERMANENT
    return SmsStatusUpdate(sid, DeliveryResult(verdict, f"twilio_{code or status}", sid))


def validate_twilio_signature(
    url: str, params: Mapping[str, str], signature: str | None, auth_token: str
) -> bool:
    """Check X-Twilio-Signature; `url` must be the public URL Twilio called, query included."""
    if not signature:
        return False
    return bool(RequestValidator(auth_token).validate(url, dict(params), signature))
