"""Calling windows read in each recipient's timezone, across days of the week and DST changes (pure, no clock)."""

from __future__ import annotations

from datetime import UTC, datetime, time

import pytest

from engine.campaigns.windows import CallingWindow, InvalidWindow, recipient_timezone, zone

NEW_YORK = zone("America/New_York")
TOKYO = zone("Asia/Tokyo")
BERLIN = zone("Europe/Berlin")
OFFICE_HOURS = CallingWindow.from_strings("09:00", "17:00")
WEEKDAYS = frozenset({1, 2, 3, 4, 5})


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_a_window_opens_and_closes_at_local_times() -> None:
    # 2026-01-14 is a Wednesday; New York is UTC-5 in winter.
    assert not OFFICE_HOURS.is_open(NEW_YORK, utc(2026, 1, 14, 13, 59))
    assert OFFICE_HOURS.is_open(NEW_YORK, utc(2026, 1, 14, 14, 0))
    assert OFFICE_HOURS.is_open(NEW_YORK, utc(2026, 1, 14, 21, 59))
    assert not OFFICE_HOURS.is_open(NEW_YORK, utc(2026, 1, 14, 22, 0))


def test_one_instant_is_inside_one_recipients_window_and_outside_anothers() -> None:
    instant = utc(2026, 1, 14, 15, 0)  # 10:00 in New York, 00:00 next day in Tokyo
    assert OFFICE_HOURS.is_open(NEW_YORK, instant)
    assert not OFFICE_HOURS.is_open(TOKYO, instant)
    assert OFFICE_HOURS.next_opening(TOKYO, instant) == utc(2026, 1, 15, 0, 0)  # 09:00 Tokyo (UTC+9)


def test_next_opening_is_now_while_open() -> None:
    instant = utc(2026, 1, 14, 15, 30)
    assert OFFICE_HOURS.next_opening(NEW_YORK, instant) == instant


def test_days_of_week_skip_the_weekend() -> None:
    window = CallingWindow.from_strings("09:00", "17:00", WEEKDAYS)
    friday_evening = utc(2026, 1, 16, 23, 0)  # Friday 18:00 in New York
    assert window.next_opening(NEW_YORK, friday_evening) == utc(2026, 1, 19, 14, 0)  # Monday 09:00
    assert not window.is_open(NEW_YORK, utc(2026, 1, 17, 15, 0))  # Saturday 10:00


def test_the_utc_opening_moves_an_hour_across_the_spring_dst_change() -> None:
    # New York springs forward on Sunday 2026-03-08: 09:00 is 14:00 UTC before, 13:00 UTC after.
    assert OFFICE_HOURS.next_opening(NEW_YORK, utc(2026, 3, 7, 12, 0)) == utc(2026, 3, 7, 14, 0)
    assert OFFICE_HOURS.next_opening(NEW_YORK, utc(2026, 3, 7, 23, 0)) == utc(2026, 3, 8, 13, 0)
    assert OFFICE_HOURS.is_open(NEW_YORK, utc(2026, 3, 8, 13, 30))
    assert not OFFICE_HOURS.is_open(NEW_YORK, utc(2026, 3, 7, 13, 30))


def test_an_overnight_window_spans_the_autumn_dst_change_in_local_time() -> None:
    # Berlin falls back on Sunday 2026-10-25 at 03:00 CEST -> 02:00 CET. Saturday 22:00 CEST is 20:00 UTC;
    # the window ends Sunday 06:00 CET, 05:00 UTC: nine hours of wall clock, ten of real time.
    night = CallingWindow.from_strings("22:00", "06:00")
    assert night.next_opening(BERLIN, utc(2026, 10, 24, 12, 0)) == utc(2026, 10, 24, 20, 0)
    assert night.is_open(BERLIN, utc(2026, 10, 25, 4, 59))
    assert not night.is_open(BERLIN, utc(2026, 10, 25, 5, 0))


def test_a_window_ending_in_the_skipped_spring_hour_closes_when_the_clock_jumps() -> None:
    # New York springs forward on Sunday 2026-03-08 at 02:00 EST (07:00 UTC) -> 03:00 EDT: 02:30 never shows.
    # The clock reads 03:00 at 07:00 UTC, already past the window's 02:30 end: no call at 03:15 local.
    night = CallingWindow.from_strings("20:00", "02:30")
    assert night.is_open(NEW_YORK, utc(2026, 3, 8, 6, 59))  # 01:59 EST
    assert not night.is_open(NEW_YORK, utc(2026, 3, 8, 7, 15))  # 03:15 EDT
    assert night.open_period(NEW_YORK, utc(2026, 3, 8, 6, 0))[1] == utc(2026, 3, 8, 7, 0)


