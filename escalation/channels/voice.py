"""Channel "voice": ring the responder through the gateway and ask for a keypress.

The call speaks the alert and offers 1 (acknowledge), 2 (escalate now) and 9 (repeat).
Only a real keypress acknowledges: an answered call without a digit, which is what a
voicemail pickup looks like, counts as not acknowledged so the chain moves on. Every way
a call can fail is classified for the engine, so busy or a carrier 5xx retries or falls
back at once instead of waiting for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from carriers.router import CarrierRouter, RoutedCall
from escalation.channels.base import DeliveryResult, DeliveryStatus, Notification
from gateway.call import Call, Gateway
from gateway.result import CallOutcome, CallResult
from gateway.sip.auth import Credentials

__all__ = [
    "AckMenu",
    "CarrierDialer",
    "DialedCall",
    "Dialer",
    "SipUriDialer",
    "VoiceChannel",
    "ack_prompt",
    "classify_call",
    "run_ack_menu",
]

log = logging.getLogger(__name__)

OnCall = Callable[[Call], None]

# SIP codes that say the number itself is wrong: no retry on this channel can fix it.
_PERMANENT_CODES = frozenset({404, 484, 485, 604})


@dataclass(frozen=True)
class DialedCall:
    """A placed call plus how it was routed (trunk used, trunks tried), for the audit."""

    call: Call
    details: Mapping[str, str] = field(default_factory=dict)


class Dialer(Protocol):
    """Turns a recipient's phone number into a placed call (a SIP URI, a carrier route).

    Raises ValueError when the number can never be called (invalid, refused) and OSError
    when no route works right now.
    """

    async def dial(self, number: str, *, ring_timeout: float, on_call: OnCall) -> DialedCall: ...


@dataclass
class SipUriDialer:
    """Dials `template` with the number filled in, e.g. ``sip:{number}@127.0.0.1:5090``.

    The simplest route: one SIP trunk or PBX that accepts E.164 in the request URI.
    """

    gateway: Gateway
    template: str
    credentials: Credentials | None = None
    transport: str | None = None

    def __post_init__(self) -> None:
        if "{number}" not in self.template:
            raise ValueError("voice target template must contain {number}")

    async def dial(self, number: str, *, ring_timeout: float, on_call: OnCall) -> DialedCall:
        target = self.template.format(number=number)
        call = await self.gateway.dial(
            target,
            credentials=self.credentials,
            ring_timeout=ring_timeout,
            transport=self.transport,
            on_call=on_call,
        )
        return DialedCall(call, {"target": target})


@dataclass
class CarrierDialer:
    """Routes the call through the carrier trunks (rotation, health, failover, fraud guard).

    `on_routed` sees every routing decision (e.g. to audit it); the delivery result's
    details carry the trunk used and every trunk tried, in order, with its SIP code.
    """

    router: CarrierRouter
    on_routed: Callable[[RoutedCall], None] | None = None

    async def dial(self, number: str, *, ring_timeout: float, on_call: OnCall) -> DialedCall:
        routed = await self.router.place_call(number, ring_timeout=ring_timeout, on_call=on_call)
        if self.on_routed is not None:
            try:
                self.on_routed(routed)
            except Exception:
                log.exception("on_routed hook failed")
        tried = ",".join(f"{a.trunk}:{a.sip_code or a.outcome.value}" for a in routed.attempts)
        return DialedCall(routed.call, {"trunk": routed.trunk or "", "trunks_tried": tried})


@dataclass(frozen=True)
class AckMenu:
    """How patient the acknowledgement menu is."""

    prompts: int = 3  # times the menu is spoken before giving up (9 = repeat counts too)
    digit_timeout: float = 6.0  # wait for a key after each prompt
    invalid_prompt: str = "Sorry, that is not a valid choice."


def ack_prompt(n: Notification) -> str:
    return (
        f"{n.severity} alert. {n.title}. {n.summary}. "
        "Press 1 to acknowledge, 2 to escalate now, 9 to repeat."
    )


async def run_ack_menu(call: Call, n: Notification, menu: AckMenu) -> str:
    """Speak the alert and return "1", "2" or "" (no valid choice, or the call ended)."""
    prompt = ack_prompt(n)
    for _ in range(menu.prompts):
        if call.ended.is_set():
            break
        await call.play(prompt, barge_in=True)
        digit = await call.collect(1, menu.digit_timeout, terminators="")
        if digit in ("1", "2"):
            return digit
        if digit and digit != "9" and not call.ended.is_set():
            await call.play(menu.invalid_prompt, barge_in=True)
    return ""


def classify_call(
    result: CallResult, choice: str, route: Mapping[str, str] | None = None
) -> DeliveryResult:
    """Map a finished call and the key pressed to what the engine does next."""
    details = {
        **(route or {}),
        "sip_code": str(result.sip_code or ""),
        "call_id": result.call_id,
        "digits": result.digits,
        "dtmf_method": result.dtmf_method or "",
        "pdd_ms": str(result.pdd_ms if result.pdd_ms is not None else ""),
        "duration_ms": str(result.duration_ms),
    }

    def done(status: DeliveryStatus, reason: str) -> DeliveryResult:
        return DeliveryResult(status, reason, provider_id=result.call_id or None, details=details)

    outcome = result.outcome
    if outcome is CallOutcome.ANSWERED:
        if choice == "1":
            return done(DeliveryStatus.ACKNOWLEDGED, "pressed_1")
        if choice == "2":
            return done(DeliveryStatus.ESCALATE, "pressed_2")
        if result.hangup_by == "remote" and not result.digits:
            return done(DeliveryStatus.NOT_ACKNOWLEDGED, "hung_up_without_digit")
        return done(DeliveryStatus.NOT_ACKNOWLEDGED, "no_valid_digit")
    if outcome is CallOutcome.BUSY:
        return done(DeliveryStatus.FAILED_RETRYABLE, "busy")
    if outcome is CallOutcome.NO_ANSWER:
        return done(DeliveryStatus.FAILED_RETRYABLE, "no_answer")
    if outcome is CallOutcome.CANCELLED:
        return done(DeliveryStatus.CANCELLED, "call_cancelled")
    code = result.sip_code
    if outcome is CallOutcome.REJECTED:
        status = (
            DeliveryStatus.FAILED_PERMANENT
            if code in _PERMANENT_CODES
            else DeliveryStatus.FAILED_RETRYABLE
        )
        return done(status, f"rejected_sip_{code}" if code else "rejected")
    return done(DeliveryStatus.FAILED_RETRYABLE, f"sip_{code}" if code else "no_response")


def _reason(exc: Exception, default: str) -> str:
    """A dialer's error may name its own reason (e.g. "fraud_refused", "no_route")."""
    reason = getattr(exc, "reason_code", None)
    return reason if isinstance(reason, str) and reason else default


