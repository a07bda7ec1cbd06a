"""On-call schedules: who is on call at an instant, and the shifts over a window.

Pure: no clock, no I/O; every function takes the instant(s) it answers for, so the
engine, the API and the tests ask the same questions the same way.

Rules (the README's "Schedules" section says the same):

* A layer rotates its participants in order from its epoch (``start`` at ``handoff``
  local time); before the epoch the layer has nobody. A shift length in whole days
  (``daily``, ``weekly``, a custom ``"2d"``) counts local calendar days, so a 09:00
  handoff stays at 09:00 local across DST (a shift lasts 23 or 25 hours); any other
  length (``"12h"``) is elapsed time from the epoch instant.
* Local times that do not exist (spring forward) are shifted forward by the length of
  the gap; ambiguous ones (fall back) take the first occurrence (``fold=0``).
* A layer with an ``end`` date is temporary: from ``end`` at ``handoff`` local time it has
  nobody, so the layers below answer again.
* Restrictions are weekly local windows: outside them the layer has nobody, and the
  rotation goes on regardless. Where layers overlap the later layer (higher index) wins.
* Overrides win over every layer. They are applied in creation order (the order of the
  sequence given): each one active at the instant takes over, if it ``replaces`` nobody in
  particular or the person it replaces is the one on call so far. So of two overlapping
  overrides the later-created one wins, and "Carol covers Bob covering Alice" composes.
* ``shifts`` covers the window exactly: sorted, contiguous, never overlapping; a stretch
  where nobody is on call is an explicit entry with ``recipient=None``.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from common.durations import Duration

__all__ = [
    "Layer",
    "OnCall",
    "Override",
    "Reminder",
    "Restriction",
    "Rotation",
    "Schedule",
    "Shift",
    "Weekday",
    "local_instant",
    "oncall",
    "shifts",
]

_SLUG = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
_DAY = timedelta(days=1)
MIN_SHIFT = 3600.0  # seconds: a shorter shift is a typo, not a rota
# A reminder at least a minute and at most a day ahead: earlier than that it is forgotten
# again, and the worker looks at most this far ahead (bounded work per pass).
MIN_REMINDER = 60.0
MAX_REMINDER = 86400.0


class Rotation(enum.StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    CUSTOM = "custom"


class Weekday(enum.StrEnum):
    MON = "mon"
    TUE = "tue"
    WED = "wed"
    THU = "thu"
    FRI = "fri"
    SAT = "sat"
    SUN = "sun"

    @property
    def number(self) -> int:
        """Monday 0, as `date.weekday()`."""
        return list(Weekday).index(self)


def _slug(value: str, what: str) -> str:
    if not _SLUG.match(value):
        raise ValueError(
            f"{what} {value!r} must be lowercase letters, digits, '_', '.', '-' (max 64)"
        )
    return value


def _clock(value: str, allow_midnight_end: bool = False) -> str:
    if allow_midnight_end and value == "24:00":
        return value
    if not _HHMM.match(value):
        raise ValueError(f"time {value!r} must be HH:MM (24-hour local time)")
    return value


def _parse_clock(value: str) -> tuple[int, time]:
    """(extra days, time of day): "24:00" is midnight of the next day."""
    if value == "24:00":
        return 1, time(0, 0)
    hh, mm = value.split(":")
    return 0, time(int(hh), int(mm))


def local_instant(day: date, at: str, tz: ZoneInfo) -> datetime:
    """The instant local time `at` on `day` happens: fold=0 when it happens twice, shifted
    forward by the gap when it never happens (PEP 495's reading of fold=0 for a gap)."""
    extra, tod = _parse_clock(at)
    naive = datetime.combine(day + timedelta(days=extra), tod)
    return naive.replace(tzinfo=tz, fold=0).astimezone(UTC)


class Restriction(BaseModel):
    """A weekly local window, e.g. weekdays 09:00-17:00; ``end`` may be ``24:00``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    days: tuple[Weekday, ...] = Field(min_length=1)
    start: str
    end: str

    @field_validator("start")
    @classmethod
    def _start(cls, value: str) -> str:
        return _clock(value)

    @field_validator("end")
    @classmethod
    def _end(cls, value: str) -> str:
        return _clock(value, allow_midnight_end=True)

    @model_validator(mode="after")
    def _order(self) -> Restriction:
        if _parse_clock(self.end) <= _parse_clock(self.start):
            raise ValueError("a restriction ends after it starts (split overnight windows)")
        return self

    def contains(self, at: datetime, tz: ZoneInfo) -> bool:
        day = at.astimezone(tz).date()
        return any(lo <= at < hi for lo, hi in self._windows(day - _DAY, day + _DAY, tz))

    def _windows(
        self, first: date, last: date, tz: ZoneInfo
    ) -> Iterator[tuple[datetime, datetime]]:
        days = {d.number for d in self.days}
        day = first
        while day <= last:
            if day.weekday() in days:
                yield local_instant(day, self.start, tz), local_instant(day, self.end, tz)
            day += _DAY


class Layer(BaseModel):
    """One rotation of participants; see the module docstring for its rules."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    rotation: Rotation
    shift_length: Duration | None = None  # custom rotations only
    handoff: str = "09:00"
    start: date
    # A temporary layer (holiday cover, an incident rota) ends at `end` at the handoff;
    # from then on the layers below it answer again.
    end: date | None = None
    participants: tuple[str, ...] = Field(min_length=1)
    restrictions: tuple[Restriction, ...] = ()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value, "layer name")

    @field_validator("handoff")
    @classmethod
    def _handoff(cls, value: str) -> str:
        return _clock(value)

    @model_validator(mode="after")
    def _length(self) -> Layer:
        custom = self.rotation is Rotation.CUSTOM
        if custom and self.shift_length is None:
            raise ValueError("a custom rotation needs a shift_length, e.g. '12h'")
        if not custom and self.shift_length is not None:
            raise ValueError(f"shift_length is for custom rotations, not {self.rotation.value}")
        if self.shift_length is not None and self.shift_length < MIN_SHIFT:
            raise ValueError("shift_length is at least 1h")
        if self.end is not None and self.end <= self.start:
            raise ValueError("a layer's end comes after its start")
        return self

    def _end_at(self, tz: ZoneInfo) -> datetime | None:
        return None if self.end is None else local_instant(self.end, self.handoff, tz)

    @property
    def _length_days(self) -> int | None:
        """The shift in local calendar days, or None for an elapsed-time shift."""
        match self.rotation:
            case Rotation.DAILY:
                return 1
            case Rotation.WEEKLY:
                return 7
            case Rotation.CUSTOM:
                assert self.shift_length is not None
                days, rest = divmod(self.shift_length, 86400.0)
                return int(days) if rest == 0 else None

    def _handoff_at(self, n: int, tz: ZoneInfo) -> datetime:
        """The instant shift `n` (0: the first, at the epoch) begins."""
        days = self._length_days
        if days is not None:
            return local_instant(self.start + timedelta(days=n * days), self.handoff, tz)
        assert self.shift_length is not None
        epoch = local_instant(self.start, self.handoff, tz)
        return epoch + n * timedelta(seconds=self.shift_length)

    def shift_index(self, at: datetime, tz: ZoneInfo) -> int | None:
        """Which shift `at` falls in; None before the epoch."""
        days = self._length_days
        if days is not None:
            n = (at.astimezone(tz).date() - self.start).days // days + 1
        else:
            assert self.shift_length is not None
            epoch = local_instant(self.start, self.handoff, tz)
            n = (at - epoch) // timedelta(seconds=self.shift_length) + 1
        while n >= 0 and self._handoff_at(n, tz) > at:
            n -= 1
        return n if n >= 0 else None

    def pick(self, at: datetime, tz: ZoneInfo) -> str | None:
        """The participant on call at `at` by this layer alone."""
        n = self.shift_index(at, tz)
        if n is None:
            return None
        if (end := self._end_at(tz)) is not None and at >= end:
            return None
        if self.restrictions and not any(r.contains(at, tz) for r in self.restrictions):
            return None
        return self.participants[n % len(self.participants)]

    def boundaries(self, since: datetime, until: datetime, tz: ZoneInfo) -> Iterator[datetime]:
        """Every instant in (since, until) where this layer's answer may change."""
        end = self._end_at(tz)
        if end is not None:
            if end <= since:
                return  # over: nobody from this layer in the whole window
            if end < until:
                yield end
                until = end
        n = self.shift_index(since, tz)
        n = 0 if n is None else n + 1
        while (at := self._handoff_at(n, tz)) < until:
            yield at
            n += 1
        first, last = since.astimezone(tz).date() - _DAY, until.astimezone(tz).date() + _DAY
        for r in self.restrictions:
            for lo, hi in r._windows(first, last, tz):
                yield lo
                yield hi


