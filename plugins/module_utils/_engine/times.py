"""Times as users and files give them: aware datetimes, ISO 8601 with an offset, epoch seconds.

One parser for every option that takes a time (restore's ``until``, the prune simulator, the
schedule simulator), so they accept and refuse the same things with the same messages.
"""
from __future__ import annotations

import functools
import math
import os
import re
from datetime import datetime, timezone, tzinfo
from typing import Union

from .errors import ConfigError
from .vocabulary import BACKUP_TIME_FORMAT

try:  # Python 3.9+; guarded so that loading the engine never fails on it.
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError
except ImportError:  # pragma: no cover
    ZoneInfo = None  # type: ignore[assignment,misc]
    ZoneInfoNotFoundError = KeyError  # type: ignore[assignment,misc]

TimeValue = Union[datetime, int, float, str]
TimeZoneArg = Union[None, str, tzinfo]
_EPOCH_RE = re.compile(r"^[+-]?[0-9]+(\.[0-9]+)?$")
TIME_EXAMPLE = "an ISO 8601 time with a UTC offset such as 2024-05-01T02:00:00Z, or epoch seconds"


def to_datetime(value: TimeValue, what: str = "time") -> datetime:
    """An aware ``datetime`` in UTC from an aware datetime, epoch seconds or an ISO 8601 string.

    A time without a UTC offset is refused rather than guessed: the same wall-clock time means
    different instants on different nodes. ``Z`` is accepted as the UTC offset (it is how backup
    directories are named), and so are epoch seconds written as a string.
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ConfigError(f"{what}: {value.isoformat()} has no time zone; give an aware "
                              f"datetime (e.g. tzinfo=timezone.utc)")
        return value.astimezone(timezone.utc)
    if isinstance(value, bool):
        raise ConfigError(f"{what}: {value} is not a time; give {TIME_EXAMPLE}")
    if isinstance(value, (int, float)):
        return _from_epoch(value, what)
    if isinstance(value, str):
        text = value.strip()
        if _EPOCH_RE.match(text):
            return _from_epoch(float(text) if "." in text else int(text), what)
        iso = text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text
        try:
            parsed = datetime.fromisoformat(iso)
        except ValueError:
            raise ConfigError(f"{what}: '{value}' is not a time; give {TIME_EXAMPLE}") from None
        if parsed.tzinfo is None:
            raise ConfigError(f"{what}: '{value}' has no UTC offset; append Z (UTC) or an offset "
                              f"such as +02:00")
        return parsed.astimezone(timezone.utc)
    raise ConfigError(f"{what}: {value!r} ({type(value).__name__}) is not a time; "
                      f"give {TIME_EXAMPLE}")


def _from_epoch(seconds: Union[int, float], what: str) -> datetime:
    if isinstance(seconds, float) and not math.isfinite(seconds):
        raise ConfigError(f"{what}: {seconds} is not a time; give {TIME_EXAMPLE}")
    try:
        return datetime.fromtimestamp(seconds, timezone.utc)
    except (OverflowError, OSError, ValueError):
        raise ConfigError(f"{what}: {seconds} seconds since the epoch is out of range") from None


def format_utc(moment: datetime) -> str:
    """``2024-05-01T02:00:00Z``: the UTC form backup directories are named with."""
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def format_time(when: datetime) -> str:
    """A backup's name: the UTC time of its point in time, to the second."""
    return when.astimezone(timezone.utc).strftime(BACKUP_TIME_FORMAT)


_BACKUP_TIME_RE = re.compile(r'([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})Z')


@functools.lru_cache(maxsize=1 << 16)
def parse_time(text: str) -> datetime:
    """The point in time a backup's name stands for; ValueError for any other text.

    Listing a guest's backups parses every name several times (sort, select, report), and
    strptime cost 0.2 s per 10,000 backups: the usual spelling is read by a regex, each name
    once (a datetime is immutable, so the cache is safe); strptime decides whatever else."""
    match = _BACKUP_TIME_RE.fullmatch(text)
    if match is not None:
        return datetime(*map(int, match.groups()), tzinfo=timezone.utc)
    return datetime.strptime(text, BACKUP_TIME_FORMAT).replace(tzinfo=timezone.utc)


_AGE_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}
_AGE_NUMBER = r'(?:[0-9]+\.?[0-9]*|\.[0-9]+)'
_AGE_PART_RE = re.compile(rf'({_AGE_NUMBER})([smhdw])')
_AGE_RE = re.compile(rf'{_AGE_NUMBER}|(?:{_AGE_NUMBER}[smhdw])+')


def parse_age(text, what: str = 'max_age', allow_zero: bool = False) -> float:
    """Seconds in an age such as ``90``, ``90s``, ``30m``, ``12h``, ``1d``, ``2w`` or ``24h5m``.

    ``allow_zero`` admits ``0`` (``0s``): a garbage collection's grace may be none at all.
    """
    value = str(text).strip().lower()
    seconds = -1.0
    if _AGE_RE.fullmatch(value):
        if value[-1:] in _AGE_UNITS:
            seconds = sum(float(number) * _AGE_UNITS[unit]
                          for number, unit in _AGE_PART_RE.findall(value))
        else:
            seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        smallest = 'a number of seconds (0 or more)' if allow_zero else \
            'a positive number of seconds'
        raise ConfigError(f"{what} {text!r} is not an age: use {smallest} or a number with s, "
                          "m, h, d or w (e.g. 12h, 24h5m)")
    return seconds


def resolve_timezone(tz: TimeZoneArg = None) -> tzinfo:
    """A ``tzinfo`` from None (the system's local time, as libc finds it), an IANA name or a tzinfo.

    The one resolver behind every option that takes a time zone (the schedule engine, the
    prune simulator, retention), so that "no zone given" means the same everywhere.
    """
    if isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        return _zone_by_name(tz.strip(), "time zone")
    if tz is not None:
        raise ConfigError(f"time zone: {tz!r} is neither an IANA name nor a tzinfo")
    return _system_zone()


def _zone_by_name(name: str, what: str) -> tzinfo:
    if ZoneInfo is None:  # pragma: no cover - Python < 3.9
        raise ConfigError(f"{what}: this Python has no zoneinfo; use Python 3.9+")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ConfigError(f"{what}: unknown time zone '{name}'; use an IANA name such as "
                          "Europe/Berlin or UTC") from None


def _system_zone() -> tzinfo:
    """libc's local zone: ``TZ`` (a zone name or ``:name``), else ``/etc/localtime``, else UTC."""
    env = os.environ.get("TZ")
    if env:
        name = env[1:] if env.startswith(":") else env
        if name.startswith("/"):
            return _zone_from_file(name, f"TZ={env}")
        return _zone_by_name(name, f"TZ={env}")
    if os.path.exists("/etc/localtime"):
        target = os.path.realpath("/etc/localtime")
        marker = "/zoneinfo/"
        if marker in target:
            try:
                return _zone_by_name(target.split(marker, 1)[1], "/etc/localtime")
            except ConfigError:
                pass
        return _zone_from_file("/etc/localtime", "/etc/localtime")
    return timezone.utc


def _zone_from_file(path: str, what: str) -> tzinfo:
    if ZoneInfo is None:  # pragma: no cover - Python < 3.9
        raise ConfigError(f"{what}: this Python has no zoneinfo; use Python 3.9+")
    try:
        with open(path, "rb") as handle:
            return ZoneInfo.from_file(handle)
    except (OSError, ValueError):
        raise ConfigError(f"{what}: {path} is not a readable time zone file") from None
