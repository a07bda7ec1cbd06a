"""The public status page, no login: `/status` (HTML), `/status/summary.json`,
`/status/feed.atom` and `/status/badge/{component}.svg`.

Only public facts are shown: component names and states, uptime, and what the operator
wrote in incidents and maintenance windows. No alert, person, number or trunk host.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from xml.etree import ElementTree as ET

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response

from api import web
from api.deps import Runtime
from api.status_sampler import (
    ComponentStatus,
    Sampler,
    StatusCollector,
    components_for,
    operator_company,
)
from escalation.audit_records import RequestContext
from escalation.status import (
    HISTORY_DAYS,
    ComponentState,
    DayBar,
    daily_bars,
    overall_state,
    uptime,
)
from escalation.status_subscribers import (
    RateLimited,
    StatusSubscriptions,
    SubscriberKind,
    SubscriptionError,
)
from escalation.statuspage import Incident, Maintenance, StatusService

__all__ = ["StatusPage", "router", "running_status_page"]

router = APIRouter(tags=["status page"])
HISTORY_CACHE = 60.0  # seconds (at most one interval) the bars are reused between views
ATOM = "http://www.w3.org/2005/Atom"


@dataclass
class StatusPage:
    """Everything the status page needs, on `app.state.status_page`."""

    service: StatusService
    collector: StatusCollector
    sampler: Sampler
    public_url: str | None = None
    subscriptions: StatusSubscriptions | None = None  # needs ACKLINE_PUBLIC_URL, _ACK_SECRET
    _history: tuple[float, dict[str, list[DayBar]]] | None = field(default=None, repr=False)

    async def history(self) -> dict[str, list[DayBar]]:
        """The 90 daily bars of every component, from the stored samples."""
        now = time.monotonic()
        keep = min(HISTORY_CACHE, self.sampler.interval)
        if self._history is not None and now - self._history[0] < keep:
            return self._history[1]
        today = self.service.clock().date()
        totals = await self.service.day_totals(today - timedelta(days=HISTORY_DAYS - 1))
        bars = {c.id: daily_bars(totals.get(c.id, {}), today)
                for c in self.collector.components}  # fmt: skip
        self._history = (now, bars)
        return bars

    def forget_history(self) -> None:
        self._history = None

    def unknown_components(self, ids: Sequence[str]) -> list[str]:
        """Of `ids`, those that are not a component of this page (API and console)."""
        return [c for c in ids if self.collector.component(c) is None]


@contextlib.asynccontextmanager
async def running_status_page(
    app: FastAPI, runtime: Runtime, channels: Mapping[str, Any]
) -> AsyncIterator[StatusPage]:
    """Build the page's objects for `app` and sample while it runs; subscribers are told
    through `channels` (the ones this process was given)."""
    settings = runtime.settings
    service = StatusService(runtime.db, runtime.audit, operator_company(settings, runtime.config))
    collector = StatusCollector(runtime, service, components_for(settings, runtime.config),
                                app_state=app.state,
                                cache_for=min(5.0, settings.status_sample_interval))  # fmt: skip
    sampler = Sampler(collector, settings.status_sample_interval,
                      auto_incidents=settings.status_auto_incidents)  # fmt: skip
    subscriptions = None
    if settings.public_url and settings.ack_secret:
        subscriptions = StatusSubscriptions(service, channels, secret=settings.ack_secret,
                                            public_url=settings.public_url)  # fmt: skip
    page = StatusPage(service, collector, sampler, settings.public_url, subscriptions)
    app.state.status_page = page
    stop = asyncio.Event()
    task = asyncio.create_task(sampler.run(stop), name="status-sampler")
    try:
        yield page
    finally:
        stop.set()
        await task
        if subscriptions is not None:
            await subscriptions.aclose()


def _page(request: Request) -> StatusPage:
    page: StatusPage | None = getattr(request.app.state, "status_page", None)
    if page is None:
        raise HTTPException(503, "the status page is starting")
    return page


def _base_url(page: StatusPage, request: Request) -> str:
    return (page.public_url or str(request.base_url)).rstrip("/")


@dataclass(frozen=True)
class ComponentView:
    id: str
    name: str
    state: ComponentState | None
    bars: Sequence[DayBar]
    uptime: float | None

    @property
    def state_label(self) -> str:
        return self.state.label if self.state is not None else "No data"


@dataclass(frozen=True)
class PageData:
    company: str
    now: datetime
    overall: ComponentState
    components: list[ComponentView]
    active: list[Incident]
    history: list[Incident]
    maintenances: list[Maintenance]


async def page_data(page: StatusPage) -> PageData:
    statuses: list[ComponentStatus] = await page.collector.current()
    bars = await page.history()
    incidents = await page.service.incidents(limit=50)
    maintenances = await page.service.maintenances(current_only=True)
    components = [
        ComponentView(s.component.id, s.component.name, s.state, bars[s.component.id],
                      uptime(bars[s.component.id]))
        for s in statuses
    ]  # fmt: skip
    return PageData(
        company=page.service.company,
        now=page.service.clock(),
        overall=overall_state(s.state for s in statuses),
        components=components,
        active=[i for i in incidents if not i.resolved],
        history=[i for i in incidents if i.resolved],
        maintenances=maintenances,
    )


def percent(value: float | None) -> str:
    """99.95%, never rounded up to 100% while anything was down."""
    if value is None:
        return "no data"
    if value >= 1.0:
        return "100%"
    return f"{min(value * 100, 99.99):.2f}%"


def banner_text(state: ComponentState) -> str:
    return {
        ComponentState.OPERATIONAL: "All systems operational",
        ComponentState.MAINTENANCE: "Scheduled maintenance in progress",
        ComponentState.DEGRADED: "Some systems are degraded",
        ComponentState.PARTIAL_OUTAGE: "Partial outage",
        ComponentState.MAJOR_OUTAGE: "Major outage",
    }[state]


def bar_title(bar: DayBar) -> str:
    day = bar.day.isoformat()
    if not bar.has_data:
        return f"{day}: no data"
    worst = bar.worst.label if bar.worst is not None else ""
    return f"{day}: {percent(bar.uptime)} up, worst {worst.lower()}"


def when(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M UTC")


web.templates.env.filters["percent"] = percent
web.templates.env.filters["when"] = when
web.templates.env.globals["bar_title"] = bar_title
web.templates.env.globals["banner_text"] = banner_text


@router.get("/status", response_class=HTMLResponse, include_in_schema=False)
async def status_html(request: Request) -> Response:
    page = _page(request)
    data = await page_data(page)
    offered = page.subscriptions.offered() if page.subscriptions else []
    form_kinds = [k for k in (SubscriberKind.EMAIL, SubscriberKind.WEBHOOK) if k in offered]
    context: dict[str, Any] = {"data": data, "form_kinds": form_kinds}
    return _html(request, "status/page.html", context)


def _html(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    response = web.templates.TemplateResponse(request, template, context, status_code=status)
    response.headers.update(web.SECURITY_HEADERS)
    response.headers["Cache-Control"] = "no-cache"
    return response


def _message(request: Request, title: str, text: str, status: int = 200,
             action: str | None = None, button: str = "") -> Response:  # fmt: skip
    context = {"title": title, "text": text, "action": action, "button": button}
    return _html(request, "status/message.html", context, status)


def _who(request: Request) -> tuple[RequestContext, str]:
    ip = request.client.host if request.client else None
    rid = getattr(request.state, "request_id", None)
    return RequestContext("status:public", ip, rid), f"ip:{ip}"


@router.post("/status/subscribe", include_in_schema=False)
async def status_subscribe(request: Request) -> Response:
    """The page's form (email or webhook): both confirm before anything else is sent."""
    page = _page(request)
    form = await request.form()
    kind_text, address = str(form.get("kind", "")), str(form.get("address", ""))
    if page.subscriptions is None or kind_text not in {"email", "webhook"}:
        return _message(request, "Not available", "These subscriptions are not offered.", 404)
    by, source = _who(request)
    try:
        await page.subscriptions.subscribe(SubscriberKind(kind_text), address, by=by,
                                           source=source)  # fmt: skip
    except SubscriptionError as exc:
        return _message(request, "Please check the address", str(exc).capitalize() + ".", 422)
    except RateLimited:
        return _message(request, "Too many requests", "Please try again in a few minutes.", 429)
    where = "your inbox" if kind_text == "email" else "your endpoint's requests"
    text = f"Check {where} for a confirmation link: updates start once it is opened."
    return _message(request, "Almost done", text)