def test_a_window_opening_in_the_skipped_spring_hour_opens_when_the_clock_jumps() -> None:
    early = CallingWindow.from_strings("02:30", "09:00")
    assert not early.is_open(NEW_YORK, utc(2026, 3, 8, 6, 59))  # 01:59 EST
    assert early.next_opening(NEW_YORK, utc(2026, 3, 8, 6, 0)) == utc(2026, 3, 8, 7, 0)  # 03:00 EDT


def test_a_window_opening_in_the_repeated_autumn_hour_opens_at_its_second_occurrence() -> None:
    # New York falls back on Sunday 2026-11-01 at 02:00 EDT (06:00 UTC) -> 01:00 EST: 01:00-01:59 shows twice.
    # A window from 01:30 must not be open at the second 01:15 (06:15 UTC), a quarter of an hour before it opens.
    late = CallingWindow.from_strings("01:30", "05:00")
    assert not late.is_open(NEW_YORK, utc(2026, 11, 1, 6, 15))  # 01:15 EST
    assert late.next_opening(NEW_YORK, utc(2026, 11, 1, 5, 0)) == utc(2026, 11, 1, 6, 30)  # 01:30 EST


def test_a_window_ending_in_the_repeated_autumn_hour_closes_at_its_first_occurrence() -> None:
    night = CallingWindow.from_strings("20:00", "01:30")
    assert night.is_open(NEW_YORK, utc(2026, 11, 1, 5, 29))  # 01:29 EDT
    assert not night.is_open(NEW_YORK, utc(2026, 11, 1, 6, 15))  # 01:15 EST, after 01:30 EDT


def test_an_all_day_window_stays_open_across_a_clock_change_at_midnight() -> None:
    # Havana falls back on Sunday 2026-11-01 at 01:00 CDT (05:00 UTC) -> 00:00 CST: midnight shows twice.
    havana = zone("America/Havana")
    assert all(CallingWindow().is_open(havana, utc(2026, 11, 1, hour, 30)) for hour in range(2, 8))


def test_an_overnight_window_belongs_to_the_day_it_opens() -> None:
    friday_night = CallingWindow.from_strings("22:00", "02:00", frozenset({5}))
    assert friday_night.is_open(BERLIN, utc(2026, 1, 17, 0, 30))  # Saturday 01:30 in Berlin
    assert not friday_night.is_open(BERLIN, utc(2026, 1, 17, 21, 30))  # Saturday 22:30


def test_a_window_without_hours_is_open_all_day() -> None:
    assert CallingWindow().is_open(TOKYO, utc(2026, 1, 14, 3, 17))
    assert CallingWindow.from_strings(None, None) == CallingWindow(time(0), time(0))


def test_the_common_stretch_of_several_zones_opens_with_the_last_and_closes_with_the_first() -> None:
    # Berlin (UTC+1) and New York (UTC-5) share 15:00-17:00 of Berlin's clock; New York's 09:00-17:00 is 23:00-07:00
    # in Tokyo: those two share no hour.
    assert OFFICE_HOURS.common_period([NEW_YORK, BERLIN], utc(2026, 12, 7, 9, 0)) == (
        utc(2026, 12, 7, 14, 0),
        utc(2026, 12, 7, 16, 0),
    )
    assert OFFICE_HOURS.common_period([NEW_YORK, TOKYO], utc(2026, 12, 7, 15, 0)) is None


def test_the_common_stretch_skips_to_a_day_every_zone_allows() -> None:
    weekdays = CallingWindow.from_strings("09:00", "17:00", WEEKDAYS)
    # Friday 16:30 UTC: Berlin has closed, New York is open; Monday is the next day both open.
    assert weekdays.common_period([NEW_YORK, BERLIN], utc(2026, 12, 11, 16, 30)) == (
        utc(2026, 12, 14, 14, 0),
        utc(2026, 12, 14, 16, 0),
    )


@pytest.mark.parametrize(
    ("number", "expected"),
    [
        ("+12125551234", "America/New_York"),
        ("+14155550123", "America/Los_Angeles"),
        ("+81312345678", "Asia/Tokyo"),
        ("+15555550100", None),  # no region: the campaign's timezone applies
    ],
)
def test_a_numbers_timezone_comes_from_its_region_when_it_has_one(number: str, expected: str | None) -> None:
    assert recipient_timezone(number) == expected


def test_a_country_with_several_timezones_is_ambiguous() -> None:
    assert recipient_timezone("+61491570006") is None  # an Australian mobile: any of its zones


@pytest.mark.parametrize("bad", ["9:00", "24:00", "09:60", "nine"])
def test_unusable_times_are_refused_with_the_value(bad: str) -> None:
    with pytest.raises(InvalidWindow, match=bad):
        CallingWindow.from_strings(bad, "17:00")


def test_unknown_timezones_and_empty_days_are_refused() -> None:
    with pytest.raises(InvalidWindow, match="Mars/Olympus"):
        zone("Mars/Olympus")
    with pytest.raises(InvalidWindow, match="days of week"):
        CallingWindow(days=frozenset())
