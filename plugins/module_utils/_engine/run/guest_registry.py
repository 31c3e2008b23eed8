"""Declare registry entries: make ``<config_dir>/guests.d/<vmid>.conf`` say what the user declared.

The text is produced by :func:`registry.render_guest` and read back with
:func:`registry.parse_guest` before anything is written, so a file this module writes always
loads. Writes are atomic (temporary file, fsync, rename); a second run with the same declaration
changes nothing. An entry is compared by its parsed content, so a hand-written file with the same
meaning (comments, other spacing) is left alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from ..config.files import declare_file, read_text
from ..errors import ConfigError, GuestvaultError
from ..guest.registry import (GuestEntry, guest_path, parse_guest, parse_mountpoint,
                              render_guest, validate_vmid)
from ..paths import CONFIG_DIR
from .request import Request

# Module option -> GuestEntry field.
ENTRY_FIELDS = {
    'name': 'name', 'qmp': 'qmp_socket', 'agent': 'agent_socket', 'pool': 'pool',
    'tags': 'tags', 'include': 'include', 'exclude': 'exclude', 'start': 'start_command',
    'description': 'description', 'type': 'type', 'lxc': 'lxc', 'lxcpath': 'lxcpath',
    'mountpoints': 'mountpoints',
}


@dataclass
class GuestRegistryRequest(Request):
    """The guest_registry module's options: an entry's keys, as ENTRY_FIELDS names them."""
    vmid: int
    state: str = 'present'
    name: str = None
    qmp: str = None
    agent: str = None
    pool: str = None
    tags: Tuple[str, ...] = None
    include: Tuple[str, ...] = None
    exclude: Tuple[str, ...] = None
    start: str = None
    description: str = None
    type: str = None
    lxc: str = None
    lxcpath: str = None
    mountpoints: Dict[str, str] = None
    config_dir: str = CONFIG_DIR
    check_mode: bool = False


def run_guest_registry(request: GuestRegistryRequest) -> Dict[str, Any]:
    """Make the guest's registry entry exist as declared, or not at all (see apply_guest)."""
    return apply_guest(request.vmid, {key: getattr(request, key) for key in ENTRY_FIELDS},
                       request.state, request.config_dir, request.check_mode)


def entry_from_options(vmid: Any, options: Dict[str, Any]) -> GuestEntry:
    """A :class:`GuestEntry` from module options (``qmp``, ``tags`` as a list, ...), checked."""
    vmid = validate_vmid(vmid)
    values: Dict[str, Any] = {}
    for option, value in options.items():
        if option not in ENTRY_FIELDS:
            raise ConfigError(f"guest {vmid}: unknown option '{option}'; known: "
                              f"{', '.join(ENTRY_FIELDS)}")
        if value is None:
            continue
        if option in ('tags', 'include', 'exclude'):
            items = [value] if isinstance(value, str) else list(value)
            values[ENTRY_FIELDS[option]] = tuple(str(item).strip() for item in items)
        elif option == 'mountpoints':
            points = [parse_mountpoint(str(key), str(text), f"guest {vmid}: mountpoints {key}")
                      for key, text in dict(value).items()]
            values['mountpoints'] = tuple(sorted(points, key=lambda m: int(m.key[2:])))
        else:
            values[ENTRY_FIELDS[option]] = str(value)
    if 'description' in values:
        # A trailing newline from a YAML block scalar (|) is not a description line.
        values['description'] = values['description'].rstrip('\n')
    return GuestEntry(vmid=vmid, **values)


def _current(path: str, vmid: int) -> Optional[GuestEntry]:
    """The entry in ``path`` or None; an unreadable entry counts as different (it is replaced)."""
    text = read_text(path)
    if text is None:
        return None
    try:
        return parse_guest(text, vmid, path)
    except GuestvaultError:
        return None


def entry_as_dict(entry: Optional[GuestEntry]) -> Dict[str, Any]:
    """An entry as module options (what the module returns as ``entry``); {} for none."""
    if entry is None:
        return {}
    result: Dict[str, Any] = {'vmid': entry.vmid}
    for option, attribute in ENTRY_FIELDS.items():
        value = getattr(entry, attribute)
        if option == 'mountpoints':
            value = {m.key: m.render() for m in value}
        elif isinstance(value, tuple):
            value = list(value)
        result[option] = value
    return result


def apply_guest(vmid: Any, options: Optional[Dict[str, Any]] = None, state: str = 'present',
                config_dir: str = CONFIG_DIR, check_mode: bool = False) -> Dict[str, Any]:
    """Make guest ``vmid``'s registry entry exist as declared, or not at all; idempotent.

    Returns ``{'changed', 'path', 'entry', 'diff': {'before', 'after'}}``; everything is
    validated before anything is written, and nothing is written in check mode.
    """
    vmid = validate_vmid(vmid)
    path = guest_path(config_dir, vmid)
    before_text = read_text(path) or ''
    if state == 'absent':
        after_text, entry = '', None
        changed = os.path.lexists(path)
    elif state == 'present':
        entry = entry_from_options(vmid, options or {})
        after_text = render_guest(entry)
        # The rendered text must load back as the same entry before it replaces anything.
        if parse_guest(after_text, vmid, path) != entry:
            raise ConfigError(f"guest {vmid}: the entry would not read back as declared; "
                              f"check name, description and start for unusual characters")
        changed = _current(path, vmid) != entry
    else:
        raise ConfigError(f"state '{state}' is not one of present, absent")
    result = {'changed': changed, 'path': path, 'entry': entry_as_dict(entry),
              'diff': {'before': before_text, 'after': after_text if changed else before_text,
                       'before_header': path, 'after_header': path}}
    if not changed or check_mode:
        return result
    declare_file(path, after_text if state == 'present' else None, dir_mode=0o755)
    return result