def _token_form(request: Request, token: str, path: str) -> str:
    from urllib.parse import quote

    return f"{path}?token={quote(token, safe='')}"


@router.get("/status/confirm", include_in_schema=False)
async def status_confirm_form(request: Request, token: str = "") -> Response:
    """A button, not the change itself: mail scanners open links."""
    return _message(request, "Confirm your subscription", "Press the button to start "
                    "receiving incident updates.", action=_token_form(request, token,
                    "/status/confirm"), button="Confirm subscription")  # fmt: skip


@router.post("/status/confirm", include_in_schema=False)
async def status_confirm(request: Request, token: str = "") -> Response:
    page = _page(request)
    found = None
    if page.subscriptions is not None and token:
        found = await page.subscriptions.confirm(token, by=_who(request)[0])
    if found is None:
        return _message(request, "Link not valid", "This confirmation link is not valid.", 404)
    return _message(request, "Subscribed", "You will receive incident updates.")


@router.get("/status/unsubscribe", include_in_schema=False)
async def status_unsubscribe_form(request: Request, token: str = "") -> Response:
    return _message(request, "Unsubscribe", "Press the button to stop incident updates.",
                    action=_token_form(request, token, "/status/unsubscribe"),
                    button="Unsubscribe")  # fmt: skip


@router.post("/status/unsubscribe", include_in_schema=False)
async def status_unsubscribe(request: Request, token: str = "") -> Response:
    """Also the RFC 8058 one-click target: a POST with `List-Unsubscribe=One-Click`."""
    page = _page(request)
    done = page.subscriptions is not None and token != "" and await page.subscriptions.unsubscribe(
        token, by=_who(request)[0])  # fmt: skip
    if not done:
        return _message(request, "Link not valid", "This unsubscribe link is not valid.", 404)
    return _message(request, "Unsubscribed", "You will not receive incident updates any more.")


