"""Trunk health: OPTIONS probe state with hysteresis, a live-call circuit breaker, and for
trunks that register, whether the registrar holds our binding.

``TrunkHealth`` is sans-IO (every input carries ``now``) so flapping and cool-downs are
tested without sleeping. ``HealthBoard`` holds one per trunk, reads the clock, and turns
state changes into callbacks (for the audit log) and Prometheus gauges. ``Prober`` is the
only part that does I/O: one bounded OPTIONS loop per trunk through ``Gateway.options``
(any ``OptionsSender``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sipmessage import URI, Response

from carriers import metrics
from carriers.trunk import Trunk
from gateway.sip.registration import RegistrationState
from gateway.tls import TlsClientSettings

logger = logging.getLogger(__name__)


class OptionsSender(Protocol):
    """What a Prober needs of the SIP gateway (gateway.call.Gateway is one)."""

    async def options(
        self,
        target: str | URI,
        *,
        transport: str | None = ...,
        tls: TlsClientSettings | None = ...,
    ) -> Response | None: ...


class ProbeState(str, enum.Enum):
    UP = "up"
    DOWN = "down"


class BreakerState(str, enum.Enum):
    CLOSED = "closed"  # calls flow
    OPEN = "open"  # too many live failures: no calls until the cool-down passes
    HALF_OPEN = "half_open"  # cool-down over: one trial call decides


_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@dataclass(frozen=True)
class HealthPolicy:
    """Thresholds. Hysteresis (down_after/up_after) keeps one lost probe from flapping."""

    down_after: int = 3  # consecutive probe failures before a trunk is down
    up_after: int = 2  # consecutive probe successes before it is up again
    breaker_failures: int = 3  # consecutive live call failures that open the breaker
    breaker_cooldown: float = 30.0  # seconds open before one trial call is let through

    def __post_init__(self) -> None:
        if min(self.down_after, self.up_after, self.breaker_failures) < 1:
            raise ValueError("down_after, up_after and breaker_failures must be >= 1")
        if self.breaker_cooldown < 0:
            raise ValueError("breaker_cooldown must be >= 0")


@dataclass(frozen=True)
class HealthChange:
    """One state change, as handed to ``on_change`` (e.g. for the audit log)."""

    trunk: str
    aspect: str  # "probe" | "breaker" | "registration"
    old: str
    new: str
    reason: str


class TrunkHealth:
    """Probe and breaker state of one trunk. Starts up and closed: optimistic until told."""

    def __init__(self, trunk: str, policy: HealthPolicy | None = None) -> None:
        self.trunk = trunk
        self.policy = policy or HealthPolicy()
        self.probe = ProbeState.UP
        self.breaker = BreakerState.CLOSED
        self.probe_failures = 0
        self.probe_successes = 0
        self.call_failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        # None: the trunk does not register. Otherwise calls go out only while REGISTERED.
        self.registration: RegistrationState | None = None

    # -- probes ---------------------------------------------------------------------

    def probe_result(self, ok: bool, now: float, detail: str = "") -> list[HealthChange]:
        if ok:
            self.probe_failures = 0
            self.probe_successes += 1
            if self.probe is ProbeState.DOWN and self.probe_successes >= self.policy.up_after:
                return [self._set_probe(ProbeState.UP, f"{self.probe_successes} probes answered")]
        else:
            self.probe_successes = 0
            self.probe_failures += 1
            if self.probe is ProbeState.UP and self.probe_failures >= self.policy.down_after:
                reason = f"{self.probe_failures} probes failed" + (f": {detail}" if detail else "")
                return [self._set_probe(ProbeState.DOWN, reason)]
        return []

    def _set_probe(self, state: ProbeState, reason: str) -> HealthChange:
        change = HealthChange(self.trunk, "probe", self.probe.value, state.value, reason)
        self.probe = state
        return change

    # -- live calls -------------------------------------------------------------------

    def tick(self, now: float) -> list[HealthChange]:
        """Apply time-driven transitions (open -> half-open once the cool-down passed)."""
        if (
            self.breaker is BreakerState.OPEN
            and now - self._opened_at >= self.policy.breaker_cooldown
        ):
            self._trial_in_flight = False
            return [self._set_breaker(BreakerState.HALF_OPEN, "cool-down over: one trial call")]
        return []

    def usable(self, now: float) -> bool:
        """May a new call be routed here? (Call ``tick`` first to see cool-downs end.)"""
        if self.probe is ProbeState.DOWN:
            return False
        if self.registration not in (None, RegistrationState.REGISTERED):
            return False
        if self.breaker is BreakerState.OPEN:
            return False
        return not (self.breaker is BreakerState.HALF_OPEN and self._trial_in_flight)

    def begin_call(self, now: float) -> bool:
        """Claim the trunk for one call; False when it is half-open and its trial is taken."""
        if not self.usable(now):
            return False
        if self.breaker is BreakerState.HALF_OPEN:
            self._trial_in_flight = True
        return True

    def call_result(self, failed: bool | None, now: float, detail: str = "") -> list[HealthChange]:
        """Feed a live call's result: True a carrier failure, False fine, None no verdict."""
        if failed is None:
            self._trial_in_flight = False
            return []
        if not failed:
            self.call_failures = 0
            if self.breaker is not BreakerState.CLOSED:
                self._trial_in_flight = False
                return [self._set_breaker(BreakerState.CLOSED, "trial call succeeded")]
            return []
        self.call_failures += 1
        if self.breaker is BreakerState.HALF_OPEN:
            self._trial_in_flight = False
            self._opened_at = now
            return [self._set_breaker(BreakerState.OPEN, f"trial call failed: {detail}")]
        threshold = self.policy.breaker_failures
        if self.breaker is BreakerState.CLOSED and self.call_failures >= threshold:
            self._opened_at = now
            reason = f"{self.call_failures} consecutive call failures, last: {detail}"
            return [self._set_breaker(BreakerState.OPEN, reason)]
        return []

    def _set_breaker(self, state: BreakerState, reason: str) -> HealthChange:
        change = HealthChange(self.trunk, "breaker", self.breaker.value, state.value, reason)
        self.breaker = state
        return change

    # -- registration -------------------------------------------------------------------

    def registration_result(self, state: RegistrationState, reason: str) -> list[HealthChange]:
        """The registration moved to ``state``; the first call also marks the trunk as one
        that registers (unusable until REGISTERED)."""
        if state is self.registration:
            return []
        old = self.registration.value if self.registration is not None else "none"
        self.registration = state
        return [HealthChange(self.trunk, "registration", old, state.value, reason)]


