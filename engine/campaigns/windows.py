"""Calling windows: whether a recipient may be called at an instant, and when their window next opens.

A window is a daily local time range (callStartTime to callEndTime) on some days of the week, read in the
recipient's own timezone. Pure functions over aware datetimes: the clock is the caller's, DST is zoneinfo's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import phonenumbers
from phonenumbers import timezone as number_timezones

EVERY_DAY = frozenset(range(1, 8))
"""ISO weekdays, Monday = 1 ... Sunday = 7."""

_UNKNOWN_ZONE = "Etc/Unknown"
_TIME_OF_DAY = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]")
# A week ahead always finds an opening when at least one day is allowed; one more day covers a window that
# opened the evening before and runs past midnight.
_DAYS_SEARCHED = 9


class InvalidWindow(ValueError):
    """A calling window that cannot be used (a bad time, no days, an unknown timezone)."""


def parse_time_of_day(value: str) -> time:
    """`HH:MM` as a time; InvalidWindow naming the value otherwise."""
    if not _TIME_OF_DAY.fullmatch(value):
        raise InvalidWindow(f"{value!r} is not a time of day as HH:MM (00:00 to 23:59)")
    return time(int(value[:2]), int(value[3:]))


def zone(name: str) -> ZoneInfo:
    """The IANA timezone of that name; InvalidWindow if there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidWindow(f"{name!r} is not an IANA timezone (for example Europe/Paris)") from None


@dataclass(frozen=True, slots=True)
class CallingWindow:
    """Local hours on allowed weekdays. `end <= start` runs past midnight; start == end is all day.

    A window that runs past midnight belongs to the day it opens on (Friday 22:00-02:00 ends Saturday 02:00).
    """

    start: time = time(0, 0)
    end: time = time(0, 0)
    days: frozenset[int] = EVERY_DAY

    def __post_init__(self) -> None:
        if not self.days or not self.days <= EVERY_DAY:
            raise InvalidWindow(
                f"days of week must be a non-empty subset of 1 (Monday) .. 7 (Sunday), got {sorted(self.days)}"
            )

    @classmethod
    def from_strings(cls, start: str | None, end: str | None, days: frozenset[int] = EVERY_DAY) -> CallingWindow:
        """A window from the campaign's HH:MM strings; a missing bound means the day's start or end."""
        return cls(
            start=parse_time_of_day(start) if start else time(0, 0),
            end=parse_time_of_day(end) if end else time(0, 0),
            days=days,
        )

    def _periods(self, tz: ZoneInfo, around: datetime) -> Iterator[tuple[datetime, datetime]]:
        """The window's occurrences as UTC [open, close) pairs, from the day before `around` onwards."""
        first = around.astimezone(tz).date() - timedelta(days=1)
        for offset in range(_DAYS_SEARCHED):
            day = first + timedelta(days=offset)
            if day.isoweekday() not in self.days:
                continue
            opens = _last_reading(day, self.start, tz)
            if self.end == self.start:  # all day: it closes as the next day's opens, never leaving a gap between them
                closes = _last_reading(day + timedelta(days=1), self.end, tz)
            else:
                closes_on = day if self.end > self.start else day + timedelta(days=1)
                closes = _first_reading(closes_on, self.end, tz)
            if closes > opens:  # a short window across a DST change can come out empty: it does not open
                yield opens, closes

    def is_open(self, tz: ZoneInfo, at: datetime) -> bool:
        """Whether the window is open at the aware instant `at` in timezone `tz`."""
        return any(opens <= at < closes for opens, closes in self._periods(tz, at))

    def open_period(self, tz: ZoneInfo, at: datetime) -> tuple[datetime, datetime]:
        """The [opening, closing) instants (UTC) of the period open at `at`, or of the next one if it is closed."""
        for opens, closes in self._periods(tz, at):
            if at < closes:
                return opens, closes
        raise AssertionError("a window with allowed days always opens within a week")  # pragma: no cover

    def next_opening(self, tz: ZoneInfo, at: datetime) -> datetime:
        """`at` itself if the window is open then, else the instant (UTC) it next opens."""
        return max(self.open_period(tz, at)[0], at)

    def common_period(self, zones: Sequence[ZoneInfo], at: datetime) -> tuple[datetime, datetime] | None:
        """The [opening, closing) instants (UTC) of the first stretch from `at` on during which the window is open in
        every one of `zones` at once; None when it never is within a week (zones further apart than it is long)."""
        moment = at
        while moment < at + timedelta(days=_DAYS_SEARCHED - 2):
            periods = [self.open_period(tz, moment) for tz in zones]
            opens = max(start for start, _ in periods)
            if opens <= moment:  # every period holds `moment`: their overlap is the answer
                return opens, min(end for _, end in periods)
            moment = opens  # the latest to open: no zone's earlier stretch overlaps it before then
        return None


