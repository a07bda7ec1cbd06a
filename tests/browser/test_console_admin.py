"""The console's admin pages in Chromium: an admin takes a trunk out in the console and
the next alert call goes through the other SIPp carrier; a policy edit the validators
refuse shows the error beside the field and changes nothing; a responder sees trunks but
cannot change them. Every page passes axe-core and fits a 375 px screen."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from playwright.sync_api import Page, expect

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel, DeliveryStatus
from escalation.users import Role, add_user
from storage.db import Database
from tests.browser.conftest import LiveServer
from tests.browser.test_console import fits_375, reload_until, run, sign_in
from tests.conftest_escalation import ScriptedChannel, reply
from tests.integration.peers import ackline_cli, cli_env, dtmf_pcap, free_port, sipp
from tests.integration.test_carriers_admin import config as carriers_config
from tests.integration.test_console_admin import admin_config

pytestmark = pytest.mark.timeout(180)

PASSWORD = "correct horse battery"
KEY = {"X-API-Key": "k-acme"}


def add_people(url: str) -> None:
    async def people() -> None:
        db = Database(url)
        try:
            for name, role in [("ada", Role.ADMIN), ("rex", Role.RESPONDER)]:
                await add_user(db, "acme", name, PASSWORD, role, "test")
        finally:
            await db.dispose()

    run(people)


@contextlib.contextmanager
def serving(tmp: Path, config: dict[str, Any]) -> Iterator[str]:
    """`ackline serve` (API, worker and SIP gateway in one process) on loopback."""
    (tmp / "ackline.yaml").write_text(yaml.safe_dump(config))
    http_port = free_port()
    env = {**cli_env(tmp), "ACKLINE_DATABASE_URL": f"sqlite:///{tmp}/ackline.db",
           "ACKLINE_CONFIG": str(tmp / "ackline.yaml"), "ACKLINE_API_KEYS": "k-acme:acme",
           "ACKLINE_AUDIT_DIR": str(tmp / "audit"), "ACKLINE_POLL_INTERVAL": "0.2"}  # fmt: skip
    env.pop("REDIS_URL", None)
    url = f"http://127.0.0.1:{http_port}"
    with open(tmp / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [*ackline_cli(), "serve", "--port", str(free_port()), "--http-port", str(http_port)],
            stdout=log, stderr=log, env=env, cwd=tmp,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while True:
                assert proc.poll() is None, (tmp / "serve.log").read_text()
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                assert time.monotonic() < deadline, "ackline serve did not become ready"
                time.sleep(0.1)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def audit_lines(tmp: Path) -> list[dict[str, Any]]:
    path = tmp / "audit" / "acme.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def call_result(tmp: Path, alert_id: str, timeout: float = 20) -> dict[str, Any]:
    """The voice attempt's audited result: which trunk carried the call, which were tried."""
    deadline = time.monotonic() + timeout
    while True:
        for line in audit_lines(tmp):
            if line.get("alert_id") == alert_id and line.get("event") == "result":
                details: dict[str, Any] = line["details"]
                return details
        assert time.monotonic() < deadline, "the call never finished"
        time.sleep(0.1)


def in_rotation(url: str, trunk: str) -> bool:
    """Whether the serving process's router has `trunk` in rotation now."""
    trunks = {t["name"]: t for t in httpx.get(f"{url}/v1/carriers", headers=KEY).json()}
    return bool(trunks[trunk]["health"]["enabled"])


