"""Calls through Twilio's Voice REST API: the `twilio` trunk kind.

A SIP trunk's call is ours end to end: signalling, RTP, and the IVR flow on the audio. A
Twilio call is Twilio's. We create it over REST, Twilio runs the TwiML our API serves
(`ivr.twiml` renders the same flow), and Twilio reports progress in signed webhooks.
`TwilioCall` turns those reports into the `CallResult` a SIP call ends with, so the
router's failover, the breaker and the voice channel treat both kinds alike.

The webhooks reach the API process, but the call may have been placed by a worker in
another process. `CallEvents` carries the reports over Redis pub/sub when REDIS_URL is
set, and inside the process otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from redis.exceptions import RedisError
from twilio.base.exceptions import TwilioRestException  # type: ignore[import-untyped]

from carriers.trunk import Trunk
from carriers.twilio_api import twilio_client
from gateway.media.dtmf import DtmfMethod
from gateway.result import CallOutcome, CallResult, CallTimes, ReceivedDigit
from storage.outage import FailureLog, down_dependency

__all__ = [
    "CallEvents",
    "TwilioCall",
    "TwilioRejected",
    "TwilioVoice",
    "voice_webhook_urls",
]

logger = logging.getLogger(__name__)

FINAL_STATUSES = frozenset({"completed", "busy", "no-answer", "failed", "canceled"})
# Twilio REST errors about the number itself (no carrier can fix them): 21211 invalid To,
# 13224 invalid phone number, 21215 geo permission (this account may not call there),
# 21216 blocked/premium destination, 21217 not a reachable number.
NUMBER_ERRORS = frozenset({21211, 13224, 21215, 21216, 21217})
_EARLY_LIMIT = 1000  # reports for calls not registered yet (they can beat the REST answer)
_EARLY_TTL = 60.0
HANGUP_WAIT = 10.0  # for Twilio's final report after we asked it to end the call
DIGIT_METHOD = DtmfMethod.TWILIO_GATHER


class TwilioRejected(ValueError):
    """Twilio refused the call because of the number: no other trunk should try it."""

    reason_code = "invalid_target"


def voice_webhook_urls(public_url: str) -> tuple[str, str]:
    """(answer URL, status callback URL) under our public URL."""
    base = public_url.rstrip("/") + "/v1/webhooks/twilio/voice"
    return base, base + "/status"


class TwilioCall:
    """One outbound Twilio call, seen through its status and Gather webhooks.

    A `gateway.result.PlacedCall`, as `gateway.call.Call` is: what the router and the
    voice channel read of a call, whoever carries it (mypy checks both kinds conform).
    """

    transport = "twilio"
    direction = "outbound"

    def __init__(self, trunk: Trunk, to: str, client: Any) -> None:
        self.trunk = trunk
        self.target = to
        self.call_id = ""  # the CallSid, once Twilio accepted the call
        self.responded = asyncio.Event()  # Twilio accepted it (its 100 Trying)
        self.answered = False
        self.ended = asyncio.Event()
        self.result: CallResult | None = None
        self.outcome: str | None = None  # what the flow decided on a keypress
        self.decided = asyncio.Event()
        self.answered_by = ""
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._times = CallTimes()
        self._times.start(self._loop.time())
        self._digits: list[ReceivedDigit] = []
        self._hangup_requested = False
        self._state_changed = asyncio.Event()
        self.on_end: Callable[[TwilioCall], None] | None = None

    @property
    def digits(self) -> str:
        return "".join(d.digit for d in self._digits)

    async def wait_answered_or_ended(self, timeout: float) -> None:
        """Like `Gateway.dial`: return once the callee picked up or the call is over."""
        deadline = self._loop.time() + timeout
        while not (self.answered or self.ended.is_set()):
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                await self._finish_from_rest("no answer or report within the ring time")
                return
            self._state_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), remaining)

    # -- reports from Twilio -----------------------------------------------------------

    def on_report(self, report: Mapping[str, str]) -> None:
        """A status callback, or our own Gather webhook's verdict (`kind` = "gather")."""
        if report.get("kind") == "gather" and self.ended.is_set() and self.result is not None:
            # A keypress reported after the end (another API process was faster with the
            # final status): it still counts.
            self._on_gather(report.get("digit", ""), report.get("outcome", ""), True)
            self.result.received = list(self._digits)
            return
        if self.ended.is_set():
            return
        if report.get("kind") == "gather":
            self._on_gather(
                report.get("digit", ""), report.get("outcome", ""), bool(report.get("decided"))
            )
        else:
            self._on_status(report)
        self._state_changed.set()

    def _on_gather(self, digit: str, outcome: str, decided: bool) -> None:
        """`decided`: the outcome stands (acknowledged) even while Twilio says goodbye."""
        if not self.answered:  # a key means it was answered; that report may still come
            self._mark_answered()
        if digit:
            at = self._times.since_answer_ms(self._loop.time())
            self._digits.append(ReceivedDigit(digit, DIGIT_METHOD, at))
        if outcome and not self.decided.is_set():
            self.outcome = outcome
            if decided:
                self.decided.set()

    def _on_status(self, report: Mapping[str, str]) -> None:
        status = report.get("CallStatus", "")
        self.answered_by = report.get("AnsweredBy") or self.answered_by
        if status == "ringing":
            self._times.respond(self._loop.time())
        elif status in ("in-progress", "answered") and not self.answered:
            self._mark_answered()
        elif status in FINAL_STATUSES:
            self._finish(status, report)

    def _mark_answered(self) -> None:
        self.answered = True
        self._times.answer(self._loop.time())

    def _finish(self, status: str, report: Mapping[str, str]) -> None:
        sip_code = _int(report.get("SipResponseCode"))
        duration_s = _int(report.get("CallDuration")) or 0
        if status == "completed" and not self.answered and duration_s > 0:
            self._mark_answered()  # the in-progress report was lost or not subscribed
        outcome, code, reason = _final(status, sip_code, self.answered)
        self.result = CallResult(
            outcome=outcome,
            sip_code=code,
            reason=reason,
            direction=self.direction,
            target=self.target,
            call_id=self.call_id,
            transport=self.transport,
            **self._times.timings(self._loop.time(), duration_ms=duration_s * 1000),
            hangup_by=(
                ("local" if self._hangup_requested else "remote") if self.answered else None
            ),
            received=list(self._digits),
        )
        self.ended.set()
        if self.on_end is not None:
            self.on_end(self)

    # -- control ---------------------------------------------------------------------

    async def hangup(self) -> CallResult:
        """End the call (canceled while ringing, completed once answered) and return its
        result, from Twilio's final report or, failing that, from the REST resource."""
        if not self.ended.is_set():
            self._hangup_requested = True
            if not self.call_id:  # Twilio has not accepted it yet: cancel once it has
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.responded.wait(), HANGUP_WAIT)
                if not self.call_id:
                    self._finish("canceled", {})
                    assert self.result is not None
                    return self.result
            status = "completed" if self.answered else "canceled"
            try:
                await asyncio.to_thread(self._client.calls(self.call_id).update, status=status)
            except (TwilioRestException, OSError) as exc:
                logger.warning("twilio call %s: hangup failed: %s", self.call_id, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ended.wait(), HANGUP_WAIT)
            if not self.ended.is_set():
                await self._finish_from_rest("no final report after hangup")
        assert self.result is not None
        return self.result

    async def _finish_from_rest(self, why: str) -> None:
        """Webhooks lost (or our public URL unreachable): ask Twilio for the call's state."""
        try:
            resource = await asyncio.to_thread(self._client.calls(self.call_id).fetch)
        except (TwilioRestException, OSError) as exc:
            logger.warning("twilio call %s: %s, and fetching it failed: %s", self.call_id, why, exc)
            self._finish("failed", {})
            return
        status = str(resource.status)
        if status not in FINAL_STATUSES:
            logger.warning("twilio call %s: %s; still %s, ending it", self.call_id, why, status)
            self._hangup_requested = True
            end = "completed" if status == "in-progress" else "canceled"
            with contextlib.suppress(TwilioRestException, OSError):
                await asyncio.to_thread(self._client.calls(self.call_id).update, status=end)
            status = "completed" if status == "in-progress" else "no-answer"
        self._finish(status, {"CallDuration": str(resource.duration or 0)})


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


