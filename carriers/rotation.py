"""Route strategies: in which order to try the usable trunks for one call.

Pure and deterministic (no I/O, no clocks, no randomness) so distributions can be tested
exactly. A strategy returns *every* candidate, best first: the router walks the list for
failover, so the order after the first entry matters as much as the first pick.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from carriers.trunk import Trunk


class AttemptKind(str, enum.Enum):
    """How one attempt through a trunk ended.

    The first five are final for the person (they were reached, or refused, or did not
    pick up: never ring them again through another carrier); the last three are carrier
    failures that move the call to the next trunk.
    """

    ANSWERED = "answered"
    BUSY = "busy"  # 486, 600
    NO_ANSWER = "no_answer"  # 480, our ring timeout (CANCEL/487)
    REJECTED = "rejected"  # 603, 410, 484...: declined or not callable anywhere
    FAILED = "failed"  # ended badly after reaching the far end (e.g. unusable 2xx)
    CANCELLED = "cancelled"  # we gave up (the caller of place_call went away)
    CARRIER_ERROR = "carrier_error"  # 408, 5xx, 3xx, 401/403/404/407/488 from the trunk
    NO_TRYING = "no_trying"  # nothing came back within the trunk's trying_timeout
    TRANSPORT_ERROR = "transport_error"  # unreachable, connection refused, unresolvable

    @property
    def final(self) -> bool:
        return self not in CARRIER_FAILURES


CARRIER_FAILURES = frozenset(
    {AttemptKind.CARRIER_ERROR, AttemptKind.NO_TRYING, AttemptKind.TRANSPORT_ERROR}
)


@dataclass(frozen=True)
class _Sample:
    answered: bool
    failed: bool  # a carrier failure
    pdd_ms: int | None


@dataclass(frozen=True)
class QualityWeights:
    """How ASR, failure rate and post-dial delay combine into one score in [0, 1]."""

    asr: float = 0.4
    failures: float = 0.4
    pdd: float = 0.2
    pdd_worst_ms: int = 5000  # a PDD this long (or longer) scores 0
    # Time to acknowledgement of answered alert calls: counts only for trunks that carried
    # some. A trunk whose answered calls never get a key (DTMF lost on the way) sinks.
    ack: float = 0.3
    ack_worst_s: float = 60.0  # acknowledged this late (or never) scores 0


class QualityStats:
    """Sliding window of the last ``window`` attempts per trunk.

    ``score`` is None until ``min_samples`` attempts are in the window, so one early failure
    does not demote a trunk for good.
    """

    def __init__(
        self, *, window: int = 50, min_samples: int = 10, weights: QualityWeights | None = None
    ) -> None:
        if window < 1 or not 1 <= min_samples <= window:
            raise ValueError("need window >= 1 and 1 <= min_samples <= window")
        self.window = window
        self.min_samples = min_samples
        self.weights = weights or QualityWeights()
        self._samples: dict[str, deque[_Sample]] = {}
        self._acks: dict[str, deque[float | None]] = {}

    def record(self, trunk: str, kind: AttemptKind, pdd_ms: int | None = None) -> None:
        samples = self._samples.setdefault(trunk, deque(maxlen=self.window))
        samples.append(_Sample(kind is AttemptKind.ANSWERED, kind in CARRIER_FAILURES, pdd_ms))

    def record_ack(self, trunk: str, seconds: float | None) -> None:
        """An answered alert call: seconds from answer to the responder's key, or None
        when it ended without one."""
        self._acks.setdefault(trunk, deque(maxlen=self.window)).append(seconds)

    def ack_score(self, trunk: str) -> float | None:
        """1 for keys pressed at once, 0 for never or after ``ack_worst_s``; None: no data."""
        acks = self._acks.get(trunk)
        if not acks:
            return None
        worst = self.weights.ack_worst_s
        return sum(0.0 if s is None else max(0.0, 1.0 - s / worst) for s in acks) / len(acks)

    def samples(self, trunk: str) -> int:
        return len(self._samples.get(trunk, ()))

    def asr(self, trunk: str) -> float | None:
        samples = self._samples.get(trunk)
        if not samples:
            return None
        return sum(s.answered for s in samples) / len(samples)

    def failure_rate(self, trunk: str) -> float | None:
        samples = self._samples.get(trunk)
        if not samples:
            return None
        return sum(s.failed for s in samples) / len(samples)

    def mean_pdd_ms(self, trunk: str) -> float | None:
        pdds = [s.pdd_ms for s in self._samples.get(trunk, ()) if s.pdd_ms is not None]
        return sum(pdds) / len(pdds) if pdds else None

    def score(self, trunk: str) -> float | None:
        if self.samples(trunk) < self.min_samples:
            return None
        w = self.weights
        asr = self.asr(trunk) or 0.0
        failures = self.failure_rate(trunk) or 0.0
        pdd = self.mean_pdd_ms(trunk)
        pdd_score = 0.0 if pdd is None else max(0.0, 1.0 - pdd / w.pdd_worst_ms)
        total = w.asr + w.failures + w.pdd
        score = w.asr * asr + w.failures * (1.0 - failures) + w.pdd * pdd_score
        ack = self.ack_score(trunk)
        if ack is not None:
            score, total = score + w.ack * ack, total + w.ack
        return score / total


@dataclass(frozen=True)
class RouteView:
    """What a strategy may look at besides the trunks: calls in progress, quality, and
    the route's turn shared by every process (carriers.turns; None: keep your own)."""

    active: Mapping[str, int] = field(default_factory=dict)
    quality: QualityStats | None = None
    turn: int | None = None


