r"""Backup notes from a template, with the semantics of Proxmox vzdump's ``notes-template``.

A template is one line (it lives in vzdump.conf or jobs.cfg). ``{{cluster}}``, ``{{guestname}}``,
``{{node}}`` and ``{{vmid}}`` are replaced by their values; ``\n`` becomes a newline and ``\\`` a
backslash. As in PVE::VZDump, escapes are expanded first, only the exact spelling ``{{name}}`` is a
variable (``{{ vmid }}`` with spaces stays text), and any other ``{{word}}`` is an error, so a typo
fails the configuration instead of showing up in every backup's notes.

Example::

    >>> render_notes(r"{{guestname}} ({{vmid}})\nnightly", {"guestname": "mail", "vmid": 105})
    'mail (105)\nnightly'
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from ..errors import NotesTemplateError

NOTES_VARIABLES = ("cluster", "guestname", "node", "vmid")
# Proxmox's schema limit for notes-template.
MAX_TEMPLATE_LENGTH = 1024

_ESCAPE_RE = re.compile(r"\\(.)")
_KNOWN_RE = re.compile(r"\{\{(" + "|".join(NOTES_VARIABLES) + r")\}\}")
# What Proxmox treats as an attempted variable: no whitespace, no closing brace inside.
_ANY_VARIABLE_RE = re.compile(r"\{\{([^\s}]+)\}\}")


def _prefix(what: Optional[str]) -> str:
    return f"{what}: " if what else "notes template: "


def _unescape(template: str, what: Optional[str]) -> str:
    def replace(match: "re.Match[str]") -> str:
        char = match.group(1)
        if char == "n":
            return "\n"
        if char == "\\":
            return "\\"
        raise NotesTemplateError(
            f"{_prefix(what)}unexpected escape '\\{char}'; only '\\n' (newline) and '\\\\' "
            f"(backslash) are escapes, so write '\\\\' for a literal backslash")
    return _ESCAPE_RE.sub(replace, template)


def render_notes(template: str, variables: Mapping[str, Any], what: Optional[str] = None) -> str:
    """Expand ``template`` with ``variables`` (a subset of :data:`NOTES_VARIABLES`).

    A variable the caller has no value for (``None`` or absent, e.g. ``cluster`` on a node outside
    a cluster) becomes an empty string, as in Proxmox. ``what`` prefixes error messages (e.g. the
    file and line the template came from). Values are inserted verbatim and never re-scanned.
    """
    stray = sorted(set(variables) - set(NOTES_VARIABLES))
    if stray:
        raise ValueError(f"render_notes got values for unknown variables {stray}; "
                         f"known: {NOTES_VARIABLES}")
    if len(template) > MAX_TEMPLATE_LENGTH:
        raise NotesTemplateError(f"{_prefix(what)}is {len(template)} characters long; the limit "
                                 f"is {MAX_TEMPLATE_LENGTH}")
    if "\n" in template or "\r" in template:
        raise NotesTemplateError(f"{_prefix(what)}must be a single line; write '\\n' where the "
                                 f"notes should have a line break")
    text = _unescape(template, what)
    # Split around the known variables so that a value is never mistaken for a variable.
    pieces = _KNOWN_RE.split(text)
    for literal in pieces[0::2]:
        unknown = _ANY_VARIABLE_RE.search(literal)
        if unknown:
            known = ", ".join("{{%s}}" % name for name in NOTES_VARIABLES)
            raise NotesTemplateError(f"{_prefix(what)}unknown variable '{{{{{unknown.group(1)}}}}}'"
                                     f"; known variables: {known}")
    for index in range(1, len(pieces), 2):
        value = variables.get(pieces[index])
        pieces[index] = "" if value is None else str(value)
    return "".join(pieces)


def check_notes_template(template: str, what: Optional[str] = None) -> None:
    """Raise :class:`NotesTemplateError` now if ``template`` could not be rendered later."""
    render_notes(template, {}, what)
