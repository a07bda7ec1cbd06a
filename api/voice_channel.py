"""Channel "voice": ring the responder through the gateway and ask for a keypress.

The call runs the IVR ack flow: it speaks the alert and offers 1 (acknowledge), 2
(escalate now), 3 (resolve), 4 (snooze, when the policy allows it) and 9 (repeat), and
confirms the choice aloud. Only a real keypress acknowledges: an answered call
without a digit, or one answering machine detection says is a machine, counts as not
acknowledged so the chain moves on. Every way
a call can fail is classified for the engine, so busy or a carrier 5xx retries or falls
back at once instead of waiting for a timer.

It lives in api because it composes layers that do not import each other: the
escalation engine's channel interface with the IVR's ack flow (over carriers and gateway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from carriers.router import CarrierRouter, RoutedCall
from carriers.twilio_voice import TwilioCall
from escalation.channels.base import (
    DeliveryResult,
    DeliveryStatus,
    Notification,
    Progress,
    ProgressSink,
    ignore_progress,
)
from gateway.call import Call, Gateway
from gateway.result import CallOutcome, CallResult, PlacedCall
from gateway.sip.auth import Credentials
from ivr.builtin import AckOutcome, ack_flow, run_ack_flow
from ivr.flow import Flow
from ivr.twiml import machine_detection

__all__ = [
    "AckMenu",
    "CarrierDialer",
    "DialedCall",
    "Dialer",
    "SipUriDialer",
    "VoiceChannel",
    "ack_conversation",
    "classify_call",
]

log = logging.getLogger(__name__)

OnCall = Callable[[PlacedCall], None]
# How long an answered alert call may last. The ack menu takes about a minute (three
# prompts, six seconds for a key after each); a call still going after this is stuck
# (a far end that never hangs up, a Twilio call whose reports stopped) and is ended.
MAX_CALL = 300.0
# After the call's own bound (Dialer.time_bound), time for the flow's last words and the
# result to be handed over.
RESULT_SLACK = 5.0
LATE_KEY_WAIT = 1.0  # after a Twilio call ended without a verdict, for a report overtaken

# SIP codes that say the number itself is wrong: no retry on this channel can fix it.
_PERMANENT_CODES = frozenset({404, 484, 485, 604})


@dataclass(frozen=True)
class DialedCall:
    """A placed call plus how it was routed (trunk used, trunks tried), for the audit."""

    call: PlacedCall
    details: Mapping[str, str] = field(default_factory=dict)
    # told how the answered call went: seconds from answer to the responder's key, or
    # None without one (the route's quality statistics learn from it)
    on_answered: Callable[[float | None], None] | None = None


class Dialer(Protocol):
    """Turns a recipient's phone number into a placed call (a SIP URI, a carrier route).

    Raises ValueError when the number can never be called (invalid, refused) and OSError
    when no route works right now. `context` names the alert and notification, for calls
    whose flow runs elsewhere (a Twilio trunk asks our webhooks what to say);
    `needs_media` asks for a call whose audio we carry (bridging), i.e. not a Twilio one.
    """

    async def dial(
        self,
        number: str,
        *,
        ring_timeout: float,
        on_call: OnCall,
        context: Mapping[str, str] | None = None,
        needs_media: bool = False,
        max_duration: float | None = None,
    ) -> DialedCall: ...

    def time_bound(self, ring_timeout: float, max_duration: float) -> float:
        """The longest `dial` plus the call it returns can take, hang-up included, whatever
        the far end does (see gateway.call.call_time_bound)."""
        ...


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

    async def dial(
        self,
        number: str,
        *,
        ring_timeout: float,
        on_call: OnCall,
        context: Mapping[str, str] | None = None,
        needs_media: bool = False,
        max_duration: float | None = None,
    ) -> DialedCall:
        target = self.template.format(number=number)
        call = await self.gateway.dial(
            target,
            credentials=self.credentials,
            ring_timeout=ring_timeout,
            transport=self.transport,
            on_call=on_call,
            max_duration=max_duration,
        )
        return DialedCall(call, {"target": target})

    def time_bound(self, ring_timeout: float, max_duration: float) -> float:
        return self.gateway.call_time_bound(ring_timeout, max_duration)


@dataclass
class CarrierDialer:
    """Routes the call through the carrier trunks (rotation, health, failover, fraud guard).

    `on_routed` sees every routing decision (e.g. to audit it); the delivery result's
    details carry the trunk used and every trunk tried, in order, with its SIP code.
    """

    router: CarrierRouter
    on_routed: Callable[[RoutedCall], None] | None = None

    async def dial(
        self,
        number: str,
        *,
        ring_timeout: float,
        on_call: OnCall,
        context: Mapping[str, str] | None = None,
        needs_media: bool = False,
        max_duration: float | None = None,
    ) -> DialedCall:
        routed = await self.router.place_call(
            number, ring_timeout=ring_timeout, on_call=on_call, context=context,
            needs_media=needs_media, max_duration=max_duration,
        )  # fmt: skip
        if self.on_routed is not None:
            try:
                self.on_routed(routed)
            except Exception:
                log.exception("on_routed hook failed")
        tried = ",".join(f"{a.trunk}:{a.sip_code or a.outcome.value}" for a in routed.attempts)
        details = {"trunk": routed.trunk or "", "trunks_tried": tried}
        trunk, quality = routed.trunk, self.router.quality

        def on_answered(seconds: float | None) -> None:
            if trunk is not None:
                quality.record_ack(trunk, seconds)

        return DialedCall(routed.call, details, on_answered)

    def time_bound(self, ring_timeout: float, max_duration: float) -> float:
        return self.router.time_bound(ring_timeout, max_duration)


@dataclass(frozen=True)
class AckMenu:
    """How the acknowledgement call behaves (the built-in IVR ack flow's knobs)."""

    prompts: int = 3  # times the menu is offered before giving up (no key / wrong key)
    digit_timeout: float = 6.0  # wait for a key after each prompt
    amd: bool = False  # classify human vs answering machine before the prompt
    machine_message: str | None = None  # said after the beep; None hangs up on a machine
    resolve: bool = True  # 3 resolves
    snooze: float | None = None  # 4 pauses the chain this long (seconds); None: not offered

    def flow(self) -> Flow:
        return ack_flow(
            retries=max(0, self.prompts - 1),
            digit_timeout=self.digit_timeout,
            amd=self.amd,
            machine_message=self.machine_message,
            resolve=self.resolve,
            snooze=self.snooze,
        )


Conversation = Callable[[Call, Notification], Awaitable[str]]
# What each key's outcome tells the engine. These are reported the moment the key is
# pressed; the flow's spoken confirmation plays afterwards.
KEYED: Mapping[str, tuple[DeliveryStatus, str]] = {
    AckOutcome.ACKNOWLEDGED: (DeliveryStatus.ACKNOWLEDGED, "pressed_1"),
    AckOutcome.ESCALATE: (DeliveryStatus.ESCALATE, "pressed_2"),
    AckOutcome.RESOLVED: (DeliveryStatus.RESOLVED, "pressed_3"),
    AckOutcome.SNOOZED: (DeliveryStatus.SNOOZE, "pressed_4"),
}
EARLY_OUTCOMES = frozenset(KEYED)


def ack_conversation(flow: Flow, *, finish_timeout: float = 30.0) -> Conversation:
    """Run the ack flow on an answered call; returns one of ivr's ACK_OUTCOMES.

    An acknowledgement (or escalate) is returned as soon as the flow decides it, while the
    flow finishes (thank-you message, hang-up) in the background, bounded by
    `finish_timeout`, so the engine can stop everything else at once.
    """

    async def converse(call: Call, n: Notification) -> str:
        variables = {
            "alert_severity": n.severity,
            "alert_title": n.title,
            "alert_summary": n.summary,
        }
        decided: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        def on_outcome(outcome: str) -> None:
            if outcome in EARLY_OUTCOMES and not decided.done():
                decided.set_result(outcome)

        flow_run = asyncio.ensure_future(
            run_ack_flow(call, variables, flow=flow, on_outcome=on_outcome)
        )
        waiting: set[asyncio.Future[Any]] = {flow_run, decided}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not flow_run.done():
            call.gateway.spawn(_finish(call, flow_run, finish_timeout))
            return decided.result()
        decided.cancel()
        result = flow_run.result()
        if result.error:
            log.warning("ack flow on %s ended with an error: %s", call.call_id, result.error)
        return result.outcome

    return converse


async def _finish(call: Call, flow_run: asyncio.Future[Any], timeout: float) -> None:
    """Let the flow say goodbye, then make sure the call is over."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(flow_run, timeout)
    if not call.ended.is_set():
        with contextlib.suppress(Exception):
            await call.hangup()


def classify_call(
    result: CallResult, outcome: str, route: Mapping[str, str] | None = None
) -> DeliveryResult:
    """Map a finished call and the ack flow's outcome to what the engine does next."""
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

    if result.outcome is CallOutcome.ANSWERED:
        if outcome in KEYED:
            return done(*KEYED[outcome])
        if outcome == AckOutcome.MACHINE:
            return done(DeliveryStatus.NOT_ACKNOWLEDGED, "answering_machine")
        if result.session_expired:  # the line died under the call (RFC 4028), not a person
            return done(DeliveryStatus.NOT_ACKNOWLEDGED, "session_expired")
        if result.hangup_by == "remote" and not result.digits:
            return done(DeliveryStatus.NOT_ACKNOWLEDGED, "hung_up_without_digit")
        return done(DeliveryStatus.NOT_ACKNOWLEDGED, "no_valid_digit")
    if result.outcome is CallOutcome.BUSY:
        return done(DeliveryStatus.FAILED_RETRYABLE, "busy")
    if result.outcome is CallOutcome.NO_ANSWER:
        return done(DeliveryStatus.FAILED_RETRYABLE, "no_answer")
    if result.outcome is CallOutcome.CANCELLED:
        return done(DeliveryStatus.CANCELLED, "call_cancelled")
    if result.failure is not None:
        # Our own failure (a certificate that did not verify, a refused connection, no
        # response): its kind is the reason, not the SIP code we gave it; the detail too.
        details["error"] = result.reason
        return done(DeliveryStatus.FAILED_RETRYABLE, result.failure.value)
    code = result.sip_code
    if result.outcome is CallOutcome.REJECTED:
        status = (
            DeliveryStatus.FAILED_PERMANENT
            if code in _PERMANENT_CODES
            else DeliveryStatus.FAILED_RETRYABLE
        )
        return done(status, f"rejected_sip_{code}" if code else "rejected")
    return done(DeliveryStatus.FAILED_RETRYABLE, f"sip_{code}" if code else "no_response")


async def _twilio_outcome(call: TwilioCall, limit: float) -> str:
    """Wait for the flow's verdict (a keypress, from our Gather webhook) or the call's end;
    Twilio says goodbye and hangs up by itself. A call whose reports stop within `limit`
    seconds is given up on (the caller hangs it up)."""
    waiters = {
        asyncio.ensure_future(call.decided.wait()),
        asyncio.ensure_future(call.ended.wait()),
    }
    try:
        await asyncio.wait(waiters, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
    if call.outcome is None and call.answered and call.ended.is_set():
        # the final status may overtake the last keypress's report (two API processes)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(call.decided.wait(), LATE_KEY_WAIT)
    if call.outcome is not None:
        return call.outcome
    if call.answered_by.startswith("machine") or call.answered_by == "fax":
        return AckOutcome.MACHINE
    return ""


async def _end_eventually(call: TwilioCall) -> None:
    """Twilio hangs up after the goodbye; if its final report never comes, end it anyway
    (the trunk's call count waits for the end)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(call.ended.wait(), 60.0)
    if not call.ended.is_set():
        with contextlib.suppress(Exception):
            await call.hangup()


def early_result(call: PlacedCall, outcome: str, route: Mapping[str, str]) -> DeliveryResult:
    """The result of a call that is still saying goodbye: the key has been pressed."""
    status, reason = KEYED[outcome]
    details = {**route, "call_id": call.call_id, "digits": call.digits, "sip_code": "200"}
    return DeliveryResult(status, reason, provider_id=call.call_id or None, details=details)


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
        flow: Flow | None = None,
        conversation: Conversation | None = None,
        flows: Mapping[str, Flow] | None = None,
        max_call: float = MAX_CALL,
    ) -> None:
        """`flows` maps a policy name to the flow its calls run (else the default menu);
        an answered call is ended after `max_call` seconds whatever its flow does."""
        self._dialer = dialer
        self._ring_timeout = ring_timeout
        self._max_call = max_call
        self._flow = flow or (menu or AckMenu()).flow()
        self._flows = dict(flows or {})
        self._conversation = conversation or ack_conversation(self._flow)
        self._policy_conversations = {
            policy: ack_conversation(flow) for policy, flow in self._flows.items()
        }
        self._active: dict[str, PlacedCall | None] = {}  # in-flight notification -> its call
        self._cancelled: set[str] = set()  # only ever holds keys of _active
        self._background: set[asyncio.Future[Any]] = set()

    def deadline(self, notification: Notification) -> float:
        """The dial and call's own bound (every trunk tried, ringing, the call, the
        hang-up), and a moment for the result."""
        return self._dialer.time_bound(self._ring_timeout, self._max_call) + RESULT_SLACK

    async def send(
        self, notification: Notification, progress: ProgressSink = ignore_progress
    ) -> DeliveryResult:
        nid = notification.notification_id
        number = notification.contact.phone
        if not number:
            return DeliveryResult(DeliveryStatus.FAILED_PERMANENT, "no_phone")
        self._active[nid] = None

        def track(call: PlacedCall) -> None:
            self._active[nid] = call
            if nid in self._cancelled:  # the ack raced the dial: never let it ring
                self._spawn(call.hangup())

        try:
            dialed = await self._dialer.dial(
                number, ring_timeout=self._ring_timeout, on_call=track,
                context=self._context(notification), max_duration=self._max_call,
            )  # fmt: skip
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
            outcome = ""
            answered_at = time.monotonic()
            if call.answered:
                progress(Progress.ANSWERED)
            if isinstance(call, TwilioCall):
                outcome = await _twilio_outcome(call, self._max_call)
            elif isinstance(call, Call) and call.answered and not call.ended.is_set():
                converse = self._policy_conversations.get(notification.policy)
                try:
                    async with asyncio.timeout(self._max_call):
                        outcome = await (converse or self._conversation)(call, notification)
                except TimeoutError:
                    log.warning("call %s: still going after %gs; hanging up", call.call_id,
                                self._max_call)  # fmt: skip
            if call.answered and dialed.on_answered is not None and outcome != AckOutcome.MACHINE:
                keyed = outcome in EARLY_OUTCOMES  # a person pressed a key that got through
                dialed.on_answered(time.monotonic() - answered_at if keyed else None)
            if outcome in EARLY_OUTCOMES and not call.ended.is_set():
                if isinstance(call, TwilioCall):
                    self._spawn(_end_eventually(call))
                return early_result(call, outcome, dialed.details)  # goodbye still playing
            result = await call.hangup()
        finally:
            cancelled = nid in self._cancelled
            self._forget(nid)
        if cancelled:
            return DeliveryResult(
                DeliveryStatus.CANCELLED, "alert_closed", provider_id=result.call_id or None
            )
        return classify_call(result, outcome, dialed.details)

    async def cancel(self, notification_id: str) -> None:
        """Hang up politely; a call not placed yet is never placed."""
        if notification_id not in self._active:
            return  # finished already, or never ours
        self._cancelled.add(notification_id)
        call = self._active[notification_id]
        if call is not None and not call.ended.is_set():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(call.hangup(), timeout=10.0)

    def _context(self, n: Notification) -> dict[str, str]:
        """What a Twilio call's webhooks need to run this notification's flow."""
        context = {"alert": n.alert_id, "notification": n.notification_id, "policy": n.policy}
        detection = machine_detection(self._flows.get(n.policy, self._flow))
        if detection:
            context["machine_detection"] = detection
        return context

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _forget(self, nid: str) -> None:
        self._active.pop(nid, None)
        self._cancelled.discard(nid)
