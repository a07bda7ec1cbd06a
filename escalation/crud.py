"""Recipients, groups, policies, schedules and overrides in the database, per company.

The YAML file and the API go through the same functions and the same validation
(`config.reference_errors`), so neither can store something the other would reject.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from escalation.config import (
    CONTACT_FIELDS,
    AcklineConfig,
    ConfigError,
    Group,
    Integration,
    IntegrationSettings,
    Policy,
    Recipient,
    RetryPolicy,
    integration_errors,
    override_errors,
    reference_errors,
    schedule_errors,
)
from escalation.schedules import Override, Schedule
from storage.db import Database
from storage.models import (
    GroupRow,
    IntegrationRow,
    PolicyRow,
    RecipientRow,
    ScheduleOverrideRow,
    ScheduleRow,
    utcnow,
)

_INSTANT = timedelta(microseconds=1)
log = logging.getLogger(__name__)


class Conflict(Exception):
    """The change would leave a dangling reference (e.g. deleting a paged recipient)."""


async def _recipients(s: AsyncSession, company: str) -> dict[str, Recipient]:
    res = await s.execute(select(RecipientRow).where(col(RecipientRow.company) == company))
    return {
        r.id: Recipient.model_validate(r.model_dump(exclude={"company", "updated_at"}))
        for r in res.scalars()
    }


async def _groups(s: AsyncSession, company: str) -> dict[str, Group]:
    res = await s.execute(select(GroupRow).where(col(GroupRow.company) == company))
    return {g.name: Group(name=g.name, members=list(g.members)) for g in res.scalars()}


async def _policies(s: AsyncSession, company: str) -> dict[str, Policy]:
    res = await s.execute(select(PolicyRow).where(col(PolicyRow.company) == company))
    return {p.name: Policy.model_validate(p.spec) for p in res.scalars()}


async def _schedules(
    s: AsyncSession, company: str, names: Collection[str] | None = None
) -> dict[str, Schedule]:
    query = select(ScheduleRow).where(col(ScheduleRow.company) == company)
    if names is not None:
        query = query.where(col(ScheduleRow.name).in_(names))
    res = await s.execute(query)
    return {r.name: Schedule.model_validate(r.spec) for r in res.scalars()}


def _override(row: ScheduleOverrideRow) -> Override:
    return Override(
        id=row.id, schedule=row.schedule, start=row.starts_at, end=row.ends_at,
        recipient=row.recipient, replaces=row.replaces,
    )  # fmt: skip


async def _overrides(
    s: AsyncSession,
    company: str,
    schedules: Collection[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Override]:
    """In creation order (the order `schedules.oncall` applies them in); with a window,
    only those overlapping it."""
    t = ScheduleOverrideRow
    query = select(t).where(col(t.company) == company).order_by(col(t.id))
    if schedules is not None:
        query = query.where(col(t.schedule).in_(schedules))
    if since is not None:
        query = query.where(col(t.ends_at) > since)
    if until is not None:
        query = query.where(col(t.starts_at) < until)
    return [_override(r) for r in (await s.execute(query)).scalars()]


async def _put_schedule(s: AsyncSession, company: str, sch: Schedule) -> None:
    row = await s.get(ScheduleRow, (company, sch.name))
    if row is None:
        row = ScheduleRow(company=company, name=sch.name, updated_at=utcnow())
        s.add(row)
    spec = schedule_spec(sch)
    row.spec, row.updated_at = spec, utcnow()


def schedule_spec(sch: Schedule) -> dict[str, Any]:
    """The stored form, without the keys that are unset (`reminder`, a layer's `end`,
    `shift_length`): a node of a release before them (whose Schedule forbids unknown keys)
    still reads every schedule that does not use them. Every optional field defaults to None."""
    return sch.model_dump(mode="json", exclude_none=True)


async def _add_override(s: AsyncSession, company: str, o: Override, actor: str) -> Override:
    row = ScheduleOverrideRow(
        company=company, schedule=o.schedule, recipient=o.recipient, replaces=o.replaces,
        starts_at=o.start, ends_at=o.end, created_at=utcnow(), created_by=actor,
    )  # fmt: skip
    s.add(row)
    await s.flush()
    return _override(row)


async def _put_recipient(s: AsyncSession, company: str, r: Recipient) -> None:
    row = await s.get(RecipientRow, (company, r.id))
    if row is None:
        row = RecipientRow(company=company, id=r.id, name=r.name, updated_at=utcnow())
        s.add(row)
    row.name = r.name
    for name in CONTACT_FIELDS:
        setattr(row, name, getattr(r, name))
    row.updated_at = utcnow()


async def _put_group(s: AsyncSession, company: str, g: Group) -> None:
    row = await s.get(GroupRow, (company, g.name))
    if row is None:
        row = GroupRow(company=company, name=g.name, updated_at=utcnow())
        s.add(row)
    row.members, row.updated_at = list(g.members), utcnow()


async def _put_policy(s: AsyncSession, company: str, p: Policy) -> None:
    row = await s.get(PolicyRow, (company, p.name))
    if row is None:
        row = PolicyRow(company=company, name=p.name, updated_at=utcnow())
        s.add(row)
    row.spec, row.updated_at = _policy_spec(p), utcnow()


def _policy_spec(p: Policy) -> dict[str, Any]:
    """The stored form: a step's `schedules` only when it has some, so a previous release
    (whose steps forbid the key) still reads every policy that does not use schedules."""
    spec = p.model_dump(mode="json")
    for step in spec["steps"]:
        if not step["schedules"]:
            del step["schedules"]
    return spec


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def _put_integration(s: AsyncSession, company: str, i: Integration) -> None:
    row = await s.get(IntegrationRow, (company, i.name))
    if row is None:
        row = IntegrationRow(company=company, name=i.name, updated_at=utcnow())
        s.add(row)
    row.spec = i.settings().model_dump(mode="json")
    row.token_sha256 = None if i.token is None else token_digest(i.token)
    row.updated_at = utcnow()


@contextlib.asynccontextmanager
async def _config_write(db: Database, company: str) -> AsyncIterator[AsyncSession]:
    """A transaction that changes a company's recipients, groups or policies.

    Writers take turns per company: each one reads (does the row exist, is it still
    referenced) before it writes, and two `serve` processes starting together sync the same
    file at the same moment.
    """
    async with db.session() as s, s.begin():
        await db.serialize(s, f"ackline-config:{company}")
        yield s


async def sync_config(db: Database, cfg: AcklineConfig) -> None:
    """Upsert everything the file defines; things created through the API are kept."""
    async with _config_write(db, cfg.company) as s:
        for r in cfg.recipients:
            await _put_recipient(s, cfg.company, r)
        for g in cfg.groups:
            await _put_group(s, cfg.company, g)
        for p in cfg.policies:
            await _put_policy(s, cfg.company, p)
        for i in cfg.integrations:
            await _put_integration(s, cfg.company, i)
        for sch in cfg.schedules:
            await _put_schedule(s, cfg.company, sch)
        stored = {o.model_copy(update={"id": None}) for o in await _overrides(s, cfg.company)}
        for o in cfg.overrides:
            if o.model_copy(update={"id": None}) not in stored:  # each start syncs the file
                await _add_override(s, cfg.company, o, "config")


async def list_recipients(db: Database, company: str) -> list[Recipient]:
    async with db.session() as s:
        return sorted((await _recipients(s, company)).values(), key=lambda r: r.id)


async def list_groups(db: Database, company: str) -> list[Group]:
    async with db.session() as s:
        return sorted((await _groups(s, company)).values(), key=lambda g: g.name)


async def list_policies(db: Database, company: str) -> list[Policy]:
    async with db.session() as s:
        return sorted((await _policies(s, company)).values(), key=lambda p: p.name)


async def put_recipient(db: Database, company: str, r: Recipient) -> None:
    async with _config_write(db, company) as s:
        await _put_recipient(s, company, r)


async def put_group(db: Database, company: str, g: Group) -> None:
    async with _config_write(db, company) as s:
        recipients = await _recipients(s, company)
        missing = [m for m in g.members if m not in recipients]
        if missing:
            raise ConfigError(f"members: unknown recipient {m!r}" for m in missing)
        await _put_group(s, company, g)


async def put_policy(
    db: Database, company: str, p: Policy, channel_defaults: Mapping[str, RetryPolicy]
) -> None:
    async with _config_write(db, company) as s:
        errors = reference_errors(
            [("policy", p)], await _recipients(s, company), await _groups(s, company),
            channel_defaults, await _schedules(s, company),
        )  # fmt: skip
        if errors:
            raise ConfigError(errors)
        await _put_policy(s, company, p)


@dataclass(frozen=True)
class StoredIntegration:
    company: str
    settings: IntegrationSettings
    token_sha256: str | None  # None: the token is in the environment (settings.token_env)


def _stored(row: IntegrationRow) -> StoredIntegration:
    return StoredIntegration(
        row.company, IntegrationSettings.model_validate(row.spec), row.token_sha256
    )


async def list_integrations(db: Database, company: str) -> list[IntegrationSettings]:
    async with db.session() as s:
        res = await s.execute(
            select(IntegrationRow)
            .where(col(IntegrationRow.company) == company)
            .order_by(col(IntegrationRow.name))
        )
        return [_stored(row).settings for row in res.scalars()]


async def integrations_named(db: Database, name: str) -> list[StoredIntegration]:
    """Every company's integration of this name: the inbound URL names no company, so the
    token decides which one (if any) a request is for."""
    async with db.session() as s:
        res = await s.execute(select(IntegrationRow).where(col(IntegrationRow.name) == name))
        return [_stored(row) for row in res.scalars()]


async def put_integration(db: Database, company: str, i: Integration) -> None:
    async with _config_write(db, company) as s:
        errors = integration_errors(i, await _policies(s, company))
        if errors:
            raise ConfigError(errors)
        await _put_integration(s, company, i)


async def list_schedules(db: Database, company: str) -> list[Schedule]:
    async with db.session() as s:
        return sorted((await _schedules(s, company)).values(), key=lambda x: x.name)


async def schedule_view(
    db: Database, company: str, name: str, since: datetime, until: datetime
) -> tuple[Schedule, list[Override]] | None:
    """A schedule and the overrides overlapping [since, until): what `oncall` and `shifts`
    need to answer for that window."""
    async with db.session() as s:
        found = (await _schedules(s, company, [name])).get(name)
        if found is None:
            return None
        return found, await _overrides(s, company, [name], since, until)


async def oncall_sources(
    s: AsyncSession, company: str, names: Collection[str], at: datetime
) -> dict[str, tuple[Schedule, list[Override]]]:
    """The named schedules with their overrides in force at `at`, in the caller's
    session (the engine asks inside the transaction that fires the step)."""
    found = await _schedules(s, company, names)
    overrides = await _overrides(s, company, list(found), at, at + _INSTANT)
    return {n: (sch, [o for o in overrides if o.schedule == n]) for n, sch in found.items()}


@dataclass(frozen=True)
class ReminderSource:
    """A schedule with a reminder, and what deciding its reminders needs: the overrides
    in the window looked at, and the company's recipients (their contacts)."""

    company: str
    schedule: Schedule
    overrides: list[Override]
    recipients: dict[str, Recipient]


