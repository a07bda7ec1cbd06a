"""Slack buttons end to end: the API pages through the real slack_sdk into the local Web
API fake, and a signed interaction from the posted message closes the alert."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from sqlmodel import col, select

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel
from escalation.channels.slack import SlackChannel, SlackWebApi
from storage.db import Database
from storage.models import Job
from tests.conftest_escalation import ScriptedChannel
from tests.fakes.slack_server import FakeSlack, interaction_request

pytest_plugins = ["tests.conftest_escalation"]

PUBLIC = "https://ackline.example.com"
KEY = {"X-API-Key": "k-acme"}
SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
OPS = "C07OPS0001"
ADA = "U07ADA0001"
CONFIG = {
    "company": "acme",
    "recipients": [
        {"id": "alice", "name": "Alice", "slack_channel": OPS},
        {"id": "bob", "name": "Bob", "phone": "+14155550102"},
    ],
    "policies": [
        {"name": "page", "steps": [
            {"recipients": ["alice"], "channels": ["slack"], "delay": "10m"},
            {"recipients": ["bob"], "channels": ["voice"]},
        ]},
        {"name": "ring", "steps": [{"recipients": ["bob"], "channels": ["voice"]}]},
    ],
}  # fmt: skip


class Api:
    def __init__(self, client: httpx.AsyncClient, app: FastAPI, slack: FakeSlack) -> None:
        self.client, self.app, self.slack = client, app, slack

    async def alert(self, alert_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/alerts/{alert_id}", headers=KEY)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def paged(self) -> tuple[str, str, dict[str, Any]]:
        """A new alert, once its Slack message is posted: (alert id, channel, message)."""
        body = {"title": "db down", "summary": "primary <unreachable>", "policy": "page"}
        alert_id = (await self.client.post("/v1/alerts", json=body, headers=KEY)).json()["id"]
        for _ in range(250):
            data = await self.alert(alert_id)
            if any(a["status"] == "delivered" for a in data["attempts"]):
                break
            await asyncio.sleep(0.02)
        [((channel, _ts), message)] = self.slack.messages.items()
        return alert_id, channel, message

    async def pending_jobs(self, alert_id: str) -> list[str]:
        """The kinds of the alert's jobs still to run (a later step, a retry)."""
        db = Database(self.app.state.runtime.settings.database_url)
        try:
            async with db.session() as s:
                rows = await s.execute(
                    select(col(Job.kind)).where(col(Job.alert_id) == alert_id, ~col(Job.done))
                )
                return [str(kind) for kind in rows.scalars()]
        finally:
            await db.dispose()

    async def press(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return await self.client.post("/v1/webhooks/slack/interactions", content=body,
                                      headers=headers)  # fmt: skip


@contextlib.asynccontextmanager
async def running(db_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    async with FakeSlack(OPS) as slack:
        settings = Settings(
            database_url=db_url,
            config_path=config,
            api_keys={"k-acme": "acme"},
            audit_dir=tmp_path / "audit",
            public_url=PUBLIC,
            slack_bot_token=slack.token,
            slack_signing_secret=SECRET,
            slack_api_base=f"{slack.url}/api/",
            poll_interval=0.2,
        )
        channels: dict[str, Channel] = {
            "slack": SlackChannel(SlackWebApi(slack.token, api_base=settings.slack_api_base)),
            "voice": ScriptedChannel("voice", lambda _n: None),
        }
        app = create_app(settings, channels)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
            async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
                yield Api(client, app, slack)


def _outcome(message: dict[str, Any]) -> list[Any]:
    return [b for b in message["blocks"] if b.get("block_id") == "ackline_outcome"]


def _buttons(message: dict[str, Any]) -> list[str]:
    actions = [b for b in message["blocks"] if b["type"] == "actions"]
    return [e["action_id"] for b in actions for e in b["elements"]]


async def test_signed_acknowledge_acks_cancels_the_chain_and_updates_the_message(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as api:
        alert_id, channel, message = await api.paged()
        assert _buttons(message) == ["ackline_ack", "ackline_resolve"]
        before = await api.alert(alert_id)
        assert [a["channel"] for a in before["attempts"]] == ["slack"]
        assert "step" in await api.pending_jobs(alert_id)  # bob's call is still to come

        r = await api.press(*interaction_request(message, channel, "ackline_ack", SECRET))

        assert r.status_code == 200
        data = await api.alert(alert_id)
        assert data["state"] == "acknowledged"
        assert data["acked_by"] == f"slack:{ADA}"
        assert await api.pending_jobs(alert_id) == []  # the chain is cancelled: no call to bob
        updated = api.slack.messages[(channel, message["ts"])]
        assert _outcome(updated)[0]["elements"][0]["text"] == (
            f":white_check_mark: Acknowledged by <@{ADA}>"
        )
        assert _buttons(updated) == ["ackline_resolve"]
        assert updated["blocks"][0] == message["blocks"][0]  # the alert text stays

        r = await api.press(*interaction_request(updated, channel, "ackline_resolve", SECRET))

        assert r.status_code == 200
        data = await api.alert(alert_id)
        assert data["state"] == "resolved"
        assert data["resolved_by"] == f"slack:{ADA}"
        final = api.slack.messages[(channel, message["ts"])]
        assert _buttons(final) == []
        [outcome] = _outcome(final)
        assert outcome["elements"][0]["text"] == f":heavy_check_mark: Resolved by <@{ADA}>"


@pytest.mark.parametrize("forgery", ["bad_signature", "stale", "wrong_secret", "unsigned"])
async def test_unverified_presses_are_401_and_change_nothing(
    sqlite_url: str, tmp_path: Path, forgery: str
) -> None:
    async with running(sqlite_url, tmp_path) as api:
        alert_id, channel, message = await api.paged()
        stale = int(time.time()) - 6 * 60 if forgery == "stale" else None
        secret = "not-the-secret" if forgery == "wrong_secret" else SECRET
        body, headers = interaction_request(
            message, channel, "ackline_ack", secret, timestamp=stale
        )
        if forgery == "bad_signature":
            headers["X-Slack-Signature"] = "v0=" + "0" * 64
        if forgery == "unsigned":
            del headers["X-Slack-Signature"], headers["X-Slack-Request-Timestamp"]
        requests_before = len(api.slack.requests)

        r = await api.press(body, headers)

        assert r.status_code == 401
        data = await api.alert(alert_id)
        assert data["state"] == "triggered"
        assert data["acked_by"] is None
        assert "step" in await api.pending_jobs(alert_id)
        assert len(api.slack.requests) == requests_before  # no chat.update either
        assert _buttons(api.slack.messages[(channel, message["ts"])]) == [
            "ackline_ack",
            "ackline_resolve",
        ]


async def test_a_press_for_an_alert_not_paged_on_slack_changes_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with running(sqlite_url, tmp_path) as api:
        alert_id, channel, message = await api.paged()
        body = {"title": "other", "summary": "s", "policy": "ring"}
        other = (await api.client.post("/v1/alerts", json=body, headers=KEY)).json()["id"]
        forged = {**message, "blocks": [
            {**b, "elements": [{**e, "value": other} for e in b["elements"]]}
            if b["type"] == "actions" else b
            for b in message["blocks"]
        ]}  # fmt: skip

        r = await api.press(*interaction_request(forged, channel, "ackline_ack", SECRET))

        assert r.status_code == 200
        assert (await api.alert(other))["state"] == "triggered"
        assert (await api.alert(alert_id))["state"] == "triggered"
        assert [r.path for r in api.slack.requests] == ["/api/chat.postMessage"]


async def test_slack_recipient_through_the_api(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path) as api:
        carol = {"id": "carol", "name": "Carol", "slack_channel": "U07CAROL01"}
        assert (await api.client.post("/v1/recipients", json=carol, headers=KEY)).status_code == 201
        got = await api.client.get("/v1/recipients/carol", headers=KEY)
        assert got.json()["slack_channel"] == "U07CAROL01"
        bad = await api.client.put(
            "/v1/recipients/carol", json={**carol, "slack_channel": "#ops"}, headers=KEY
        )
        assert bad.status_code == 422
        assert "slack_channel" in str(bad.json()["detail"])
        alice = (await api.client.get("/v1/recipients/alice", headers=KEY)).json()
        assert alice["slack_channel"] == OPS  # from the YAML file
