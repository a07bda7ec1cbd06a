"""Trunk health state machines: probe hysteresis, circuit breaker, board callbacks, gauges."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from carriers.health import (
    BreakerState,
    HealthBoard,
    HealthChange,
    HealthPolicy,
    ProbeState,
    TrunkHealth,
    probe_ok,
)

POLICY = HealthPolicy(down_after=3, up_after=2, breaker_failures=3, breaker_cooldown=10.0)


def probes(health: TrunkHealth, results: str, start: float = 0.0) -> list[HealthChange]:
    """Feed '+' (answered) and '-' (failed) probe results one second apart."""
    changes: list[HealthChange] = []
    for i, mark in enumerate(results):
        changes += health.probe_result(mark == "+", start + i)
    return changes


def test_starts_up_and_closed() -> None:
    health = TrunkHealth("a", POLICY)
    assert health.probe is ProbeState.UP
    assert health.breaker is BreakerState.CLOSED
    assert health.usable(0.0)


def test_down_after_k_consecutive_probe_failures_only() -> None:
    health = TrunkHealth("a", POLICY)
    assert probes(health, "--+--+") == []  # never three in a row
    assert health.probe is ProbeState.UP
    changes = probes(health, "---")
    assert [(c.aspect, c.old, c.new) for c in changes] == [("probe", "up", "down")]
    assert "3 probes failed" in changes[0].reason
    assert not health.usable(10.0)


def test_up_after_m_consecutive_successes_no_flapping() -> None:
    health = TrunkHealth("a", POLICY)
    probes(health, "---")
    assert probes(health, "+-+-+-") == []  # alternating: stays down
    assert health.probe is ProbeState.DOWN
    changes = probes(health, "++")
    assert [(c.old, c.new) for c in changes] == [("down", "up")]
    assert health.usable(20.0)
    assert probes(health, "++++") == []  # no repeated "up" changes


def test_breaker_opens_after_n_consecutive_call_failures() -> None:
    health = TrunkHealth("a", POLICY)
    assert health.call_result(True, 0.0, "503") == []
    assert health.call_result(False, 1.0) == []  # a success resets the count
    assert health.call_result(True, 2.0) == []
    assert health.call_result(True, 3.0) == []
    changes = health.call_result(True, 4.0, "no_trying")
    assert [(c.aspect, c.old, c.new) for c in changes] == [("breaker", "closed", "open")]
    assert "3 consecutive call failures" in changes[0].reason
    assert "no_trying" in changes[0].reason
    assert not health.usable(5.0)
    assert health.tick(13.9) == []  # cool-down not over yet


def test_breaker_half_opens_after_cooldown_and_allows_one_trial() -> None:
    health = TrunkHealth("a", POLICY)
    for t in range(3):
        health.call_result(True, float(t))
    opened_at = 2.0
    changes = health.tick(opened_at + 10.0)
    assert [(c.old, c.new) for c in changes] == [("open", "half_open")]
    assert health.usable(12.0)
    assert health.begin_call(12.0)  # the trial
    assert not health.usable(12.1)  # only one at a time
    assert not health.begin_call(12.1)
    changes = health.call_result(False, 13.0)
    assert [(c.old, c.new) for c in changes] == [("half_open", "closed")]
    assert health.usable(13.0)
    assert health.begin_call(13.0)
    assert health.begin_call(13.0)


def test_failed_trial_reopens_for_another_cooldown() -> None:
    health = TrunkHealth("a", POLICY)
    for t in range(3):
        health.call_result(True, float(t))
    health.tick(12.0)
    assert health.begin_call(12.0)
    changes = health.call_result(True, 12.5, "503")
    assert [(c.old, c.new) for c in changes] == [("half_open", "open")]
    assert health.tick(22.0) == []  # 9.5 s after re-opening
    assert [c.new for c in health.tick(22.5)] == ["half_open"]


def test_trial_without_verdict_frees_the_slot() -> None:
    health = TrunkHealth("a", POLICY)
    for t in range(3):
        health.call_result(True, float(t))
    health.tick(12.0)
    assert health.begin_call(12.0)
    assert health.call_result(None, 12.2) == []  # e.g. the caller cancelled
    assert health.breaker is BreakerState.HALF_OPEN
    assert health.begin_call(12.3)


def test_probe_down_wins_over_closed_breaker() -> None:
    health = TrunkHealth("a", POLICY)
    probes(health, "---")
    health.call_result(False, 5.0)
    assert not health.usable(5.0)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="down_after, up_after and breaker_failures"):
        HealthPolicy(down_after=0)
    with pytest.raises(ValueError, match="breaker_cooldown must be >= 0"):
        HealthPolicy(breaker_cooldown=-1)


def test_probe_ok_codes() -> None:
    assert probe_ok(200)
    assert probe_ok(404)
    assert probe_ok(403)
    assert probe_ok(405)
    assert not probe_ok(None)
    assert not probe_ok(503)
    assert not probe_ok(500)
    assert not probe_ok(408)


def gauge(name: str, trunk: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"trunk": trunk})


def test_board_reports_changes_and_sets_gauges() -> None:
    now = [0.0]
    seen: list[HealthChange] = []
    board = HealthBoard(
        ["unit-board-a", "unit-board-b"], POLICY, on_change=seen.append, clock=lambda: now[0]
    )
    assert gauge("ackline_trunk_up", "unit-board-a") == 1.0
    assert gauge("ackline_trunk_breaker_state", "unit-board-a") == 0.0
    for _ in range(3):
        board.probe_result("unit-board-a", False, "no answer within 1 s")
    assert gauge("ackline_trunk_up", "unit-board-a") == 0.0
    assert gauge("ackline_trunk_up", "unit-board-b") == 1.0
    assert not board.usable("unit-board-a")
    for _ in range(3):
        board.call_result("unit-board-b", True, "503")
    assert gauge("ackline_trunk_breaker_state", "unit-board-b") == 2.0
    now[0] = 10.0
    assert board.usable("unit-board-b")  # the clock moved: half-open noticed here
    assert gauge("ackline_trunk_breaker_state", "unit-board-b") == 1.0
    assert [(c.trunk, c.aspect, c.new) for c in seen] == [
        ("unit-board-a", "probe", "down"),
        ("unit-board-b", "breaker", "open"),
        ("unit-board-b", "breaker", "half_open"),
    ]
    assert "no answer within 1 s" in seen[0].reason


def test_board_survives_a_failing_callback() -> None:
    def explode(change: HealthChange) -> None:
        raise RuntimeError("audit store down")

    board = HealthBoard(["unit-board-c"], POLICY, on_change=explode)
    for _ in range(3):
        board.probe_result("unit-board-c", False)
    assert board["unit-board-c"].probe is ProbeState.DOWN
