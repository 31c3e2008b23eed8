"""Schedules: Proxmox VE calendar events, evaluated as Proxmox does, and their systemd timers.

The vectors marked "proxmox-time" are the crate's own tests (``src/test.rs``), run there in UTC.
"""

import time
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.policy.calendar import (
    CalendarEvent,
    looks_like_hour_mistake,
    roll_overs,
    simulate,
    to_systemd_oncalendar,
)
from guestvault_engine.errors import ConfigError

try:
    from zoneinfo import ZoneInfo
except ImportError:  # pragma: no cover
    ZoneInfo = None

pytestmark = pytest.mark.skipif(ZoneInfo is None, reason="needs zoneinfo (Python 3.9+)")

BERLIN = "Europe/Berlin"


def utc(*fields):
    return datetime(*fields, tzinfo=timezone.utc)


def at(text, tz=BERLIN):
    """An aware datetime from a local wall-clock text such as '2024-03-31 01:45'."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz))


def walls(events, tz=BERLIN):
    """Events as local 'YYYY-MM-DD HH:MM[:SS] ZONE' texts, the way a person checks a schedule."""
    out = []
    for moment in events:
        local = moment.astimezone(ZoneInfo(tz))
        fmt = "%Y-%m-%d %H:%M" + (":%S" if local.second else "") + " %Z"
        out.append(local.strftime(fmt))
    return out


def runs(spec, start, n=5, tz=BERLIN):
    return walls(CalendarEvent.parse(spec).next_events(start, n, tz=tz), tz)


# ------------------------------------------------------------------ proxmox-time's own vectors

MIN, HOUR, DAY = 60, 3600, 86400
THURSDAY_00_00 = 0                    # 1970-01-01 was a Thursday
THURSDAY_15_00 = 15 * HOUR
JUL_31_2020 = 1596153600              # Friday
DEC_31_2020 = 1609372800              # Thursday

PROXMOX_VECTORS = [
    ("0", THURSDAY_00_00, THURSDAY_00_00 + HOUR),
    ("*", THURSDAY_00_00, THURSDAY_00_00 + MIN),
    ("*:0", THURSDAY_00_00, THURSDAY_00_00 + HOUR),
    ("*:*", THURSDAY_00_00, THURSDAY_00_00 + MIN),
    ("*:*:*", THURSDAY_00_00, THURSDAY_00_00 + 1),
    ("*:3:5", THURSDAY_00_00, THURSDAY_00_00 + 3 * MIN + 5),
    ("mon *:*", THURSDAY_00_00, THURSDAY_00_00 + 4 * DAY),
    ("mon 2:*", THURSDAY_00_00, THURSDAY_00_00 + 4 * DAY + 2 * HOUR),
    ("mon 2:50", THURSDAY_00_00, THURSDAY_00_00 + 4 * DAY + 2 * HOUR + 50 * MIN),
    ("tue", THURSDAY_00_00, THURSDAY_00_00 + 5 * DAY),
    ("wed", THURSDAY_00_00, THURSDAY_00_00 + 6 * DAY),
    ("thu", THURSDAY_00_00, THURSDAY_00_00 + 7 * DAY),
    ("fri", THURSDAY_00_00, THURSDAY_00_00 + 1 * DAY),
    ("sat", THURSDAY_00_00, THURSDAY_00_00 + 2 * DAY),
    ("sun", THURSDAY_00_00, THURSDAY_00_00 + 3 * DAY),
    ("4..10/2:0", THURSDAY_00_00, THURSDAY_00_00 + 4 * HOUR),
    ("4..10/2:0", THURSDAY_00_00 + 5 * HOUR, THURSDAY_00_00 + 6 * HOUR),
    ("4..10/2:0", THURSDAY_00_00 + 11 * HOUR, THURSDAY_00_00 + 1 * DAY + 4 * HOUR),
    ("5,10:4,8", THURSDAY_00_00, THURSDAY_00_00 + 5 * HOUR + 4 * MIN),
    ("10,5:8,4", THURSDAY_00_00, THURSDAY_00_00 + 5 * HOUR + 4 * MIN),
    ("6,4..10:23,5/5", THURSDAY_00_00, THURSDAY_00_00 + 4 * HOUR + 5 * MIN),
    ("4..10,6:5/5,23", THURSDAY_00_00, THURSDAY_00_00 + 4 * HOUR + 5 * MIN),
    ("sat", JUL_31_2020, JUL_31_2020 + 1 * DAY),
    ("sun", JUL_31_2020, JUL_31_2020 + 2 * DAY),
    ("mon", JUL_31_2020, JUL_31_2020 + 3 * DAY),
    ("fri", JUL_31_2020, JUL_31_2020 + 7 * DAY),
    ("fri", DEC_31_2020, DEC_31_2020 + 1 * DAY),
    ("mon", DEC_31_2020, DEC_31_2020 + 4 * DAY),
    ("thu", DEC_31_2020, DEC_31_2020 + 7 * DAY),
    ("daily", THURSDAY_00_00, THURSDAY_00_00 + DAY),
    ("daily", THURSDAY_00_00 + 1, THURSDAY_00_00 + DAY),
    ("5/2:0", THURSDAY_00_00, THURSDAY_00_00 + 5 * HOUR),
    ("5/2:0", THURSDAY_00_00 + 5 * HOUR, THURSDAY_00_00 + 7 * HOUR),
    ("1:0", THURSDAY_15_00, THURSDAY_00_00 + DAY + HOUR),
    ("2020-07-31", 0, JUL_31_2020),
    ("02-28", 0, (31 + 27) * DAY),
    ("02-29", 0, 2 * 365 * DAY + (31 + 28) * DAY),    # 1972-02-29
    ("1965/5-01-01", -1, THURSDAY_00_00),
    ("2020-7..9-2/2", JUL_31_2020, JUL_31_2020 + 2 * DAY),
    ("2020,2021-12-31", JUL_31_2020, DEC_31_2020),
    ("minutely", THURSDAY_00_00, THURSDAY_00_00 + MIN),
    ("hourly", THURSDAY_00_00, THURSDAY_00_00 + HOUR),
    ("weekly", THURSDAY_00_00, THURSDAY_00_00 + 4 * DAY),
    ("monthly", 0, 31 * DAY),
    ("quarterly", 0, (31 + 28 + 31) * DAY),
    ("semiannually", 0, (31 + 28 + 31 + 30 + 31 + 30) * DAY),
    ("semi-annually", 0, (31 + 28 + 31 + 30 + 31 + 30) * DAY),
    ("yearly", 0, 365 * DAY),
    ("annually", 0, 365 * DAY),
]


@pytest.mark.parametrize("spec,last,expected", PROXMOX_VECTORS)
def test_proxmox_time_vectors(spec, last, expected):
    event = CalendarEvent.parse(f"{spec} UTC")
    assert event.next_after(datetime.fromtimestamp(last, timezone.utc)) == datetime.fromtimestamp(expected, timezone.utc)


@pytest.mark.parametrize("spec", ["*:*", "*:0", "1:0"])
def test_proxmox_time_vectors_stay_regular_for_a_hundred_runs(spec):
    step = {"*:*": MIN, "*:0": HOUR, "1:0": DAY}[spec]
    first = THURSDAY_00_00 + (DAY + HOUR if spec == "1:0" else step)
    start = THURSDAY_15_00 if spec == "1:0" else THURSDAY_00_00
    events = CalendarEvent.parse(f"{spec} UTC").next_events(datetime.fromtimestamp(start, timezone.utc), 100)
    assert [int(m.timestamp()) for m in events] == [first + i * step for i in range(100)]


@pytest.mark.parametrize("spec", ["2021-02-29", "02-30"])
def test_proxmox_time_never_vectors(spec):
    assert CalendarEvent.parse(f"{spec} UTC").next_after(utc(1970, 1, 1)) is None


# ------------------------------------------------------------------ syntax

def test_weekdays_are_names_in_any_case_lists_and_ranges():
    assert CalendarEvent.parse("MON,Wednesday,fri..sun").weekdays == {0, 2, 4, 5, 6}
    assert CalendarEvent.parse("monDay").weekdays == {0}
    assert CalendarEvent.parse("mon,tue..wednesday,fri..sat").weekdays == {0, 1, 2, 4, 5}


def test_a_weekday_range_may_wrap_around_the_week():
    event = CalendarEvent.parse("fri..mon")
    assert event.weekdays == {4, 5, 6, 0}
    assert runs("fri..mon", at("2024-05-16 12:00")) == [
        "2024-05-17 00:00 CEST", "2024-05-18 00:00 CEST", "2024-05-19 00:00 CEST",
        "2024-05-20 00:00 CEST", "2024-05-24 00:00 CEST"]


def test_a_missing_time_is_midnight_and_missing_seconds_are_zero():
    assert CalendarEvent.parse("sat").normalized == "sat *-*-* 0:0:0"
    assert CalendarEvent.parse("*-12-25").normalized == "*-12-25 0:0:0"
    assert CalendarEvent.parse("mon 8:30").normalized == "mon *-*-* 8:30:0"
    assert CalendarEvent.parse("mon 8:30:15").normalized == "mon *-*-* 8:30:15"


def test_a_date_is_years_months_days_or_months_days():
    assert CalendarEvent.parse("2025-1..3-5/7").normalized == "2025-1..3-5/7 0:0:0"
    assert CalendarEvent.parse("*-05").normalized == "*-*-5 0:0:0"
    assert runs("Sat *-1..7 15:00", at("2024-05-15 00:00"), 3) == [
        "2024-06-01 15:00 CEST", "2024-07-06 15:00 CEST", "2024-08-03 15:00 CEST"]


def test_values_lists_ranges_and_repetitions_combine_in_one_field():
    assert runs("fri 12..13:5/20", at("2024-05-17 00:00"), 7) == [
        "2024-05-17 12:05 CEST", "2024-05-17 12:25 CEST", "2024-05-17 12:45 CEST",
        "2024-05-17 13:05 CEST", "2024-05-17 13:25 CEST", "2024-05-17 13:45 CEST",
        "2024-05-24 12:05 CEST"]
    assert runs("mon..fri 8..17,22:0/15", at("2024-05-17 17:40"), 6) == [
        "2024-05-17 17:45 CEST", "2024-05-17 22:00 CEST", "2024-05-17 22:15 CEST",
        "2024-05-17 22:30 CEST", "2024-05-17 22:45 CEST", "2024-05-20 08:00 CEST"]


def test_a_repetition_with_an_end_stops_at_the_end():
    assert runs("8..17/3:00", at("2024-05-15 09:00"), 5) == [
        "2024-05-15 11:00 CEST", "2024-05-15 14:00 CEST", "2024-05-15 17:00 CEST",
        "2024-05-16 08:00 CEST", "2024-05-16 11:00 CEST"]


def test_a_repetition_runs_on_across_hours_and_days():
    assert runs("*:0/15", at("2024-05-15 23:20"), 4) == [
        "2024-05-15 23:30 CEST", "2024-05-15 23:45 CEST", "2024-05-16 00:00 CEST", "2024-05-16 00:15 CEST"]
    assert runs("12/2:5", at("2024-05-15 21:00"), 3) == [
        "2024-05-15 22:05 CEST", "2024-05-16 12:05 CEST", "2024-05-16 14:05 CEST"]
    assert runs("*-*-1..28/9 04:00", at("2024-12-20 00:00"), 3) == [
        "2024-12-28 04:00 CET", "2025-01-01 04:00 CET", "2025-01-10 04:00 CET"]


def test_star_slash_starts_at_the_fields_first_value():
    assert CalendarEvent.parse("*/20").normalized == "*-*-* *:0/20:0"
    assert CalendarEvent.parse("*-*/3-*/10").normalized == "*-1/3-1/10 0:0:0"


def test_an_open_repetition_rolls_over_into_the_next_hour_as_in_proxmox():
    """proxmox-time asks for minute 75 after :50, mktime makes that :15 of the next hour, the
    search goes on to :25: the next hour's :00 is skipped. The engine does the same."""
    assert runs("*:0/25", at("2024-05-15 09:45"), 5) == [
        "2024-05-15 09:50 CEST", "2024-05-15 10:25 CEST", "2024-05-15 10:50 CEST",
        "2024-05-15 11:25 CEST", "2024-05-15 11:50 CEST"]
    assert runs("*:0/25", at("2024-05-15 09:59:59"), 1) == ["2024-05-15 10:00 CEST"]  # reached directly


