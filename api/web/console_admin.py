"""The console's admin pages: carrier trunks, and recipients, groups and policies.

Everyone signed in may look (a responder at 3 a.m. wants to see which trunk is down);
only admins change anything, and every change is CSRF-checked by `require_role`.
Nothing here is a second implementation: trunk changes and probes are the functions the
/v1/carriers routes call, configuration goes through `escalation.crud` with the pydantic
models of `escalation.config`, so the console accepts and refuses exactly what the API
and ackline.yaml do. Refusals are shown next to the field they are about.

Items the YAML file defines are marked: `ackline serve` writes the file's version back
at every start (`crud.sync_config`), so an edit made here lasts until the next restart.
The API accepts such edits, and so does the console, saying so next to the item.
"""

from __future__ import annotations

import enum
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, ValidationError

from api.deps import Runtime, runtime_of
from api.routes.carriers import (
    change_trunk,
    in_process_router,
    probe_trunk,
    reset_trunk,
    trunk_views,
)
from api.web.auth import (
    Admin,
    ConsoleUser,
    ConsoleUserDep,
    audit_context,
    render,
)
from carriers.store import TrunkChanges
from escalation import crud
from escalation.config import (
    CONTACT_FIELDS,
    KNOWN_CHANNELS,
    ConfigError,
    Group,
    Policy,
    Recipient,
)

__all__ = ["router"]

router = APIRouter(include_in_schema=False)


OVERRIDE_POLL_SECONDS = 2  # carriers.store.TrunkStore.watch: how soon workers apply a change
MAX_STEPS = 50  # Policy.steps' bound: the form never builds more
FORM_ERROR = "form"  # the key of an error that belongs to no single field


# ------------------------------------------------------------------ carriers


class TrunkAction(enum.StrEnum):
    ENABLE = "enable"
    DISABLE = "disable"
    ROTATION = "rotation"  # priority and weight
    RESET = "reset"
    TEST = "test"