def test_an_admin_disables_a_trunk_and_the_next_call_avoids_it(
    page: Page, tmp_path: Path, csp_errors: list[str]
) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    scenario = {"RING_MS": "0", "PAUSE_MS": "200", "PCAP": str(dtmf_pcap("1"))}
    with (
        sipp("carrier_answer_dtmf.xml", tmp_path / "p", calls=200, fields=scenario) as primary,
        sipp("carrier_answer_dtmf.xml", tmp_path / "s", calls=200, fields=scenario) as secondary,
        serving(tmp_path, carriers_config(primary.port, secondary.port)) as url,
    ):
        add_people(f"sqlite:///{tmp_path}/ackline.db")
        sign_in_at(page, url, "ada")
        page.get_by_role("link", name="Carriers").click()
        expect(page.get_by_role("heading", name="Carrier trunks")).to_be_visible()
        expect(page.locator("#strategy")).to_have_text("priority")
        # both trunks answer their OPTIONS probes (every 500 ms): health is shown per process
        reload_until(page, lambda: page.locator("#health-secondary .probe.up").count() == 1
                     and page.locator("#health-primary .probe.up").count() == 1)  # fmt: skip
        expect(page.locator("#health-primary")).to_contain_text("this process")

        page.locator("#test-secondary").click()
        expect(page.locator("#test-result-secondary")).to_contain_text("answered (200)")

        first = post_alert(url)
        assert call_result(tmp_path, first)["trunk"] == "primary"

        page.locator("#disable-primary").click()
        expect(page.locator("#done")).to_contain_text("Disabled primary")
        expect(page.locator("#trunk-primary .state")).to_have_text("disabled")
        expect(page.locator("#enable-primary")).to_be_visible()
        expect(page.locator("#overrides-primary")).to_have_text("enabled: no")
        # the serving process applies the stored change within its poll (2 s)
        deadline = time.monotonic() + 10
        while in_rotation(url, "primary"):
            assert time.monotonic() < deadline, "the change never reached the router"
            time.sleep(0.1)
        page.reload()
        expect(page.locator("#health-primary .rotation-state")).to_have_text(["out"])
        fits_375(page, "admin-carriers")

        second = post_alert(url)
        result = call_result(tmp_path, second)
        assert result["trunk"] == "secondary", result
        assert "primary" not in json.dumps(result["trunks_tried"]), result
        assert csp_errors == []
    changes = [x for x in audit_lines(tmp_path) if x.get("event") == "trunk_changed"]
    assert [(c["trunk"], c["changes"], c["actor"], c["ip"]) for c in changes] == [
        ("primary", {"enabled": False}, "console:ada", "127.0.0.1")
    ]


def sign_in_at(page: Page, url: str, username: str) -> None:
    page.goto(f"{url}/console/login")
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("heading", name="Alerts")).to_be_visible()


def post_alert(url: str) -> str:
    r = httpx.post(f"{url}/v1/alerts", json={"title": "db down", "policy": "page"},
                   headers=KEY, timeout=10)  # fmt: skip
    assert r.status_code == 202, r.text
    alert_id: str = r.json()["id"]
    return alert_id


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    """The app in-process with two trunks configured (no gateway: nothing is called)."""
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(admin_config()))
    url = f"sqlite:///{tmp_path}/ackline.db"
    settings = Settings(database_url=url, config_path=config, api_keys={"k-acme": "acme"},
                        audit_dir=tmp_path / "audit", poll_interval=0.2)  # fmt: skip
    channels: dict[str, Channel] = {
        n: ScriptedChannel(n, reply(DeliveryStatus.DELIVERED)) for n in ("sms", "telegram")
    }
    with LiveServer(create_app(settings, channels)) as live:
        add_people(url)
        yield live