def test_a_day_the_month_lacks_rolls_over_into_the_next_month_as_in_proxmox():
    # 2023: from February 16th proxmox-time looks for "February 30th" = March 2nd, then the 15th.
    assert runs("*-*-1,15,30", at("2023-02-10 00:00"), 4) == [
        "2023-02-15 00:00 CET", "2023-03-15 00:00 CET", "2023-03-30 00:00 CEST", "2023-04-01 00:00 CEST"]
    # 2024: February 30th = March 1st, which is a match.
    assert runs("*-*-1,15,30", at("2024-02-10 00:00"), 3) == [
        "2024-02-15 00:00 CET", "2024-03-01 00:00 CET", "2024-03-15 00:00 CET"]


def test_month_and_day_lists():
    assert runs("*-1,4,7,10-1,15 02:30", at("2024-05-15 12:00"), 4) == [
        "2024-07-01 02:30 CEST", "2024-07-15 02:30 CEST", "2024-10-01 02:30 CEST", "2024-10-15 02:30 CEST"]


def test_a_leap_day_runs_every_four_years():
    assert runs("*-02-29", at("2023-01-01 00:00"), 3) == [
        "2024-02-29 00:00 CET", "2028-02-29 00:00 CET", "2032-02-29 00:00 CET"]
    assert runs("*-02-29", at("2096-03-01 00:00"), 1) == ["2104-02-29 00:00 CET"]  # 2100 is no leap year


