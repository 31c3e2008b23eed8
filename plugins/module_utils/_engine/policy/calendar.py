"""Schedules: Proxmox VE's calendar events, evaluated as Proxmox evaluates them, and as systemd timers.

A job's ``schedule`` is a Proxmox calendar event (``proxmox-time``'s ``CalendarEvent``, the format
of ``jobs.cfg``, the GUI's schedule simulator and PBS)::

    [WEEKDAY] [[YEARS-]MONTHS-DAYS] [HOURS:MINUTES[:SECONDS]] [UTC]

- Weekdays: ``mon`` .. ``sun`` or the full English names, any case; lists ``mon,wed``; ranges
  ``mon..fri``; a range may wrap around the week: ``fri..mon`` is Friday to Monday.
- Every other field: a value ``5``, a list ``1,15``, a range ``8..17``, a repetition ``0/15``
  (0, 15, 30, 45) or ``8..17/3`` (8, 11, 14, 17), ``*`` (any), ``*/5`` (from the field's first
  value, every 5), and lists of all of these. Years are 0..2199, months 1..12, days 1..31.
- A missing weekday or date means every day; a missing time means 00:00:00; missing seconds
  mean second 0. A time with no colon is a MINUTE: ``mon..fri 22`` runs at minute 22 of every
  hour on weekdays (Proxmox's own docs say "10 PM" for it; its code says minute). ``22`` alone
  is every hour at :22, ``*/5`` every five minutes. :func:`looks_like_hour_mistake` says so.
- Keywords: ``minutely``, ``hourly``, ``daily``, ``weekly`` (Monday 00:00), ``monthly``,
  ``yearly``/``annually``, ``quarterly``, ``semiannually``/``semi-annually``.
- ``UTC`` at the end evaluates the event in UTC; otherwise in local time: the time zone given to
  the call, by default the system's (``TZ``, else ``/etc/localtime``, as libc does).

Evaluation is a port of ``CalendarEvent::compute_next_event`` (proxmox-time): start one second
after the last run, then repeatedly test year, month, day of month, weekday, hour, minute and
second, and on the first field that does not match jump to that field's next allowed value (the
smaller fields reset) and start over. Its quirks are kept:

- A jump past the end of a field's cycle rolls over like ``mktime`` (see :class:`RollOver`):
  looking for the 30th from February 16th (2023) lands on March 2nd, so ``*-*-1,15,30`` skips
  March 1st; a repetition without end counts on past the cycle, so ``*/7`` looks for minute 63
  after :56, lands on :03 of the next hour and skips its :00 (``0..59/7`` does not).
- ``25:00`` is refused here. Proxmox silently reads it as minute 25, second 0 of every hour
  (the hour does not parse, so the grammar falls back to MINUTES:SECONDS).
- Local times are made with ``mktime`` (``tm_isdst = -1``). A time that does not exist (the hour
  skipped when daylight saving time starts) becomes the time as far after the gap's start:
  02:00 becomes 03:00, and the search goes on from there, so ``02:30`` does not run that day and
  ``*:0/15`` runs at 01:45 and 03:00. A time that exists twice (the hour repeated when daylight
  saving time ends) takes the UTC offset of the previous step, so counting from before the
  change an event runs in the first pass only (``02:30`` once; ``*:0/15`` 02:45 summer time,
  then 03:00 winter time), and counting from inside the second pass it goes on in the second
  pass. systemd 252's timers do the same (``tests/integration/test_calendar_systemd.py``).
- The search gives up after 1000 steps, i.e. "never".

:func:`to_systemd_oncalendar` turns an event into ``OnCalendar=`` expressions that fire at the
same instants, or refuses (:class:`ConfigError`) when systemd cannot: an event that never fires,
and the roll-overs above (the message says how to write the schedule instead).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone, tzinfo
from typing import FrozenSet, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError
from ..times import TimeValue, TimeZoneArg, resolve_timezone, to_datetime


FORMAT = "[WEEKDAY] [[YEARS-]MONTHS-DAYS] [HOURS:MINUTES[:SECONDS]] [UTC]"

WEEKDAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WEEKDAY_WORDS = {name: index for index, name in enumerate(WEEKDAY_NAMES)}
_WEEKDAY_WORDS.update({full: index for index, full in enumerate(
    ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"))})
_SYSTEMD_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")

# proxmox-time: the search stops after this many steps and reports no next event.
MAX_SEARCH_STEPS = 1000
# systemd accepts years 1970..2199; proxmox-time accepts 0..2199 (years before 1970 never come).
SYSTEMD_FIRST_YEAR = 1970
LAST_YEAR = 2199

_DIGITS = re.compile(r"[0-9]+")
_ALPHA = re.compile(r"[A-Za-z]+")
_LONE_NUMBER = re.compile(r"^[0-9]+$")


# ------------------------------------------------------------------------------ field values

@dataclass(frozen=True)
class FieldValue:
    """One item of a field's list: ``5`` (single), ``1..5`` (range), ``0/15`` or ``0..30/15``.

    ``step`` is None for a single value or a range; ``end`` is None for a single value and for a
    repetition without end. The semantics are proxmox-time's ``DateTimeValue``, including that a
    repetition with step 0 means its start only.
    """

    start: int
    end: Optional[int] = None
    step: Optional[int] = None

    def contains(self, value: int) -> bool:
        if self.step is None:
            if self.end is None:
                return value == self.start
            return self.start <= value <= self.end
        if value < self.start:
            return False
        if self.step == 0:
            return value == self.start
        if (value - self.start) % self.step:
            return False
        return self.end is None or value <= self.end

    def next_above(self, value: int) -> Optional[int]:
        """The smallest value of this item greater than ``value`` (proxmox-time's ``find_next``)."""
        if self.step is None:
            if self.end is None:
                return self.start if self.start > value else None
            if value < self.start:
                return self.start
            return value + 1 if self.start <= value + 1 <= self.end else None
        if value < self.start:
            return self.start
        if self.step == 0:
            return None
        candidate = self.start + ((value - self.start + self.step) // self.step) * self.step
        return candidate if self.end is None or candidate <= self.end else None

    def __str__(self) -> str:
        text = str(self.start) if self.end is None else f"{self.start}..{self.end}"
        return text if self.step is None else f"{text}/{self.step}"


Field = Tuple[FieldValue, ...]  # empty: any value


def _field_contains(field: Field, value: int) -> bool:
    return any(item.contains(value) for item in field)


def _field_next(field: Field, value: int) -> Optional[int]:
    found = [n for n in (item.next_above(value) for item in field) if n is not None]
    return min(found) if found else None


def _field_text(field: Field) -> str:
    return ",".join(str(item) for item in field) if field else "*"


_ZERO: Field = (FieldValue(0),)


# ------------------------------------------------------------------------------ the event

@dataclass(frozen=True)
class CalendarEvent:
    """A parsed Proxmox calendar event. Build it with :meth:`parse`.

    ``weekdays`` holds 0 (Monday) .. 6 (Sunday), empty for every day. Each other field is a tuple
    of :class:`FieldValue`, empty for any value.
    """

    text: str
    utc: bool = False
    weekdays: FrozenSet[int] = frozenset()
    years: Field = ()
    months: Field = ()
    days: Field = ()
    hours: Field = ()
    minutes: Field = ()
    seconds: Field = _ZERO

    @classmethod
    def parse(cls, text: str) -> "CalendarEvent":
        """Parse ``text``; :class:`ConfigError` names the token that is wrong."""
        if isinstance(text, CalendarEvent):
            return text
        if not isinstance(text, str):
            raise ConfigError(f"calendar event: {text!r} is not text; write e.g. 'mon..fri 22:00'")
        return _Parser(text).parse()

    # -------------------------------------------------------------- presentation
    def __str__(self) -> str:
        return self.text

    @property
    def normalized(self) -> str:
        """Every field spelled out, as Proxmox reads the event: ``mon..fri 22`` → ``mon..fri *-*-* *:22:00``."""
        parts = []
        if self.weekdays and len(self.weekdays) < 7:
            parts.append(_weekday_text(self.weekdays, WEEKDAY_NAMES))
        parts.append(f"{_field_text(self.years)}-{_field_text(self.months)}-{_field_text(self.days)}")
        parts.append(f"{_field_text(self.hours)}:{_field_text(self.minutes)}:{_field_text(self.seconds)}")
        if self.utc:
            parts.append("UTC")
        return " ".join(parts)

    # -------------------------------------------------------------- evaluation
    def timezone_for(self, tz: TimeZoneArg = None) -> tzinfo:
        """The zone the event is evaluated in: UTC for a ``... UTC`` event, else ``tz`` or the system's."""
        return timezone.utc if self.utc else resolve_timezone(tz)

    def next_after(self, when: TimeValue, tz: TimeZoneArg = None) -> Optional[datetime]:
        """The first run strictly after ``when``, in the event's zone; None if it never runs again."""
        zone = self.timezone_for(tz)
        after = to_instant(when, "when")
        return self._next(after, zone)

    def next_events(self, start: TimeValue, n: int, tz: TimeZoneArg = None) -> List[datetime]:
        """The next ``n`` runs after ``start`` (fewer if the event stops running)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"number of events: {n!r} is not a count; give 0 or more")
        zone = self.timezone_for(tz)
        moment: Optional[datetime] = to_instant(start, "start")
        events: List[datetime] = []
        while len(events) < n:
            moment = self._next(moment, zone)
            if moment is None:
                break
            events.append(moment)
        return events

    def matches(self, moment: TimeValue, tz: TimeZoneArg = None) -> bool:
        """Whether the event runs at ``moment`` (whole seconds, wall clock in the event's zone)."""
        zone = self.timezone_for(tz)
        instant = to_instant(moment, "moment")
        if instant.microsecond:
            return False
        return self.matches_wall(instant.astimezone(zone).replace(tzinfo=None))

    def matches_wall(self, wall: datetime) -> bool:
        """Whether the wall-clock time ``wall`` (naive) satisfies every field."""
        checks = ((self.years, wall.year), (self.months, wall.month), (self.days, wall.day),
                  (self.hours, wall.hour), (self.minutes, wall.minute), (self.seconds, wall.second))
        if any(field and not _field_contains(field, value) for field, value in checks):
            return False
        return not self.weekdays or wall.weekday() in self.weekdays

    def _next(self, after: datetime, zone: tzinfo) -> Optional[datetime]:
        result = _compute_next_event(self, after, zone)
        # The offset rule for repeated hours keeps results after `after`; this only guards it.
        guard = 0
        while result is not None and result <= after and guard < 4:
            result = _compute_next_event(self, result, zone)
            guard += 1
        if result is not None and result <= after:  # pragma: no cover - defensive
            return None
        return None if result is None else result.astimezone(zone)


def _weekday_text(days: FrozenSet[int], names: Sequence[str]) -> str:
    parts = []
    for first, last in _runs(sorted(days)):
        if first == last:
            parts.append(names[first])
        elif last == first + 1:
            parts.extend((names[first], names[last]))
        else:
            parts.append(f"{names[first]}..{names[last]}")
    return ",".join(parts)


def _runs(values: Sequence[int]) -> List[Tuple[int, int]]:
    runs: List[Tuple[int, int]] = []
    for value in values:
        if runs and value == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs


# ------------------------------------------------------------------------------ parsing

_KEYWORDS = {
    "minutely": {},
    "hourly": {"minutes": _ZERO},
    "daily": {"hours": _ZERO, "minutes": _ZERO},
    "weekly": {"hours": _ZERO, "minutes": _ZERO, "weekdays": frozenset({0})},
    "monthly": {"hours": _ZERO, "minutes": _ZERO, "days": (FieldValue(1),)},
    "yearly": {"hours": _ZERO, "minutes": _ZERO, "days": (FieldValue(1),), "months": (FieldValue(1),)},
    "quarterly": {"hours": _ZERO, "minutes": _ZERO, "days": (FieldValue(1),),
                  "months": tuple(FieldValue(m) for m in (1, 4, 7, 10))},
    "semiannually": {"hours": _ZERO, "minutes": _ZERO, "days": (FieldValue(1),),
                     "months": (FieldValue(1), FieldValue(7))},
}
_KEYWORDS["annually"] = _KEYWORDS["yearly"]
_KEYWORDS["semi-annually"] = _KEYWORDS["semiannually"]


class _NoMatch(Exception):
    """A grammar rule did not match at this position (the caller may try another)."""


class _Parser:
    """proxmox-time's grammar (nom parsers), position by position, with the same backtracking.

    What it accepts and how it reads it follow ``parse_calendar_event_incomplete``; the one
    refusal Proxmox does not make is a time whose hour is out of range (see ``_time``).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.src = text.strip()  # PVE's Perl side trims; jobs.cfg values carry no outer blanks
        self.utc = False

    # -------------------------------------------------------------- driver
    def parse(self) -> CalendarEvent:
        src = self.src
        if not src:
            raise ConfigError(f"calendar event '{self.text}' is empty; write e.g. 'mon..fri 22:00' "
                              f"(format: {FORMAT})")
        if src.endswith("UTC"):
            self.utc = True
            src = src[:-3].rstrip(" ")
            self.src = src
        fields: dict = {}
        pos = 0
        has_day = has_date = has_time = False
        if src[:1].isascii() and src[:1].isalpha():
            if src in _KEYWORDS:
                fields = dict(_KEYWORDS[src])
                fields.setdefault("seconds", _ZERO)
                return CalendarEvent(text=self.text, utc=self.utc, **fields)
            try:
                weekdays, pos = self._weekday_list(pos)
            except _NoMatch:
                raise self._error(0) from None
            fields["weekdays"] = weekdays
            has_day = True
            pos = self._space(pos)
        try:
            (years, months, days), end = self._date(pos)
        except _NoMatch:
            pass
        else:
            fields.update(years=years, months=months, days=days)
            has_date = True
            pos = self._space(end)
        try:
            (hours, minutes, seconds, explicit_hour, seconds_given), end = self._time(pos)
        except _NoMatch:
            fields.update(hours=_ZERO, minutes=_ZERO, seconds=_ZERO)
        else:
            if not explicit_hour and seconds_given:
                raise self._hour_error(pos)
            fields.update(hours=hours, minutes=minutes, seconds=seconds)
            has_time = True
            pos = end
        if not (has_day or has_date or has_time) or pos != len(src):
            raise self._error(pos)
        return CalendarEvent(text=self.text, utc=self.utc, **fields)

    # -------------------------------------------------------------- rules
    def _space(self, pos: int) -> int:
        while pos < len(self.src) and self.src[pos] in " \t":
            pos += 1
        return pos

    def _weekday(self, pos: int) -> Tuple[int, int]:
        match = _ALPHA.match(self.src, pos)
        if not match or match.group().lower() not in _WEEKDAY_WORDS:
            raise _NoMatch()
        return _WEEKDAY_WORDS[match.group().lower()], match.end()

    def _weekday_range(self, pos: int) -> Tuple[FrozenSet[int], int]:
        first, pos = self._weekday(pos)
        if self.src.startswith("..", pos):
            try:
                last, end = self._weekday(pos + 2)
            except _NoMatch:
                return frozenset({first}), pos
            if first <= last:
                return frozenset(range(first, last + 1)), end
            return frozenset(range(first, 7)) | frozenset(range(0, last + 1)), end  # fri..mon wraps
        return frozenset({first}), pos

    def _weekday_list(self, pos: int) -> Tuple[FrozenSet[int], int]:
        days, pos = self._weekday_range(pos)
        while self.src.startswith(",", pos):
            try:
                more, end = self._weekday_range(pos + 1)
            except _NoMatch:
                break
            days, pos = days | more, end
        return days, pos

    def _number(self, pos: int, limit: int) -> Tuple[int, int]:
        match = _DIGITS.match(self.src, pos)
        if not match or int(match.group()) >= limit or int(match.group()) > 0xFFFFFFFF:
            raise _NoMatch()
        return int(match.group()), match.end()

    def _item(self, pos: int, limit: int) -> Tuple[FieldValue, int]:
        start, pos = self._number(pos, limit)
        if self.src.startswith("..", pos):
            try:
                end, after = self._number(pos + 2, limit)
            except _NoMatch:
                end = None
            if end is not None:
                if start > end:
                    raise _NoMatch()
                if self.src.startswith("/", after):
                    step, after = self._number(after + 1, limit)
                    return FieldValue(start, end, step), after
                return FieldValue(start, end), after
        if self.src.startswith("/", pos):
            step, pos = self._number(pos + 1, limit)
            return FieldValue(start, None, step), pos
        return FieldValue(start), pos

    def _list(self, pos: int, first: int, limit: int) -> Tuple[Field, int]:
        if self.src.startswith("*", pos):
            rest = pos + 1
            if self.src.startswith("/", rest):
                step, end = self._number(rest + 1, limit)
                if step > 0:
                    return (FieldValue(first, None, step),), end
            return (), rest
        item, pos = self._item(pos, limit)
        items = [item]
        while self.src.startswith(",", pos):
            try:
                item, end = self._item(pos + 1, limit)
            except _NoMatch:
                break
            items.append(item)
            pos = end
        return tuple(items), pos

    def _date(self, pos: int) -> Tuple[Tuple[Field, Field, Field], int]:
        try:
            years, end = self._list(pos, 0, LAST_YEAR + 1)
            months, end = self._dash_list(end, 1, 13)
            days, end = self._dash_list(end, 1, 32)
            return (years, months, days), end
        except _NoMatch:
            pass
        months, end = self._list(pos, 1, 13)
        days, end = self._dash_list(end, 1, 32)
        return ((), months, days), end

    def _dash_list(self, pos: int, first: int, limit: int) -> Tuple[Field, int]:
        if not self.src.startswith("-", pos):
            raise _NoMatch()
        return self._list(pos + 1, first, limit)

    def _time(self, pos: int) -> Tuple[Tuple[Field, Field, Field, bool, bool], int]:
        hours: Field = ()
        explicit_hour = False
        try:
            parsed, end = self._list(pos, 0, 24)
            if self.src.startswith(":", end):
                hours, pos, explicit_hour = parsed, end + 1, True
        except _NoMatch:
            pass
        minutes, pos = self._list(pos, 0, 60)
        seconds: Field = _ZERO
        seconds_given = False
        if self.src.startswith(":", pos):
            try:
                seconds, pos = self._list(pos + 1, 0, 60)
                seconds_given = True
            except _NoMatch:
                pass
        return (hours, minutes, seconds, explicit_hour, seconds_given), pos

    # -------------------------------------------------------------- messages
    def _hour_error(self, pos: int) -> ConfigError:
        token = self.src[pos:].split()[0] if self.src[pos:].split() else self.src[pos:]
        hour = token.split(":")[0]
        rest = token[len(hour) + 1:]
        return ConfigError(
            f"invalid calendar event '{self.text}': '{hour}' is not an hour (hours are 0..23). "
            f"Proxmox would silently read '{token}' as minute {hour}, second {rest} of every hour; "
            f"write '*:{token}' if that is what you mean")

    def _error(self, pos: int) -> ConfigError:
        problem = _diagnose(self.src) or f"cannot read it from '{self.src[pos:]}' on"
        return ConfigError(f"invalid calendar event '{self.text}': {problem} (format: {FORMAT})")


_FIELD_RULES = {  # name: (first value, limit as in proxmox-time, range shown to users)
    "year": (0, LAST_YEAR + 1, "0..2199"),
    "month": (1, 13, "1..12"),
    "day": (1, 32, "1..31"),
    "hour": (0, 24, "0..23"),
    "minute": (0, 60, "0..59"),
    "second": (0, 60, "0..59"),
}
_ITEM = re.compile(r"^([0-9]+)(?:\.\.([0-9]+))?(?:/([0-9]+))?$")


def _diagnose(src: str) -> Optional[str]:
    """What is wrong with a spec the grammar refused, named by its token; None if unclear."""
    tokens = src.split()
    if tokens and tokens[0][:1].isalpha() and tokens[0] not in _KEYWORDS:
        problem = _diagnose_weekdays(tokens.pop(0))
        if problem:
            return problem
    for token in tokens:
        if token in _KEYWORDS:
            return f"'{token}' is a keyword and stands alone (only ' UTC' may follow it)"
        if token.upper() == "UTC":
            return f"write '{token}' as 'UTC', at the very end"
        if token[:1].isalpha():
            return f"'{token}' is not a weekday, date or time here (weekdays come first)"
        if "-" in token:
            parts = token.split("-")
            names = ("year", "month", "day") if len(parts) == 3 else ("month", "day")
            if len(parts) not in (2, 3):
                return f"date '{token}' is not MONTHS-DAYS or YEARS-MONTHS-DAYS"
        elif ":" in token:
            parts = token.split(":")
            names = ("hour", "minute", "second")
            if len(parts) > 3:
                return f"time '{token}' has more than HOURS:MINUTES:SECONDS"
        else:
            parts, names = [token], ("minute",)
        for part, name in zip(parts, names):
            problem = _diagnose_field(part, name, token)
            if problem:
                return problem
    if len(tokens) > 2:
        return f"too many parts ({' '.join(tokens)})"
    return None


def _diagnose_weekdays(token: str) -> Optional[str]:
    known = ", ".join(WEEKDAY_NAMES)
    for item in token.split(","):
        if not item:
            return f"empty weekday in '{token}'"
        names = item.split("..")
        if len(names) > 2:
            return f"weekday range '{item}' has more than two ends"
        for name in names:
            if not name:
                return f"weekday range '{item}' has no end; write e.g. mon..fri"
            if name.lower() not in _WEEKDAY_WORDS:
                if _ALPHA.fullmatch(name):
                    return f"'{name}' is not a weekday (use {known} or the full English names)"
                return f"'{name}' in '{token}' is not a weekday"
    return None


def _diagnose_field(part: str, name: str, token: str) -> Optional[str]:
    first, limit, shown = _FIELD_RULES[name]
    if part == "":
        return f"empty {name} in '{token}'"
    for item in part.split(","):
        if item == "":
            return f"empty value in the {name} list '{part}'"
        if item.startswith("*"):
            rest = item[1:]
            if rest == "":
                continue
            if not rest.startswith("/") or not rest[1:].isdigit():
                return f"'{item}' is not a {name}: after '*' only '/STEP' may follow"
            step = int(rest[1:])
            if step == 0:
                return f"'{item}' repeats every 0: the step of a repetition must be at least 1"
            if step >= limit:
                return f"'{item}': a {name} step must be below {limit}"
            continue
        match = _ITEM.match(item)
        if not match:
            if item.endswith("..") or "../" in item:
                return f"range '{item}' has no end; write e.g. {first}..{first + 4}"
            if item.endswith("/"):
                return f"repetition '{item}' has no step; write e.g. {first}/5"
            return f"'{item}' is not a {name} value, range (a..b) or repetition (a/step)"
        start, end, step = (None if group is None else int(group) for group in match.groups())
        for value in (start, end):
            if value is not None and value >= limit:
                return f"{name} {value} in '{token}' is out of range ({shown})"
        if end is not None and start > end:
            return f"range '{item}' runs backwards; write {end}..{start}"
        if step is not None and step >= limit:
            return f"'{item}': a {name} step must be below {limit}"
    return None


# ------------------------------------------------------------------------------ evaluation

class _OutOfRange(Exception):
    """The search left the years a datetime can hold."""


class _TmEditor:
    """proxmox-time's ``TmEditor``: broken-down local time, normalized like ``mktime`` after each edit.

    Normalizing: overflowing fields roll over on the wall clock (day 30 of February is March 2nd);
    a wall time in a DST gap moves forward by the gap (glibc prefers the DST reading, i.e. the
    offset before the change: 02:30 → 03:30); a wall time that exists twice takes the UTC offset
    of the previous step (glibc's ``mktime`` first tries the offset it found last time).
    """

    def __init__(self, instant: datetime, zone: tzinfo) -> None:
        self.zone = zone
        self._load(instant)

    def _load(self, instant: datetime) -> None:
        local = instant.astimezone(self.zone)
        self.instant = instant
        self.offset = local.utcoffset()
        self.year, self.month, self.day = local.year, local.month, local.day
        self.hour, self.minute, self.second = local.hour, local.minute, local.second
        self.weekday = local.weekday()

    def _normalize(self, year: int, month: int, day: int, hour: int, minute: int, second: int) -> None:
        carry, month0 = divmod(year * 12 + month - 1, 12)
        if not 1 <= carry <= 9998:
            raise _OutOfRange()
        wall = datetime(carry, month0 + 1, 1) + timedelta(days=day - 1, hours=hour, minutes=minute,
                                                          seconds=second)
        self._load(_wall_to_instant(wall, self.zone, self.offset))

    def add_years(self, years: int) -> None:
        self._normalize(self.year + years, 1, 1, 0, 0, 0)

    def add_months(self, months: int) -> None:
        self._normalize(self.year, self.month + months, 1, 0, 0, 0)

    def add_days(self, days: int) -> None:
        self._normalize(self.year, self.month, self.day + days, 0, 0, 0)

    def set_time(self, hour: int, minute: int, second: int) -> None:
        self._normalize(self.year, self.month, self.day, hour, minute, second)

    def set_min_sec(self, minute: int, second: int) -> None:
        self._normalize(self.year, self.month, self.day, self.hour, minute, second)

    def set_sec(self, second: int) -> None:
        self._normalize(self.year, self.month, self.day, self.hour, self.minute, second)


def _wall_to_instant(wall: datetime, zone: tzinfo, offset_hint: Optional[timedelta]) -> datetime:
    """The UTC instant of a wall-clock time in ``zone``, resolved as glibc's ``mktime`` does."""
    found = []
    for fold in (0, 1):
        instant = wall.replace(tzinfo=zone, fold=fold).astimezone(timezone.utc)
        if instant.astimezone(zone).replace(tzinfo=None) == wall and instant not in found:
            found.append(instant)
    if not found:  # in a gap: the offset before the change, which lands after the gap
        return wall.replace(tzinfo=zone, fold=0).astimezone(timezone.utc)
    if len(found) == 2:
        for instant in found:
            if instant.astimezone(zone).utcoffset() == offset_hint:
                return instant
        return min(found)
    return found[0]


def _compute_next_event(event: CalendarEvent, after: datetime, zone: tzinfo) -> Optional[datetime]:
    """proxmox-time's ``compute_next_event`` on ``after`` (an aware datetime)."""
    last = after.astimezone(timezone.utc).replace(microsecond=0) + timedelta(seconds=1)
    all_days = not event.weekdays or len(event.weekdays) == 7
    try:
        cursor = _TmEditor(last, zone)
        for _step in range(MAX_SEARCH_STEPS + 1):
            if event.years and not _field_contains(event.years, cursor.year):
                found = _field_next(event.years, cursor.year)
                if found is None:
                    return None
                cursor.add_years(found - cursor.year)
                continue
            if event.months and not _field_contains(event.months, cursor.month):
                found = _field_next(event.months, cursor.month)
                if found is None:
                    cursor.add_years(1)
                else:
                    cursor.add_months(found - cursor.month)
                continue
            if event.days and not _field_contains(event.days, cursor.day):
                found = _field_next(event.days, cursor.day)
                if found is None:
                    cursor.add_months(1)
                else:
                    cursor.add_days(found - cursor.day)  # may roll over into the next month
                continue
            if not all_days and cursor.weekday not in event.weekdays:
                later = [day for day in range(cursor.weekday + 1, 7) if day in event.weekdays]
                cursor.add_days((later[0] if later else 7) - cursor.weekday)
                continue
            if event.hours and not _field_contains(event.hours, cursor.hour):
                found = _field_next(event.hours, cursor.hour)
                if found is None:
                    cursor.add_days(1)
                else:
                    cursor.set_time(found, 0, 0)
                continue
            if event.minutes and not _field_contains(event.minutes, cursor.minute):
                found = _field_next(event.minutes, cursor.minute)
                if found is None:
                    cursor.set_time(cursor.hour + 1, 0, 0)
                else:
                    cursor.set_min_sec(found, 0)
                continue
            if event.seconds and not _field_contains(event.seconds, cursor.second):
                found = _field_next(event.seconds, cursor.second)
                if found is None:
                    cursor.set_min_sec(cursor.minute + 1, 0)
                else:
                    cursor.set_sec(found)
                continue
            return cursor.instant
    except _OutOfRange:
        return None
    return None


# ------------------------------------------------------------------------------ times and zones

def _zone_name(zone: tzinfo) -> Optional[str]:
    if zone is timezone.utc:
        return "UTC"
    return getattr(zone, "key", None)


def to_instant(value: TimeValue, what: str = "time") -> datetime:
    """An aware datetime in UTC (times.to_datetime: one parser for every time option)."""
    return to_datetime(value, what)


# ------------------------------------------------------------------------------ systemd

_SYSTEMD_DOMAINS = (  # attribute, lowest, highest, digits
    ("years", SYSTEMD_FIRST_YEAR, LAST_YEAR, 4),
    ("months", 1, 12, 2),
    ("days", 1, 31, 2),
    ("hours", 0, 23, 2),
    ("minutes", 0, 59, 2),
    ("seconds", 0, 59, 2),
)


def to_systemd_oncalendar(event: Union[CalendarEvent, str], tz: TimeZoneArg = None) -> List[str]:
    """``OnCalendar=`` expressions (systemd 252) that together fire exactly when the event runs.

    The zone: `` UTC`` for a ``... UTC`` event; otherwise the IANA name of ``tz`` (systemd accepts
    ``Europe/Berlin`` after the time), or nothing for None: the timer then runs in the node's
    local time, as the engine does with ``tz=None``.

    Each field is written as the set of values it matches within systemd's ranges, which keeps
    Proxmox's reading (``mon..fri 22`` → ``Mon..Fri *-*-* *:22:00``, wrapping ``fri..mon`` →
    ``Mon,Fri..Sun``; longer repetitions always with their end: ``*/5`` → ``00..55/5``).
    Refused with :class:`ConfigError`: events that never run, and events that Proxmox's
    roll-over into the next hour, day, month or year makes skip times that systemd would run
    (see :func:`roll_overs`).
    """
    event = CalendarEvent.parse(event)
    if event.utc:
        suffix = " UTC"
    elif tz is None:
        suffix = ""
    else:
        name = _zone_name(resolve_timezone(tz))
        if not name:
            raise ConfigError(f"time zone {tz!r} has no IANA name; systemd needs one such as "
                              f"Europe/Berlin")
        suffix = f" {name}"

    rendered = {}
    for attribute, low, high, digits in _SYSTEMD_DOMAINS:
        field = getattr(event, attribute)
        if not field:
            rendered[attribute] = "*"
            continue
        values = [value for value in range(low, high + 1) if _field_contains(field, value)]
        if not values:
            raise ConfigError(_never_message(event, f"no {attribute[:-1]} in {_field_text(field)} "
                                                    f"can occur ({low}..{high})"))
        rendered[attribute] = _systemd_values(values, low, high, digits)
    if not _ever_runs(event):
        raise ConfigError(_never_message(event, "no date matches all its fields"))
    problems = roll_overs(event)
    if problems:
        problem = problems[0]
        raise ConfigError(
            f"schedule '{event.text}' cannot be a systemd timer that runs exactly when Proxmox runs it: "
            f"after the last matching {problem.field} of {problem.cycle} Proxmox looks for "
            f"{problem.field} {problem.sought}, rolls over into {problem.into} and so can skip "
            f"{problem.field} {', '.join(map(str, problem.skipped))} there, where systemd would run. "
            f"To run at every matching time, {problem.fix}")
    weekdays = ""
    if event.weekdays and len(event.weekdays) < 7:
        weekdays = _weekday_text(event.weekdays, _SYSTEMD_WEEKDAYS) + " "
    expression = (f"{weekdays}{rendered['years']}-{rendered['months']}-{rendered['days']} "
                  f"{rendered['hours']}:{rendered['minutes']}:{rendered['seconds']}{suffix}")
    return [expression]


def _with_days(event: CalendarEvent, days: List[int]) -> str:
    """The event in Proxmox syntax with other days of the month (for suggestions)."""
    runs = [str(a) if a == b else f"{a},{b}" if b == a + 1 else f"{a}..{b}" for a, b in _runs(days)]
    weekdays = _weekday_text(event.weekdays, WEEKDAY_NAMES) + " " if event.weekdays and len(event.weekdays) < 7 else ""
    time_part = f"{_field_text(event.hours)}:{_field_text(event.minutes)}"
    if event.seconds != _ZERO:
        time_part += f":{_field_text(event.seconds)}"
    return (f"{weekdays}{_field_text(event.years)}-{_field_text(event.months)}-{','.join(runs)} "
            f"{time_part}{' UTC' if event.utc else ''}")


def _never_message(event: CalendarEvent, why: str) -> str:
    return (f"schedule '{event.text}' never runs ({why}); a timer for it would never fire. "
            f"Check the date part ({event.normalized})")


def _systemd_values(values: List[int], low: int, high: int, digits: int) -> str:
    def fmt(value: int) -> str:
        return str(value).zfill(digits)

    if values == list(range(values[0], high + 1)) and values[0] == low:
        return "*"
    step = values[1] - values[0] if len(values) > 4 else 0  # short lists read better as lists
    if step > 1 and values == list(range(values[0], values[-1] + 1, step)):
        # Always with its end: systemd 252, like Proxmox, lets an open repetition run past the
        # end of a month and roll over (*-*-01/9 skips January 1st after December 28th).
        return f"{fmt(values[0])}..{fmt(values[-1])}/{step}"
    parts = []
    for first, last in _runs(values):
        if last - first >= 2:
            parts.append(f"{fmt(first)}..{fmt(last)}")
        else:
            parts.extend(fmt(value) for value in range(first, last + 1))
    return ",".join(parts)


def _month_length(year: int, month: int) -> int:
    following = date(year + month // 12, month % 12 + 1, 1)
    return (following - date(year, month, 1)).days


def _years(event: CalendarEvent) -> List[int]:
    return [year for year in range(SYSTEMD_FIRST_YEAR, LAST_YEAR + 1)
            if not event.years or _field_contains(event.years, year)]


def _ever_runs(event: CalendarEvent) -> bool:
    """Whether some date from 1970 to 2199 matches year, month, day and weekday."""
    months = [m for m in range(1, 13) if not event.months or _field_contains(event.months, m)]
    days = [d for d in range(1, 32) if not event.days or _field_contains(event.days, d)]
    for year in _years(event):
        for month in months:
            length = _month_length(year, month)
            for day in days:
                if day <= length and (not event.weekdays or date(year, month, day).weekday() in event.weekdays):
                    return True
    return False


@dataclass(frozen=True)
class RollOver:
    """Values Proxmox's search skips because a jump ran past the end of a field's cycle.

    proxmox-time jumps from a value after the cycle's last match (minute 56 for ``*/7``) to the
    field's next value, which for a repetition without end (``*/7``: 63) or a day the month
    lacks (the 30th in February) lies beyond the cycle. ``mktime`` rolls it over into the next
    cycle (minute 3 of the next hour, March 2nd), and the values before it there (minute 0,
    March 1st) are not run, where systemd runs them.
    """

    field: str          # "second", "minute", "hour", "day" or "month"
    cycle: str          # e.g. "each hour", "a 28-day February"
    into: str           # e.g. "the next hour", "March"
    sought: int         # the value looked for beyond the cycle
    skipped: Tuple[int, ...]
    fix: str            # how to write the schedule so that nothing is skipped


_CYCLES = (  # attribute, field name, first value, cycle length, what the cycle is
    ("seconds", "second", 0, 60, "minute"),
    ("minutes", "minute", 0, 60, "hour"),
    ("hours", "hour", 0, 24, "day"),
    ("months", "month", 1, 12, "year"),
)


def roll_overs(event: CalendarEvent) -> List[RollOver]:
    """Where Proxmox's evaluation skips values that the event's fields match (see :class:`RollOver`)."""
    found = []
    for attribute, name, first, length, cycle in _CYCLES:
        field = getattr(event, attribute)
        skipped, sought = _cycle_skips(field, first, length, first, length)
        if skipped:
            found.append(RollOver(name, f"each {cycle}", f"the next {cycle}", sought, skipped,
                                  _bounded_fix(field, name, first + length - 1)))
    if event.days:
        months = [m for m in range(1, 13) if not event.months or _field_contains(event.months, m)]
        years = _years(event)
        for month in months:
            following = month % 12 + 1
            if following not in months:
                continue
            lengths = sorted({_month_length(year, month) for year in years})
            for length in lengths:
                next_length = _month_length(2001 if length != 29 else 2000, following)
                skipped, sought = _cycle_skips(event.days, 1, length, 1, next_length)
                if skipped:
                    cycle = f"a {length}-day {_MONTH_NAMES[month - 1]}"
                    found.append(RollOver("day", cycle, _MONTH_NAMES[following - 1], sought, skipped,
                                          _day_fix(event)))
                    break
    return found


_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")


def _cycle_skips(field: Field, first: int, length: int, next_first: int,
                 next_length: int) -> Tuple[Tuple[int, ...], int]:
    if not field:
        return (), 0
    members = [v for v in range(first, first + length) if _field_contains(field, v)]
    last = max(members, default=first - 1)
    if last == first + length - 1:
        return (), 0
    sought = _field_next(field, last)
    if sought is None:
        return (), 0
    landing = sought - length
    skipped = tuple(v for v in range(next_first, min(landing, next_first + next_length))
                    if _field_contains(field, v))
    return skipped, sought


def _bounded_fix(field: Field, name: str, last: int) -> str:
    items = []
    for item in field:
        if item.step and item.end is None:
            items.append(f"{item.start}..{last}/{item.step}")
        else:
            items.append(str(item))
    return f"write the {name}s {_field_text(field)} as {','.join(items)}"


def _day_fix(event: CalendarEvent) -> str:
    # Days up to the 28th never roll over when listed one by one; the 29th..31st alone roll over
    # at most onto the 1st..3rd, which such a schedule does not hold.
    days = [d for d in range(1, 32) if _field_contains(event.days, d)]
    early = _with_days(event, [d for d in days if d <= 28])
    late = [d for d in days if d > 28]
    if not late:
        return f"write it as '{early}'"
    return f"use two schedules, '{early}' and '{_with_days(event, late)}'"


# ------------------------------------------------------------------------------ helpers for users

# ------------------------------------------------------------------------------ daily durations

_HM_TIME = re.compile(r"([0-9]+)(?::([0-9]+))?")


@dataclass(frozen=True)
class DailyDuration:
    """proxmox-time's daily duration, ``[WEEKDAYS] H[:MM]-H[:MM]`` (``mon..fri 8-17:30``): what a
    notification matcher's ``match-calendar`` holds. Build it with :meth:`parse`.

    It matches a moment on one of ``weekdays`` (0 Monday .. 6 Sunday; empty: every day) whose
    local hour and minute are from ``start`` up to, not including, ``end``, as proxmox-time's
    ``time_match`` does.
    """

    text: str
    weekdays: FrozenSet[int]
    start: Tuple[int, int]
    end: Tuple[int, int]

    @classmethod
    def parse(cls, text: str) -> "DailyDuration":
        """Parse ``text``; :class:`ConfigError` says what is wrong and shows the format."""
        fail = ConfigError(f"invalid daily duration '{text}': write '[WEEKDAYS] H[:MM]-H[:MM]', "
                           "e.g. 'mon..fri 8-17:30' or '22:00-23:59'")
        parser = _Parser(text)
        src, pos, weekdays = parser.src, 0, frozenset()
        if src[:1].isascii() and src[:1].isalpha():
            try:
                weekdays, pos = parser._weekday_list(0)   # calendar events' weekday grammar
            except _NoMatch:
                raise fail from None
            pos = parser._space(pos)
        times = []
        for index in (0, 1):
            match = _HM_TIME.match(src, pos)
            if not match:
                raise fail
            hour, minute = int(match.group(1)), int(match.group(2) or 0)
            if hour > 23 or minute > 59:
                raise ConfigError(f"invalid daily duration '{text}': {match.group()} is not a "
                                  "time of day (hours 0..23, minutes 0..59)")
            times.append((hour, minute))
            pos = parser._space(match.end())
            if index == 0:
                if not src.startswith("-", pos):
                    raise fail
                pos = parser._space(pos + 1)
        if pos != len(src):
            raise fail
        if times[0] > times[1]:
            raise ConfigError(f"invalid daily duration '{text}': it ends before it starts")
        return cls(text=text, weekdays=weekdays, start=times[0], end=times[1])

    def matches(self, moment: TimeValue, tz: TimeZoneArg = None) -> bool:
        """Whether ``moment`` falls in the duration, on the wall clock of ``tz`` (default: the
        system's zone, as proxmox-notify matches in local time)."""
        wall = to_instant(moment, "moment").astimezone(resolve_timezone(tz))
        if self.weekdays and wall.weekday() not in self.weekdays:
            return False
        return self.start <= (wall.hour, wall.minute) < self.end

    def __str__(self) -> str:
        return self.text


def looks_like_hour_mistake(spec: str) -> Optional[str]:
    """A warning when the time part is a lone number 0..23, which Proxmox reads as a MINUTE.

    ``mon..fri 22`` runs at minute 22 of every hour on weekdays, not at 22:00. None when the
    spec has no such part (or does not parse; :meth:`CalendarEvent.parse` reports that).
    """
    if not isinstance(spec, str):
        return None
    try:
        CalendarEvent.parse(spec)
    except ConfigError:
        return None
    text = spec.strip()
    body, utc = (text[:-3].rstrip(" "), " UTC") if text.endswith("UTC") else (text, "")
    tokens = body.split()
    if not tokens or not _LONE_NUMBER.match(tokens[-1]):
        return None
    leading = tokens[:-1]
    if len(leading) > 2 or (leading and not leading[0][:1].isalpha() and "-" not in leading[0]):
        return None
    minute = int(tokens[-1])
    if minute > 23:
        return None
    fixed = " ".join(leading + [f"{minute:02d}:00"]) + utc
    return (f"`{text}` runs at minute {minute} of every hour; for {minute:02d}:00 write `{fixed}`")


def simulate(spec: Union[CalendarEvent, str], start: Optional[TimeValue] = None, iterations: int = 10,
             tz: TimeZoneArg = None) -> List[str]:
    """The next ``iterations`` runs after ``start`` (default: now) as ISO 8601 times with offset.

    Times are shown in the zone the event runs in (UTC for a ``... UTC`` event), e.g.
    ``2024-03-31T03:00:00+02:00``, as Proxmox's schedule simulator lists them.
    """
    event = CalendarEvent.parse(spec)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= 1000:
        raise ConfigError(f"iterations: {iterations!r} is not a count from 1 to 1000")
    begin = datetime.now(timezone.utc) if start is None else to_instant(start, "start")
    return [moment.isoformat() for moment in event.next_events(begin, iterations, tz)]


def describe_schedule(spec: str, start: Optional[TimeValue] = None, iterations: int = 10,
                      tz: TimeZoneArg = None) -> dict:
    """What the schedule_info module reports: the normalized spec, the next events, the
    ``OnCalendar=`` lines (or why there are none) and a warning for a likely mistake."""
    event = CalendarEvent.parse(spec)
    result = {'changed': False, 'normalized': event.normalized,
              'events': simulate(event, start, iterations, tz), 'warnings': []}
    try:
        result['systemd_oncalendar'] = to_systemd_oncalendar(event, tz)
    except ConfigError as exc:
        result['systemd_oncalendar'] = []
        result['systemd_error'] = str(exc)
        result['warnings'].append(str(exc))
    warning = looks_like_hour_mistake(spec)
    if warning:
        result['warnings'].append(warning)
    return result