def _final(status: str, sip_code: int | None, answered: bool) -> tuple[CallOutcome, int, str]:
    """(outcome, SIP code, reason) for a final CallStatus, with the SIP code Twilio saw."""
    if status == "completed" and answered:
        return CallOutcome.ANSWERED, 200, "completed"
    if status == "busy":
        return CallOutcome.BUSY, sip_code or 486, "busy"
    if status == "no-answer":
        return CallOutcome.NO_ANSWER, 480, f"no-answer (Twilio SIP {sip_code or '-'})"
    if status == "canceled":
        return CallOutcome.CANCELLED, 487, "canceled"
    # failed (or completed without ever being answered): what the far end said, else a
    # 502 standing for "Twilio could not place it", so the router tries another trunk.
    code = sip_code if sip_code and sip_code >= 300 else 502
    return CallOutcome.FAILED, code, f"{status} (Twilio SIP {sip_code or '-'})"


PUBLISH_RETRY_FOR = 8.0  # seconds a webhook's report is retried while Redis is away


class CallEvents:
    """Delivers Twilio's reports to the process that placed the call."""

    def __init__(self, redis_url: str | None = None, prefix: str = "ackline") -> None:
        self._calls: dict[str, TwilioCall] = {}
        self._early: dict[str, list[tuple[float, dict[str, str]]]] = {}
        self._channel = f"{prefix}:twilio-voice"
        self._redis: Any = None
        self._reader: asyncio.Task[None] | None = None
        if redis_url:
            from storage.redis_client import async_client

            self._redis = async_client(redis_url)

    async def start(self) -> None:
        """Subscribe (Redis); returns once subscribed, so no report is missed after it."""
        if self._redis is None or self._reader is not None:
            return
        pubsub = self._redis.pubsub()
        await pubsub.subscribe(self._channel)
        self._reader = asyncio.create_task(self._read(pubsub), name="twilio-call-events")

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._redis is not None:
            await self._redis.aclose()

    def watch(self, call: TwilioCall) -> None:
        """Route reports for `call` to it until it ends (reports that came early included)."""
        self._calls[call.call_id] = call
        call.on_end = self.forget
        for _at, report in self._early.pop(call.call_id, []):
            call.on_report(report)

    def forget(self, call: TwilioCall) -> None:
        self._calls.pop(call.call_id, None)

    async def publish(self, call_sid: str, report: Mapping[str, str]) -> None:
        """From a webhook: hand `report` to whichever process watches `call_sid`."""
        message = {"sid": call_sid, "report": dict(report)}
        if self._redis is None:
            self._deliver(message)
            return
        # A key pressed during a Redis failover (2-3 s) must still reach the call: the
        # publish is tried again, within Twilio's 15 s webhook timeout, on whichever
        # master the client finds next, and again while nobody listens there yet (pub/sub
        # keeps nothing: the listeners resubscribe to a new master a moment after it).
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + PUBLISH_RETRY_FOR
        pause = 0.1
        while True:
            try:
                if await self._redis.publish(self._channel, json.dumps(message)) > 0:
                    return
                if loop.time() + pause > give_up_at:
                    logger.warning("twilio call events: nobody listened for %s's report "
                                   "within %g s", call_sid, PUBLISH_RETRY_FOR)  # fmt: skip
                    return
            except (OSError, RedisError) as exc:
                if loop.time() + pause > give_up_at or down_dependency(exc) is None:
                    raise
                logger.info("twilio call events: publishing %s failed, retrying: %r",
                            call_sid, exc)  # fmt: skip
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    def _deliver(self, message: Mapping[str, Any]) -> None:
        sid, report = str(message["sid"]), dict(message["report"])
        call = self._calls.get(sid)
        if call is not None:
            call.on_report(report)
            return
        now = time.monotonic()
        for stale in [k for k, v in self._early.items() if now - v[0][0] > _EARLY_TTL]:
            del self._early[stale]
        if len(self._early) < _EARLY_LIMIT or sid in self._early:
            self._early.setdefault(sid, []).append((now, report))

    async def _read(self, pubsub: Any) -> None:
        """Listen until cancelled. A lost connection (Redis restarted, or failed over to
        another master through Sentinel) is reconnected by the next read, which
        subscribes again; the tries back off to one a second and are logged sparingly."""
        failures = FailureLog(logger, "reading Twilio call events from Redis")
        pause = 0.1
        while True:
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None:
                    self._deliver(json.loads(message["data"]))
                pause = 0.1
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except Exception as exc:  # noqa: BLE001 (FailureLog logs it)
                # a bad message or a Redis hiccup: keep listening
                failures.failed(exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 1.0)


