"""The console's admin pages in-process (no browser): who may see and change what, and
that a change made in the console is the change the API makes (same store, same
validation messages, same audit line but for the actor)."""

from __future__ import annotations

import contextlib
import copy
import html
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from api.app import create_app
from api.settings import Settings
from escalation.channels.base import Channel, DeliveryStatus
from escalation.users import Role, add_user
from tests.conftest_escalation import ScriptedChannel, reply
from tests.integration.peers import free_port
from tests.integration.test_api_alerts import CONFIG, KEY, PUBLIC
from tests.integration.test_console_auth import PASSWORD, csrf_of

pytest_plugins = ["tests.conftest_escalation"]

CLIENT_IP = "203.0.113.7"


def admin_config() -> dict[str, Any]:
    """The API tests' recipients, groups and policies, and two trunks nobody answers on."""
    cfg = copy.deepcopy(CONFIG)
    cfg["carriers"] = {"allowed_countries": ["US"], "strategy": "weighted", "trunks": [
        {"name": "primary", "host": "127.0.0.1", "port": free_port(), "priority": 1,
         "username": "gw", "password": "s3cret-pw"},
        {"name": "secondary", "host": "127.0.0.1", "port": free_port(),
         "priority": 2}]}  # fmt: skip
    return cfg


@contextlib.asynccontextmanager
async def console_app(db_url: str, tmp_path: Path) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    config = tmp_path / "ackline.yaml"
    config.write_text(yaml.safe_dump(admin_config()))
    settings = Settings(database_url=db_url, config_path=config, api_keys={"k-acme": "acme"},
                        audit_dir=tmp_path / "audit", public_url=PUBLIC,
                        poll_interval=0.2)  # fmt: skip
    channels: dict[str, Channel] = {
        n: ScriptedChannel(n, reply(DeliveryStatus.DELIVERED)) for n in ("sms", "telegram")
    }
    app = create_app(settings, channels)
    async with app.router.lifespan_context(app):
        db = app.state.runtime.db
        for name, role in [("ada", Role.ADMIN), ("rex", Role.RESPONDER), ("vic", Role.VIEWER)]:
            await add_user(db, "acme", name, PASSWORD, role, "test")
        transport = httpx.ASGITransport(app=app, client=(CLIENT_IP, 5555))
        async with httpx.AsyncClient(transport=transport, base_url=PUBLIC) as client:
            yield app, client


async def sign_in(client: httpx.AsyncClient, username: str) -> str:
    """Sign in; the new session's CSRF token is returned."""
    form = await client.get("/console/login")
    r = await client.post("/console/login", data={"username": username, "password": PASSWORD,
                                                  "csrf_token": csrf_of(form.text)})  # fmt: skip
    assert r.status_code == 303, r.text
    page = await client.get("/console/carriers")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


def audit(app: Any, event: str) -> list[dict[str, Any]]:
    return [x for x in app.state.runtime.audit.read("acme") if x.get("event") == event]


def error_beside(html: str, key: str) -> str:
    """The error text shown next to the field `key` (e.g. steps-0-delay)."""
    found = re.search(rf'id="err-{re.escape(key)}">([^<]*)<', html)
    assert found, f"no error beside {key}"
    return found.group(1).replace("&#39;", "'")


PAGES = ["/console/carriers", "/console/policies", "/console/recipients", "/console/groups"]
EDIT_PAGES = ["/console/policies/page/edit", "/console/policies/new",
              "/console/recipients/alice/edit", "/console/recipients/new",
              "/console/groups/primary/edit", "/console/groups/new"]  # fmt: skip