class Strategy(Protocol):
    name: str

    def order(self, trunks: Sequence[Trunk], view: RouteView) -> list[Trunk]:
        """All of ``trunks``, best first."""
        ...


def by_priority(trunks: Sequence[Trunk]) -> list[Trunk]:
    """Priority (lower first), then configuration order: the tie-break of every strategy."""
    return sorted(trunks, key=lambda t: t.priority)  # sorted() is stable


class PriorityStrategy:
    name = "priority"

    def order(self, trunks: Sequence[Trunk], view: RouteView) -> list[Trunk]:
        return by_priority(trunks)


class RoundRobinStrategy:
    """Each call starts one trunk further along the priority-ordered list: at the shared
    turn when the view has one (every worker and `ackline call` alike), else at this
    process's own."""

    name = "round_robin"

    def __init__(self) -> None:
        self._turn = 0

    def order(self, trunks: Sequence[Trunk], view: RouteView) -> list[Trunk]:
        ordered = by_priority(trunks)
        if not ordered:
            return []
        turn = self._turn if view.turn is None else view.turn
        self._turn = turn + 1
        start = turn % len(ordered)
        return ordered[start:] + ordered[:start]


class WeightedStrategy:
    """Smooth weighted round robin (as in nginx): exact proportions, evenly interleaved.

    Each pick adds every candidate's weight to its running credit, takes the candidate with
    the most credit and charges it the total. Failover order is the rest by credit.
    """

    name = "weighted"

    def __init__(self) -> None:
        self._credit: dict[str, int] = {}

    def order(self, trunks: Sequence[Trunk], view: RouteView) -> list[Trunk]:
        ordered = by_priority(trunks)
        if not ordered:
            return []
        names = {t.name for t in ordered}
        for gone in set(self._credit) - names:
            del self._credit[gone]  # a trunk that went away must not come back with credit
        for trunk in ordered:
            self._credit[trunk.name] = self._credit.get(trunk.name, 0) + trunk.weight
        rank = sorted(ordered, key=lambda t: -self._credit[t.name])  # stable: priority ties
        self._credit[rank[0].name] -= sum(t.weight for t in ordered)
        return rank


class LeastActiveStrategy:
    """Fewest calls in progress first (relative to max_concurrent when it is set)."""

    name = "least_active"

    def order(self, trunks: Sequence[Trunk], view: RouteView) -> list[Trunk]:
        def load(trunk: Trunk) -> float:
            active = view.active.get(trunk.name, 0)
            return active / trunk.max_concurrent if trunk.max_concurrent else float(active)

        return sorted(by_priority(trunks), key=load)


class QualityStrategy:
    """Best recent quality first; trunks without enough samples score ``neutral``.

    Scores are compared in steps of ``resolution`` so two equally good trunks keep their
    priority order instead of swapping on noise.
    """

    name = "quality"

    def __init__(self, *, neutral: float = 0.5, resolution: float = 0.05) -> None:
        self.neutral = neutral
        self.resolution = resolution

    def order(self, trunks: Sequence[Trunk], view: RouteView) -> list[Trunk]:
        stats = view.quality

        def key(trunk: Trunk) -> float:
            score = stats.score(trunk.name) if stats is not None else None
            value = self.neutral if score is None else score
            return -round(value / self.resolution)

        return sorted(by_priority(trunks), key=key)


STRATEGIES: dict[str, type[Strategy]] = {
    "priority": PriorityStrategy,
    "round_robin": RoundRobinStrategy,
    "weighted": WeightedStrategy,
    "least_active": LeastActiveStrategy,
    "quality": QualityStrategy,
}


def make_strategy(name: str) -> Strategy:
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown route strategy {name!r} (one of {', '.join(STRATEGIES)})"
        ) from None
