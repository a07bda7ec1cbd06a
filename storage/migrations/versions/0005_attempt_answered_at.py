"""attempt answered_at: a call that a person picked up is never placed twice

Revision ID: 0005
Revises: 0004

A worker killed (or drained) while a responder is on the phone leaves its job to another
worker, which used to place the same attempt again: the person who had answered got a
second call half a minute later. The worker now records the moment the call is answered;
the next claim of that attempt hands it out as interrupted (answered, no key) instead of
ringing again, and the policy decides what follows, as for any answered call without a key.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("notification_attempts", sa.Column("answered_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("notification_attempts", "answered_at")