def incident_json(incident: Incident) -> dict[str, Any]:
    return {
        "id": incident.id,
        "title": incident.title,
        "status": incident.status.value,
        "impact": incident.impact.value,
        "components": list(incident.components),
        "created_at": incident.created_at.isoformat(),
        "updated_at": incident.updated_at.isoformat(),
        "resolved_at": incident.resolved_at.isoformat() if incident.resolved_at else None,
        "updates": [
            {"status": u.status.value, "body": u.body, "created_at": u.created_at.isoformat()}
            for u in incident.updates
        ],
    }


def maintenance_json(m: Maintenance, now: datetime) -> dict[str, Any]:
    return {
        "id": m.id,
        "title": m.title,
        "body": m.body,
        "status": m.status(now).value,
        "components": list(m.components),
        "starts_at": m.starts_at.isoformat(),
        "ends_at": m.ends_at.isoformat(),
    }


def summary(data: PageData, base: str) -> dict[str, Any]:
    return {
        "page": {"name": f"{data.company} status", "url": f"{base}/status",
                 "updated_at": data.now.isoformat()},
        "status": {"indicator": data.overall.value, "description": banner_text(data.overall)},
        "components": [
            {"id": c.id, "name": c.name, "status": c.state.value if c.state else None,
             "uptime_90d": round(c.uptime, 6) if c.uptime is not None else None}
            for c in data.components
        ],
        "incidents": [incident_json(i) for i in data.active],
        "scheduled_maintenances": [maintenance_json(m, data.now) for m in data.maintenances],
    }  # fmt: skip


@router.get("/status/summary.json", include_in_schema=False)
async def status_summary(request: Request) -> JSONResponse:
    page = _page(request)
    data = await page_data(page)
    return JSONResponse(summary(data, _base_url(page, request)),
                        headers={"Cache-Control": "no-cache",
                                 "Access-Control-Allow-Origin": "*"})  # fmt: skip


def _entry_id(base: str, incident: int, update: int) -> str:
    return uuid.uuid5(uuid.NAMESPACE_URL, f"{base}/status#incident-{incident}-{update}").urn