class Reminder(BaseModel):
    """Tell the incoming person `before` their shift starts, so nobody learns they are on
    call from the first page. `channel` None: their first contact a worker can deliver to
    (in config.REMINDER_CHANNELS order; config.schedule_errors checks the name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    before: Duration = 900.0
    channel: str | None = None

    @field_validator("before")
    @classmethod
    def _before(cls, value: float) -> float:
        if not MIN_REMINDER <= value <= MAX_REMINDER:
            raise ValueError("reminder.before is from 1m to 24h")
        return value


class Schedule(BaseModel):
    """A named rota in one time zone: its layers, the later winning where they overlap."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    time_zone: str
    layers: tuple[Layer, ...] = Field(min_length=1, max_length=20)
    reminder: Reminder | None = None  # None: no shift reminders

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _slug(value, "schedule name")

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {value!r}: use an IANA name such as Europe/Berlin"
            ) from None
        return value

    @field_validator("layers")
    @classmethod
    def _unique(cls, value: tuple[Layer, ...]) -> tuple[Layer, ...]:
        names = [layer.name for layer in value]
        if len(set(names)) != len(names):
            raise ValueError("two layers have the same name")
        return value

    @property
    def tz(self) -> ZoneInfo:
        return ZoneInfo(self.time_zone)

    def participants(self) -> list[str]:
        """Everyone a layer may put on call, in first-appearance order."""
        return list(dict.fromkeys(p for layer in self.layers for p in layer.participants))