async def reminder_sources(db: Database, since: datetime, until: datetime) -> list[ReminderSource]:
    """Every company's schedules that have a reminder, for the window [since, until).

    A stored schedule this release cannot read (a newer one wrote it) is skipped and
    named in the log, so it cannot stop the others' reminders."""
    async with db.session() as s:
        by_company: dict[str, list[Schedule]] = {}
        for row in (await s.execute(select(ScheduleRow))).scalars():
            if not (row.spec or {}).get("reminder"):
                continue
            try:
                by_company.setdefault(row.company, []).append(Schedule.model_validate(row.spec))
            except ValidationError as exc:
                log.warning("schedule %s of %s unreadable, no reminders for it: %s",
                            row.name, row.company, exc)  # fmt: skip
        out = []
        for company, found in sorted(by_company.items()):
            names = [sch.name for sch in found]
            overrides = await _overrides(s, company, names, since, until)
            recipients = await _recipients(s, company)
            out += [ReminderSource(company, sch, overrides, recipients) for sch in found]
        return out


async def rotas(
    s: AsyncSession, company: str, names: Collection[str], now: datetime
) -> dict[str, list[str]]:
    """Per schedule, everyone who may be put on call: participants, then the recipients of
    overrides not yet over (an alert's plan keeps their contacts)."""
    if not names:
        return {}
    found = await _schedules(s, company, names)
    out = {n: sch.participants() for n, sch in found.items()}
    for o in await _overrides(s, company, list(found), since=now):
        if o.recipient not in out[o.schedule]:
            out[o.schedule].append(o.recipient)
    return out


