"""Weekly calling windows evaluated in the callee's time zones: when a number may be called now, and
the next instant it may. Pure computation on UTC instants (zoneinfo, phonenumbers, holidays); no I/O.

Semantics (README "Calling hours"): an instant is open in a zone when the zone's wall clock at that
instant falls in one of the ranges of its weekday. A range "22:00-02:00" spans midnight: it belongs
to the day it starts on (Monday's "22:00-02:00" runs into Tuesday's first two hours whatever Tuesday
says) and a holiday closes the ranges that start on it. Wall-clock reading makes DST unambiguous: a
range starting inside a spring-forward gap opens at the jump; a repeated hour (fall back) is open
each time the clock reads inside the range. A number is open when it is open in every one of its
zones.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import holidays as holiday_calendars
import phonenumbers
from phonenumbers import timezone as number_zones
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)
from pydantic.alias_generators import to_camel

WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# How far next_opening looks before saying "never": a year and a bit, so an annual holiday or a
# window open one day a year is still found.
HORIZON = timedelta(days=400)
# A chunk of the scan: candidates are collected and sorted a week at a time, so an opening
# tomorrow costs a week of work, not the horizon.
_CHUNK = timedelta(days=7)

_RANGE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]|24):([0-5][0-9])$")
RANGE_PATTERN = _RANGE.pattern


@dataclass(frozen=True, order=True)
class TimeRange:
    """A local wall-clock range in minutes from midnight, end excluded; `end` < `start` spans midnight."""

    start: int
    end: int

    @property
    def spans_midnight(self) -> bool:
        return self.end < self.start

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


def parse_range(value: object) -> TimeRange:
    """"HH:MM-HH:MM" (end may be "24:00") as a TimeRange; a ValueError says what is wrong."""
    if isinstance(value, TimeRange):
        return value
    match = _RANGE.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a range HH:MM-HH:MM, such as 10:00-13:00 or 22:00-02:00")
    h1, m1, h2, m2 = (int(part) for part in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end > 24 * 60:
        raise ValueError(f"{value!r} ends after 24:00")
    if start == end:
        raise ValueError(f"{value!r} is empty; a whole day is 00:00-24:00")
    return TimeRange(start, end)


Range = Annotated[
    TimeRange,
    BeforeValidator(parse_range),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": RANGE_PATTERN}),
]


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{name!r} is not an IANA time zone, such as Europe/Paris") from None


class HolidayRule(BaseModel):
    """Whether public holidays close the window, and whose: by default the country of the callee's
    number (its phonenumbers region), with national holidays only unless a subdivision is named."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    closed: bool = False
    country: str | None = None
    subdivision: str | None = None

    @field_validator("country")
    @classmethod
    def _known_country(cls, country: str | None) -> str | None:
        if country is not None and country not in holiday_calendars.list_supported_countries():
            raise ValueError(f"{country!r} is not a country the holidays library knows (ISO 3166-1 alpha-2)")
        return country

    @field_validator("subdivision")
    @classmethod
    def _known_subdivision(cls, subdivision: str | None, info: ValidationInfo) -> str | None:
        country = info.data.get("country")
        if subdivision is not None:
            if country is None:
                raise ValueError("a subdivision needs its country")
            known = holiday_calendars.list_supported_countries()[country]
            if subdivision not in known:
                raise ValueError(f"{subdivision!r} is not a subdivision of {country}: one of {', '.join(known)}")
        return subdivision


class WeeklyHours(BaseModel):
    """Allowed local ranges per weekday (a weekday left out is closed), the holiday rule, and the zone
    used for a number whose zone is unknown."""

    model_config = ConfigDict(extra="forbid", frozen=True, alias_generator=to_camel, populate_by_name=True)

    mon: tuple[Range, ...] = ()
    tue: tuple[Range, ...] = ()
    wed: tuple[Range, ...] = ()
    thu: tuple[Range, ...] = ()
    fri: tuple[Range, ...] = ()
    sat: tuple[Range, ...] = ()
    sun: tuple[Range, ...] = ()
    holidays: HolidayRule = HolidayRule()
    default_zone: str = "UTC"

    @field_validator("default_zone")
    @classmethod
    def _iana_zone(cls, name: str) -> str:
        _zone(name)
        return name

    def ranges(self, weekday: int) -> tuple[TimeRange, ...]:
        """The ranges of a weekday, 0 = Monday (date.weekday())."""
        return getattr(self, WEEKDAYS[weekday])


def zones_of(number: str) -> list[str]:
    """The number's IANA zones per phonenumbers; [] when unknown or unparseable."""
    try:
        parsed = phonenumbers.parse(number, None)
    except phonenumbers.NumberParseException:
        return []
    return [zone for zone in number_zones.time_zones_for_number(parsed) if zone != number_zones.UNKNOWN_TIMEZONE]