def test_an_event_in_the_past_never_runs_again():
    assert CalendarEvent.parse("2015-10-21").next_after(utc(2024, 1, 1), tz=BERLIN) is None
    assert CalendarEvent.parse("2015-10-21").next_events(utc(2024, 1, 1), 3, tz=BERLIN) == []


@pytest.mark.parametrize("spec,normalized", [
    ("minutely", "*-*-* *:*:0"),
    ("hourly", "*-*-* *:0:0"),
    ("daily", "*-*-* 0:0:0"),
    ("weekly", "mon *-*-* 0:0:0"),
    ("monthly", "*-*-1 0:0:0"),
    ("yearly", "*-1-1 0:0:0"),
    ("annually", "*-1-1 0:0:0"),
    ("quarterly", "*-1,4,7,10-1 0:0:0"),
    ("semiannually", "*-1,7-1 0:0:0"),
    ("semi-annually", "*-1,7-1 0:0:0"),
    ("daily UTC", "*-*-* 0:0:0 UTC"),
])
def test_keywords(spec, normalized):
    assert CalendarEvent.parse(spec).normalized == normalized


def test_keywords_run_when_their_long_form_runs():
    start = at("2024-05-15 10:17:23")
    for keyword, long_form in (("minutely", "*:*:00"), ("hourly", "*:00"), ("daily", "00:00"),
                               ("weekly", "mon 00:00"), ("monthly", "*-*-01 00:00"),
                               ("yearly", "*-01-01"), ("quarterly", "*-01,04,07,10-01"),
                               ("semiannually", "*-01,07-01")):
        assert runs(keyword, start, 3) == runs(long_form, start, 3), keyword


