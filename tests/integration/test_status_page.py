"""The public status page end to end (ASGI in-process, real databases): component states
from real rows (jobs, delivery attempts), incidents and maintenance through the API, the
Atom feed, the JSON summary and the badge; samples written once per interval across
nodes, and automatic incidents."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import httpx
import yaml
from fastapi import FastAPI
from sqlalchemy import text

from api.app import create_app
from api.settings import Settings
from api.status_sampler import Sampler
from api.web.status import StatusPage
from storage.db import Database
from storage.models import Job, NotificationAttempt

pytest_plugins = ["tests.conftest_escalation"]

PUBLIC = "https://status.example.com"
ACME = {"X-API-Key": "k-acme"}
GLOBEX = {"X-API-Key": "k-globex"}
ATOM = "{http://www.w3.org/2005/Atom}"
CONFIG = {
    "company": "acme",
    "recipients": [{"id": "alice", "name": "Alice", "email": "alice@ops.example"}],
    "policies": [{"name": "page", "steps": [{"recipients": ["alice"], "channels": ["email"]}]}],
}


@contextlib.asynccontextmanager
async def running(db_url: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[
    tuple[httpx.AsyncClient, FastAPI]
]:  # fmt: skip
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    values: dict[str, Any] = {
        "database_url": db_url,
        "config_path": config,
        "api_keys": {"k-acme": "acme", "k-globex": "globex"},
        "audit_dir": tmp_path / "audit",
        "public_url": PUBLIC,
        "embedded_worker": False,  # nobody claims jobs: the queue lag is ours to set
        "smtp_host": "127.0.0.1",
        "smtp_from": "status@ops.example",
        "webhook_secret": "whsec-test",
        "status_sample_interval": 60.0,
        **overrides,
    }
    app = create_app(Settings(**values), {})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 5555))
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            yield client, app


def page_of(app: FastAPI) -> StatusPage:
    page: StatusPage = app.state.status_page
    return page


async def states(client: httpx.AsyncClient, app: FastAPI) -> dict[str, str | None]:
    page_of(app).collector.forget()
    r = await client.get("/status/summary.json")
    assert r.status_code == 200, r.text
    return {c["id"]: c["status"] for c in r.json()["components"]}


async def insert(db_url: str, *rows: Any) -> None:
    db = Database(db_url)
    try:
        async with db.session() as s, s.begin():
            s.add_all(rows)
    finally:
        await db.dispose()


def attempt(channel: str, status: str, finished: datetime) -> NotificationAttempt:
    return NotificationAttempt(
        company="acme", alert_id=str(uuid.uuid4()), notification_id=str(uuid.uuid4()),
        attempt=1, channel=channel, recipient_id="alice", status=status,
        scheduled_for=finished, sent_at=finished, finished_at=finished,
    )  # fmt: skip


async def test_components_come_from_configuration_and_real_rows(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as (client, app):
        assert await states(client, app) == {
            "api": "operational",
            "dispatcher": "operational",
            "email": "operational",
            "webhook": "operational",
        }  # fmt: skip  (no sms, telegram, slack or voice: not configured, not shown)
        now = datetime.now(UTC)
        # email: every delivery of the last 15 minutes failed; webhook: 1 of 10 failed
        await insert(db_url, *[attempt("email", "failed_retryable", now) for _ in range(4)],
                     attempt("email", "delivered", now - timedelta(hours=1)),
                     *[attempt("webhook", "delivered", now) for _ in range(9)],
                     attempt("webhook", "failed_permanent", now))  # fmt: skip
        # a send due 3 minutes ago that no worker holds
        await insert(db_url, Job(alert_id=str(uuid.uuid4()), kind="send", payload={},
                                 due_at=now - timedelta(minutes=3), created_at=now))  # fmt: skip
        got = await states(client, app)
        assert got["email"] == "major_outage"
        assert got["webhook"] == "degraded"
        assert got["dispatcher"] == "partial_outage"
        assert got["api"] == "operational"
        r = await client.get("/status/summary.json")
        assert r.json()["status"] == {"indicator": "major_outage", "description": "Major outage"}
        # a job a worker holds under a live lease is in flight, not waiting
        db = Database(db_url)
        try:
            async with db.engine.begin() as conn:
                await conn.execute(text("UPDATE jobs SET owner = 'w1', lease_until = :until"),
                                   {"until": now + timedelta(minutes=1)})  # fmt: skip
        finally:
            await db.dispose()
        assert (await states(client, app))["dispatcher"] == "operational"


async def test_incidents_through_the_api_page_feed_and_audit(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as (client, _app):
        new = {"title": "Email delays", "body": "Emails are slow to arrive.",
               "impact": "minor", "components": ["email"]}  # fmt: skip
        r = await client.post("/v1/status/incidents", json=new, headers=GLOBEX)
        assert r.status_code == 403, r.text  # not the operator company
        r = await client.post("/v1/status/incidents", json=new)
        assert r.status_code == 401
        r = await client.post("/v1/status/incidents", json={**new, "components": ["nope"]},
                              headers=ACME)  # fmt: skip
        assert r.status_code == 422
        assert "unknown components: nope" in r.text
        r = await client.post("/v1/status/incidents", json=new, headers=ACME)
        assert r.status_code == 201, r.text
        incident = r.json()
        assert incident["status"] == "investigating"
        assert len(incident["updates"]) == 1
        for status, body in [("identified", "The relay rejects our connections."),
                             ("monitoring", "A second relay takes the mail.")]:  # fmt: skip
            r = await client.post(f"/v1/status/incidents/{incident['id']}/updates",
                                  json={"status": status, "body": body}, headers=ACME)  # fmt: skip
            assert r.status_code == 201, r.text
        summary = (await client.get("/status/summary.json")).json()
        assert [i["title"] for i in summary["incidents"]] == ["Email delays"]
        assert [u["status"] for u in summary["incidents"][0]["updates"]] == [
            "monitoring", "identified", "investigating"]  # fmt: skip

        html = await client.get("/status")
        assert html.status_code == 200
        assert "script-src 'self'" in html.headers["content-security-policy"]
        assert '<link rel="alternate" type="application/atom+xml"' in html.text
        assert 'href="/status/feed.atom"' in html.text
        assert "Active incidents" in html.text
        assert "A second relay takes the mail." in html.text

        r = await client.post(f"/v1/status/incidents/{incident['id']}/updates",
                              json={"status": "resolved", "body": "Mail flows again."},
                              headers=ACME)  # fmt: skip
        assert r.status_code == 201
        assert r.json()["resolved_at"] is not None
        assert (await client.get("/status/summary.json")).json()["incidents"] == []
        html = await client.get("/status")
        assert "Active incidents" not in html.text
        assert "Past incidents" in html.text
        assert "Mail flows again." in html.text

        feed = await client.get("/status/feed.atom")
        assert feed.headers["content-type"].startswith("application/atom+xml")
        root = ET.fromstring(feed.content)
        assert root.tag == f"{ATOM}feed"
        for required in ("id", "title", "updated", "author"):
            assert root.find(f"{ATOM}{required}") is not None, required
        entries = root.findall(f"{ATOM}entry")
        assert [e.findtext(f"{ATOM}title") for e in entries] == [
            "Email delays: resolved", "Email delays: monitoring", "Email delays: identified",
            "Email delays: investigating"]  # fmt: skip
        ids = [e.findtext(f"{ATOM}id") for e in entries]
        assert len(set(ids)) == 4
        assert all(i and i.startswith("urn:uuid:") for i in ids)
        for e in entries:
            datetime.fromisoformat(e.findtext(f"{ATOM}updated") or "")  # RFC 3339
            link = e.find(f"{ATOM}link")
            assert link is not None
            assert link.get("href") == f"{PUBLIC}/status#incident-{incident['id']}"
        self_link = root.find(f"{ATOM}link[@rel='self']")
        assert self_link is not None
        assert self_link.get("href") == f"{PUBLIC}/status/feed.atom"

        r = await client.post("/v1/status/incidents/999/updates",
                              json={"status": "resolved", "body": "x"}, headers=ACME)  # fmt: skip
        assert r.status_code == 404
    audit = (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()
    lines = [yaml.safe_load(line) for line in audit if '"status_incident"' in line]
    assert [(a["status"], a["incident_status"]) for a in lines] == [
        ("created", "investigating"), ("updated", "identified"), ("updated", "monitoring"),
        ("updated", "resolved")]  # fmt: skip
    assert all(a["actor"] == "api:acme" and a["ip"] == "203.0.113.7" for a in lines)


async def test_maintenance_window_and_badge(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path) as (client, app):
        badge = await client.get("/status/badge/webhook.svg")
        assert badge.status_code == 200
        assert badge.headers["content-type"] == "image/svg+xml"
        svg = ET.fromstring(badge.content)
        assert svg.tag == "{http://www.w3.org/2000/svg}svg"
        assert svg.get("aria-label") == "Webhooks: operational"
        now = datetime.now(UTC)
        window = {"title": "Relay upgrade", "body": "Webhooks may be late.",
                  "components": ["webhook"], "starts_at": (now - timedelta(minutes=5)).isoformat(),
                  "ends_at": (now + timedelta(hours=1)).isoformat()}  # fmt: skip
        naive = {**window, "starts_at": "2026-01-01T00:00:00"}
        r = await client.post("/v1/status/maintenances", json=naive, headers=ACME)
        assert r.status_code == 422
        assert "time zone" in r.text
        r = await client.post("/v1/status/maintenances", json=window, headers=ACME)
        assert r.status_code == 201, r.text
        assert r.json()["status"] == "in_progress"
        assert (await states(client, app))["webhook"] == "maintenance"
        badge = await client.get("/status/badge/webhook.svg")
        assert ET.fromstring(badge.content).get("aria-label") == "Webhooks: under maintenance"
        summary = (await client.get("/status/summary.json")).json()
        assert [m["title"] for m in summary["scheduled_maintenances"]] == ["Relay upgrade"]
        assert summary["status"]["indicator"] == "maintenance"
        assert "Relay upgrade" in (await client.get("/status")).text
        r = await client.post(f"/v1/status/maintenances/{r.json()['id']}/cancel", headers=ACME)
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        assert (await states(client, app))["webhook"] == "operational"
        assert (await client.get("/status/badge/nope.svg")).status_code == 404


async def test_samples_count_once_per_interval_across_nodes(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as (client, app):
        page = page_of(app)
        other = Sampler(page.collector, page.sampler.interval)  # a second node
        await page.sampler.sample_once()
        await other.sample_once()
        await page.sampler.sample_once()
        db = Database(db_url)
        try:
            async with db.engine.connect() as conn:
                rows = (await conn.execute(text(
                    "SELECT component, count(*), sum(seconds) FROM status_samples "
                    "GROUP BY component ORDER BY component"))).all()  # fmt: skip
        finally:
            await db.dispose()
        # this test may straddle an interval boundary: then two intervals, never more
        assert [r[0] for r in rows] == ["api", "dispatcher", "email", "webhook"]
        assert all(r[1] in (1, 2) and r[2] == 60 * r[1] for r in rows), rows
        page.forget_history()
        summary = (await client.get("/status/summary.json")).json()
        assert {c["id"]: c["uptime_90d"] for c in summary["components"]} == {
            "api": 1.0, "dispatcher": 1.0, "email": 1.0, "webhook": 1.0}  # fmt: skip
        html = (await client.get("/status")).text
        assert html.count('class="bar operational"') == 4  # today, one per component
        assert html.count('class="bar no_data"') == 4 * 89  # days without samples: no data
        assert "100% uptime" in html


async def test_automatic_incident_opens_once_and_resolves(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path, status_auto_incidents=True) as (_client, app):
        page = page_of(app)
        now = datetime.now(UTC)
        stuck = Job(alert_id="a", kind="send", payload={}, due_at=now - timedelta(minutes=11),
                    created_at=now)  # fmt: skip
        await insert(sqlite_url, stuck)
        await page.sampler.sample_once()
        await Sampler(page.collector, 60.0, auto_incidents=True).sample_once()  # another node
        incidents = await page.service.incidents()
        assert [(i.title, i.impact.value, i.components, i.automatic) for i in incidents] == [
            ("Notification dispatcher: major outage", "critical", ("dispatcher",), True)
        ]
        db = Database(sqlite_url)
        try:
            async with db.engine.begin() as conn:
                await conn.execute(text("UPDATE jobs SET done = 1"))
        finally:
            await db.dispose()
        await page.sampler.sample_once()
        [incident] = await page.service.incidents()
        assert incident.resolved
        assert incident.updates[0].body == ("Notification dispatcher has recovered.")
    audit = (tmp_path / "audit" / "acme.jsonl").read_text()
    assert audit.count('"actor":"status:automatic"') == 2  # created, resolved
