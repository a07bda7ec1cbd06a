"""What a finished call reports: outcome, SIP cause, timings and the digits pressed."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TypedDict

from gateway.media.dtmf import DtmfMethod


class CallOutcome(str, enum.Enum):
    ANSWERED = "answered"
    BUSY = "busy"
    NO_ANSWER = "no_answer"
    REJECTED = "rejected"
    FAILED = "failed"
    CANCELLED = "cancelled"


class FailureCause(str, enum.Enum):
    """Why a call failed on our side before any final response came back. The SIP code of
    such a call (503, 408) is ours, not the peer's: this says what actually happened."""

    TLS_CERTIFICATE = "tls_certificate_rejected"  # the peer's certificate did not verify
    TLS_HANDSHAKE = "tls_handshake_failed"  # TLS failed otherwise (protocol, cipher...)
    CONNECT = "connect_failed"  # refused, unreachable or timed out
    NO_RESPONSE = "no_response"  # the INVITE went out; nothing came back (timer B)


_BUSY = {486, 600}
_NO_ANSWER = {408, 480}
_REJECTED = {401, 403, 404, 407, 484, 485, 488, 603, 604, 606}


def classify_final(code: int) -> CallOutcome:
    """Map a final INVITE response code to an outcome.

    487 is not mapped here: whether it means "no answer" or "cancelled" depends on why
    we cancelled, which only the caller knows. A 3xx that is not followed (Gateway.dial
    without ``redirects``, or a refused target) counts as a failure.
    """
    if 200 <= code < 300:
        return CallOutcome.ANSWERED
    if code in _BUSY:
        return CallOutcome.BUSY
    if code in _NO_ANSWER:
        return CallOutcome.NO_ANSWER
    if code in _REJECTED:
        return CallOutcome.REJECTED
    return CallOutcome.FAILED


@dataclass(frozen=True)
class ReceivedDigit:
    digit: str
    method: DtmfMethod
    at_ms: int  # since the call was answered


class Timings(TypedDict):
    """The timing fields of a CallResult, as `CallTimes.timings` derives them."""

    pdd_ms: int | None
    answer_delay_ms: int | None
    answer_time: str | None
    duration_ms: int


def _ms(start: float | None, end: float | None) -> int | None:
    return None if start is None or end is None else int((end - start) * 1000)


@dataclass
class CallTimes:
    """A call's milestones on the loop clock, and the answer's wall-clock time. Every call
    result's timing fields come from here, for our SIP calls and carrier API calls alike."""

    started: float | None = None  # the INVITE went out / the carrier took the request
    first_response: float | None = None  # ringing (18x), or the final answer without it
    answered: float | None = None
    answer_time: str | None = None  # ISO 8601 UTC of the answer

    def start(self, now: float) -> None:
        if self.started is None:
            self.started = now

    def respond(self, now: float) -> None:
        if self.first_response is None:
            self.first_response = now

    def answer(self, now: float) -> None:
        self.respond(now)
        self.answered = now
        self.answer_time = datetime.now(UTC).isoformat(timespec="milliseconds")

    def since_answer_ms(self, now: float) -> int:
        """When a digit came, counted from the answer (0 before it)."""
        return _ms(self.answered, now) or 0

    def timings(self, now: float, *, duration_ms: int | None = None) -> Timings:
        """The result's timing fields at `now`; `duration_ms` when the carrier measured it."""
        return Timings(
            pdd_ms=_ms(self.started, self.first_response),
            answer_delay_ms=_ms(self.started, self.answered),
            answer_time=self.answer_time,
            duration_ms=(duration_ms if duration_ms is not None else self.since_answer_ms(now))
            if self.answered is not None
            else 0,
        )


@dataclass
class CallResult:
    """The record of one call, printed by ``ackline call --json`` and kept by the engine."""

    outcome: CallOutcome
    sip_code: int | None
    reason: str
    direction: str  # "outbound" | "inbound"
    target: str
    call_id: str
    transport: str
    codec: str | None = None  # negotiated audio codec (the answerer's choice)
    pdd_ms: int | None = None  # INVITE sent -> first 18x (or final response without one)
    answer_delay_ms: int | None = None  # INVITE sent -> 200 OK
    answer_time: str | None = None  # ISO 8601 UTC wall-clock time of the 200 OK
    duration_ms: int = 0  # answer -> end of call
    hangup_by: str | None = None  # "local" | "remote" | None when never answered
    received: list[ReceivedDigit] = field(default_factory=list)
    authenticated: bool = False
    # 3xx redirects followed, in order (target_key form); the call went to the last one
    redirected_to: list[str] = field(default_factory=list)
    srtp: bool = False  # media was SRTP (SDES keys, RFC 4568) when answered
    # Ended by its RFC 4028 session timer (the peer stopped refreshing, or our refresh
    # failed): the reason says which. Not a hang-up by either person.
    session_expired: bool = False
    failure: FailureCause | None = None  # a failure of ours (see FailureCause); else None

    @property
    def digits(self) -> str:
        return "".join(d.digit for d in self.received)

    @property
    def dtmf_method(self) -> str | None:
        """The method that delivered the digits ("mixed" when more than one did)."""
        methods = {d.method for d in self.received}
        if not methods:
            return None
        return methods.pop() if len(methods) == 1 else "mixed"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["outcome"] = self.outcome.value
        data["digits"] = self.digits
        data["dtmf_method"] = self.dtmf_method
        data["dtmf"] = data.pop("received")
        data["failure"] = self.failure.value if self.failure is not None else None
        return data


class PlacedCall(Protocol):
    """What routing and the voice channel read of a call they placed, whoever carries it:
    our SIP stack (gateway.call.Call) or a carrier's API (carriers' TwilioCall). Anything
    only one kind has is reached after an isinstance check, never by duck typing."""

    call_id: str
    target: str
    transport: str
    direction: str
    answered: bool
    responded: asyncio.Event  # the far side took the call on (a provisional or final answer)
    ended: asyncio.Event
    result: CallResult | None  # set once `ended` is

    @property
    def digits(self) -> str: ...

    async def hangup(self) -> CallResult: ...
