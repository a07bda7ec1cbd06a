"""On-call schedules and overrides: CRUD, who is on call, shifts, iCalendar feeds.

The same models and checks as ackline.yaml (escalation.schedules, escalation.crud); the
answers come from the pure `oncall` / `shifts`, so the API, the feeds and the engine
agree on who is on call.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response
from icalendar import Calendar, Event
from pydantic import BaseModel

from api.deps import RuntimeDep, TenantDep
from api.json_body import StrictJsonRoute
from api.routes.config import _ERRORS, _checked, _key_matches
from escalation import crud
from escalation.schedules import Override, Schedule, Shift, oncall, shifts

router = APIRouter(route_class=StrictJsonRoute, prefix="/v1", tags=["schedules"])

MAX_WINDOW = timedelta(days=90)  # one request's shifts; bounds the work it can ask for
FEED_PAST = timedelta(days=7)  # calendar feeds: a week back, the rest of the window ahead
ICS = "text/calendar; charset=utf-8"


class OnCallOut(BaseModel):
    schedule: str
    at: datetime
    recipients: list[str]
    layer: str | None
    override: Override | None


class ShiftOut(BaseModel):
    start: datetime
    end: datetime
    recipient: str | None  # None: nobody is on call
    layer: str | None
    override: Override | None

    @classmethod
    def of(cls, s: Shift) -> ShiftOut:
        return cls(
            start=s.start, end=s.end, recipient=s.recipient, layer=s.layer, override=s.override
        )


def _window(since: datetime, until: datetime) -> None:
    if since.tzinfo is None or until.tzinfo is None:
        raise HTTPException(422, "since and until need a UTC offset, e.g. 2026-03-01T00:00Z")
    if until <= since:
        raise HTTPException(422, "until must be after since")
    if until - since > MAX_WINDOW:
        raise HTTPException(422, f"the window is at most {MAX_WINDOW.days} days")


async def _view(
    runtime: RuntimeDep, tenant: TenantDep, name: str, since: datetime, until: datetime
) -> tuple[Schedule, list[Override]]:
    found = await crud.schedule_view(runtime.db, tenant.company, name, since, until)
    if found is None:
        raise HTTPException(404, "schedule not found")
    return found


def _calendar(name: str, entries: list[tuple[str, Shift]], now: datetime) -> Response:
    cal = Calendar()
    cal.add("prodid", "-//ackline//on-call//EN")
    cal.add("version", "2.0")
    cal.add("x-wr-calname", name)
    for schedule, s in entries:
        if s.recipient is None:
            continue
        event = Event()
        event.add("uid", f"{schedule}-{s.recipient}-{int(s.start.timestamp())}@ackline")
        event.add("dtstamp", now)
        event.add("dtstart", s.start)
        event.add("dtend", s.end)
        how = f"override {s.override.id}" if s.override else f"layer {s.layer}"
        event.add("summary", f"On call: {schedule} ({s.recipient})")
        event.add("description", f"{s.recipient} is on call for {schedule} ({how})")
        cal.add_component(event)
    return Response(cal.to_ical(), media_type=ICS)


# -- the feeds first: "/schedules/{name}" would take "payments.ics" as a name


@router.get("/schedules/{name}.ics", responses=_ERRORS, response_class=Response)
async def schedule_feed(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    """Everyone's shifts of one schedule, a week back and 83 days ahead."""
    now = runtime.engine.clock()
    since, until = now - FEED_PAST, now - FEED_PAST + MAX_WINDOW
    schedule, overrides = await _view(runtime, tenant, name, since, until)
    entries = [(name, s) for s in shifts(schedule, overrides, since, until)]
    return _calendar(name, entries, now)


