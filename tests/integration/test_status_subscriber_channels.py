"""Status page subscribers on the channels the other tests do not cover: SMS (the local
Twilio fake), Telegram (the local Bot API fake) and Slack incoming webhooks (a local HTTP
server), each through the channels `ackline serve` builds from its settings
(api.channels.services_for), every delivery audited; and the per-subscriber cap of 30
messages an hour."""

from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from fastapi import FastAPI
from starlette.responses import PlainTextResponse, Response

from api.app import create_app
from api.channels import services_for
from api.settings import Settings
from api.web.status import StatusPage
from escalation.status_subscribers import StatusSubscriptions
from tests.fakes import FakeService, RecordedRequest
from tests.fakes.telegram_server import FakeTelegram
from tests.fakes.twilio_server import FakeTwilio
from tests.integration.test_status_page import ACME, CONFIG

pytest_plugins = ["tests.conftest_escalation"]

PUBLIC = "https://status.example.com"
SUBSCRIBER_PHONE = "+14155550123"
SENDER_PHONE = "+14155550106"
CHAT = "-1001234567890"


class SlackIncomingWebhook(FakeService):
    """Slack's incoming webhooks: a JSON POST with "text" (or blocks), answered `ok`."""

    def script_key(self, request: RecordedRequest) -> str:
        return request.path

    async def handle(self, request: RecordedRequest) -> Response:
        payload = request.json
        if request.method != "POST" or not isinstance(payload, dict):
            return PlainTextResponse("invalid_payload", status_code=400)
        if not payload.get("text") and not payload.get("blocks"):
            return PlainTextResponse("no_text", status_code=400)
        return PlainTextResponse("ok")


@contextlib.asynccontextmanager
async def running(
    db_url: str, tmp_path: Path, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, FastAPI]]:
    """The API with the channels its settings give it, as `ackline serve` builds them."""
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(database_url=db_url, config_path=config, api_keys={"k-acme": "acme"},
                        audit_dir=tmp_path / "audit", public_url=PUBLIC, ack_secret="ack-secret",
                        embedded_worker=False, **overrides)  # fmt: skip
    async with services_for(settings, None) as services:
        app = create_app(settings, services.channels)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("198.51.100.9", 5555))
            async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
                yield client, app


def subscriptions(app: FastAPI) -> StatusSubscriptions:
    page: StatusPage = app.state.status_page
    assert page.subscriptions is not None
    return page.subscriptions


async def subscribe(client: httpx.AsyncClient, kind: str, address: str) -> str:
    r = await client.post("/v1/status/subscribers", headers=ACME,
                          json={"kind": kind, "address": address})  # fmt: skip
    assert r.status_code == 201, r.text
    assert r.json()["confirmed"] is True, r.text
    subscriber_id: str = r.json()["id"]
    return subscriber_id


async def open_incident(client: httpx.AsyncClient, title: str, body: str) -> int:
    r = await client.post("/v1/status/incidents", headers=ACME, json={"title": title, "body": body})
    assert r.status_code == 201, r.text
    incident: int = r.json()["id"]
    return incident


async def post_update(client: httpx.AsyncClient, incident: int, status: str, body: str) -> None:
    r = await client.post(f"/v1/status/incidents/{incident}/updates", headers=ACME,
                          json={"status": status, "body": body})  # fmt: skip
    assert r.status_code == 201, r.text


def sent(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "status_notification"]


def expected_text(title: str, status: str, body: str, incident: int) -> str:
    return f"[acme status] {title}: {status}. {body} {PUBLIC}/status#incident-{incident}"


