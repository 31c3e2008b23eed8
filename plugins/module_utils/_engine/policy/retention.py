"""Which backups a retention policy keeps: Proxmox VE's prune semantics, as a pure function.

The decision is made on plain data (a time, a protected flag and an id per backup), so the same
code prunes a real storage, answers a dry run and drives the prune simulator. Deleting is the
caller's business.

The rules are those of Proxmox VE (``PVE::Storage::prune_mark_backup_group``) and Proxmox Backup
Server (``compute_prune_info``), which agree:

- Backups are looked at newest first. Protected backups are marked ``protected`` before any rule
  runs: they are never removed, and no rule counts them or treats their period as covered.
- The rules run in the order keep-last, keep-hourly, keep-daily, keep-weekly, keep-monthly,
  keep-yearly. Each rule sorts backups into periods (keep-last: each backup time is a period of
  its own; hourly, daily, monthly, yearly: the local calendar hour, day, month, year; weekly: the
  ISO year and week, so 2020-12-31 and 2021-01-03 both are week 53 of 2020).
- A period that already holds a backup kept by an earlier rule is covered: the rule skips it.
  Otherwise the rule keeps the newest backup of each new period that no earlier rule has marked,
  marks the other unmarked backups of that period ``remove``, and stops at the first new period
  once it has kept ``n``. A backup an earlier rule marked ``remove`` stays removed.
- Whatever no rule marked is removed. With ``keep-all=1``, or without any positive count,
  everything is kept.
- Periods are wall-clock periods in the local time of a time zone (the system's by default, as
  Proxmox uses ``localtime``). In the hour repeated when daylight saving time ends, both passes
  of the hour are one hourly period, as with Proxmox.

Example::

    >>> policy = RetentionPolicy.parse("keep-last=1,keep-daily=2")
    >>> marks = select_for_prune([
    ...     {"id": "a", "time": "2024-05-01T20:00:00Z", "protected": False},
    ...     {"id": "b", "time": "2024-05-02T08:00:00Z", "protected": False},
    ...     {"id": "c", "time": "2024-05-02T20:00:00Z", "protected": False},
    ... ], policy, tz="UTC")
    >>> [(mark.id, mark.describe()) for mark in marks]
    [('c', 'keep (last #1)'), ('b', 'remove'), ('a', 'keep (daily #1)')]

``b`` goes although keep-daily=2: its day is covered by ``c``, which keep-last already kept.
"""

from __future__ import annotations

from collections import abc
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from itertools import repeat
from operator import attrgetter, methodcaller
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple, Union

from ..errors import ConfigError
from ..times import TIME_EXAMPLE as _TIME_EXAMPLE
from ..times import TimeZoneArg, format_utc, resolve_timezone, to_datetime
from .config import parse_bool, parse_int, parse_prune_backups

KEEP = "keep"
REMOVE = "remove"
PROTECTED = "protected"
KEEP_ALL = "keep-all"

# (option, rule name in explanations), in the order Proxmox applies them.
RULES: Tuple[Tuple[str, str], ...] = (
    ("keep-last", "last"),
    ("keep-hourly", "hourly"),
    ("keep-daily", "daily"),
    ("keep-weekly", "weekly"),
    ("keep-monthly", "monthly"),
    ("keep-yearly", "yearly"),
)
COUNT_OPTIONS: Tuple[str, ...] = tuple(rule[0] for rule in RULES)
OPTIONS: Tuple[str, ...] = (KEEP_ALL,) + COUNT_OPTIONS

_UTC = timezone.utc


# --------------------------------------------------------------------------- the policy

