"""People who sign in to the web console: a company, a role, an argon2 password hash and
optionally the recipient they are, so their acks carry that name.

Every change that should end someone's open sessions (disable, new password, new role)
bumps `session_version`; the console compares it with the one in the session cookie on
each request, so a signed cookie is revoked server-side without a session table.
"""

from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlmodel import col, select

from storage.db import Database
from storage.models import ConsoleUserRow, RecipientRow, utcnow

__all__ = [
    "ConsoleUser",
    "Role",
    "UserError",
    "add_user",
    "authenticate",
    "get_user",
    "list_users",
    "update_user",
]


class Role(enum.StrEnum):
    """What a console user may do; each role may do everything of the ones below it."""

    VIEWER = "viewer"  # read alerts and timelines
    RESPONDER = "responder"  # ack, resolve, escalate, reassign
    ADMIN = "admin"  # manage users (and other admin pages)

    @property
    def rank(self) -> int:
        return _RANKS[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_RANKS = {Role.VIEWER: 0, Role.RESPONDER: 1, Role.ADMIN: 2}

USERNAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024  # argon2 hashes any length; a bound keeps a request's work bounded


@dataclass(frozen=True)
class ConsoleUser:
    username: str
    company: str
    role: Role
    recipient_id: str | None
    disabled: bool
    session_version: int

    @property
    def actor(self) -> str:
        """The audit `actor` of what this person does in the console."""
        return f"console:{self.username}"

    @property
    def ack_actor(self) -> str:
        """Who an ack or resolve is attributed to (the alert's `acked_by`): the linked
        recipient when there is one ("console:alice" whichever account alice signed in
        with), else the user."""
        return f"console:{self.recipient_id}" if self.recipient_id else self.actor

    @classmethod
    def of(cls, row: ConsoleUserRow) -> ConsoleUser:
        return cls(row.username, row.company, Role(row.role), row.recipient_id, row.disabled,
                   row.session_version)  # fmt: skip


class UserError(ValueError):
    """A change refused; `field` names the form field it is about (for the message)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


_hasher = PasswordHasher()
# Checked against when the username is unknown, so a miss costs what a wrong password does.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


def hash_password(password: str) -> str:
    check_password(password)
    return _hasher.hash(password)


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError("password", f"at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise UserError("password", f"at most {MAX_PASSWORD} characters")


def _verify(stored: str, password: str) -> bool:
    try:
        return _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def normalise_username(username: str) -> str:
    name = username.strip().lower()
    if not USERNAME.fullmatch(name):
        raise UserError(
            "username", "1-64 of a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        )
    return name


async def _check_recipient(db: Database, company: str, recipient_id: str | None) -> None:
    if recipient_id is None:
        return
    async with db.session() as s:
        if await s.get(RecipientRow, (company, recipient_id)) is None:
            raise UserError("recipient", f"no recipient {recipient_id!r} in {company}")


async def add_user(
    db: Database,
    company: str,
    username: str,
    password: str,
    role: Role,
    actor: str,
    recipient_id: str | None = None,
) -> ConsoleUser:
    name = normalise_username(username)
    digest = await asyncio.to_thread(hash_password, password)
    await _check_recipient(db, company, recipient_id)
    now = utcnow()
    async with db.session() as s, s.begin():
        if await s.get(ConsoleUserRow, name) is not None:
            raise UserError("username", f"{name!r} is taken")
        row = ConsoleUserRow(username=name, company=company, password_hash=digest,
                             role=role.value, recipient_id=recipient_id, created_at=now,
                             updated_at=now, updated_by=actor)  # fmt: skip
        s.add(row)
        user = ConsoleUser.of(row)
    return user


async def get_user(db: Database, username: str) -> ConsoleUser | None:
    async with db.session() as s:
        row = await s.get(ConsoleUserRow, username)
        return None if row is None else ConsoleUser.of(row)


async def list_users(db: Database, company: str | None = None) -> list[ConsoleUser]:
    query = select(ConsoleUserRow).order_by(col(ConsoleUserRow.company),
                                            col(ConsoleUserRow.username))  # fmt: skip
    if company is not None:
        query = query.where(col(ConsoleUserRow.company) == company)
    async with db.session() as s:
        return [ConsoleUser.of(r) for r in (await s.scalars(query)).all()]


async def authenticate(db: Database, username: str, password: str) -> ConsoleUser | None:
    """The enabled user with this password, else None (same cost whether or not the
    username exists). Hashing runs in a thread: argon2 takes tens of milliseconds."""
    async with db.session() as s:
        row = await s.get(ConsoleUserRow, username.strip().lower())
        stored = row.password_hash if row is not None else _DUMMY_HASH
        user = None if row is None else ConsoleUser.of(row)
    ok = await asyncio.to_thread(_verify, stored, password[:MAX_PASSWORD])
    if not ok or user is None or user.disabled:
        return None
    return user


class Keep(enum.Enum):
    """`update_user(recipient_id=Keep.KEEP)`: leave the link as it is (None unlinks)."""

    KEEP = "keep"


async def update_user(
    db: Database,
    username: str,
    actor: str,
    *,
    company: str | None = None,
    role: Role | None = None,
    recipient_id: str | Keep | None = Keep.KEEP,
    disabled: bool | None = None,
    password: str | None = None,
) -> ConsoleUser | None:
    """Change what is given; None if there is no such user (in `company`, when given).
    A new role, a new password or disabling ends the user's sessions."""
    digest = await asyncio.to_thread(hash_password, password) if password is not None else None
    async with db.session() as s, s.begin():
        row = await s.get(ConsoleUserRow, username, with_for_update=True)
        if row is None or (company is not None and row.company != company):
            return None
        if recipient_id is not Keep.KEEP:
            link = recipient_id or None
            if link is not None and await s.get(RecipientRow, (row.company, link)) is None:
                raise UserError("recipient", f"no recipient {link!r} in {row.company}")
            row.recipient_id = link
        revoke = False
        if role is not None and role.value != row.role:
            row.role, revoke = role.value, True
        if disabled is not None and disabled != row.disabled:
            row.disabled = disabled
            revoke = revoke or disabled
        if digest is not None:
            row.password_hash, revoke = digest, True
        if revoke:
            row.session_version += 1
        row.updated_at, row.updated_by = utcnow(), actor
        s.add(row)
        return ConsoleUser.of(row)