async def list_overrides(
    db: Database,
    company: str,
    schedule: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[Override]:
    async with db.session() as s:
        return await _overrides(s, company, None if schedule is None else [schedule], since, until)


async def put_schedule(db: Database, company: str, sch: Schedule) -> None:
    async with _config_write(db, company) as s:
        errors = schedule_errors("schedule", sch, await _recipients(s, company))
        if errors:
            raise ConfigError(errors)
        await _put_schedule(s, company, sch)


async def add_override(db: Database, company: str, o: Override, actor: str) -> Override:
    """Store an override (its id says it was created after every existing one)."""
    async with _config_write(db, company) as s:
        errors = override_errors(
            "override", o, await _schedules(s, company, [o.schedule]), await _recipients(s, company)
        )
        if errors:
            raise ConfigError(errors)
        return await _add_override(s, company, o, actor)


async def delete_override(db: Database, company: str, override_id: int) -> bool:
    async with _config_write(db, company) as s:
        row = await s.get(ScheduleOverrideRow, override_id)
        if row is None or row.company != company:
            return False
        await s.delete(row)
    return True


def _users(
    policies: Mapping[str, Policy],
    groups: Mapping[str, Group],
    schedules: Mapping[str, Schedule],
    overrides: Collection[Override],
) -> dict[str, list[str]]:
    """Who refers to what: recipient id / "group:<name>" / "schedule:<name>" -> referrers."""
    refs: dict[str, list[str]] = {}
    for name, p in policies.items():
        for step in p.steps:
            for rid in step.recipients:
                refs.setdefault(rid, []).append(f"policy {name}")
            for g in step.groups:
                refs.setdefault(f"group:{g}", []).append(f"policy {name}")
            for sname in step.schedules:
                refs.setdefault(f"schedule:{sname}", []).append(f"policy {name}")
    for gname, group in groups.items():
        for rid in group.members:
            refs.setdefault(rid, []).append(f"group {gname}")
    for sname, sch in schedules.items():
        for rid in sch.participants():
            refs.setdefault(rid, []).append(f"schedule {sname}")
    for o in overrides:
        for rid in filter(None, (o.recipient, o.replaces)):
            refs.setdefault(rid, []).append(f"override {o.id} of schedule {o.schedule}")
    return refs


async def delete(db: Database, company: str, kind: str, key: str) -> bool:
    """Delete a recipient, group, policy, schedule or integration; Conflict if something
    still refers to it. A schedule's overrides go with it."""
    tables: dict[str, Any] = {
        "recipient": RecipientRow, "group": GroupRow, "policy": PolicyRow,
        "schedule": ScheduleRow, "integration": IntegrationRow,
    }  # fmt: skip
    async with _config_write(db, company) as s:
        row = await s.get(tables[kind], (company, key))
        if row is None:
            return False
        if kind in ("recipient", "group", "schedule"):
            refs = _users(
                await _policies(s, company), await _groups(s, company),
                await _schedules(s, company), await _overrides(s, company),
            )  # fmt: skip
            users = refs.get(key if kind == "recipient" else f"{kind}:{key}", [])
            if users:
                raise Conflict(f"{kind} {key!r} is used by {', '.join(sorted(set(users)))}")
        if kind == "policy":
            res = await s.execute(
                select(IntegrationRow).where(col(IntegrationRow.company) == company)
            )
            users = [
                f"integration {row.name}" for row in res.scalars()
                if any(name == key for _, name in _stored(row).settings.policies())
            ]  # fmt: skip
            if users:
                raise Conflict(f"policy {key!r} is used by {', '.join(sorted(users))}")
        if kind == "schedule":
            for o in await _overrides(s, company, [key]):
                await s.delete(await s.get(ScheduleOverrideRow, o.id))
        await s.delete(row)
    return True
