"""Status page subscribers get incident updates through the escalation channels: email
with double opt-in and RFC 8058 one-click unsubscribe (a real local SMTP server), and
signed webhooks (a real local HTTP server verifying the signature); sign-ups are
rate-limited and every delivery is audited."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import yaml
from aiosmtpd.controller import Controller
from fastapi import FastAPI
from starlette.responses import Response

from api.app import create_app
from api.settings import Settings
from escalation.channels.email import EmailChannel
from escalation.channels.signing import SIGNATURE_HEADER, verify_webhook
from escalation.channels.webhook import WebhookChannel
from tests.fakes import FakeService, RecordedRequest, free_port
from tests.integration.test_channel_email import Mailbox
from tests.integration.test_status_page import ACME, CONFIG

pytest_plugins = ["tests.conftest_escalation"]

PUBLIC = "https://status.example.com"
SECRET = "whsec-status-test"


class Receiver(FakeService):
    """A subscriber's endpoint: keeps what it gets, answers 204, checks nothing itself."""

    def script_key(self, request: RecordedRequest) -> str:
        return request.path

    async def handle(self, request: RecordedRequest) -> Response:
        return Response(status_code=204)


@contextlib.asynccontextmanager
async def running(
    db_url: str, tmp_path: Path, smtp_port: int
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(
        database_url=db_url,
        config_path=config,
        api_keys={"k-acme": "acme"},
        audit_dir=tmp_path / "audit",
        public_url=PUBLIC,
        ack_secret="ack-secret",
        embedded_worker=False,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_from="status@ops.example",
        webhook_secret=SECRET,
    )
    email = EmailChannel("127.0.0.1", smtp_port, sender="status@ops.example", timeout_s=5)
    webhook = WebhookChannel(SECRET, timeout_s=5)
    app = create_app(settings, {"email": email, "webhook": webhook})
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 5555))
            async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
                yield client, app
    finally:
        await webhook.aclose()


async def until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def link(text: str, path: str) -> str:
    found = re.search(rf"{re.escape(PUBLIC)}{re.escape(path)}\?token=\S+", text)
    assert found, text
    parts = urlsplit(found.group(0))
    return f"{parts.path}?{parts.query}"


