"""Which targets an event goes to: notification matchers evaluated as proxmox-notify does.

A matcher's directives are ``match-severity``, ``match-field`` and ``match-calendar``, each
repeatable. ``mode all`` (the default) needs every directive line to match, ``mode any`` one of
them; the same mode combines the lines within a kind and the kinds with each other.
``invert-match`` flips the result, except that a matcher with no directive matches every event,
inverted or not. A disabled matcher matches nothing. The targets of all matching matchers are
united, so each target is notified at most once per event.
"""
from __future__ import annotations

from typing import Iterable, List, Mapping

from ..times import TimeValue, TimeZoneArg

_DIRECTIVES = ('match-severity', 'match-field', 'match-calendar')


def _directive_matches(key, directive, severity, fields, when, tz):
    if key == 'match-severity':
        return severity in directive
    if key == 'match-calendar':
        return directive.matches(when, tz)
    value = fields.get(directive.field)
    if value is None:           # a field the event does not carry never matches
        return False
    if directive.kind == 'exact':
        return value in directive.values
    return directive.pattern.search(value) is not None


def matcher_matches(matcher, severity: str, fields: Mapping[str, str], when: TimeValue,
                    tz: TimeZoneArg = None) -> bool:
    """Whether one (enabled) matcher entry (policy/notifications_cfg.Entry) takes the event."""
    combine = all if matcher.get('mode', 'all') == 'all' else any
    kinds = [matcher.get(key) for key in _DIRECTIVES]
    if not any(kinds):
        return True
    result = combine(combine(_directive_matches(key, directive, severity, fields, when, tz)
                             for directive in directives)
                     for key, directives in zip(_DIRECTIVES, kinds) if directives)
    return result != bool(matcher.get('invert-match'))


def matched_targets(matchers: Iterable, severity: str, fields: Mapping[str, str],
                    when: TimeValue, tz: TimeZoneArg = None) -> List[str]:
    """The names of the targets to notify, each once, in the order the matchers name them."""
    names: List[str] = []
    for matcher in matchers:
        if matcher.disabled or not matcher_matches(matcher, severity, fields, when, tz):
            continue
        names += [name for name in matcher.get('target', []) if name not in names]
    return names
