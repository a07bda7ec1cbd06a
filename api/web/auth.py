"""Who is signed in to the web console, and what they may do.

The interface other console pages build on (keep it small and stable):

    from api.web.auth import ConsoleUserDep, Role, render, require_role

    @router.get("/console/things")
    async def things(request: Request,
                     user: Annotated[ConsoleUser, Depends(require_role(Role.ADMIN))]):
        return render(request, "console/things.html", {"things": ...}, user)

    @router.post("/console/things")          # same dependency: CSRF is checked for you
    async def add_thing(request: Request, user: ... = Depends(require_role(Role.ADMIN))): ...

- `require_role(role)` is a dependency returning the signed-in `ConsoleUser` (company,
  role, `actor` for the audit, `recipient_id`). Nobody signed in: a page GET is redirected
  (303) to /console/login, anything else gets 401 (htmx gets an HX-Redirect header too).
  A lower role gets 403. For every method but GET/HEAD/OPTIONS it first checks the CSRF
  token: the form field `csrf_token` or the `X-CSRF-Token` header (htmx sends it through
  `hx-headers` set by console/layout.html), else 403 and nothing runs.
- `render(request, template, context, user)` renders a page with the session's
  `csrf_token`, `user`, `Role` and `setup_warnings` in the context and the strict CSP and
  no-store headers; templates extend "console/layout.html" and put
  `<input type="hidden" name="csrf_token" value="{{ csrf_token }}">` in each form.
- `audit_context(request, user)` is the engine's RequestContext: actor "console:<name>",
  the client's IP, the request id.

Sessions are signed cookies (itsdangerous; HttpOnly, SameSite=Lax, Secure when
ACKLINE_PUBLIC_URL is https) holding a random session id, the CSRF token, the user's
`session_version` and when it was last used. Signing in issues a new id and token
(fixation); a session unused for ACKLINE_CONSOLE_IDLE_TIMEOUT seconds ends, and any
session ends at once when its user is disabled or their password or role changes
(the version no longer matches). API keys are untouched by all of this.

Failed sign-ins are limited per username and client IP in this process's memory
(bounded): several API processes each count their own.
"""

from __future__ import annotations

import collections
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import web
from api.deps import Runtime, context, runtime_of
from escalation.audit_records import RequestContext
from escalation.users import ConsoleUser, Role, authenticate, get_user

__all__ = [
    "ConsoleUser",
    "ConsoleUserDep",
    "LoginLimiter",
    "Role",
    "audit_context",
    "csrf_token",
    "install",
    "render",
    "require_role",
]

log = logging.getLogger(__name__)

COOKIE = "ackline_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_SESSION_SECONDS = 7 * 24 * 3600  # signed in at most this long, however active
REFRESH_SECONDS = 60  # the last-used time in the cookie is rewritten at most this often
LOGIN_PATH = "/console/login"
_STATE_COOKIE = "ackline_set_cookie"  # request.state: the cookie value to send back
clock = time.time  # seconds; tests move it to end sessions without waiting


class LoginRequired(Exception):
    """Nobody (or an ended session) is signed in."""


class Forbidden(Exception):
    """Signed in, but this needs a higher role, or the CSRF token is missing or wrong."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


# ------------------------------------------------------------------ the session cookie


@dataclass(frozen=True)
class Session:
    sid: str
    csrf: str
    username: str | None = None
    version: int = 0
    signed_in_at: float = 0.0
    seen_at: float = 0.0

    def dump(self) -> dict[str, Any]:
        return {"s": self.sid, "c": self.csrf, "u": self.username, "v": self.version,
                "l": self.signed_in_at, "t": self.seen_at}  # fmt: skip

    @classmethod
    def load(cls, data: Any) -> Session | None:
        if not isinstance(data, Mapping):
            return None
        try:
            user = data.get("u")
            return cls(str(data["s"]), str(data["c"]), None if user is None else str(user),
                       int(data["v"]), float(data["l"]), float(data["t"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def anonymous(cls, now: float) -> Session:
        return cls(secrets.token_urlsafe(18), secrets.token_urlsafe(24), seen_at=now)


def _secret_file(runtime: Runtime) -> Path:
    return runtime.settings.audit_dir.parent / "session-secret"


def _load_or_create_secret(path: Path) -> str:
    """One random secret kept next to the audit directory (mode 0600), so sessions
    survive a restart of a single-node install without configuration."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text().strip()
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    return secret


def _serializer(request: Request) -> URLSafeTimedSerializer:
    found: URLSafeTimedSerializer | None = getattr(request.app.state, "console_signer", None)
    if found is None:
        runtime = runtime_of(request)
        secret = runtime.settings.session_secret or _load_or_create_secret(_secret_file(runtime))
        found = URLSafeTimedSerializer(secret, salt="ackline-console-session")
        request.app.state.console_signer = found
    return found


