"""Calling hours: windows in the callee's zones, their intersection, DST and midnight, holidays, the
presets and which applies to a number. Property tests check next_opening against a brute-force scan
of the 15-minute grid, on which every boundary lies for the zones drawn here."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from phonenumbers import geocoder
from pydantic import ValidationError

from agentstudio.calling_hours import (
    CallingRules,
    WeeklyHours,
    is_open,
    next_opening,
    preset_for,
    presets,
    resolve,
    zones_of,
)

# Numbers with one known zone each, and ones with several (a US toll-free number, an Australian mobile).
NEW_YORK = "+12125550123"
PARIS = "+33612345678"
SYDNEY = "+61291234567"  # a Sydney landline: Australia/Sydney alone
INDIA = "+919812345678"
TOLL_FREE = "+18005551234"
FLORIDA_MOBILE = "+13055550123"
AU_MOBILE = "+61412345678"
UK_MOBILE = "+447912345678"
UNKNOWN_ZONE = "+80012345678"  # an international freephone number: no zone

GRID = timedelta(minutes=15)
SINGLE_ZONE_NUMBERS = [NEW_YORK, PARIS, SYDNEY, INDIA, UNKNOWN_ZONE]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def every_day(*ranges: str, **extra: object) -> WeeklyHours:
    return WeeklyHours(**{day: list(ranges) for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}, **extra)


def brute_next_opening(hours: WeeklyHours, number: str, at: datetime, limit: timedelta) -> datetime | None:
    """The oracle: `at`, then every 15-minute UTC instant after it, up to `limit`."""
    if is_open(hours, number, at):
        return at
    t = datetime.fromtimestamp((at.timestamp() // GRID.total_seconds() + 1) * GRID.total_seconds(), UTC)
    while t <= at + limit:
        if is_open(hours, number, t):
            return t
        t += GRID
    return None


quarter = st.integers(0, 95).map(lambda q: f"{q // 4:02d}:{q % 4 * 15:02d}")
ranges = st.tuples(quarter, quarter).filter(lambda r: r[0] != r[1]).map(lambda r: f"{r[0]}-{r[1]}")
weekly = st.builds(
    lambda days: WeeklyHours(**days),
    st.fixed_dictionaries({}, optional={day: st.lists(ranges, max_size=3) for day in ("mon", "tue", "wed", "thu", "fri", "sat", "sun")}),
)
# Instants around the 2026 DST changes of New York (Mar 8, Nov 1), Paris (Mar 29, Oct 25) and
# Sydney (Apr 5, Oct 4), and anywhere in the year, to the second.
dst_days = [date(2026, 3, 8), date(2026, 11, 1), date(2026, 3, 29), date(2026, 10, 25), date(2026, 4, 5), date(2026, 10, 4)]
instants = st.one_of(
    st.builds(lambda d, s: datetime(d.year, d.month, d.day, tzinfo=UTC) + timedelta(seconds=s),
              st.sampled_from(dst_days), st.integers(-2 * 86400, 2 * 86400)),
    st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2027, 12, 31), timezones=st.just(UTC)),
)
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(hours=weekly, number=st.sampled_from(SINGLE_ZONE_NUMBERS + [AU_MOBILE]), at=instants)
def test_next_opening_is_the_first_open_instant(hours: WeeklyHours, number: str, at: datetime) -> None:
    found = next_opening(hours, number, at, horizon=timedelta(days=9))
    assert found == brute_next_opening(hours, number, at, timedelta(days=9))
    if found is not None and found > at:
        assert is_open(hours, number, found)
        assert not is_open(hours, number, found - timedelta(seconds=1))


# Ranges that start or end in the small hours, where the changes happen, on the days they happen.
small_hours = st.integers(0, 16).map(lambda q: f"{q // 4:02d}:{q % 4 * 15:02d}")
# Either end in the small hours: (start, end) and (end, start).
night_ranges = st.tuples(st.one_of(small_hours, quarter), small_hours, st.booleans()).filter(lambda r: r[0] != r[1]).map(
    lambda r: f"{r[0]}-{r[1]}" if r[2] else f"{r[1]}-{r[0]}"
)
night_weekly = st.builds(lambda r: every_day(*r), st.lists(night_ranges, min_size=1, max_size=2))
# The 2026 changes themselves (UTC), and their zone.
CHANGES = [
    ("America/New_York", utc(2026, 3, 8, 7)), ("America/New_York", utc(2026, 11, 1, 6)),
    ("Europe/Paris", utc(2026, 3, 29, 1)), ("Europe/Paris", utc(2026, 10, 25, 1)),
    ("Australia/Sydney", utc(2026, 4, 4, 16)), ("Australia/Sydney", utc(2026, 10, 3, 16)),
]
near_a_change = st.builds(
    lambda change, s: (change[0], change[1] + timedelta(seconds=s)),
    st.sampled_from(CHANGES), st.integers(-3 * 3600, 3 * 3600),
)


@settings(PROPERTY, max_examples=200)
@given(hours=night_weekly, zone_at=near_a_change)
def test_next_opening_across_dst_changes(hours: WeeklyHours, zone_at: tuple[str, datetime]) -> None:
    zone, at = zone_at
    hours = hours.model_copy(update={"default_zone": zone})
    found = next_opening(hours, UNKNOWN_ZONE, at, horizon=timedelta(days=3))
    assert found == brute_next_opening(hours, UNKNOWN_ZONE, at, timedelta(days=3))


@PROPERTY
@given(hours=weekly, at=instants)
def test_open_for_a_number_means_open_in_each_of_its_zones(hours: WeeklyHours, at: datetime) -> None:
    zones = zones_of(AU_MOBILE)
    alone = [is_open(hours.model_copy(update={"default_zone": zone}), UNKNOWN_ZONE, at) for zone in zones]
    assert is_open(hours, AU_MOBILE, at) == all(alone)


def test_zones_of_real_numbers() -> None:
    assert zones_of(PARIS) == ["Europe/Paris"]
    assert len(zones_of(TOLL_FREE)) > 30 and {"Pacific/Guam", "Pacific/Honolulu"} <= set(zones_of(TOLL_FREE))
    assert "Australia/Perth" in zones_of(AU_MOBILE) and "Australia/Sydney" in zones_of(AU_MOBILE)
    # phonenumbers says Etc/Unknown for a number with no zone, and nothing for garbage.
    assert zones_of(UNKNOWN_ZONE) == []
    assert zones_of("not a number") == []


def test_a_number_with_no_zone_uses_the_default_zone() -> None:
    hours = every_day("09:00-10:00", default_zone="Asia/Tokyo")
    assert is_open(hours, UNKNOWN_ZONE, utc(2026, 6, 1, 0, 30))  # 09:30 in Tokyo
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 6, 1, 9, 30))


def test_new_york_spring_forward_opens_a_range_in_the_gap_at_the_jump() -> None:
    # 2026-03-08: 02:00 EST becomes 03:00 EDT at 07:00 UTC; 02:30 never reads on the clock.
    hours = every_day("02:30-03:30", default_zone="America/New_York")
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 3, 8, 6, 59, 59))  # 01:59:59 EST
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 3, 8, 5)) == utc(2026, 3, 8, 7)  # 03:00 EDT
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 3, 8, 7, 30))  # 03:30 EDT: closed


def test_new_york_fall_back_opens_a_repeated_half_hour_twice() -> None:
    # 2026-11-01: 01:00-02:00 is read twice, first EDT (05:00-06:00 UTC), then EST (06:00-07:00 UTC).
    hours = every_day("01:30-01:45", default_zone="America/New_York")
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 11, 1, 4)) == utc(2026, 11, 1, 5, 30)
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 11, 1, 6))  # 01:00 EST
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 11, 1, 5, 45)) == utc(2026, 11, 1, 6, 30)


def test_a_range_ending_in_a_repeated_hour_reopens_when_the_clock_goes_back() -> None:
    hours = every_day("22:00-01:30", default_zone="America/New_York")
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 11, 1, 5, 45))  # 01:45 EDT
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 11, 1, 5, 45)) == utc(2026, 11, 1, 6)  # 01:00 EST


def test_paris_and_sydney_dst_shift_the_utc_opening_by_an_hour() -> None:
    hours = every_day("10:00-11:00", default_zone="Europe/Paris")
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 3, 28, 12)) == utc(2026, 3, 29, 8)  # CEST
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 3, 27, 12)) == utc(2026, 3, 28, 9)  # CET
    sydney = every_day("02:30-03:00", default_zone="Australia/Sydney")
    assert next_opening(sydney, UNKNOWN_ZONE, utc(2026, 10, 2, 15)) == utc(2026, 10, 2, 16, 30)  # AEST
    # 2026-10-04 02:00 AEST jumps to 03:00 AEDT (16:00 UTC on the 3rd): the clock never reads
    # 02:30-03:00 that day, so the next opening is the day after, in AEDT.
    assert not is_open(sydney, UNKNOWN_ZONE, utc(2026, 10, 3, 16))
    assert next_opening(sydney, UNKNOWN_ZONE, utc(2026, 10, 3, 15)) == utc(2026, 10, 4, 15, 30)


def test_a_midnight_spanning_range_belongs_to_the_day_it_starts() -> None:
    hours = WeeklyHours(fri=["22:00-02:00"], default_zone="UTC")
    assert is_open(hours, UNKNOWN_ZONE, utc(2026, 1, 2, 23))  # Friday 23:00
    assert is_open(hours, UNKNOWN_ZONE, utc(2026, 1, 3, 1, 59))  # Saturday 01:59, though Saturday has nothing
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 1, 3, 2))
    assert not is_open(hours, UNKNOWN_ZONE, utc(2026, 1, 2, 1))  # Friday 01:00: Thursday has no range
    assert next_opening(hours, UNKNOWN_ZONE, utc(2026, 1, 3, 2)) == utc(2026, 1, 9, 22)


def test_a_french_public_holiday_is_closed() -> None:
    france = presets()["france"].hours
    assert is_open(france, PARIS, utc(2026, 7, 13, 9))  # Monday 13 July, 11:00 CEST
    assert not is_open(france, PARIS, utc(2026, 7, 14, 9))  # Tuesday 14 July, Fête nationale
    assert next_opening(france, PARIS, utc(2026, 7, 14, 9)) == utc(2026, 7, 15, 8)  # Wednesday 10:00
    assert not is_open(france, PARIS, utc(2026, 7, 13, 11, 30))  # the lunch break 13:30
    assert not is_open(france, PARIS, utc(2026, 7, 11, 9))  # Saturday


def test_an_australian_public_holiday_is_closed_in_every_zone() -> None:
    australia = presets()["australia"].hours
    # Anzac Day 2025 is Friday 25 April; the mobile's window that Friday would be 02:30-09:00 UTC.
    assert is_open(australia, AU_MOBILE, utc(2025, 4, 24, 5))
    assert not is_open(australia, AU_MOBILE, utc(2025, 4, 25, 5))
    # Next: Saturday 26 April, 09:00-17:00 in every zone: 09:00 at Cocos (UTC+6:30) is 02:30 UTC,
    # 17:00 at Lord Howe (UTC+10:30) is 06:30 UTC.
    assert next_opening(australia, AU_MOBILE, utc(2025, 4, 25, 5)) == utc(2025, 4, 26, 2, 30)
    assert not is_open(australia, AU_MOBILE, utc(2025, 4, 26, 6, 30))


def test_holidays_of_an_explicit_country_and_subdivision() -> None:
    # 6 January (Epiphany) is a holiday in Bavaria but not nationally in Germany.
    bavaria = every_day("09:00-17:00", default_zone="Europe/Berlin", holidays={"closed": True, "country": "DE", "subdivision": "BY"})
    berlin = every_day("09:00-17:00", default_zone="Europe/Berlin", holidays={"closed": True, "country": "DE"})
    assert not is_open(bavaria, "+4930123456", utc(2026, 1, 6, 10))
    assert is_open(berlin, "+4930123456", utc(2026, 1, 6, 10))


# Real numbers, the preset their number selects, an instant, and what a caller may do then.
TABLE = [
    # 8:00-21:00 in all 40 zones: Guam (UTC+10) opens last at 22:00 UTC, St John's (UTC-3:30 in
    # winter) closes first at 00:30 UTC.
    (TOLL_FREE, "us-federal", utc(2026, 1, 14, 15), False, utc(2026, 1, 14, 22)),
    (TOLL_FREE, "us-federal", utc(2026, 1, 15, 0, 15), True, utc(2026, 1, 15, 0, 15)),
    # Florida 8:00-20:00 Eastern: 20:30 EST is closed until 08:00 EST (13:00 UTC).
    (FLORIDA_MOBILE, "florida", utc(2026, 1, 15, 1, 30), False, utc(2026, 1, 15, 13)),
    # India 9:00-21:00 IST (UTC+5:30): 21:30 IST reopens at 03:30 UTC.
    (INDIA, "india", utc(2026, 1, 14, 16), False, utc(2026, 1, 15, 3, 30)),
    (INDIA, "india", utc(2026, 1, 14, 10), True, utc(2026, 1, 14, 10)),
    # France: Friday 20:30 CET is closed until Monday 10:00 CET.
    (PARIS, "france", utc(2026, 1, 16, 19, 30), False, utc(2026, 1, 19, 9)),
    # Australian mobile: a Sunday is closed; Monday's common window opens at 02:30 UTC.
    (AU_MOBILE, "australia", utc(2026, 1, 18, 3), False, utc(2026, 1, 19, 2, 30)),
    # UK: Saturday 08:30 GMT waits until 09:00.
    (UK_MOBILE, "uk", utc(2026, 1, 17, 8, 30), False, utc(2026, 1, 17, 9)),
    (UK_MOBILE, "uk", utc(2026, 7, 15, 7, 30), True, utc(2026, 7, 15, 7, 30)),  # 08:30 BST
]


@pytest.mark.parametrize(("number", "preset", "at", "open_now", "opening"), TABLE)
def test_real_numbers(number: str, preset: str, at: datetime, open_now: bool, opening: datetime) -> None:
    rules = resolve(CallingRules(), number)
    assert rules.preset == preset and rules.hours_from == "preset"
    assert is_open(rules.hours, number, at) is open_now
    assert next_opening(rules.hours, number, at) == opening


def test_preset_for_a_number() -> None:
    assert preset_for(FLORIDA_MOBILE) == "florida"
    assert preset_for("+14055550123") == "oklahoma"
    assert preset_for("+14105550123") == "maryland"
    assert preset_for(NEW_YORK) == "us-federal"
    assert preset_for(TOLL_FREE) == "us-federal"
    assert preset_for("+4930123456") is None
    assert preset_for("+14165550123") is None  # Toronto: Canada has no preset


@pytest.mark.parametrize(("preset", "state"), [("florida", "Florida"), ("oklahoma", "Oklahoma"), ("maryland", "Maryland")])
def test_state_area_codes_match_the_numbering_plan(preset: str, state: str) -> None:
    """Our table against phonenumbers' geocoding data: no area code of the state missing, none of another."""
    geocoded = {
        npa for npa in range(200, 1000)
        if geocoder.description_for_number(phonenumbers.parse(f"+1{npa}5550123"), "en") == state
    }
    assert set(presets()[preset].area_codes) == geocoded