def audit_lines(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


async def post_update(client: httpx.AsyncClient, incident: int, status: str, body: str) -> None:
    r = await client.post(
        f"/v1/status/incidents/{incident}/updates",
        json={"status": status, "body": body},
        headers=ACME,
    )
    assert r.status_code == 201, r.text


async def test_email_double_opt_in_updates_and_one_click_unsubscribe(
    sqlite_url: str, tmp_path: Path
) -> None:
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        async with running(sqlite_url, tmp_path, controller.port) as (client, _app):
            page = await client.get("/status")
            assert 'action="/status/subscribe"' in page.text
            r = await client.post(
                "/status/subscribe", data={"kind": "email", "address": "ada@ops.example"}
            )
            assert r.status_code == 200
            assert "confirmation link" in r.text
            await until(lambda: len(mailbox.messages) == 1, "the confirmation email")
            envelope, confirmation = mailbox.messages[0]
            assert envelope.rcpt_tos == ["ada@ops.example"]
            assert confirmation["Subject"] == "Confirm your subscription to acme status"
            confirm = link(confirmation.get_content(), "/status/confirm")

            # nothing is sent before the link is used
            r = await client.post(
                "/v1/status/incidents",
                headers=ACME,
                json={"title": "Email delays", "body": "Emails are slow.", "components": ["email"]},
            )
            assert r.status_code == 201
            incident = r.json()["id"]
            await asyncio.sleep(0.3)
            assert len(mailbox.messages) == 1

            form = await client.get(confirm)  # a GET (a mail scanner) changes nothing
            assert form.status_code == 200
            assert 'method="post"' in form.text
            assert (await client.post(confirm)).status_code == 200
            await post_update(client, incident, "identified", "The relay rejects us.")
            await until(lambda: len(mailbox.messages) == 2, "the incident update email")
            _, update = mailbox.messages[1]
            assert update["Subject"] == "[acme status] Email delays: identified"
            assert "The relay rejects us." in update.get_content()
            assert update["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
            unsubscribe = update["List-Unsubscribe"].strip("<>")
            assert unsubscribe.startswith(f"{PUBLIC}/status/unsubscribe?token=")

            # RFC 8058: the mail client POSTs "List-Unsubscribe=One-Click" to that URL
            parts = urlsplit(unsubscribe)
            r = await client.post(
                f"{parts.path}?{parts.query}",
                content=b"List-Unsubscribe=One-Click",
                headers={"Content-Type": "application/x-www-form-urlencoded"},
            )
            assert r.status_code == 200
            assert "Unsubscribed" in r.text
            subscriber_id = parts.query.split("=", 1)[1].split(".")[0]
            forged = f"/status/unsubscribe?token={subscriber_id}.{'0' * 32}"
            assert (await client.post(forged)).status_code == 404
            await post_update(client, incident, "resolved", "Mail flows again.")
            await asyncio.sleep(0.3)
            assert len(mailbox.messages) == 2  # unsubscribed: nothing more
    finally:
        controller.stop()
    sent = audit_lines(tmp_path, "status_notification")
    assert [(a.get("kind", "update"), a["status"]) for a in sent] == [
        ("confirmation", "delivered"),
        ("update", "delivered"),
    ]
    changes = [a["status"] for a in audit_lines(tmp_path, "status_subscriber")]
    assert changes == ["subscribed", "confirmed", "unsubscribed"]


async def test_webhook_subscriber_gets_signed_updates(db_url: str, tmp_path: Path) -> None:
    async with Receiver() as receiver, running(db_url, tmp_path, free_port()) as (client, _app):
        r = await client.post(
            "/v1/status/subscribers",
            headers=ACME,
            json={"kind": "webhook", "address": f"{receiver.url}/hooks/status"},
        )
        assert r.status_code == 201, r.text
        assert r.json()["confirmed"] is True, r.text
        r = await client.post(
            "/v1/status/incidents",
            headers=ACME,
            json={
                "title": "Webhook delays",
                "body": "Investigating late webhooks.",
                "impact": "major",
                "components": ["webhook"],
            },
        )
        incident = r.json()["id"]
        await post_update(client, incident, "monitoring", "A fix is rolling out.")
        await until(lambda: len(receiver.requests) == 2, "two signed POSTs")
        bodies = []
        for request in receiver.requests:
            assert request.path == "/hooks/status"
            signature = request.headers[SIGNATURE_HEADER.lower()]
            assert verify_webhook(signature, request.body, SECRET, time.time())
            assert not verify_webhook(signature, request.body + b" ", SECRET, time.time())
            bodies.append(json.loads(request.body))
        got = sorted((b["update"]["status"], b["update"]["body"]) for b in bodies)
        assert got == [
            ("investigating", "Investigating late webhooks."),
            ("monitoring", "A fix is rolling out."),
        ]
        first = bodies[0]
        assert first["type"] == "status.incident_update"
        assert first["incident"]["url"] == f"{PUBLIC}/status#incident-{incident}"
        assert first["unsubscribe_url"].startswith(f"{PUBLIC}/status/unsubscribe?token=")
        assert "alert_id" not in first  # not a page
    sent = audit_lines(tmp_path, "status_notification")
    assert [(a["channel"], a["status"], a["reason"]) for a in sent] == [
        ("webhook", "delivered", "http_204")
    ] * 2


async def test_public_webhook_sign_up_confirms_first_and_sign_ups_are_rate_limited(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with (
        Receiver() as receiver,
        running(sqlite_url, tmp_path, free_port()) as (
            client,
            _app,
        ),
    ):
        r = await client.post(
            "/status/subscribe", data={"kind": "webhook", "address": f"{receiver.url}/in"}
        )
        assert r.status_code == 200
        [verify] = receiver.requests
        assert verify_webhook(
            verify.headers[SIGNATURE_HEADER.lower()], verify.body, SECRET, time.time()
        )
        body = json.loads(verify.body)
        assert body["type"] == "status.subscription_confirm"
        assert (await client.get("/v1/status/subscribers", headers=ACME)).json() == []
        confirm = urlsplit(body["confirm_url"])
        assert (await client.post(f"{confirm.path}?{confirm.query}")).status_code == 200
        assert [
            s["kind"] for s in (await client.get("/v1/status/subscribers", headers=ACME)).json()
        ] == ["webhook"]
        r = await client.post("/status/subscribe", data={"kind": "email", "address": "nope"})
        assert r.status_code == 422
        codes = [
            (
                await client.post(
                    "/status/subscribe", data={"kind": "webhook", "address": f"{receiver.url}/x{i}"}
                )
            ).status_code
            for i in range(5)
        ]
        assert codes == [200, 200, 200, 200, 429]  # 5 sign-ups per source in 10 minutes
        r = await client.post("/status/subscribe", data={"kind": "sms", "address": "+15550100"})
        assert r.status_code == 404  # the public form offers email and webhooks only
