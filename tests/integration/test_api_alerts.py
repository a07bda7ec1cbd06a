"""The HTTP API end to end (ASGI in-process, real databases, scripted carriers)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel, DeliveryStatus, Notification
from escalation.channels.signing import sign_ack
from storage.db import Database
from tests.conftest_escalation import ScriptedChannel, reply

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus
TWILIO_TOKEN = "twilio-test-token"
TG_SECRET = "tg-secret"
PUBLIC = "https://ackline.example.com"
KEY = {"X-API-Key": "k-acme"}
CONFIG: dict[str, Any] = {
    "company": "acme",
    "recipients": [
        {"id": "alice", "name": "Alice", "phone": "+14155550101", "telegram_chat_id": "42"},
        {"id": "bob", "name": "Bob", "phone": "+14155550102"},
    ],
    "groups": [{"name": "primary", "members": ["alice"]}],
    "policies": [
        {"name": "page", "steps": [{"groups": ["primary"], "channels": ["sms", "telegram"],
                                    "delay": "10m"}]},
        {"name": "ring", "steps": [{"recipients": ["alice"], "channels": ["voice"],
                                    "delay": "10m"}]},
    ],
}  # fmt: skip


class Api:
    def __init__(self, client: httpx.AsyncClient, app: FastAPI, channels: dict[str, Any]) -> None:
        self.client = client
        self.app = app
        self.channels: dict[str, ScriptedChannel] = channels

    async def post_alert(self, key: str | None = None, **body: Any) -> httpx.Response:
        headers = {**KEY, **({"Idempotency-Key": key} if key else {})}
        payload = {"title": "db down", "summary": "primary unreachable", "policy": "page", **body}
        return await self.client.post("/v1/alerts", json=payload, headers=headers)

    async def alert(self, alert_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/v1/alerts/{alert_id}", headers=KEY)
        assert r.status_code == 200, r.text
        data: dict[str, Any] = r.json()
        return data

    async def until(self, alert_id: str, cond: Any, timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            data = await self.alert(alert_id)
            if cond(data) or time.monotonic() > deadline:
                return data
            await asyncio.sleep(0.02)

    async def counts(self) -> tuple[int, int]:
        db = Database(self.app.state.runtime.settings.database_url)
        try:
            async with db.engine.connect() as conn:
                alerts = (await conn.exec_driver_sql("SELECT count(*) FROM alerts")).scalar()
                jobs = (await conn.exec_driver_sql("SELECT count(*) FROM jobs")).scalar()
        finally:
            await db.dispose()
        return int(alerts or 0), int(jobs or 0)


@contextlib.asynccontextmanager
async def running(db_url: str, tmp_path: Path, **scripts: Any) -> AsyncIterator[Api]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(
        database_url=db_url,
        config_path=config,
        api_keys={"k-acme": "acme", "k-globex": "globex"},
        audit_dir=tmp_path / "audit",
        public_url=PUBLIC,
        ack_secret="ack-secret",
        twilio_auth_token=TWILIO_TOKEN,
        telegram_secret=TG_SECRET,
        poll_interval=0.2,
    )
    defaults = {
        "sms": reply(S.DELIVERED),
        "telegram": reply(S.DELIVERED),
        "voice": reply(S.DELIVERED),
    }
    channels = {n: ScriptedChannel(n, s) for n, s in {**defaults, **scripts}.items()}
    typed: dict[str, Channel] = dict(channels)
    app = create_app(settings, typed)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            yield Api(client, app, channels)


async def test_ingest_commits_then_pages_and_get_shows_attempts(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as api:
        r = await api.post_alert(severity="high", details={"host": "db1"})
        assert r.status_code == 202, r.text
        body = r.json()
        assert set(body) == {"id", "short_id", "state", "deduplicated"}
        assert body["state"] == "triggered"
        assert len(body["short_id"]) == 6
        data = await api.until(body["id"], lambda d: len(d["attempts"]) == 2 and all(
            a["status"] == "delivered" for a in d["attempts"]))  # fmt: skip
        assert {(a["channel"], a["recipient_id"], a["status"]) for a in data["attempts"]} == {
            ("sms", "alice", "delivered"), ("telegram", "alice", "delivered")
        }  # fmt: skip
        sent = api.channels["sms"].sent[0].notification
        assert sent.details == {"host": "db1"}
        assert sent.severity == "high"
        assert sent.ack_url is not None
        assert sent.ack_url.startswith(f"{PUBLIC}/v1/ack?token=")
        # another company cannot see it
        other = await api.client.get(f"/v1/alerts/{body['id']}", headers={"X-API-Key": "k-globex"})
        assert other.status_code == 404
        audit = (await api.client.get("/v1/audit", params={"alert_id": body["id"]},
                                      headers=KEY)).json()  # fmt: skip
        created = audit[0]
        assert created["event"] == "created"
        assert created["ip"] == "203.0.113.7"
        assert created["request_id"] == r.headers["x-request-id"]


async def test_concurrent_duplicate_posts_page_once(pg_url: str, tmp_path: Path) -> None:
    async with running(pg_url, tmp_path) as api:
        responses = await asyncio.gather(*(api.post_alert(key="evt-1") for _ in range(20)))
        assert {r.status_code for r in responses} == {202}
        assert len({r.json()["id"] for r in responses}) == 1
        assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 19
        await api.until(responses[0].json()["id"], lambda d: len(d["attempts"]) == 2)
        await asyncio.sleep(0.3)
        assert len(api.channels["sms"].sent) == 1
        assert len(api.channels["telegram"].sent) == 1
        assert await api.counts() == (1, 4)  # one alert: 2 sends, the step timer, the cap


@pytest.mark.parametrize(
    ("headers", "body", "status", "needle"),
    [
        ({}, {"title": "x", "policy": "page"}, 401, "X-API-Key"),
        ({"X-API-Key": "nope"}, {"title": "x", "policy": "page"}, 401, "X-API-Key"),
        (KEY, {"policy": "page"}, 422, "body.title: Field required"),
        (KEY, {"title": "", "policy": "page"}, 422, "body.title"),
        (KEY, {"title": "x", "policy": "nope"}, 422, "unknown policy 'nope'"),
        (KEY, {"title": "x", "policy": "page", "severity": "meh"}, 422, "body.severity"),
        (KEY, {"title": "x", "policy": "page", "colour": 1}, 422, "body.colour"),
        (KEY, {"title": "x", "policy": "page", "details": {"a": "b" * 20000}}, 422, "16384"),
        ({**KEY, "Idempotency-Key": "k" * 300}, {"title": "x", "policy": "page"}, 422,
         "idempotency-key"),
    ],
)  # fmt: skip
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    sqlite_url: str, tmp_path: Path, headers: dict[str, str], body: Any, status: int, needle: str
) -> None:
    async with running(sqlite_url, tmp_path) as api:
        r = await api.client.post("/v1/alerts", json=body, headers=headers)
        assert r.status_code == status
        assert needle in str(r.json()["detail"])
        bad_json = await api.client.post(
            "/v1/alerts", content=b"{not json", headers={**KEY, "content-type": "application/json"}
        )
        assert bad_json.status_code == 422
        assert await api.counts() == (0, 0)
        assert (await api.client.get("/v1/audit", headers=KEY)).json() == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"title": "x", "policy": "page", "details": {"load": NaN}}',
        b'{"title": "x", "policy": "page", "details": {"load": [1, Infinity]}}',
        b'{"title": "x", "policy": "page", "details": {"load": {"min": -Infinity}}}',
    ],
)
async def test_non_finite_numbers_are_rejected_and_change_nothing(
    sqlite_url: str, tmp_path: Path, raw: bytes
) -> None:
    """`NaN` and `Infinity` are not JSON (RFC 8259), though Python's parser takes them: an
    alert carrying one could never be shown again (the response encoder refuses it)."""
    async with running(sqlite_url, tmp_path) as api:
        headers = {**KEY, "content-type": "application/json"}
        r = await api.client.post("/v1/alerts", content=raw, headers=headers)
        assert r.status_code == 422, r.text
        assert "only finite numbers are accepted" in str(r.json()["detail"])
        assert await api.counts() == (0, 0)
        # the same route still takes a finite number
        ok = raw.replace(b"-Infinity", b"-1").replace(b"Infinity", b"1").replace(b"NaN", b"0.5")
        assert (await api.client.post("/v1/alerts", content=ok, headers=headers)).status_code == 202


async def test_ack_and_resolve_endpoints(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, voice=lambda _n: None) as api:
        alert_id = (await api.post_alert(policy="ring")).json()["id"]
        await api.until(
            alert_id, lambda d: d["attempts"] and d["attempts"][0]["status"] == "sending"
        )
        t0 = time.time()
        r = await api.client.post(f"/v1/alerts/{alert_id}/ack", headers={**KEY, "X-Actor": "carol"})
        assert r.status_code == 200
        assert r.json()["state"] == "acknowledged"
        assert r.json()["acked_by"] == "carol"
        nid = api.channels["voice"].sent[0].notification.notification_id
        for _ in range(100):
            if nid in api.channels["voice"].cancelled:
                break
            await asyncio.sleep(0.005)
        assert api.channels["voice"].cancelled[nid] - t0 < 0.1
        again = await api.client.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
        assert again.status_code == 200  # acking twice is harmless
        r = await api.client.post(f"/v1/alerts/{alert_id}/resolve", headers=KEY)
        assert r.json()["state"] == "resolved"
        late = await api.client.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
        assert late.status_code == 409
        assert late.json()["detail"] == "alert is resolved"
        missing = await api.client.post("/v1/alerts/nope/ack", headers=KEY)
        assert missing.status_code == 404
        data = await api.until(alert_id, lambda d: d["attempts"][0]["status"] == "cancelled")
        assert data["attempts"][0]["status"] == "cancelled"


def _twilio_post(api: Api, path: str, form: dict[str, str], token: str = TWILIO_TOKEN) -> Any:
    signature = RequestValidator(token).compute_signature(PUBLIC + path, form)
    return api.client.post(path, data=form, headers={"X-Twilio-Signature": signature})


async def test_twilio_sms_reply_acks_only_with_valid_signature(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        body = (await api.post_alert()).json()
        await api.until(body["id"], lambda d: len(d["attempts"]) == 2)
        form = {"From": "+14155550101", "Body": f"ack {body['short_id'].lower()}"}
        forged = await _twilio_post(api, "/v1/webhooks/twilio/sms", form, token="wrong")
        assert forged.status_code == 403
        assert (await api.alert(body["id"]))["state"] == "triggered"
        stranger = await _twilio_post(api, "/v1/webhooks/twilio/sms",
                                      {"From": "+14155550199", "Body": "1"})  # fmt: skip
        assert "No open alert" in stranger.text
        ok = await _twilio_post(api, "/v1/webhooks/twilio/sms", form)
        assert ok.status_code == 200
        assert f"Acknowledged {body['short_id']}" in ok.text
        data = await api.alert(body["id"])
        assert data["state"] == "acknowledged"
        assert data["acked_by"] == "sms:+14155550101"


async def test_twilio_status_failure_moves_to_retry(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path) as api:
        alert_id = (await api.post_alert()).json()["id"]
        data = await api.until(
            alert_id,
            lambda d: ("sms", "delivered") in {(a["channel"], a["status"]) for a in d["attempts"]},
        )
        sid = next(a["provider_id"] for a in data["attempts"] if a["channel"] == "sms")
        form = {"MessageSid": sid, "MessageStatus": "undelivered", "ErrorCode": "30003"}
        r = await _twilio_post(api, "/v1/webhooks/twilio/status", form)
        assert r.status_code == 204
        data = await api.alert(alert_id)
        sms = [a for a in data["attempts"] if a["channel"] == "sms"]
        assert [(a["attempt"], a["status"]) for a in sms][:2] == [
            (1, "failed_retryable"), (2, "scheduled")
        ]  # fmt: skip


async def test_telegram_button_acks_with_secret(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        alert_id = (await api.post_alert()).json()["id"]
        await api.until(alert_id, lambda d: len(d["attempts"]) == 2)
        update = {
            "update_id": 1,
            "callback_query": {
                "id": "cq1",
                "data": f"ack:{alert_id}",
                "from": {"id": 42, "is_bot": False, "first_name": "Alice", "username": "alice"},
            },
        }
        bad = await api.client.post(
            "/v1/webhooks/telegram", json=update, headers={"X-Telegram-Bot-Api-Secret-Token": "x"}
        )
        assert bad.status_code == 403
        r = await api.client.post(
            "/v1/webhooks/telegram",
            json=update,
            headers={"X-Telegram-Bot-Api-Secret-Token": TG_SECRET},
        )
        assert r.json() == {"method": "answerCallbackQuery", "callback_query_id": "cq1",
                            "text": "Acknowledged."}  # fmt: skip
        data = await api.alert(alert_id)
        assert data["state"] == "acknowledged"
        assert data["acked_by"] == "telegram:alice"


async def test_email_link_confirms_then_acks(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path) as api:
        alert_id = (await api.post_alert()).json()["id"]
        token = sign_ack(alert_id, "ack-secret", int(time.time()) + 60)
        page = await api.client.get("/v1/ack", params={"token": token})
        assert page.status_code == 200
        assert 'method="post"' in page.text
        assert (await api.alert(alert_id))["state"] == "triggered"  # a GET never acks
        expired = sign_ack(alert_id, "ack-secret", int(time.time()) - 1)
        assert (await api.client.post("/v1/ack", data={"token": expired})).status_code == 403
        done = await api.client.post("/v1/ack", data={"token": token})
        assert done.status_code == 200
        assert "acknowledged" in done.text


async def test_config_crud_validates_like_the_file(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        c = api.client
        bad = await c.post("/v1/recipients", headers=KEY,
                           json={"id": "carol", "name": "C", "phone": "555-0101"})  # fmt: skip
        assert bad.status_code == 422
        assert "body.phone" in bad.json()["detail"][0]
        carol = {"id": "carol", "name": "Carol", "email": "carol@example.com"}
        assert (await c.post("/v1/recipients", json=carol, headers=KEY)).status_code == 201
        assert (await c.post("/v1/recipients", json=carol, headers=KEY)).status_code == 409
        ghost = {"name": "x", "steps": [{"recipients": ["ghost"], "channels": ["email"]}]}
        r = await c.post("/v1/policies", json=ghost, headers=KEY)
        assert r.status_code == 422
        assert r.json()["detail"] == ["policy.steps[0].recipients[0]: unknown recipient 'ghost'"]
        mail = {"name": "mail", "steps": [{"recipients": ["carol"], "channels": ["email"]}]}
        assert (await c.post("/v1/policies", json=mail, headers=KEY)).status_code == 201
        in_use = await c.delete("/v1/recipients/carol", headers=KEY)
        assert in_use.status_code == 409
        assert "policy mail" in in_use.json()["detail"]
        got = (await c.get("/v1/policies/mail", headers=KEY)).json()
        assert got["steps"][0]["delay"] == 300.0
        assert (await c.delete("/v1/policies/mail", headers=KEY)).status_code == 204
        assert (await c.delete("/v1/recipients/carol", headers=KEY)).status_code == 204
        assert (await c.get("/v1/recipients/carol", headers=KEY)).status_code == 404
        names = [p["name"] for p in (await c.get("/v1/policies", headers=KEY)).json()]
        assert names == ["page", "ring"]
        assert (await c.get("/v1/policies", headers={"X-API-Key": "k-globex"})).json() == []


async def test_audit_filters_csv_health_metrics_openapi(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path) as api:
        c = api.client
        first = (await api.post_alert()).json()["id"]
        second = (await api.post_alert(policy="ring")).json()["id"]
        await api.until(
            second, lambda d: d["attempts"] and d["attempts"][0]["status"] == "delivered"
        )
        await api.until(first, lambda d: len(d["attempts"]) == 2)
        only = (await c.get("/v1/audit", params={"alert_id": first, "channel": "sms"},
                            headers=KEY)).json()  # fmt: skip
        assert only
        assert {(r["alert_id"], r["channel"]) for r in only} == {(first, "sms")}
        future = (await c.get("/v1/audit", params={"since": "2999-01-01T00:00:00Z"},
                              headers=KEY)).json()  # fmt: skip
        assert future == []
        r = await c.get("/v1/audit.csv", params={"group": "primary"}, headers=KEY)
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert r.headers["content-type"].startswith("text/csv")
        assert rows
        assert {row["recipient_id"] for row in rows} == {"alice"}
        assert list(rows[0])[:10] == ["ts", "alert_id", "notification_uuid", "channel", "status",
                                      "attempt", "reason", "actor", "ip", "request_id"]  # fmt: skip
        assert (await c.get("/v1/audit.csv", params={"group": "x"}, headers=KEY)).status_code == 404
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        assert (await c.get("/readyz")).json() == {"status": "ok", "database": "ok"}
        metrics = (await c.get("/metrics")).text
        assert "ackline_alerts_ingested_total" in metrics
        assert "ackline_dispatch_lag_seconds_bucket" in metrics
        schema = (await c.get("/openapi.json")).json()
        for path in ("/v1/alerts", "/v1/alerts/{alert_id}", "/v1/alerts/{alert_id}/ack",
                     "/v1/alerts/{alert_id}/resolve", "/v1/policies", "/v1/recipients",
                     "/v1/audit", "/v1/audit.csv", "/v1/webhooks/twilio/sms",
                     "/v1/webhooks/twilio/status", "/v1/webhooks/telegram", "/healthz",
                     "/readyz"):  # fmt: skip
            assert path in schema["paths"], path


async def test_notification_payload_is_complete(sqlite_url: str, tmp_path: Path) -> None:
    seen: list[Notification] = []

    def capture(n: Notification) -> Any:
        seen.append(n)
        return reply(S.DELIVERED)(n)

    async with running(sqlite_url, tmp_path, voice=capture) as api:
        body = (await api.post_alert(policy="ring", title="CPU", summary="95%")).json()
        await api.until(
            body["id"], lambda d: d["attempts"] and d["attempts"][0]["status"] == "delivered"
        )
        n = seen[0]
        assert (n.alert_id, n.alert_short_id, n.title, n.summary, n.attempt) == (
            body["id"], body["short_id"], "CPU", "95%", 1
        )  # fmt: skip
        assert n.contact.phone == "+14155550101"
        assert n.channel == "voice"
