"""On-call schedules: known cases, and properties checked against a wall-clock model."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from escalation.schedules import Override, Schedule, Shift, oncall, shifts

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
LORD_HOWE = ZoneInfo("Australia/Lord_Howe")
PEOPLE = ("alice", "bob", "carol")


def schedule(zone: str, *layers: dict[str, Any]) -> Schedule:
    return Schedule.model_validate({"name": "payments", "time_zone": zone, "layers": layers})


def layer(**kw: Any) -> dict[str, Any]:
    base = {"name": "primary", "rotation": "daily", "handoff": "09:00",
            "start": "2026-01-05", "participants": list(PEOPLE)}  # fmt: skip
    return base | kw


def local(
    tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, fold: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=tz, fold=fold)


def who(s: Schedule, at: datetime, overrides: tuple[Override, ...] = ()) -> str | None:
    got = oncall(s, overrides, at).recipients
    return got[0] if got else None


def assert_covers(found: list[Shift], since: datetime, until: datetime) -> None:
    assert found[0].start == since
    assert found[-1].end == until
    for a, b in itertools.pairwise(found):
        assert a.start < a.end == b.start
        assert (a.recipient, a.layer, a.override) != (b.recipient, b.layer, b.override)


# ------------------------------------------------------------------ known cases


def test_weekly_monday_handoff_in_berlin_stays_at_nine_across_the_march_change() -> None:
    s = schedule("Europe/Berlin", layer(rotation="weekly", start="2026-03-16"))
    found = shifts(s, [], local(BERLIN, 2026, 3, 16, 9), local(BERLIN, 2026, 4, 6, 9))
    assert [(x.start.astimezone(BERLIN), x.recipient) for x in found] == [
        (local(BERLIN, 2026, 3, 16, 9), "alice"),
        (local(BERLIN, 2026, 3, 23, 9), "bob"),
        (local(BERLIN, 2026, 3, 30, 9), "carol"),
    ]
    # the week with the change (29 March) is an hour short
    assert [x.end - x.start for x in found] == [
        timedelta(days=7), timedelta(days=7, hours=-1), timedelta(days=7)
    ]  # fmt: skip
    assert who(s, local(BERLIN, 2026, 3, 30, 8, 59)) == "bob"
    assert who(s, local(BERLIN, 2026, 3, 30, 9)) == "carol"


def test_daily_shift_is_25_hours_in_new_york_fall_back_and_23_30_on_lord_howe() -> None:
    ny = schedule("America/New_York", layer(start="2026-10-30"))
    found = shifts(ny, [], local(NEW_YORK, 2026, 10, 31, 9), local(NEW_YORK, 2026, 11, 2, 9))
    assert [x.end - x.start for x in found] == [timedelta(hours=25), timedelta(hours=24)]
    lh = schedule("Australia/Lord_Howe", layer(start="2026-10-01"))
    found = shifts(lh, [], local(LORD_HOWE, 2026, 10, 3, 9), local(LORD_HOWE, 2026, 10, 5, 9))
    assert [x.end - x.start for x in found] == [
        timedelta(hours=23, minutes=30), timedelta(hours=24)
    ]  # fmt: skip


def test_nonexistent_handoff_moves_forward_by_the_gap_and_ambiguous_takes_the_first() -> None:
    spring = schedule("America/New_York", layer(handoff="02:30", start="2026-03-07"))
    # 02:30 does not exist on 8 March: the handoff is at 03:30 EDT
    assert who(spring, local(NEW_YORK, 2026, 3, 8, 3, 29)) == "alice"
    assert who(spring, local(NEW_YORK, 2026, 3, 8, 3, 30)) == "bob"
    fall = schedule("America/New_York", layer(handoff="01:30", start="2026-10-31"))
    first = local(NEW_YORK, 2026, 11, 1, 1, 30, fold=0)
    assert who(fall, first - timedelta(seconds=1)) == "alice"
    assert who(fall, first) == "bob"
    assert who(fall, local(NEW_YORK, 2026, 11, 1, 1, 30, fold=1)) == "bob"  # an hour later


def test_custom_twelve_hours_is_elapsed_time_so_the_local_handoff_moves_with_dst() -> None:
    s = schedule("Europe/Berlin",
                 layer(rotation="custom", shift_length="12h", start="2026-03-28"))  # fmt: skip
    found = shifts(s, [], local(BERLIN, 2026, 3, 28, 9), local(BERLIN, 2026, 3, 30, 9))
    assert {x.end - x.start for x in found[:-1]} == {timedelta(hours=12)}
    assert [x.start.astimezone(BERLIN).hour for x in found] == [9, 21, 10, 22]


def test_before_the_epoch_nobody_is_on_call_and_the_gap_is_an_explicit_shift() -> None:
    s = schedule("Europe/Berlin", layer(start="2026-03-16"))
    since = local(BERLIN, 2026, 3, 15)
    found = shifts(s, [], since, local(BERLIN, 2026, 3, 17))
    assert (found[0].start, found[0].recipient, found[0].layer) == (since, None, None)
    assert found[1].start == local(BERLIN, 2026, 3, 16, 9)
    assert oncall(s, [], since).recipients == ()


def test_restricted_layer_covers_weekday_office_hours_over_the_base_layer() -> None:
    s = schedule(
        "Europe/Berlin",
        layer(name="nights", participants=["carol"]),
        layer(name="office", rotation="weekly", participants=["alice", "bob"],
              restrictions=[{"days": ["mon", "tue", "wed", "thu", "fri"],
                             "start": "09:00", "end": "17:00"}]),
    )  # fmt: skip
    assert oncall(s, [], local(BERLIN, 2026, 1, 5, 10)).layer == "office"
    assert who(s, local(BERLIN, 2026, 1, 5, 10)) == "alice"
    assert who(s, local(BERLIN, 2026, 1, 12, 16, 59)) == "bob"
    assert who(s, local(BERLIN, 2026, 1, 12, 17)) == "carol"
    assert who(s, local(BERLIN, 2026, 1, 10, 10)) == "carol"  # Saturday


def test_override_on_override_the_later_created_wins_even_when_wider() -> None:
    s = schedule("Europe/Berlin", layer())
    narrow = Override(
        schedule="payments",
        recipient="bob",
        start=local(BERLIN, 2026, 2, 2, 12),
        end=local(BERLIN, 2026, 2, 2, 13),
    )
    wide = Override(
        schedule="payments",
        recipient="carol",
        start=local(BERLIN, 2026, 2, 2, 10),
        end=local(BERLIN, 2026, 2, 2, 18),
    )
    at = local(BERLIN, 2026, 2, 2, 12, 30)
    assert who(s, at, (narrow, wide)) == "carol"
    assert who(s, at, (wide, narrow)) == "bob"
    got = oncall(s, [wide, narrow], at)
    assert (got.override, got.layer) == (narrow, "primary")


def test_override_that_replaces_someone_applies_only_during_their_shifts() -> None:
    s = schedule("Europe/Berlin", layer())  # alice 5 Jan 09:00, bob 6 Jan, carol 7 Jan
    cover = Override(
        schedule="payments",
        recipient="dave",
        replaces="bob",
        start=local(BERLIN, 2026, 1, 5),
        end=local(BERLIN, 2026, 1, 8),
    )
    assert who(s, local(BERLIN, 2026, 1, 5, 12), (cover,)) == "alice"
    assert who(s, local(BERLIN, 2026, 1, 6, 12), (cover,)) == "dave"
    assert who(s, local(BERLIN, 2026, 1, 7, 12), (cover,)) == "carol"
    other = Override(
        schedule="other",
        recipient="erin",
        start=local(BERLIN, 2026, 1, 5),
        end=local(BERLIN, 2026, 1, 8),
    )
    assert who(s, local(BERLIN, 2026, 1, 5, 12), (other,)) == "alice"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"time_zone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"layers": [layer(rotation="custom")]}, "custom rotation needs a shift_length"),
        ({"layers": [layer(shift_length="12h")]}, "shift_length is for custom rotations"),
        ({"layers": [layer(handoff="9am")]}, "must be HH:MM"),
        ({"layers": [layer(restrictions=[{"days": ["mon"], "start": "17:00", "end": "09:00"}])]},
         "ends after it starts"),
        ({"layers": [layer(), layer()]}, "two layers have the same name"),
        ({"layers": [layer(start="2026-03-16", end="2026-03-16")]}, "end comes after its start"),
        ({"owner": "x"}, "Extra inputs are not permitted"),
    ],
)  # fmt: skip
def test_invalid_schedules_say_why(spec: dict[str, Any], message: str) -> None:
    data = {"name": "payments", "time_zone": "Europe/Berlin", "layers": [layer()]} | spec
    with pytest.raises(ValidationError, match=message):
        Schedule.model_validate(data)


def test_overrides_need_aware_ordered_instants() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Override.model_validate(
            {
                "schedule": "p",
                "recipient": "a",
                "start": "2026-01-01T00:00",
                "end": "2026-01-02T00:00Z",
            }
        )
    with pytest.raises(ValidationError, match="ends after it starts"):
        Override.model_validate(
            {
                "schedule": "p",
                "recipient": "a",
                "start": "2026-01-02T00:00Z",
                "end": "2026-01-01T00:00Z",
            }
        )


# ------------------------------------------------------------------ properties

ZONES = {"America/New_York": NEW_YORK, "Europe/Berlin": BERLIN, "Australia/Lord_Howe": LORD_HOWE}
# every zone's 2026 transitions; windows are drawn around them
TRANSITIONS = [
    datetime(2026, 3, 8, 7, tzinfo=UTC), datetime(2026, 11, 1, 6, tzinfo=UTC),
    datetime(2026, 3, 29, 1, tzinfo=UTC), datetime(2026, 10, 25, 1, tzinfo=UTC),
    datetime(2026, 4, 4, 15, tzinfo=UTC), datetime(2026, 10, 3, 15, 30, tzinfo=UTC),
]  # fmt: skip
# local times that exist exactly once every day in all three zones (no 01:00-03:59)
CLOCKS = st.sampled_from([f"{h:02}:{m:02}" for h in (0, *range(4, 24)) for m in (0, 30)])
FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wall_clock_pick(spec: dict[str, Any], tz: ZoneInfo, at: datetime) -> str | None:
    """The rotation read off the wall clock: the model the schedule must agree with."""
    wall = at.astimezone(tz).replace(tzinfo=None)
    handoff = time.fromisoformat(spec["handoff"])
    day = wall.date() - timedelta(days=0 if wall.time() >= handoff else 1)
    elapsed = (day - date.fromisoformat(spec["start"])).days
    if elapsed < 0:
        return None
    if "end" in spec and day >= date.fromisoformat(spec["end"]):
        return None
    for r in spec.get("restrictions", []):
        lo, hi = time.fromisoformat(r["start"]), time.fromisoformat(r["end"])
        if wall.strftime("%a").lower() in r["days"] and lo <= wall.time() < hi:
            break
    else:
        if spec.get("restrictions"):
            return None
    n = elapsed // (7 if spec["rotation"] == "weekly" else 1)
    people: list[str] = spec["participants"]
    return people[n % len(people)]


@st.composite
def windows(draw: st.DrawFn) -> tuple[str, datetime, datetime]:
    zone = draw(st.sampled_from(sorted(ZONES)))
    around = draw(st.sampled_from(TRANSITIONS))
    since = around - timedelta(minutes=draw(st.integers(0, 12 * 24 * 60)))
    return zone, since, since + timedelta(minutes=draw(st.integers(60, 20 * 24 * 60)))


@st.composite
def layer_specs(
    draw: st.DrawFn, name: str, restricted: bool = False, temporary: bool = False
) -> dict[str, Any]:
    spec = layer(
        name=name,
        rotation=draw(st.sampled_from(["daily", "weekly"])),
        handoff=draw(CLOCKS),
        start=(date(2026, 2, 20) + timedelta(days=draw(st.integers(0, 250)))).isoformat(),
        participants=draw(st.lists(st.sampled_from(PEOPLE), min_size=1, max_size=4)),
    )
    if temporary:
        spec["end"] = (date.fromisoformat(spec["start"]) + timedelta(
            days=draw(st.integers(1, 40)))).isoformat()  # fmt: skip
    if restricted:
        lo, hi = sorted(draw(st.lists(CLOCKS, min_size=2, max_size=2, unique=True)))
        days = draw(st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"]),
                             min_size=1, unique=True))  # fmt: skip
        spec["restrictions"] = [{"days": days, "start": lo, "end": hi}]
    return spec


def probes(found: list[Shift], extra: list[float]) -> list[datetime]:
    """Both ends of every shift (the function is constant in between) and random points."""
    since, until = found[0].start, found[-1].end
    points = [x.start for x in found] + [x.end - timedelta(microseconds=1) for x in found]
    last = until - timedelta(microseconds=1)
    return points + [min(last, since + (until - since) * f) for f in extra]


FRACTIONS = st.lists(st.floats(0, 1, exclude_max=True), max_size=10)


@FAST
@given(windows(), layer_specs("base"), FRACTIONS)
def test_rotations_across_dst_agree_with_the_wall_clock(
    window: tuple[str, datetime, datetime], spec: dict[str, Any], extra: list[float]
) -> None:
    zone, since, until = window
    s = schedule(zone, spec)
    found = shifts(s, [], since, until)
    assert_covers(found, since, until)
    for at in probes(found, extra):
        [current] = [x for x in found if x.start <= at < x.end]
        expected = wall_clock_pick(spec, ZONES[zone], at)
        assert current.recipient == who(s, at) == expected, at.astimezone(ZONES[zone])
    for x in found:  # a rotation's shifts start at the handoff, local time
        if x.recipient is not None and x.start != since:
            assert x.start.astimezone(ZONES[zone]).strftime("%H:%M") == spec["handoff"]


@FAST
@given(windows(), layer_specs("base"), layer_specs("office", restricted=True), FRACTIONS)
def test_restricted_layers_win_inside_their_windows_only(
    window: tuple[str, datetime, datetime],
    base: dict[str, Any],
    office: dict[str, Any],
    extra: list[float],
) -> None:
    zone, since, until = window
    s = schedule(zone, base, office)
    found = shifts(s, [], since, until)
    assert_covers(found, since, until)
    for at in probes(found, extra):
        [current] = [x for x in found if x.start <= at < x.end]
        top = wall_clock_pick(office, ZONES[zone], at)
        expected = top if top is not None else wall_clock_pick(base, ZONES[zone], at)
        assert current.recipient == who(s, at) == expected
        assert current.layer == (None if expected is None else "office" if top else "base")


@FAST
@given(windows(), layer_specs("base"), layer_specs("cover", temporary=True), FRACTIONS)
def test_a_temporary_layer_answers_until_its_end_then_the_layer_below_again(
    window: tuple[str, datetime, datetime],
    base: dict[str, Any],
    cover: dict[str, Any],
    extra: list[float],
) -> None:
    zone, since, until = window
    s = schedule(zone, base, cover)
    found = shifts(s, [], since, until)
    assert_covers(found, since, until)
    for at in probes(found, extra):
        [current] = [x for x in found if x.start <= at < x.end]
        top = wall_clock_pick(cover, ZONES[zone], at)
        expected = top if top is not None else wall_clock_pick(base, ZONES[zone], at)
        assert current.recipient == who(s, at) == expected
        assert current.layer == (None if expected is None else "cover" if top else "base")


@st.composite
def override_lists(draw: st.DrawFn, since: datetime, until: datetime) -> list[Override]:
    span = int((until - since).total_seconds() // 60)
    out = []
    for _ in range(draw(st.integers(0, 5))):
        start = since + timedelta(minutes=draw(st.integers(-60, span)))
        out.append(
            Override(
                schedule=draw(st.sampled_from(["payments", "payments", "other"])),
                start=start,
                end=start + timedelta(minutes=draw(st.integers(1, 3 * 24 * 60))),
                recipient=draw(st.sampled_from([*PEOPLE, "dave"])),
                replaces=draw(st.sampled_from([None, None, *PEOPLE])),
            )
        )
    return out


@FAST
@given(st.data(), windows(), layer_specs("base"), FRACTIONS)
def test_overrides_on_overrides_the_latest_created_active_one_wins(
    data: st.DataObject,
    window: tuple[str, datetime, datetime],
    spec: dict[str, Any],
    extra: list[float],
) -> None:
    zone, since, until = window
    overrides = data.draw(override_lists(since, until))
    s = schedule(zone, spec)
    found = shifts(s, overrides, since, until)
    assert_covers(found, since, until)
    for at in probes(found, extra):
        [current] = [x for x in found if x.start <= at < x.end]
        expected, won = wall_clock_pick(spec, ZONES[zone], at), None
        for o in overrides:
            mine = o.schedule == "payments" and o.start <= at < o.end
            if mine and o.replaces in (None, expected):
                expected, won = o.recipient, o
        assert current.recipient == who(s, at, tuple(overrides)) == expected
        assert current.override == won


def test_a_stored_schedule_leaves_out_what_it_does_not_use() -> None:
    """A node of the previous release forbids unknown keys: a schedule without a reminder or
    a temporary layer must be stored without `reminder` and `end`, and round-trip."""
    from escalation.crud import schedule_spec

    plain = Schedule.model_validate(
        {"name": "payments", "time_zone": "Europe/Berlin", "layers": [layer()]}
    )
    spec = schedule_spec(plain)
    assert "reminder" not in spec
    assert "end" not in spec["layers"][0]
    assert Schedule.model_validate(spec) == plain
    temporary = Schedule.model_validate(
        {"name": "payments", "time_zone": "Europe/Berlin",
         "layers": [layer(start="2026-12-24", end="2027-01-02")]}
    )  # fmt: skip
    assert schedule_spec(temporary)["layers"][0]["end"] == "2027-01-02"