class HealthBoard:
    """Health of every trunk, with the clock, the change callback and the gauges."""

    def __init__(
        self,
        trunks: Iterable[str],
        policy: HealthPolicy | None = None,
        *,
        on_change: Callable[[HealthChange], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or HealthPolicy()
        self.on_change = on_change
        self.clock = clock
        self._trunks = {name: TrunkHealth(name, self.policy) for name in trunks}
        for name, health in self._trunks.items():
            metrics.TRUNK_UP.labels(trunk=name).set(1 if health.probe is ProbeState.UP else 0)
            metrics.TRUNK_BREAKER.labels(trunk=name).set(_BREAKER_GAUGE[health.breaker])

    def expect_registration(self, trunk: str) -> None:
        """``trunk`` registers: it counts as down until its registration succeeds."""
        health = self._trunks[trunk]
        if health.registration is None:
            health.registration = RegistrationState.UNREGISTERED
            metrics.TRUNK_REGISTERED.labels(trunk=trunk).set(0)

    def registration_result(self, trunk: str, state: RegistrationState, reason: str) -> None:
        self._emit(self._trunks[trunk].registration_result(state, reason))

    def __getitem__(self, trunk: str) -> TrunkHealth:
        return self._trunks[trunk]

    def usable(self, trunk: str) -> bool:
        health = self._trunks[trunk]
        now = self.clock()
        self._emit(health.tick(now))
        return health.usable(now)

    def begin_call(self, trunk: str) -> bool:
        health = self._trunks[trunk]
        now = self.clock()
        self._emit(health.tick(now))
        return health.begin_call(now)

    def call_result(self, trunk: str, failed: bool | None, detail: str = "") -> None:
        self._emit(self._trunks[trunk].call_result(failed, self.clock(), detail))

    def probe_result(self, trunk: str, ok: bool, detail: str = "") -> None:
        self._emit(self._trunks[trunk].probe_result(ok, self.clock(), detail))

    def _emit(self, changes: list[HealthChange]) -> None:
        for change in changes:
            logger.info(
                "trunk %s %s: %s -> %s (%s)",
                change.trunk,
                change.aspect,
                change.old,
                change.new,
                change.reason,
            )
            metrics.HEALTH_CHANGES.labels(
                trunk=change.trunk, aspect=change.aspect, state=change.new
            ).inc()
            health = self._trunks[change.trunk]
            if change.aspect == "probe":
                metrics.TRUNK_UP.labels(trunk=change.trunk).set(
                    1 if health.probe is ProbeState.UP else 0
                )
            elif change.aspect == "registration":
                metrics.TRUNK_REGISTERED.labels(trunk=change.trunk).set(
                    1 if health.registration is RegistrationState.REGISTERED else 0
                )
            else:
                metrics.TRUNK_BREAKER.labels(trunk=change.trunk).set(_BREAKER_GAUGE[health.breaker])
            if self.on_change is not None:
                try:
                    self.on_change(change)
                except Exception:
                    logger.exception("trunk health on_change hook failed")


def probe_ok(code: int | None) -> bool:
    """Any answer but 408/5xx means the carrier is there (many answer OPTIONS with 403/404)."""
    return code is not None and code != 408 and not 500 <= code < 600


RestProbe = Callable[[Trunk], Awaitable[tuple[bool, str]]]
"""Checks a REST trunk's API: (usable, why)."""


class Prober:
    """Sends OPTIONS to every enabled SIP trunk every ``interval`` seconds until closed.

    REST trunks (Twilio) are probed with ``rest_probe`` (their API's account resource)
    when given, else only their breaker (live calls) speaks for them.

    One probe in flight per trunk at most; each waits ``timeout`` (default: the trunk's
    trying_timeout) rather than the transaction's 64*T1, so a dead trunk is noticed after
    about ``down_after`` intervals. Start times are staggered across the interval.
    """

    def __init__(
        self,
        gateway: OptionsSender,
        trunks: Sequence[Trunk],
        board: HealthBoard,
        *,
        interval: float = 5.0,
        timeout: float | None = None,
        rest_probe: RestProbe | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("probe interval must be > 0")
        self.rest_probe = rest_probe
        self.gateway = gateway
        self.trunks = list(trunks)  # disabled ones are skipped each round, not dropped
        self.board = board
        self.interval = interval
        self.timeout = timeout
        self.probes_sent = 0
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._tasks:
            return
        count = max(1, len(self.trunks))
        for index, trunk in enumerate(self.trunks):
            offset = self.interval * index / count
            self._tasks.append(asyncio.ensure_future(self._run(trunk.name, offset)))

    def update(self, trunks: Sequence[Trunk]) -> None:
        """New definitions of the same trunks (an operator's change); the next round uses
        them, and a trunk enabled again is probed again."""
        known = {t.name for t in self.trunks}
        self.trunks = [t for t in trunks if t.name in known]

    async def close(self) -> None:
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def __aenter__(self) -> Prober:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def probes(self, trunk: Trunk) -> bool:
        return trunk.kind == "sip" or self.rest_probe is not None

    async def probe(self, trunk: Trunk) -> bool:
        """Send one OPTIONS to ``trunk`` (or ask its REST API), record the result, and
        return it."""
        timeout = self.timeout if self.timeout is not None else trunk.trying_timeout
        self.probes_sent += 1
        if trunk.kind != "sip":
            assert self.rest_probe is not None
            try:
                ok, detail = await asyncio.wait_for(self.rest_probe(trunk), timeout)
            except TimeoutError:
                ok, detail = False, f"no answer within {timeout:g} s"
            self.board.probe_result(trunk.name, ok, detail)
            return ok
        detail = ""
        try:
            response = await asyncio.wait_for(
                self.gateway.options(
                    trunk.probe_uri(), transport=trunk.transport, tls=trunk.tls_client()
                ),
                timeout,
            )
        except TimeoutError:
            response, detail = None, f"no answer within {timeout:g} s"
        except (OSError, ValueError) as exc:
            response, detail = None, f"{type(exc).__name__}: {exc}"
        code = response.code if response is not None else None
        ok = probe_ok(code)
        if not ok and not detail:
            detail = f"answered {code}" if code is not None else "no answer"
        self.board.probe_result(trunk.name, ok, detail)
        return ok

    async def _run(self, name: str, offset: float) -> None:
        if await self._sleep(offset):
            return
        while not self._closed.is_set():
            started = asyncio.get_running_loop().time()
            trunk = next((t for t in self.trunks if t.name == name), None)
            try:
                if trunk is not None and trunk.enabled and self.probes(trunk):
                    await self.probe(trunk)
            except Exception:
                logger.exception("probe of trunk %s failed unexpectedly", name)
            elapsed = asyncio.get_running_loop().time() - started
            if await self._sleep(max(0.0, self.interval - elapsed)):
                return

    async def _sleep(self, seconds: float) -> bool:
        """Sleep, waking early on close; True when closed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)
        return self._closed.is_set()
