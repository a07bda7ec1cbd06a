"""RFC 5626 §4.4.1 CRLF keep-alive of one TCP/TLS flow, as a sans-IO state machine.

A registration over TCP or TLS names our end of one connection; if a NAT or firewall on
the way forgets it, or the registrar hangs, nothing fails on our side: writes still go
into the kernel's buffer and the registrar's calls to us are lost until the next refresh
(up to half the binding, an hour with the defaults). So every ``interval`` (drawn with
jitter, so that processes started together do not ping together) we send a double CRLF
and expect the single-CRLF pong within ``pong_timeout``. A missing pong or a failed write
ends the flow with `FlowFailed`; the caller drops the connection and registers anew.

Like the transactions: fed with the current monotonic time, drained with
`pings_due` and `next_event`; nothing here touches sockets or clocks.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "DEFAULT_PONG_TIMEOUT",
    "PING",
    "PONG",
    "FlowFailed",
    "FlowFailure",
    "KeepAlive",
    "KeepAliveSettings",
    "KeepAliveState",
]

PING = b"\r\n\r\n"  # RFC 5626 §3.5.1: the client's keep-alive
PONG = b"\r\n"  # ... and the server's answer

# RFC 5626 §4.4.1: a flow whose pong has not come back within 10 s has failed.
DEFAULT_PONG_TIMEOUT = 10.0


@dataclass(frozen=True)
class KeepAliveSettings:
    """``interval`` seconds between pings, each drawn from [(1 - jitter) * interval,
    interval] (RFC 5626 §4.4.1 asks for 80-100 % of the period); a pong is due within
    ``pong_timeout`` of its ping."""

    interval: float = 30.0
    jitter: float = 0.2
    pong_timeout: float = DEFAULT_PONG_TIMEOUT

    def __post_init__(self) -> None:
        if self.interval <= 0 or self.pong_timeout <= 0 or not 0 <= self.jitter < 1:
            raise ValueError(f"invalid keep-alive settings: {self}")

    def delay(self, draw: float) -> float:
        """The wait before the next ping; ``draw`` is in [0, 1)."""
        return self.interval * (1 - self.jitter * draw)

    @property
    def detection_bound(self) -> float:
        """The longest a dead flow can go unnoticed: a full interval, then the pong wait."""
        return self.interval + self.pong_timeout


class KeepAliveState(enum.Enum):
    IDLE = "idle"  # waiting to send the next ping
    AWAITING_PONG = "awaiting_pong"
    FAILED = "failed"  # final: a new flow gets a new machine
    STOPPED = "stopped"  # final: the caller is done with the flow


class FlowFailure(enum.Enum):
    NO_PONG = "no pong"
    WRITE_FAILED = "write failed"


@dataclass(frozen=True)
class FlowFailed:
    """The flow is dead (emitted once); ``detail`` says what was seen, for the audit."""

    failure: FlowFailure
    detail: str

    @property
    def reason(self) -> str:
        return f"keep-alive: {self.failure.value} ({self.detail})"


class KeepAlive:
    """Pings one flow until it fails or `stop` is called."""

    def __init__(
        self, settings: KeepAliveSettings, *, draw: Callable[[], float] = random.random
    ) -> None:
        self.settings = settings
        self.state = KeepAliveState.IDLE
        self._draw = draw
        self._deadline: float | None = None
        self._pinged_at = 0.0
        self._pings = 0
        self._events: deque[FlowFailed] = deque()

    def start(self, now: float) -> None:
        """Arm the first ping."""
        self._deadline = now + self.settings.delay(self._draw())

    def stop(self) -> None:
        """The flow is closed on purpose; nothing more is due."""
        if self.state is not KeepAliveState.FAILED:
            self.state = KeepAliveState.STOPPED
        self._deadline = None

    def next_timer_at(self) -> float | None:
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Send the ping that is due, or fail the flow whose pong is overdue."""
        if self._deadline is None or now < self._deadline:
            return
        if self.state is KeepAliveState.IDLE:
            self.state = KeepAliveState.AWAITING_PONG
            self._pings += 1
            self._pinged_at = now
            self._deadline = now + self.settings.pong_timeout
        elif self.state is KeepAliveState.AWAITING_PONG:
            waited = now - self._pinged_at
            self._fail(FlowFailure.NO_PONG, f"none {waited:.1f} s after the ping")

    def pings_due(self) -> int:
        """Pings to write now (0 or 1); each call drains them."""
        due, self._pings = self._pings, 0
        return due

    def pong_received(self, now: float) -> None:
        """A CRLF came back: the flow is alive, the next ping waits a fresh interval."""
        if self.state is KeepAliveState.AWAITING_PONG:
            self.state = KeepAliveState.IDLE
            self._deadline = now + self.settings.delay(self._draw())

    def write_failed(self, now: float, detail: str) -> None:
        """The ping could not be written: the connection is already gone."""
        if self.state in (KeepAliveState.IDLE, KeepAliveState.AWAITING_PONG):
            self._fail(FlowFailure.WRITE_FAILED, detail)

    def next_event(self) -> FlowFailed | None:
        return self._events.popleft() if self._events else None

    def _fail(self, failure: FlowFailure, detail: str) -> None:
        self.state = KeepAliveState.FAILED
        self._deadline = None
        self._pings = 0
        self._events.append(FlowFailed(failure, detail))
