"""Route strategies: orders, weight distributions, least-active and quality ordering."""

from __future__ import annotations

from collections import Counter

import pytest

from carriers.budgets import TokenBucket
from carriers.rotation import (
    AttemptKind,
    LeastActiveStrategy,
    PriorityStrategy,
    QualityStats,
    QualityStrategy,
    RoundRobinStrategy,
    RouteView,
    WeightedStrategy,
    make_strategy,
)
from carriers.trunk import Trunk


def trunk(name: str, **values: object) -> Trunk:
    return Trunk.model_validate({"name": name, "host": "127.0.0.1", **values})


def names(trunks: list[Trunk]) -> list[str]:
    return [t.name for t in trunks]


A, B, C = trunk("a", priority=20), trunk("b", priority=10), trunk("c", priority=20)
VIEW = RouteView()


def test_priority_orders_by_priority_then_config_order() -> None:
    assert names(PriorityStrategy().order([A, B, C], VIEW)) == ["b", "a", "c"]
    assert names(PriorityStrategy().order([C, A], VIEW)) == ["c", "a"]
    assert PriorityStrategy().order([], VIEW) == []


def test_round_robin_rotates_the_first_pick_and_keeps_the_rest_as_failover() -> None:
    strategy = RoundRobinStrategy()
    orders = [names(strategy.order([A, B, C], VIEW)) for _ in range(4)]
    assert orders == [["b", "a", "c"], ["a", "c", "b"], ["c", "b", "a"], ["b", "a", "c"]]
    firsts = Counter(names(strategy.order([A, B, C], VIEW))[0] for _ in range(300))
    assert set(firsts.values()) == {100}


def test_round_robin_starts_at_the_shared_turn_when_there_is_one() -> None:
    """Every process (workers, `ackline call`) draws the turn from one counter."""
    first, second = RoundRobinStrategy(), RoundRobinStrategy()  # two processes
    orders = [names(s.order([A, B, C], RouteView(turn=t))) for s, t in ((first, 7), (second, 8))]
    assert orders == [["a", "c", "b"], ["c", "b", "a"]]
    assert names(first.order([A, B, C], VIEW)) == ["c", "b", "a"]  # no turn: on from 7


@pytest.mark.parametrize("weights", [(1, 1), (3, 1), (5, 3, 2), (10, 1, 1)])
def test_weighted_respects_weights_over_many_picks(weights: tuple[int, ...]) -> None:
    trunks = [trunk(f"t{i}", weight=w) for i, w in enumerate(weights)]
    strategy = WeightedStrategy()
    picks = 1000 * sum(weights)
    firsts = Counter(strategy.order(trunks, VIEW)[0].name for _ in range(picks))
    total = sum(weights)
    for i, weight in enumerate(weights):
        share = firsts[f"t{i}"] / picks
        assert share == pytest.approx(weight / total, abs=0.01), firsts


def test_weighted_is_smooth_not_bursty() -> None:
    heavy, light = trunk("heavy", weight=3), trunk("light", weight=1)
    strategy = WeightedStrategy()
    sequence = [strategy.order([heavy, light], VIEW)[0].name for _ in range(8)]
    assert sequence.count("light") == 2
    # Never four of the same in a row: the light trunk is interleaved.
    assert "heavy" * 4 not in "".join(sequence)
    order = strategy.order([heavy, light], VIEW)
    assert sorted(names(order)) == ["heavy", "light"]  # the other one is the failover


def test_weighted_forgets_trunks_that_left_the_candidate_set() -> None:
    strategy = WeightedStrategy()
    x, y = trunk("x", weight=1), trunk("y", weight=1)
    for _ in range(5):
        strategy.order([x], VIEW)  # y down for a while
    picks = Counter(strategy.order([x, y], VIEW)[0].name for _ in range(100))
    assert picks == {"x": 50, "y": 50}


def test_weighted_deterministic() -> None:
    trunks = [trunk("p", weight=2), trunk("q", weight=5)]
    one, two = WeightedStrategy(), WeightedStrategy()
    assert [names(one.order(trunks, VIEW)) for _ in range(20)] == [
        names(two.order(trunks, VIEW)) for _ in range(20)
    ]


def test_least_active_prefers_fewest_calls_in_progress() -> None:
    strategy = LeastActiveStrategy()
    view = RouteView(active={"a": 3, "b": 5, "c": 0})
    assert names(strategy.order([A, B, C], view)) == ["c", "a", "b"]
    tie = RouteView(active={"a": 1, "b": 1, "c": 1})
    assert names(strategy.order([A, B, C], tie)) == ["b", "a", "c"]  # ties: priority


def test_least_active_relative_to_capacity() -> None:
    big, small = trunk("big", max_concurrent=100), trunk("small", max_concurrent=4)
    view = RouteView(active={"big": 10, "small": 2})  # 10% vs 50% used
    assert names(LeastActiveStrategy().order([small, big], view)) == ["big", "small"]


def record(stats: QualityStats, trunk_name: str, kinds: list[AttemptKind], pdd: int = 100) -> None:
    for kind in kinds:
        stats.record(trunk_name, kind, pdd)


def test_quality_unscored_trunks_keep_priority_order() -> None:
    stats = QualityStats(window=20, min_samples=5)
    record(stats, "a", [AttemptKind.CARRIER_ERROR] * 4)  # below min_samples: no score yet
    assert stats.score("a") is None
    assert names(QualityStrategy().order([A, B, C], RouteView(quality=stats))) == ["b", "a", "c"]


