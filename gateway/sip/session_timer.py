"""RFC 4028 session timers: negotiation and the refresh/expiry clock, sans-IO.

A session timer keeps a dialog from outliving a peer that vanished without a BYE: one side
(the refresher) sends a refresh (UPDATE when the peer allows it, as RFC 4028 prefers, else
a re-INVITE) before the interval runs out, and either side ends the call when no refresh
came. This module parses and builds the headers, negotiates interval and
refresher for both roles, and runs `SessionTimer`, a clock-free state machine telling the
call when to refresh and when the session is over.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from sipmessage import Request, Response

from gateway.sip.message import Rejection
from gateway.sip.reliable import option_tags

__all__ = [
    "DEFAULT_SESSION_EXPIRES",
    "MIN_SE_FLOOR",
    "OPTION_TIMER",
    "ExpiryReason",
    "RefreshDue",
    "RefreshMethod",
    "Refresher",
    "SessionExpired",
    "SessionExpires",
    "SessionTimer",
    "SessionTimerEvent",
    "SessionTimerSettings",
    "UasNegotiation",
    "negotiate_uac",
    "negotiate_uas",
    "parse_min_se",
    "parse_session_expires",
    "refresh_method",
    "request_headers",
    "response_headers",
    "retry_interval_after_422",
]

OPTION_TIMER = "timer"
DEFAULT_SESSION_EXPIRES = 1800
MIN_SE_FLOOR = 90  # RFC 4028 4: no Min-SE below 90 s


class Refresher(enum.Enum):
    UAC = "uac"
    UAS = "uas"


@dataclass(frozen=True)
class SessionExpires:
    """A Session-Expires value: the interval in seconds and who refreshes (if said)."""

    interval: int
    refresher: Refresher | None = None

    def __str__(self) -> str:
        if self.refresher is None:
            return str(self.interval)
        return f"{self.interval};refresher={self.refresher.value}"


@dataclass(frozen=True)
class SessionTimerSettings:
    """Our side's wishes. ``min_se`` is the smallest interval we accept; below 90 s only
    when ``floor`` is lowered, which RFC 4028 forbids on a real network (lab use only:
    `GatewayConfig.min_session_expires`)."""

    session_expires: int = DEFAULT_SESSION_EXPIRES
    min_se: int = MIN_SE_FLOOR
    floor: int = MIN_SE_FLOOR

    def __post_init__(self) -> None:
        if self.floor < 1:
            raise ValueError("the session timer floor must be at least 1 s")
        if self.min_se < self.floor:
            raise ValueError(f"min_se must be at least {self.floor} s")
        if self.session_expires < self.min_se:
            raise ValueError("session_expires must not be below min_se")


def _header(message: Request | Response, name: str, compact: str | None) -> str | None:
    value = message.headers.get(name)
    if value is None and compact is not None:
        value = message.headers.get(compact)
    return value


def parse_session_expires(message: Request | Response) -> SessionExpires | None:
    """Session-Expires (compact ``x``); None when absent or garbled."""
    value = _header(message, "Session-Expires", "x")
    if value is None:
        return None
    head, *params = (part.strip() for part in value.split(";"))
    if not head.isascii() or not head.isdigit() or int(head) < 1:
        return None
    refresher: Refresher | None = None
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "refresher":
            try:
                refresher = Refresher(val.strip().lower())
            except ValueError:
                return None
    return SessionExpires(int(head), refresher)


def parse_min_se(message: Request | Response) -> int | None:
    value = _header(message, "Min-SE", None)
    if value is None:
        return None
    head = value.split(";", 1)[0].strip()
    return int(head) if head.isascii() and head.isdigit() else None


class RefreshMethod(enum.Enum):
    """How we refresh a session we are the refresher of."""

    UPDATE = "UPDATE"  # RFC 3311, no offer: RFC 4028 9 prefers it when the peer allows it
    INVITE = "INVITE"  # every peer takes one; it carries our last SDP again


def refresh_method(message: Request | Response, current: RefreshMethod) -> RefreshMethod:
    """UPDATE when ``message`` (the peer's INVITE, or its 2xx to ours) lists it in Allow,
    INVITE when its Allow leaves UPDATE out; ``current`` when it has no Allow at all
    (which says nothing either way, RFC 3261 20.5)."""
    values = message.headers.getlist("Allow")
    if not values:
        return current
    allowed = {m.strip().upper() for value in values for m in value.split(",")}
    return RefreshMethod.UPDATE if "UPDATE" in allowed else RefreshMethod.INVITE


def retry_interval_after_422(response: Response, asked: int, limit: int) -> int | None:
    """RFC 4028 7.4: the interval to retry with after a 422, which is its Min-SE. None
    when the 422 names none, one no larger than we asked for, or one above ``limit``
    (then retrying cannot help, or would hold a dead call open too long)."""
    min_se = parse_min_se(response)
    if min_se is None or min_se <= asked or min_se > limit:
        return None
    return min_se


def negotiate_uac(response: Response) -> SessionExpires | None:
    """RFC 4028 7.2: the interval and refresher a 2xx to our INVITE set; None when it
    has no Session-Expires (no session timer). A missing refresher means the UAC's job."""
    expires = parse_session_expires(response)
    if expires is None:
        return None
    return SessionExpires(expires.interval, expires.refresher or Refresher.UAC)


@dataclass(frozen=True)
class UasNegotiation:
    """What to answer an INVITE (or refresh) with: a 422, or the session timer to run
    (None: the request asked for none)."""

    rejection: Rejection | None
    expires: SessionExpires | None


def negotiate_uas(request: Request, settings: SessionTimerSettings) -> UasNegotiation:
    """RFC 4028 9: a Session-Expires below our Min-SE gets 422 with Min-SE; otherwise the
    interval stands, and the refresher is the one the caller asked for, the caller
    itself when it supports timers and did not say (so we need not re-INVITE it), and
    us when it does not support them (RFC 4028 Table 2)."""
    expires = parse_session_expires(request)
    if expires is None:
        return UasNegotiation(None, None)
    if expires.interval < settings.min_se:
        headers = (("Min-SE", str(settings.min_se)),)
        return UasNegotiation(Rejection(422, "Session Interval Too Small", headers), None)
    refresher = expires.refresher
    if refresher is None:
        supported = OPTION_TIMER in option_tags(request, "Supported")
        refresher = Refresher.UAC if supported else Refresher.UAS
    return UasNegotiation(None, SessionExpires(expires.interval, refresher))


class ExpiryReason(enum.Enum):
    NO_REFRESH = "no session refresh from the peer before expiry"
    REFRESH_FAILED = "session refresh failed"
    REFRESH_UNANSWERED = "session refresh got no answer before expiry"


@dataclass(frozen=True)
class RefreshDue:
    """We are the refresher and half the interval passed: send the refresh now."""


@dataclass(frozen=True)
class SessionExpired:
    """The session is over: send BYE and record ``reason`` (``code``: the refresh's
    failure response, None when nothing came)."""

    reason: ExpiryReason
    code: int | None = None

    def describe(self, interval: int) -> str:
        detail = f" ({self.code})" if self.code is not None else ""
        return f"session timer ({interval} s): {self.reason.value}{detail}"


SessionTimerEvent = RefreshDue | SessionExpired

# Responses to a refresh after which the dialog is gone (RFC 4028 10, RFC 5057).
_FATAL_REFRESH_CODES = frozenset({408, 481})


class SessionTimer:
    """The clock of one negotiated session timer.

    As refresher: `RefreshDue` at half the interval; a fatal answer (408, 481, no answer)
    or no success by expiry is `SessionExpired`; another failure (e.g. 491 glare, 500)
    tries again once, half way to the expiry. Otherwise: `SessionExpired` when no refresh came
    by expiry minus min(32 s, interval/3) (RFC 4028 10). Every success restarts the clock
    with the interval and refresher it negotiated.
    """

    def __init__(self, expires: SessionExpires, *, local_refresher: bool, now: float) -> None:
        self._events: deque[SessionTimerEvent] = deque()
        self.expires = expires
        self.local_refresher = local_refresher
        self._refresh_at: float | None = None
        self._expire_at = now
        self._in_flight = False
        self._last_failure: int | None = None  # our last refresh's non-2xx, if any
        self._retried = False  # a failed refresh was tried again in this interval
        self.over = False
        self._restart(now)

    @property
    def interval(self) -> int:
        return self.expires.interval

    def _restart(self, now: float) -> None:
        interval = self.expires.interval
        if self.local_refresher:
            self._refresh_at = now + interval / 2
            self._expire_at = now + interval
        else:
            self._refresh_at = None
            self._expire_at = now + interval - min(32.0, interval / 3)
        self._in_flight = False
        self._last_failure = None
        self._retried = False

    def refreshed(self, expires: SessionExpires, *, local_refresher: bool, now: float) -> None:
        """A refresh succeeded (ours got its 2xx, or we answered the peer's with 2xx)."""
        if self.over:
            return
        self.expires = expires
        self.local_refresher = local_refresher
        self._restart(now)

    def refresh_sent(self) -> None:
        self._in_flight = True

    def refresh_failed(self, code: int | None, now: float) -> None:
        """Our refresh got ``code`` (a non-2xx final), or nothing at all (None)."""
        if self.over:
            return
        self._in_flight = False
        if code is None:
            self._expire(ExpiryReason.REFRESH_UNANSWERED, None)
        elif code in _FATAL_REFRESH_CODES:
            self._expire(ExpiryReason.REFRESH_FAILED, code)
        else:
            # One more try half way to the expiry (a 491 clears once the peer's own
            # re-INVITE is done); after that the expiry decides.
            self._refresh_at = None if self._retried else now + (self._expire_at - now) / 2
            self._retried = True
            self._last_failure = code

    def next_timer_at(self) -> float | None:
        if self.over:
            return None
        if self._refresh_at is not None and not self._in_flight:
            return min(self._refresh_at, self._expire_at)
        return self._expire_at

    def handle_timer(self, now: float) -> None:
        if self.over:
            return
        if now >= self._expire_at:
            if self.local_refresher:
                code = self._last_failure
                failed = code is not None
                reason = ExpiryReason.REFRESH_FAILED if failed else ExpiryReason.REFRESH_UNANSWERED
                self._expire(reason, code)
            else:
                self._expire(ExpiryReason.NO_REFRESH, None)
            return
        if self._refresh_at is not None and not self._in_flight and now >= self._refresh_at:
            self._refresh_at = None
            self._in_flight = True
            self._events.append(RefreshDue())

    def stop(self) -> None:
        self.over = True

    def _expire(self, reason: ExpiryReason, code: int | None) -> None:
        self.over = True
        self._events.append(SessionExpired(reason, code))

    def next_event(self) -> SessionTimerEvent | None:
        return self._events.popleft() if self._events else None


def request_headers(expires: SessionExpires, min_se: int) -> tuple[tuple[str, str], ...]:
    """Session-Expires and Min-SE for an INVITE or refresh we send (RFC 4028 7.1, 7.4)."""
    return (("Session-Expires", str(expires)), ("Min-SE", str(min_se)))


def response_headers(request: Request, expires: SessionExpires) -> tuple[tuple[str, str], ...]:
    """Session-Expires (with the refresher) for our 2xx, and Require: timer when the
    caller supports timers (RFC 4028 9: a must when the caller is to refresh)."""
    headers: tuple[tuple[str, str], ...] = (("Session-Expires", str(expires)),)
    if OPTION_TIMER in option_tags(request, "Supported") or expires.refresher is Refresher.UAC:
        headers += (("Require", OPTION_TIMER),)
    return headers
