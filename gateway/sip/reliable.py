"""RFC 3262 reliable provisional responses (100rel): RSeq/RAck bookkeeping, sans-IO.

Two small state machines, one per side of an INVITE:

- `ProvisionalTracker` (UAC): decides, per early dialog, whether a provisional response
  is a new reliable one to PRACK, a retransmission, or out of order (RFC 3262 4).
- `ReliableProvisional` (UAS): retransmits one reliable 18x at T1, 2*T1, 4*T1... until its
  PRACK arrives or 64*T1 pass (RFC 3262 3), reporting which through events.

Neither holds a clock or a socket: the caller passes ``now`` and sends what
``messages_to_send()`` returns, like the transactions in gateway.sip.transaction.
"""

from __future__ import annotations

import enum
import secrets
from collections import deque
from dataclasses import dataclass

from sipmessage import Request, Response

from gateway.sip.transaction import TimerSettings

__all__ = [
    "OPTION_100REL",
    "Pracked",
    "ProvisionalTracker",
    "ProvisionalVerdict",
    "RAck",
    "ReliableEvent",
    "ReliableProvisional",
    "ReliableTimeout",
    "new_rseq",
    "option_tags",
    "parse_rack",
    "parse_rseq",
    "requires_100rel",
]

OPTION_100REL = "100rel"
_MAX_RSEQ = 2**32 - 1  # RFC 3262 7.1: 1 to 2**32 - 1


def option_tags(message: Request | Response, header: str) -> set[str]:
    """The option tags a Require/Supported/Unsupported header lists, lower case (all
    instances of the header, comma lists split, compact forms included)."""
    names = [header]
    compact = {"supported": "k"}.get(header.lower())
    if compact is not None:
        names.append(compact)
    tags: set[str] = set()
    for name in names:
        for value in message.headers.getlist(name):
            tags.update(tag.strip().lower() for tag in value.split(",") if tag.strip())
    return tags


def requires_100rel(message: Request | Response) -> bool:
    return OPTION_100REL in option_tags(message, "Require")


def parse_rseq(response: Response) -> int | None:
    """The RSeq of a response, None when absent or not a number in range."""
    value = (response.headers.get("RSeq") or "").strip()
    if not value.isascii() or not value.isdigit():
        return None
    rseq = int(value)
    return rseq if 1 <= rseq <= _MAX_RSEQ else None


@dataclass(frozen=True)
class RAck:
    """RFC 3262 7.2: which reliable provisional a PRACK acknowledges."""

    rseq: int
    cseq: int
    method: str

    def __str__(self) -> str:
        return f"{self.rseq} {self.cseq} {self.method}"


def parse_rack(request: Request) -> RAck | None:
    """The RAck of a PRACK, None when absent or garbled."""
    parts = (request.headers.get("RAck") or "").split()
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts[:2]):
        return None
    return RAck(int(parts[0]), int(parts[1]), parts[2].upper())


def new_rseq() -> int:
    """A first RSeq: random, and low enough that it never wraps within a call."""
    return secrets.randbelow(2**31 - 1) + 1


class ProvisionalVerdict(enum.Enum):
    """What the UAC does with one provisional response to its INVITE."""

    UNRELIABLE = "unreliable"  # an ordinary 1xx: process it, no PRACK
    PRACK = "prack"  # the next reliable 1xx of its dialog: process it and PRACK it
    RETRANSMISSION = "retransmission"  # already PRACKed: ignore (its PRACK is in flight)
    OUT_OF_ORDER = "out_of_order"  # RSeq not the next one: discard, no PRACK
    INVALID = "invalid"  # Require: 100rel without a usable RSeq: discard


class ProvisionalTracker:
    """UAC side: the last RSeq seen per early dialog (To tag), RFC 3262 4.

    The first reliable provisional of a dialog may carry any RSeq; each later one must
    carry the previous plus one. A repeat of the last is a retransmission (its PRACK was
    sent, or is answered by the transaction layer); anything else is out of order and is
    dropped without a PRACK, so the UAS retransmits the missing one first.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def receive(self, response: Response) -> ProvisionalVerdict:
        if not 101 <= response.code <= 199 or not requires_100rel(response):
            return ProvisionalVerdict.UNRELIABLE
        rseq = parse_rseq(response)
        tag = response.to_address.parameters.get("tag")
        if rseq is None or not tag:
            return ProvisionalVerdict.INVALID  # no early dialog to PRACK in
        last = self._last.get(tag)
        if last is None or rseq == last + 1:
            self._last[tag] = rseq
            return ProvisionalVerdict.PRACK
        if rseq == last:
            return ProvisionalVerdict.RETRANSMISSION
        return ProvisionalVerdict.OUT_OF_ORDER


@dataclass(frozen=True)
class Pracked:
    """The PRACK for our reliable provisional arrived (answer it with 200)."""

    rack: RAck


@dataclass(frozen=True)
class ReliableTimeout:
    """64*T1 passed without a PRACK: RFC 3262 3 says reject the INVITE with a 5xx."""


ReliableEvent = Pracked | ReliableTimeout


class ReliableProvisional:
    """UAS side: one reliable provisional response, retransmitted until PRACKed.

    RFC 3262 3: the interval starts at T1 and doubles with each retransmission (no T2
    cap), over any transport (the reliability is end to end, across proxies); after
    64*T1 without a matching PRACK the UAS gives up. Only one is outstanding at a time.
    """

    def __init__(self, response: Response, timers: TimerSettings) -> None:
        rseq = parse_rseq(response)
        if rseq is None or not requires_100rel(response) or not 101 <= response.code <= 199:
            raise ValueError("a reliable provisional needs a 1xx with Require: 100rel and RSeq")
        self.response = response
        self.rack = RAck(rseq, response.cseq.sequence, response.cseq.method)
        self._timers = timers
        self._outbox: list[Response] = []
        self._events: deque[ReliableEvent] = deque()
        self._interval = timers.t1
        self._retransmit_at: float | None = None
        self._give_up_at: float | None = None
        self.done = False

    def start(self, now: float) -> None:
        self._outbox.append(self.response)
        self._retransmit_at = now + self._interval
        self._give_up_at = now + 64 * self._timers.t1

    def next_timer_at(self) -> float | None:
        if self.done or self._retransmit_at is None or self._give_up_at is None:
            return None
        return min(self._retransmit_at, self._give_up_at)

    def handle_timer(self, now: float) -> None:
        if self.done or self._retransmit_at is None or self._give_up_at is None:
            return
        if now >= self._give_up_at:
            self.done = True
            self._events.append(ReliableTimeout())
            return
        if now >= self._retransmit_at:
            self._outbox.append(self.response)
            self._interval *= 2
            self._retransmit_at = now + self._interval

    def receive(self, prack: Request, now: float) -> bool:
        """A PRACK for this INVITE; True when its RAck matches (answer 200), False when
        it does not (RFC 3262 3: answer 481). A repeat after the match matches again, so
        a retransmitted PRACK gets its 200 too, but raises no second event."""
        rack = parse_rack(prack)
        if rack != self.rack:
            return False
        if not self.done:
            self.done = True
            self._events.append(Pracked(rack))
        return True

    def messages_to_send(self) -> list[Response]:
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> ReliableEvent | None:
        return self._events.popleft() if self._events else None
