"""The console's status page desk in-process: admins publish incidents, updates and
maintenance windows through StatusService (audited with the person and their IP), with
errors beside the fields; responders and viewers read; other tenants are kept out; the
subscriber list shows kinds and states, never a whole address."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest

from api.web.status import StatusPage
from escalation.status import IncidentStatus, MaintenanceStatus
from tests.integration.test_api_alerts import KEY, Api, running
from tests.integration.test_console_auth import sign_in, signed_in, users

pytest_plugins = ["tests.conftest_escalation"]


@pytest.fixture
async def console(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    async with running(sqlite_url, tmp_path) as api:
        await users(api)
        yield api


def status_page(api: Api) -> StatusPage:
    page: StatusPage = api.app.state.status_page
    return page


def audit(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


async def test_an_admin_publishes_updates_and_resolves_an_incident(
    console: Api, tmp_path: Path
) -> None:
    client = console.client
    token = await signed_in(client, "ada")
    page = await client.get("/console/incidents")
    assert page.status_code == 200
    assert 'href="/console/incidents" aria-current="page"' in page.text  # the nav link
    assert 'id="new-incident"' in page.text
    assert 'id="no-open"' in page.text

    # nothing filled in, an unknown component: errors beside the fields, nothing created
    r = await client.post("/console/incidents", data={
        "csrf_token": token, "title": " ", "body": "", "impact": "minor"})  # fmt: skip
    assert r.status_code == 422
    assert 'id="err-new-title"' in r.text
    assert 'id="err-new-body"' in r.text
    assert 'aria-describedby="err-new-title"' in r.text
    r = await client.post("/console/incidents", data={
        "csrf_token": token, "title": "Slow pages", "body": "Looking.", "impact": "huge",
        "components": ["api", "nope"]})  # fmt: skip
    assert r.status_code == 422
    assert 'id="err-new-impact"' in r.text
    assert 'value="Slow pages"' in r.text  # what was typed is kept
    r = await client.post("/console/incidents", data={
        "csrf_token": token, "title": "Slow pages", "body": "Looking.", "impact": "major",
        "components": ["api", "nope"]})  # fmt: skip
    assert r.status_code == 422
    assert "unknown components: nope" in r.text
    assert await status_page(console).service.incidents() == []

    r = await client.post("/console/incidents", data={
        "csrf_token": token, "title": "Slow pages", "body": "We are looking into it.",
        "impact": "major", "components": ["api"]})  # fmt: skip
    assert r.status_code == 303, r.text
    [incident] = await status_page(console).service.incidents()
    assert (
        unquote(r.headers["location"])
        == f"/console/incidents?done=incident {incident.id} published"
    )
    assert (incident.title, incident.impact.value, incident.components) == (
        "Slow pages", "major", ("api",))  # fmt: skip

    updates = f"/console/incidents/{incident.id}/updates"
    empty = await client.post(updates, data={"csrf_token": token, "status": "identified",
                                             "body": ""})  # fmt: skip
    assert empty.status_code == 422
    assert f'id="err-{incident.id}-body"' in empty.text
    r = await client.post(f"/console/incidents/{incident.id}/updates", data={
        "csrf_token": token, "status": "identified", "body": "A bad deploy."})  # fmt: skip
    assert r.status_code == 303
    r = await client.post(updates, data={"csrf_token": token, "status": "monitoring",
                                         "body": "Rolled back.", "resolve": "1"})  # fmt: skip
    assert r.status_code == 303
    assert r.headers["location"].endswith("resolved")
    done = await status_page(console).service.incident(incident.id)
    assert [u.status for u in done.updates] == [
        IncidentStatus.RESOLVED,
        IncidentStatus.IDENTIFIED,
        IncidentStatus.INVESTIGATING,
    ]
    assert (await client.post("/console/incidents/999/updates", data={
        "csrf_token": token, "status": "identified", "body": "x"})).status_code == 404  # fmt: skip

    page = await client.get("/console/incidents")
    assert "Rolled back." in page.text
    assert 'id="no-open"' in page.text
    assert f'action="/console/incidents/{incident.id}/updates"' not in page.text  # resolved
    lines = audit(tmp_path, "status_incident")
    assert [(a["status"], a["incident_status"], a["actor"], a["ip"]) for a in lines] == [
        ("created", "investigating", "console:ada", "203.0.113.7"),
        ("updated", "identified", "console:ada", "203.0.113.7"),
        ("updated", "resolved", "console:ada", "203.0.113.7"),
    ]


async def test_maintenance_windows_are_checked_scheduled_and_cancelled(
    console: Api, tmp_path: Path
) -> None:
    client = console.client
    token = await signed_in(client, "ada")
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)
    base = {"csrf_token": token, "title": "Database upgrade", "components": ["api"],
            "starts_local": "2030-01-02T10:00", "ends_local": "2030-01-02T09:00"}  # fmt: skip

    r = await client.post("/console/maintenances", data=base)  # no script ran: no offsets
    assert r.status_code == 422
    assert 'id="err-m-starts_at"' in r.text
    assert 'value="2030-01-02T10:00"' in r.text  # the local times are shown again
    naive = {**base, "starts_at": "2030-01-02T10:00:00", "ends_at": "2030-01-02T11:00:00"}
    r = await client.post("/console/maintenances", data=naive)
    assert r.status_code == 422
    assert "must carry a time zone" in r.text
    backwards = {**base, "starts_at": (start + timedelta(hours=1)).isoformat(),
                 "ends_at": start.isoformat()}  # fmt: skip
    r = await client.post("/console/maintenances", data=backwards)
    assert r.status_code == 422
    assert 'id="err-m-ends_at"' in r.text
    assert "must be after the start" in r.text
    assert await status_page(console).service.maintenances() == []

    kolkata = {**base, "starts_at": "2030-01-02T10:00:00+05:30",
               "ends_at": "2030-01-02T12:00:00+05:30"}  # fmt: skip
    r = await client.post("/console/maintenances", data=kolkata)
    assert r.status_code == 303, r.text
    [window] = await status_page(console).service.maintenances()
    assert window.starts_at.replace(tzinfo=window.starts_at.tzinfo or UTC) == datetime(
        2030, 1, 2, 4, 30, tzinfo=UTC)  # fmt: skip
    page = await client.get("/console/incidents")
    assert "2030-01-02 04:30 UTC" in page.text
    assert f'id="cancel-maintenance-{window.id}"' in page.text

    r = await client.post(f"/console/maintenances/{window.id}/cancel", data={"csrf_token": token})
    assert r.status_code == 303
    [window] = await status_page(console).service.maintenances()
    assert window.status(datetime.now(UTC)) is MaintenanceStatus.CANCELLED
    page = await client.get("/console/incidents")
    assert f'id="cancel-maintenance-{window.id}"' not in page.text
    lines = audit(tmp_path, "status_maintenance")
    assert [(a["status"], a["actor"], a["ip"]) for a in lines] == [
        ("created", "console:ada", "203.0.113.7"),
        ("cancelled", "console:ada", "203.0.113.7"),
    ]


async def test_responders_and_viewers_read_other_tenants_are_kept_out(console: Api) -> None:
    client = console.client
    service = status_page(console).service
    r = await client.post("/v1/status/incidents", headers=KEY,
                          json={"title": "Queue lag", "body": "Investigating."})  # fmt: skip
    incident = r.json()["id"]
    for name in ("rex", "vic"):
        client.cookies.clear()
        token = await signed_in(client, name)
        page = await client.get("/console/incidents")
        assert page.status_code == 200, name
        assert "Queue lag" in page.text, name
        assert 'id="new-incident"' not in page.text, name
        assert "/updates" not in page.text, name
        for path, data in [
            ("/console/incidents", {"title": "x", "body": "y", "impact": "minor"}),
            (f"/console/incidents/{incident}/updates", {"status": "resolved", "body": "z"}),
            ("/console/maintenances", {"title": "m"}),
        ]:
            r = await client.post(path, data={"csrf_token": token, **data})
            assert r.status_code == 403, (name, path)
    assert [u.body for u in (await service.incident(incident)).updates] == ["Investigating."]

    client.cookies.clear()
    r = await sign_in(client, "gus")  # globex: not the status page's operator
    assert r.status_code == 303
    home = await client.get("/console")
    assert 'href="/console/incidents"' not in home.text
    assert (await client.get("/console/incidents")).status_code == 403


async def test_subscribers_show_kind_and_state_not_the_address(console: Api) -> None:
    client = console.client
    secret_path = "/services/T000/B000/XXXXsecretXXXX"
    for kind, address in [("slack", f"https://hooks.slack.example{secret_path}"),
                          ("sms", "+14155550123")]:  # fmt: skip
        r = await client.post("/v1/status/subscribers", headers=KEY,
                              json={"kind": kind, "address": address})  # fmt: skip
        assert r.status_code == 201, r.text
    await signed_in(client, "vic")
    page = await client.get("/console/incidents")
    assert '<tr data-kind="slack" data-state="confirmed">' in page.text
    assert '<tr data-kind="sms" data-state="confirmed">' in page.text
    assert "https://hooks.slack.example/…" in page.text
    assert "…23" in page.text
    assert secret_path not in page.text
    assert "+14155550123" not in page.text
