"""The responder's web console: the alert list, an alert's page and the users page.

Pages are server-rendered; the list refreshes itself by polling a partial (htmx, every
few seconds, one bounded page per poll). Every action goes through the same engine calls
as the /v1 routes (close, escalate, reassign), with the signed-in person as the audit
actor and their IP: there is no second implementation of what an ack does.
"""

from __future__ import annotations

import enum
import typing
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from sqlalchemy import func, select
from sqlmodel import col

from api.deps import Runtime, runtime_of
from api.routes.alerts import recording_of, recording_response
from api.web.auth import (
    Admin,
    ConsoleUser,
    ConsoleUserDep,
    Role,
    audit_context,
    render,
    require_role,
)
from escalation import crud
from escalation.audit_records import RequestContext
from escalation.config import Severity
from escalation.engine import AlertClosed, BadTarget
from escalation.listing import AlertFilter, BadCursor, Cursor, SortOrder, list_alerts
from escalation.schedules import oncall
from escalation.timeline import build_timeline
from escalation.users import Keep, UserError, add_user, list_users, update_user
from storage.models import AlertState, Job, JobKind, utcnow

__all__ = ["router"]

router = APIRouter(include_in_schema=False)

Responder = Annotated[ConsoleUser, Depends(require_role(Role.RESPONDER))]

PAGE_SIZE = 25
POLL_SECONDS = 4
SEVERITIES: tuple[str, ...] = typing.get_args(Severity)


class Since(enum.StrEnum):
    """The list's time filter: alerts created within the last ..."""

    ANY = ""
    HOUR = "1h"
    DAY = "24h"
    WEEK = "7d"
    MONTH = "30d"

    @property
    def delta(self) -> timedelta | None:
        return _SINCE[self]

    @property
    def label(self) -> str:
        return _SINCE_LABEL[self]


_SINCE = {Since.ANY: None, Since.HOUR: timedelta(hours=1), Since.DAY: timedelta(days=1),
          Since.WEEK: timedelta(days=7), Since.MONTH: timedelta(days=30)}  # fmt: skip
_SINCE_LABEL = {Since.ANY: "any time", Since.HOUR: "last hour", Since.DAY: "last 24 hours",
                Since.WEEK: "last 7 days", Since.MONTH: "last 30 days"}  # fmt: skip

TAB_LABELS = {AlertState.TRIGGERED: "Firing", AlertState.ACKNOWLEDGED: "Acknowledged",
              AlertState.RESOLVED: "Resolved", AlertState.EXHAUSTED: "Exhausted"}  # fmt: skip


class BulkAction(enum.StrEnum):
    ACK = "ack"
    RESOLVE = "resolve"


ACTION_STATE = {BulkAction.ACK: AlertState.ACKNOWLEDGED, BulkAction.RESOLVE: AlertState.RESOLVED}


def _ack_context(request: Request, user: ConsoleUser) -> RequestContext:
    """Acks and resolves are attributed to the user's recipient when they are linked."""
    return replace(audit_context(request, user), actor=user.ack_actor)


@dataclass(frozen=True)
class ListQuery:
    """The list page's filters as they appear in its URL."""

    tab: AlertState
    policy: str | None
    severity: str | None
    since: Since
    q: str | None
    cursor: str | None

    def params(self, **changes: str | None) -> str:
        values = {"tab": self.tab.value, "policy": self.policy, "severity": self.severity,
                  "since": self.since.value, "q": self.q, "cursor": self.cursor,
                  **changes}  # fmt: skip
        return urlencode({k: v for k, v in values.items() if v})


def _list_query(
    tab: AlertState = AlertState.TRIGGERED,
    policy: Annotated[str | None, Query(max_length=64)] = None,
    severity: Annotated[str | None, Query(max_length=20)] = None,
    since: Since = Since.ANY,
    q: Annotated[str | None, Query(max_length=200)] = None,
    cursor: Annotated[str | None, Query(max_length=1000)] = None,
) -> ListQuery:
    return ListQuery(tab, policy or None, severity if severity in SEVERITIES else None, since,
                     (q or "").strip() or None, cursor or None)  # fmt: skip


ListQueryDep = Annotated[ListQuery, Depends(_list_query)]


