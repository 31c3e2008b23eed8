"""Retention (prune selection) with Proxmox VE's semantics, on plain data.

The worked examples at the end are Proxmox's own test cases: pve-storage
``src/test/prune_backups_test.pm`` (the tests of ``PVE::Storage::prune_mark_backup_group``) and
proxmox-backup ``tests/prune.rs`` (the tests of PBS's ``compute_prune_info``). Both run there in
the build host's local time, which is UTC; here they run with ``tz="UTC"``.
"""

import functools
import random
import time
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.times import format_utc
from guestvault_engine.policy.retention import (
    PruneMark,
    RetentionPolicy,
    as_policy,
    select_for_prune,
    simulate,
    to_datetime,
)


def backup(backup_id, when, protected=False):
    return {"id": backup_id, "time": when, "protected": protected}


def decide(backups, policy, tz="UTC"):
    """{id: 'keep (daily #1)' | 'remove' | 'protected'} for the policy given as text."""
    marks = select_for_prune(backups, as_policy(policy), tz=tz)
    return {mark.id: mark.describe() for mark in marks}


def daily(*days, hour="20:00:00"):
    """One backup per given day of May 2024, id = the day's number."""
    return [backup(day, f"2024-05-{day:02d}T{hour}Z") for day in days]


# ------------------------------------------------------------------ each rule alone

def test_keep_last_keeps_the_n_newest_backups():
    assert decide(daily(1, 2, 3, 4, 5), "keep-last=3") == {
        5: "keep (last #1)", 4: "keep (last #2)", 3: "keep (last #3)",
        2: "remove", 1: "remove"}


def test_keep_last_larger_than_the_number_of_backups_keeps_them_all():
    assert set(decide(daily(1, 2), "keep-last=10").values()) == {
        "keep (last #1)", "keep (last #2)"}


def test_keep_hourly_keeps_the_newest_backup_of_each_hour():
    backups = [backup(t, f"2024-05-01T{t}:00Z")
               for t in ("09:10", "09:50", "10:05", "10:30", "10:55", "11:20")]
    assert decide(backups, "keep-hourly=2") == {
        "11:20": "keep (hourly #1)", "10:55": "keep (hourly #2)",
        "10:30": "remove", "10:05": "remove", "09:50": "remove", "09:10": "remove"}


def test_keep_daily_keeps_the_newest_backup_of_each_day():
    backups = daily(1, 2, 3) + [backup("3-morning", "2024-05-03T06:00:00Z")]
    assert decide(backups, "keep-daily=2") == {
        3: "keep (daily #1)", "3-morning": "remove", 2: "keep (daily #2)", 1: "remove"}


def test_days_without_backups_do_not_count():
    assert decide(daily(1, 10, 20), "keep-daily=3") == {
        20: "keep (daily #1)", 10: "keep (daily #2)", 1: "keep (daily #3)"}


def test_keep_weekly_uses_iso_weeks_starting_on_monday():
    # 2024-05-05 is a Sunday, 2024-05-06 the Monday after it.
    backups = daily(1, 5, 6, 8)
    assert decide(backups, "keep-weekly=2") == {
        8: "keep (weekly #1)", 6: "remove", 5: "keep (weekly #2)", 1: "remove"}


def test_keep_weekly_counts_iso_weeks_across_the_year_boundary():
    # 2020-12-31 (Thursday) and 2021-01-03 (Sunday) are both in ISO week 53 of 2020;
    # 2021-01-04 starts week 1 of 2021.
    backups = [backup(day, f"{day}T12:00:00Z")
               for day in ("2020-12-24", "2020-12-28", "2020-12-31", "2021-01-03", "2021-01-04")]
    assert decide(backups, "keep-weekly=3") == {
        "2021-01-04": "keep (weekly #1)",
        "2021-01-03": "keep (weekly #2)",
        "2020-12-31": "remove",
        "2020-12-28": "remove",
        "2020-12-24": "keep (weekly #3)"}


def test_keep_monthly_keeps_the_newest_backup_of_each_month():
    backups = [backup(day, f"{day}T12:00:00Z")
               for day in ("2024-01-31", "2024-02-01", "2024-02-29", "2024-03-01", "2024-03-15")]
    assert decide(backups, "keep-monthly=2") == {
        "2024-03-15": "keep (monthly #1)", "2024-03-01": "remove",
        "2024-02-29": "keep (monthly #2)", "2024-02-01": "remove", "2024-01-31": "remove"}


def test_keep_yearly_keeps_the_newest_backup_of_each_calendar_year():
    # Yearly uses the calendar year, not the ISO week year: 2021-01-01 belongs to 2021.
    backups = [backup(day, f"{day}T12:00:00Z")
               for day in ("2019-06-01", "2020-12-31", "2021-01-01", "2021-07-01")]
    assert decide(backups, "keep-yearly=2") == {
        "2021-07-01": "keep (yearly #1)", "2021-01-01": "remove",
        "2020-12-31": "keep (yearly #2)", "2019-06-01": "remove"}


# ------------------------------------------------------------------ rules together

def test_keep_daily_starts_after_the_days_keep_last_already_covers():
    # The two newest backups are on the same day: keep-last keeps both, so that day is
    # covered and keep-daily's three days are the three days before it.
    backups = [backup(f"{day}-{hour}", f"2024-05-{day:02d}T{hour:02d}:00:00Z")
               for day, hour in ((5, 20), (5, 8), (4, 20), (4, 8), (3, 20), (2, 20), (1, 20))]
    assert decide(backups, "keep-last=2,keep-daily=3") == {
        "5-20": "keep (last #1)", "5-8": "keep (last #2)",
        "4-20": "keep (daily #1)", "4-8": "remove",
        "3-20": "keep (daily #2)", "2-20": "keep (daily #3)", "1-20": "remove"}