def _country_of(number: str) -> str | None:
    try:
        return phonenumbers.region_code_for_number(phonenumbers.parse(number, None))
    except phonenumbers.NumberParseException:
        return None


@functools.lru_cache(maxsize=256)
def _calendar(country: str, subdivision: str | None) -> holiday_calendars.HolidayBase | None:
    try:
        return holiday_calendars.country_holidays(country, subdiv=subdivision)
    except NotImplementedError:  # a region the library has no calendar for: no holidays known
        return None


@dataclass(frozen=True)
class _Window:
    """WeeklyHours bound to one zone and one holiday calendar."""

    hours: WeeklyHours
    zone: ZoneInfo
    calendar: holiday_calendars.HolidayBase | None

    def ranges_on(self, day: date) -> tuple[TimeRange, ...]:
        if self.hours.holidays.closed and self.calendar is not None and day in self.calendar:
            return ()
        return self.hours.ranges(day.weekday())

    def is_open(self, at: datetime) -> bool:
        local = at.astimezone(self.zone)
        minute = local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60
        today, yesterday = local.date(), local.date() - timedelta(days=1)
        for rng in self.ranges_on(today):
            if rng.start <= minute and (rng.spans_midnight or minute < rng.end):
                return True
        return any(rng.spans_midnight and minute < rng.end for rng in self.ranges_on(yesterday))

    def openings(self, first: date, last: date) -> Iterator[datetime]:
        """Every instant at which this window can go from closed to open, for local days first..last:
        each range's start read both ways (fold 0 and 1, which differ only in a gap or a repeat), and
        each change of UTC offset (a gap can open a range at the jump, a repeat can reopen one)."""
        day = first
        while day <= last:
            for rng in self.ranges_on(day):
                wall = datetime.combine(day, time(rng.start // 60, rng.start % 60), tzinfo=self.zone)
                yield wall.astimezone(UTC)
                yield wall.replace(fold=1).astimezone(UTC)
            yield from self._offset_changes(day)
            day += timedelta(days=1)

    def _offset_changes(self, day: date) -> Iterator[datetime]:
        lo = datetime.combine(day, time(), tzinfo=self.zone).astimezone(UTC)
        hi = lo + timedelta(days=1, hours=3)
        if lo.astimezone(self.zone).utcoffset() == hi.astimezone(self.zone).utcoffset():
            return
        # Bisect to the second: zones change offset at most once in a day.
        low, high = 0, int((hi - lo).total_seconds())
        before = lo.astimezone(self.zone).utcoffset()
        while high - low > 1:
            middle = (low + high) // 2
            if (lo + timedelta(seconds=middle)).astimezone(self.zone).utcoffset() == before:
                low = middle
            else:
                high = middle
        yield lo + timedelta(seconds=high)


def _windows(hours: WeeklyHours, number: str, country: str | None = None) -> list[_Window]:
    zones = zones_of(number) or [hours.default_zone]
    rule = hours.holidays
    country = rule.country or country or _country_of(number)
    calendar = _calendar(country, rule.subdivision) if rule.closed and country else None
    return [_Window(hours, _zone(zone), calendar) for zone in zones]


def _utc(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValueError("`at` must be timezone-aware (an instant), not a naive local time")
    return at.astimezone(UTC)


def is_open(hours: WeeklyHours, number: str, at: datetime) -> bool:
    """Whether `number` may be called at the instant `at`: open in every one of its zones."""
    at = _utc(at)
    return all(window.is_open(at) for window in _windows(hours, number))


def next_opening(hours: WeeklyHours, number: str, at: datetime, horizon: timedelta = HORIZON) -> datetime | None:
    """The earliest UTC instant ≥ `at` at which `number` may be called, or None if none within `horizon`.

    The open set of the intersection is a union of half-open intervals whose left ends are left ends of
    some zone's intervals, so only those candidates (and `at`) are tried, in order, a chunk at a time."""
    at = _utc(at)
    windows = _windows(hours, number)
    if all(window.is_open(at) for window in windows):
        return at
    chunk_start, end = at, at + horizon
    while chunk_start < end:
        chunk_end = min(chunk_start + _CHUNK, end)
        for candidate in sorted(_candidates(windows, chunk_start, chunk_end)):
            if all(window.is_open(candidate) for window in windows):
                return candidate
        chunk_start = chunk_end
    return None


def _candidates(windows: Iterable[_Window], lo: datetime, hi: datetime) -> set[datetime]:
    found: set[datetime] = set()
    for window in windows:
        # A day either side of the chunk's local dates: a range's start or a jump can land in a
        # neighbouring local day's UTC span.
        first = lo.astimezone(window.zone).date() - timedelta(days=1)
        last = hi.astimezone(window.zone).date() + timedelta(days=1)
        found.update(t for t in window.openings(first, last) if lo <= t < hi)
    return found
