"""The endpoints a console works from: the alert list, escalate, reassign, the timeline."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sqlalchemy import text

from escalation.channels.base import DeliveryResult, DeliveryStatus, Notification
from storage.db import Database
from tests.integration.test_api_alerts import KEY, Api, running

pytest_plugins = ["tests.conftest_escalation"]

S = DeliveryStatus
GLOBEX = {"X-API-Key": "k-globex"}
TWO_STEPS = {"name": "two", "steps": [
    {"recipients": ["alice"], "channels": ["sms"], "delay": "10m"},
    {"recipients": ["bob"], "channels": ["voice"], "delay": "10m"},
]}  # fmt: skip


async def page_all(api: Api, params: dict[str, Any], headers: dict[str, str] = KEY) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        r = await api.client.get(
            "/v1/alerts", params={**params, **({"cursor": cursor} if cursor else {})},
            headers=headers,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        ids += [a["id"] for a in r.json()["alerts"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return ids


async def listed(api: Api, headers: dict[str, str] = KEY, **params: Any) -> dict[str, Any]:
    r = await api.client.get("/v1/alerts", params=params, headers=headers)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


async def audit_of(api: Api, alert_id: str) -> list[dict[str, Any]]:
    r = await api.client.get("/v1/audit", params={"alert_id": alert_id}, headers=KEY)
    records: list[dict[str, Any]] = r.json()
    return records


async def until_true(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def rows(api: Api, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    db = Database(api.app.state.runtime.settings.database_url)
    try:
        async with db.engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(text(sql), params)).all()]
    finally:
        await db.dispose()


# ------------------------------------------------------------------ GET /v1/alerts


async def test_list_filters_and_counts(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        ids = []
        for title, summary, severity, policy in [
            ("DB down", "primary unreachable", "critical", "page"),
            ("disk full", "/var at 99%", "high", "page"),
            ("cert expiring", "api.example.com in 3 days", "low", "ring"),
            ("Replica lag", "the DATABASE replica is behind", "high", "ring"),
        ]:
            r = await api.post_alert(title=title, summary=summary, severity=severity,
                                     policy=policy)  # fmt: skip
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        db_down, disk, cert, lag = ids
        acked = await api.client.post(f"/v1/alerts/{disk}/ack",
                                      headers={**KEY, "X-Actor": "carol"})  # fmt: skip
        assert acked.status_code == 200
        assert (await api.client.post(f"/v1/alerts/{cert}/resolve", headers=KEY)).status_code == 200

        everything = await listed(api)
        assert [a["id"] for a in everything["alerts"]] == [lag, cert, disk, db_down]
        assert everything["next_cursor"] is None
        assert "attempts" not in everything["alerts"][0]
        assert everything["counts"] == {"triggered": 2, "acknowledged": 1, "resolved": 1,
                                        "exhausted": 0}  # fmt: skip
        oldest_first = await listed(api, sort="asc")
        assert [a["id"] for a in oldest_first["alerts"]] == ids

        triggered = await listed(api, state="triggered")
        assert {a["id"] for a in triggered["alerts"]} == {db_down, lag}
        assert triggered["counts"] == everything["counts"]  # counts ignore the state filter
        two = await listed(api, state=["acknowledged", "resolved"])
        assert {a["id"] for a in two["alerts"]} == {disk, cert}

        high = await listed(api, severity="high")
        assert [a["id"] for a in high["alerts"]] == [lag, disk]
        assert high["counts"] == {"triggered": 1, "acknowledged": 1, "resolved": 0,
                                  "exhausted": 0}  # fmt: skip
        ring = await listed(api, policy="ring", state="triggered")
        assert [a["id"] for a in ring["alerts"]] == [lag]
        # case-insensitive, in title or summary; LIKE wildcards are taken literally
        assert [a["id"] for a in (await listed(api, q="database"))["alerts"]] == [lag]
        assert [a["id"] for a in (await listed(api, q="db DOWN"))["alerts"]] == [db_down]
        assert [a["id"] for a in (await listed(api, q="99%"))["alerts"]] == [disk]
        assert (await listed(api, q="9_%"))["alerts"] == []
        by_carol = await listed(api, acked_by="carol")
        assert [a["id"] for a in by_carol["alerts"]] == [disk]
        assert by_carol["alerts"][0]["acked_by"] == "carol"

        created = {a["id"]: a["created_at"] for a in everything["alerts"]}
        window = await listed(api, since=created[disk], until=created[cert])
        assert [a["id"] for a in window["alerts"]] == [cert, disk]
        assert window["counts"]["triggered"] == 0
        after = await listed(api, since=created[cert])
        assert [a["id"] for a in after["alerts"]] == [lag, cert]


async def test_pages_are_stable_while_alerts_keep_arriving(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        first = [(await api.post_alert(title=f"a{i}")).json()["id"] for i in range(23)]
        seen: list[str] = []
        cursor = None
        added: list[str] = []
        for page_no in range(10):
            params: dict[str, Any] = {"limit": 5}
            if cursor:
                params["cursor"] = cursor
            page = await listed(api, **params)
            assert len(page["alerts"]) <= 5
            seen += [a["id"] for a in page["alerts"]]
            # new alerts land while the list is paged through, some at the same moment
            # as the next page is read
            more = [api.post_alert(title=f"new{page_no}-{i}") for i in range(3)]
            nxt = listed(api, **{**params, "cursor": page["next_cursor"]}) if page[
                "next_cursor"] else None  # fmt: skip
            # the posts' responses, then the next page
            results: list[Any] = await asyncio.gather(*more, *([nxt] if nxt else []))
            added += [r.json()["id"] for r in results[:3]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        # newest first: every alert that existed when paging began, once, in order
        assert seen == first[::-1]
        assert page_no == 4
        assert len(added) == 15
        # oldest first: the alerts created meanwhile come after them, none twice
        asc = await page_all(api, {"sort": "asc", "limit": 7})
        assert asc[:23] == first
        assert sorted(asc[23:]) == sorted(added)
        assert len(asc) == 38
        # a page of exactly `limit` at the end says there is no next page
        assert len(await page_all(api, {"limit": 19})) == 38


async def test_another_companys_alerts_never_appear(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        c = api.client
        carol = {"id": "carol", "name": "Carol", "phone": "+14155550103"}
        assert (await c.post("/v1/recipients", json=carol, headers=GLOBEX)).status_code == 201
        policy = {"name": "page", "steps": [{"recipients": ["carol"], "channels": ["sms"]}]}
        assert (await c.post("/v1/policies", json=policy, headers=GLOBEX)).status_code == 201
        theirs = []
        for i in range(3):
            r = await c.post("/v1/alerts", headers=GLOBEX,
                             json={"title": f"db down {i}", "policy": "page"})  # fmt: skip
            assert r.status_code == 202, r.text
            theirs.append(r.json()["id"])
        ours = (await api.post_alert(title="db down here")).json()["id"]
        await c.post(f"/v1/alerts/{theirs[0]}/ack", headers={**GLOBEX, "X-Actor": "carol"})

        mine = await listed(api, q="db down")
        assert [a["id"] for a in mine["alerts"]] == [ours]
        assert mine["counts"] == {"triggered": 1, "acknowledged": 0, "resolved": 0,
                                  "exhausted": 0}  # fmt: skip
        assert (await listed(api, acked_by="carol"))["alerts"] == []
        assert await page_all(api, {"limit": 1}) == [ours]
        other = await listed(api, GLOBEX)
        assert [a["id"] for a in other["alerts"]] == theirs[::-1]
        assert other["counts"]["acknowledged"] == 1
        # a cursor from another company's list only pages through one's own alerts (none
        # of ours is older than the point it marks; asc, ours is the only one after it)
        their_cursor = (await listed(api, GLOBEX, limit=1))["next_cursor"]
        assert their_cursor is not None
        assert (await listed(api, cursor=their_cursor))["alerts"] == []
        their_asc = (await listed(api, GLOBEX, limit=1, sort="asc"))["next_cursor"]
        after = await listed(api, cursor=their_asc, sort="asc")
        assert [a["id"] for a in after["alerts"]] == [ours]
        # nor can they act on ours
        for action in ("escalate", "ack"):
            r = await c.post(f"/v1/alerts/{ours}/{action}", headers=GLOBEX)
            assert r.status_code == 404
        r = await c.post(f"/v1/alerts/{ours}/reassign", json={"recipients": ["carol"]},
                         headers=GLOBEX)  # fmt: skip
        assert r.status_code == 404
        assert (await c.get(f"/v1/alerts/{ours}/timeline", headers=GLOBEX)).status_code == 404


async def test_bad_list_input_is_a_422_naming_the_field(sqlite_url: str, tmp_path: Path) -> None:
    async with running(sqlite_url, tmp_path) as api:
        for _ in range(3):
            await api.post_alert()
        desc_cursor = (await listed(api, limit=1))["next_cursor"]
        cases: list[tuple[dict[str, Any], str]] = [
            ({"state": "open"}, "query.state.0"),
            ({"state": ["triggered", "nope"]}, "query.state.1"),
            ({"severity": "meh"}, "query.severity"),
            ({"limit": 0}, "query.limit"),
            ({"limit": 201}, "query.limit"),
            ({"limit": "ten"}, "query.limit"),
            ({"sort": "sideways"}, "query.sort"),
            ({"since": "yesterday"}, "query.since"),
            ({"since": "2030-01-01T00:00:00"}, "query.since"),  # no timezone
            ({"since": "2030-01-02T00:00:00Z", "until": "2030-01-01T00:00:00Z"}, "query.until"),
            ({"q": ""}, "query.q"),
            ({"cursor": "not-a-cursor"}, "query.cursor"),
            ({"cursor": desc_cursor, "sort": "asc"}, "query.cursor"),
        ]
        for params, field in cases:
            r = await api.client.get("/v1/alerts", params=params, headers=KEY)
            assert r.status_code == 422, (params, r.text)
            assert any(d.startswith(f"{field}:") for d in r.json()["detail"]), (params, r.json())
        assert (await api.client.get("/v1/alerts")).status_code == 401


# ------------------------------------------------------------------ escalate


async def test_escalate_fires_the_next_step_now(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path) as api:
        c = api.client
        assert (await c.post("/v1/policies", json=TWO_STEPS, headers=KEY)).status_code == 201
        alert_id = (await api.post_alert(policy="two")).json()["id"]
        await api.until(alert_id, lambda d: [a["status"] for a in d["attempts"]] == ["delivered"])
        assert api.channels["voice"].sent == []
        r = await c.post(f"/v1/alerts/{alert_id}/escalate", headers={**KEY, "X-Actor": "carol"})
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "triggered"
        data = await api.until(alert_id, lambda d: len(d["attempts"]) == 2 and d["attempts"][1][
            "status"] == "delivered")  # fmt: skip
        step1 = data["attempts"][1]
        assert (step1["step"], step1["recipient_id"], step1["channel"]) == (1, "bob", "voice")
        assert api.channels["voice"].sent[0].notification.contact.recipient_id == "bob"
        records = await audit_of(api, alert_id)
        [esc] = [rec for rec in records if rec["event"] == "escalate"]
        assert (esc["actor"], esc["ip"], esc["reason"]) == ("carol", "203.0.113.7", "api")
        assert esc["request_id"] == r.headers["x-request-id"]
        steps = [(rec["step"], rec["reason"]) for rec in records if rec["event"] == "step"]
        assert steps == [(0, "start"), (1, "escalate")]

        # past the last step nobody is left to page: with nothing pending, it is exhausted
        last = await c.post(f"/v1/alerts/{alert_id}/escalate", headers=KEY)
        assert last.status_code == 200
        assert last.json()["state"] == "exhausted"
        again = await c.post(f"/v1/alerts/{alert_id}/escalate", headers=KEY)
        assert again.status_code == 409
        assert again.json()["detail"] == "alert is exhausted"
        assert (await c.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)).status_code == 200
        late = await c.post(f"/v1/alerts/{alert_id}/escalate", headers=KEY)
        assert late.status_code == 409
        assert late.json()["detail"] == "alert is acknowledged"
        assert (await c.post("/v1/alerts/nope/escalate", headers=KEY)).status_code == 404
        assert len(api.channels["voice"].sent) == 1


# ------------------------------------------------------------------ reassign


def ring_alice(n: Notification) -> DeliveryResult | None:
    """Alice's call rings until it is hung up; anyone else's is answered and acked later."""
    if n.contact.recipient_id == "alice":
        return None
    return DeliveryResult(S.DELIVERED, "answered", provider_id="call-" + n.notification_id[:8])


async def test_reassign_cancels_the_old_chain_and_pages_the_new_target(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path, voice=ring_alice) as api:
        c = api.client
        voice = api.channels["voice"]
        voice.ring_for = 3600.0
        alert_id = (await api.post_alert(policy="ring")).json()["id"]
        await api.until(alert_id, lambda d: d["attempts"] and d["attempts"][0]["status"] == (
            "sending"))  # fmt: skip
        alice_call = voice.sent[0].notification.notification_id
        sql = "SELECT id FROM jobs WHERE alert_id = :a"
        old_jobs = {r[0] for r in await rows(api, sql, a=alert_id)}
        assert len(old_jobs) == 3  # the call, the next step's timer, the cap

        t0 = time.time()
        r = await c.post(f"/v1/alerts/{alert_id}/reassign", json={"recipients": ["bob"]},
                         headers={**KEY, "X-Actor": "carol"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "triggered"
        await until_true(lambda: alice_call in voice.cancelled)
        assert voice.cancelled[alice_call] - t0 < 1.0  # hung up at once, not at its deadline
        await until_true(lambda: len(voice.sent) == 2)
        bob_call = voice.sent[1].notification
        assert bob_call.contact.recipient_id == "bob"
        assert bob_call.contact.phone == "+14155550102"
        data = await api.until(alert_id, lambda d: [a["status"] for a in d["attempts"]] == [
            "cancelled", "delivered"])  # fmt: skip
        assert [(a["recipient_id"], a["step"], a["status"]) for a in data["attempts"]] == [
            ("alice", 0, "cancelled"), ("bob", 0, "delivered")
        ]  # fmt: skip
        assert bob_call.notification_id not in voice.cancelled  # the new chain goes on

        jobs = await rows(api, "SELECT id, kind, done, outcome, due_at FROM jobs ORDER BY id")
        old = {j[1]: (bool(j[2]), j[3]) for j in jobs if j[0] in old_jobs}
        # the timers of the old chain are cancelled; its call ended with its hang-up
        assert old == {"step": (True, "cancelled"), "cap": (True, "cancelled"),
                       "send": (True, "done")}  # fmt: skip
        new = [(j[1], bool(j[2]), j[3]) for j in jobs if j[0] not in old_jobs]
        assert sorted(new) == [("cap", False, None), ("send", True, "done"),
                               ("step", False, None)]  # fmt: skip

        records = await audit_of(api, alert_id)
        [moved] = [rec for rec in records if rec["event"] == "reassigned"]
        assert (moved["from"], moved["to"], moved["groups"]) == (["alice"], ["bob"], [])
        assert (moved["actor"], moved["ip"]) == ("carol", "203.0.113.7")
        events = [rec["event"] for rec in records]
        assert events.index("reassigned") < events.index("step", events.index("reassigned"))
        hung_up = [
            rec
            for rec in records
            if rec["event"] == "result" and rec["notification_uuid"] == alice_call
        ]
        assert [rec["status"] for rec in hung_up] == ["cancelled"]

        # the group form, and the same alert handed on again
        r = await c.post(f"/v1/alerts/{alert_id}/reassign", json={"groups": ["primary"]},
                         headers=KEY)  # fmt: skip
        assert r.status_code == 200
        await until_true(lambda: len(voice.sent) == 3)
        assert voice.sent[2].notification.contact.recipient_id == "alice"
        moved = [rec for rec in await audit_of(api, alert_id) if rec["event"] == "reassigned"][1]
        assert (moved["from"], moved["to"], moved["groups"]) == (["bob"], ["alice"], ["primary"])
        await c.post(f"/v1/alerts/{alert_id}/ack", headers=KEY)
        await until_true(lambda: voice.sent[2].notification.notification_id in voice.cancelled)


async def test_reassign_refuses_unknown_targets_and_closed_alerts(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as api:
        c = api.client
        alert_id = (await api.post_alert()).json()["id"]
        await api.until(alert_id, lambda d: len(d["attempts"]) == 2)
        path = f"/v1/alerts/{alert_id}/reassign"
        for body, status, needle in [
            ({"recipients": ["ghost"]}, 422, "unknown recipients: ghost"),
            ({"recipients": ["bob"], "groups": ["nope"]}, 422, "unknown groups: nope"),
            ({}, 422, "body: give at least one recipient or group"),
            ({"recipients": []}, 422, "body: give at least one recipient or group"),
            ({"recipients": [""]}, 422, "body.recipients.0"),
            ({"people": ["bob"]}, 422, "body.people"),
        ]:
            r = await c.post(path, json=body, headers=KEY)
            assert r.status_code == status, (body, r.text)
            assert needle in str(r.json()["detail"]), (body, r.json())
        assert not [rec for rec in await audit_of(api, alert_id) if rec["event"] == "reassigned"]
        assert (await api.alert(alert_id))["attempts"][0]["recipient_id"] == "alice"
        await c.post(f"/v1/alerts/{alert_id}/resolve", headers=KEY)
        closed = await c.post(path, json={"recipients": ["bob"]}, headers=KEY)
        assert closed.status_code == 409
        assert closed.json()["detail"] == "alert is resolved"
        missing = await c.post("/v1/alerts/nope/reassign", json={"recipients": ["bob"]},
                               headers=KEY)  # fmt: skip
        assert missing.status_code == 404


# ------------------------------------------------------------------ timeline

RETRYING = {
    "name": "retrying",
    "steps": [{"recipients": ["alice"], "channels": ["voice"], "delay": "10m"}],
    "retry": {"voice": {"attempts": 2, "backoff": "linear", "base": 0, "factor": 1}},
}


def busy_then_pressed_1(n: Notification) -> DeliveryResult:
    if n.attempt == 1:
        return DeliveryResult(S.FAILED_RETRYABLE, "sip_486", provider_id="call-1",
                              details={"trunk": "t1", "trunks_tried": "t1:486",
                                       "sip_code": "486"})  # fmt: skip
    return DeliveryResult(
        S.ACKNOWLEDGED,
        "pressed_1",
        provider_id="call-2",
        details={"trunk": "t2", "trunks_tried": "t2:200", "sip_code": "200"},
    )


async def test_timeline_of_an_alert_sent_retried_and_acked(db_url: str, tmp_path: Path) -> None:
    async with running(db_url, tmp_path, voice=busy_then_pressed_1) as api:
        c = api.client
        assert (await c.post("/v1/policies", json=RETRYING, headers=KEY)).status_code == 201
        alert_id = (await api.post_alert(policy="retrying")).json()["id"]
        await api.until(alert_id, lambda d: d["state"] == "acknowledged")
        r = await c.post(f"/v1/alerts/{alert_id}/resolve", headers={**KEY, "X-Actor": "carol"})
        assert r.status_code == 200
        got = await c.get(f"/v1/alerts/{alert_id}/timeline", headers=KEY)
        assert got.status_code == 200, got.text
        timeline = got.json()
        assert timeline["alert_id"] == alert_id
        entries = timeline["entries"]
        assert [e["ts"] for e in entries] == sorted(e["ts"] for e in entries)
        path = [(e["event"], e["attempt"], e["status"]) for e in entries]
        assert path == [
            ("created", None, "triggered"),
            ("step", None, "fired"),
            ("scheduled", 1, "scheduled"),
            ("send", 1, "sending"),
            ("result", 1, "failed_retryable"),
            ("retry", 1, "retry"),
            ("scheduled", 2, "scheduled"),
            ("send", 2, "sending"),
            ("result", 2, "acknowledged"),
            ("ack", None, "acknowledged"),
            ("resolve", None, "resolved"),
        ]
        created, *_, busy, retry, _, _, answered, ack, resolve = entries
        assert (created["kind"], created["ip"], created["reason"]) == (
            "lifecycle", "203.0.113.7", "retrying"
        )  # fmt: skip
        assert (busy["channel"], busy["trunk"], busy["sip_code"], busy["reason"]) == (
            "voice", "t1", 486, "sip_486"
        )  # fmt: skip
        assert (busy["recipient_id"], busy["provider_id"]) == ("alice", "call-1")
        assert (retry["kind"], retry["reason"]) == ("decision", "sip_486:in_0s")
        assert (answered["trunk"], answered["sip_code"]) == ("t2", 200)
        assert (ack["actor"], ack["channel"], ack["recipient_id"]) == (
            "voice:alice", "voice", "alice"
        )  # fmt: skip
        assert (resolve["actor"], resolve["ip"]) == ("carol", "203.0.113.7")
        assert all(e["raw"] is None for e in entries)
        missing = await c.get("/v1/alerts/nope/timeline", headers=KEY)
        assert missing.status_code == 404