def test_a_backup_removed_by_an_earlier_rule_stays_removed():
    # ISO week 27 of 2020 runs from Monday 2020-06-29 to Sunday 2020-07-05. keep-weekly keeps
    # 07-01 and removes 06-30 (same week); keep-monthly then does not bring 06-30 back as
    # June's newest backup but keeps the newest *unmarked* one, 06-20.
    backups = [backup(day, f"{day}T12:00:00Z") for day in ("2020-06-20", "2020-06-30", "2020-07-01")]
    assert decide(backups, "keep-weekly=1,keep-monthly=2") == {
        "2020-07-01": "keep (weekly #1)", "2020-06-30": "remove",
        "2020-06-20": "keep (monthly #1)"}


def test_a_rule_stops_after_keeping_n_new_periods_and_the_rest_is_removed():
    assert decide(daily(1, 2, 3, 4, 5, 6), "keep-last=1,keep-daily=2") == {
        6: "keep (last #1)", 5: "keep (daily #1)", 4: "keep (daily #2)",
        3: "remove", 2: "remove", 1: "remove"}


def test_rules_apply_in_proxmox_order_whatever_the_option_order():
    text_a = "keep-yearly=1,keep-daily=1,keep-last=1"
    text_b = "keep-last=1,keep-daily=1,keep-yearly=1"
    backups = daily(1, 2, 3)
    assert decide(backups, text_a) == decide(backups, text_b) == {
        3: "keep (last #1)", 2: "keep (daily #1)", 1: "remove"}


# ------------------------------------------------------------------ protected backups

def test_protected_backups_are_never_removed_and_not_counted():
    backups = daily(1, 2, 3, 4)
    backups[3]["protected"] = True  # the newest
    backups[0]["protected"] = True  # the oldest
    assert decide(backups, "keep-last=2") == {
        4: "protected", 3: "keep (last #1)", 2: "keep (last #2)", 1: "protected"}


def test_a_protected_backup_does_not_cover_its_period():
    # Proxmox counts only backups a rule marked 'keep' as covering a period, so keep-daily
    # still keeps one unprotected backup of a day that has a protected one.
    backups = [backup("evening", "2024-05-02T20:00:00Z", protected=True),
               backup("morning", "2024-05-02T08:00:00Z"),
               backup("day-before", "2024-05-01T20:00:00Z")]
    assert decide(backups, "keep-daily=1") == {
        "evening": "protected", "morning": "keep (daily #1)", "day-before": "remove"}


def test_protected_backups_stay_protected_under_keep_all():
    backups = daily(1, 2)
    backups[0]["protected"] = True
    assert decide(backups, "keep-all=1") == {2: "keep (keep-all)", 1: "protected"}


def test_protected_accepts_proxmox_boolean_spellings_and_defaults_to_false():
    backups = [{"id": "a", "time": "2024-05-02T00:00:00Z", "protected": "yes"},
               {"id": "b", "time": "2024-05-01T00:00:00Z"}]
    assert decide(backups, "keep-last=1") == {"a": "protected", "b": "keep (last #1)"}


# ------------------------------------------------------------------ keep everything

@pytest.mark.parametrize("policy", [
    "keep-all=1",
    "",
    "keep-last=0,keep-daily=0",
    "keep-all=0",
    {},
    {"keep_last": None},
])
def test_keep_all_or_no_positive_count_keeps_every_backup(policy):
    assert as_policy(policy).is_keep_all
    assert set(decide(daily(1, 2, 3), policy).values()) == {"keep (keep-all)"}


def test_an_empty_list_has_nothing_to_prune():
    assert select_for_prune([], RetentionPolicy.parse("keep-last=1")) == []


# ------------------------------------------------------------------ time zones

def test_periods_use_the_local_date_of_the_given_time_zone():
    # 23:30 UTC on May 1 is 01:30 on May 2 in Berlin (CEST, UTC+2).
    backups = [backup("late", "2024-05-01T23:30:00Z"),
               backup("evening", "2024-05-01T21:00:00Z"),
               backup("noon", "2024-05-01T12:00:00Z")]
    assert decide(backups, "keep-daily=2", tz="UTC") == {
        "late": "keep (daily #1)", "evening": "remove", "noon": "remove"}
    assert decide(backups, "keep-daily=2", tz="Europe/Berlin") == {
        "late": "keep (daily #1)", "evening": "keep (daily #2)", "noon": "remove"}


def test_a_tzinfo_object_works_like_its_name():
    backups = [backup("late", "2024-05-01T23:30:00Z"), backup("noon", "2024-05-01T12:00:00Z")]
    plus_two = timezone(timedelta(hours=2))
    assert decide(backups, "keep-daily=2", tz=plus_two) == decide(
        backups, "keep-daily=2", tz="Europe/Berlin")


@pytest.fixture
def system_time_zone_berlin(monkeypatch):
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_without_a_time_zone_the_systems_local_time_is_used(system_time_zone_berlin):
    backups = [backup("late", "2024-05-01T23:30:00Z"), backup("noon", "2024-05-01T12:00:00Z")]
    assert decide(backups, "keep-daily=2", tz=None) == {
        "late": "keep (daily #1)", "noon": "keep (daily #2)"}


