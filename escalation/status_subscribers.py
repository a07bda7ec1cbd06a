"""People and systems told of the status page's incident updates: email (double opt-in,
one-click unsubscribe per RFC 8058), SMS, Telegram, signed webhooks and Slack incoming
webhooks.

Deliveries reuse the escalation channels a node already has (the relay, the Twilio
senders, the bot, the webhook signing secret); every delivery is an audit line
(`status_notification`), and both sign-ups and deliveries are rate-limited so the public
form cannot be turned into a mail or request cannon.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import logging
import re
import secrets
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from escalation.audit_records import RequestContext
from escalation.channels.base import DeliveryResult, DeliveryStatus
from escalation.statuspage import Incident, IncidentUpdate, StatusService
from storage.models import StatusSubscriberRow

__all__ = [
    "RateLimited",
    "SlidingWindow",
    "StatusSubscriptions",
    "Subscriber",
    "SubscriberKind",
    "SubscriptionError",
    "SubscriptionState",
]

log = logging.getLogger(__name__)


class SubscriberKind(enum.StrEnum):
    EMAIL = "email"
    SMS = "sms"
    TELEGRAM = "telegram"
    WEBHOOK = "webhook"
    SLACK = "slack"  # a Slack incoming-webhook URL


# The escalation channel each kind is delivered through (Slack: a plain HTTPS POST).
CHANNEL_OF = {
    SubscriberKind.EMAIL: "email",
    SubscriberKind.SMS: "sms",
    SubscriberKind.TELEGRAM: "telegram",
    SubscriberKind.WEBHOOK: "webhook",
}
_EMAIL = re.compile(r"[^@\s<>\"]{1,64}@[A-Za-z0-9.-]{1,253}\.[A-Za-z]{2,63}")
_PHONE = re.compile(r"\+[1-9][0-9]{6,14}")
_CHAT = re.compile(r"-?[0-9]{1,20}")
_URL = re.compile(r"https?://[^\s]{1,1990}")
_UNSUB_LABEL = b"ackline-status-unsubscribe-v1\x00"


class SubscriptionError(ValueError):
    """The address does not fit its kind, or the kind is not offered here."""


class RateLimited(Exception):
    """Too many sign-ups from one source, or messages to one subscriber, just now."""


class SubscriptionState(enum.StrEnum):
    PENDING = "pending"  # signed up, the confirmation link not used yet
    CONFIRMED = "confirmed"
    UNSUBSCRIBED = "unsubscribed"


@dataclass(frozen=True)
class Subscriber:
    id: str
    kind: SubscriberKind
    address: str
    confirmed: bool
    state: SubscriptionState = SubscriptionState.CONFIRMED
    created_at: datetime | None = None

    @property
    def masked(self) -> str:
        """The address as the console shows it: enough to tell subscribers apart, not
        enough to use (a webhook or Slack URL's path is its secret)."""
        if self.kind in (SubscriberKind.WEBHOOK, SubscriberKind.SLACK):
            parts = urlsplit(self.address)
            return f"{parts.scheme}://{parts.hostname or '?'}/…"
        if self.kind is SubscriberKind.EMAIL:
            local, _, domain = self.address.partition("@")
            return f"{local[:1]}…@{domain}"
        return f"…{self.address[-2:]}"  # a phone number or chat id


class SlidingWindow:
    """At most `limit` events per key within `per` seconds (in memory, per process)."""

    def __init__(self, limit: int, per: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.per = per
        self.clock = clock
        self._seen: dict[str, deque[float]] = defaultdict(deque)

    def allow(self, key: str) -> bool:
        now = self.clock()
        seen = self._seen[key]
        while seen and seen[0] <= now - self.per:
            seen.popleft()
        if len(seen) >= self.limit:
            return False
        seen.append(now)
        if len(self._seen) > 10_000:  # bounded: drop keys with nothing in the window
            for stale in [k for k, v in self._seen.items() if not v]:
                del self._seen[stale]
        return True


def check_address(kind: SubscriberKind, address: str) -> str:
    address = address.strip()
    pattern = {
        SubscriberKind.EMAIL: _EMAIL,
        SubscriberKind.SMS: _PHONE,
        SubscriberKind.TELEGRAM: _CHAT,
        SubscriberKind.WEBHOOK: _URL,
        SubscriberKind.SLACK: _URL,
    }[kind]
    if not pattern.fullmatch(address):
        raise SubscriptionError(f"not a valid {kind.value} address")
    return address


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class StatusSubscriptions:
    """Sign-ups, confirmations, unsubscribes and the fan-out of incident updates."""

    def __init__(
        self,
        service: StatusService,
        channels: Mapping[str, Any],
        *,
        secret: str,
        public_url: str,
        http: httpx.AsyncClient | None = None,
        signups: SlidingWindow | None = None,
        deliveries: SlidingWindow | None = None,
    ) -> None:
        if not secret:
            raise ValueError("status subscriptions need a signing secret (ACKLINE_ACK_SECRET)")
        self.service = service
        self.channels = channels
        self.secret = secret.encode()
        self.public_url = public_url.rstrip("/")
        self.http = http or httpx.AsyncClient(timeout=10.0, follow_redirects=False)
        self.signups = signups or SlidingWindow(5, 600.0)  # per source (IP, API key)
        self.deliveries = deliveries or SlidingWindow(30, 3600.0)  # per subscriber
        self._tasks: set[asyncio.Task[None]] = set()
        service.listeners.append(self.notify)

    @property
    def audit(self) -> Any:
        return self.service.audit

    def offered(self) -> list[SubscriberKind]:
        """Kinds whose channel this node has (Slack needs only HTTPS)."""
        return [k for k in SubscriberKind if k not in CHANNEL_OF or CHANNEL_OF[k] in self.channels]

    # -- sign-up ---------------------------------------------------------------------------

    async def subscribe(
        self,
        kind: SubscriberKind,
        address: str,
        *,
        by: RequestContext,
        source: str | None,
        confirmed: bool = False,
    ) -> Subscriber:
        """Sign up `address`. Email always confirms by a link sent to it (double opt-in),
        and so does a webhook signed up on the public page (`confirmed` False): it is
        POSTed a signed `confirm_url`. An address already signed up keeps its state.
        `source` (the public page's client) is rate-limited; None is the operator."""
        if kind not in self.offered():
            raise SubscriptionError(f"{kind.value} subscriptions are not offered here")
        address = check_address(kind, address)
        if source is not None and not self.signups.allow(source):  # None: the operator
            raise RateLimited("too many sign-ups, try again later")
        confirmed = confirmed and kind is not SubscriberKind.EMAIL
        token = secrets.token_urlsafe(24)
        now = self.service.clock()
        row = StatusSubscriberRow(
            id=str(uuid.uuid4()), company=self.service.company, kind=kind.value, address=address,
            token_sha256=_digest(token), created_at=now, confirmed_at=now if confirmed else None,
        )  # fmt: skip
        try:
            row = await self._store(row, kind, address, token, confirmed)
        except IntegrityError:  # the same address signed up at the same moment
            raise RateLimited("a sign-up for this address is under way") from None
        if row.confirmed_at is not None and row.token_sha256 != _digest(token):
            return self._subscriber(row)  # already subscribed: nothing to do, nothing sent
        subscriber = self._subscriber(row)
        self._audit("status_subscriber", "subscribed", by, subscriber, confirmed=confirmed)
        if not subscriber.confirmed:
            await self._send_confirmation(subscriber, token)
        return subscriber

    async def _store(
        self,
        row: StatusSubscriberRow,
        kind: SubscriberKind,
        address: str,
        token: str,
        confirmed: bool,
    ) -> StatusSubscriberRow:
        now = row.created_at
        async with self.service.db.session() as s, s.begin():
            existing = await s.scalar(select(StatusSubscriberRow).where(
                col(StatusSubscriberRow.company) == self.service.company,
                col(StatusSubscriberRow.kind) == kind.value,
                col(StatusSubscriberRow.address) == address))  # fmt: skip
            if existing is not None:
                if existing.unsubscribed_at is None and existing.confirmed_at is not None:
                    return existing
                existing.token_sha256 = _digest(token)
                existing.unsubscribed_at = None
                existing.confirmed_at = now if confirmed else None
                return existing
            s.add(row)
        return row

    async def confirm(self, token: str, *, by: RequestContext) -> Subscriber | None:
        async with self.service.db.session() as s, s.begin():
            row = await s.scalar(select(StatusSubscriberRow).where(
                col(StatusSubscriberRow.token_sha256) == _digest(token)))  # fmt: skip
            if row is None or row.company != self.service.company:
                return None
            if row.confirmed_at is None:
                row.confirmed_at = self.service.clock()
            row.unsubscribed_at = None
        subscriber = self._subscriber(row)
        self._audit("status_subscriber", "confirmed", by, subscriber)
        return subscriber

    def unsubscribe_token(self, subscriber_id: str) -> str:
        mac = hmac.new(self.secret, _UNSUB_LABEL + subscriber_id.encode(), hashlib.sha256)
        return f"{subscriber_id}.{mac.hexdigest()[:32]}"

    def unsubscribe_url(self, subscriber_id: str) -> str:
        return f"{self.public_url}/status/unsubscribe?token={self.unsubscribe_token(subscriber_id)}"

    async def unsubscribe(self, token: str, *, by: RequestContext) -> bool:
        subscriber_id, _, _ = token.partition(".")
        if not hmac.compare_digest(token, self.unsubscribe_token(subscriber_id)):
            return False
        async with self.service.db.session() as s, s.begin():
            row = await s.get(StatusSubscriberRow, subscriber_id)
            if row is None or row.company != self.service.company:
                return False
            row.unsubscribed_at = row.unsubscribed_at or self.service.clock()
        self._audit("status_subscriber", "unsubscribed", by, self._subscriber(row))
        return True

    async def subscribers(
        self, *, active_only: bool = True, limit: int | None = None
    ) -> list[Subscriber]:
        """Oldest first; `active_only`: confirmed and not unsubscribed (who is told)."""
        query = select(StatusSubscriberRow).where(
            col(StatusSubscriberRow.company) == self.service.company)  # fmt: skip
        if active_only:
            query = query.where(col(StatusSubscriberRow.confirmed_at).is_not(None),
                                col(StatusSubscriberRow.unsubscribed_at).is_(None))  # fmt: skip
        query = query.order_by(col(StatusSubscriberRow.created_at)).limit(limit)
        async with self.service.db.session() as s:
            rows = (await s.execute(query)).scalars()
            return [self._subscriber(r) for r in rows]

    # -- fan-out ---------------------------------------------------------------------------

    async def notify(self, incident: Incident, update: IncidentUpdate) -> None:
        """Tell every confirmed subscriber, in the background: the change is committed
        and its API call must not wait for a slow relay."""
        task = asyncio.create_task(self._fan_out(incident, update), name="status-notify")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Let deliveries in flight finish (shutdown, tests); cancel the rest."""
        if not self._tasks:
            return
        _done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()

    async def _fan_out(self, incident: Incident, update: IncidentUpdate) -> None:
        try:
            targets = await self.subscribers()
        except Exception:
            log.exception("status subscribers unavailable: incident %s not sent", incident.id)
            return
        semaphore = asyncio.Semaphore(8)

        async def one(subscriber: Subscriber) -> None:
            async with semaphore:
                await self._deliver_update(subscriber, incident, update)

        await asyncio.gather(*(one(s) for s in targets))

    async def _deliver_update(
        self, subscriber: Subscriber, incident: Incident, update: IncidentUpdate
    ) -> None:
        if not self.deliveries.allow(subscriber.id):
            result = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "rate_limited")
        else:
            try:
                result = await asyncio.wait_for(
                    self._send_update(subscriber, incident, update), 60.0
                )
            except TimeoutError:
                result = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "deadline_exceeded")
            except Exception as exc:
                log.exception("status update to subscriber %s failed", subscriber.id)
                result = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, type(exc).__name__)
        self.audit.write(self.service.company, [{
            "event": "status_notification", "status": result.status.value,
            "reason": result.reason, "channel": subscriber.kind.value, "actor": "status",
            "subscriber_id": subscriber.id, "status_id": incident.id,
            "incident_status": update.status.value,
        }])  # fmt: skip

    def _page_url(self, incident_id: int | None = None) -> str:
        anchor = f"#incident-{incident_id}" if incident_id is not None else ""
        return f"{self.public_url}/status{anchor}"

    def _text(self, incident: Incident, update: IncidentUpdate) -> str:
        head = f"[{self.service.company} status] {incident.title}"
        return f"{head}: {update.status.value.capitalize()}. {update.body} " + self._page_url(
            incident.id
        )

    async def _send_update(
        self, subscriber: Subscriber, incident: Incident, update: IncidentUpdate
    ) -> DeliveryResult:
        kind = subscriber.kind
        if kind is SubscriberKind.EMAIL:
            return await self._email(subscriber, incident, update)
        if kind is SubscriberKind.WEBHOOK:
            payload = {
                "type": "status.incident_update",
                "page_url": self._page_url(),
                "incident": {"id": incident.id, "title": incident.title,
                             "status": incident.status.value, "impact": incident.impact.value,
                             "components": list(incident.components),
                             "url": self._page_url(incident.id)},
                "update": {"status": update.status.value, "body": update.body,
                           "created_at": update.created_at.isoformat()},
                "unsubscribe_url": self.unsubscribe_url(subscriber.id),
            }  # fmt: skip
            result: DeliveryResult = await self.channels["webhook"].post_signed(
                subscriber.address, payload
            )
            return result
        text = self._text(incident, update)
        if kind is SubscriberKind.SMS:
            sms: DeliveryResult = await self.channels["sms"].send_text(subscriber.address, text)
            return sms
        if kind is SubscriberKind.TELEGRAM:
            outcome = await self.channels["telegram"].bot.call(
                "sendMessage", json_body={"chat_id": subscriber.address, "text": text}
            )
            if isinstance(outcome, DeliveryResult):
                return outcome
            return DeliveryResult(DeliveryStatus.DELIVERED, "sent")
        return await self._slack(subscriber.address, text)

    async def _slack(self, url: str, text: str) -> DeliveryResult:
        try:
            response = await self.http.post(url, json={"text": text})
        except (httpx.InvalidURL, httpx.UnsupportedProtocol):
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "invalid_url")
        except httpx.TransportError:
            return DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, "connection_error")
        if response.is_success:
            return DeliveryResult(DeliveryStatus.DELIVERED, f"http_{response.status_code}")
        retry = response.status_code in (408, 429) or response.status_code >= 500
        status = DeliveryStatus.FAILED_RETRYABLE if retry else DeliveryStatus.FAILED_PERMANENT
        return DeliveryResult(status, f"http_{response.status_code}")

    def _message(self, to: str, subject: str, text: str) -> EmailMessage:
        email = self.channels["email"]
        msg = EmailMessage()
        msg["Subject"] = subject
        msg["From"] = email.sender
        msg["To"] = to
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain="ackline")
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(text)
        return msg

    async def _email(
        self, subscriber: Subscriber, incident: Incident, update: IncidentUpdate
    ) -> DeliveryResult:
        unsubscribe = self.unsubscribe_url(subscriber.id)
        msg = self._message(
            subscriber.address,
            f"[{self.service.company} status] {incident.title}: {update.status.value}",
            f"{incident.title}\n\n{update.status.value.capitalize()}: {update.body}\n\n"
            f"{self._page_url(incident.id)}\n\nUnsubscribe: {unsubscribe}\n",
        )
        # RFC 8058: mail clients offer a one-click unsubscribe that POSTs to this URL.
        msg["List-Unsubscribe"] = f"<{unsubscribe}>"
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        msg["List-Id"] = f"{self.service.company} status <status.ackline>"
        result: DeliveryResult = await self.channels["email"].deliver(msg)
        return result

    async def _send_confirmation(self, subscriber: Subscriber, token: str) -> None:
        confirm = f"{self.public_url}/status/confirm?token={token}"
        try:
            if subscriber.kind is SubscriberKind.EMAIL:
                msg = self._message(
                    subscriber.address,
                    f"Confirm your subscription to {self.service.company} status",
                    f"Someone (hopefully you) asked for {self.service.company} status "
                    f"updates at this address.\n\nConfirm: {confirm}\n\n"
                    "If it was not you, ignore this message: nothing more will be sent.\n",
                )
                result = await self.channels["email"].deliver(msg)
            else:
                result = await self.channels["webhook"].post_signed(
                    subscriber.address,
                    {"type": "status.subscription_confirm", "confirm_url": confirm,
                     "page_url": self._page_url()},
                )  # fmt: skip
        except Exception as exc:
            log.exception("confirmation to subscriber %s failed", subscriber.id)
            result = DeliveryResult(DeliveryStatus.FAILED_RETRYABLE, type(exc).__name__)
        self.audit.write(self.service.company, [{
            "event": "status_notification", "status": result.status.value,
            "reason": result.reason, "channel": subscriber.kind.value, "actor": "status",
            "subscriber_id": subscriber.id, "kind": "confirmation",
        }])  # fmt: skip

    # -- helpers ---------------------------------------------------------------------------

    @staticmethod
    def _subscriber(row: StatusSubscriberRow) -> Subscriber:
        if row.unsubscribed_at is not None:
            state = SubscriptionState.UNSUBSCRIBED
        elif row.confirmed_at is None:
            state = SubscriptionState.PENDING
        else:
            state = SubscriptionState.CONFIRMED
        return Subscriber(row.id, SubscriberKind(row.kind), row.address,
                          state is SubscriptionState.CONFIRMED, state, row.created_at)  # fmt: skip

    def _audit(
        self, event: str, status: str, by: RequestContext, subscriber: Subscriber, **more: Any
    ) -> None:
        self.audit.write(self.service.company, [{
            "event": event, "status": status, "actor": by.actor, "ip": by.ip,
            "request_id": by.request_id, "channel": subscriber.kind.value,
            "subscriber_id": subscriber.id, **more,
        }])  # fmt: skip

    async def aclose(self) -> None:
        await self.wait_idle()
        await self.http.aclose()
