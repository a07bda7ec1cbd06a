"""The status page's rules: component states from signals at and around every threshold,
and daily bars and 90-day uptime from synthetic samples."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from api.status_sampler import RequestWindow, interval_start
from api.web.status import badge_svg, percent
from carriers.health import BreakerState, ProbeState
from escalation.status import (
    ApiSignal,
    ChannelSignal,
    ComponentState,
    DispatcherSignal,
    Sample,
    Thresholds,
    TrunkView,
    api_state,
    channel_state,
    daily_bars,
    day_totals,
    dispatcher_state,
    maintenance_status,
    overall_state,
    trunk_state,
    uptime,
    with_maintenance,
)

S = ComponentState
UP, DOWN = ProbeState.UP, ProbeState.DOWN
CLOSED, HALF, OPEN = BreakerState.CLOSED, BreakerState.HALF_OPEN, BreakerState.OPEN


@pytest.mark.parametrize(
    ("signal", "state"),
    [
        (ApiSignal(False, 0, 0), S.MAJOR_OUTAGE),  # the database does not answer
        (ApiSignal(True, 0, 0), S.OPERATIONAL),
        (ApiSignal(True, 9, 9), S.OPERATIONAL),  # below 10 requests: too few to judge
        (ApiSignal(True, 100, 4), S.OPERATIONAL),
        (ApiSignal(True, 100, 5), S.DEGRADED),  # 5 %
        (ApiSignal(True, 100, 24), S.DEGRADED),
        (ApiSignal(True, 100, 25), S.PARTIAL_OUTAGE),  # 25 %
        (ApiSignal(True, 100, 49), S.PARTIAL_OUTAGE),
        (ApiSignal(True, 100, 50), S.MAJOR_OUTAGE),  # 50 %
        (ApiSignal(True, 10, 10), S.MAJOR_OUTAGE),
    ],
)
def test_api_state(signal: ApiSignal, state: ComponentState) -> None:
    assert api_state(signal) is state


@pytest.mark.parametrize(
    ("lag", "state"),
    [(None, S.OPERATIONAL), (0.0, S.OPERATIONAL), (29.9, S.OPERATIONAL), (30.0, S.DEGRADED),
     (119.9, S.DEGRADED), (120.0, S.PARTIAL_OUTAGE), (599.9, S.PARTIAL_OUTAGE),
     (600.0, S.MAJOR_OUTAGE), (86_400.0, S.MAJOR_OUTAGE)],
)  # fmt: skip
def test_dispatcher_state(lag: float | None, state: ComponentState) -> None:
    assert dispatcher_state(DispatcherSignal(True, lag)) is state
    assert dispatcher_state(DispatcherSignal(False, lag)) is S.MAJOR_OUTAGE


def test_thresholds_are_settable() -> None:
    strict = Thresholds(lag_degraded=1, lag_partial=2, lag_major=3)
    assert dispatcher_state(DispatcherSignal(True, 2.5), strict) is S.PARTIAL_OUTAGE


@pytest.mark.parametrize(
    ("views", "state"),
    [
        ([], None),  # nobody reports the trunk: no data, not up
        ([TrunkView(UP, CLOSED)], S.OPERATIONAL),
        ([TrunkView(UP, HALF)], S.DEGRADED),
        ([TrunkView(UP, OPEN)], S.PARTIAL_OUTAGE),
        ([TrunkView(DOWN, CLOSED)], S.MAJOR_OUTAGE),
        ([TrunkView(DOWN, OPEN)], S.MAJOR_OUTAGE),
        ([TrunkView(DOWN, CLOSED), TrunkView(DOWN, OPEN)], S.MAJOR_OUTAGE),  # all down
        ([TrunkView(DOWN, CLOSED), TrunkView(UP, CLOSED)], S.PARTIAL_OUTAGE),  # some down
        ([TrunkView(UP, OPEN), TrunkView(UP, CLOSED)], S.PARTIAL_OUTAGE),
        ([TrunkView(UP, HALF), TrunkView(UP, CLOSED)], S.DEGRADED),
        ([TrunkView(UP, CLOSED, registered=False)], S.MAJOR_OUTAGE),  # takes no calls
        ([TrunkView(UP, CLOSED, registered=False), TrunkView(UP, CLOSED)], S.PARTIAL_OUTAGE),
    ],
)
def test_trunk_state(views: list[TrunkView], state: ComponentState | None) -> None:
    assert trunk_state(views) is state


@pytest.mark.parametrize(
    ("ok", "failed", "state"),
    [(0, 0, S.OPERATIONAL), (50, 0, S.OPERATIONAL), (0, 1, S.DEGRADED), (0, 2, S.DEGRADED),
     (0, 3, S.MAJOR_OUTAGE), (91, 9, S.OPERATIONAL), (90, 10, S.DEGRADED),
     (51, 49, S.DEGRADED), (50, 50, S.PARTIAL_OUTAGE), (1, 99, S.PARTIAL_OUTAGE)],
)  # fmt: skip
def test_channel_state(ok: int, failed: int, state: ComponentState) -> None:
    assert channel_state(ChannelSignal(ok, failed)) is state


def test_maintenance_wins_and_overall_is_the_worst() -> None:
    assert with_maintenance(S.MAJOR_OUTAGE, "sms", {"sms"}) is S.MAINTENANCE
    assert with_maintenance(S.MAJOR_OUTAGE, "email", {"sms"}) is S.MAJOR_OUTAGE
    assert with_maintenance(None, "voice-a", ["voice-a"]) is S.MAINTENANCE
    assert overall_state([S.OPERATIONAL, None, S.MAINTENANCE]) is S.MAINTENANCE
    assert overall_state([S.MAINTENANCE, S.DEGRADED]) is S.DEGRADED
    assert overall_state([S.PARTIAL_OUTAGE, S.MAJOR_OUTAGE, S.DEGRADED]) is S.MAJOR_OUTAGE
    assert overall_state([None]) is S.OPERATIONAL
    start = datetime(2026, 4, 6, 9, tzinfo=UTC)
    end = start + timedelta(hours=2)
    assert [maintenance_status(start, end, start + timedelta(minutes=m)).value
            for m in (-1, 0, 119, 120)] == ["scheduled", "in_progress", "in_progress",
                                            "completed"]  # fmt: skip
    assert maintenance_status(start, end, start, cancelled=True).value == "cancelled"


TODAY = date(2026, 4, 30)


def minutes(
    component: str, day: date, hour: int, count: int, state: ComponentState
) -> list[Sample]:
    start = datetime(day.year, day.month, day.day, hour, tzinfo=UTC)
    return [Sample(component, start + timedelta(minutes=m), 60, state) for m in range(count)]


def test_daily_bars_and_uptime_from_synthetic_samples() -> None:
    samples = [
        *minutes("api", TODAY, 0, 60, S.OPERATIONAL),
        *minutes("api", TODAY, 1, 30, S.DEGRADED),  # degraded counts as up
        *minutes("api", TODAY, 2, 30, S.MAJOR_OUTAGE),
        *minutes("api", TODAY - timedelta(days=1), 0, 60, S.MAINTENANCE),  # announced: up
        *minutes("api", TODAY - timedelta(days=1), 1, 60, S.PARTIAL_OUTAGE),
        *minutes("api", TODAY - timedelta(days=89), 0, 120, S.OPERATIONAL),
        *minutes("api", TODAY - timedelta(days=90), 0, 600, S.MAJOR_OUTAGE),  # too old
        *minutes("sms", TODAY, 0, 10, S.OPERATIONAL),
    ]
    totals = day_totals(samples)
    bars = daily_bars(totals["api"], TODAY)
    assert len(bars) == 90
    assert bars[0].day == TODAY - timedelta(days=89)
    assert bars[-1].day == TODAY
    assert (bars[-1].sampled, bars[-1].up) == (120 * 60, 90 * 60)
    assert bars[-1].uptime == 0.75
    assert bars[-1].worst is S.MAJOR_OUTAGE
    assert (bars[-2].uptime, bars[-2].worst) == (0.5, S.PARTIAL_OUTAGE)
    assert bars[0].uptime == 1.0
    assert bars[0].worst is S.OPERATIONAL
    # days without samples are "no data", not up, and leave the uptime alone
    empty = bars[1:-2]
    assert len(empty) == 87
    assert not any(b.has_data for b in empty)
    assert all(b.uptime is None and b.worst is None for b in empty)
    assert uptime(bars) == (90 + 60 + 120) / (120 + 120 + 120)
    assert uptime(daily_bars({}, TODAY)) is None
    assert uptime(daily_bars(totals["sms"], TODAY)) == 1.0


def test_samples_fall_on_their_utc_day() -> None:
    berlin_evening = datetime(2026, 4, 30, 23, 30, tzinfo=UTC).astimezone()
    totals = day_totals([Sample("api", berlin_evening, 60, S.OPERATIONAL)])
    assert list(totals["api"]) == [date(2026, 4, 30)]


def test_interval_start_is_the_same_on_every_node() -> None:
    at = datetime(2026, 4, 30, 12, 34, 56, 789000, tzinfo=UTC)
    assert interval_start(at, 60) == datetime(2026, 4, 30, 12, 34, tzinfo=UTC)
    assert interval_start(at + timedelta(seconds=3), 60) == interval_start(at, 60)
    assert interval_start(at, 300) == datetime(2026, 4, 30, 12, 30, tzinfo=UTC)


def test_percent_never_rounds_an_outage_up_to_100() -> None:
    assert percent(1.0) == "100%"
    assert percent(0.999999) == "99.99%"
    assert percent(0.75) == "75.00%"
    assert percent(None) == "no data"


def test_request_window_counts_v1_requests_and_5xx_in_the_window() -> None:
    from api.metrics import REQUESTS

    now = [1000.0]
    window = RequestWindow(300, clock=lambda: now[0])
    assert window.read() == (0, 0)
    REQUESTS.labels("POST", "/v1/alerts", "202").inc(8)
    REQUESTS.labels("POST", "/v1/alerts", "503").inc(2)
    REQUESTS.labels("GET", "/status", "500").inc(5)  # not the API
    now[0] += 60
    assert window.read() == (10, 2)
    now[0] += 301  # those requests fell out of the window
    assert window.read() == (0, 0)


def test_badge_escapes_its_text() -> None:
    svg = badge_svg("Voice <a&b>", "operational", "#13692f")
    assert "<a&b>" not in svg
    assert "Voice &lt;a&amp;b&gt;" in svg


def test_a_trunk_report_counts_its_registration() -> None:
    from api.status_sampler import trunk_view

    report = {"probe": "up", "breaker": "closed", "registration": None}
    assert trunk_view(report) == TrunkView(UP, CLOSED, registered=True)
    assert trunk_view({**report, "registration": "registered"}) == TrunkView(UP, CLOSED)
    for state in ("unregistered", "failed"):
        assert trunk_view({**report, "registration": state}) == TrunkView(
            UP, CLOSED, registered=False
        )
    assert trunk_view({"probe": "sideways", "breaker": "closed"}) is None