def test_days_follow_summer_time_when_it_starts():
    # Berlin switches to CEST (UTC+2) on 2024-03-31: 22:30 UTC that evening is already
    # 00:30 on April 1, while 01:30 UTC is 03:30 on March 31. A fixed UTC+1 would put both
    # on March 31.
    backups = [backup("apr-1", "2024-03-31T22:30:00Z"), backup("mar-31", "2024-03-31T01:30:00Z")]
    assert decide(backups, "keep-daily=2", tz="Europe/Berlin") == {
        "apr-1": "keep (daily #1)", "mar-31": "keep (daily #2)"}


def test_the_25_hour_day_when_summer_time_ends_is_one_day():
    # 2024-10-27 in Berlin lasts from 22:00 UTC on the 26th to 23:00 UTC on the 27th.
    backups = [backup("last-minute", "2024-10-27T22:30:00Z"),
               backup("first-minute", "2024-10-26T22:30:00Z"),
               backup("day-before", "2024-10-26T21:30:00Z")]
    assert decide(backups, "keep-daily=2", tz="Europe/Berlin") == {
        "last-minute": "keep (daily #1)", "first-minute": "remove",
        "day-before": "keep (daily #2)"}


def test_the_repeated_hour_when_summer_time_ends_is_one_hourly_period():
    # 00:15 UTC is 02:15 CEST and 01:15 UTC is 02:15 CET on 2024-10-27: Proxmox keys hours
    # by local wall-clock fields, so both passes through 02:xx are a single hour.
    backups = [backup(t, f"2024-10-27T{t}:00Z") for t in ("00:15", "00:45", "01:15", "01:45", "02:15")]
    assert decide(backups, "keep-hourly=2", tz="Europe/Berlin") == {
        "02:15": "keep (hourly #1)", "01:45": "keep (hourly #2)",
        "01:15": "remove", "00:45": "remove", "00:15": "remove"}


def test_an_unknown_time_zone_is_refused():
    with pytest.raises(ConfigError, match="unknown time zone 'Mars/Olympus'.*IANA"):
        decide(daily(1), "keep-last=1", tz="Mars/Olympus")


# ------------------------------------------------------------------ entries and results

def test_results_are_newest_first_with_utc_times_and_rules():
    marks = select_for_prune(daily(2, 1, 3), RetentionPolicy.parse("keep-daily=1"))
    assert marks == [
        PruneMark(3, datetime(2024, 5, 3, 20, tzinfo=timezone.utc), "keep", "daily #1"),
        PruneMark(2, datetime(2024, 5, 2, 20, tzinfo=timezone.utc), "remove", None),
        PruneMark(1, datetime(2024, 5, 1, 20, tzinfo=timezone.utc), "remove", None),
    ]
    assert [mark.keep for mark in marks] == [True, False, False]


def test_entries_may_be_objects_and_times_any_supported_form():
    class Backup:
        def __init__(self, backup_id, when, protected=False):
            self.id, self.time, self.protected = backup_id, when, protected

    entries = [Backup("epoch", 1714593600),  # 2024-05-01T20:00:00Z
               Backup("iso", "2024-05-02T22:00:00+02:00"),
               Backup("datetime", datetime(2024, 5, 3, 20, tzinfo=timezone.utc), True)]
    marks = select_for_prune(entries, RetentionPolicy(keep_daily=5))
    assert [(m.id, m.describe()) for m in marks] == [
        ("datetime", "protected"), ("iso", "keep (daily #1)"), ("epoch", "keep (daily #2)")]


def test_without_an_id_a_backup_is_named_by_its_utc_time():
    marks = select_for_prune([{"time": 1714593600}], RetentionPolicy(keep_last=1))
    assert marks[0].id == "2024-05-01T20:00:00Z"


def test_backups_at_the_same_instant_are_one_keep_last_period():
    # Proxmox keys keep-last by the backup time (ctime); the stable sort keeps input order.
    backups = [backup("first", "2024-05-01T20:00:00Z"), backup("second", "2024-05-01T20:00:00Z"),
               backup("older", "2024-05-01T10:00:00Z")]
    assert decide(backups, "keep-last=2") == {
        "first": "keep (last #1)", "second": "remove", "older": "keep (last #2)"}


def test_duplicate_ids_are_refused():
    with pytest.raises(ConfigError, match="backup #2 has the same id as backup #1: 'a'"):
        decide([backup("a", 1), backup("a", 2)], "keep-last=1")


# ------------------------------------------------------------------ the simulator

def test_simulate_returns_plain_dicts_newest_first():
    result = simulate(
        [{"time": 1714593600}, {"time": "2024-05-02T20:00:00Z", "protected": True},
         {"time": "2024-05-03T20:00:00Z", "id": "newest"}],
        {"keep_last": 1})
    assert result == [
        {"id": "newest", "time": "2024-05-03T20:00:00Z", "mark": "keep", "rule": "last #1"},
        {"id": "2024-05-02T20:00:00Z", "time": "2024-05-02T20:00:00Z", "mark": "protected",
         "rule": "protected"},
        {"id": "2024-05-01T20:00:00Z", "time": "2024-05-01T20:00:00Z", "mark": "remove",
         "rule": None},
    ]


def test_simulate_accepts_a_property_string_a_policy_and_a_time_zone():
    backups = [{"time": "2024-05-01T23:30:00Z"}, {"time": "2024-05-01T12:00:00Z"}]
    by_text = simulate(backups, "keep-daily=2", timezone="Europe/Berlin")
    by_policy = simulate(backups, RetentionPolicy(keep_daily=2), timezone="Europe/Berlin")
    assert by_text == by_policy
    assert [entry["mark"] for entry in by_text] == ["keep", "keep"]


