"""Carrier routing: one outbound call, tried through the trunks in strategy order.

Failover is per call and only on carrier failures (408, 5xx, silence, transport errors,
403/404 from the trunk). Anything that says the person was reached or refused (answer,
busy, decline, no answer) is final: ringing them again through a second carrier would be
a second, confusing call. Every attempt feeds the trunk's circuit breaker and quality
statistics, so a carrier that fails live calls drops out even before probes notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol
from urllib.parse import unquote

from sipmessage import URI

from carriers import metrics
from carriers.budgets import Budgets, CallBudget, LocalBudgets
from carriers.health import (
    BreakerState,
    HealthBoard,
    HealthChange,
    HealthPolicy,
    OptionsSender,
    Prober,
    ProbeState,
)
from carriers.numbers import REFUSED_TYPES, Destination, FraudGuard, FraudRefused, normalise
from carriers.rotation import (
    AttemptKind,
    QualityStats,
    RoundRobinStrategy,
    RouteView,
    Strategy,
    make_strategy,
)
from carriers.trunk import Trunk
from carriers.turns import ALL_TRUNKS, TURN_TIMEOUT, Turns
from carriers.twilio_voice import TwilioCall, TwilioVoice
from gateway.call import Call, GatewayConfig
from gateway.media.srtp import SrtpPolicy
from gateway.redirect import RedirectPolicy, RedirectScreen
from gateway.result import CallOutcome, PlacedCall
from gateway.sip.auth import Credentials
from gateway.sip.registration import RegistrationState
from gateway.sip.session_timer import SessionTimerSettings
from gateway.tls import TlsClientSettings

logger = logging.getLogger(__name__)

# Final INVITE responses that mean "this carrier cannot or will not carry the call" rather
# than anything about the person: try the next trunk. 3xx too: a redirect that could not be
# followed (a loop, too many hops, no usable Contact); a refused one ends the call instead.
FAILOVER_CODES = frozenset({400, 401, 403, 404, 407, 408, 416, 420, 421, 488})


def is_failover_code(code: int) -> bool:
    return code in FAILOVER_CODES or 300 <= code < 400 or 500 <= code < 600


class TrunkGateway(OptionsSender, Protocol):
    """What the router needs of the SIP gateway (gateway.call.Gateway is one): its
    configuration, calls and their time bound, OPTIONS probes. Building a router from
    configuration (carriers.config) then needs no import of the call machinery."""

    @property
    def config(self) -> GatewayConfig: ...

    def call_time_bound(self, ring_timeout: float, max_duration: float | None = ...) -> float: ...

    async def dial(
        self,
        target: str | URI,
        *,
        credentials: Credentials | None = ...,
        ring_timeout: float = ...,
        transport: str | None = ...,
        caller: str | None = ...,
        on_call: Callable[[Call], None] | None = ...,
        max_duration: float | None = ...,
        redirects: RedirectPolicy | None = ...,
        tls: TlsClientSettings | None = ...,
        srtp: SrtpPolicy | None = ...,
        session_timer: SessionTimerSettings | None = ...,
    ) -> Call: ...


@dataclass(frozen=True)
class TrunkAttempt:
    """One try through one trunk, in the order they happened."""

    trunk: str
    outcome: AttemptKind
    sip_code: int | None
    reason: str
    elapsed_ms: int  # from starting the dial to the verdict

    @property
    def final(self) -> bool:
        return self.outcome.final


@dataclass(frozen=True)
class SkippedTrunk:
    trunk: str
    reason: str


@dataclass
class RoutedCall:
    """The call as the application sees it: answered, or ended for good (busy, declined...)."""

    call: PlacedCall
    trunk: str | None  # the trunk that carried the final attempt
    attempts: list[TrunkAttempt]
    destination: Destination
    skipped: list[SkippedTrunk] = field(default_factory=list)

    @property
    def answered(self) -> bool:
        return self.call.answered


class NoRouteAvailable(OSError):
    """No trunk could carry the call: none usable, or every one failed as a carrier.

    An ``OSError`` (like ENETUNREACH) because that is what it is to a caller: nothing
    about the number is wrong, trying again later may work.
    """

    reason_code: ClassVar[str] = "no_route"  # what the voice channel records

    def __init__(
        self,
        number: str,
        message: str,
        attempts: Sequence[TrunkAttempt] = (),
        skipped: Sequence[SkippedTrunk] = (),
    ) -> None:
        super().__init__(f"no route to {number}: {message}")
        self.number = number
        self.attempts = list(attempts)
        self.skipped = list(skipped)


def classify(call: PlacedCall) -> tuple[AttemptKind, int | None, str]:
    """What a finished dial says: (kind, SIP code, reason)."""
    if call.answered:
        return AttemptKind.ANSWERED, 200, "answered"
    result = call.result
    if result is None:  # dial() returns only answered or ended; be safe anyway
        return AttemptKind.TRANSPORT_ERROR, None, "call ended without a result"
    code, reason = result.sip_code, result.reason
    if redirect_refusal(call) is not None:  # final: another carrier would be redirected too
        return AttemptKind.REJECTED, code, reason
    if not call.responded.is_set():  # any code here is synthetic (503/408 from our side)
        if result.outcome is CallOutcome.CANCELLED:
            return AttemptKind.CANCELLED, None, reason
        return AttemptKind.TRANSPORT_ERROR, None, reason
    if result.outcome is CallOutcome.CANCELLED:
        return AttemptKind.CANCELLED, code, reason
    if code is not None and is_failover_code(code):
        return AttemptKind.CARRIER_ERROR, code, reason
    final = {
        CallOutcome.BUSY: AttemptKind.BUSY,
        CallOutcome.NO_ANSWER: AttemptKind.NO_ANSWER,
        CallOutcome.REJECTED: AttemptKind.REJECTED,
    }
    return final.get(result.outcome, AttemptKind.FAILED), code, reason


def redirect_refusal(call: PlacedCall) -> FraudRefused | None:
    """The toll-fraud refusal of a 3xx target this call was redirected to, if any."""
    decision = call.redirect if isinstance(call, Call) else None
    if decision is None or not decision.verdict.refused or decision.target is None:
        return None
    number = unquote(decision.target.user or "") or str(decision.target)
    return FraudRefused(number, f"redirect: {decision.reason}")


def _then_app(
    ours: Callable[[Any], None], app_on_call: Callable[[PlacedCall], None] | None
) -> Callable[[Any], None]:
    """Our own on_call bookkeeping, then the application's hook (whose errors are logged,
    never allowed to break routing)."""

    def on_call(call: Any) -> None:
        ours(call)
        if app_on_call is not None:
            try:
                app_on_call(call)
            except Exception:
                logger.exception("place_call on_call hook failed")

    return on_call


class CarrierRouter:
    """Places calls through a set of trunks with rotation, health and failover.

    ``allowed_countries`` is the deployment-wide toll-fraud allowlist (required: the guard
    is fail-closed); each trunk's own ``allowed_countries`` narrows it further.
    """

    def __init__(
        self,
        gateway: TrunkGateway,
        trunks: Sequence[Trunk],
        strategy: Strategy | str = "priority",
        *,
        allowed_countries: Iterable[str],
        refused_types: Iterable[int] = REFUSED_TYPES,
        health: HealthPolicy | None = None,
        quality: QualityStats | None = None,
        on_health_change: Callable[[HealthChange], None] | None = None,
        default_region: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        budgets: Budgets | None = None,
        twilio: TwilioVoice | None = None,
        call_budget: CallBudget | None = None,
        turns: Turns | None = None,
        route: str = ALL_TRUNKS,
    ) -> None:
        names = [t.name for t in trunks]
        if len(set(names)) != len(names):
            raise ValueError("trunk names must be unique")
        self.gateway = gateway
        self.trunks = list(trunks)
        self.strategy = make_strategy(strategy) if isinstance(strategy, str) else strategy
        self.guard = FraudGuard(allowed_countries, refused_types=refused_types)
        self.health = HealthBoard(names, health, on_change=on_health_change, clock=clock)
        self.quality = quality or QualityStats()
        self.default_region = default_region
        self.clock = clock
        self._active = dict.fromkeys(names, 0)
        # max_concurrent / max_cps: this process's, or shared by all workers (Redis)
        self.budgets: Budgets = budgets or LocalBudgets(clock)
        self._background: set[asyncio.Future[Any]] = set()
        self._probers: list[Prober] = []
        self.twilio = twilio  # places calls on twilio trunks (needs our public webhook URL)
        self.call_budget = call_budget or CallBudget()  # hourly, all calls and per number
        self.turns = turns  # round robin shared by every process (None: this one's own)
        self.route = route

    # -- public -------------------------------------------------------------------------

    def active(self, trunk: str) -> int:
        """Calls in progress through ``trunk`` (ringing, answered, or being released)."""
        return self._active[trunk]

    def health_report(self, trunk: str) -> dict[str, Any]:
        """What this process knows of ``trunk`` right now, as an admin reads it; `enabled`
        is whether this process has it in rotation (an operator's change reaches each
        process within its override poll)."""
        health = self.health[trunk]
        return {
            "enabled": next(t.enabled for t in self.trunks if t.name == trunk),
            "probe": health.probe.value,
            "breaker": health.breaker.value,
            "registration": health.registration.value if health.registration else None,
            "usable": self.health.usable(trunk),
            "active_calls": self.active(trunk),
            "asr": self.quality.asr(trunk),
            "pdd_ms": self.quality.mean_pdd_ms(trunk),
            "samples": self.quality.samples(trunk),
        }

    def prober(self, *, interval: float = 5.0, timeout: float | None = None) -> Prober:
        """An OPTIONS prober feeding this router's health board (start it, close it)."""
        prober = Prober(
            self.gateway, self.trunks, self.health, interval=interval, timeout=timeout,
            rest_probe=self.twilio.probe if self.twilio is not None else None,
        )  # fmt: skip
        self._probers.append(prober)
        return prober

    def update_trunks(self, trunks: Sequence[Trunk]) -> None:
        """Take new definitions of the same trunks (enabled, priority, weight, budgets)
        for the next call, without a restart; calls in progress are not touched."""
        by_name = {t.name: t for t in trunks}
        unknown = set(by_name) - set(self._active)
        if unknown:
            raise ValueError(f"unknown trunks: {', '.join(sorted(unknown))}")
        self.trunks = [by_name.get(t.name, t) for t in self.trunks]
        for prober in self._probers:
            prober.update(self.trunks)

    async def close(self, grace: float = 0.0) -> None:
        """Stop watching calls. Abandoned attempts (INVITEs that never got an answer) end by
        timer B; ``grace`` seconds are given for that before the rest is cancelled."""
        await self._close_calls(grace)
        await self.budgets.close()
        if self.turns is not None:
            await self.turns.close()

    async def _close_calls(self, grace: float) -> None:
        if grace > 0 and self._background:
            await asyncio.wait(set(self._background), timeout=grace)
        pending = list(self._background)
        for task in pending:
            task.cancel()
        for task in pending:
            with contextlib.suppress(BaseException):
                await task

    def time_bound(self, ring_timeout: float, max_duration: float | None = None) -> float:
        """The longest `place_call` and the call it returns can take: every trunk tried in
        turn, each at worst ringing out and then waiting out its signalling timers, and
        one of them answered for `max_duration` (a Twilio call is given as long)."""
        answered = self.gateway.config.max_call_duration if max_duration is None else max_duration
        per_trunk = self.gateway.call_time_bound(ring_timeout, 0.0)
        return answered + max(1, len(self.trunks)) * per_trunk

    async def place_call(
        self,
        number: str,
        *,
        ring_timeout: float = 30.0,
        on_call: Callable[[PlacedCall], None] | None = None,
        context: Mapping[str, str] | None = None,
        needs_media: bool = False,
        max_duration: float | None = None,
    ) -> RoutedCall:
        """Call ``number``; returns once answered or finally refused, else raises.

        ``ring_timeout`` applies to each attempt (failed carriers usually answer within
        milliseconds, or within their ``trying_timeout`` when silent). Raises
        ``InvalidNumber`` or ``FraudRefused`` (a refused destination, or an hourly call
        budget spent) before any carrier is touched, and
        ``NoRouteAvailable`` when no trunk is usable or all of them failed as carriers.
        Cancelling the task hangs up the attempt in progress (CANCEL, or BYE if answered).
        ``on_call`` gets each attempt's ``Call`` before its INVITE leaves (as in
        ``Gateway.dial``), so the application can hang up whichever attempt is current; a
        call hung up that way ends routing (outcome ``cancelled``). ``context`` travels
        with a Twilio call to the webhooks that run its flow (alert and notification ids).
        ``needs_media`` (bridging a caller) skips Twilio trunks: their audio is Twilio's.
        ``max_duration`` ends an answered SIP call after that many seconds (the gateway's
        default otherwise); the whole call is bounded by `time_bound`.
        """
        destination = normalise(number, default_region=self.default_region)
        try:
            self.guard.check(destination)
        except FraudRefused:
            metrics.CALLS_REFUSED.labels(reason="destination").inc()
            raise
        allowing = [t for t in self.trunks if t.allows_country(destination.region)]
        if not allowing:
            metrics.CALLS_REFUSED.labels(reason="destination").inc()
            raise FraudRefused(destination.e164, f"no trunk allows calls to {destination.region}")
        await self._admit(destination)
        skipped: list[SkippedTrunk] = []
        candidates: list[Trunk] = []
        for trunk in allowing:
            if not trunk.enabled:
                skipped.append(SkippedTrunk(trunk.name, "disabled"))
            elif needs_media and trunk.kind != "sip":
                skipped.append(SkippedTrunk(trunk.name, f"{trunk.kind} calls carry no media here"))
            elif not self.health.usable(trunk.name):
                skipped.append(SkippedTrunk(trunk.name, self._unusable_reason(trunk)))
            else:
                candidates.append(trunk)
        view = RouteView(active=dict(self._active), quality=self.quality, turn=await self._turn())
        attempts: list[TrunkAttempt] = []
        for trunk in self.strategy.order(candidates, view):
            reason, claim = await self._budget_refusal(trunk)
            if reason is not None:
                skipped.append(SkippedTrunk(trunk.name, reason))
                metrics.TRUNK_SKIPPED.labels(trunk=trunk.name, reason=reason.split(" ")[0]).inc()
                continue
            call: PlacedCall | None
            if trunk.kind == "twilio":
                call, attempt = await self._attempt_twilio(
                    trunk, claim, destination, ring_timeout, on_call, context or {}
                )
            else:
                call, attempt = await self._attempt(
                    trunk, claim, destination, ring_timeout, on_call, max_duration
                )
            attempts.append(attempt)
            logger.info(
                "call to %s via %s: %s %s %s (%d ms)",
                destination.e164,
                trunk.name,
                attempt.outcome.value,
                attempt.sip_code,
                attempt.reason,
                attempt.elapsed_ms,
            )
            if attempt.final and call is not None:
                refusal = redirect_refusal(call)
                if refusal is not None:
                    raise refusal
                return RoutedCall(call, trunk.name, attempts, destination, skipped)
        raise NoRouteAvailable(
            destination.e164, self._explain(attempts, skipped), attempts, skipped
        )

    # -- one attempt ----------------------------------------------------------------------

    async def _attempt(
        self,
        trunk: Trunk,
        claim: str,
        destination: Destination,
        ring_timeout: float,
        app_on_call: Callable[[PlacedCall], None] | None,
        max_duration: float | None,
    ) -> tuple[Call | None, TrunkAttempt]:
        loop = asyncio.get_running_loop()
        attempt = self._attempt_clock(trunk)
        created: asyncio.Future[Call] = loop.create_future()

        def note(call: Call) -> None:
            if not created.done():
                created.set_result(call)

        on_call = _then_app(note, app_on_call)
        self._count_active(trunk)
        dial: asyncio.Future[Call] = asyncio.ensure_future(
            self.gateway.dial(
                trunk.request_uri(destination.parsed),
                credentials=trunk.credentials(),
                ring_timeout=ring_timeout,
                transport=trunk.transport,
                tls=trunk.tls_client(),
                srtp=trunk.srtp_policy(),
                session_timer=trunk.session_timer(),
                caller=trunk.caller_id,
                on_call=on_call,
                max_duration=max_duration,
                redirects=RedirectPolicy(self._redirect_screen(trunk)),
            )
        )
        dial.add_done_callback(lambda task: self._on_dial_done(trunk.name, claim, task))
        try:
            responded = await self._first_response(dial, created, trunk.trying_timeout)
            if not responded:
                # Silence: give up on this trunk now. hangup() sends CANCEL as soon as a
                # provisional response turns up (RFC 3261 §9.1) and BYE for a late 2xx.
                self._abandon(dial, created)
                result = attempt(
                    AttemptKind.NO_TRYING,
                    None,
                    f"no response within trying_timeout {trunk.trying_timeout:g} s",
                )
                self._record(trunk, result, None)
                return None, result
            call = await asyncio.shield(dial)
        except asyncio.CancelledError:
            self._abandon(dial, created)
            self.health.call_result(trunk.name, None)
            raise
        except (OSError, ValueError) as exc:
            result = attempt(AttemptKind.TRANSPORT_ERROR, None, f"{type(exc).__name__}: {exc}")
            self._record(trunk, result, None)
            return None, result
        except BaseException:
            self.health.call_result(trunk.name, None)  # a bug of ours: free a half-open trial
            raise
        kind, code, reason = classify(call)
        result = attempt(kind, code, reason)
        self._record(trunk, result, call.result.pdd_ms if call.result else None)
        return call, result

    def _redirect_screen(self, trunk: Trunk) -> RedirectScreen:
        """A 3xx target is a new destination: the same guard as the dialled number (allowed
        countries, refused types, the trunk's countries); not a phone number: refused."""

        def screen(target: URI) -> str | None:
            try:
                destination = normalise(
                    unquote(target.user or ""), default_region=self.default_region
                )
                self.guard.check(destination)
                if not trunk.allows_country(destination.region):
                    raise FraudRefused(
                        destination.e164, f"trunk {trunk.name} does not allow {destination.region}"
                    )
            except FraudRefused as exc:
                refusal = exc.reason
            except ValueError as exc:  # InvalidNumber: nothing the guard can vouch for
                refusal = str(exc)
            else:
                return None
            metrics.CALLS_REFUSED.labels(reason="redirect").inc()
            logger.warning(
                "trunk %s redirected a call to %s: refused: %s", trunk.name, target, refusal
            )
            return refusal

        return screen

    async def _attempt_twilio(
        self,
        trunk: Trunk,
        claim: str,
        destination: Destination,
        ring_timeout: float,
        app_on_call: Callable[[PlacedCall], None] | None,
        context: Mapping[str, str],
    ) -> tuple[TwilioCall | None, TrunkAttempt]:
        """One try through Twilio's REST API: a refusal by Twilio (5xx, 429, auth, an
        unreachable API) or a failed call moves on to the next trunk, like a SIP 503."""
        attempt = self._attempt_clock(trunk)
        if self.twilio is None:
            result = attempt(
                AttemptKind.TRANSPORT_ERROR, None, "twilio trunks need public_url for webhooks"
            )
            self._record(trunk, result, None)
            self._keep(asyncio.ensure_future(self._release_budget(trunk.name, claim)))
            return None, result
        placed: list[TwilioCall] = []
        on_call = _then_app(placed.append, app_on_call)
        self._count_active(trunk)
        place: asyncio.Future[TwilioCall] = asyncio.ensure_future(
            self.twilio.place(
                trunk, destination.e164, ring_timeout=ring_timeout, context=context,
                on_call=on_call,
            )
        )  # fmt: skip
        place.add_done_callback(lambda task: self._on_dial_done(trunk.name, claim, task))
        try:
            call = await asyncio.shield(place)
        except asyncio.CancelledError:
            if placed:
                self._keep(asyncio.ensure_future(self._hang_up_placed(place, placed[0])))
            self.health.call_result(trunk.name, None)
            raise
        except ValueError:  # Twilio refused the number itself: no carrier can fix that
            self.health.call_result(trunk.name, None)
            raise
        except OSError as exc:
            result = attempt(AttemptKind.CARRIER_ERROR, None, str(exc))
            self._record(trunk, result, None)
            return None, result
        except BaseException:
            self.health.call_result(trunk.name, None)
            raise
        kind, code, reason = classify(call)
        result = attempt(kind, code, reason)
        self._record(trunk, result, call.result.pdd_ms if call.result else None)
        return call, result

    @staticmethod
    async def _hang_up_placed(place: asyncio.Future[TwilioCall], call: TwilioCall) -> None:
        """The caller gave up while Twilio was placing the call: end it once it exists."""
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(call.responded.wait(), 30)
        if call.call_id:
            await call.hangup()

    @staticmethod
    def _attempt_clock(trunk: Trunk) -> Callable[[AttemptKind, int | None, str], TrunkAttempt]:
        started = time.monotonic()

        def attempt(kind: AttemptKind, code: int | None, reason: str) -> TrunkAttempt:
            elapsed_ms = int((time.monotonic() - started) * 1000)
            return TrunkAttempt(trunk.name, kind, code, reason, elapsed_ms)

        return attempt

    async def _first_response(
        self, dial: asyncio.Future[Call], created: asyncio.Future[Call], timeout: float
    ) -> bool:
        """True once the INVITE got any response (or the dial finished) within ``timeout``."""

        async def responded() -> None:
            call = await created
            await call.responded.wait()

        waiter = asyncio.ensure_future(responded())
        watched: set[asyncio.Future[Any]] = {dial, waiter}
        try:
            done, _ = await asyncio.wait(
                watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
        return bool(done)

    def _abandon(self, dial: asyncio.Future[Call], created: asyncio.Future[Call]) -> None:
        """Leave an attempt behind without leaking it: hang the call up in the background."""
        self._keep(dial)

        def hang_up(created: asyncio.Future[Call]) -> None:
            # Also when the call only comes into being later (a slow DNS lookup): hangup()
            # before the INVITE left means the INVITE never leaves.
            if not created.cancelled():
                self._keep(asyncio.ensure_future(created.result().hangup()))

        created.add_done_callback(hang_up)

    def _on_dial_done(
        self, trunk: str, claim: str, dial: asyncio.Future[Call] | asyncio.Future[TwilioCall]
    ) -> None:
        """The dial is over; its call may still be up (answered): count it until it ends."""
        call: PlacedCall | None = None
        if not dial.cancelled() and dial.exception() is None:
            call = dial.result()
        if call is None or call.ended.is_set():
            self._release(trunk, claim)
            return

        async def until_ended(ended: asyncio.Event) -> None:
            try:
                await ended.wait()
            finally:
                self._release(trunk, claim)

        self._keep(asyncio.ensure_future(until_ended(call.ended)))

    def _count_active(self, trunk: Trunk) -> None:
        """One more call in progress through `trunk` (until `_release`)."""
        self._active[trunk.name] += 1
        metrics.TRUNK_ACTIVE.labels(trunk=trunk.name).set(self._active[trunk.name])

    def _release(self, trunk: str, claim: str) -> None:
        self._active[trunk] -= 1
        metrics.TRUNK_ACTIVE.labels(trunk=trunk).set(self._active[trunk])
        self._keep(asyncio.ensure_future(self._release_budget(trunk, claim)))

    async def _release_budget(self, trunk: str, claim: str) -> None:
        if not claim:
            return  # nothing was claimed (the budget was unavailable when the call began)
        try:
            await self.budgets.release(trunk, claim)
        except Exception as exc:  # a shared budget's lease frees the slot anyway
            logger.warning("releasing the budget of trunk %s failed: %r", trunk, exc, exc_info=True)

    def _keep(self, future: asyncio.Future[Any]) -> None:
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    def _record(self, trunk: Trunk, attempt: TrunkAttempt, pdd_ms: int | None) -> None:
        metrics.TRUNK_ATTEMPTS.labels(trunk=trunk.name, outcome=attempt.outcome.value).inc()
        if attempt.outcome is AttemptKind.CANCELLED:
            self.health.call_result(trunk.name, None)
            return
        self.quality.record(trunk.name, attempt.outcome, pdd_ms)
        detail = f"{attempt.outcome.value} {attempt.sip_code or ''} {attempt.reason}".strip()
        self.health.call_result(trunk.name, not attempt.final, detail)

    # -- budgets and explanations --------------------------------------------------------

    async def _budget_refusal(self, trunk: Trunk) -> tuple[str | None, str]:
        """Why ``trunk`` cannot take this call right now, or (None, claim) having claimed
        its budget; the claim is released when the call is over."""
        if not self.health.usable(trunk.name):
            return self._unusable_reason(trunk), ""
        try:
            reason, claim = await self.budgets.acquire(trunk)
        except Exception as exc:  # Redis away: better this call than none (logged)
            logger.warning(
                "budget of trunk %s unavailable (%s); calling anyway",
                trunk.name,
                exc,
                exc_info=True,
            )
            reason, claim = None, ""
        if reason is not None:
            return reason, ""
        if not self.health.begin_call(trunk.name):
            self._keep(asyncio.ensure_future(self._release_budget(trunk.name, claim)))
            return "half_open trial call already in progress", ""
        return None, claim

    async def _turn(self) -> int | None:
        """The route's shared round-robin turn; None (this process's own) without shared
        turns, for other strategies, or while Redis or the database does not answer."""
        if self.turns is None or not isinstance(self.strategy, RoundRobinStrategy):
            return None
        try:
            async with asyncio.timeout(TURN_TIMEOUT):
                return await self.turns.next_turn(self.route)
        except Exception as exc:  # the page matters more than the rotation (logged)
            logger.warning(
                "shared round-robin turn unavailable (%r); using this process's", exc, exc_info=True
            )
            return None

    async def _admit(self, destination: Destination) -> None:
        """Count the call against the hourly budgets; FraudRefused once one is spent."""
        try:
            refusal = await self.budgets.admit_call(destination.e164, self.call_budget)
        except Exception as exc:  # Redis away: the page matters more (logged)
            logger.warning(
                "hourly call budget unavailable (%s); calling anyway", exc, exc_info=True
            )
            return
        if refusal is not None:
            metrics.CALLS_REFUSED.labels(reason="call_budget").inc()
            raise FraudRefused(destination.e164, refusal)

    def _unusable_reason(self, trunk: Trunk) -> str:
        health = self.health[trunk.name]
        if health.probe is ProbeState.DOWN:
            return "down (OPTIONS probes failing)"
        if health.registration not in (None, RegistrationState.REGISTERED):
            return f"down (not registered: {health.registration.value})"
        if health.breaker is BreakerState.OPEN:
            return "breaker open (recent call failures)"
        return "half_open trial call already in progress"

    @staticmethod
    def _explain(attempts: Sequence[TrunkAttempt], skipped: Sequence[SkippedTrunk]) -> str:
        parts = [
            f"{a.trunk}: {a.outcome.value}"
            + (f" {a.sip_code}" if a.sip_code is not None else "")
            + f" ({a.reason})"
            for a in attempts
        ]
        parts += [f"{s.trunk}: skipped, {s.reason}" for s in skipped]
        if not parts:
            return "no trunk configured"
        head = "every trunk failed" if attempts else "no trunk usable"
        return head + ": " + "; ".join(parts)