def stored_policy(server: LiveServer, name: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/v1/policies/{name}", headers=KEY, timeout=10)
    assert r.status_code == 200, r.text
    policy: dict[str, Any] = r.json()
    return policy


def test_a_refused_policy_edit_shows_the_error_beside_the_field(
    page: Page, server: LiveServer, csp_errors: list[str]
) -> None:
    before = stored_policy(server, "page")
    sign_in(page, server, "ada")
    page.get_by_role("link", name="Policies").click()
    expect(page.get_by_role("heading", name="Escalation policies")).to_be_visible()
    expect(page.locator("#policy-page .source")).to_have_text("from ackline.yaml")
    fits_375(page, "admin-policies")

    page.get_by_role("link", name="Edit page").click()
    expect(page.locator("#yaml-note")).to_contain_text("writes the file's version back")
    delay = page.get_by_label("Then wait").first
    expect(delay).to_have_value("10m")
    delay.fill("soon")
    page.locator("#save").click()
    error = page.locator("#err-steps-0-delay")
    expect(error).to_contain_text("invalid duration 'soon'")
    expect(page.locator("#form-refused")).to_be_visible()
    expect(delay).to_have_attribute("aria-invalid", "true")
    expect(delay).to_have_value("soon")  # what was typed is kept for fixing
    expect(page.locator("fieldset.step")).to_have_count(2)  # the step and one empty row
    # the error sits next to its field: inside the same step, right after the input
    assert (
        page.evaluate("() => document.querySelector('#f-steps-0-delay').nextElementSibling.id")
        == "err-steps-0-delay"
    )
    assert stored_policy(server, "page") == before  # nothing changed
    fits_375(page, "admin-policy-error")

    page.get_by_label("Then wait").first.fill("2m")
    page.locator("#save").click()
    expect(page.locator("#done")).to_have_text("Saved: page.")
    expect(page.locator("#policy-page .source")).to_contain_text("next restart")
    assert stored_policy(server, "page")["steps"][0]["delay"] == 120

    page.get_by_role("link", name="Recipients").click()
    expect(page.locator("#recipient-alice .source")).to_have_text("from ackline.yaml")
    fits_375(page, "admin-recipients")
    page.get_by_role("link", name="Edit alice").click()
    page.get_by_label("Phone").fill("555")
    page.locator("#save").click()
    expect(page.locator("#err-phone")).to_contain_text("E.164")
    fits_375(page, "admin-recipient-error")
    page.get_by_role("link", name="Groups").click()
    expect(page.locator("#group-primary")).to_contain_text("alice")
    fits_375(page, "admin-groups")
    assert csp_errors == []


def test_a_responder_cannot_edit_trunks(page: Page, server: LiveServer) -> None:
    sign_in(page, server, "rex")
    page.goto(f"{server.url}/console/carriers")
    expect(page.get_by_role("heading", name="primary")).to_be_visible()
    expect(page.get_by_text("Only admins change trunks.")).to_be_visible()
    assert page.locator('form[action^="/console/carriers"]').count() == 0
    expect(page.get_by_role("button", name="Disable primary")).to_have_count(0)
    expect(page.get_by_role("button", name="Test primary")).to_have_count(0)
    fits_375(page, "admin-carriers-responder")

    token = page.locator('input[name="csrf_token"]').first.input_value()  # the sign-out form's
    for form in ({"action": "disable"}, {"action": "rotation", "priority": "0", "weight": "9"},
                 {"action": "test"}):  # fmt: skip
        forged = page.request.post(f"{server.url}/console/carriers/primary",
                                   form={**form, "csrf_token": token}, max_redirects=0)  # fmt: skip
        assert forged.status == 403, form
    trunks = httpx.get(f"{server.url}/v1/carriers", headers=KEY, timeout=10).json()
    assert [t["overrides"] for t in trunks] == [{}, {}]
    assert all(t["enabled"] for t in trunks)

    page.goto(f"{server.url}/console/policies")
    expect(page.get_by_role("link", name="Edit page")).to_have_count(0)
    refused = page.goto(f"{server.url}/console/policies/page/edit")
    assert refused is not None
    assert refused.status == 403


def test_an_admin_deletes_a_recipient_after_a_second_step_and_a_file_one_is_refused(
    page: Page, server: LiveServer, csp_errors: list[str]
) -> None:
    sign_in(page, server, "ada")
    page.goto(f"{server.url}/console/recipients/new")
    page.locator("#f-id").fill("zed")
    page.locator("#f-name").fill("Zed")
    page.locator("#f-email").fill("zed@example.org")
    page.locator("#save").click()
    expect(page.locator("#done")).to_have_text("Created: zed.")

    page.get_by_role("link", name="Edit zed").click()
    confirm = page.get_by_role("button", name="Delete zed")
    expect(confirm).to_be_hidden()  # inside the closed disclosure: one click cannot delete
    page.get_by_text("Delete this recipient").click()
    expect(confirm).to_be_visible()
    fits_375(page, "admin-recipient-delete")
    confirm.click()
    expect(page.locator("#done")).to_have_text("Deleted: zed.")
    expect(page.locator("#recipient-zed")).to_have_count(0)

    page.goto(f"{server.url}/console/recipients/alice/edit")
    page.get_by_text("Delete this recipient").click()
    page.get_by_role("button", name="Delete alice").click()
    expect(page.locator("#refused")).to_contain_text("defined in ackline.yaml")
    expect(page.locator("#recipient-alice")).to_have_count(1)
    fits_375(page, "admin-recipients-refused")
    assert csp_errors == []