@pytest.mark.parametrize("backups,message", [
    ([{"time": "yesterday"}], r"backup #1: time: 'yesterday' is not a time; give an ISO 8601"),
    ([{"id": "x", "time": "2024-05-01T10:00:00"}], r"backup 'x': time: .* has no UTC offset"),
    ([{"id": "x"}], r"backup 'x': has no time"),
    ([{"time": 1}, {"time": "1970-01-01T00:00:01Z"}],
     r"backup #2 has the same time \(and no id\) as backup #1: '1970-01-01T00:00:01Z'"),
    ([{"time": 1, "protect": True}], r"backup #1: unknown key 'protect'; allowed keys: id, "
                                     r"protected, time"),
    ([{"time": 1, "protected": "maybe"}], r"backup #1: protected: 'maybe' is not a boolean"),
    (["2024-05-01"], r"backup #1: expected a mapping"),
    ({"time": 1}, r"backups: expected a list"),
])
def test_simulate_says_which_backup_is_wrong(backups, message):
    with pytest.raises(ConfigError, match=message):
        simulate(backups, "keep-last=1")


# ------------------------------------------------------------------ times

@pytest.mark.parametrize("value", [
    1714593600, 1714593600.0, "1714593600", "2024-05-01T20:00:00Z", "2024-05-01T20:00:00z",
    "2024-05-01T22:00:00+02:00", "2024-05-01 20:00:00+00:00",
    datetime(2024, 5, 1, 22, tzinfo=timezone(timedelta(hours=2))),
])
def test_to_datetime_accepts_epoch_iso_and_aware_datetimes(value):
    assert to_datetime(value) == datetime(2024, 5, 1, 20, tzinfo=timezone.utc)
    assert to_datetime(value).tzinfo == timezone.utc


@pytest.mark.parametrize("value,message", [
    (datetime(2024, 5, 1), "has no time zone"),
    ("2024-05-01", "has no UTC offset"),
    ("01/05/2024", "is not a time"),
    (True, "is not a time"),
    (None, "is not a time"),
    (float("nan"), "is not a time"),
    (10 ** 20, "out of range"),
])
def test_to_datetime_refuses_what_is_not_an_unambiguous_time(value, message):
    with pytest.raises(ConfigError, match=message):
        to_datetime(value)


# ------------------------------------------------------------------ building a policy

def test_a_policy_parses_from_a_property_string_and_renders_back():
    policy = RetentionPolicy.parse("keep-daily=13, keep-last=3,keep-yearly=9")
    assert policy == RetentionPolicy(keep_last=3, keep_daily=13, keep_yearly=9)
    assert policy.as_property_string() == "keep-last=3,keep-daily=13,keep-yearly=9"
    assert policy.as_dict() == {"keep-last": 3, "keep-daily": 13, "keep-yearly": 9}
    assert RetentionPolicy.parse(policy.as_property_string()) == policy
    assert not policy.is_keep_all


def test_zero_counts_are_dropped_and_keep_all_is_normalised():
    assert RetentionPolicy.parse("keep-last=0,keep-daily=2").as_property_string() == "keep-daily=2"
    assert RetentionPolicy.parse("keep-last=0").as_dict() == {"keep-all": True}
    assert RetentionPolicy().as_property_string() == "keep-all=1"


@pytest.mark.parametrize("options", [
    {"keep-last": 3, "keep-daily": 13},
    {"keep_last": 3, "keep_daily": 13},
    {"keep_last": "3", "keep-daily": "13", "keep_weekly": None, "keep_all": False},
    {"keep-last": 3, "keep-daily": 13, "keep-hourly": 0, "keep-all": "no"},
])
def test_options_accept_dashes_underscores_strings_and_none(options):
    assert RetentionPolicy.from_options(options) == RetentionPolicy(keep_last=3, keep_daily=13)


def test_keep_all_option_spellings():
    assert RetentionPolicy.from_options({"keep_all": True}).is_keep_all
    assert RetentionPolicy.from_options({"keep-all": "1"}).keep_all is True


