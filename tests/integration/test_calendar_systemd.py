"""The engine's next runs of a schedule equal systemd's next elapses of its OnCalendar= translation.

Each job becomes a systemd timer whose ``OnCalendar=`` lines come from ``to_systemd_oncalendar``;
``systemd-analyze calendar --base-time=@EPOCH --iterations=10`` (systemd 252, no systemd as PID 1
needed) says when such a timer fires. For every spec and start below, the first 10 elapses of all
its OnCalendar= strings together (merged, sorted, without duplicates) must be the engine's
``next_events(start, 10)``: in UTC, in a local zone (``TZ``, the timer's and the engine's default),
in a named zone written after the time, and across both daylight saving time changes.
"""

import os
import re
import shutil
import subprocess
from datetime import datetime, timezone

import pytest

from guestvault_engine.policy.calendar import CalendarEvent, to_systemd_oncalendar
from guestvault_engine.errors import ConfigError

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="needs systemd-analyze (Debian package systemd)")

ITERATIONS = 10

SPECS = [
    "mon..fri 22",              # a lone number is a minute
    "22",
    "*/5",
    "fri..mon 10:30",           # weekday range wrapping around the week
    "mon..fri 23:00",           # the documented backup policy, part 1
    "sun 01:00",                # ... part 2
    "minutely",
    "hourly",
    "daily",
    "weekly",
    "monthly",
    "quarterly",
    "semi-annually",
    "yearly",
    "8..17/3:00",               # repetition with an end
    "mon..fri 8..17,22:0/15",
    "12/2:5",
    "*:0/15",                   # repetition across hours, through both DST changes
    "02:30",                    # the hour DST skips and repeats
    "2,3:30",
    "*-*-1..28/9 04:00",        # repetition of days across months (bounded: see the refusals)
    "*-1,4,7,10-1,15 02:30",    # month and day lists
    "*-02-29 12:00",            # leap day
    "Sat *-1..7 15:00",         # first Saturday of the month
    "*-*-29..31 06:00",         # days some months lack
    "0/2-*-* 00:00",            # even years (systemd would read 0 as the year 2000)
    "1:0/20:30",                # seconds
    "22:00 UTC",
    "mon,thu *:0/30 UTC",
]

STARTS = [
    "2024-05-15T10:17:23Z",     # an ordinary Wednesday
    "2024-03-30T22:00:00Z",     # the night Europe/Berlin springs forward
    "2024-10-26T22:00:00Z",     # the night Europe/Berlin falls back
    "2024-10-27T01:10:00Z",     # inside the repeated hour's second pass (02:10 CET)
    "2024-03-10T05:30:00Z",     # America/New_York springs forward at 07:00Z
    "2024-11-03T04:40:00Z",     # America/New_York falls back at 06:00Z
    "2023-02-10T00:00:00Z",     # February of a common year
    "2024-02-20T00:00:00Z",     # February of a leap year
    "2024-05-01T00:00:00Z",     # exactly on some events: they do not count
]

ZONES = [
    # (engine tz, OnCalendar zone argument, TZ of systemd-analyze, label)
    (None, None, "Europe/Berlin", "local Europe/Berlin"),
    ("America/New_York", "America/New_York", "Europe/Berlin", "named America/New_York"),
    (None, None, "Australia/Lord_Howe", "local Australia/Lord_Howe (30-minute DST)"),
]

_ELAPSE = re.compile(r"^\s*(?:Next elapse|Iter\. #\d+):\s+\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (\S+)$")
_IN_UTC = re.compile(r"^\s*\(in UTC\):\s+\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) UTC$")