@dataclass(frozen=True)
class RetentionPolicy:
    """A ``prune-backups`` setting: how many periods each rule keeps, or keep everything.

    Counts of 0 mean "rule not used". Build it with :meth:`from_options` (a dict, e.g. module
    parameters) or :meth:`parse` (a Proxmox property string); both validate. Constructing it
    directly validates too, with a generic error prefix.
    """

    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    keep_all: bool = False

    def __post_init__(self) -> None:
        for option in COUNT_OPTIONS:
            value = getattr(self, _attr(option))
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"retention policy: {option} must be an integer >= 0, "
                                  f"not {value!r}")
        if not isinstance(self.keep_all, bool):
            raise ConfigError(f"retention policy: keep-all must be a boolean, "
                              f"not {self.keep_all!r}")
        _check_keep_all(self.keep_all, self.counts(), "retention policy")

    @classmethod
    def from_options(cls, options: Mapping[str, Any],
                     what: str = "prune-backups") -> "RetentionPolicy":
        """From a dict such as ``{'keep-last': 3, 'keep_daily': '13'}``.

        Keys may be spelled with dashes (Proxmox) or underscores (Ansible); a value of ``None``
        counts as absent, because Ansible passes unset sub-options that way. Counts may be
        integers or integer strings, ``keep-all`` a boolean or one of Proxmox's boolean
        spellings. ``what`` starts every error message, e.g. ``"vzdump.conf line 3: prune-backups"``.
        """
        if not isinstance(options, Mapping):
            raise ConfigError(f"{what}: expected a mapping of retention options such as "
                              f"{{'keep-last': 3}}, got {type(options).__name__}")
        spelled: Dict[str, str] = {}
        values: Dict[str, Any] = {}
        for raw_key, value in options.items():
            key = raw_key.replace("_", "-") if isinstance(raw_key, str) else raw_key
            if key not in OPTIONS:
                raise ConfigError(f"{what}: unknown retention option '{raw_key}'; allowed: "
                                  f"{', '.join(OPTIONS)}")
            if key in spelled:
                raise ConfigError(f"{what}: retention option '{key}' is given twice (as "
                                  f"'{spelled[key]}' and '{raw_key}'); keep one")
            spelled[key] = raw_key
            if value is not None:
                values[key] = value
        keep_all = _keep_all_value(values.pop(KEEP_ALL, False), f"{what}: {KEEP_ALL}")
        counts = {key: _count_value(value, f"{what}: {key}") for key, value in values.items()}
        _check_keep_all(keep_all, {key: n for key, n in counts.items() if n > 0}, what)
        return cls(keep_all=keep_all, **{_attr(key): n for key, n in counts.items()})

    @classmethod
    def parse(cls, text: str, what: str = "prune-backups") -> "RetentionPolicy":
        """From a Proxmox property string such as ``keep-last=3,keep-daily=13``."""
        if not isinstance(text, str):
            raise ConfigError(f"{what}: expected a property string such as "
                              f"'keep-last=3,keep-daily=13', got {type(text).__name__}")
        return cls.from_options(parse_prune_backups(text, what), what)

    @property
    def is_keep_all(self) -> bool:
        """True when nothing is ever removed: keep-all=1, or no positive count (as in Proxmox)."""
        return self.keep_all or not self.counts()

    def counts(self) -> Dict[str, int]:
        """The positive counts, ``{'keep-last': 3, ...}``, in the order the rules run."""
        counts = {option: getattr(self, _attr(option)) for option in COUNT_OPTIONS}
        return {option: n for option, n in counts.items() if n > 0}

    def as_dict(self) -> Dict[str, Any]:
        """Normalised as Proxmox stores it: ``{'keep-all': True}`` or the positive counts."""
        if self.is_keep_all:
            return {KEEP_ALL: True}
        return self.counts()

    def as_property_string(self) -> str:
        """``keep-last=3,keep-daily=13`` (rule order), or ``keep-all=1``; :meth:`parse` reads it."""
        if self.is_keep_all:
            return f"{KEEP_ALL}=1"
        return ",".join(f"{option}={n}" for option, n in self.counts().items())

    def __str__(self) -> str:
        return self.as_property_string()


def _attr(option: str) -> str:
    return option.replace("-", "_")