@pytest.mark.parametrize("text,message", [
    ("keep-hour=3", "prune-backups: unknown key 'keep-hour'; allowed keys: keep-all, keep-daily"),
    ("keep-last=-1", "prune-backups: keep-last: -1 is too small, the minimum is 0"),
    ("keep-last=three", "prune-backups: keep-last: 'three' is not an integer"),
    ("keep-last=1.5", "prune-backups: keep-last: '1.5' is not an integer"),
    ("keep-all=1,keep-daily=3", "keep-all=1 cannot be combined with keep-daily; remove one"),
    ("keep-last", "'keep-last' is not of the form key=value"),
    ("keep-last=1,keep-last=2", "key 'keep-last' is given twice"),
])
def test_bad_property_strings_say_what_to_fix(text, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        RetentionPolicy.parse(text)


@pytest.mark.parametrize("options,message", [
    ({"keep-hour": 3}, "prune-backups: unknown retention option 'keep-hour'; allowed: keep-all, "
                       "keep-last, keep-hourly"),
    ({"keep-last": -2}, "prune-backups: keep-last: -2 is too small, the minimum is 0"),
    ({"keep_daily": 2.5}, "prune-backups: keep-daily: 2.5 is not an integer"),
    ({"keep_daily": "x"}, "prune-backups: keep-daily: 'x' is not an integer"),
    ({"keep-last": True}, "prune-backups: keep-last: True is a boolean; give a number"),
    ({"keep_all": True, "keep_last": 1}, "keep-all=1 cannot be combined with keep-last"),
    ({"keep_all": "sure"}, "prune-backups: keep-all: 'sure' is not a boolean"),
    ({"keep_last": 1, "keep-last": 2}, "'keep-last' is given twice \\(as 'keep_last' and "
                                       "'keep-last'\\); keep one"),
    (["keep-last=1"], "expected a mapping of retention options"),
])
def test_bad_options_say_what_to_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        RetentionPolicy.from_options(options)


def test_errors_name_where_the_policy_came_from():
    with pytest.raises(ConfigError, match=r"^vzdump.conf line 3: prune-backups: unknown key"):
        RetentionPolicy.parse("keep-hours=1", "vzdump.conf line 3: prune-backups")


def test_a_policy_built_directly_is_validated_too():
    with pytest.raises(ConfigError, match="keep-daily must be an integer >= 0"):
        RetentionPolicy(keep_daily=-1)
    with pytest.raises(ConfigError, match="keep-all=1 cannot be combined with keep-last"):
        RetentionPolicy(keep_last=1, keep_all=True)


# ------------------------------------------------------------------ Proxmox's worked examples

# pve-storage src/test/prune_backups_test.pm: the qemu backups of one guest, "$basetime"
# being 2020-01-01 12:18:21 UTC; the one at 11:18:51 on 2019-12-31 is protected.
PVE_BASETIME = 1577881101
DAY, HOUR = 24 * 60 * 60, 60 * 60
PVE_BACKUPS = [
    backup("2018_05_26-11_18_21", PVE_BASETIME - 585 * DAY - HOUR),
    backup("2019_12_31-11_18_21", PVE_BASETIME - DAY - HOUR),
    backup("2019_12_31-11_18_51", PVE_BASETIME - DAY - HOUR + 30, protected=True),
    backup("2019_12_31-11_19_21", PVE_BASETIME - DAY - HOUR + 60),
    backup("2020_01_01-11_18_21", PVE_BASETIME - HOUR),
    backup("2020_01_01-12_18_21", PVE_BASETIME),
]
PVE_UNPROTECTED = [entry["id"] for entry in PVE_BACKUPS if not entry["protected"]]


@pytest.mark.parametrize("description,keep,marks", [
    ("last=3", {"keep-last": 3}, ["remove", "remove", "keep", "keep", "keep"]),
    ("weekly=2", {"keep-weekly": 2}, ["keep", "remove", "remove", "remove", "keep"]),
    ("daily=weekly=monthly=1",
     {"keep-hourly": 0, "keep-daily": 1, "keep-weekly": 1, "keep-monthly": 1},
     ["keep", "remove", "keep", "remove", "keep"]),
    ("hourly=4", {"keep-hourly": 4, "keep-daily": 0}, ["keep", "remove", "keep", "keep", "keep"]),
    ("yearly=2", {"keep-hourly": 0, "keep-daily": 0, "keep-weekly": 0, "keep-monthly": 0,
                  "keep-yearly": 2}, ["remove", "remove", "keep", "remove", "keep"]),
    ("last=2,hourly=2", {"keep-last": 2, "keep-hourly": 2},
     ["keep", "remove", "keep", "keep", "keep"]),
    ("last=1,monthly=2", {"keep-last": 1, "keep-monthly": 2},
     ["keep", "remove", "keep", "remove", "keep"]),
    ("monthly=3", {"keep-monthly": 3}, ["keep", "remove", "keep", "remove", "keep"]),
    ("last=daily=weekly=1", {"keep-last": 1, "keep-daily": 1, "keep-weekly": 1},
     ["keep", "remove", "keep", "remove", "keep"]),
    ("daily=2", {"keep-daily": 2}, ["remove", "remove", "keep", "remove", "keep"]),
    ("weekly=monthly=1", {"keep-weekly": 1, "keep-monthly": 1},
     ["keep", "remove", "remove", "remove", "keep"]),
    ("weekly=yearly=1", {"keep-weekly": 1, "keep-yearly": 1},
     ["keep", "remove", "remove", "remove", "keep"]),
    ("all missing", {}, ["keep"] * 5),
    ("all zero", {"keep-last": 0, "keep-hourly": 0, "keep-daily": 0, "keep-weekly": 0,
                  "keep-monthly": 0, "keep-yearly": 0}, ["keep"] * 5),
])
def test_pve_storage_prune_backups_examples(description, keep, marks):
    result = simulate(PVE_BACKUPS, keep, timezone="UTC")
    by_id = {entry["id"]: entry["mark"] for entry in result}
    assert [by_id[backup_id] for backup_id in PVE_UNPROTECTED] == marks, description
    assert by_id["2019_12_31-11_18_51"] == "protected"


def test_pve_storage_example_daily_weekly_monthly_threeway():
    # "month is already covered by the backup kept by keep-weekly!" (2019-12-25 is ISO week
    # 52 of 2019, 2019-12-31 and 2020-01-01 are week 1 of 2020).
    backups = [backup("2019_12_25", PVE_BASETIME - 7 * DAY),
               backup("2019_12_31", PVE_BASETIME - DAY),
               backup("2020_01_01", PVE_BASETIME)]
    assert decide(backups, "keep-daily=1,keep-weekly=1,keep-monthly=1") == {
        "2020_01_01": "keep (daily #1)", "2019_12_31": "remove",
        "2019_12_25": "keep (weekly #1)"}


def test_pve_storage_example_daily_weekly_week_boundary():
    backups = [backup("2020_12_03", PVE_BASETIME + (366 - 31 + 2) * DAY),
               backup("2020_12_04", PVE_BASETIME + (366 - 31 + 3) * DAY),
               backup("2020_12_07", PVE_BASETIME + (366 - 31 + 6) * DAY)]
    assert decide(backups, "keep-daily=1,keep-weekly=1") == {
        "2020_12_07": "keep (daily #1)", "2020_12_04": "keep (weekly #1)",
        "2020_12_03": "remove"}


def test_pve_storage_example_yearly_before_2000():
    backups = [backup("1970", 83), backup("2070", DAY * (365 * 100 + 25) + 60)]
    assert decide(backups, "keep-yearly=1") == {"2070": "keep (yearly #1)", "1970": "remove"}


def pbs(*times):
    """Backups named like PBS snapshots in proxmox-backup tests/prune.rs."""
    return [backup(name, name) for name in times]


def kept(backups, policy):
    return sorted(i for i, d in decide(backups, policy).items() if d != "remove")


def removed(backups, policy):
    return sorted(i for i, d in decide(backups, policy).items() if d == "remove")


def test_pbs_prune_hourly_example():
    backups = pbs("2019-11-15T09:39:15Z", "2019-11-15T10:49:15Z", "2019-11-15T10:59:15Z",
                  "2019-11-15T11:39:15Z", "2019-11-15T11:49:15Z", "2019-11-15T11:59:15Z")
    assert removed(backups, "keep-hourly=3") == [
        "2019-11-15T10:49:15Z", "2019-11-15T11:39:15Z", "2019-11-15T11:49:15Z"]
    assert kept(backups, "keep-hourly=2") == ["2019-11-15T10:59:15Z", "2019-11-15T11:59:15Z"]


def test_pbs_prune_simple2_example():
    backups = pbs("2018-11-15T11:59:15Z", "2019-11-15T11:59:15Z", "2019-11-21T11:59:15Z",
                  "2019-11-22T11:59:15Z", "2019-11-29T11:59:15Z", "2019-12-01T11:59:15Z",
                  "2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z")
    assert kept(backups, "keep-daily=1") == ["2019-12-04T11:59:15Z"]
    assert kept(backups, "keep-last=1,keep-daily=1") == [
        "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]
    assert kept(backups, "keep-daily=1,keep-weekly=1") == [
        "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
    assert kept(backups, "keep-daily=1,keep-weekly=1,keep-monthly=1") == [
        "2019-11-22T11:59:15Z", "2019-12-01T11:59:15Z", "2019-12-04T11:59:15Z"]
    assert kept(backups, "keep-monthly=1,keep-yearly=1") == [
        "2018-11-15T11:59:15Z", "2019-12-04T11:59:15Z"]


@pytest.mark.parametrize("policy,expected_removed", [
    ("keep-last=4", []),
    ("keep-last=3", ["2019-12-02T11:59:15Z"]),
    ("keep-last=2", ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z"]),
    ("keep-last=2,keep-daily=2", []),
    ("keep-daily=3", ["2019-12-04T11:59:15Z"]),
    ("keep-daily=2", ["2019-12-02T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("keep-weekly=5", ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("keep-daily=1,keep-weekly=5",
     ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("keep-monthly=6", ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("keep-yearly=7", ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
    ("keep-weekly=5,keep-monthly=6,keep-yearly=7",
     ["2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z"]),
])
def test_pbs_prune_simple_example(policy, expected_removed):
    backups = pbs("2019-12-02T11:59:15Z", "2019-12-03T11:59:15Z", "2019-12-04T11:59:15Z",
                  "2019-12-04T12:59:15Z")
    assert removed(backups, policy) == expected_removed


# ------------------------------------------------------------------ fast paths against a reference

# The selection works a list at a time and sorts and names by epoch seconds, for speed (see
# bench/prune_bench.py). These tests hold it to a plain transcription of Proxmox's
# prune_mark_backup_group: one backup at a time, local time by astimezone(), periods as the
# strftime strings Proxmox builds, on randomized backups in zones with summer time, half- and
# quarter-hour offsets, skipped days and negative DST.

REFERENCE_PERIODS = {
    "keep-last": lambda utc, local: utc,
    "keep-hourly": lambda utc, local: local.strftime("%H/%d/%m/%Y"),
    "keep-daily": lambda utc, local: local.strftime("%d/%m/%Y"),
    "keep-weekly": lambda utc, local: local.strftime("%V/%G"),
    "keep-monthly": lambda utc, local: local.strftime("%m/%Y"),
    "keep-yearly": lambda utc, local: local.strftime("%Y"),
}
REFERENCE_RULE_ORDER = ("keep-last", "keep-hourly", "keep-daily", "keep-weekly", "keep-monthly",
                        "keep-yearly")
PROTECTED_SPELLINGS = {None: False, False: False, True: True, "no": False, "yes": True,
                       "0": False, "1": True}


def reference_marks(entries, policy, tz):
    """[(id, utc time, mark, rule)] newest first, computed as plainly as possible."""
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    parsed = []
    for entry in entries:
        get = entry.get if isinstance(entry, dict) else lambda name: getattr(entry, name, None)
        moment = to_datetime(get("time"))
        parsed.append({"id": format_utc(moment) if get("id") is None else get("id"),
                       "time": moment, "protected": PROTECTED_SPELLINGS[get("protected")],
                       "local": moment.astimezone(zone) if zone else moment.astimezone(),
                       "mark": None, "rule": None})
    parsed.sort(key=lambda backup: backup["time"], reverse=True)
    for backup in parsed:
        if backup["protected"]:
            backup["mark"] = backup["rule"] = "protected"
    counts = as_policy(policy).counts()
    if not counts:
        for backup in parsed:
            if backup["mark"] is None:
                backup["mark"], backup["rule"] = "keep", "keep-all"
    for option in REFERENCE_RULE_ORDER:
        if option not in counts:
            continue
        period = REFERENCE_PERIODS[option]
        already = {period(b["time"], b["local"]) for b in parsed if b["mark"] == "keep"}
        newly = []
        for backup in parsed:
            if backup["mark"] is not None:
                continue
            key = period(backup["time"], backup["local"])
            if key in already:
                continue
            if key in newly:
                backup["mark"] = "remove"
                continue
            if len(newly) >= counts[option]:
                break
            newly.append(key)
            backup["mark"] = "keep"
            backup["rule"] = f"{option[len('keep-'):]} #{len(newly)}"
    for backup in parsed:
        if backup["mark"] is None:
            backup["mark"] = "remove"
    return [(b["id"], b["time"], b["mark"], b["rule"]) for b in parsed]


@functools.lru_cache(maxsize=None)
def utc_offset_changes(zone, year):
    """UTC instants (epoch, to 3 hours) at which ``zone``'s offset changes during ``year``."""
    start = int(datetime(year, 1, 1, tzinfo=timezone.utc).timestamp())
    changes, before = [], None
    for moment in range(start, start + 366 * DAY, 3 * HOUR):
        offset = datetime.fromtimestamp(moment, zone).utcoffset()
        if before is not None and offset != before:
            changes.append(moment)
        before = offset
    return changes


GAPS = [(0, 0), (1, 59), (60, 90 * 60), (HOUR, 30 * HOUR), (DAY, 10 * DAY), (7 * DAY, 60 * DAY)]


def random_backups(rng, zone):
    """Up to 300 backups in clusters around offset changes, year ends and random times."""
    year = rng.choice([1975, 1996, 2011, 2018, 2020, 2024, 2031])
    centres = utc_offset_changes(zone, year) if zone is not None else []
    centres += [int(datetime(year, 12, 31, 23, tzinfo=timezone.utc).timestamp()),
                rng.randint(-10 ** 9, 2 * 10 ** 9)]
    weights = [rng.random() for gap in GAPS]
    seconds = []
    for cluster in range(rng.randint(1, 4)):
        moment = rng.choice(centres) - rng.randint(0, 3 * DAY)
        for backup in range(rng.randint(0, 100)):
            low, high = rng.choices(GAPS, weights)[0]
            moment += rng.randint(low, high)
            seconds.append(moment)
    fractional = rng.random() < 0.2
    times = [t + rng.choice([0, 0.25, 0.999999]) if fractional else t for t in seconds]
    with_ids = rng.choice(["all", "none", "some"])
    if with_ids != "all":  # without an id, the time is the id: keep it unique
        times = sorted(set(times))
    form = rng.choice(["epoch", "float", "iso-z", "iso-offset", "datetime", "mixed"])
    protected_rate = rng.choice([0, 0.1, 0.5])
    spellings = [True, False] if rng.random() < 0.8 else list(PROTECTED_SPELLINGS)
    backups = []
    for index, t in enumerate(times):
        backup = {"time": time_in_form(rng, t, form)}
        if with_ids == "all" or (with_ids == "some" and rng.random() < 0.5):
            backup["id"] = f"b{index}"
        if rng.random() < protected_rate:
            backup["protected"] = rng.choice(spellings)
        elif rng.random() < 0.5:
            backup["protected"] = False
        backups.append(backup)
    order = rng.choice(["shuffled", "oldest first", "newest first"])
    if order == "shuffled":
        rng.shuffle(backups)
    elif order == "newest first":
        backups.reverse()
    return backups


def time_in_form(rng, t, form):
    if form == "mixed":
        form = rng.choice(["epoch", "float", "iso-z", "iso-offset", "datetime"])
    moment = datetime.fromtimestamp(t, timezone.utc)
    if form == "epoch":
        return t
    if form == "float":
        return float(t)
    if form == "iso-z":
        return format_utc(moment)
    offset = timezone(timedelta(minutes=rng.choice([-570, -300, 0, 60, 345, 780])))
    if form == "iso-offset":
        return moment.astimezone(offset).isoformat()
    return moment.astimezone(offset)


def random_policy(rng):
    if rng.random() < 0.1:
        return "keep-all=1"
    counts = {option: rng.choice([0, 0, 1, 2, 3, 5, 50]) for option in REFERENCE_RULE_ORDER}
    return ",".join(f"{option}={n}" for option, n in counts.items())


REFERENCE_ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe",
                   "Asia/Kathmandu", "America/St_Johns", "Pacific/Apia", "Africa/Casablanca",
                   "Europe/Dublin", "America/Sao_Paulo", "Pacific/Chatham",
                   timezone(timedelta(hours=-9, minutes=-30))]


@pytest.mark.parametrize("tz", REFERENCE_ZONES, ids=str)
def test_the_selection_marks_random_backups_as_the_reference_does(tz):
    rng = random.Random(f"prune-{tz}")
    zone = ZoneInfo(tz) if isinstance(tz, str) else tz
    for case in range(25):
        backups = random_backups(rng, zone)
        policy = random_policy(rng)
        expected = reference_marks(backups, policy, tz)
        marks = select_for_prune(backups, as_policy(policy), tz=tz)
        assert [(m.id, m.time, m.mark, m.rule) for m in marks] == expected, policy
        assert [m.time.tzinfo for m in marks] == [timezone.utc] * len(marks)
        assert simulate(backups, policy, timezone=tz) == [
            {"id": backup_id, "time": format_utc(moment), "mark": mark, "rule": rule}
            for backup_id, moment, mark, rule in expected]


@pytest.mark.parametrize("system_zone", ["Europe/Berlin", "Australia/Lord_Howe",
                                         "America/Sao_Paulo"])
def test_random_backups_in_the_systems_local_time_match_the_reference(monkeypatch, system_zone):
    monkeypatch.setenv("TZ", system_zone)
    time.tzset()
    try:
        rng = random.Random(f"prune-local-{system_zone}")
        for case in range(15):
            backups = random_backups(rng, ZoneInfo(system_zone))
            policy = random_policy(rng)
            assert simulate(backups, policy) == [
                {"id": backup_id, "time": format_utc(moment), "mark": mark, "rule": rule}
                for backup_id, moment, mark, rule in reference_marks(backups, policy, None)]
    finally:
        monkeypatch.undo()
        time.tzset()


def test_every_rule_alone_and_all_together_match_the_reference_on_a_long_history():
    # A year and a half of backups 5-10 minutes or 1-12 hours apart, some protected: every
    # rule walks far, past summer time changes and a year end.
    rng = random.Random(9)
    moment, backups = 1600000000, []
    for index in range(4000):
        moment += rng.choice([rng.randint(300, 600), rng.randint(HOUR, 12 * HOUR)])
        backups.append({"id": index, "time": moment, "protected": rng.random() < 0.01})
    rng.shuffle(backups)
    policies = [f"{option}=40" for option in REFERENCE_RULE_ORDER] + [
        "keep-last=3,keep-hourly=24,keep-daily=7,keep-weekly=4,keep-monthly=12,keep-yearly=5",
        "keep-hourly=2000,keep-monthly=30", "keep-all=1"]
    for policy in policies:
        expected = reference_marks(backups, policy, "Europe/Berlin")
        assert simulate(backups, policy, timezone="Europe/Berlin") == [
            {"id": backup_id, "time": format_utc(t), "mark": mark, "rule": rule}
            for backup_id, t, mark, rule in expected], policy


def test_objects_generators_and_protected_spellings_take_the_checked_path_with_equal_results():
    class Backup:
        def __init__(self, entry):
            self.id, self.time = entry.get("id"), entry["time"]
            self.protected = entry.get("protected")

    rng = random.Random(3)
    for case in range(20):
        backups = random_backups(rng, ZoneInfo("Europe/Berlin"))
        policy = random_policy(rng)
        as_dicts = select_for_prune(backups, as_policy(policy), tz="Europe/Berlin")
        as_objects = select_for_prune([Backup(b) for b in backups], as_policy(policy),
                                      tz="Europe/Berlin")
        from_generator = simulate((b for b in backups), policy, timezone="Europe/Berlin")
        assert as_dicts == as_objects
        assert from_generator == simulate(backups, policy, timezone="Europe/Berlin")
        assert [(m.id, m.time, m.mark, m.rule) for m in as_dicts] == reference_marks(
            backups, policy, "Europe/Berlin")


@pytest.mark.parametrize("when", [
    -62135596800,            # 0001-01-01T00:00:00Z, the first second a datetime holds
    253402300799,            # 9999-12-31T23:59:59Z, the last
    -1, 0, 86399, 86400, 951782400, 1709164800,  # around the epoch and two leap days
    1714593600.5, "2024-05-01T20:00:00.000001Z",
])
def test_simulated_times_are_named_as_format_utc_names_them(when):
    [entry] = simulate([{"time": when}, ], "keep-last=1", timezone="UTC")
    assert entry["time"] == entry["id"] == format_utc(to_datetime(when))


def test_errors_name_the_first_bad_backup_whichever_path_finds_it():
    # The fast path gives up on the whole list; the checked one reports in input order.
    with pytest.raises(ConfigError, match=r"backup #2 has the same id as backup #1: 'a'"):
        simulate([{"id": "a", "time": 1}, {"id": "a", "time": 2}, {"id": "c", "time": "no"}],
                 "keep-last=1")
    with pytest.raises(ConfigError, match=r"backup 'b': time: 'no' is not a time"):
        simulate([{"id": "a", "time": 1}, {"id": "b", "time": "no"}, {"id": "a", "time": 3}],
                 "keep-last=1")
    with pytest.raises(ConfigError, match=r"backup 'b': protected: 'maybe' is not a boolean"):
        simulate([{"id": "a", "time": 1}, {"id": "b", "time": 2, "protected": "maybe"},
                  {"id": "c", "time": 10 ** 20}], "keep-last=1")
    with pytest.raises(ConfigError, match=r"backup 'c': time: .* out of range"):
        simulate([{"id": "a", "time": 1}, {"id": "c", "time": 10 ** 20}], "keep-last=1")
    with pytest.raises(ConfigError, match=r"backup '\[1\]': id \[1\] is not usable as an id"):
        select_for_prune([{"id": "a", "time": 1}, {"id": [1], "time": 2}],
                         RetentionPolicy(keep_last=1))