def _read_session(request: Request) -> Session | None:
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        data = _serializer(request).loads(raw, max_age=MAX_SESSION_SECONDS)
    except BadSignature:
        return None
    return Session.load(data)


def _send_session(request: Request, session: Session) -> None:
    request.state.console_session = session
    setattr(request.state, _STATE_COOKIE, _serializer(request).dumps(session.dump()))


def session_of(request: Request) -> Session:
    """This request's session; an anonymous one (with its own CSRF token) is started
    when there is none, so even the sign-in form is CSRF-protected."""
    found: Session | None = getattr(request.state, "console_session", None)
    if found is not None:
        return found
    session = _read_session(request)
    if session is None:
        session = Session.anonymous(clock())
        _send_session(request, session)
    request.state.console_session = session
    return session


def csrf_token(request: Request) -> str:
    return session_of(request).csrf


class SessionCookieMiddleware:
    """Adds the Set-Cookie a handler queued on request.state: a dependency cannot add
    headers to a response the route builds itself (a rendered page, a redirect)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                value = scope.get("state", {}).get(_STATE_COOKIE)
                if value is not None:
                    secure = _secure(scope)
                    cookie = (f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Lax"
                              + ("; Secure" if secure else ""))  # fmt: skip
                    headers = list(message.get("headers", []))
                    headers.append((b"set-cookie", cookie.encode("latin-1")))
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)


def _secure(scope: Scope) -> bool:
    app = scope.get("app")
    runtime = getattr(getattr(app, "state", None), "runtime", None)
    url = runtime.settings.public_url if runtime is not None else None
    return bool(url and url.lower().startswith("https://"))


# ------------------------------------------------------------------ who is signed in


async def current_user(request: Request) -> ConsoleUser | None:
    """The signed-in user, checked against the database on every request: disabled, or a
    password or role changed since sign-in, and the session is over."""
    if hasattr(request.state, "console_user"):
        cached: ConsoleUser | None = request.state.console_user
        return cached
    session = session_of(request)
    user = None
    if session.username is not None:
        now = clock()
        idle = runtime_of(request).settings.console_idle_timeout
        if now - session.seen_at <= idle and now - session.signed_in_at <= MAX_SESSION_SECONDS:
            found = await get_user(runtime_of(request).db, session.username)
            if (found is not None and not found.disabled
                    and found.session_version == session.version):  # fmt: skip
                user = found
        if user is None:  # ended: back to an anonymous session, new id and token
            _send_session(request, Session.anonymous(now))
        elif now - session.seen_at > REFRESH_SECONDS:
            _send_session(request, Session(session.sid, session.csrf, session.username,
                                           session.version, session.signed_in_at, now))  # fmt: skip
    request.state.console_user = user
    return user


async def check_csrf(request: Request) -> None:
    """The synchronizer token: a header (htmx) or a form field equal to the session's."""
    expected = session_of(request).csrf
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        form = await request.form()
        field = form.get("csrf_token")
        sent = field if isinstance(field, str) else None
    if not sent or not hmac.compare_digest(sent.encode(), expected.encode()):
        raise Forbidden("missing or wrong CSRF token; reload the page and try again")


def require_role(role: Role) -> Callable[[Request], Awaitable[ConsoleUser]]:
    """A dependency: the signed-in user with at least `role` (CSRF checked on writes)."""

    async def dependency(request: Request) -> ConsoleUser:
        user = await current_user(request)
        if user is None:
            raise LoginRequired
        if request.method not in SAFE_METHODS:
            await check_csrf(request)
        if not user.role.allows(role):
            raise Forbidden(f"this needs the {role.value} role; you are {user.role.value}")
        return user

    return dependency


ConsoleUserDep = Annotated[ConsoleUser, Depends(require_role(Role.VIEWER))]
Admin = Annotated[ConsoleUser, Depends(require_role(Role.ADMIN))]


def audit_context(request: Request, user: ConsoleUser) -> RequestContext:
    return context(request, user.actor)


def client_ip(request: Request) -> str:
    return request.client.host if request.client else "-"


# ------------------------------------------------------------------ pages