def _count_value(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value} is a boolean; give a number of backups to keep "
                          f"(0 turns the rule off)")
    if isinstance(value, int):
        return parse_int(str(value), what, minimum=0)
    if isinstance(value, str):
        return parse_int(value, what, minimum=0)
    raise ConfigError(f"{what}: {value!r} is not an integer; give a number of backups to keep "
                      f"(0 turns the rule off)")


def _keep_all_value(value: Any, what: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        return parse_bool(value, what)
    raise ConfigError(f"{what}: {value!r} is not a boolean; use 1/0, yes/no, true/false or on/off")


def _check_keep_all(keep_all: bool, positive: Mapping[str, int], what: str) -> None:
    # Proxmox refuses the contradiction instead of silently preferring one side.
    if keep_all and positive:
        raise ConfigError(f"{what}: keep-all=1 cannot be combined with "
                          f"{', '.join(sorted(positive))}; remove one or the other")


def as_policy(policy: Union[RetentionPolicy, Mapping[str, Any], str],
              what: str = "prune-backups") -> RetentionPolicy:
    """A :class:`RetentionPolicy` from a policy, an options dict or a property string."""
    if isinstance(policy, RetentionPolicy):
        return policy
    if isinstance(policy, str):
        return RetentionPolicy.parse(policy, what)
    return RetentionPolicy.from_options(policy, what)


# --------------------------------------------------------------------------- times

# --------------------------------------------------------------------------- periods

def _local_times(backups: _Backups, zone: tzinfo) -> List[datetime]:
    """Each backup's time in ``zone`` (``times.resolve_timezone``: the system's local time, as
    Proxmox's localtime() uses, when none is given); map() converts 100k times without a Python
    call per time."""
    if backups.times is None:
        # The same zone.fromutc() call as astimezone() makes, without the UTC datetime.
        return list(map(datetime.fromtimestamp, backups.seconds, repeat(zone)))
    return list(map(methodcaller("astimezone", zone), backups.times))


# Period keys from local wall-clock fields, as Proxmox builds them with localtime()/strftime.
# keep-last's period is the backup's own time (Proxmox: its ctime), so it has none here.
_PERIODS: Dict[str, Callable[[datetime], Hashable]] = {
    "keep-hourly": attrgetter("year", "month", "day", "hour"),
    "keep-daily": attrgetter("year", "month", "day"),
    "keep-weekly": lambda local: local.isocalendar()[:2],
    "keep-monthly": attrgetter("year", "month"),
    "keep-yearly": attrgetter("year"),
}


# --------------------------------------------------------------------------- the selection

@dataclass(frozen=True)
class PruneMark:
    """The decision for one backup.

    ``mark`` is ``keep``, ``remove`` or ``protected``. ``rule`` says why a backup stays:
    ``last #1``, ``daily #3`` (the third day kept by keep-daily), ``keep-all`` or ``protected``;
    it is ``None`` for a removed backup. ``time`` is aware, in UTC.
    """

    id: Any
    time: datetime
    mark: str
    rule: Optional[str]

    @property
    def keep(self) -> bool:
        """True unless the backup is to be removed (protected backups are kept)."""
        return self.mark != REMOVE

    def describe(self) -> str:
        """``keep (daily #3)``, ``keep (keep-all)``, ``protected`` or ``remove``."""
        if self.mark == KEEP:
            return f"keep ({self.rule})"
        return self.mark


@dataclass
class _Backups:
    """Backups as parallel lists: for 100k backups, an object per backup costs more than the
    decision.

    ``seconds`` are the times as epoch seconds (the given ints, or floats of whole seconds) when
    every time is a whole second, else ``None``: they order like the times, and sort and format
    several times faster. ``times`` (aware, UTC) are ``None`` when the ints were given: the
    simulator never needs them, see :meth:`utc_times`. :func:`_select` fills in ``marks`` and
    ``rules``.
    """

    ids: List[Any]
    times: Optional[List[datetime]]
    protected: List[bool]
    seconds: Optional[List[float]]
    marks: List[Optional[str]] = field(default_factory=list)
    rules: List[Optional[str]] = field(default_factory=list)

    def utc_times(self) -> List[datetime]:
        if self.times is None:
            # What to_datetime() makes of an int, without its checks of the type.
            self.times = list(map(datetime.fromtimestamp, self.seconds, repeat(_UTC)))
        return self.times


def _field(entry: Any, name: str, default: Any = None) -> Any:
    # collections.abc, not typing: isinstance() on typing.Mapping is several times slower.
    if isinstance(entry, abc.Mapping):
        return entry.get(name, default)
    return getattr(entry, name, default)


def _protected_value(value: Any, what: str) -> bool:
    """A backup's ``protected`` flag: absent means unprotected, else as ``keep-all`` reads it."""
    return False if value is None else _keep_all_value(value, what)


_MICROSECOND = attrgetter("microsecond")
_CLOCK_MINUTES = [f"{hour:02d}:{minute:02d}:" for hour in range(24) for minute in range(60)]
_CLOCK_SECONDS = [f"{second:02d}Z" for second in range(60)]


def _entries(entries: Iterable[Any]) -> _Backups:
    """Ids, UTC times and protected flags in input order; checked, errors naming the backup."""
    if isinstance(entries, list):  # the fast path reads it more than once
        backups = _entries_fast(entries)
        if backups is not None:
            return backups
    return _entries_checked(entries)


def _entries_fast(entries: List[Any]) -> Optional[_Backups]:
    """The common case (dicts, valid times, unique ids, boolean flags), a list at a time.

    Statements per backup cost more than the decision for 100k backups, so this works with
    comprehensions and map(). It returns what :func:`_entries_checked` would, or ``None`` as
    soon as anything is unusual or wrong; that one then takes over and names the first bad
    backup.
    """
    if set(map(type, entries)) - {dict}:
        return None
    raw_ids = [entry.get("id") for entry in entries]
    raw_times = [entry.get("time") for entry in entries]
    flags = [entry.get("protected", False) for entry in entries]
    if set(map(type, flags)) - {bool}:
        return None
    backups = _Backups(raw_ids, None, flags, None)
    try:
        if set(map(type, raw_times)) <= {int}:
            # The epoch seconds a datetime can hold are an interval: check its ends only.
            for epoch in (min(raw_times), max(raw_times)) if raw_times else ():
                datetime.fromtimestamp(epoch, _UTC)
            backups.seconds = raw_times
        else:
            backups.times = list(map(to_datetime, raw_times))
    except Exception:  # whatever it is, the checked path raises it, or an earlier backup's error
        return None
    times = backups.times
    if times is not None and set(map(type, times)) <= {datetime} and not any(
            map(_MICROSECOND, times)):
        backups.seconds = list(map(datetime.timestamp, times))  # exact: |t| < 2**53
    if any(raw_id is None for raw_id in raw_ids):
        backups.ids = [name if raw_id is None else raw_id
                       for raw_id, name in zip(raw_ids, _utc_names(backups))]
    try:
        if len(set(backups.ids)) != len(backups.ids):
            return None
    except TypeError:  # an unhashable id
        return None
    return backups


def _entries_checked(entries: Iterable[Any]) -> _Backups:
    backups = _Backups([], [], [], None)
    seen: Dict[Any, int] = {}
    for index, entry in enumerate(entries, start=1):
        raw_id = _field(entry, "id")
        label = f"backup #{index}" if raw_id is None else f"backup '{raw_id}'"
        raw_time = _field(entry, "time")
        if raw_time is None:
            raise ConfigError(f"{label}: has no time; give {_TIME_EXAMPLE}")
        moment = to_datetime(raw_time, f"{label}: time")
        entry_id = format_utc(moment) if raw_id is None else raw_id
        try:
            first = seen.setdefault(entry_id, index)
        except TypeError:
            raise ConfigError(f"{label}: id {raw_id!r} is not usable as an id; use a string "
                              f"or a number") from None
        if first != index:
            how = "id" if raw_id is not None else "time (and no id)"
            raise ConfigError(f"backup #{index} has the same {how} as backup #{first}: "
                              f"'{entry_id}'; each backup must appear once")
        backups.ids.append(entry_id)
        backups.times.append(moment)
        backups.protected.append(
            _protected_value(_field(entry, "protected", False), f"{label}: protected"))
    return backups


def _utc_names(backups: _Backups) -> List[str]:
    """``format_utc(time)`` for each backup's time: ``2024-05-01T02:00:00Z``.

    With whole epoch seconds, each UTC day's date is formatted once and the clock is looked
    up: four times faster than ``isoformat()`` on aware datetimes, the same strings.
    """
    if backups.seconds is None:
        return [format_utc(moment) for moment in backups.utc_times()]
    dates: Dict[int, str] = {}
    names = []
    for epoch in backups.seconds:
        day, second = divmod(int(epoch), 86400)
        date = dates.get(day)
        if date is None:
            date = dates[day] = format_utc(datetime.fromtimestamp(day * 86400, _UTC))[:11]
        minute, second = divmod(second, 60)
        names.append(date + _CLOCK_MINUTES[minute] + _CLOCK_SECONDS[second])
    return names


def select_for_prune(entries: Iterable[Any], policy: RetentionPolicy,
                     tz: TimeZoneArg = None) -> List[PruneMark]:
    """Mark every backup ``keep``, ``remove`` or ``protected``; newest first.

    ``entries`` are dicts or objects with ``time`` (aware datetime, epoch seconds or ISO 8601
    with an offset), ``protected`` (bool, default False) and ``id`` (default: the UTC time as
    ``2024-05-01T02:00:00Z``, a backup directory's name). ``tz`` (an IANA name or a tzinfo;
    default the system's local time) decides which hour, day, week, month and year a backup
    falls in. The result is sorted newest first, the order the rules walk; backups with the same
    time keep their input order, as in Proxmox's stable sort. Ids must be unique.
    """
    selected = _select(entries, policy, tz)
    return list(map(PruneMark, selected.ids, selected.utc_times(), selected.marks,
                    selected.rules))


def _reorder(values: List[Any], order: List[int]) -> List[Any]:
    return list(map(values.__getitem__, order))  # twice as fast as a comprehension


def _select(entries: Iterable[Any], policy: RetentionPolicy, tz: TimeZoneArg) -> _Backups:
    """The backups newest first, with their marks and rules."""
    if not isinstance(policy, RetentionPolicy):
        raise TypeError("policy must be a RetentionPolicy; use as_policy() for dicts or strings")
    zone = resolve_timezone(tz)
    given = _entries(entries)
    # A stable sort, reverse=True included: backups with the same time keep their input order.
    keys: List[Any] = given.utc_times() if given.seconds is None else given.seconds
    order = sorted(range(len(keys)), key=keys.__getitem__, reverse=True)
    backups = _Backups(_reorder(given.ids, order),
                       None if given.times is None else _reorder(given.times, order),
                       _reorder(given.protected, order),
                       None if given.seconds is None else _reorder(given.seconds, order))
    marks: List[Optional[str]] = [PROTECTED if flag else None for flag in backups.protected]
    rules: List[Optional[str]] = list(marks)

    if policy.is_keep_all:
        fill, fill_rule = KEEP, KEEP_ALL
    else:
        fill, fill_rule = REMOVE, None
        counts = policy.counts()
        local = _local_times(backups, zone) if counts.keys() - {"keep-last"} else []
        # Equal epoch seconds are equal times: keep-last's periods.
        instants = backups.utc_times() if backups.seconds is None else backups.seconds
        kept: List[int] = []
        for option, name in RULES:
            if option in counts:
                values = instants if option == "keep-last" else local
                kept += _apply_rule(values, _PERIODS.get(option), kept, marks, rules,
                                    counts[option], name)
    backups.rules = [fill_rule if mark is None else rule for mark, rule in zip(marks, rules)]
    backups.marks = [fill if mark is None else mark for mark in marks]
    return backups


def _apply_rule(values: List[Any], period: Optional[Callable[[datetime], Hashable]],
                kept_before: List[int], marks: List[Optional[str]], rules: List[Optional[str]],
                count: int, name: str) -> List[int]:
    """One rule over the newest-first list; backup i's period is ``period(values[i])``, or
    ``values[i]`` itself without a ``period`` (keep-last).

    ``kept_before`` are the backups earlier rules kept, whose periods are covered. Only ``keep``
    covers a period: a protected backup does not, so the rule still keeps one backup in that
    period (Proxmox counts only its own ``keep`` marks as already included). Returns the
    backups this rule kept.
    """
    if period is None:
        covered = {values[i] for i in kept_before}
    else:
        covered = {period(values[i]) for i in kept_before}
    kept: Dict[Hashable, int] = {}
    newly: List[int] = []
    for i, mark in enumerate(marks):
        if mark is not None:
            continue
        key = values[i] if period is None else period(values[i])
        if key in covered:
            continue
        if key in kept:
            marks[i] = REMOVE
            continue
        if len(kept) >= count:
            break
        kept[key] = len(kept) + 1
        marks[i], rules[i] = KEEP, f"{name} #{kept[key]}"
        newly.append(i)
    return newly


# --------------------------------------------------------------------------- the simulator

_SIMULATE_KEYS = ("id", "protected", "time")
_SIMULATE_KEY_SET = frozenset(_SIMULATE_KEYS)


def simulate(backups: Iterable[Mapping[str, Any]],
             policy_or_options: Union[RetentionPolicy, Mapping[str, Any], str],
             timezone: TimeZoneArg = None) -> List[Dict[str, Any]]:
    """The prune simulator: plain dicts in, plain dicts out, newest first.

    ``backups``: ``[{'time': epoch or ISO 8601, 'protected': bool, 'id': optional}, ...]``.
    ``policy_or_options``: a :class:`RetentionPolicy`, an options dict or a property string.
    Returns ``[{'id', 'time' (UTC, ``2024-05-01T02:00:00Z``), 'mark', 'rule'}, ...]``; a backup
    without an id gets its UTC time as id. Unknown keys, bad times and duplicates (the same id,
    or the same time without ids) are a :class:`ConfigError` naming the backup.
    """
    policy = as_policy(policy_or_options)
    if isinstance(backups, (str, bytes, abc.Mapping)):
        raise ConfigError("backups: expected a list of {time, protected, id} entries")
    if (isinstance(backups, list) and set(map(type, backups)) <= {dict}
            and all(map(_SIMULATE_KEY_SET.issuperset, backups))):
        checked = backups  # the common case, checked a list at a time
    else:
        checked = _simulate_entries(backups)
    selected = _select(checked, policy, timezone)
    return [{"id": backup_id, "time": name, "mark": mark, "rule": rule}
            for backup_id, name, mark, rule in zip(
                selected.ids, _utc_names(selected), selected.marks, selected.rules)]


def _simulate_entries(backups: Iterable[Any]) -> List[Mapping[str, Any]]:
    checked = []
    for index, backup in enumerate(backups, start=1):
        if not isinstance(backup, abc.Mapping):
            raise ConfigError(f"backup #{index}: expected a mapping with 'time' (and optionally "
                              f"'protected', 'id'), got {type(backup).__name__}")
        unknown = sorted(str(key) for key in backup if key not in _SIMULATE_KEYS)
        if unknown:
            raise ConfigError(f"backup #{index}: unknown key '{unknown[0]}'; allowed keys: "
                              f"{', '.join(_SIMULATE_KEYS)}")
        checked.append(backup)
    return checked