class VoiceChannel:
    """Phone calls with a keypad acknowledgement; `cancel` hangs up (CANCEL or BYE)."""

    name = "voice"

    def __init__(
        self,
        dialer: Dialer,
        *,
        ring_timeout: float = 30.0,
        menu: AckMenu | None = None,
        conversation: Callable[[Call, Notification, AckMenu], Awaitable[str]] = run_ack_menu,
    ) -> None:
        self._dialer = dialer
        self._ring_timeout = ring_timeout
        self._menu = menu or AckMenu()
        self._conversation = conversation
        self._active: dict[str, Call | None] = {}  # in-flight notification -> its call
        self._cancelled: set[str] = set()  # only ever holds keys of _active

    async def send(self, notification: Notification) -> DeliveryResult:
        nid = notification.notification_id
        number = notification.contact.phone
        if not number:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_phone")
        self._active[nid] = None

        def track(call: Call) -> None:
            self._active[nid] = call
            if nid in self._cancelled:  # the ack raced the dial: never let it ring
                call.gateway.spawn(call.hangup())

        try:
            dialed = await self._dialer.dial(number, ring_timeout=self._ring_timeout, on_call=track)
        except ValueError as exc:  # the number cannot become a valid target, or is refused
            self._forget(nid)
            reason = _reason(exc, "invalid_target")
            return DeliveryResult(
                DeliveryStatus.FAILED_PERMANENT, reason, details={"error": str(exc)}
            )
        except OSError as exc:  # no route right now: DNS, sockets, every carrier failing
            self._forget(nid)
            reason = _reason(exc, "transport_error")
            return DeliveryResult(
                DeliveryStatus.FAILED_RETRYABLE, reason, details={"error": str(exc)}
            )
        call = dialed.call
        try:
            choice = ""
            if call.answered and not call.ended.is_set():
                choice = await self._conversation(call, notification, self._menu)
            result = await call.hangup()
        finally:
            cancelled = nid in self._cancelled
            self._forget(nid)
        if cancelled:
            return DeliveryResult(
                DeliveryStatus.CANCELLED, "alert_closed", provider_id=result.call_id or None
            )
        return classify_call(result, choice, dialed.details)

    async def cancel(self, notification_id: str) -> None:
        """Hang up politely; a call not placed yet is never placed."""
        if notification_id not in self._active:
            return  # finished already, or never ours
        self._cancelled.add(notification_id)
        call = self._active[notification_id]
        if call is not None and not call.ended.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.hangup(), timeout=10.0)

    def _forget(self, nid: str) -> None:
        self._active.pop(nid, None)
        self._cancelled.discard(nid)
