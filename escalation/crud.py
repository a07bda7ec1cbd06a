"""Recipients, groups and policies in the database, per company.

The YAML file and the API go through the same functions and the same validation
(`config.reference_errors`), so neither can store something the other would reject.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from escalation.config import (
    AcklineConfig,
    ConfigError,
    Group,
    Integration,
    IntegrationSettings,
    Policy,
    Recipient,
    RetryPolicy,
    integration_errors,
    reference_errors,
)
from escalation.db import Database
from escalation.models import GroupRow, IntegrationRow, PolicyRow, RecipientRow, utcnow


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


async def _put_recipient(s: AsyncSession, company: str, r: Recipient) -> None:
    row = await s.get(RecipientRow, (company, r.id))
    if row is None:
        row = RecipientRow(company=company, id=r.id, name=r.name, updated_at=utcnow())
        s.add(row)
    row.name, row.phone, row.email = r.name, r.phone, r.email
    row.telegram_chat_id, row.webhook_url = r.telegram_chat_id, r.webhook_url
    row.slack_channel = r.slack_channel
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
    row.spec, row.updated_at = p.model_dump(mode="json"), utcnow()


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
            channel_defaults,
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


def _users(policies: Mapping[str, Policy], groups: Mapping[str, Group]) -> dict[str, list[str]]:
    """Who refers to what: recipient id / "group:<name>" -> referring policies/groups."""
    refs: dict[str, list[str]] = {}
    for name, p in policies.items():
        for step in p.steps:
            for rid in step.recipients:
                refs.setdefault(rid, []).append(f"policy {name}")
            for g in step.groups:
                refs.setdefault(f"group:{g}", []).append(f"policy {name}")
    for gname, group in groups.items():
        for rid in group.members:
            refs.setdefault(rid, []).append(f"group {gname}")
    return refs


async def delete(db: Database, company: str, kind: str, key: str) -> bool:
    """Delete a recipient, group, policy or integration; Conflict if something still refers
    to it."""
    table: Any = {
        "recipient": RecipientRow, "group": GroupRow, "policy": PolicyRow,
        "integration": IntegrationRow,
    }[kind]  # fmt: skip
    async with _config_write(db, company) as s:
        row = await s.get(table, (company, key))
        if row is None:
            return False
        if kind in ("recipient", "group"):
            refs = _users(await _policies(s, company), await _groups(s, company))
            users = refs.get(key if kind == "recipient" else f"group:{key}", [])
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
        await s.delete(row)
    return True