def atom_feed(company: str, base: str, incidents: Sequence[Incident], now: datetime) -> bytes:
    """One entry per incident update, newest first (RFC 4287)."""
    ET.register_namespace("", ATOM)

    def sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
        element = ET.SubElement(parent, f"{{{ATOM}}}{tag}", attrs)
        if text is not None:
            element.text = text
        return element

    entries = sorted(((i, u) for i in incidents for u in i.updates),
                     key=lambda pair: (pair[1].created_at, pair[1].id), reverse=True)  # fmt: skip
    feed = ET.Element(f"{{{ATOM}}}feed")
    sub(feed, "id", uuid.uuid5(uuid.NAMESPACE_URL, f"{base}/status").urn)
    sub(feed, "title", f"{company} status")
    sub(feed, "updated", (entries[0][1].created_at if entries else now).isoformat())
    sub(feed, "link", rel="self", type="application/atom+xml", href=f"{base}/status/feed.atom")
    sub(feed, "link", rel="alternate", type="text/html", href=f"{base}/status")
    author = sub(feed, "author")
    sub(author, "name", company)
    for incident, update in entries[:100]:
        entry = sub(feed, "entry")
        sub(entry, "id", _entry_id(base, incident.id, update.id))
        sub(entry, "title", f"{incident.title}: {update.status.value}")
        sub(entry, "updated", update.created_at.isoformat())
        sub(entry, "published", update.created_at.isoformat())
        sub(entry, "link", rel="alternate", type="text/html",
            href=f"{base}/status#incident-{incident.id}")  # fmt: skip
        sub(entry, "summary", update.body or update.status.value, type="text")
    body: bytes = ET.tostring(feed, encoding="utf-8", xml_declaration=True)
    return body


@router.get("/status/feed.atom", include_in_schema=False)
async def status_feed(request: Request) -> Response:
    page = _page(request)
    incidents = await page.service.incidents(limit=50)
    body = atom_feed(page.service.company, _base_url(page, request), incidents,
                     page.service.clock())  # fmt: skip
    return Response(body, media_type="application/atom+xml; charset=utf-8",
                    headers={"Cache-Control": "no-cache"})  # fmt: skip


_BADGE_COLOURS = {
    ComponentState.OPERATIONAL: "#13692f",
    ComponentState.DEGRADED: "#8a5300",
    ComponentState.PARTIAL_OUTAGE: "#b3261e",
    ComponentState.MAJOR_OUTAGE: "#b3261e",
    ComponentState.MAINTENANCE: "#4b4f9c",
}
_NO_DATA_COLOUR = "#4d5663"


def badge_svg(label: str, value: str, colour: str) -> str:
    """A flat two-part badge; text widths estimated at 7 px a character (Verdana 11)."""
    from html import escape

    left, right = 10 + 7 * len(label), 10 + 7 * len(value)
    width = left + right
    text = escape(f"{label}: {value}")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="20" role="img" '
        f'aria-label="{text}"><title>{text}</title>'
        f'<rect width="{left}" height="20" fill="#3b4452"/>'
        f'<rect x="{left}" width="{right}" height="20" fill="{colour}"/>'
        f'<g fill="#fff" font-family="Verdana,DejaVu Sans,sans-serif" font-size="11">'
        f'<text x="5" y="14">{escape(label)}</text>'
        f'<text x="{left + 5}" y="14">{escape(value)}</text></g></svg>'
    )


@router.get("/status/badge/{component}.svg", include_in_schema=False)
async def status_badge(component: str, request: Request) -> Response:
    page = _page(request)
    statuses = await page.collector.current()
    found = next((s for s in statuses if s.component.id == component), None)
    if found is None:
        raise HTTPException(404, f"no component {component!r}")
    value = found.state.label.lower() if found.state else "no data"
    colour = _BADGE_COLOURS[found.state] if found.state else _NO_DATA_COLOUR
    return Response(
        badge_svg(found.component.name, value, colour),
        media_type="image/svg+xml",
        headers={"Cache-Control": "max-age=60", "Content-Security-Policy": "default-src 'none'",
                 "X-Content-Type-Options": "nosniff"},
    )  # fmt: skip