WRITES: list[tuple[str, dict[str, Any]]] = [
    ("/console/carriers/primary", {"action": "disable"}),
    ("/console/carriers/primary", {"action": "rotation", "priority": "9", "weight": "2"}),
    ("/console/carriers/primary", {"action": "reset"}),
    ("/console/carriers/primary", {"action": "test"}),
    ("/console/policies/page/edit", {"step_count": "1", "steps-0-recipients": "bob",
                                     "steps-0-channels": "sms", "steps-0-delay": "1m",
                                     "repeat": "0", "max_duration": "1h",
                                     "max_notifications": "5"}),
    ("/console/policies", {"name": "new-one", "step_count": "1", "steps-0-recipients": "bob",
                           "steps-0-channels": "sms"}),
    ("/console/recipients/alice/edit", {"name": "Mallory", "phone": "+14155550109"}),
    ("/console/recipients", {"id": "eve", "name": "Eve", "phone": "+14155550108"}),
    ("/console/groups/primary/edit", {"members": "bob"}),
    ("/console/groups", {"name": "others", "members": "bob"}),
    ("/console/recipients/bob/delete", {}),
    ("/console/groups/primary/delete", {}),
    ("/console/policies/page/delete", {}),
]  # fmt: skip


async def test_everyone_sees_the_admin_pages_only_admins_change_anything(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with console_app(sqlite_url, tmp_path) as (app, client):
        anonymous = await client.get("/console/carriers")
        assert anonymous.status_code == 303
        assert anonymous.headers["location"].startswith("/console/login")
        before = {p: (await client.get(f"/v1{p}", headers=KEY)).json()
                  for p in ("/carriers", "/policies", "/recipients", "/groups")}  # fmt: skip

        for name in ("rex", "vic"):
            client.cookies.clear()
            token = await sign_in(client, name)
            for path in PAGES:
                r = await client.get(path)
                assert r.status_code == 200, (name, path, r.text)
                assert 'method="post" action="/console/carriers' not in r.text, (name, path)
                assert "/edit" not in r.text, (name, path)
                assert "/new" not in r.text, (name, path)
            carriers = (await client.get("/console/carriers")).text
            assert "Only admins change trunks." in carriers
            assert "s3cret-pw" not in carriers
            for path in EDIT_PAGES:
                assert (await client.get(path)).status_code == 403, (name, path)
            for path, form in WRITES:  # a valid CSRF token, the wrong role: 403
                r = await client.post(path, data={**form, "csrf_token": token})
                assert r.status_code == 403, (name, path, r.status_code)

        after = {p: (await client.get(f"/v1{p}", headers=KEY)).json()
                 for p in ("/carriers", "/policies", "/recipients", "/groups")}  # fmt: skip
        assert after == before
        assert audit(app, "trunk_changed") == []
        assert audit(app, "config_changed") == []

        client.cookies.clear()
        await sign_in(client, "ada")
        for path in PAGES + EDIT_PAGES:
            assert (await client.get(path)).status_code == 200, path
        page = (await client.get("/console/carriers")).text
        assert 'id="disable-primary"' in page
        assert 'id="test-secondary"' in page
        assert 'id="strategy">weighted<' in page


async def test_console_trunk_changes_are_the_api_changes(db_url: str, tmp_path: Path) -> None:
    async with console_app(db_url, tmp_path) as (app, client):
        token = await sign_in(client, "ada")

        async def console(form: dict[str, str], trunk: str = "primary") -> httpx.Response:
            return await client.post(f"/console/carriers/{trunk}",
                                     data={**form, "csrf_token": token})  # fmt: skip

        assert (await console({"action": "disable"})).status_code == 303
        r = await console({"action": "rotation", "priority": "7", "weight": "3"})
        assert r.status_code == 303
        assert "done=rotation:primary" in r.headers["location"]
        for body in ({"enabled": False}, {"priority": 7, "weight": 3}):
            api = await client.patch("/v1/carriers/secondary", json=body, headers=KEY)
            assert api.status_code == 200, api.text
        trunks = {t["name"]: t for t in (await client.get("/v1/carriers", headers=KEY)).json()}
        assert trunks["primary"]["overrides"] == trunks["secondary"]["overrides"] == {
            "enabled": False, "priority": 7, "weight": 3}  # fmt: skip
        page = (await client.get("/console/carriers")).text
        assert 'id="enable-primary"' in page
        assert 'id="priority-primary">7<' in page

        # the same refusal, worded the same, and nothing stored
        bad = await console({"action": "rotation", "priority": "7", "weight": "0"})
        assert bad.status_code == 422
        shown = error_beside(bad.text, "primary-weight")
        api = await client.patch("/v1/carriers/secondary", json={"weight": 0}, headers=KEY)
        assert api.status_code == 422
        assert api.json()["detail"] == [f"body.weight: {shown}"]
        assert 'aria-invalid="true"' in bad.text

        probe = await console({"action": "test"}, "secondary")
        assert probe.status_code == 200
        assert "no SIP gateway runs in this process" in probe.text
        assert 'id="test-result-secondary"' in probe.text

        assert (await console({"action": "reset"})).status_code == 303
        assert (await client.delete("/v1/carriers/secondary/overrides", headers=KEY)).is_success
        missing = await console({"action": "disable"}, "nope")
        assert missing.status_code == 404, missing.text

        lines = audit(app, "trunk_changed")
        by_actor: dict[str, list[Any]] = {}
        for line in lines:
            by_actor.setdefault(line["actor"], []).append(
                (line["status"], line["reason"], line.get("changes"))
            )
        assert by_actor["console:ada"] == by_actor["api:acme"] == [
            ("changed", "enabled", {"enabled": False}),
            ("changed", "enabled,priority,weight", {"priority": 7, "weight": 3}),
            ("reset", "overrides_cleared", None),
        ]  # fmt: skip
        assert {x["ip"] for x in lines} == {CLIENT_IP}
        assert {x["trunk"] for x in lines if x["actor"] == "console:ada"} == {"primary"}


def policy_form(**fields: str) -> dict[str, str]:
    form = {"step_count": "2", "repeat": "1", "max_duration": "2h", "max_notifications": "40",
            "steps-0-recipients": "alice", "steps-0-groups": "", "steps-0-schedules": "",
            "steps-0-channels": "sms", "steps-0-delay": "5m",
            "steps-1-recipients": "", "steps-1-groups": "", "steps-1-schedules": "",
            "steps-1-delay": "5m"}  # fmt: skip
    return {**form, **fields}


async def test_console_policy_edits_validate_and_store_as_the_api(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with console_app(sqlite_url, tmp_path) as (app, client):
        token = await sign_in(client, "ada")
        original = (await client.get("/v1/policies/page", headers=KEY)).json()
        edit = await client.get("/console/policies/page/edit")
        assert 'id="yaml-note"' in edit.text  # "page" comes from ackline.yaml
        assert 'value="10m"' in edit.text  # its delay as the file writes it

        # references are checked in the database, as PUT /v1/policies does
        bad = await client.post(
            "/console/policies/page/edit",
            data={**policy_form(**{"steps-0-recipients": "alice, nobody"}), "csrf_token": token},
        )
        assert bad.status_code == 422
        assert error_beside(bad.text, "steps-0-recipients") == "unknown recipient 'nobody'"
        assert 'value="alice, nobody"' in bad.text  # what was typed stays in the field
        body = {**original, "steps": [{"recipients": ["alice", "nobody"], "channels": ["sms"]}]}
        api = await client.put("/v1/policies/page", json=body, headers=KEY)
        assert api.status_code == 422
        assert api.json()["detail"] == ["policy.steps[0].recipients[1]: unknown recipient 'nobody'"]

        bad = await client.post(
            "/console/policies/page/edit",
            data={**policy_form(**{"steps-0-delay": "soon", "repeat": "99"}), "csrf_token": token},
        )
        assert bad.status_code == 422
        assert "invalid duration 'soon'" in error_beside(bad.text, "steps-0-delay")
        assert "less than or equal to 20" in error_beside(bad.text, "repeat")
        bad = await client.post(
            "/console/policies/page/edit",
            data={**policy_form(advanced="retry: {fax: {attempts: 2}}"), "csrf_token": token},
        )
        assert "unknown channel 'fax'" in error_beside(bad.text, "advanced")
        assert (await client.get("/v1/policies/page", headers=KEY)).json() == original
        assert audit(app, "config_changed") == []

        # a new policy from the console equals the one the API creates from the same JSON
        r = await client.post("/console/policies", data={
            **policy_form(name="nightly", advanced="voice: {prompts: 2, snooze: 15m}"),
            "csrf_token": token})  # fmt: skip
        assert r.status_code == 303, r.text
        api = await client.post(
            "/v1/policies",
            headers=KEY,
            json={
                "name": "nightly-api",
                "repeat": 1,
                "max_duration": "2h",
                "max_notifications": 40,
                "voice": {"prompts": 2, "snooze": "15m"},
                "steps": [{"recipients": ["alice"], "channels": ["sms"], "delay": "5m"}],
            },
        )
        assert api.status_code == 201, api.text
        stored = {p["name"]: p for p in (await client.get("/v1/policies", headers=KEY)).json()}
        assert {**stored["nightly"], "name": "x"} == {**stored["nightly-api"], "name": "x"}

        # an edit of a YAML policy is saved, and the list says the next restart undoes it
        r = await client.post(
            "/console/policies/page/edit", data={**policy_form(), "csrf_token": token}
        )
        assert r.status_code == 303, r.text
        listing = (await client.get("/console/policies")).text
        page_item = listing.split('id="policy-page"')[1].split("</li>")[0]
        assert "the next restart puts the file's version back" in page_item
        ring_item = listing.split('id="policy-ring"')[1].split("</li>")[0]
        assert "from ackline.yaml" in ring_item
        assert "restart" not in ring_item
        nightly_item = listing.split('id="policy-nightly"')[1].split("</li>")[0]
        assert "ackline.yaml" not in nightly_item
        [created, changed] = audit(app, "config_changed")
        assert (created["status"], created["kind"], created["key"]) == ("created", "policy",
                                                                         "nightly")  # fmt: skip
        assert (changed["actor"], changed["ip"], changed["key"]) == ("console:ada", CLIENT_IP,
                                                                     "page")  # fmt: skip


async def test_console_recipients_and_groups_validate_as_the_api(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with console_app(sqlite_url, tmp_path) as (app, client):
        token = await sign_in(client, "ada")
        bad = await client.post(
            "/console/recipients",
            data={"id": "carol", "name": "Carol", "phone": "555", "csrf_token": token},
        )
        assert bad.status_code == 422
        assert "must be in E.164 form" in error_beside(bad.text, "phone")
        none = await client.post(
            "/console/recipients", data={"id": "carol", "name": "Carol", "csrf_token": token}
        )
        assert error_beside(none.text, "form") == "recipient 'carol' has no contact point"
        taken = await client.post(
            "/console/recipients",
            data={"id": "alice", "name": "Alice", "phone": "+14155550107", "csrf_token": token},
        )
        assert "exists" in error_beside(taken.text, "id")
        ok = await client.post(
            "/console/recipients",
            data={"id": "carol", "name": "Carol", "phone": "+1 415 555 0107", "csrf_token": token},
        )
        assert ok.status_code == 303, ok.text
        carol = (await client.get("/v1/recipients/carol", headers=KEY)).json()
        assert carol["phone"] == "+14155550107"  # normalised by the same model

        ghost = await client.post(
            "/console/groups/primary/edit",
            data={"members": ["alice", "ghost"], "csrf_token": token},
        )
        assert ghost.status_code == 422
        assert error_beside(ghost.text, "members") == "unknown recipient 'ghost'"
        empty = await client.post("/console/groups", data={"name": "night", "csrf_token": token})
        assert "at least 1 item" in error_beside(empty.text, "members")
        ok = await client.post(
            "/console/groups/primary/edit",
            data={"members": ["alice", "carol"], "csrf_token": token},
        )
        assert ok.status_code == 303, ok.text
        groups = (await client.get("/v1/groups", headers=KEY)).json()
        assert groups == [{"name": "primary", "members": ["alice", "carol"]}]
        listing = (await client.get("/console/groups")).text
        assert "next restart puts the file" in listing
        people = (await client.get("/console/recipients")).text
        carol_item = people.split('id="recipient-carol"')[1].split("</li>")[0]
        assert "ackline.yaml" not in carol_item
        alice_item = people.split('id="recipient-alice"')[1].split("</li>")[0]
        assert "from ackline.yaml" in alice_item
        changes = [(x["status"], x["kind"], x["key"]) for x in audit(app, "config_changed")]
        assert changes == [("created", "recipient", "carol"), ("changed", "group", "primary")]


async def test_console_deletes_what_nothing_uses_and_refuses_the_rest_changing_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    async with console_app(sqlite_url, tmp_path) as (app, client):
        token = await sign_in(client, "ada")
        for form in ({"id": "carol", "name": "Carol", "phone": "+14155550107"},
                     {"id": "dave", "name": "Dave", "email": "dave@example.org"}):  # fmt: skip
            assert (await client.post("/console/recipients", data={**form, "csrf_token": token})
                    ).status_code == 303  # fmt: skip
        made = await client.post(
            "/console/groups", data={"name": "night", "members": ["carol"], "csrf_token": token}
        )
        assert made.status_code == 303, made.text
        edit = (await client.get("/console/recipients/carol/edit")).text
        assert 'action="/console/recipients/carol/delete"' in edit

        in_use = await client.post("/console/recipients/carol/delete", data={"csrf_token": token})
        assert in_use.status_code == 409
        refusal = html.unescape(in_use.text.split('id="refused">')[1].split("</p>")[0])
        assert refusal == "not deleted: recipient 'carol' is used by group night"
        in_file = await client.post("/console/recipients/alice/delete", data={"csrf_token": token})
        assert in_file.status_code == 409
        assert "defined in ackline.yaml" in in_file.text
        missing = await client.post("/console/groups/nobody/delete", data={"csrf_token": token})
        assert missing.status_code == 404, missing.text
        no_csrf = await client.post("/console/recipients/dave/delete")
        assert no_csrf.status_code == 403
        people = {r["id"] for r in (await client.get("/v1/recipients", headers=KEY)).json()}
        assert {"alice", "carol", "dave"} <= people

        gone = await client.post("/console/groups/night/delete", data={"csrf_token": token})
        assert gone.status_code == 303
        assert gone.headers["location"] == "/console/groups?done=deleted:night"
        for rid in ("carol", "dave"):
            r = await client.post(f"/console/recipients/{rid}/delete", data={"csrf_token": token})
            assert r.status_code == 303, r.text
        people = {r["id"] for r in (await client.get("/v1/recipients", headers=KEY)).json()}
        assert "carol" not in people
        assert "dave" not in people
        assert "alice" in people
        groups = {g["name"] for g in (await client.get("/v1/groups", headers=KEY)).json()}
        assert "night" not in groups
        listing = (await client.get("/console/recipients?done=deleted:dave")).text
        assert 'id="recipient-dave"' not in listing
        assert "Deleted: dave." in listing
        changes = [(x["status"], x["kind"], x["key"]) for x in audit(app, "config_changed")]
        assert changes[-3:] == [
            ("deleted", "group", "night"), ("deleted", "recipient", "carol"),
            ("deleted", "recipient", "dave"),
        ]  # fmt: skip
        assert all(x["actor"] == "console:ada" for x in audit(app, "config_changed"))