def render(
    request: Request,
    template: str,
    ctx: Mapping[str, Any] | None = None,
    user: ConsoleUser | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """A console page: session CSRF token, user, roles and setup warnings in context."""
    full = {
        "csrf_token": csrf_token(request),
        "user": user,
        "Role": Role,
        "setup_warnings": list(getattr(request.app.state, "setup_warnings", []) or []),
        **(ctx or {}),
    }
    response = web.templates.TemplateResponse(request, template, full, status_code=status_code)
    response.headers.update(web.SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-store"
    return response


def _wants_page(request: Request) -> bool:
    return request.method == "GET" and "hx-request" not in request.headers


async def _login_required(request: Request, _exc: Exception) -> Response:
    if _wants_page(request):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{LOGIN_PATH}?next={quote(target, safe='')}", 303)
    return JSONResponse({"detail": "sign in first"}, 401, headers={"HX-Redirect": LOGIN_PATH})


async def _forbidden(request: Request, exc: Exception) -> Response:
    message = exc.message if isinstance(exc, Forbidden) else "forbidden"
    if "hx-request" in request.headers or "text/html" not in request.headers.get("accept", ""):
        return JSONResponse({"detail": message}, 403)
    return render(request, "console/error.html", {"message": message},
                  await current_user(request), status_code=403)  # fmt: skip


# ------------------------------------------------------------------ sign in / out


class LoginLimiter:
    """At most `failures` failed sign-ins per (username, IP) within `window` seconds, for
    at most `max_keys` pairs (the oldest forgotten first): memory stays bounded under a
    spray of made-up names."""

    def __init__(self, failures: int = 5, window: float = 900.0, max_keys: int = 10_000) -> None:
        self.failures = failures
        self.window = window
        self.max_keys = max_keys
        self._seen: collections.OrderedDict[tuple[str, str], list[float]] = (
            collections.OrderedDict()
        )

    def retry_after(self, key: tuple[str, str], now: float) -> float | None:
        times = [t for t in self._seen.get(key, []) if now - t < self.window]
        if len(times) < self.failures:
            return None
        return max(1.0, self.window - (now - times[0]))

    def failed(self, key: tuple[str, str], now: float) -> None:
        times = [t for t in self._seen.pop(key, []) if now - t < self.window]
        self._seen[key] = [*times, now][-self.failures :]
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def succeeded(self, key: tuple[str, str]) -> None:
        self._seen.pop(key, None)


def _limiter(request: Request) -> LoginLimiter:
    found: LoginLimiter | None = getattr(request.app.state, "console_login_limiter", None)
    if found is None:
        found = request.app.state.console_login_limiter = LoginLimiter()
    return found


def _next_page(raw: str | None) -> str:
    """Only a console path of this site: never an open redirect."""
    if raw and raw.startswith("/console") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/console"


router = APIRouter(include_in_schema=False)


@router.get("/console/login", response_class=HTMLResponse)
async def login_page(request: Request, next: str | None = None) -> Response:
    user = await current_user(request)
    if user is not None:
        return RedirectResponse(_next_page(next), 303)
    return render(request, "console/login.html", {"next": _next_page(next)})


@router.post("/console/login", response_class=HTMLResponse)
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=2000)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/console",
) -> Response:
    await check_csrf(request)
    runtime = runtime_of(request)
    key = (username.strip().lower(), client_ip(request))
    now = clock()
    limiter = _limiter(request)
    wait = limiter.retry_after(key, now)
    if wait is not None:
        return render(request, "console/login.html",
                      {"next": _next_page(next), "username": username,
                       "error": f"Too many failed attempts; try again in {int(wait)} s."},
                      status_code=429)  # fmt: skip
    user = await authenticate(runtime.db, username, password)
    if user is None:
        limiter.failed(key, now)
        log.warning("console sign-in failed for %r from %s", key[0], key[1])
        return render(request, "console/login.html",
                      {"next": _next_page(next), "username": username,
                       "error": "Wrong username or password."}, status_code=401)  # fmt: skip
    limiter.succeeded(key)
    # a new session id and CSRF token: whatever id was planted before sign-in is dropped
    fresh = Session(secrets.token_urlsafe(18), secrets.token_urlsafe(24), user.username,
                    user.session_version, now, now)  # fmt: skip
    _send_session(request, fresh)
    request.state.console_user = user
    runtime.audit.write(user.company, [_audit_line("console_login", request, user)])
    return RedirectResponse(_next_page(next), 303)


@router.post("/console/logout")
async def logout(
    request: Request, user: Annotated[ConsoleUser, Depends(require_role(Role.VIEWER))]
) -> Response:
    runtime_of(request).audit.write(user.company, [_audit_line("console_logout", request, user)])
    _send_session(request, Session.anonymous(clock()))
    return RedirectResponse(LOGIN_PATH, 303)


def _audit_line(event: str, request: Request, user: ConsoleUser, **extra: Any) -> dict[str, Any]:
    ctx = audit_context(request, user)
    return {"event": event, "status": "ok", "actor": ctx.actor, "ip": ctx.ip,
            "request_id": ctx.request_id, **extra}  # fmt: skip


def install(app: FastAPI) -> None:
    """Sign-in routes, the session cookie and the 401/403 answers of the console."""
    app.add_middleware(SessionCookieMiddleware)
    app.add_exception_handler(LoginRequired, _login_required)
    app.add_exception_handler(Forbidden, _forbidden)
    app.include_router(router)