async def _carriers_page(
    request: Request,
    user: ConsoleUser,
    *,
    done: str | None = None,
    errors: Mapping[str, str] | None = None,
    form: Mapping[str, str] | None = None,
    tested: Mapping[str, Any] | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    runtime = runtime_of(request)
    carriers = runtime.config.carriers
    trunks = await trunk_views(runtime, in_process_router(request)) if carriers else []
    return render(request, "console/admin_carriers.html", {
        "nav": "carriers", "carriers": carriers, "trunks": trunks, "done": done,
        "errors": errors or {}, "form": form or {}, "tested": tested or {},
        "poll_seconds": OVERRIDE_POLL_SECONDS,
    }, user, status_code=status_code)  # fmt: skip


@router.get("/console/carriers", response_class=HTMLResponse)
async def carriers_page(
    request: Request, user: ConsoleUserDep, done: str | None = None
) -> HTMLResponse:
    return await _carriers_page(request, user, done=done)


@router.post("/console/carriers/{name}")
async def change_carrier(
    request: Request,
    name: str,
    user: Admin,
    action: Annotated[TrunkAction, Form()],
    priority: Annotated[str, Form(max_length=20)] = "",
    weight: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    """One change to a trunk, as PATCH/DELETE/POST /v1/carriers/{name} make it."""
    runtime = runtime_of(request)
    ctx = audit_context(request, user)
    match action:
        case TrunkAction.ENABLE | TrunkAction.DISABLE:
            changes = TrunkChanges(enabled=action is TrunkAction.ENABLE)
        case TrunkAction.ROTATION:
            form = {f"{name}.priority": priority, f"{name}.weight": weight}
            try:
                changes = TrunkChanges.model_validate({"priority": priority, "weight": weight})
            except ValidationError as exc:
                errors = {f"{name}.{key}": text for key, text in _by_field(exc).items()}
                return await _carriers_page(request, user, errors=errors, form=form,
                                            status_code=422)  # fmt: skip
        case TrunkAction.RESET:
            await reset_trunk(runtime, name, ctx, user.company)
            return RedirectResponse(f"/console/carriers?done=reset:{name}#trunk-{name}", 303)
        case TrunkAction.TEST:
            try:
                result = await probe_trunk(runtime, name, in_process_router(request))
            except HTTPException as exc:
                if exc.status_code != 503:
                    raise
                result = {"trunk": name, "ok": None, "sip_code": None, "rtt_ms": None,
                          "detail": str(exc.detail)}  # fmt: skip
            return await _carriers_page(request, user, tested={name: result})
        case _:
            typing.assert_never(action)
    await change_trunk(runtime, name, changes, ctx, user.company)
    return RedirectResponse(f"/console/carriers?done={action.value}:{name}#trunk-{name}", 303)


# ------------------------------------------------------------------ validation errors


_PATH_PART = re.compile(r"\.?([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")


def _loc_of(line: str, where: str) -> tuple[tuple[str | int, ...], str]:
    """A `path: message` line of `escalation.config` (e.g. from `reference_errors`) as
    pydantic's (loc, message), the path relative to `where` ("policy", or "")."""
    path, sep, message = line.partition(": ")
    if not sep:
        return (), line
    if where and (path == where or path.startswith((f"{where}.", f"{where}["))):
        path = path[len(where) :]
    loc: list[str | int] = []
    for name, index in _PATH_PART.findall(path):
        loc.append(int(index) if index else name)
    return tuple(loc), message


def _merge(errors: dict[str, str], key: str, message: str) -> None:
    errors[key] = f"{errors[key]}; {message}" if key in errors else message


def _by_field(
    exc: ValidationError, key: typing.Callable[[tuple[str | int, ...]], str] | None = None
) -> dict[str, str]:
    """pydantic's errors by form field (the first part of the location, by default)."""
    errors: dict[str, str] = {}
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = key(loc) if key else (str(loc[0]) if loc else FORM_ERROR)
        _merge(errors, field, str(err["msg"]).removeprefix("Value error, "))
    return errors


def _config_errors(
    error: ConfigError, where: str, key: typing.Callable[[tuple[str | int, ...]], str]
) -> dict[str, str]:
    """A ConfigError of `escalation.crud` (references checked in the database) by field."""
    errors: dict[str, str] = {}
    for line in error.errors:
        loc, message = _loc_of(line, where)
        _merge(errors, key(loc) if loc else FORM_ERROR, message)
    return errors


# ------------------------------------------------------------------ YAML-defined items


class Source(enum.StrEnum):
    """Where an item the console lists comes from, as the page says it."""

    FILE = "file"  # defined in ackline.yaml, stored as the file says
    FILE_CHANGED = "file_changed"  # defined in ackline.yaml, changed since: a restart undoes it
    STORED = "stored"  # created through the API or the console: kept across restarts


class Kind(enum.StrEnum):
    RECIPIENT = "recipient"
    GROUP = "group"
    POLICY = "policy"


def _file_items(runtime: Runtime, company: str, kind: Kind) -> dict[str, BaseModel]:
    """What ackline.yaml defines of `kind` for this company (synced at every start)."""
    cfg = runtime.config
    if runtime.settings.config_path is None or cfg.company != company:
        return {}
    match kind:
        case Kind.RECIPIENT:
            return {r.id: r for r in cfg.recipients}
        case Kind.GROUP:
            return {g.name: g for g in cfg.groups}
        case Kind.POLICY:
            return {p.name: p for p in cfg.policies}
        case _:
            typing.assert_never(kind)


def _sources(
    runtime: Runtime, company: str, kind: Kind, stored: Mapping[str, BaseModel]
) -> dict[str, Source]:
    in_file = _file_items(runtime, company, kind)
    out = {}
    for key, item in stored.items():
        if key not in in_file:
            out[key] = Source.STORED
        elif _same(in_file[key], item):
            out[key] = Source.FILE
        else:
            out[key] = Source.FILE_CHANGED
    return out


def _same(a: BaseModel, b: BaseModel) -> bool:
    return a.model_dump(mode="json") == b.model_dump(mode="json")


def _audit_change(request: Request, user: ConsoleUser, kind: Kind, key: str, status: str) -> None:
    """Who created, changed or deleted which configuration item from the console, and
    from where."""
    ctx = audit_context(request, user)
    runtime_of(request).audit.write(user.company, [{
        "event": "config_changed", "status": status,
        "actor": ctx.actor, "ip": ctx.ip, "request_id": ctx.request_id,
        "kind": kind.value, "key": key,
    }])  # fmt: skip


def _list_page(kind: Kind) -> str:
    return {Kind.RECIPIENT: "recipients", Kind.GROUP: "groups", Kind.POLICY: "policies"}[kind]


def _saved(
    request: Request, user: ConsoleUser, kind: Kind, key: str, created: bool
) -> RedirectResponse:
    _audit_change(request, user, kind, key, "created" if created else "changed")
    verb = "created" if created else "saved"
    return RedirectResponse(
        f"/console/{_list_page(kind)}?done={verb}:{key}#{kind.value}-{key}", 303
    )


def _not_found(kind: Kind, key: str) -> HTTPException:
    return HTTPException(404, f"no {kind.value} {key!r}")


# ------------------------------------------------------------------ recipients

RECIPIENT_FIELDS = ("name", *CONTACT_FIELDS)
# Each contact field's label and hint on the pages (a test checks it covers CONTACT_FIELDS).
CONTACT_LABELS: Mapping[str, tuple[str, str]] = {
    "phone": ("Phone", "E.164, e.g. +14155550123"),
    "telegram_chat_id": ("Telegram chat id", "a number or @channel"),
    "email": ("Email", ""),
    "webhook_url": ("Webhook URL", "http(s)"),
    "slack_channel": ("Slack channel or user id", "C0123ABCD, not #name"),
}


async def _recipients(runtime: Runtime, company: str) -> dict[str, Recipient]:
    return {r.id: r for r in await crud.list_recipients(runtime.db, company)}


@router.get("/console/recipients", response_class=HTMLResponse)
async def recipients_page(
    request: Request, user: ConsoleUserDep, done: str | None = None
) -> HTMLResponse:
    return await _recipients_page(request, user, done)


async def _recipients_page(
    request: Request, user: ConsoleUser, done: str | None, refused: str | None = None
) -> HTMLResponse:
    runtime = runtime_of(request)
    found = await _recipients(runtime, user.company)
    return render(request, "console/admin_recipients.html", {
        "nav": "recipients", "recipients": list(found.values()), "done": done,
        "refused": refused, "contact_labels": CONTACT_LABELS,
        "sources": _sources(runtime, user.company, Kind.RECIPIENT, found), "Source": Source,
    }, user, status_code=409 if refused else 200)  # fmt: skip


async def _recipient_form(
    request: Request,
    user: ConsoleUser,
    key: str | None,
    form: Mapping[str, str],
    errors: Mapping[str, str] | None = None,
) -> HTMLResponse:
    runtime = runtime_of(request)
    return render(request, "console/admin_recipient.html", {
        "nav": "recipients", "key": key, "form": form, "errors": errors or {},
        "contact_labels": CONTACT_LABELS,
        "in_file": key is not None and key in _file_items(runtime, user.company, Kind.RECIPIENT),
    }, user, status_code=422 if errors else 200)  # fmt: skip


@router.get("/console/recipients/new", response_class=HTMLResponse)
async def new_recipient_page(request: Request, user: Admin) -> HTMLResponse:
    return await _recipient_form(request, user, None, {})


@router.get("/console/recipients/{rid}/edit", response_class=HTMLResponse)
async def recipient_page(request: Request, rid: str, user: Admin) -> HTMLResponse:
    found = (await _recipients(runtime_of(request), user.company)).get(rid)
    if found is None:
        raise _not_found(Kind.RECIPIENT, rid)
    form = {f: getattr(found, f) or "" for f in RECIPIENT_FIELDS}
    return await _recipient_form(request, user, rid, {"id": rid, **form})


async def _save_recipient(
    request: Request, user: ConsoleUser, key: str | None, form: dict[str, str]
) -> Response:
    """Validate as the API does (the Recipient model) and store through escalation.crud."""
    runtime = runtime_of(request)
    rid = key or form["id"]
    existing = await _recipients(runtime, user.company)
    if key is not None and key not in existing:
        raise _not_found(Kind.RECIPIENT, key)
    if key is None and rid in existing:
        taken = {"id": f"recipient {rid!r} exists; edit it instead"}
        return await _recipient_form(request, user, None, form, taken)
    data = {"id": rid, **{f: form[f].strip() or None for f in RECIPIENT_FIELDS}}
    data["name"] = form["name"].strip()
    try:
        recipient = Recipient.model_validate(data)
    except ValidationError as exc:
        return await _recipient_form(request, user, key, form, _by_field(exc))
    await crud.put_recipient(runtime.db, user.company, recipient)
    return _saved(request, user, Kind.RECIPIENT, rid, key is None)


async def _recipient_form_fields(request: Request) -> dict[str, str]:
    """The recipient form's text fields, bounded in length."""
    form = await request.form()
    values = {}
    for f in ("id", *RECIPIENT_FIELDS):
        raw = form.get(f, "")
        values[f] = raw[:500] if isinstance(raw, str) else ""
    values["id"] = values["id"].strip()
    return values


RecipientFields = Annotated[dict[str, str], Depends(_recipient_form_fields)]


@router.post("/console/recipients")
async def create_recipient(request: Request, user: Admin, form: RecipientFields) -> Response:
    return await _save_recipient(request, user, None, form)


@router.post("/console/recipients/{rid}/edit")
async def edit_recipient(
    request: Request, rid: str, user: Admin, form: RecipientFields
) -> Response:
    return await _save_recipient(request, user, rid, form)


# ------------------------------------------------------------------ groups


@router.get("/console/groups", response_class=HTMLResponse)
async def groups_page(
    request: Request, user: ConsoleUserDep, done: str | None = None
) -> HTMLResponse:
    return await _groups_page(request, user, done)


async def _groups_page(
    request: Request, user: ConsoleUser, done: str | None, refused: str | None = None
) -> HTMLResponse:
    runtime = runtime_of(request)
    found = {g.name: g for g in await crud.list_groups(runtime.db, user.company)}
    return render(request, "console/admin_groups.html", {
        "nav": "groups", "groups": list(found.values()), "done": done, "refused": refused,
        "sources": _sources(runtime, user.company, Kind.GROUP, found), "Source": Source,
    }, user, status_code=409 if refused else 200)  # fmt: skip


async def _group_form(
    request: Request,
    user: ConsoleUser,
    key: str | None,
    name: str,
    members: Sequence[str],
    errors: Mapping[str, str] | None = None,
) -> HTMLResponse:
    runtime = runtime_of(request)
    known = list(await _recipients(runtime, user.company))
    choices = known + [m for m in members if m not in known]  # a stale member stays visible
    return render(request, "console/admin_group.html", {
        "nav": "groups", "key": key, "name": name, "members": list(members),
        "choices": choices, "errors": errors or {},
        "in_file": key is not None and key in _file_items(runtime, user.company, Kind.GROUP),
    }, user, status_code=422 if errors else 200)  # fmt: skip


@router.get("/console/groups/new", response_class=HTMLResponse)
async def new_group_page(request: Request, user: Admin) -> HTMLResponse:
    return await _group_form(request, user, None, "", [])


@router.get("/console/groups/{name}/edit", response_class=HTMLResponse)
async def group_page(request: Request, name: str, user: Admin) -> HTMLResponse:
    groups = {g.name: g for g in await crud.list_groups(runtime_of(request).db, user.company)}
    if name not in groups:
        raise _not_found(Kind.GROUP, name)
    return await _group_form(request, user, name, name, groups[name].members)


def _group_key(loc: tuple[str | int, ...]) -> str:
    return str(loc[0]) if loc and loc[0] in ("name", "members") else FORM_ERROR


async def _save_group(request: Request, user: ConsoleUser, key: str | None) -> Response:
    runtime = runtime_of(request)
    form = await request.form()
    name = key or str(form.get("name", ""))[:200].strip()
    members = [m for m in form.getlist("members") if isinstance(m, str)][:1000]
    groups = {g.name for g in await crud.list_groups(runtime.db, user.company)}
    if key is not None and key not in groups:
        raise _not_found(Kind.GROUP, key)
    if key is None and name in groups:
        return await _group_form(request, user, None, name, members,
                                 {"name": f"group {name!r} exists; edit it instead"})  # fmt: skip
    try:
        group = Group.model_validate({"name": name, "members": members})
        await crud.put_group(runtime.db, user.company, group)
    except ValidationError as exc:
        return await _group_form(request, user, key, name, members, _by_field(exc, _group_key))
    except ConfigError as exc:
        errors = _config_errors(exc, "", _group_key)
        return await _group_form(request, user, key, name, members, errors)
    return _saved(request, user, Kind.GROUP, name, key is None)


@router.post("/console/groups")
async def create_group(request: Request, user: Admin) -> Response:
    return await _save_group(request, user, None)


@router.post("/console/groups/{name}/edit")
async def edit_group(request: Request, name: str, user: Admin) -> Response:
    return await _save_group(request, user, name)


# ------------------------------------------------------------------ policies

POLICY_FIELDS = ("name", "repeat", "max_duration", "max_notifications")
STEP_TARGETS = ("recipients", "groups", "schedules")
ADVANCED_KEYS = ("retry", "voice")  # edited as YAML: nested maps a form would only obscure


def duration_text(seconds: float) -> str:
    """Seconds as ackline.yaml writes them ("10m", "1h30m", "45s"); parse_duration reads
    it back to the same number."""
    if seconds <= 0 or seconds != int(seconds):
        return f"{seconds:g}"
    left, out = int(seconds), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            out += f"{left // size}{unit}"
            left %= size
    return out


def _names(text: str) -> list[str]:
    """A comma- or space-separated list as typed into a field."""
    return [n for n in re.split(r"[,\s]+", text.strip()) if n]


@dataclass
class PolicyForm:
    """The policy form as typed: what is shown back, unchanged, beside its errors."""

    fields: dict[str, str]
    steps: list[dict[str, Any]]
    advanced: str

    @classmethod
    def of(cls, policy: Policy) -> PolicyForm:
        fields = {"name": policy.name, "repeat": str(policy.repeat),
                  "max_duration": duration_text(policy.max_duration),
                  "max_notifications": str(policy.max_notifications)}  # fmt: skip
        steps = [{**{t: ", ".join(getattr(s, t)) for t in STEP_TARGETS},
                  "channels": list(s.channels), "delay": duration_text(s.delay)}
                 for s in policy.steps]  # fmt: skip
        extra = policy.model_dump(mode="json", include=set(ADVANCED_KEYS), exclude_none=True)
        extra = {k: v for k, v in extra.items() if v}
        advanced = yaml.safe_dump(extra, sort_keys=False) if extra else ""
        return cls(fields, steps, advanced)

    @classmethod
    def blank(cls) -> PolicyForm:
        return cls({"name": "", "repeat": "0", "max_duration": "4h",
                    "max_notifications": "100"}, [], "")  # fmt: skip

    @classmethod
    async def read(cls, request: Request) -> PolicyForm:
        form = await request.form()

        def text(name: str, limit: int = 2000) -> str:
            raw = form.get(name, "")
            return raw[:limit] if isinstance(raw, str) else ""

        try:
            count = min(MAX_STEPS + 1, max(0, int(text("step_count", 4))))
        except ValueError:
            count = 0
        steps = []
        for i in range(count):
            channels = [c for c in form.getlist(f"steps-{i}-channels") if isinstance(c, str)]
            steps.append({**{t: text(f"steps-{i}-{t}") for t in STEP_TARGETS},
                          "channels": channels[: len(KNOWN_CHANNELS) + 1],
                          "delay": text(f"steps-{i}-delay", 50)})  # fmt: skip
        fields = {f: text(f, 200) for f in POLICY_FIELDS}
        return cls(fields, steps, text("advanced", 20_000))

    def with_blank_step(self) -> list[dict[str, Any]]:
        """The steps and one empty row to add a step with (an empty row is ignored)."""
        steps = list(self.steps)
        while steps and _empty_step(steps[-1]):  # the empty row sent back with the form
            steps.pop()
        blank = {**dict.fromkeys(STEP_TARGETS, ""), "channels": [], "delay": "5m"}
        return [*steps, blank] if len(steps) < MAX_STEPS else steps


def _empty_step(step: Mapping[str, Any]) -> bool:
    return not any(step[t].strip() for t in STEP_TARGETS) and not step["channels"]


def _policy_key(rows: Sequence[int]) -> typing.Callable[[tuple[str | int, ...]], str]:
    """An error's location as the form field showing it: `rows` maps the policy's step
    index to the form's row (empty rows are left out of the policy)."""

    def key(loc: tuple[str | int, ...]) -> str:
        head = loc[0] if loc else None
        if head in ADVANCED_KEYS:
            return "advanced"
        if head == "steps":
            if len(loc) > 1 and isinstance(loc[1], int) and loc[1] < len(rows):
                row = rows[loc[1]]
                if len(loc) > 2 and loc[2] in (*STEP_TARGETS, "channels", "delay"):
                    return f"steps.{row}.{loc[2]}"
                return f"steps.{row}"
            return "steps"
        return str(head) if head in POLICY_FIELDS else FORM_ERROR

    return key


def _policy_data(form: PolicyForm, name: str) -> tuple[dict[str, Any], list[int], dict[str, str]]:
    """The policy as the API's JSON would give it, the form row of each step, and the
    errors found before validation (the advanced YAML does not parse)."""
    rows = [i for i, s in enumerate(form.steps) if not _empty_step(s)]
    steps = []
    for i in rows:
        s = form.steps[i]
        step: dict[str, Any] = {t: _names(s[t]) for t in STEP_TARGETS}
        step["channels"] = list(s["channels"])
        if s["delay"].strip():
            step["delay"] = s["delay"].strip()
        steps.append(step)
    data: dict[str, Any] = {"name": name, "steps": steps}
    for f in ("repeat", "max_duration", "max_notifications"):
        data[f] = form.fields[f].strip()
    errors: dict[str, str] = {}
    try:
        extra = yaml.safe_load(form.advanced) if form.advanced.strip() else {}
    except yaml.YAMLError as exc:
        extra = {}
        errors["advanced"] = f"not YAML: {str(exc).splitlines()[0]}"
    if not isinstance(extra, dict) or set(extra) - set(ADVANCED_KEYS):
        errors["advanced"] = f"only {' and '.join(ADVANCED_KEYS)} may be set here"
        extra = {}
    data.update(extra)
    return data, rows, errors


async def _policies(runtime: Runtime, company: str) -> dict[str, Policy]:
    return {p.name: p for p in await crud.list_policies(runtime.db, company)}


@router.get("/console/policies", response_class=HTMLResponse)
async def policies_page(
    request: Request, user: ConsoleUserDep, done: str | None = None
) -> HTMLResponse:
    return await _policies_page(request, user, done)


async def _policies_page(
    request: Request, user: ConsoleUser, done: str | None, refused: str | None = None
) -> HTMLResponse:
    runtime = runtime_of(request)
    found = await _policies(runtime, user.company)
    return render(request, "console/admin_policies.html", {
        "nav": "policies", "policies": list(found.values()), "done": done, "refused": refused,
        "sources": _sources(runtime, user.company, Kind.POLICY, found), "Source": Source,
        "duration_text": duration_text,
    }, user, status_code=409 if refused else 200)  # fmt: skip


async def _policy_form(
    request: Request,
    user: ConsoleUser,
    key: str | None,
    form: PolicyForm,
    errors: Mapping[str, str] | None = None,
) -> HTMLResponse:
    runtime = runtime_of(request)
    return render(request, "console/admin_policy.html", {
        "nav": "policies", "key": key, "fields": form.fields, "steps": form.with_blank_step(),
        "advanced": form.advanced, "channels": KNOWN_CHANNELS, "errors": errors or {},
        "in_file": key is not None and key in _file_items(runtime, user.company, Kind.POLICY),
    }, user, status_code=422 if errors else 200)  # fmt: skip


@router.get("/console/policies/new", response_class=HTMLResponse)
async def new_policy_page(request: Request, user: Admin) -> HTMLResponse:
    return await _policy_form(request, user, None, PolicyForm.blank())


@router.get("/console/policies/{name}/edit", response_class=HTMLResponse)
async def policy_page(request: Request, name: str, user: Admin) -> HTMLResponse:
    found = (await _policies(runtime_of(request), user.company)).get(name)
    if found is None:
        raise _not_found(Kind.POLICY, name)
    return await _policy_form(request, user, name, PolicyForm.of(found))


async def _save_policy(request: Request, user: ConsoleUser, key: str | None) -> Response:
    """Validate with the Policy model, then `crud.put_policy` checks references in the
    database (recipients, groups, schedules, fallback cycles) as PUT /v1/policies does."""
    runtime = runtime_of(request)
    form = await PolicyForm.read(request)
    name = key or form.fields["name"].strip()
    existing = await _policies(runtime, user.company)
    if key is not None and key not in existing:
        raise _not_found(Kind.POLICY, key)
    if key is None and name in existing:
        return await _policy_form(request, user, None, form,
                                  {"name": f"policy {name!r} exists; edit it instead"})  # fmt: skip
    data, rows, errors = _policy_data(form, name)
    if errors:
        return await _policy_form(request, user, key, form, errors)
    field = _policy_key(rows)
    try:
        policy = Policy.model_validate(data)
        await crud.put_policy(runtime.db, user.company, policy, runtime.config.channel_defaults)
    except ValidationError as exc:
        return await _policy_form(request, user, key, form, _by_field(exc, field))
    except ConfigError as exc:
        return await _policy_form(request, user, key, form, _config_errors(exc, "policy", field))
    return _saved(request, user, Kind.POLICY, name, key is None)


@router.post("/console/policies")
async def create_policy(request: Request, user: Admin) -> Response:
    return await _save_policy(request, user, None)


@router.post("/console/policies/{name}/edit")
async def edit_policy(request: Request, name: str, user: Admin) -> Response:
    return await _save_policy(request, user, name)


# ------------------------------------------------------------------ deleting


async def _delete(request: Request, user: ConsoleUser, kind: Kind, key: str) -> Response:
    """Delete through escalation.crud, which refuses while a policy, group, schedule or
    integration still names the item; an item of ackline.yaml is refused too, as the next
    start would bring it back. A refusal changes nothing and says why on the list page."""
    runtime = runtime_of(request)
    refused: str | None = None
    if key in _file_items(runtime, user.company, kind):
        refused = (f"{kind.value} {key!r} is defined in ackline.yaml, and the next start "
                   "would bring it back: remove it from the file")  # fmt: skip
    else:
        try:
            if not await crud.delete(runtime.db, user.company, kind.value, key):
                raise _not_found(kind, key)
        except crud.Conflict as exc:
            refused = f"not deleted: {exc}"
    if refused is not None:
        match kind:
            case Kind.RECIPIENT:
                return await _recipients_page(request, user, None, refused)
            case Kind.GROUP:
                return await _groups_page(request, user, None, refused)
            case Kind.POLICY:
                return await _policies_page(request, user, None, refused)
            case _:
                typing.assert_never(kind)
    _audit_change(request, user, kind, key, "deleted")
    return RedirectResponse(f"/console/{_list_page(kind)}?done=deleted:{key}", 303)


@router.post("/console/recipients/{rid}/delete")
async def delete_recipient(request: Request, rid: str, user: Admin) -> Response:
    return await _delete(request, user, Kind.RECIPIENT, rid)


@router.post("/console/groups/{name}/delete")
async def delete_group(request: Request, name: str, user: Admin) -> Response:
    return await _delete(request, user, Kind.GROUP, name)


@router.post("/console/policies/{name}/delete")
async def delete_policy(request: Request, name: str, user: Admin) -> Response:
    return await _delete(request, user, Kind.POLICY, name)
