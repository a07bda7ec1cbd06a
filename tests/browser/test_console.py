"""The web console in Chromium against a real server: sign in, an alert posted through
the API shows up without a reload, ack stops its chain, escalate, reassign, bulk resolve;
roles, CSRF and revocation as a browser meets them; axe-core and a 375 px screen."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Browser, Page, expect

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel, DeliveryStatus
from escalation.users import Role, add_user
from storage.db import Database
from tests.browser.conftest import LiveServer, axe_violations, shot
from tests.conftest_escalation import ScriptedChannel, reply
from tests.integration.test_api_alerts import CONFIG

PASSWORD = "correct horse battery"
KEY = {"X-API-Key": "k-acme"}


def run(coro: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run a coroutine on a loop of its own thread (the sync Playwright API owns this one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro()).result(timeout=60)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    url = f"sqlite:///{tmp_path}/ackline.db"
    settings = Settings(database_url=url, config_path=config, api_keys={"k-acme": "acme"},
                        audit_dir=tmp_path / "audit", poll_interval=0.2)  # fmt: skip
    channels: dict[str, Channel] = {
        "sms": ScriptedChannel("sms", reply(DeliveryStatus.DELIVERED)),
        "telegram": ScriptedChannel("telegram", reply(DeliveryStatus.DELIVERED)),
        "voice": ScriptedChannel("voice", lambda n: None, ring_for=60),  # rings until hung up
    }
    with LiveServer(create_app(settings, channels)) as live:

        async def people() -> None:
            db = Database(url)
            try:
                for name, role, recipient in [("ada", Role.ADMIN, None),
                                              ("rex", Role.RESPONDER, "alice"),
                                              ("vic", Role.VIEWER, None)]:  # fmt: skip
                    await add_user(db, "acme", name, PASSWORD, role, "test", recipient)
            finally:
                await db.dispose()

        run(people)
        yield live


def post_alert(server: LiveServer, **body: Any) -> str:
    payload = {"title": "db down", "summary": "primary unreachable", "policy": "page", **body}
    r = httpx.post(f"{server.url}/v1/alerts", json=payload, headers=KEY, timeout=10)
    assert r.status_code == 202, r.text
    alert_id: str = r.json()["id"]
    return alert_id


def alert_state(server: LiveServer, alert_id: str) -> str:
    r = httpx.get(f"{server.url}/v1/alerts/{alert_id}", headers=KEY, timeout=10)
    state: str = r.json()["state"]
    return state


def sign_in(page: Page, server: LiveServer, username: str) -> None:
    page.goto(f"{server.url}/console/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Alerts")).to_be_visible()


def fits_375(page: Page, name: str) -> None:
    """Checked at 375 px wide: no horizontal scroll, no serious axe findings; both sizes shot."""
    page.set_viewport_size({"width": 1280, "height": 900})
    shot(page, f"console-{name}-desktop")
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375, name
    assert axe_violations(page) == [], name
    shot(page, f"console-{name}-375")
    page.set_viewport_size({"width": 1280, "height": 900})


def reload_until(page: Page, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the page never showed it"
        page.wait_for_timeout(200)
        page.reload()


def test_a_responder_works_an_alert(page: Page, server: LiveServer, csp_errors: list[str]) -> None:
    page.goto(f"{server.url}/console")
    assert "/console/login?next=%2Fconsole" in page.url  # anonymous: sent to sign in
    before = {c["name"]: c["value"] for c in page.context.cookies()}["ackline_session"]
    fits_375(page, "login")
    sign_in(page, server, "rex")
    after = {c["name"]: c["value"] for c in page.context.cookies()}["ackline_session"]
    assert after != before  # a fresh session at sign-in

    # a new alert appears without a reload
    page.evaluate("() => { window.sameDocument = true }")
    ringing = post_alert(server, title="Checkout down", policy="ring", severity="critical")
    expect(page.get_by_role("link", name="Checkout down")).to_be_visible(timeout=15_000)
    assert page.evaluate("() => window.sameDocument === true")
    expect(page.locator("#tab-triggered .count")).to_have_text("1")
    fits_375(page, "alerts")

    page.get_by_role("link", name="Checkout down").click()
    expect(page.get_by_role("heading", name="Checkout down")).to_be_visible()
    reload_until(page, lambda: "sending" in page.locator("#attempts").inner_text())
    expect(page.locator("#chain-state")).to_contain_text("step 1 of 1 paged")
    fits_375(page, "alert")

    page.get_by_role("button", name="Acknowledge").click()
    expect(page.locator("#chain-state")).to_contain_text("stopped: acknowledged")
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
    # the call that was ringing is hung up: its attempt and the timeline say so
    reload_until(page, lambda: "cancelled" in page.locator("#attempts").inner_text())
    ack = page.locator('#timeline li[data-event="ack"]')
    expect(ack).to_contain_text("by console:alice")
    assert alert_state(server, ringing) == "acknowledged"

    # reassign, then escalate from the detail page
    other = post_alert(server, title="Queue backlog")
    page.goto(f"{server.url}/console/alerts/{other}")
    page.get_by_label("Reassign to").select_option("recipient:bob")
    page.get_by_role("button", name="Reassign").click()
    expect(page.locator("#done")).to_have_text("Done: reassigned.")
    expect(page.locator('#timeline li[data-event="reassigned"]')).to_contain_text("to bob")
    page.get_by_role("button", name="Escalate now").click()
    expect(page.locator("#done")).to_have_text("Done: escalated.")
    expect(page.locator('#timeline li[data-event="escalate"]')).to_contain_text("by console:rex")

    # bulk resolve two alerts from the list
    first, second = post_alert(server, title="Bulk one"), post_alert(server, title="Bulk two")
    page.goto(f"{server.url}/console")
    page.get_by_label("Select", exact=False).first.wait_for()
    page.locator(f"#sel-{first}").check()
    page.locator(f"#sel-{second}").check()
    page.locator("#bulk-resolve").click()
    expect(page.locator("p.notice[role=status]")).to_contain_text("Resolved: 2 alert(s)")
    assert {alert_state(server, first), alert_state(server, second)} == {"resolved"}
    expect(page.get_by_role("link", name="Bulk one")).to_have_count(0)
    assert csp_errors == []


def test_roles_csrf_and_revocation(browser: Browser, page: Page, server: LiveServer) -> None:
    alert_id = post_alert(server, title="Disk full")
    sign_in(page, server, "vic")
    page.goto(f"{server.url}/console/alerts/{alert_id}")
    expect(page.get_by_role("heading", name="Disk full")).to_be_visible()
    expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)
    token = page.locator('input[name="csrf_token"]').first.input_value()
    forged = page.request.post(f"{server.url}/console/alerts/{alert_id}/ack",
                               form={"csrf_token": token}, max_redirects=0)  # fmt: skip
    assert forged.status == 403
    assert alert_state(server, alert_id) == "triggered"

    admin = browser.new_context().new_page()
    sign_in(admin, server, "ada")
    admin.goto(f"{server.url}/console/users")
    # a wrong CSRF token: 403, nothing changed
    wrong = admin.request.post(f"{server.url}/console/users/vic",
                               form={"csrf_token": "forged", "action": "disable"},
                               max_redirects=0)  # fmt: skip
    assert wrong.status == 403
    missing = admin.request.post(f"{server.url}/console/users/vic", form={"action": "disable"},
                                 max_redirects=0)  # fmt: skip
    assert missing.status == 403
    page.reload()
    expect(page.get_by_role("heading", name="Disk full")).to_be_visible()  # vic still in

    admin.get_by_role("button", name="Add user").click()  # empty form: errors by the fields
    expect(admin.locator("#err-new-username")).to_be_visible()
    fits_375(admin, "users")
    admin.locator("#disable-vic").click()
    expect(admin.locator("#done")).to_have_text("Done: disable:vic.")
    page.reload()  # vic's existing session no longer works
    assert "/console/login" in page.url
    admin.context.close()

    responder = browser.new_context().new_page()
    sign_in(responder, server, "rex")
    forbidden = responder.goto(f"{server.url}/console/users")
    assert forbidden is not None
    assert forbidden.status == 403
    expect(responder.get_by_role("link", name="Webphone")).to_be_visible()
    responder.context.close()

    anonymous = browser.new_context()
    r = anonymous.request.post(f"{server.url}/console/alerts/{alert_id}/ack", max_redirects=0)
    assert r.status == 401
    anonymous.close()