def test_every_preset_has_a_source_and_a_cap_where_the_law_sets_one() -> None:
    shipped = presets()
    assert set(shipped) == {"us-federal", "florida", "oklahoma", "maryland", "india", "france", "australia", "uk"}
    assert all(preset.source for preset in shipped.values())
    assert (shipped["france"].cap.count, shipped["france"].cap.window_seconds) == (4, 30 * 86400)
    assert {(shipped[s].cap.count, shipped[s].cap.window_seconds) for s in ("florida", "oklahoma", "maryland")} == {(3, 86400)}
    assert shipped["australia"].hours.sun == () and shipped["france"].hours.sat == ()


def test_a_policy_s_own_hours_and_cap_replace_the_preset_s() -> None:
    own = every_day("12:00-13:00", default_zone="Europe/Paris")
    resolved = resolve(CallingRules(preset="auto", hours=own), FLORIDA_MOBILE)
    assert (resolved.preset, resolved.hours, resolved.hours_from) == ("florida", own, "policy")
    assert resolved.cap.count == 3  # the preset's cap stays unless the policy names its own
    capped = resolve(CallingRules(preset="france", cap={"count": 1, "windowSeconds": 3600}), NEW_YORK)
    assert capped.preset == "france" and capped.cap.count == 1 and capped.hours == presets()["france"].hours
    unrestricted = resolve(CallingRules(preset="auto"), "+4930123456")
    assert (unrestricted.hours, unrestricted.cap, unrestricted.hours_from) == (None, None, "none")
    assert resolve(CallingRules(preset="none"), FLORIDA_MOBILE).hours is None