def test_utc_may_be_written_without_a_space_as_in_proxmox():
    assert CalendarEvent.parse("mon..fri 22:00UTC").utc


# ------------------------------------------------------------------ the lone number is a minute

def test_a_lone_number_is_a_minute_of_every_hour():
    assert CalendarEvent.parse("mon..fri 22").normalized == "mon..fri *-*-* *:22:0"
    assert runs("mon..fri 22", at("2024-05-17 21:30"), 4) == [
        "2024-05-17 22:22 CEST", "2024-05-17 23:22 CEST", "2024-05-20 00:22 CEST", "2024-05-20 01:22 CEST"]
    assert runs("22", at("2024-05-15 10:30"), 2) == ["2024-05-15 11:22 CEST", "2024-05-15 12:22 CEST"]


def test_star_slash_five_alone_is_every_five_minutes():
    assert runs("*/5", at("2024-05-15 10:03"), 3) == [
        "2024-05-15 10:05 CEST", "2024-05-15 10:10 CEST", "2024-05-15 10:15 CEST"]


def test_the_hour_mistake_is_pointed_out():
    assert looks_like_hour_mistake("mon..fri 22") == (
        "`mon..fri 22` runs at minute 22 of every hour; for 22:00 write `mon..fri 22:00`")
    assert looks_like_hour_mistake("22") == "`22` runs at minute 22 of every hour; for 22:00 write `22:00`"
    assert looks_like_hour_mistake("sat 5 UTC") == (
        "`sat 5 UTC` runs at minute 5 of every hour; for 05:00 write `sat 05:00 UTC`")


@pytest.mark.parametrize("spec", ["mon..fri 22:00", "*/5", "30", "mon 45", "daily", "sun 01:00", "mon..funday"])
def test_no_hour_mistake_where_there_is_none(spec):
    assert looks_like_hour_mistake(spec) is None


# ------------------------------------------------------------------ zones

def test_utc_suffix_runs_in_utc_whatever_the_zone():
    event = CalendarEvent.parse("22:00 UTC")
    assert event.next_after(utc(2024, 7, 1), tz=BERLIN) == utc(2024, 7, 1, 22)
    assert event.next_after(utc(2024, 7, 1), tz=BERLIN).utcoffset() == timedelta(0)


