"""RFC 3261 §10 registration of one contact with a registrar, as a sans-IO state machine.

A carrier that delivers calls to whoever registered (instead of to a fixed address) needs
us to REGISTER on start-up, refresh before the binding runs out and unregister on the way
out. `Registration` decides what to send and when; the caller puts the REGISTERs through
non-INVITE client transactions and feeds back their final responses (or their absence)
with the current monotonic time, as `gateway.sip.transaction` does for messages. Nothing
here touches sockets, clocks or random state it was not given, so an hour of refreshes
and back-offs replays in microseconds.

`ContactBindings` is the other half: which registered contact user belongs to which trunk,
for admitting the calls the registrar then sends us.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TypeAlias

from sipmessage import URI, Address, CSeq, Parameters, Request, Response, Via

from gateway.sip.auth import Credentials, DigestClient, DigestError
from gateway.sip.dialog import USER_AGENT

__all__ = [
    "Backoff",
    "ContactBindings",
    "Event",
    "Failed",
    "Registered",
    "Registration",
    "RegistrationSettings",
    "RegistrationState",
    "StateChanged",
    "Stopped",
    "granted_expires",
]

# Challenges answered in a row before the registrar is taken to refuse us: a fresh nonce,
# then one stale=true, then one more for a registrar that restarted in between.
MAX_AUTH_ROUNDS = 3
# 423 Interval Too Brief answers followed in a row (each must raise the interval).
MAX_INTERVAL_ROUNDS = 3


class RegistrationState(str, enum.Enum):
    """What the registrar holds for us, as far as we know."""

    UNREGISTERED = "unregistered"  # not yet, or no longer (unregistered on shutdown)
    REGISTERED = "registered"  # a binding is in place and being refreshed
    FAILED = "failed"  # the last attempt failed: retrying after a back-off


@dataclass(frozen=True)
class Backoff:
    """Delays between failed attempts: ``initial`` doubling up to ``maximum``, each drawn
    from [(1 - jitter) * d, d] so that workers restarted together do not retry together."""

    initial: float = 1.0
    maximum: float = 300.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid back-off: {self}")

    def delay(self, failures: int, draw: float) -> float:
        """The wait after the ``failures``-th failure in a row; ``draw`` is in [0, 1)."""
        doublings = min(max(failures, 1) - 1, 64)
        base = min(self.maximum, self.initial * 2.0**doublings)
        return float(base * (1 - self.jitter * draw))


@dataclass(frozen=True)
class RegistrationSettings:
    """One binding: ``contact`` registered for ``aor`` at ``registrar``."""

    registrar: URI  # Request-URI of the REGISTERs: the registrar's domain, no user part
    aor: URI  # address-of-record (From and To)
    contact: URI  # where the registrar sends calls for the AOR: us
    call_id: str  # kept for every REGISTER of this binding (RFC 3261 10.2.4)
    from_tag: str
    expires: int = 3600  # asked for; a 423 raises it to the registrar's Min-Expires
    credentials: Credentials | None = None
    backoff: Backoff = field(default_factory=Backoff)

    def __post_init__(self) -> None:
        if self.expires < 1:
            raise ValueError("expires must be at least 1 second")


@dataclass(frozen=True)
class StateChanged:
    """The registration state moved (audit it; the trunk is usable only when REGISTERED)."""

    old: RegistrationState
    new: RegistrationState
    reason: str


@dataclass(frozen=True)
class Registered:
    """A REGISTER (first or refresh) succeeded: the binding lasts until ``until``."""

    expires: int  # seconds the registrar granted
    until: float


@dataclass(frozen=True)
class Failed:
    """An attempt failed; the next one is due in ``retry_in`` seconds."""

    reason: str
    retry_in: float


@dataclass(frozen=True)
class Stopped:
    """`stop` finished: the binding was removed (``unregistered``), or why not."""

    unregistered: bool
    reason: str


Event: TypeAlias = StateChanged | Registered | Failed | Stopped


class _Timer(enum.Enum):
    REFRESH = "refresh"  # half the granted time passed: register again
    RETRY = "retry"  # the back-off after a failure is over
    EXPIRY = "expiry"  # the binding ran out without a successful refresh
    STOP = "stop"  # the unregister got no final answer in time


def refresh_delay(expires: int) -> float:
    """When to refresh a binding granted for ``expires`` seconds: half-way, which for an
    hour leaves 30 minutes (and for a minute 30 s) to get a refresh through."""
    return expires / 2


def _same_contact(a: URI, b: URI) -> bool:
    """Contact URIs compare by user, host and port: registrars add or reorder parameters."""
    return (
        (a.user or "") == (b.user or "")
        and a.host.lower() == b.host.lower()
        and (a.port or 5060) == (b.port or 5060)
    )


def _seconds(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None


def granted_expires(response: Response, contact: URI, requested: int) -> int:
    """The binding's lifetime in a 2xx: our Contact's expires parameter, else the Expires
    header, else what we asked for (RFC 3261 10.2.4)."""
    try:
        contacts = response.contact
    except ValueError:
        contacts = []
    for address in contacts:
        if _same_contact(address.uri, contact):
            seconds = _seconds(address.parameters.get("expires"))
            if seconds is not None:
                return seconds
    seconds = _seconds(response.headers.get("Expires"))
    return requested if seconds is None else seconds


class Registration:
    """The registration of one contact, from the first REGISTER to the unregister.

    Feed it `start`, `receive` (final responses to the REGISTER it last asked to send),
    `no_response` (the transaction timed out or could not be sent), `handle_timer` at
    `next_timer_at` and finally `stop`; after each, send `requests_to_send()` and read
    `next_event()`. One REGISTER is outstanding at a time (RFC 3261 10.2), except that
    `stop` does not wait for one: the unregister's higher CSeq wins at the registrar.
    """

    def __init__(
        self,
        settings: RegistrationSettings,
        *,
        new_via: Callable[[], Via],
        draw: Callable[[], float] = random.random,
        cnonce_factory: Callable[[], str] | None = None,
    ) -> None:
        self.settings = settings
        self.state = RegistrationState.UNREGISTERED
        self.expires = settings.expires  # what the next REGISTER asks for
        self.failures = 0  # failed attempts in a row
        self.binding_until: float | None = None  # end of the last granted binding
        self.stopped = False
        self._new_via = new_via
        self._draw = draw
        self._digest = (
            DigestClient(settings.credentials, cnonce_factory=cnonce_factory)
            if settings.credentials is not None
            else None
        )
        self._cseq = 0
        self._started = False
        self._stopping = False
        self._pending: Request | None = None
        self._preauthorized = False  # the pending REGISTER reuses an earlier nonce
        self._challenge: Response | None = None  # the last 401/407 answered, for its nonce
        self._auth_rounds = 0
        self._interval_rounds = 0
        self._deadlines: dict[_Timer, float] = {}
        self._outgoing: list[Request] = []
        self._events: deque[Event] = deque()

    # -- inputs ---------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Send the first REGISTER."""
        if self._started:
            raise RuntimeError("registration already started")
        self._started = True
        self._register(now, self.expires)

    def stop(self, now: float, timeout: float) -> None:
        """Unregister (expires=0) when a binding may exist, giving up after ``timeout``
        seconds; `Stopped` follows either way and nothing is sent after it."""
        if self.stopped or self._stopping:
            return
        self._stopping = True
        for timer in (_Timer.REFRESH, _Timer.RETRY, _Timer.EXPIRY):
            self._deadlines.pop(timer, None)
        bound = self.state is RegistrationState.REGISTERED or self._pending is not None
        if self.binding_until is not None and self.binding_until > now:
            bound = True
        if not bound:
            self._finish(False, "was not registered")
            return
        self._deadlines[_Timer.STOP] = now + timeout
        self._register(now, 0)

    def receive(self, response: Response, now: float) -> None:
        """A final response to a REGISTER; anything not answering the pending one is
        ignored (a late answer to a REGISTER we gave up on)."""
        pending = self._pending
        if (
            pending is None
            or response.code < 200
            or response.call_id != self.settings.call_id
            or response.cseq.method != "REGISTER"
            or response.cseq.sequence != pending.cseq.sequence
        ):
            return
        self._pending = None
        code = response.code
        if code in (401, 407):
            self._on_challenge(pending, response, now)
        elif self._stopping:
            self._finish(200 <= code < 300, f"{code} {response.phrase}")
        elif 200 <= code < 300:
            self._on_success(response, pending, now)
        elif code == 423:
            self._on_interval_too_brief(response, now)
        else:
            retry_after = _seconds((response.headers.get("Retry-After") or "").split(";")[0])
            self._fail(now, f"{code} {response.phrase}", retry_after)

    def no_response(self, request: Request, now: float, reason: str) -> None:
        """``request`` got no final response (timer F, a transport error, no address)."""
        if self._pending is None or request.cseq.sequence != self._pending.cseq.sequence:
            return
        self._pending = None
        if self._stopping:
            self._finish(False, reason)
        else:
            self._fail(now, reason)

    def handle_timer(self, now: float) -> None:
        """Fire every timer due at ``now``, earliest first."""
        while not self.stopped:
            due = [(at, timer.value, timer) for timer, at in self._deadlines.items() if at <= now]
            if not due:
                return
            _, _, timer = min(due)
            del self._deadlines[timer]
            self._fire(timer, now)

    # -- outputs --------------------------------------------------------------------------

    def next_timer_at(self) -> float | None:
        return min(self._deadlines.values(), default=None)

    def requests_to_send(self) -> list[Request]:
        out, self._outgoing = self._outgoing, []
        return out

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    # -- transitions ----------------------------------------------------------------------

    def _fire(self, timer: _Timer, now: float) -> None:
        if timer in (_Timer.REFRESH, _Timer.RETRY):
            if self._pending is None:
                self._register(now, self.expires)
        elif timer is _Timer.EXPIRY:
            # The refresh is still unanswered (timer F is 32 s; a binding may be shorter):
            # the registrar has dropped us, so the trunk must not be used meanwhile.
            self._set_state(RegistrationState.FAILED, "binding expired before a refresh")
        elif timer is _Timer.STOP:
            self._finish(False, "no answer to the unregister in time")

    def _on_success(self, response: Response, request: Request, now: float) -> None:
        requested = _seconds(request.headers.get("Expires")) or self.expires
        granted = min(granted_expires(response, self.settings.contact, requested), 2**31 - 1)
        if granted <= 0:
            self._fail(now, f"{response.code} {response.phrase} granted no binding")
            return
        self.failures = 0
        self._auth_rounds = 0
        self._interval_rounds = 0
        self.binding_until = now + granted
        self._deadlines.pop(_Timer.RETRY, None)
        self._deadlines[_Timer.REFRESH] = now + refresh_delay(granted)
        self._deadlines[_Timer.EXPIRY] = self.binding_until
        self._events.append(Registered(granted, self.binding_until))
        self._set_state(RegistrationState.REGISTERED, f"registered for {granted} s")

    def _on_challenge(self, request: Request, response: Response, now: float) -> None:
        digest = self._digest
        if digest is None:
            self._stopped_or_failed(now, f"{response.code} challenge, but no credentials")
            return
        if self._auth_rounds >= MAX_AUTH_ROUNDS:
            self._stopped_or_failed(now, f"{response.code} after {self._auth_rounds} answers")
            return
        base = request
        if self._preauthorized:
            # The reused nonce was refused (expired, or the registrar restarted): answer
            # the new challenge as a first one rather than take it as a wrong password.
            base = self._build(_seconds(request.headers.get("Expires")) or 0, request.cseq)
        try:
            retry = digest.authorize(base, response)
        except DigestError as exc:
            self._challenge = None
            self._stopped_or_failed(now, f"authentication failed: {exc}")
            return
        self._auth_rounds += 1
        self._challenge = response
        self._cseq = retry.cseq.sequence
        self._send(retry, preauthorized=False)

    def _on_interval_too_brief(self, response: Response, now: float) -> None:
        minimum = _seconds(response.headers.get("Min-Expires"))
        if minimum is None or minimum <= self.expires:
            self._fail(now, "423 Interval Too Brief without a usable Min-Expires")
            return
        if self._interval_rounds >= MAX_INTERVAL_ROUNDS:
            self._fail(now, f"423 Interval Too Brief {self._interval_rounds} times")
            return
        self._interval_rounds += 1
        self.expires = minimum  # kept for every later REGISTER of this binding
        self._register(now, self.expires)

    def _stopped_or_failed(self, now: float, reason: str) -> None:
        if self._stopping:
            self._finish(False, reason)
        else:
            self._fail(now, reason)

    def _fail(self, now: float, reason: str, retry_after: int | None = None) -> None:
        self.failures += 1
        self._auth_rounds = 0
        self._interval_rounds = 0
        backoff = self.settings.backoff
        delay = backoff.delay(self.failures, self._draw())
        if retry_after is not None:
            delay = max(delay, min(float(retry_after), backoff.maximum))
        self._deadlines.pop(_Timer.REFRESH, None)
        self._deadlines.pop(_Timer.EXPIRY, None)
        self._deadlines[_Timer.RETRY] = now + delay
        self._events.append(Failed(reason, delay))
        self._set_state(RegistrationState.FAILED, reason)

    def _finish(self, unregistered: bool, reason: str) -> None:
        self._deadlines.clear()
        self._pending = None
        self.stopped = True
        if unregistered:
            self.binding_until = None
        self._set_state(RegistrationState.UNREGISTERED, "unregistered" if unregistered else reason)
        self._events.append(Stopped(unregistered, reason))

    def _set_state(self, state: RegistrationState, reason: str) -> None:
        if state is not self.state:
            self._events.append(StateChanged(self.state, state, reason))
            self.state = state

    # -- requests -------------------------------------------------------------------------

    def _register(self, now: float, expires: int) -> None:
        self._cseq += 1
        request = self._build(expires, CSeq(self._cseq, "REGISTER"))
        preauthorized = False
        if self._digest is not None and self._challenge is not None:
            try:
                request = self._digest.with_credentials(request, self._challenge)
                preauthorized = True
            except DigestError:
                self._challenge = None
        self._send(request, preauthorized=preauthorized)

    def _send(self, request: Request, *, preauthorized: bool) -> None:
        self._pending = request
        self._preauthorized = preauthorized
        self._outgoing.append(request)

    def _build(self, expires: int, cseq: CSeq) -> Request:
        settings = self.settings
        request = Request("REGISTER", settings.registrar)
        request.via = [self._new_via()]
        request.max_forwards = 70
        request.from_address = Address(
            uri=settings.aor, parameters=Parameters(tag=settings.from_tag)
        )
        request.to_address = Address(uri=settings.aor)
        request.call_id = settings.call_id
        request.cseq = cseq
        request.contact = [
            Address(uri=settings.contact, parameters=Parameters(expires=str(expires)))
        ]
        request.headers.set("Expires", str(expires))
        request.user_agent = USER_AGENT
        request.content_length = 0
        return request


@dataclass(frozen=True)
class _Binding:
    trunk: str
    sources: frozenset[str]
    until: float


class ContactBindings:
    """Registered contact users and the trunk each belongs to: a new INVITE whose
    Request-URI user is one of them, from one of that trunk's addresses and while the
    binding lasts, is a call the registrar delivered for that trunk."""

    def __init__(self) -> None:
        self._by_user: dict[str, _Binding] = {}

    def bind(self, user: str, trunk: str, sources: Collection[str], until: float) -> None:
        self._by_user[user] = _Binding(trunk, frozenset(sources), until)

    def unbind(self, user: str) -> None:
        self._by_user.pop(user, None)

    def trunk_for(self, user: str | None, source: str, now: float) -> str | None:
        binding = self._by_user.get(user or "")
        if binding is None or now >= binding.until or source not in binding.sources:
            return None
        return binding.trunk