@pytest.mark.parametrize(
    ("data", "field", "words"),
    [
        ({"mon": ["9-17"]}, "mon", "HH:MM-HH:MM"),
        ({"tue": ["10:00-10:00"]}, "tue", "empty"),
        ({"wed": ["10:00-25:00"]}, "wed", "HH:MM-HH:MM"),
        ({"defaultZone": "Mars/Olympus"}, "defaultZone", "IANA"),
        ({"holidays": {"closed": True, "country": "XX"}}, "holidays.country", "holidays library"),
        ({"holidays": {"closed": True, "country": "DE", "subdivision": "ZZ"}}, "holidays.subdivision", "BY"),
        ({"fri": ["10:00-11:00"], "friday": []}, "friday", "Extra"),
    ],
)
def test_validation_errors_name_the_field(data: dict, field: str, words: str) -> None:
    with pytest.raises(ValidationError) as caught:
        WeeklyHours.model_validate(data)
    error = caught.value.errors()[0]
    assert ".".join(str(part) for part in error["loc"]).startswith(field) and words in error["msg"]


def test_an_unknown_preset_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="'mars' is not a preset"):
        CallingRules(preset="mars")


def test_ranges_round_trip_as_text() -> None:
    hours = WeeklyHours(mon=["22:00-02:00", "00:00-24:00"])
    assert hours.model_dump(by_alias=True)["mon"] == ("22:00-02:00", "00:00-24:00")
    assert WeeklyHours.model_validate(hours.model_dump(by_alias=True)) == hours


def test_a_naive_instant_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        is_open(every_day("09:00-17:00"), PARIS, datetime(2026, 1, 1, 10))


def test_never_opening_within_the_horizon_is_none_and_fast() -> None:
    # 08:00-09:00 in Guam and in Honolulu never overlap: the toll-free number is never open.
    hours = every_day("08:00-09:00")
    started = datetime.now(UTC)
    assert next_opening(hours, TOLL_FREE, utc(2026, 1, 1)) is None
    assert datetime.now(UTC) - started < timedelta(seconds=3)