def test_without_utc_the_event_runs_in_local_time():
    event = CalendarEvent.parse("22:00")
    assert event.next_after(utc(2024, 7, 1), tz=BERLIN) == utc(2024, 7, 1, 20)
    assert event.next_after(utc(2024, 1, 1), tz=BERLIN) == utc(2024, 1, 1, 21)
    assert event.next_after(utc(2024, 7, 1), tz="America/New_York") == utc(2024, 7, 1, 2)


def test_the_default_zone_is_the_systems(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    assert CalendarEvent.parse("22:00").next_after(utc(2024, 7, 1)) == utc(2024, 7, 1, 13)
    monkeypatch.setenv("TZ", ":Europe/Berlin")
    assert CalendarEvent.parse("22:00").next_after(utc(2024, 7, 1)) == utc(2024, 7, 1, 20)


def test_an_unknown_zone_is_a_config_error():
    with pytest.raises(ConfigError, match="Mars/Olympus"):
        CalendarEvent.parse("22:00").next_after(utc(2024, 7, 1), tz="Mars/Olympus")


# ------------------------------------------------------------------ daylight saving time

def test_spring_forward_skips_a_time_that_does_not_exist():
    # Europe/Berlin 2024-03-31: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    assert runs("02:30", at("2024-03-30 12:00"), 3) == [
        "2024-04-01 02:30 CEST", "2024-04-02 02:30 CEST", "2024-04-03 02:30 CEST"]
    assert CalendarEvent.parse("2024-03-31 02:30").next_after(utc(2024, 1, 1), tz=BERLIN) is None


def test_spring_forward_goes_on_after_the_gap():
    assert runs("*:0/15", at("2024-03-31 01:20"), 4) == [
        "2024-03-31 01:30 CET", "2024-03-31 01:45 CET", "2024-03-31 03:00 CEST", "2024-03-31 03:15 CEST"]
    assert runs("hourly", at("2024-03-31 00:30"), 3) == [
        "2024-03-31 01:00 CET", "2024-03-31 03:00 CEST", "2024-03-31 04:00 CEST"]
    assert runs("2,3:30", at("2024-03-31 00:00"), 3) == [
        "2024-03-31 03:30 CEST", "2024-04-01 02:30 CEST", "2024-04-01 03:30 CEST"]


def test_fall_back_runs_a_repeated_time_once_in_the_first_pass():
    # Europe/Berlin 2024-10-27: 03:00 CEST becomes 02:00 CET; 02:00..02:59 happen twice.
    assert runs("02:30", at("2024-10-26 12:00"), 3) == [
        "2024-10-27 02:30 CEST", "2024-10-28 02:30 CET", "2024-10-29 02:30 CET"]
    assert runs("*:0/15", at("2024-10-27 01:50"), 6) == [
        "2024-10-27 02:00 CEST", "2024-10-27 02:15 CEST", "2024-10-27 02:30 CEST",
        "2024-10-27 02:45 CEST", "2024-10-27 03:00 CET", "2024-10-27 03:15 CET"]


def test_fall_back_counted_from_the_second_pass_stays_in_it():
    inside_second_pass = utc(2024, 10, 27, 1, 10)  # 02:10 CET
    assert runs("*:0/15", inside_second_pass, 3) == [
        "2024-10-27 02:15 CET", "2024-10-27 02:30 CET", "2024-10-27 02:45 CET"]


def test_half_hour_daylight_saving_time():
    # Australia/Lord_Howe 2024-10-06: 02:00 +1030 becomes 02:30 +11.
    tz = "Australia/Lord_Howe"
    assert runs("2:*", at("2024-10-06 01:58", tz), 3, tz=tz) == [
        "2024-10-06 02:30 +11", "2024-10-06 02:31 +11", "2024-10-06 02:32 +11"]


# ------------------------------------------------------------------ the documented backup policy

def test_weekdays_at_23_and_sundays_at_1_are_two_schedules():
    """"Weekdays at 23:00 and Sundays at 01:00": one schedule cannot say it, two can."""
    schedules = [CalendarEvent.parse("mon..fri 23:00"), CalendarEvent.parse("sun 01:00")]
    start = at("2024-05-13 00:00")  # a Monday
    merged = sorted(m for event in schedules for m in event.next_events(start, 7, tz=BERLIN))[:7]
    assert walls(merged) == [
        "2024-05-13 23:00 CEST", "2024-05-14 23:00 CEST", "2024-05-15 23:00 CEST",
        "2024-05-16 23:00 CEST", "2024-05-17 23:00 CEST", "2024-05-19 01:00 CEST",
        "2024-05-20 23:00 CEST"]
    assert [to_systemd_oncalendar(event) for event in schedules] == [
        ["Mon..Fri *-*-* 23:00:00"], ["Sun *-*-* 01:00:00"]]
    assert all(looks_like_hour_mistake(event.text) is None for event in schedules)