def systemd_elapses(expression, base, tz_env):
    """systemd's next ITERATIONS elapses of one OnCalendar= expression after ``base``, in UTC."""
    env = dict(os.environ, TZ=tz_env, LC_ALL="C", SYSTEMD_COLORS="0", SYSTEMD_PAGER="")
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "calendar", f"--iterations={ITERATIONS}",
         f"--base-time=@{int(base.timestamp())}", expression],
        env=env, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, f"systemd-analyze refused {expression!r}: {result.stderr}"
    times, pending = [], None
    for line in result.stdout.splitlines():
        match = _ELAPSE.match(line)
        if match:
            if pending is not None:
                times.append(_utc(*pending))
            pending = match.groups()
            continue
        match = _IN_UTC.match(line)
        if match and pending is not None:
            times.append(_utc(match.group(1), "UTC"))
            pending = None
    if pending is not None:
        times.append(_utc(*pending))
    return times


def _utc(text, zone):
    assert zone == "UTC", f"a local time without its UTC form: {text} {zone}"
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)


def systemd_next(expressions, base, tz_env):
    merged = set()
    for expression in expressions:
        merged.update(systemd_elapses(expression, base, tz_env))
    return sorted(merged)[:ITERATIONS]


@pytest.mark.parametrize("engine_tz,calendar_tz,tz_env,label", ZONES, ids=[zone[3] for zone in ZONES])
@pytest.mark.parametrize("spec", SPECS)
def test_engine_and_systemd_agree(spec, engine_tz, calendar_tz, tz_env, label, monkeypatch):
    monkeypatch.setenv("TZ", tz_env)  # the engine's default zone is the system's, as libc finds it
    event = CalendarEvent.parse(spec)
    expressions = to_systemd_oncalendar(event, tz=calendar_tz)
    for start in STARTS:
        base = datetime.fromisoformat(start.replace("Z", "+00:00"))
        ours = [moment.astimezone(timezone.utc) for moment in event.next_events(base, ITERATIONS, tz=engine_tz)]
        theirs = systemd_next(expressions, base, tz_env)
        assert ours == theirs, (f"{spec!r} ({label}) from {start}: OnCalendar={expressions}\n"
                                f"engine:  {[m.isoformat() for m in ours]}\n"
                                f"systemd: {[m.isoformat() for m in theirs]}")


def test_the_zone_is_written_as_systemd_reads_it():
    assert to_systemd_oncalendar("mon..fri 23:00") == ["Mon..Fri *-*-* 23:00:00"]
    assert to_systemd_oncalendar("mon..fri 23:00", tz="Europe/Berlin") == ["Mon..Fri *-*-* 23:00:00 Europe/Berlin"]
    assert to_systemd_oncalendar("mon..fri 23:00 UTC", tz="Europe/Berlin") == ["Mon..Fri *-*-* 23:00:00 UTC"]
    for expression in ("Mon..Fri *-*-* 23:00:00 Europe/Berlin", "Mon,Fri..Sun *-*-* 10:30:00 UTC"):
        assert systemd_elapses(expression, datetime(2024, 5, 15, tzinfo=timezone.utc), "UTC")


@pytest.mark.parametrize("spec", ["*-*-1,15,30", "*-*-1/10 04:00", "*-*-1..31/10", "*-*-5/10", "*/7", "0/5:00",
                                  "*-*/5-1", "*:*:*/7", "*-02-30", "2021-02-29"])
def test_specs_systemd_cannot_run_as_proxmox_does_are_refused(spec):
    with pytest.raises(ConfigError):
        to_systemd_oncalendar(spec)


def test_the_refused_february_roll_over_really_differs():
    """Why ``*-*-1,15,30`` is refused: Proxmox skips March 1st of common years, systemd does not."""
    event = CalendarEvent.parse("*-*-1,15,30 UTC")
    base = datetime(2023, 2, 10, tzinfo=timezone.utc)
    ours = event.next_events(base, 3)
    theirs = systemd_elapses("*-*-01,15,30 00:00:00 UTC", base, "UTC")[:3]
    assert [m.day for m in ours] == [15, 15, 30]
    assert [m.day for m in theirs] == [15, 1, 15]
