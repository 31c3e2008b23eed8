"""Times as users and files give them: aware datetimes, ISO 8601 with an offset, epoch seconds.

One parser for every option that takes a time (restore's ``until``, the prune simulator, the
schedule simulator), so they accept and refuse the same things with the same messages.
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Union

from .errors import ConfigError

TimeValue = Union[datetime, int, float, str]
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