# ------------------------------------------------------------------ malformed schedules

@pytest.mark.parametrize("spec,named", [
    ("mon..funday", "'funday' is not a weekday"),
    ("25:00", "'25' is not an hour"),
    ("mon 24:00", "'24' is not an hour"),
    ("*/0", "'*/0' repeats every 0"),
    ("1..", "range '1..' has no end"),
    ("", "is empty"),
    ("   ", "is empty"),
    ("mon 23:75", "minute 75"),
    ("*-13-01", "month 13"),
    ("*-12-32", "day 32"),
    ("5..3:00", "range '5..3' runs backwards"),
    ("daily 10:00", "'daily' is a keyword"),
    ("10:00 utc", "'utc'"),
    ("mon,", "empty weekday"),
    ("10:00:00:00", "more than HOURS:MINUTES:SECONDS"),
    ("8:00/", "repetition '00/' has no step"),
])
def test_malformed_schedules_are_refused_naming_the_problem(spec, named):
    with pytest.raises(ConfigError) as err:
        CalendarEvent.parse(spec)
    assert named in str(err.value)
    assert f"'{spec}'" in str(err.value)


def test_proxmox_reads_a_zero_step_as_the_start_alone():
    assert runs("5/0", at("2024-05-15 10:00"), 2) == ["2024-05-15 10:05 CEST", "2024-05-15 11:05 CEST"]


def test_times_must_be_aware():
    with pytest.raises(ConfigError, match="no time zone"):
        CalendarEvent.parse("daily").next_after(datetime(2024, 5, 15))


def test_next_after_is_strictly_after():
    event = CalendarEvent.parse("daily UTC")
    assert event.next_after(utc(2024, 5, 15)) == utc(2024, 5, 16)
    assert event.next_after(utc(2024, 5, 15) - timedelta(microseconds=1)) == utc(2024, 5, 15)


# ------------------------------------------------------------------ systemd OnCalendar=

@pytest.mark.parametrize("spec,expression", [
    ("mon..fri 22", "Mon..Fri *-*-* *:22:00"),
    ("fri..mon 10:30", "Mon,Fri..Sun *-*-* 10:30:00"),
    ("*/5", "*-*-* *:00..55/5:00"),
    ("8..17/3:00", "*-*-* 08,11,14,17:00:00"),
    ("0..22/2:00", "*-*-* 00..22/2:00:00"),
    ("mon,wed,fri 8..17,22:0/15", "Mon,Wed,Fri *-*-* 08..17,22:00,15,30,45:00"),
    ("weekly", "Mon *-*-* 00:00:00"),
    ("quarterly", "*-01,04,07,10-01 00:00:00"),
    ("*-02-29", "*-02-29 00:00:00"),
    ("1965/5-01-01", "1970..2195/5-01-01 00:00:00"),     # no 2-digit years for systemd to misread
    ("0/2-*-* 00:00", "1970..2198/2-*-* 00:00:00"),
    ("*-0,1-0,1", "*-01-01 00:00:00"),                   # month 0 and day 0 never come
    ("*:*:*", "*-*-* *:*:*"),
    ("22:00 UTC", "*-*-* 22:00:00 UTC"),
])
def test_oncalendar_expressions(spec, expression):
    assert to_systemd_oncalendar(spec) == [expression]


def test_oncalendar_names_the_zone():
    assert to_systemd_oncalendar("sun 01:00", tz=BERLIN) == ["Sun *-*-* 01:00:00 Europe/Berlin"]
    assert to_systemd_oncalendar("sun 01:00", tz=ZoneInfo("America/New_York")) == [
        "Sun *-*-* 01:00:00 America/New_York"]
    assert to_systemd_oncalendar("sun 01:00 UTC", tz=BERLIN) == ["Sun *-*-* 01:00:00 UTC"]
    with pytest.raises(ConfigError, match="IANA name"):
        to_systemd_oncalendar("sun 01:00", tz=timezone(timedelta(hours=2)))