async def test_an_sms_subscriber_gets_the_incident_and_its_update(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with FakeTwilio() as twilio:
        account = twilio.add_account(numbers=(SENDER_PHONE,))
        async with running(sqlite_url, tmp_path, twilio_account_sid=account.sid,
                           twilio_auth_token=account.auth_token,
                           twilio_from_numbers=(SENDER_PHONE,),
                           twilio_api_base=twilio.url) as (client, app):  # fmt: skip
            assert "sms" in [k.value for k in subscriptions(app).offered()]
            subscriber = await subscribe(client, "sms", SUBSCRIBER_PHONE)
            incident = await open_incident(client, "SMS delays", "Texts arrive late.")
            await subscriptions(app).wait_idle()
            await post_update(client, incident, "identified", "One carrier is slow.")
            await subscriptions(app).wait_idle()
    assert [(m["to"], m["from"], m["body"]) for m in twilio.messages] == [
        (SUBSCRIBER_PHONE, SENDER_PHONE,
         expected_text("SMS delays", "Investigating", "Texts arrive late.", incident)),
        (SUBSCRIBER_PHONE, SENDER_PHONE,
         expected_text("SMS delays", "Identified", "One carrier is slow.", incident)),
    ]  # fmt: skip
    assert [(a["channel"], a["status"], a["subscriber_id"], a["incident_status"])
            for a in sent(tmp_path)] == [
        ("sms", "delivered", subscriber, "investigating"),
        ("sms", "delivered", subscriber, "identified"),
    ]  # fmt: skip


async def test_a_telegram_subscriber_gets_the_incident_and_its_update(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with (
        FakeTelegram() as telegram,
        running(sqlite_url, tmp_path, telegram_bot_token=telegram.token,
                telegram_api_base=telegram.url) as (client, app),
    ):  # fmt: skip
        subscriber = await subscribe(client, "telegram", CHAT)
        incident = await open_incident(client, "Bot silent", "Buttons do not answer.")
        await subscriptions(app).wait_idle()
        await post_update(client, incident, "monitoring", "Fixed; watching.")
        await subscriptions(app).wait_idle()
    texts = [(chat, m["text"]) for (chat, _), m in sorted(telegram.messages.items(),
                                                          key=lambda kv: kv[0][1])]  # fmt: skip
    assert texts == [
        (CHAT, expected_text("Bot silent", "Investigating", "Buttons do not answer.", incident)),
        (CHAT, expected_text("Bot silent", "Monitoring", "Fixed; watching.", incident)),
    ]
    assert [(a["channel"], a["status"], a["subscriber_id"]) for a in sent(tmp_path)] == [
        ("telegram", "delivered", subscriber)
    ] * 2


async def test_a_slack_incoming_webhook_gets_the_incident_and_its_update(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with (
        SlackIncomingWebhook() as slack,
        running(sqlite_url, tmp_path) as (client, app),
    ):
        hook = f"{slack.url}/services/T0ACME/B0STATUS/abcdef"
        subscriber = await subscribe(client, "slack", hook)
        incident = await open_incident(client, "Slow API", "Latency is up.")
        await subscriptions(app).wait_idle()
        await post_update(client, incident, "resolved", "Back to normal.")
        await subscriptions(app).wait_idle()
    assert [(r.method, r.path, r.headers["content-type"]) for r in slack.requests] == [
        ("POST", "/services/T0ACME/B0STATUS/abcdef", "application/json")
    ] * 2
    assert [r.json["text"] for r in slack.requests] == [
        expected_text("Slow API", "Investigating", "Latency is up.", incident),
        expected_text("Slow API", "Resolved", "Back to normal.", incident),
    ]
    outcomes = [(a["channel"], a["status"], a["reason"], a["subscriber_id"])
                for a in sent(tmp_path)]  # fmt: skip
    assert outcomes == [("slack", "delivered", "http_200", subscriber)] * 2


async def test_a_subscriber_gets_at_most_30_messages_an_hour(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The cap is per subscriber and slides: a newcomer still gets the 31st update, and
    an hour later the first subscriber gets updates again."""
    async with (
        SlackIncomingWebhook() as slack,
        running(sqlite_url, tmp_path) as (client, app),
    ):
        first = await subscribe(client, "slack", f"{slack.url}/services/first")
        incident = await open_incident(client, "Flapping", "Update 1.")
        for n in range(2, 31):
            await post_update(client, incident, "monitoring", f"Update {n}.")
        await subscriptions(app).wait_idle()
        assert len(slack.requests) == 30

        second = await subscribe(client, "slack", f"{slack.url}/services/second")
        await post_update(client, incident, "monitoring", "Update 31.")
        await subscriptions(app).wait_idle()
        assert [r.path for r in slack.requests[30:]] == ["/services/second"]

        later = itertools.count(time.monotonic() + 3601)
        subscriptions(app).deliveries.clock = lambda: next(later)
        await post_update(client, incident, "resolved", "Update 32.")
        await subscriptions(app).wait_idle()
    paths = [r.path for r in slack.requests]
    assert (paths.count("/services/first"), paths.count("/services/second")) == (31, 2)
    outcomes = [(a["subscriber_id"], a["status"], a["reason"]) for a in sent(tmp_path)]
    assert outcomes.count((first, "failed_retryable", "rate_limited")) == 1
    assert outcomes.count((first, "delivered", "http_200")) == 31
    assert outcomes.count((second, "delivered", "http_200")) == 2
    assert len(outcomes) == 34
