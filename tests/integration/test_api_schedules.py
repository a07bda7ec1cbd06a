"""Schedules and overrides over HTTP (ASGI in-process, SQLite and PostgreSQL)."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import yaml
from icalendar import Calendar

from api.app import create_app
from api.settings import Settings

pytest_plugins = ["tests.conftest_escalation"]

KEY = {"X-API-Key": "k-acme"}
OTHER = {"X-API-Key": "k-globex"}
START = date.today() - timedelta(days=10)  # the feeds begin a week ago: in alice's week
CONFIG = {
    "company": "acme",
    "recipients": [
        {"id": "alice", "name": "Alice", "phone": "+14155550101"},
        {"id": "bob", "name": "Bob", "phone": "+14155550102"},
        {"id": "carol", "name": "Carol", "phone": "+14155550103"},
    ],
}


def payments(start: str = "2026-03-16", **layer: Any) -> dict[str, Any]:
    return {"name": "payments", "time_zone": "Europe/Berlin", "layers": [
        {"name": "primary", "rotation": "weekly", "handoff": "09:00", "start": start,
         "participants": ["alice", "bob"]} | layer,
    ]}  # fmt: skip


@contextlib.asynccontextmanager
async def running(db_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    settings = Settings(
        database_url=db_url, config_path=config, audit_dir=tmp_path / "audit",
        api_keys={"k-acme": "acme", "k-globex": "globex"}, poll_interval=0.2,
    )  # fmt: skip
    app = create_app(settings, {})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            yield client


async def test_schedule_crud_is_validated_and_scoped_to_the_tenant(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as c:
        assert (await c.post("/v1/schedules", json=payments(), headers=KEY)).status_code == 201
        again = await c.post("/v1/schedules", json=payments(), headers=KEY)
        assert again.status_code == 409
        got = await c.get("/v1/schedules/payments", headers=KEY)
        assert got.status_code == 200
        assert got.json()["layers"][0]["participants"] == ["alice", "bob"]
        assert (await c.get("/v1/schedules", headers=OTHER)).json() == []
        assert (await c.get("/v1/schedules/payments", headers=OTHER)).status_code == 404
        bad = await c.put("/v1/schedules/payments", headers=KEY,
                          json=payments(participants=["alice", "mallory"]))  # fmt: skip
        assert bad.status_code == 422
        assert bad.json()["detail"] == [
            "schedule.layers[0].participants[1]: unknown recipient 'mallory'"
        ]
        zone = await c.put("/v1/schedules/payments", headers=KEY,
                           json=payments() | {"time_zone": "Europe/Atlantis"})  # fmt: skip
        assert zone.status_code == 422
        assert "unknown time zone 'Europe/Atlantis'" in zone.text
        policy = {"name": "pay", "steps": [{"schedules": ["payments"], "channels": ["sms"]}]}
        assert (await c.put("/v1/policies/pay", json=policy, headers=KEY)).status_code == 200
        nope = {"name": "x", "steps": [{"schedules": ["billing"], "channels": ["sms"]}]}
        assert (await c.put("/v1/policies/x", json=nope, headers=KEY)).status_code == 422
        used = await c.delete("/v1/schedules/payments", headers=KEY)
        assert used.status_code == 409
        assert "policy pay" in used.text
        on_rota = await c.delete("/v1/recipients/bob", headers=KEY)
        assert on_rota.status_code == 409
        assert "schedule payments" in on_rota.text
        assert (await c.delete("/v1/policies/pay", headers=KEY)).status_code == 204
        assert (await c.delete("/v1/schedules/payments", headers=KEY)).status_code == 204
        assert (await c.delete("/v1/schedules/payments", headers=KEY)).status_code == 404


async def test_oncall_and_shifts_follow_the_rotation_and_overrides(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as c:
        await c.post("/v1/schedules", json=payments(), headers=KEY)

        async def oncall(at: str) -> dict[str, Any]:
            r = await c.get("/v1/schedules/payments/oncall", params={"at": at}, headers=KEY)
            assert r.status_code == 200, r.text
            data: dict[str, Any] = r.json()
            return data

        assert (await oncall("2026-03-30T08:59:00+02:00"))["recipients"] == ["bob"]
        assert (await oncall("2026-03-30T09:00:00+02:00"))["recipients"] == ["alice"]
        first = {
            "schedule": "payments",
            "recipient": "carol",
            "start": "2026-03-24T00:00:00+01:00",
            "end": "2026-03-26T00:00:00+01:00",
        }
        second = first | {"recipient": "alice", "start": "2026-03-25T00:00:00+01:00"}
        ids = []
        for body in (first, second):
            r = await c.post("/v1/overrides", json=body, headers=KEY)
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
        assert ids[0] < ids[1]
        bad = await c.post("/v1/overrides", headers=KEY,
                           json=first | {"recipient": "mallory"})  # fmt: skip
        assert bad.status_code == 422
        assert (await c.post("/v1/overrides", json=first, headers=OTHER)).status_code == 422
        got = await oncall("2026-03-25T12:00:00+01:00")
        assert (got["recipients"], got["layer"], got["override"]["id"]) == (
            ["alice"], "primary", ids[1]
        )  # fmt: skip
        r = await c.get(
            "/v1/schedules/payments/shifts",
            headers=KEY,
            params={"since": "2026-03-23T00:00:00+01:00", "until": "2026-03-31T00:00:00+02:00"},
        )
        assert r.status_code == 200, r.text
        found = r.json()
        assert [(s["start"][:16], s["recipient"]) for s in found] == [
            ("2026-03-22T23:00", "alice"),  # until Monday 09:00 CET
            ("2026-03-23T08:00", "bob"),
            ("2026-03-23T23:00", "carol"),  # override 1
            ("2026-03-24T23:00", "alice"),  # override 2, created later, wins
            ("2026-03-25T23:00", "bob"),
            ("2026-03-30T07:00", "alice"),  # Monday 09:00 CEST
        ]
        for a, b in itertools.pairwise(found):
            assert a["end"] == b["start"]
        assert (await c.delete(f"/v1/overrides/{ids[1]}", headers=OTHER)).status_code == 404
        assert (await c.delete(f"/v1/overrides/{ids[1]}", headers=KEY)).status_code == 204
        assert (await oncall("2026-03-25T12:00:00+01:00"))["recipients"] == ["carol"]


async def test_shift_windows_are_bounded(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as c:
        await c.post("/v1/schedules", json=payments(), headers=KEY)
        url = "/v1/schedules/payments/shifts"
        for since, until in [
            ("2026-01-01T00:00Z", "2026-04-02T00:00Z"),  # 91 days
            ("2026-01-02T00:00Z", "2026-01-01T00:00Z"),
            ("2026-01-01T00:00", "2026-01-02T00:00"),
        ]:
            r = await c.get(url, params={"since": since, "until": until}, headers=KEY)
            assert r.status_code == 422, (since, until, r.text)
        ok = await c.get(
            url, headers=KEY, params={"since": "2026-01-01T00:00Z", "until": "2026-04-01T00:00Z"}
        )
        assert ok.status_code == 200  # fmt: skip
        missing = await c.get(
            "/v1/schedules/billing/shifts",
            headers=KEY,
            params={"since": "2026-01-01T00:00Z", "until": "2026-01-02T00:00Z"},
        )
        assert missing.status_code == 404  # fmt: skip


async def test_icalendar_feeds_per_schedule_and_per_person(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as c:
        await c.post("/v1/schedules", json=payments(start=START.isoformat()), headers=KEY)
        r = await c.get("/v1/schedules/payments.ics", headers=KEY)
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/calendar")
        events = Calendar.from_ical(r.content).walk("VEVENT")
        people = [str(e["summary"]) for e in events]
        assert people[:2] == ["On call: payments (alice)", "On call: payments (bob)"]
        starts = [e.decoded("dtstart") for e in events]
        assert starts == sorted(starts)
        assert len(set(str(e["uid"]) for e in events)) == len(events)
        for e in events:  # a week of the rota, an hour more or less across DST
            assert e.decoded("dtend") - e.decoded("dtstart") <= timedelta(days=7, hours=1)
        mine = await c.get("/v1/recipients/bob/oncall.ics", headers=KEY)
        assert mine.status_code == 200
        summaries = {str(e["summary"]) for e in Calendar.from_ical(mine.content).walk("VEVENT")}
        assert summaries == {"On call: payments (bob)"}
        assert (await c.get("/v1/recipients/zed/oncall.ics", headers=KEY)).status_code == 404
        assert (await c.get("/v1/schedules/billing.ics", headers=KEY)).status_code == 404
        assert (await c.get("/v1/schedules/payments.ics", headers=OTHER)).status_code == 404


async def test_a_schedules_reminder_is_validated_stored_and_optional(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as c:
        plain = await c.post("/v1/schedules", json=payments(), headers=KEY)
        assert plain.status_code == 201
        assert plain.json()["reminder"] is None
        reminded = payments() | {"reminder": {"before": "30m", "channel": "sms"}}
        put = await c.put("/v1/schedules/payments", json=reminded, headers=KEY)
        assert put.status_code == 200, put.text
        got = (await c.get("/v1/schedules/payments", headers=KEY)).json()
        assert got["reminder"] == {"before": 1800.0, "channel": "sms"}
        voice = payments() | {"reminder": {"channel": "voice"}}
        bad = await c.put("/v1/schedules/payments", json=voice, headers=KEY)
        assert bad.status_code == 422
        assert bad.json()["detail"] == [
            "schedule.reminder.channel: 'voice' cannot carry a reminder "
            "(one of: sms, telegram, slack, email, webhook)"
        ]
        soon = payments() | {"reminder": {"before": "10s"}}
        bad = await c.put("/v1/schedules/payments", json=soon, headers=KEY)
        assert bad.status_code == 422
        assert "reminder.before is from 1m to 24h" in bad.text
        # the default: 15 minutes, on the recipient's first reachable channel
        default = await c.put("/v1/schedules/payments", headers=KEY,
                              json=payments() | {"reminder": {}})  # fmt: skip
        assert default.json()["reminder"] == {"before": 900.0, "channel": None}