@pytest.mark.parametrize("spec,says", [
    ("*-02-30", "never runs"),
    ("2021-02-29", "never runs"),
    ("*-0-1", "never runs"),
    ("*-*-1,15,30", "can skip day 1 there"),
    ("*-*-1/10 04:00", "'*-*-1,11,21 4:0' and '*-*-31 4:0'"),
    ("*-*-5/10", "write it as '*-*-5,15,25 0:0'"),
    ("*/7", "write the minutes 0/7 as 0..59/7"),
    ("*:0/25", "can skip minute 0"),
    ("0/5:00", "write the hours 0/5 as 0..23/5"),
    ("*-*/5-1", "can skip month 1"),
])
def test_oncalendar_refuses_what_systemd_cannot_run_as_proxmox_does(spec, says):
    with pytest.raises(ConfigError) as err:
        to_systemd_oncalendar(spec)
    assert says in str(err.value)


@pytest.mark.parametrize("spec", ["*-*-1..28/9", "*-*-29..31", "*-*-31", "*:0/15", "12/2:5", "*/20", "0/6:00",
                                  "*-*/3-1", "*-*-1,15", "*-*-30"])
def test_repetitions_that_end_with_their_cycle_do_not_roll_over(spec):
    assert roll_overs(CalendarEvent.parse(spec)) == []
    assert len(to_systemd_oncalendar(spec)) == 1


def test_the_suggested_rewrites_translate():
    for spec in ("*-*-1,11,21 4:0", "*-*-31 4:0", "*-*-5,15,25 0:0", "0..59/7", "0..23/5:00", "*-1..12/5-1"):
        assert to_systemd_oncalendar(spec), spec


# ------------------------------------------------------------------ simulate

def test_simulate_lists_iso_times_in_the_events_zone():
    assert simulate("mon..fri 23:00", "2024-05-17T00:00:00Z", 3, BERLIN) == [
        "2024-05-17T23:00:00+02:00", "2024-05-20T23:00:00+02:00", "2024-05-21T23:00:00+02:00"]
    assert simulate("hourly UTC", 1715904000, 2) == ["2024-05-17T01:00:00+00:00", "2024-05-17T02:00:00+00:00"]
    assert simulate("2015-10-21", "2024-01-01T00:00:00Z", 5, BERLIN) == []


def test_simulate_checks_its_arguments():
    with pytest.raises(ConfigError, match="iterations"):
        simulate("daily", "2024-01-01T00:00:00Z", 0)
    with pytest.raises(ConfigError, match="no UTC offset"):
        simulate("daily", "2024-01-01T00:00:00", 3)
    with pytest.raises(ConfigError, match="funday"):
        simulate("mon..funday", "2024-01-01T00:00:00Z", 3)


# ------------------------------------------------------------------ cross-checks

SET_SEMANTICS_SPECS = [
    "mon..fri 22", "*/5", "fri..mon 10:30", "mon..fri 23:00", "sun 01:00", "hourly", "daily", "weekly",
    "monthly", "quarterly", "8..17/3:00", "mon..fri 8..17,22:0/15", "12/2:5", "*:0/15", "02:30", "2,3:30",
    "*-*-1..28/9 04:00", "*-1,4,7,10-1,15 02:30", "Sat *-1..7 15:00", "*-*-29..31 06:00", "1:0/20",
]


@pytest.mark.parametrize("spec", SET_SEMANTICS_SPECS)
@pytest.mark.parametrize("tz", ["UTC", BERLIN])
def test_without_roll_overs_runs_are_the_matching_wall_times(spec, tz):
    """The next runs are the matching wall-clock minutes, a missing one skipped, a repeated one once."""
    event = CalendarEvent.parse(spec)
    zone = ZoneInfo(tz)
    for start in (utc(2024, 3, 30, 22, 7), utc(2024, 10, 26, 21, 59), utc(2023, 2, 20, 5)):
        expected, moment = [], start.replace(second=0) + timedelta(minutes=1)
        seen = set()
        while len(expected) < 4 and moment < start + timedelta(days=400):
            local = moment.astimezone(zone)
            wall = local.replace(tzinfo=None)
            if event.matches_wall(wall) and wall not in seen:
                expected.append(moment)
            seen.add(wall)
            moment += timedelta(minutes=1) if _may_match_today(event, wall) else _to_next_day(local)
        ours = [m.astimezone(timezone.utc) for m in event.next_events(start, len(expected), tz=tz)]
        assert ours == expected, (spec, tz, start)


def _may_match_today(event, wall):
    return (not event.weekdays or wall.weekday() in event.weekdays) and all(
        not field or any(item.contains(value) for item in field)
        for field, value in ((event.years, wall.year), (event.months, wall.month), (event.days, wall.day)))