def _first_reading(day: date, local: time, tz: ZoneInfo) -> datetime:
    """The first instant (UTC) the clock in `tz` shows `local` on `day`, or reaches past it if a DST change skips it.

    A window closes there: in the hour repeated when the clock falls back, the second 01:15 comes after 01:30.
    """
    return _readings(day, local, tz)[0]


def _last_reading(day: date, local: time, tz: ZoneInfo) -> datetime:
    """The last instant (UTC) the clock in `tz` shows `local` on `day` (it may show it twice), or reaches past it.

    A window opens there: from the first 01:30 of the repeated hour the clock goes back to 01:00, before it opens.
    """
    return _readings(day, local, tz)[1]


def _readings(day: date, local: time, tz: ZoneInfo) -> tuple[datetime, datetime]:
    # PEP 495: fold=0 reads a wall time with the offset in force before a DST change, fold=1 with the one after.
    # Shown once, both agree; shown twice (fall back), fold=0 is the first. Skipped (spring forward), they cross:
    # the first instant at or past that wall time is the one the clock jumps at, for opening and closing alike.
    before = datetime.combine(day, local, tzinfo=tz).astimezone(UTC)
    after = datetime.combine(day, local.replace(fold=1), tzinfo=tz).astimezone(UTC)
    if before <= after:
        return before, after
    jump = _offset_change(after, before, tz)
    return jump, jump


def _offset_change(start: datetime, end: datetime, tz: ZoneInfo) -> datetime:
    """The first whole second in (start, end] at which `tz`'s UTC offset differs from its offset at `start`."""
    offset = start.astimezone(tz).utcoffset()
    low, high = 0, math.ceil((end - start).total_seconds())
    while high - low > 1:
        middle = (low + high) // 2
        if (start + timedelta(seconds=middle)).astimezone(tz).utcoffset() == offset:
            low = middle
        else:
            high = middle
    return start + timedelta(seconds=high)


def recipient_timezone(phone_number: str) -> str | None:
    """The number's timezone when its region has exactly one, else None (ambiguous: see possible_timezones)."""
    try:
        parsed = phonenumbers.parse(phone_number)
    except phonenumbers.NumberParseException:
        return None
    return number_timezone(parsed, phonenumbers.number_type(parsed))


def possible_timezones(phone_number: str) -> tuple[str, ...]:
    """Every timezone the number's region spans (an Australian mobile, a North American toll-free number: many), or
    () when its region is unknown."""
    try:
        parsed = phonenumbers.parse(phone_number)
    except phonenumbers.NumberParseException:
        return ()
    return tuple(zone for zone in _zones(parsed, phonenumbers.number_type(parsed)) if zone != _UNKNOWN_ZONE)


def number_timezone(parsed: phonenumbers.PhoneNumber, kind: int) -> str | None:
    """recipient_timezone for a parsed number whose type (phonenumbers.number_type) is already known.

    The same answer as phonenumbers.timezone.time_zones_for_number, without computing the type again: an
    import of many rows pays for it once per number.
    """
    zones = _zones(parsed, kind)
    if len(zones) != 1 or zones[0] == _UNKNOWN_ZONE:
        return None
    return zones[0]


def _zones(parsed: phonenumbers.PhoneNumber, kind: int) -> tuple[str, ...]:
    if kind == phonenumbers.PhoneNumberType.UNKNOWN:
        return ()
    if parsed.country_code is not None and phonenumbers.is_number_type_geographical(kind, parsed.country_code):
        return tuple(str(zone) for zone in number_timezones.time_zones_for_geographical_number(parsed))
    return tuple(str(zone) for zone in number_timezones.time_zones_for_number(parsed))
