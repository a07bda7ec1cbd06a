"""EmailChannel over smtplib against a real local SMTP server (aiosmtpd)."""

from __future__ import annotations

import email
import re
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.policy import default
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from escalation.channels.base import DeliveryStatus
from escalation.channels.email import EmailChannel
from escalation.channels.signing import sign_ack, verify_ack
from tests.fakes import free_port, make_notification

SENDER = "ackline@ops.example"
RCPT = "ada@ops.example"
ACK_SECRET = "ack-secret"


@dataclass
class Mailbox:
    """aiosmtpd handler that keeps what it accepts and answers scripted SMTP replies."""

    messages: list[tuple[Envelope, EmailMessage]] = field(default_factory=list)
    rcpt_reply: str = "250 OK"
    data_reply: str = "250 Message accepted for delivery"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.rcpt_reply.startswith("250"):
            envelope.rcpt_tos.append(address)
        return self.rcpt_reply

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_reply.startswith("250"):
            raw = envelope.original_content or b""
            parsed = email.message_from_bytes(raw, policy=default)
            assert isinstance(parsed, EmailMessage)
            self.messages.append((envelope, parsed))
        return self.data_reply


def start(controller: Controller) -> Iterator[Controller]:
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


@pytest.fixture
def mailbox() -> Mailbox:
    return Mailbox()


@pytest.fixture
def smtp(mailbox: Mailbox) -> Iterator[Controller]:
    yield from start(Controller(mailbox, hostname="127.0.0.1", port=free_port()))


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"pager", b"s3cret")
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd replies 535


@pytest.fixture
def smtp_tls(mailbox: Mailbox, tls_files: tuple[Path, Path]) -> Iterator[Controller]:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(*tls_files)
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=free_port(),
        tls_context=server_ctx,
        require_starttls=True,
        authenticator=authenticate,
        auth_require_tls=True,
    )
    yield from start(controller)


def channel_for(controller: Controller, **options: Any) -> EmailChannel:
    return EmailChannel("127.0.0.1", controller.port, sender=SENDER, timeout_s=5, **options)


async def test_sends_page_with_verifiable_ack_link(smtp: Controller, mailbox: Mailbox) -> None:
    notification = make_notification("email", email=RCPT)
    token = sign_ack(notification.alert_id, ACK_SECRET, expires_at=2_000_000_000)
    notification = replace(notification, ack_url=f"https://ackline.example/v1/ack/{token}")

    result = await channel_for(smtp).send(notification)

    assert result.status is DeliveryStatus.DELIVERED
    [(envelope, message)] = mailbox.messages
    assert (envelope.mail_from, envelope.rcpt_tos) == (SENDER, [RCPT])
    assert message["Message-ID"] == result.provider_id
    assert message["Subject"] == "[CRITICAL] Checkout API error rate 12% (ACK 7F3K)"
    assert message["Auto-Submitted"] == "auto-generated"
    assert message["X-Ackline-Alert-Id"] == notification.alert_id
    text_part = message.get_body(("plain",))
    html_part = message.get_body(("html",))
    assert text_part is not None
    assert html_part is not None
    text, html = text_part.get_content(), html_part.get_content()
    assert notification.summary in text
    [link] = re.findall(r"Acknowledge: (\S+)", text)
    assert f'href="{link}"' in html
    clicked = link.rsplit("/", 1)[1]
    assert verify_ack(clicked, ACK_SECRET, now=1_900_000_000) == notification.alert_id


@pytest.mark.parametrize(
    ("rcpt_reply", "data_reply", "status", "reason"),
    [
        ("450 4.2.1 Mailbox busy", "250 OK", DeliveryStatus.FAILED_RETRYABLE, "smtp_450"),
        ("550 5.1.1 User unknown", "250 OK", DeliveryStatus.FAILED_PERMANENT, "smtp_550"),
        ("250 OK", "451 4.3.0 Try again later", DeliveryStatus.FAILED_RETRYABLE, "smtp_451"),
        ("250 OK", "554 5.7.1 Rejected as spam", DeliveryStatus.FAILED_PERMANENT, "smtp_554"),
    ],
)
async def test_smtp_replies_are_classified(
    smtp: Controller,
    mailbox: Mailbox,
    rcpt_reply: str,
    data_reply: str,
    status: DeliveryStatus,
    reason: str,
) -> None:
    mailbox.rcpt_reply, mailbox.data_reply = rcpt_reply, data_reply

    result = await channel_for(smtp).send(make_notification("email", email=RCPT))

    assert (result.status, result.reason) == (status, reason)
    assert mailbox.messages == []


async def test_connection_refused_is_retryable() -> None:
    channel = EmailChannel("127.0.0.1", free_port(), sender=SENDER, timeout_s=5)

    result = await channel.send(make_notification("email", email=RCPT))

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_RETRYABLE,
        "smtp_connection_refused",
    )


async def test_starttls_and_login(
    smtp_tls: Controller, mailbox: Mailbox, tls_files: tuple[Path, Path]
) -> None:
    trust = ssl.create_default_context(cafile=str(tls_files[0]))
    channel = channel_for(
        smtp_tls, starttls=True, ssl_context=trust, username="pager", password="s3cret"
    )

    result = await channel.send(make_notification("email", email=RCPT))

    assert result.status is DeliveryStatus.DELIVERED
    assert len(mailbox.messages) == 1


async def test_wrong_password_is_permanent(
    smtp_tls: Controller, tls_files: tuple[Path, Path]
) -> None:
    trust = ssl.create_default_context(cafile=str(tls_files[0]))
    channel = channel_for(
        smtp_tls, starttls=True, ssl_context=trust, username="pager", password="wrong"
    )

    result = await channel.send(make_notification("email", email=RCPT))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "smtp_535")


async def test_untrusted_certificate_is_permanent(smtp_tls: Controller) -> None:
    channel = channel_for(smtp_tls, starttls=True)  # system trust store: self-signed fails

    result = await channel.send(make_notification("email", email=RCPT))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "smtp_tls_error")


async def test_server_refusing_plaintext_is_permanent(smtp_tls: Controller) -> None:
    result = await channel_for(smtp_tls).send(make_notification("email", email=RCPT))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "smtp_530")


async def test_starttls_not_offered_is_permanent(smtp: Controller) -> None:
    channel = channel_for(smtp, starttls=True)

    result = await channel.send(make_notification("email", email=RCPT))

    assert (result.status, result.reason) == (
        DeliveryStatus.FAILED_PERMANENT,
        "smtp_not_supported",
    )


async def test_missing_address_is_permanent(smtp: Controller, mailbox: Mailbox) -> None:
    result = await channel_for(smtp).send(make_notification("email"))

    assert (result.status, result.reason) == (DeliveryStatus.FAILED_PERMANENT, "no_email")
    assert mailbox.messages == []
