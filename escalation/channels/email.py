"""Email pages over SMTP, carrying the signed one-click ack link.

smtplib runs in a worker thread so a slow relay never stalls the event loop. SMTP already
says whether to retry: 4xx replies are temporary, 5xx are final, and an unreachable relay is
worth another try. The ack link itself is built by the engine (`Notification.ack_url`,
signed with `signing.sign_ack`) so email and webhook share one link.
"""

from __future__ import annotations

import asyncio
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from html import escape

from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    ProgressSink,
    RequestDeadline,
    ignore_progress,
)

__all__ = ["EmailChannel", "classify_smtp_error", "render_email"]


def render_email(notification: Notification, sender: str) -> EmailMessage:
    """Plain text plus HTML, both with the ack link; headers mark it as machine-sent."""
    n = notification
    headline = f"[{n.severity.upper()}] {n.title}"
    msg = EmailMessage()
    msg["Subject"] = f"{headline} (ACK {n.alert_short_id})"
    msg["From"] = sender
    msg["To"] = str(n.contact.email)
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(idstring=n.notification_id.replace("-", ""), domain="ackline")
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation auto-replies
    if not n.is_alert:  # a shift reminder: nothing to acknowledge
        msg.replace_header("Subject", n.title)
        msg.set_content(f"{n.title}\n\n{n.summary}\n")
        msg.add_alternative(f"<h2>{escape(n.title)}</h2><p>{escape(n.summary)}</p>", subtype="html")
        return msg
    msg["X-Ackline-Alert-Id"] = n.alert_id
    ack_text = (
        f"Acknowledge: {n.ack_url}" if n.ack_url else f"Acknowledge with ACK {n.alert_short_id}"
    )
    msg.set_content(f"{headline}\n\n{n.summary}\n\n{ack_text}\n")
    ack_html = (
        f'<p><a href="{escape(n.ack_url)}">Acknowledge</a></p>'
        if n.ack_url
        else f"<p>Acknowledge with ACK {escape(n.alert_short_id)}</p>"
    )
    msg.add_alternative(
        f"<h2>{escape(headline)}</h2><p>{escape(n.summary)}</p>{ack_html}", subtype="html"
    )
    return msg


def classify_smtp_error(exc: BaseException) -> DeliveryResult:
    """SMTP 4xx and network trouble retry; 5xx, TLS and protocol refusals are final.

    Order matters: every smtplib and ssl error is also an OSError.
    """
    retry, final = DeliveryStatus.FAILED_RETRYABLE, DeliveryStatus.FAILED_PERMANENT
    code: int | None = None
    if isinstance(exc, smtplib.SMTPRecipientsRefused) and exc.recipients:
        code = next(iter(exc.recipients.values()))[0]
    elif isinstance(exc, smtplib.SMTPResponseException):
        code = exc.smtp_code
    if code is not None and 400 <= code < 600:
        return DeliveryResult(retry if code < 500 else final, f"smtp_{code}")
    if isinstance(exc, smtplib.SMTPNotSupportedError):  # e.g. STARTTLS or AUTH not offered
        return DeliveryResult(final, "smtp_not_supported")
    if isinstance(exc, ssl.SSLError):
        return DeliveryResult(final, "smtp_tls_error")
    if isinstance(exc, TimeoutError):
        return DeliveryResult(retry, "smtp_timeout")
    if isinstance(exc, ConnectionRefusedError):
        return DeliveryResult(retry, "smtp_connection_refused")
    return DeliveryResult(retry, "smtp_connection_error")


class EmailChannel(RequestDeadline):
    """Channel "email". `starttls` upgrades a plain port-587/25 session before AUTH."""

    name = "email"

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        sender: str,
        username: str | None = None,
        password: str | None = None,
        starttls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        timeout_s: float = 15.0,
    ) -> None:
        self._host, self._port = host, port
        self._sender = sender
        self._login = (username, password or "") if username else None
        self._starttls = starttls
        self._ssl_context = ssl_context or ssl.create_default_context()
        self._timeout_s = timeout_s

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        if not notification.contact.email:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_email")
        return await self.deliver(render_email(notification, self._sender))

    @property
    def sender(self) -> str:
        return self._sender

    async def deliver(self, message: EmailMessage) -> DeliveryResult:
        """Submit any message through this relay (the status page's subscriber mail),
        classified like a page's delivery."""
        try:
            await asyncio.to_thread(self._submit, message)
        except OSError as exc:  # includes every smtplib.SMTPException and ssl.SSLError
            return classify_smtp_error(exc)
        return DeliveryResult(DeliveryStatus.DELIVERED, "accepted", message["Message-ID"])

    def _submit(self, message: EmailMessage) -> None:
        with smtplib.SMTP(self._host, self._port, timeout=self._timeout_s) as smtp:
            if self._starttls:
                smtp.starttls(context=self._ssl_context)
            if self._login:
                smtp.login(*self._login)
            smtp.send_message(message)

    async def cancel(self, notification_id: str) -> None:
        """A submitted email cannot be recalled; a click on its link after the ack finds the
        alert already acknowledged, so there is nothing to do here."""