def test_quality_demotes_a_trunk_after_bad_asr() -> None:
    stats = QualityStats(window=20, min_samples=5)
    record(stats, "b", [AttemptKind.CARRIER_ERROR] * 6 + [AttemptKind.NO_ANSWER] * 2)
    record(stats, "a", [AttemptKind.ANSWERED] * 8)
    view = RouteView(quality=stats)
    score_a, score_b = stats.score("a"), stats.score("b")
    assert score_a is not None
    assert score_b is not None
    assert score_a > 0.9 > 0.5 > score_b
    # b has the better priority but the worse record; c is unscored (neutral, in between).
    assert names(QualityStrategy().order([A, B, C], view)) == ["a", "c", "b"]


def test_quality_recovers_as_the_window_slides() -> None:
    stats = QualityStats(window=10, min_samples=5)
    record(stats, "b", [AttemptKind.TRANSPORT_ERROR] * 10)
    record(stats, "a", [AttemptKind.ANSWERED] * 10)
    strategy, view = QualityStrategy(), RouteView(quality=stats)
    assert names(strategy.order([A, B], view)) == ["a", "b"]
    record(stats, "b", [AttemptKind.ANSWERED] * 10)  # the failures leave the window
    assert stats.failure_rate("b") == 0.0
    assert names(strategy.order([A, B], view)) == ["b", "a"]  # equal again: priority


def test_quality_counts_pdd() -> None:
    stats = QualityStats(window=10, min_samples=3)
    record(stats, "a", [AttemptKind.ANSWERED] * 5, pdd=4000)
    record(stats, "b", [AttemptKind.ANSWERED] * 5, pdd=100)
    assert stats.mean_pdd_ms("a") == 4000
    assert names(QualityStrategy().order([A, B], RouteView(quality=stats))) == ["b", "a"]
    assert names(QualityStrategy().order([B, A], RouteView(quality=stats)))[0] == "b"


def test_quality_busy_is_not_a_carrier_failure() -> None:
    stats = QualityStats(window=10, min_samples=1)
    record(stats, "a", [AttemptKind.BUSY, AttemptKind.REJECTED])
    assert stats.failure_rate("a") == 0.0
    assert stats.asr("a") == 0.0


def test_make_strategy() -> None:
    for name in ("priority", "round_robin", "weighted", "least_active", "quality"):
        assert make_strategy(name).name == name
    with pytest.raises(ValueError, match="unknown route strategy 'fastest'"):
        make_strategy("fastest")


def test_quality_stats_validation() -> None:
    with pytest.raises(ValueError, match="min_samples <= window"):
        QualityStats(window=5, min_samples=10)


def test_token_bucket_limits_rate_and_refills() -> None:
    bucket = TokenBucket(rate=2.0)  # burst 2
    assert [bucket.take(0.0) for _ in range(3)] == [True, True, False]
    assert not bucket.take(0.2)  # 0.4 tokens
    assert bucket.take(0.5)  # 1.0 token
    assert not bucket.take(0.5)
    assert bucket.take(10.0)
    assert bucket.take(10.0)
    assert not bucket.take(10.0)  # burst cap


def test_token_bucket_fractional_rate() -> None:
    bucket = TokenBucket(rate=0.5)
    assert bucket.take(0.0)
    assert not bucket.take(1.0)
    assert bucket.take(2.0)


def test_quality_counts_time_to_acknowledgement_of_alert_calls() -> None:
    """Same ASR and PDD, but b's answered calls never get a key through: a goes first."""
    stats = QualityStats(window=10, min_samples=3)
    record(stats, "a", [AttemptKind.ANSWERED] * 5)
    record(stats, "b", [AttemptKind.ANSWERED] * 5)
    assert stats.ack_score("a") is None
    assert stats.score("a") == stats.score("b")
    for seconds in (3.0, 6.0):
        stats.record_ack("a", seconds)
    stats.record_ack("b", None)
    stats.record_ack("b", 59.0)
    ack_a, ack_b = stats.ack_score("a"), stats.ack_score("b")
    assert ack_a == pytest.approx(1 - 4.5 / 60)
    assert ack_b == pytest.approx(0.5 * (1 - 59 / 60))
    score_a, score_b = stats.score("a"), stats.score("b")
    assert score_a is not None
    assert score_b is not None
    assert score_a > score_b
    assert names(QualityStrategy().order([B, A], RouteView(quality=stats)))[0] == "a"
    for _ in range(10):  # the window slides: b's keys get through now
        stats.record_ack("b", 1.0)
    assert stats.ack_score("b") == pytest.approx(1 - 1 / 60)


async def test_local_hourly_call_budget_slides() -> None:
    from carriers.budgets import CallBudget, LocalBudgets

    now = [0.0]
    budgets = LocalBudgets(clock=lambda: now[0])
    budget = CallBudget(per_hour=3, per_number_per_hour=2)
    assert [await budgets.admit_call("+14155550101", budget) for _ in range(2)] == [None, None]
    refused = await budgets.admit_call("+14155550101", budget)
    assert refused is not None
    assert "this number" in refused
    assert await budgets.admit_call("+14155550102", budget) is None
    refused = await budgets.admit_call("+14155550103", budget)
    assert refused is not None
    assert "3 calls in the last hour" in refused
    now[0] = 3600.5  # an hour later every call has left the window
    assert await budgets.admit_call("+14155550101", budget) is None
    assert await budgets.admit_call("+14155550101", budget) is None