async def _list_context(request: Request, user: ConsoleUser, query: ListQuery) -> dict[str, Any]:
    runtime = runtime_of(request)
    delta = query.since.delta
    filt = AlertFilter(user.company, query.policy, query.severity,
                       utcnow() - delta if delta else None, None, query.q)  # fmt: skip
    error = None
    try:
        after = Cursor.decode(query.cursor) if query.cursor else None
        page = await list_alerts(runtime.db, filt, [query.tab], SortOrder.DESC, PAGE_SIZE, after)
    except BadCursor:
        error = "That page link is no longer valid; showing the first page."
        page = await list_alerts(runtime.db, filt, [query.tab], SortOrder.DESC, PAGE_SIZE)
    return {"page": page, "query": query, "tabs": TAB_LABELS, "poll": POLL_SECONDS,
            "list_error": error, "now": utcnow()}  # fmt: skip


@router.get("/console", response_class=HTMLResponse)
async def alert_list(
    request: Request, user: ConsoleUserDep, query: ListQueryDep, done: str | None = None
) -> HTMLResponse:
    runtime = runtime_of(request)
    ctx = await _list_context(request, user, query)
    policies = [p.name for p in await crud.list_policies(runtime.db, user.company)]
    return render(request, "console/alerts.html", {**ctx, "nav": "alerts", "done": done,
                  "policies": policies, "severities": SEVERITIES, "since_options": list(Since)},
                  user)  # fmt: skip


@router.get("/console/alerts/rows", response_class=HTMLResponse)
async def alert_rows(request: Request, user: ConsoleUserDep, query: ListQueryDep) -> HTMLResponse:
    """The list's live part (tabs with counts, rows, pager), polled by the page."""
    ctx = await _list_context(request, user, query)
    return render(request, "console/_alert_rows.html", ctx, user)