class Override(BaseModel):
    """Someone else on call for a while; ``replaces`` limits it to one person's time."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int | None = None  # given when stored; the larger one was created later
    schedule: str
    start: AwareDatetime
    end: AwareDatetime
    recipient: str
    replaces: str | None = None

    @model_validator(mode="after")
    def _order(self) -> Override:
        if self.end <= self.start:
            raise ValueError("an override ends after it starts")
        return self

    def active(self, at: datetime) -> bool:
        return self.start <= at < self.end


@dataclass(frozen=True)
class OnCall:
    """Who is on call, the layer whose rotation is beneath, and the override that won."""

    recipients: tuple[str, ...]
    layer: str | None
    override: Override | None = None


@dataclass(frozen=True)
class Shift:
    start: datetime
    end: datetime
    recipient: str | None  # None: nobody is on call
    layer: str | None
    override: Override | None = None


def _aware(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("a naive datetime: give the instant with its offset")
    return at.astimezone(UTC)


def oncall(schedule: Schedule, overrides: Sequence[Override], at: datetime) -> OnCall:
    """Who is on call at `at` (see the module docstring for the rules)."""
    at = _aware(at)
    tz = schedule.tz
    who: str | None = None
    layer_name: str | None = None
    for layer in reversed(schedule.layers):
        who = layer.pick(at, tz)
        if who is not None:
            layer_name = layer.name
            break
    won: Override | None = None
    for o in overrides:
        if o.schedule == schedule.name and o.active(at) and o.replaces in (None, who):
            who, won = o.recipient, o
    return OnCall(() if who is None else (who,), layer_name, won)


def shifts(
    schedule: Schedule, overrides: Sequence[Override], since: datetime, until: datetime
) -> list[Shift]:
    """The window [since, until) as contiguous shifts; neighbours that agree are merged."""
    since, until = _aware(since), _aware(until)
    if until <= since:
        return []
    tz = schedule.tz
    cuts = {since, until}
    for layer in schedule.layers:
        cuts.update(layer.boundaries(since, until, tz))
    for o in overrides:
        if o.schedule == schedule.name:
            cuts.update((_aware(o.start), _aware(o.end)))
    edges = sorted(c for c in cuts if since <= c <= until)
    out: list[Shift] = []
    for lo, hi in itertools.pairwise(edges):
        now = oncall(schedule, overrides, lo)
        who = now.recipients[0] if now.recipients else None
        if out and (out[-1].recipient, out[-1].layer, out[-1].override) == (
            who, now.layer, now.override
        ):  # fmt: skip
            out[-1] = Shift(out[-1].start, hi, who, now.layer, now.override)
        else:
            out.append(Shift(lo, hi, who, now.layer, now.override))
    return out
