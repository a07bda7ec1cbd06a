"""Per-recipient rate limits over one claim's batch of sends.

A flapping source must not page one person fifty times a minute: past a channel's limit
a send is held until a slot opens (HOLD mode) or rides along with the send that carries
the others (BUNDLE mode). The sends already made are read once per (company, recipient,
channel) and the batch's own sends counted on top, so one claim cannot overrun a limit.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from escalation import metrics
from escalation.channels.base import Notification
from escalation.config import RateLimit, RateLimitMode
from escalation.core import rate_limit_release

Key = tuple[str, str, str]  # (company, recipient id, channel)
T = TypeVar("T")


class Verdict(enum.Enum):
    SEND = "send"
    HOLD = "held"  # later, at `release`
    BUNDLE = "bundled"  # with the batch's send to the same person on the same channel


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    limit: RateLimit | None = None
    release: datetime | None = None  # HOLD: when the next slot opens


SEND = Decision(Verdict.SEND)


class BatchLimiter(Generic[T]):
    """The rate limits of one claim; `T` is what carries a bundle (a send task)."""

    def __init__(
        self,
        limit_for: Callable[[str], RateLimit | None],
        recent_sends: Callable[[Key, RateLimit], Awaitable[list[datetime]]],
        clock: Callable[[], datetime],
    ) -> None:
        self.limit_for = limit_for
        self.recent_sends = recent_sends
        self.now = clock()  # one instant for the whole batch, as the claim's
        self._sent: dict[Key, list[datetime]] = {}
        self._carriers: dict[Key, T] = {}

    async def decide(self, key: Key) -> Decision:
        """Whether the next send to `key` goes now, is held or rides along."""
        limit = self.limit_for(key[2])
        if limit is None:
            return SEND
        if key not in self._sent:
            self._sent[key] = await self.recent_sends(key, limit)
        release = rate_limit_release(self._sent[key], limit, self.now)
        if release is None:
            return Decision(Verdict.SEND, limit)
        if limit.mode is RateLimitMode.BUNDLE and key in self._carriers:
            metrics.RATE_LIMITED.labels("bundle").inc()
            return Decision(Verdict.BUNDLE, limit)
        metrics.RATE_LIMITED.labels("hold").inc()
        return Decision(Verdict.HOLD, limit, release)

    def sent(self, key: Key, carrier: T, decision: Decision) -> None:
        """A send went out now: it counts against the limit and carries later bundles."""
        self._carriers[key] = carrier
        if decision.limit is not None:
            self._sent[key].append(self.now)

    def carrier(self, key: Key) -> T:
        return self._carriers[key]


def bundle(carrier: Notification, members: Sequence[Notification]) -> Notification:
    """One notification standing for several held ones, so a flapping source pages once."""
    details = dict(carrier.details)
    details["bundled_alert_ids"] = ",".join(n.alert_id for n in members)
    details["bundled_short_ids"] = ",".join(n.alert_short_id for n in members)
    details["bundled_count"] = str(len(members))
    return Notification(
        notification_id=carrier.notification_id,
        alert_id=carrier.alert_id,
        alert_short_id=carrier.alert_short_id,
        channel=carrier.channel,
        contact=carrier.contact,
        title=f"{carrier.title} (+{len(members)} more)",
        summary=carrier.summary,
        severity=carrier.severity,
        attempt=carrier.attempt,
        ack_url=carrier.ack_url,
        details=details,
        policy=carrier.policy,
    )