@router.post("/console/alerts/bulk")
async def bulk(
    request: Request,
    user: Responder,
    action: Annotated[BulkAction, Form()],
    ids: Annotated[list[str] | None, Form(max_length=PAGE_SIZE)] = None,
    back: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Acknowledge or resolve the checked alerts, one engine close each (each audited);
    alerts already past that state are skipped, not failed."""
    runtime = runtime_of(request)
    state = ACTION_STATE[action]
    changed = 0
    for alert_id in list(dict.fromkeys(ids or []))[:PAGE_SIZE]:
        alert = await runtime.engine.close(alert_id, state, _ack_context(request, user),
                                           company=user.company, reason="console")  # fmt: skip
        changed += alert is not None and alert.state == state.value
    query = back if back.startswith("tab=") or back == "" else ""
    sep = "&" if query else ""
    return RedirectResponse(f"/console?{query}{sep}done={action.value}:{changed}", 303)


# ------------------------------------------------------------------ one alert


async def _next_step_at(runtime: Runtime, alert_id: str) -> datetime | None:
    """When the chain's next policy step fires (its undone step timer), if one is set."""
    async with runtime.db.session() as s:
        due = await s.scalar(
            select(func.min(col(Job.due_at))).where(
                col(Job.alert_id) == alert_id, col(Job.kind) == JobKind.STEP.value, ~col(Job.done)
            )
        )
    return due if isinstance(due, datetime) else None


async def _alert_or_404(runtime: Runtime, alert_id: str, user: ConsoleUser) -> Any:
    got = await runtime.engine.get_alert(alert_id, user.company)
    if got is None:
        raise HTTPException(404, "alert not found")
    return got


async def _targets(runtime: Runtime, company: str) -> dict[str, list[str]]:
    return {
        "recipients": [r.id for r in await crud.list_recipients(runtime.db, company)],
        "groups": [g.name for g in await crud.list_groups(runtime.db, company)],
        "schedules": [s.name for s in await crud.list_schedules(runtime.db, company)],
    }


async def _render_alert(
    request: Request,
    user: ConsoleUser,
    alert_id: str,
    *,
    done: str | None = None,
    error: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    runtime = runtime_of(request)
    alert, attempts = await _alert_or_404(runtime, alert_id, user)
    timeline = build_timeline(alert_id, runtime.audit.read(user.company, alert_id=alert_id))
    steps = len(alert.plan.get("steps", []))
    chain = alert.chain or {}
    open_ = alert.state == AlertState.TRIGGERED.value
    return render(request, "console/alert.html", {
        "nav": "alerts", "alert": alert, "attempts": attempts, "timeline": timeline.entries,
        "steps": steps, **_last_fired(chain, steps),
        "next_step_at": await _next_step_at(runtime, alert_id) if open_ else None,
        "is_open": open_, "has_recording": recording_of(runtime, alert) is not None,
        "targets": await _targets(runtime, user.company), "done": done, "error": error,
        "details": {k: v for k, v in alert.details.items() if k != "recording"},
    }, user, status_code=status_code)  # fmt: skip


def _last_fired(chain: dict[str, Any], steps: int) -> dict[str, int]:
    """The step (1-based) and round last paged: the chain stores the next ones, which
    wrap to step 0 of the next round after a round's last step."""
    next_step, next_round = int(chain.get("next_step", 0)), int(chain.get("next_round", 0))
    if next_step == 0:
        return {"step": steps if next_round else 0, "round": max(next_round, 1)}
    return {"step": next_step, "round": next_round + 1}


@router.get("/console/alerts/{alert_id}", response_class=HTMLResponse)
async def alert_page(
    request: Request, alert_id: str, user: ConsoleUserDep, done: str | None = None
) -> HTMLResponse:
    return await _render_alert(request, user, alert_id, done=done)


@router.get("/console/alerts/{alert_id}/recording", response_class=FileResponse)
async def alert_recording(request: Request, alert_id: str, user: ConsoleUserDep) -> FileResponse:
    """The hotline caller's message, for the page's <audio> element (signed in only)."""
    runtime = runtime_of(request)
    alert, _ = await _alert_or_404(runtime, alert_id, user)
    return recording_response(runtime, alert)


def _back_to(alert_id: str, done: str) -> RedirectResponse:
    return RedirectResponse(f"/console/alerts/{alert_id}?done={done}", 303)


async def _close(request: Request, alert_id: str, user: ConsoleUser, state: AlertState) -> Response:
    runtime = runtime_of(request)
    alert = await runtime.engine.close(alert_id, state, _ack_context(request, user),
                                       company=user.company, reason="console")  # fmt: skip
    if alert is None:
        raise HTTPException(404, "alert not found")
    if alert.state != state.value:
        return await _render_alert(request, user, alert_id, status_code=409,
                                   error=f"Not changed: the alert is {alert.state}.")  # fmt: skip
    return _back_to(alert_id, state.value)


@router.post("/console/alerts/{alert_id}/ack")
async def ack(request: Request, alert_id: str, user: Responder) -> Response:
    return await _close(request, alert_id, user, AlertState.ACKNOWLEDGED)


@router.post("/console/alerts/{alert_id}/resolve")
async def resolve(request: Request, alert_id: str, user: Responder) -> Response:
    return await _close(request, alert_id, user, AlertState.RESOLVED)


@router.post("/console/alerts/{alert_id}/escalate")
async def escalate(request: Request, alert_id: str, user: Responder) -> Response:
    runtime = runtime_of(request)
    try:
        alert = await runtime.engine.escalate(alert_id, audit_context(request, user),
                                              company=user.company)  # fmt: skip
    except AlertClosed as exc:
        return await _render_alert(request, user, alert_id, status_code=409,
                                   error=f"Not escalated: the alert is {exc.args[0]}.")  # fmt: skip
    if alert is None:
        raise HTTPException(404, "alert not found")
    return _back_to(alert_id, "escalated")


class TargetKind(enum.StrEnum):
    RECIPIENT = "recipient"
    GROUP = "group"
    SCHEDULE = "schedule"


async def _oncall_now(runtime: Runtime, company: str, schedule: str) -> list[str]:
    """Who the schedule has on call now: reassigning to a schedule pages them."""
    found = {s.name: s for s in await crud.list_schedules(runtime.db, company)}
    if schedule not in found:
        raise BadTarget(f"unknown schedule {schedule!r}")
    overrides = await crud.list_overrides(runtime.db, company, schedule)
    return list(oncall(found[schedule], overrides, utcnow()).recipients)


@router.post("/console/alerts/{alert_id}/reassign")
async def reassign(
    request: Request,
    alert_id: str,
    user: Responder,
    target: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """`target` is "recipient:<id>", "group:<name>" or "schedule:<name>" (whoever it
    has on call now)."""
    runtime = runtime_of(request)
    kind_text, _, name = target.partition(":")
    recipients: list[str] = []
    groups: list[str] = []
    try:
        kind = TargetKind(kind_text)
        if not name:
            raise ValueError
        if kind is TargetKind.RECIPIENT:
            recipients = [name]
        elif kind is TargetKind.GROUP:
            groups = [name]
        else:
            recipients = await _oncall_now(runtime, user.company, name)
            if not recipients:
                raise BadTarget(f"nobody is on call for {name} now")
        alert = await runtime.engine.reassign(alert_id, recipients, groups,
                                              audit_context(request, user),
                                              company=user.company)  # fmt: skip
    except ValueError as exc:  # BadTarget is one; so is an unknown kind
        message = str(exc) or "choose who takes the alert over"
        return await _render_alert(request, user, alert_id, status_code=422,
                                   error=f"Not reassigned: {message}.")  # fmt: skip
    except AlertClosed as exc:
        closed = f"Not reassigned: the alert is {exc.args[0]}."
        return await _render_alert(request, user, alert_id, status_code=409, error=closed)
    if alert is None:
        raise HTTPException(404, "alert not found")
    return _back_to(alert_id, "reassigned")


# ------------------------------------------------------------------ users (admins)


class UserAction(enum.StrEnum):
    ROLE = "role"
    RECIPIENT = "recipient"
    DISABLE = "disable"
    ENABLE = "enable"
    PASSWORD = "password"


async def _users_page(
    request: Request,
    user: ConsoleUser,
    *,
    errors: dict[str, str] | None = None,
    form: dict[str, str] | None = None,
    done: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    runtime = runtime_of(request)
    return render(request, "console/users.html", {
        "nav": "users", "users": await list_users(runtime.db, user.company),
        "recipients": [r.id for r in await crud.list_recipients(runtime.db, user.company)],
        "roles": list(Role), "errors": errors or {}, "form": form or {}, "done": done,
    }, user, status_code=status_code)  # fmt: skip


@router.get("/console/users", response_class=HTMLResponse)
async def users_page(request: Request, user: Admin, done: str | None = None) -> HTMLResponse:
    return await _users_page(request, user, done=done)


def _audit_user(request: Request, admin: ConsoleUser, event: str, username: str,
                **extra: Any) -> None:  # fmt: skip
    ctx = audit_context(request, admin)
    runtime_of(request).audit.write(admin.company, [{
        "event": event, "status": "ok", "actor": ctx.actor, "ip": ctx.ip,
        "request_id": ctx.request_id, "user": username, **extra,
    }])  # fmt: skip


@router.post("/console/users")
async def add_user_route(
    request: Request,
    user: Admin,
    username: Annotated[str, Form(max_length=200)] = "",
    password: Annotated[str, Form(max_length=2000)] = "",
    role: Annotated[str, Form(max_length=20)] = "",
    recipient: Annotated[str, Form(max_length=64)] = "",
) -> Response:
    form = {"username": username, "role": role, "recipient": recipient}
    try:
        chosen = Role(role)
    except ValueError:
        return await _users_page(request, user, errors={"new.role": "choose a role"}, form=form,
                                 status_code=422)  # fmt: skip
    try:
        added = await add_user(runtime_of(request).db, user.company, username, password, chosen,
                               user.actor, recipient or None)  # fmt: skip
    except UserError as exc:
        return await _users_page(request, user, errors={f"new.{exc.field}": exc.message},
                                 form=form, status_code=422)  # fmt: skip
    _audit_user(request, user, "user_added", added.username, role=added.role.value,
                recipient_id=added.recipient_id)  # fmt: skip
    return RedirectResponse(f"/console/users?done=added:{added.username}", 303)


@router.post("/console/users/{username}")
async def change_user(
    request: Request,
    username: str,
    user: Admin,
    action: Annotated[UserAction, Form()],
    role: Annotated[str, Form(max_length=20)] = "",
    recipient: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """One change to a user of the admin's company; a new role or password, or disabling,
    signs them out everywhere."""
    db = runtime_of(request).db
    changes: dict[str, Any] = {}
    try:
        match action:
            case UserAction.ROLE:
                try:
                    changes["role"] = Role(role)
                except ValueError:
                    raise UserError("role", "choose a role") from None
                if username == user.username and changes["role"] is not Role.ADMIN:
                    raise UserError("role", "you cannot take away your own admin role")
            case UserAction.RECIPIENT:
                changes["recipient_id"] = recipient or None
            case UserAction.DISABLE:
                if username == user.username:
                    raise UserError("disabled", "you cannot disable yourself")
                changes["disabled"] = True
            case UserAction.ENABLE:
                changes["disabled"] = False
            case UserAction.PASSWORD:
                changes["password"] = password
            case _:
                typing.assert_never(action)
        changed = await update_user(db, username, user.actor, company=user.company,
                                    recipient_id=changes.pop("recipient_id", Keep.KEEP),
                                    **changes)  # fmt: skip
    except UserError as exc:
        return await _users_page(request, user, errors={f"{username}.{exc.field}": exc.message},
                                 status_code=422)  # fmt: skip
    if changed is None:
        raise HTTPException(404, "no such user")
    detail = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in changes.items()
              if k != "password"}  # fmt: skip
    _audit_user(request, user, f"user_{action.value}", changed.username, **detail)
    return RedirectResponse(f"/console/users?done={action.value}:{changed.username}", 303)