def _to_next_day(local):
    following = (local.replace(tzinfo=None) + timedelta(days=1)).replace(hour=0, minute=0)
    return max(following.replace(tzinfo=local.tzinfo).astimezone(timezone.utc) - local.astimezone(timezone.utc),
               timedelta(minutes=1))


def _libc_next(event, last):
    """proxmox-time's compute_next_event with libc's localtime/mktime (tm_isdst = -1), in $TZ."""
    def normalize(tm):
        return int(time.mktime((tm[0], tm[1], tm[2], tm[3], tm[4], tm[5], 0, 0, -1)))

    def fields(epoch):
        st = time.localtime(epoch)
        return [st.tm_year, st.tm_mon, st.tm_mday, st.tm_hour, st.tm_min, st.tm_sec, st.tm_wday]

    def contains(field, value):
        return any(item.contains(value) for item in field)

    def find_next(field, value):
        found = [n for n in (item.next_above(value) for item in field) if n is not None]
        return min(found) if found else None

    time.mktime(time.localtime(last))  # glibc's guess for a repeated hour: the start's offset
    t = fields(last + 1)
    for _count in range(1001):
        year, month, day, hour, minute, second, wday = t
        if event.years and not contains(event.years, year):
            found = find_next(event.years, year)
            if found is None:
                return None
            t = fields(normalize([found, 1, 1, 0, 0, 0]))
            continue
        if event.months and not contains(event.months, month):
            found = find_next(event.months, month)
            t = fields(normalize([year + 1, 1, 1, 0, 0, 0] if found is None else [year, found, 1, 0, 0, 0]))
            continue
        if event.days and not contains(event.days, day):
            found = find_next(event.days, day)
            t = fields(normalize([year, month + 1, 1, 0, 0, 0] if found is None else [year, month, found, 0, 0, 0]))
            continue
        if event.weekdays and len(event.weekdays) < 7 and wday not in event.weekdays:
            later = [d for d in range(wday + 1, 7) if d in event.weekdays]
            t = fields(normalize([year, month, day + (later[0] if later else 7) - wday, 0, 0, 0]))
            continue
        if event.hours and not contains(event.hours, hour):
            found = find_next(event.hours, hour)
            t = fields(normalize([year, month, day + 1, 0, 0, 0] if found is None else [year, month, day, found, 0, 0]))
            continue
        if event.minutes and not contains(event.minutes, minute):
            found = find_next(event.minutes, minute)
            t = fields(normalize([year, month, day, hour + 1, 0, 0] if found is None
                                 else [year, month, day, hour, found, 0]))
            continue
        if event.seconds and not contains(event.seconds, second):
            found = find_next(event.seconds, second)
            t = fields(normalize([year, month, day, hour, minute + 1, 0] if found is None
                                 else [year, month, day, hour, minute, found]))
            continue
        return normalize(t[:6])
    return None


LIBC_SPECS = SET_SEMANTICS_SPECS + ["*-*-1,15,30", "*:0/25", "*/7", "0/5:00", "*-*-5/10 03:00", "*-02-29 02:30",
                                    "*:*:0/20", "2:*"]


@pytest.mark.parametrize("tz", [BERLIN, "America/New_York", "Australia/Lord_Howe"])
def test_the_engine_computes_what_libc_mktime_computes_for_proxmox(tz, monkeypatch):
    """A second port of compute_next_event, on the real glibc mktime Proxmox calls."""
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        starts = [utc(2024, 3, 30, 22), utc(2024, 10, 26, 22), utc(2024, 10, 27, 1, 10), utc(2024, 3, 10, 5, 30),
                  utc(2024, 11, 3, 4, 40), utc(2024, 10, 5, 14, 50), utc(2024, 4, 6, 14, 20), utc(2023, 2, 10)]
        for spec in LIBC_SPECS:
            event = CalendarEvent.parse(spec)
            for start in starts:
                ours = [int(m.timestamp()) for m in event.next_events(start, 6, tz=tz)]
                theirs, last = [], int(start.timestamp())
                while len(theirs) < 6:
                    last = _libc_next(event, last)
                    if last is None:
                        break
                    theirs.append(last)
                assert ours == theirs, (spec, tz, start.isoformat(),
                                        walls([datetime.fromtimestamp(s, timezone.utc) for s in ours], tz),
                                        walls([datetime.fromtimestamp(s, timezone.utc) for s in theirs], tz))
    finally:
        monkeypatch.undo()
        time.tzset()
