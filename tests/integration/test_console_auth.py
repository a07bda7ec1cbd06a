"""Web console sign-in, sessions, CSRF and roles, in-process (no browser): the rules the
console's pages rely on, checked through a probe route that uses the public interface."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, PlainTextResponse

from api.web import auth
from api.web.auth import ConsoleUser, Role, require_role
from escalation.users import UserError, add_user, update_user
from tests.integration.test_api_alerts import KEY, Api, running

pytest_plugins = ["tests.conftest_escalation"]

PASSWORD = "correct horse battery"
CSRF_FIELD = re.compile(r'name="csrf_token" value="([^"]+)"')


Responder = Annotated[ConsoleUser, Depends(require_role(Role.RESPONDER))]


def add_probes(api: Api) -> None:
    """A responder-only page and action, written the way console pages are."""

    @api.app.get("/console/probe", response_class=PlainTextResponse)
    async def probe(user: Responder) -> str:
        return f"{user.username} {user.role.value} {user.company}"

    @api.app.post("/console/probe", response_class=PlainTextResponse)
    async def act(request: Request, user: Responder) -> str:
        api.app.state.probe_actions = [*getattr(api.app.state, "probe_actions", []),
                                       auth.audit_context(request, user).actor]  # fmt: skip
        return "done"

    @api.app.get("/console/probe-page", response_class=HTMLResponse)
    async def page(request: Request, user: auth.ConsoleUserDep) -> HTMLResponse:
        return auth.render(request, "console/error.html", {"message": "probe"}, user)


@pytest.fixture
async def console(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    async with running(sqlite_url, tmp_path) as api:
        await users(api)
        add_probes(api)
        yield api


async def users(api: Api) -> None:
    db = api.app.state.runtime.db
    for name, role, recipient in [("ada", Role.ADMIN, None), ("rex", Role.RESPONDER, "alice"),
                                  ("vic", Role.VIEWER, None)]:  # fmt: skip
        await add_user(db, "acme", name, PASSWORD, role, "test", recipient)
    await add_user(db, "globex", "gus", PASSWORD, Role.RESPONDER, "test")


def csrf_of(html: str) -> str:
    found = CSRF_FIELD.search(html)
    assert found, "no csrf_token field on the page"
    return found.group(1)


async def sign_in(
    client: httpx.AsyncClient, username: str, password: str = PASSWORD, next: str = "/console"
) -> httpx.Response:
    form = await client.get("/console/login")
    assert form.status_code == 200, form.text
    return await client.post("/console/login", data={
        "username": username, "password": password, "csrf_token": csrf_of(form.text),
        "next": next,
    })  # fmt: skip


async def signed_in(client: httpx.AsyncClient, username: str) -> str:
    """Sign in; the CSRF token of the new session is returned."""
    r = await sign_in(client, username)
    assert r.status_code == 303, r.text
    page = await client.get("/console")
    assert page.status_code == 200, page.text
    return csrf_of(page.text)


async def test_sign_in_gives_a_fresh_session_and_the_user_acts_as_themselves(
    db_url: str, tmp_path: Path
) -> None:
    async with running(db_url, tmp_path) as api:
        await users(api)
        add_probes(api)
        client = api.client
        form = await client.get("/console/login")
        before = client.cookies[auth.COOKIE]
        cookie = form.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=Lax" in cookie
        assert "Secure" in cookie  # the public URL is https
        assert form.headers["content-security-policy"].startswith("default-src 'self'")
        r = await client.post("/console/login", data={
            "username": "REX", "password": PASSWORD, "csrf_token": csrf_of(form.text),
            "next": "/console/probe"})  # fmt: skip
        assert r.status_code == 303
        assert r.headers["location"] == "/console/probe"
        after = client.cookies[auth.COOKIE]
        assert after != before
        old = auth.Session.load(_payload(api, before))
        assert old is not None
        assert old.sid != _payload(api, after)["s"]
        assert (await client.get("/console/probe")).text == "rex responder acme"
        token = csrf_of((await client.get("/console/probe-page")).text)
        assert token != csrf_of(form.text)  # a new CSRF token with the new session
        assert (await client.post("/console/probe", headers={"X-CSRF-Token": token})).text == (
            "done"
        )
        assert api.app.state.probe_actions == ["console:rex"]
        lines = [ln for ln in api.app.state.runtime.audit.read("acme")
                 if ln.get("event") == "console_login"]  # fmt: skip
        assert [(ln["actor"], ln["ip"]) for ln in lines] == [("console:rex", "203.0.113.7")]

        # disabling the user ends the session they already have, on its next request
        await update_user(api.app.state.runtime.db, "rex", "test", disabled=True)
        r = await client.get("/console/probe")
        assert r.status_code == 303
        assert r.headers["location"].startswith("/console/login")
        r = await client.post("/console/probe", headers={"X-CSRF-Token": token})
        assert r.status_code == 401
        assert (await sign_in(client, "rex")).status_code == 401  # and they cannot sign in
        # API keys are unaffected
        assert (await client.get("/v1/alerts", headers=KEY)).status_code == 200


def _payload(api: Api, cookie: str) -> Any:
    class Fake:
        app = api.app

    return auth._serializer(Fake()).loads(cookie)  # type: ignore[arg-type]


async def test_anonymous_requests_are_sent_to_sign_in(console: Api) -> None:
    client = console.client
    r = await client.get("/console/probe?x=1")
    assert r.status_code == 303
    assert r.headers["location"] == "/console/login?next=%2Fconsole%2Fprobe%3Fx%3D1"
    r = await client.get("/console/probe", headers={"HX-Request": "true"})
    assert r.status_code == 401
    assert r.headers["hx-redirect"] == "/console/login"
    form = await client.get("/console/login")
    r = await client.post("/console/probe", data={"csrf_token": csrf_of(form.text)})
    assert r.status_code == 401
    assert getattr(console.app.state, "probe_actions", []) == []


async def test_csrf_missing_or_wrong_is_403_and_changes_nothing(console: Api) -> None:
    client = console.client
    token = await signed_in(client, "rex")
    for headers, data in [({}, {}), ({"X-CSRF-Token": "forged"}, {}),
                          ({}, {"csrf_token": "forged"}), ({"X-CSRF-Token": ""}, {})]:  # fmt: skip
        r = await client.post("/console/probe", headers=headers, data=data)
        assert r.status_code == 403, (headers, data, r.text)
    assert getattr(console.app.state, "probe_actions", []) == []
    assert (await client.post("/console/probe", data={"csrf_token": token})).status_code == 200
    # the sign-in form is protected too (login CSRF)
    other = httpx.AsyncClient(transport=client._transport, base_url=str(client.base_url))
    async with other:
        await other.get("/console/login")
        r = await other.post("/console/login", data={"username": "rex", "password": PASSWORD,
                                                    "csrf_token": "forged"})  # fmt: skip
        assert r.status_code == 403


async def test_roles_are_enforced(console: Api) -> None:
    client = console.client
    token = await signed_in(client, "vic")
    r = await client.get("/console/probe", headers={"Accept": "text/html"})
    assert r.status_code == 403
    assert "responder role" in r.text
    r = await client.post("/console/probe", headers={"X-CSRF-Token": token})
    assert r.status_code == 403
    assert getattr(console.app.state, "probe_actions", []) == []
    assert Role.ADMIN.allows(Role.RESPONDER)
    assert not Role.VIEWER.allows(Role.RESPONDER)


async def test_a_new_password_or_role_ends_sessions(console: Api) -> None:
    db = console.app.state.runtime.db
    client = console.client
    await signed_in(client, "ada")
    await update_user(db, "ada", "test", recipient_id="bob")  # a link alone keeps the session
    assert (await client.get("/console/probe")).status_code == 200
    await update_user(db, "ada", "test", password="another password")
    assert (await client.get("/console/probe")).status_code == 303
    await sign_in(client, "ada", "another password")
    assert (await client.get("/console/probe")).status_code == 200
    await update_user(db, "ada", "test", role=Role.RESPONDER)
    assert (await client.get("/console/probe")).status_code == 303
    with pytest.raises(UserError) as bad:
        await update_user(db, "ada", "test", recipient_id="nobody")
    assert bad.value.field == "recipient"


async def test_idle_sessions_end(console: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [auth.clock()]
    monkeypatch.setattr(auth, "clock", lambda: now[0])
    client = console.client
    await signed_in(client, "rex")
    idle = console.app.state.runtime.settings.console_idle_timeout
    now[0] += idle - 5  # used just in time: the cookie's last-used time moves on
    assert (await client.get("/console/probe")).status_code == 200
    now[0] += idle - 5
    assert (await client.get("/console/probe")).status_code == 200
    now[0] += idle + 1
    assert (await client.get("/console/probe")).status_code == 303


async def test_failed_sign_ins_are_limited_per_username_and_ip(console: Api) -> None:
    client = console.client
    for _ in range(5):
        assert (await sign_in(client, "rex", "wrong password")).status_code == 401
    r = await sign_in(client, "rex")  # the right password no longer helps, for a while
    assert r.status_code == 429
    assert "Too many failed attempts" in r.text
    assert (await sign_in(client, "vic")).status_code == 303  # another username is not held


async def test_sign_in_never_redirects_off_the_console(console: Api) -> None:
    for target in ["//evil.example/", "https://evil.example/", "/v1/alerts", "/console\\x"]:
        console.client.cookies.clear()
        r = await sign_in(console.client, "vic", next=target)
        assert r.headers["location"] == "/console", target


def test_the_limiter_stays_bounded() -> None:
    limiter = auth.LoginLimiter(failures=2, window=60, max_keys=100)
    for i in range(1000):
        limiter.failed((f"user{i}", "198.51.100.1"), 0.0)
    assert len(limiter._seen) == 100
    limiter.failed(("a", "ip"), 0.0)
    assert limiter.retry_after(("a", "ip"), 1.0) is None
    limiter.failed(("a", "ip"), 1.0)
    assert limiter.retry_after(("a", "ip"), 2.0) == 58.0
    assert limiter.retry_after(("a", "ip"), 61.0) is None  # the first failure aged out


async def test_usernames_and_passwords_are_checked(console: Api) -> None:
    db = console.app.state.runtime.db
    for name, password, recipient, field in [
        ("Bad Name", PASSWORD, None, "username"), ("rex", PASSWORD, None, "username"),
        ("new", "short", None, "password"), ("new", PASSWORD, "nobody", "recipient"),
    ]:  # fmt: skip
        with pytest.raises(UserError) as bad:
            await add_user(db, "acme", name, password, Role.VIEWER, "test", recipient)
        assert bad.value.field == field
