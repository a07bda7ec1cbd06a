"""The console's status page desk in Chromium against a real server: an admin publishes an
incident and an update; a confirmed webhook subscriber (a local HTTP server checking the
signature) and a confirmed email subscriber (a local SMTP server) get both; the public
page shows them; a maintenance window is entered in the browser's local time; a viewer
reads only. axe-core and a 375 px screen."""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiosmtpd.controller import Controller
from playwright.sync_api import Browser, Page, expect

from api.app import create_app
from api.settings import Settings
from escalation.channels.email import EmailChannel
from escalation.channels.signing import SIGNATURE_HEADER, verify_webhook
from escalation.channels.webhook import WebhookChannel
from escalation.users import Role, add_user
from storage.db import Database
from tests.browser.conftest import LiveServer, axe_violations, free_port, shot
from tests.browser.test_console import PASSWORD, run, sign_in
from tests.integration.test_channel_email import Mailbox
from tests.integration.test_status_page import CONFIG

pytestmark = pytest.mark.timeout(180)

KEY = {"X-API-Key": "k-acme"}
SECRET = "whsec-console-incidents"


class WebhookReceiver:
    """A subscriber's endpoint on 127.0.0.1 that checks each POST's signature as a
    subscriber would (401 when it does not verify) and keeps the verified bodies."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.rejected = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                signature = self.headers.get(SIGNATURE_HEADER)
                if verify_webhook(signature, body, SECRET, time.time()):
                    receiver.received.append({"path": self.path, **json.loads(body)})
                    self.send_response(204)
                else:
                    receiver.rejected += 1
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@contextlib.contextmanager
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    """A local SMTP server in a thread of its own (aiosmtpd): what it accepted, its port."""
    mailbox = Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield mailbox, controller.port
    finally:
        controller.stop()


@contextlib.contextmanager
def incident_server(tmp_path: Path, smtp_port: int) -> Iterator[LiveServer]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    url = f"sqlite:///{tmp_path}/ackline.db"
    settings = Settings(database_url=url, config_path=config, api_keys={"k-acme": "acme"},
                        audit_dir=tmp_path / "audit", embedded_worker=False,
                        ack_secret="ack-secret", smtp_host="127.0.0.1", smtp_port=smtp_port,
                        smtp_from="status@ops.example", webhook_secret=SECRET)  # fmt: skip
    email = EmailChannel("127.0.0.1", smtp_port, sender="status@ops.example", timeout_s=5)
    app = create_app(settings, {"email": email, "webhook": WebhookChannel(SECRET, timeout_s=5)})
    live = LiveServer(app)
    settings.public_url = live.url  # the links in messages lead back to this server
    with live:

        async def people() -> None:
            db = Database(url)
            try:
                for name, role in [("ada", Role.ADMIN), ("vic", Role.VIEWER)]:
                    await add_user(db, "acme", name, PASSWORD, role, "test")
            finally:
                await db.dispose()

        run(people)
        yield live


def wait_until(check: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def fits_375(page: Page, name: str) -> None:
    page.set_viewport_size({"width": 1280, "height": 900})
    shot(page, f"{name}-desktop")
    page.set_viewport_size({"width": 375, "height": 800})
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 375, name
    assert axe_violations(page) == [], name
    shot(page, f"{name}-375")
    page.set_viewport_size({"width": 1280, "height": 900})


def audit(tmp_path: Path, event: str) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit" / "acme.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == event]


def test_an_incident_from_the_console_reaches_subscribers_and_the_status_page(
    browser: Browser, page: Page, csp_errors: list[str], tmp_path: Path
) -> None:
    with (
        smtp_server() as (mailbox, smtp_port),
        WebhookReceiver() as hook,
        incident_server(tmp_path, smtp_port) as server,
    ):
        # a webhook the operator adds is active at once; email confirms by its link
        for kind, address in [("webhook", f"{hook.url}/status-hook"),
                              ("email", "ada@ops.example")]:  # fmt: skip
            r = httpx.post(f"{server.url}/v1/status/subscribers", headers=KEY, timeout=10,
                           json={"kind": kind, "address": address})  # fmt: skip
            assert r.status_code == 201, r.text
        wait_until(lambda: len(mailbox.messages) == 1, "the confirmation email")
        found = re.search(rf"{re.escape(server.url)}/status/confirm\?token=\S+",
                          mailbox.messages[0][1].get_content())  # fmt: skip
        assert found
        page.goto(found.group(0))
        page.get_by_role("button", name="Confirm subscription").click()
        expect(page.get_by_role("heading", name="Subscribed")).to_be_visible()

        # the admin works in India: maintenance times are entered in local time (+05:30)
        context = browser.new_context(timezone_id="Asia/Kolkata")
        admin = context.new_page()
        admin_csp: list[str] = []
        admin.on("console", lambda m: admin_csp.append(m.text)
                 if "Content Security Policy" in m.text else None)  # fmt: skip
        sign_in(admin, server, "ada")
        admin.get_by_role("link", name="Status page").click()
        expect(admin.get_by_role("heading", name="Status page", exact=True)).to_be_visible()
        subscribers = admin.locator("#subscribers tbody tr")
        expect(subscribers).to_have_count(2)
        expect(admin.locator('#subscribers tr[data-kind="webhook"]')).to_contain_text("confirmed")
        expect(admin.locator('#subscribers tr[data-kind="email"]')).to_contain_text("confirmed")
        assert "/status-hook" not in admin.locator("#subscribers").inner_text()

        admin.get_by_role("button", name="Publish incident").click()  # empty: errors by fields
        expect(admin.locator("#err-new-title")).to_have_text("required")
        expect(admin.locator("#new-title")).to_have_attribute("aria-invalid", "true")
        admin.locator("#new-title").fill("Delayed notifications")
        admin.locator("#new-impact").select_option("major")
        admin.locator('#new-incident input[name="components"][value="email"]').check()
        admin.locator("#new-body").fill("Emails and webhooks arrive late; we are investigating.")
        admin.get_by_role("button", name="Publish incident").click()
        expect(admin.locator("#done")).to_contain_text("published")
        card = admin.locator("article.incident").first
        incident_id = int((card.get_attribute("id") or "").removeprefix("incident-"))
        wait_until(lambda: len(hook.received) == 1 and len(mailbox.messages) == 2,
                   "the incident by webhook and email")  # fmt: skip

        expect(admin.locator(f"#status-{incident_id}")).to_have_value("identified")
        admin.locator(f"#body-{incident_id}").fill("A relay was rejecting mail; it is fixed.")
        admin.locator(f"#post-update-{incident_id}").click()
        expect(admin.locator("#done")).to_contain_text("identified")
        expect(card.locator("ol.updates li")).to_have_count(2)
        wait_until(lambda: len(hook.received) == 2 and len(mailbox.messages) == 3,
                   "the update by webhook and email")  # fmt: skip

        # maintenance: the end before the start is refused beside the field
        admin.locator("#m-title").fill("Carrier maintenance")
        admin.locator("#m-starts").fill("2030-01-02T10:00")
        admin.locator("#m-ends").fill("2030-01-02T09:00")
        admin.get_by_role("button", name="Schedule maintenance").click()
        expect(admin.locator("#err-m-ends_at")).to_have_text("must be after the start")
        expect(admin.locator("#m-starts")).to_have_value("2030-01-02T10:00")
        admin.locator("#m-ends").fill("2030-01-02T12:00")
        admin.get_by_role("button", name="Schedule maintenance").click()
        expect(admin.locator("#done")).to_contain_text("scheduled")
        [window] = httpx.get(f"{server.url}/v1/status/maintenances", headers=KEY).json()
        starts = datetime.fromisoformat(window["starts_at"])
        assert starts.replace(tzinfo=starts.tzinfo or UTC) == datetime(2030, 1, 2, 4, 30,
                                                                       tzinfo=UTC)  # fmt: skip
        expect(admin.locator(f"#maintenance-{window['id']}")).to_contain_text(
            "2030-01-02 04:30 UTC"
        )
        fits_375(admin, "console-incidents")
        assert admin_csp == []
        context.close()

        # both subscribers got the incident and its update
        assert hook.rejected == 0
        assert [(h["path"], h["update"]["status"], h["incident"]["id"]) for h in hook.received] == [
            ("/status-hook", "investigating", incident_id),
            ("/status-hook", "identified", incident_id),
        ]  # fmt: skip
        assert hook.received[1]["update"]["body"] == "A relay was rejecting mail; it is fixed."
        mails = [m for _, m in mailbox.messages[1:]]
        assert [m["Subject"] for m in mails] == [
            "[acme status] Delayed notifications: investigating",
            "[acme status] Delayed notifications: identified",
        ]
        assert "A relay was rejecting mail; it is fixed." in mails[1].get_content()

        # the public page shows the incident with its update, and the window
        page.goto(f"{server.url}/status")
        public = page.locator(f"#incident-{incident_id}")
        expect(public).to_contain_text("Delayed notifications")
        expect(public).to_contain_text("A relay was rejecting mail; it is fixed.")
        expect(public.locator(".state")).to_have_text("identified")
        expect(page.locator(f"#maintenance-{window['id']}")).to_contain_text("Carrier maintenance")
        page.set_viewport_size({"width": 375, "height": 800})
        shot(page, "status-page-incident-375")
        page.set_viewport_size({"width": 1280, "height": 900})

        # a viewer reads, has no forms, and a forged POST is refused
        page.context.clear_cookies()
        sign_in(page, server, "vic")
        page.goto(f"{server.url}/console/incidents")
        expect(page.locator(f"#incident-{incident_id}")).to_contain_text("Delayed notifications")
        expect(page.locator("#new-incident")).to_have_count(0)
        expect(page.locator("#new-maintenance")).to_have_count(0)
        expect(page.get_by_role("button", name="Post update")).to_have_count(0)
        token = page.locator('input[name="csrf_token"]').first.input_value()
        forged = page.request.post(f"{server.url}/console/incidents/{incident_id}/updates",
                                   form={"csrf_token": token, "status": "resolved",
                                         "body": "forged"}, max_redirects=0)  # fmt: skip
        assert forged.status == 403
        [incident] = httpx.get(f"{server.url}/v1/status/incidents", headers=KEY).json()
        assert [u["status"] for u in incident["updates"]] == ["identified", "investigating"]
    assert csp_errors == []
    published = [(a["status"], a["actor"], a["ip"]) for a in audit(tmp_path, "status_incident")]
    assert published == [("created", "console:ada", "127.0.0.1"),
                         ("updated", "console:ada", "127.0.0.1")]  # fmt: skip