class TwilioVoice:
    """Places calls on twilio trunks (one SDK client per trunk)."""

    def __init__(self, events: CallEvents, public_url: str, *, timeout: float = 10.0) -> None:
        self.events = events
        self.answer_url, self.status_url = voice_webhook_urls(public_url)
        self._timeout = timeout
        self._clients: dict[tuple[str, str, str | None], Any] = {}

    def _client(self, trunk: Trunk) -> Any:
        assert trunk.account_sid is not None
        assert trunk.auth_token is not None
        key = (trunk.account_sid, trunk.auth_token.get_secret_value(), trunk.api_base)
        if key not in self._clients:
            self._clients[key] = twilio_client(
                key[0], key[1], api_base=trunk.api_base, timeout=self._timeout
            )
        return self._clients[key]

    async def probe(self, trunk: Trunk) -> tuple[bool, str]:
        """A health probe: the trunk's account resource answers, and the account is active."""
        assert trunk.account_sid is not None
        fetch = self._client(trunk).api.v2010.accounts(trunk.account_sid).fetch
        try:
            account = await asyncio.to_thread(fetch)
        except TwilioRestException as exc:
            return False, f"Twilio API: HTTP {exc.status} code {exc.code}"
        except OSError as exc:  # requests' connection errors are OSErrors
            return False, f"Twilio API unreachable: {type(exc).__name__}"
        status = str(account.status)
        return status == "active", f"account {status}"

    async def place(
        self,
        trunk: Trunk,
        e164: str,
        *,
        ring_timeout: float,
        context: Mapping[str, str],
        on_call: Callable[[TwilioCall], None] | None = None,
    ) -> TwilioCall:
        """Create the call; returns once answered or over. Raises TwilioRejected for a
        number Twilio refuses, OSError when Twilio cannot be reached or refuses us."""
        call = TwilioCall(trunk, e164, self._client(trunk))
        if on_call is not None:
            on_call(call)
        query = {k: v for k, v in context.items() if k != "machine_detection"}
        params: dict[str, Any] = {
            "to": e164,
            "from_": trunk.caller_id,
            "url": f"{self.answer_url}?{urlencode(query)}",
            "method": "POST",
            "status_callback": self.status_url,
            "status_callback_method": "POST",
            "status_callback_event": ["initiated", "ringing", "answered", "completed"],
            "timeout": max(5, min(600, round(ring_timeout))),
        }
        if context.get("machine_detection"):
            params["machine_detection"] = context["machine_detection"]
        try:
            resource = await asyncio.to_thread(call._client.calls.create, **params)
        except TwilioRestException as exc:
            if exc.code in NUMBER_ERRORS:
                raise TwilioRejected(f"Twilio refused {e164}: {exc.code} {exc.msg}") from None
            raise ConnectionRefusedError(
                f"Twilio refused the call: HTTP {exc.status} code {exc.code} {exc.msg}"
            ) from None
        call.call_id = str(resource.sid)
        call.responded.set()
        self.events.watch(call)
        try:
            await call.wait_answered_or_ended(ring_timeout + 15.0)
        except BaseException:
            self.events.forget(call)
            raise
        return call