@router.get("/recipients/{rid}/oncall.ics", responses=_ERRORS, response_class=Response)
async def recipient_feed(rid: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    """One person's shifts over every schedule, a week back and 83 days ahead."""
    if all(r.id != rid for r in await crud.list_recipients(runtime.db, tenant.company)):
        raise HTTPException(404, "recipient not found")
    now = runtime.engine.clock()
    since, until = now - FEED_PAST, now - FEED_PAST + MAX_WINDOW
    entries = []
    for schedule in await crud.list_schedules(runtime.db, tenant.company):
        overrides = await crud.list_overrides(
            runtime.db, tenant.company, schedule.name, since, until
        )
        entries += [
            (schedule.name, s)
            for s in shifts(schedule, overrides, since, until)
            if s.recipient == rid
        ]
    return _calendar(f"{rid} on call", sorted(entries, key=lambda e: e[1].start), now)


# -- schedules


@router.get("/schedules", response_model=list[Schedule])
async def list_schedules(runtime: RuntimeDep, tenant: TenantDep) -> list[Schedule]:
    return await crud.list_schedules(runtime.db, tenant.company)


@router.get("/schedules/{name}", response_model=Schedule, responses=_ERRORS)
async def get_schedule(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Schedule:
    for s in await crud.list_schedules(runtime.db, tenant.company):
        if s.name == name:
            return s
    raise HTTPException(404, "schedule not found")


async def _put_schedule(body: Schedule, runtime: RuntimeDep, tenant: TenantDep) -> Schedule:
    await _checked(lambda: crud.put_schedule(runtime.db, tenant.company, body))
    runtime.engine.invalidate_plans(tenant.company)  # plans keep the rota's contacts
    return body


@router.post("/schedules", status_code=201, response_model=Schedule, responses=_ERRORS)
async def create_schedule(body: Schedule, runtime: RuntimeDep, tenant: TenantDep) -> Schedule:
    if any(s.name == body.name for s in await crud.list_schedules(runtime.db, tenant.company)):
        raise HTTPException(409, f"schedule {body.name!r} exists; use PUT to replace it")
    return await _put_schedule(body, runtime, tenant)


@router.put("/schedules/{name}", response_model=Schedule, responses=_ERRORS)
async def put_schedule(
    name: str, body: Schedule, runtime: RuntimeDep, tenant: TenantDep
) -> Schedule:
    _key_matches(name, body.name)
    return await _put_schedule(body, runtime, tenant)


@router.delete("/schedules/{name}", status_code=204, responses=_ERRORS)
async def delete_schedule(name: str, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    if not await _checked(lambda: crud.delete(runtime.db, tenant.company, "schedule", name)):
        raise HTTPException(404, "schedule not found")
    return Response(status_code=204)


@router.get("/schedules/{name}/oncall", response_model=OnCallOut, responses=_ERRORS)
async def get_oncall(
    name: str,
    runtime: RuntimeDep,
    tenant: TenantDep,
    at: Annotated[datetime | None, Query(description="ISO 8601 with offset; default now")] = None,
) -> OnCallOut:
    at = runtime.engine.clock() if at is None else at
    if at.tzinfo is None:
        raise HTTPException(422, "at needs a UTC offset, e.g. 2026-03-01T09:00+01:00")
    schedule, overrides = await _view(runtime, tenant, name, at, at + timedelta(microseconds=1))
    got = oncall(schedule, overrides, at)
    return OnCallOut(
        schedule=name, at=at, recipients=list(got.recipients), layer=got.layer,
        override=got.override,
    )  # fmt: skip


@router.get("/schedules/{name}/shifts", response_model=list[ShiftOut], responses=_ERRORS)
async def get_shifts(
    name: str,
    runtime: RuntimeDep,
    tenant: TenantDep,
    since: Annotated[datetime, Query(description="ISO 8601 with offset")],
    until: Annotated[datetime, Query(description="ISO 8601 with offset; at most 90 days on")],
) -> list[ShiftOut]:
    """The window as contiguous shifts; where nobody is on call, recipient is null."""
    _window(since, until)
    schedule, overrides = await _view(runtime, tenant, name, since, until)
    return [ShiftOut.of(s) for s in shifts(schedule, overrides, since, until)]


# -- overrides


@router.get("/overrides", response_model=list[Override])
async def list_overrides(
    runtime: RuntimeDep,
    tenant: TenantDep,
    schedule: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Override]:
    """In creation order: where two overlap, the later one wins."""
    return await crud.list_overrides(runtime.db, tenant.company, schedule, since, until)


@router.post("/overrides", status_code=201, response_model=Override, responses=_ERRORS)
async def create_override(body: Override, runtime: RuntimeDep, tenant: TenantDep) -> Override:
    if body.id is not None:
        raise HTTPException(422, "id is given by the server")
    actor = f"api:{tenant.company}"
    stored: Override = await _checked(
        lambda: crud.add_override(runtime.db, tenant.company, body, actor)
    )
    runtime.engine.invalidate_plans(tenant.company)  # plans keep override recipients' contacts
    return stored


@router.delete("/overrides/{override_id}", status_code=204, responses=_ERRORS)
async def delete_override(override_id: int, runtime: RuntimeDep, tenant: TenantDep) -> Response:
    if not await crud.delete_override(runtime.db, tenant.company, override_id):
        raise HTTPException(404, "override not found")
    return Response(status_code=204)
