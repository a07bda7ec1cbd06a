"""The console's pages and actions in-process (no browser): who may do what, and that
every action is the engine's own, audited with the person and their IP."""

from __future__ import annotations

import re
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from escalation import crud
from escalation.config import HotlineConfig
from escalation.schedules import Schedule
from tests.integration.test_api_alerts import Api, running
from tests.integration.test_api_alerts_console import audit_of
from tests.integration.test_console_auth import csrf_of, sign_in, signed_in, users

pytest_plugins = ["tests.conftest_escalation"]


@pytest.fixture
async def console(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    async with running(sqlite_url, tmp_path) as api:
        await users(api)
        yield api


async def new_alert(api: Api, **body: Any) -> str:
    r = await api.post_alert(**body)
    assert r.status_code == 202, r.text
    alert_id: str = r.json()["id"]
    return alert_id


async def page_token(api: Api, path: str) -> str:
    r = await api.client.get(path)
    assert r.status_code == 200, r.text
    return csrf_of(r.text)


async def test_anonymous_is_sent_to_sign_in(console: Api) -> None:
    client = console.client
    for path in ["/console", "/console/users", "/console/alerts/x"]:
        r = await client.get(path)
        assert r.status_code == 303, path
        assert r.headers["location"].startswith("/console/login?next="), path
    assert (
        await client.get("/console/alerts/rows", headers={"HX-Request": "true"})
    ).status_code == 401
    assert (await client.post("/console/alerts/x/ack")).status_code == 401
    assert (await client.get("/console/alerts/x/recording")).status_code == 303


async def test_the_list_filters_and_the_responder_acks_through_the_engine(console: Api) -> None:
    client = console.client
    db_down = await new_alert(console, title="DB down", severity="critical")
    disk = await new_alert(console, title="Disk full", severity="high", policy="ring")
    await signed_in(client, "rex")
    page = await client.get("/console")
    assert page.status_code == 200
    assert "DB down" in page.text
    assert "Disk full" in page.text
    assert re.search(r'id="tab-triggered">Firing <span class="count">2</span>', page.text)
    filtered = await client.get("/console/alerts/rows", params={"q": "disk"})
    assert "Disk full" in filtered.text
    assert "DB down" not in filtered.text
    by_policy = await client.get("/console/alerts/rows", params={"policy": "page"})
    assert "DB down" in by_policy.text
    assert "Disk full" not in by_policy.text
    assert 'hx-trigger="every 4s"' in filtered.text

    token = await page_token(console, f"/console/alerts/{db_down}")
    r = await client.post(f"/console/alerts/{db_down}/ack", data={"csrf_token": token})
    assert r.status_code == 303
    assert r.headers["location"].endswith("?done=acknowledged")
    alert = await console.alert(db_down)
    assert alert["state"] == "acknowledged"
    assert alert["acked_by"] == "console:alice"
    ack = [a for a in await audit_of(console, db_down) if a["event"] == "ack"]
    assert [(a["actor"], a["ip"]) for a in ack] == [("console:alice", "203.0.113.7")]
    detail = await client.get(f"/console/alerts/{db_down}")
    assert "stopped: acknowledged" in detail.text
    assert 'id="ack"' not in detail.text
    # bulk resolve; an id that is not the company's is skipped
    r = await client.post("/console/alerts/bulk", data={
        "csrf_token": token, "action": "resolve", "ids": [disk, db_down, "not-ours"],
        "back": "tab=triggered"})  # fmt: skip
    assert r.status_code == 303
    assert r.headers["location"] == "/console?tab=triggered&done=resolve:2"
    assert (await console.alert(disk))["state"] == "resolved"
    late = await client.post(f"/console/alerts/{db_down}/ack", data={"csrf_token": token})
    assert late.status_code == 409
    assert "the alert is resolved" in late.text
    assert (await client.get("/console/alerts/not-ours")).status_code == 404


async def test_escalate_and_reassign_to_a_schedule(console: Api) -> None:
    client = console.client
    db = console.app.state.runtime.db
    schedule = Schedule.model_validate({"name": "payments", "time_zone": "UTC", "layers": [
        {"name": "primary", "rotation": "daily", "start": "2026-01-01", "participants": ["bob"]},
    ]})  # fmt: skip
    await crud.put_schedule(db, "acme", schedule)
    alert_id = await new_alert(console)
    await signed_in(client, "rex")
    token = await page_token(console, f"/console/alerts/{alert_id}")
    page = (await client.get(f"/console/alerts/{alert_id}")).text
    assert 'value="schedule:payments"' in page
    assert 'value="group:primary"' in page
    r = await client.post(f"/console/alerts/{alert_id}/reassign",
                          data={"csrf_token": token, "target": "schedule:payments"})  # fmt: skip
    assert r.status_code == 303, r.text
    bad = await client.post(f"/console/alerts/{alert_id}/reassign",
                            data={"csrf_token": token, "target": "recipient:nobody"})  # fmt: skip
    assert bad.status_code == 422
    assert "Not reassigned" in bad.text
    # one step only: escalating pages nobody new and the alert ends exhausted
    r = await client.post(f"/console/alerts/{alert_id}/escalate", data={"csrf_token": token})
    assert r.status_code == 303
    lines = await audit_of(console, alert_id)
    escalated = [ln for ln in lines if ln["event"] == "escalate"]
    assert [ln["actor"] for ln in escalated] == ["console:rex"]
    [moved] = [ln for ln in lines if ln["event"] == "reassigned"]
    assert moved["actor"] == "console:rex"
    assert moved["to"] == ["bob"]
    assert (await console.until(alert_id, lambda a: a["state"] == "exhausted"))["state"] == (
        "exhausted"
    )
    closed = await client.post(f"/console/alerts/{alert_id}/escalate", data={"csrf_token": token})
    assert closed.status_code == 409
    assert "the alert is exhausted" in closed.text


async def test_a_viewer_sees_no_buttons_and_a_forged_post_changes_nothing(console: Api) -> None:
    client = console.client
    alert_id = await new_alert(console)
    await signed_in(client, "vic")
    page = await client.get(f"/console/alerts/{alert_id}")
    assert page.status_code == 200
    assert 'id="ack"' not in page.text
    assert 'id="reassign"' not in page.text
    assert 'name="ids"' not in (await client.get("/console")).text
    token = csrf_of(page.text)
    for action in ["ack", "resolve", "escalate", "reassign"]:
        r = await client.post(f"/console/alerts/{alert_id}/{action}",
                              data={"csrf_token": token, "target": "recipient:bob"})  # fmt: skip
        assert r.status_code == 403, action
    r = await client.post("/console/alerts/bulk", data={"csrf_token": token, "action": "ack",
                                                        "ids": [alert_id]})  # fmt: skip
    assert r.status_code == 403
    assert (await console.alert(alert_id))["state"] == "triggered"
    assert "Webphone" not in page.text
    assert "/console/users" not in page.text


async def test_only_admins_manage_users(console: Api) -> None:
    client = console.client
    await signed_in(client, "rex")
    r = await client.get("/console/users", headers={"Accept": "text/html"})
    assert r.status_code == 403
    token = await page_token(console, "/console")
    eve = {"csrf_token": token, "username": "eve", "password": "x" * 12, "role": "admin"}
    r = await client.post("/console/users", data=eve)
    assert r.status_code == 403
    assert all(u.username != "eve" for u in await _users(console))


async def _users(api: Api) -> list:  # type: ignore[type-arg]
    from escalation.users import list_users

    return await list_users(api.app.state.runtime.db)


async def test_admin_adds_changes_and_disables_users(console: Api) -> None:
    client = console.client
    await signed_in(client, "ada")
    token = await page_token(console, "/console/users")
    short = {"csrf_token": token, "username": "new", "password": "short", "role": "viewer"}
    bad = await client.post("/console/users", data=short)
    assert bad.status_code == 422
    assert re.search(r'id="new-password"[^>]*aria-invalid="true"', bad.text)
    assert '<span class="error field-error" id="err-new-password">at least 8 characters' in bad.text
    nia = {"username": "Nia", "password": "a long password", "role": "responder",
           "recipient": "bob"}  # fmt: skip
    r = await client.post("/console/users", data={"csrf_token": token, **nia})
    assert r.status_code == 303
    assert (await client.get("/console/users")).text.count('id="user-nia"') == 1

    # nia signs in elsewhere; a role change signs her out
    other = await _client_like(console)
    async with other:
        assert (await sign_in(other, "nia", "a long password")).status_code == 303
        assert (await other.get("/console")).status_code == 200
        r = await client.post("/console/users/nia", data={"csrf_token": token, "action": "role",
                                                         "role": "viewer"})  # fmt: skip
        assert r.status_code == 303
        assert (await other.get("/console")).status_code == 303
        reset = {"csrf_token": token, "action": "password", "password": "x"}
        r = await client.post("/console/users/nia", data=reset)
        assert r.status_code == 422
        assert 'id="err-nia-password"' in r.text
        r = await client.post("/console/users/nia", data={"csrf_token": token,
                                                         "action": "disable"})  # fmt: skip
        assert r.status_code == 303
        assert (await sign_in(other, "nia", "a long password")).status_code == 401
    me = await client.post("/console/users/ada", data={"csrf_token": token, "action": "disable"})
    assert me.status_code == 422
    assert "cannot disable yourself" in me.text
    events = [ln["event"] for ln in console.app.state.runtime.audit.read("acme")
              if str(ln.get("event", "")).startswith("user_")]  # fmt: skip
    assert events == ["user_added", "user_role", "user_disable"]


async def _client_like(api: Api):  # type: ignore[no-untyped-def]
    import httpx

    return httpx.AsyncClient(transport=api.client._transport, base_url=str(api.client.base_url))


async def test_the_hotline_recording_plays_for_signed_in_users(
    console: Api, tmp_path: Path
) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    wav = recordings / "call-1.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\0\0" * 800)
    runtime = console.app.state.runtime
    hotline = HotlineConfig.model_validate({"numbers": {"default": {"policy": "page"}},
                                            "recordings_dir": str(recordings)})  # fmt: skip
    runtime.config = runtime.config.model_copy(update={"hotline": hotline})
    alert_id = await new_alert(console, details={"recording": str(wav), "caller": "+15550100"})
    outside = await new_alert(console, details={"recording": "/etc/passwd"})
    await signed_in(console.client, "vic")
    page = await console.client.get(f"/console/alerts/{alert_id}")
    assert f'<audio controls preload="none" src="/console/alerts/{alert_id}/recording"' in page.text
    audio = await console.client.get(f"/console/alerts/{alert_id}/recording")
    assert audio.status_code == 200
    assert audio.headers["content-type"] == "audio/wav"
    assert audio.content == wav.read_bytes()
    assert "<audio" not in (await console.client.get(f"/console/alerts/{outside}")).text
    assert (await console.client.get(f"/console/alerts/{outside}/recording")).status_code == 404
