"""The node's guest registry: which guests (QEMU VMs, LXC containers) a node has and how to reach
them.

Plain QEMU has no inventory of its own, so each guest is declared in
``<config_dir>/guests.d/<vmid>.conf`` with ``key: value`` lines, like a Proxmox guest config::

    name: mail
    qmp: /run/qemu/105.qmp
    agent: /run/qemu/105.qga
    pool: production
    tags: mail;critical
    exclude: virtio1
    start: systemctl start qemu@105
    description: Mail server.
    description: Its scratch disk virtio1 is not backed up.

``type`` names the guest's kind (guest/kind.py): ``qemu``, the default, needs ``qmp``. An LXC
container is ``type: lxc`` with its container's name and, when it is not /var/lib/lxc, the
directory holding it; volumes to back up with the rootfs are Proxmox VE's ``mpN`` lines (only
those with ``backup=1`` are captured)::

    type: lxc
    lxc: web
    lxcpath: /srv/lxc
    mp0: /srv/web-data,mp=/var/www,backup=1

``description`` may be given on several lines, which form the lines of a multi-line
description. :func:`render_guest` writes what :func:`load_guest` reads back.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ..config.files import read_text
from ..errors import ConfigError, GuestNotFound
from ..vocabulary import GUEST_TYPES

GUESTS_DIR = "guests.d"
VMID_MIN = 100
VMID_MAX = 999999999

_FILE_RE = re.compile(r"^([0-9]+)\.conf$")
_LINE_RE = re.compile(r"^([^\s:]+):\s*(.*)$")
# Proxmox's tag and pool id rules; QEMU's rule for device ids.
_TAG_RE = re.compile(r"^[a-z0-9_][a-z0-9_\-+.]*$", re.IGNORECASE)
_POOL_RE = re.compile(r"^[A-Za-z0-9.\-_]+$")
_DISK_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.\-]*$")
# PVE's mount point keys (mp0..mp255); an LXC container name: one path component.
_MP_KEY_RE = re.compile(r"^mp([0-9]|[1-9][0-9]|1[0-9][0-9]|2[0-4][0-9]|25[0-5])$")
_LXC_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")

KEYS = ("name", "qmp", "agent", "pool", "tags", "include", "exclude", "start", "description",
        "type", "lxc", "lxcpath")
# Keys of one kind only (the other kind has no use for them, so they are refused there).
_QEMU_KEYS = ("qmp", "agent", "include", "exclude", "start")
_LXC_KEYS = ("lxc", "lxcpath")
TYPE_HELP = "qemu (a QEMU VM reached over QMP), lxc (an LXC container)"


@dataclass(frozen=True)
class MountPoint:
    """An ``mpN`` line, as Proxmox VE writes it: ``<host path>,mp=<path in the container>``,
    ``backup=1`` to back it up with the rootfs."""

    key: str            # mp0 ... mp255
    volume: str         # the host directory
    path: str           # where the container sees it
    backup: bool = False

    def render(self) -> str:
        return f"{self.volume},mp={self.path}" + (",backup=1" if self.backup else "")


@dataclass(frozen=True)
class GuestEntry:
    """One registered guest. ``source`` is the file it was read from and not part of equality."""

    vmid: int
    name: Optional[str] = None
    qmp_socket: str = ""
    agent_socket: Optional[str] = None
    pool: Optional[str] = None
    tags: Tuple[str, ...] = ()
    include: Tuple[str, ...] = ()
    exclude: Tuple[str, ...] = ()
    start_command: Optional[str] = None
    description: Optional[str] = None
    type: str = "qemu"             # the guest's kind (guest/kind.py)
    lxc: Optional[str] = None      # lxc: the container's name
    lxcpath: Optional[str] = None  # lxc: the directory holding it (None: /var/lib/lxc)
    mountpoints: Tuple[MountPoint, ...] = ()   # lxc: mpN volumes, in key order
    source: Optional[str] = field(default=None, compare=False)

    @property
    def included_volumes(self) -> Tuple[Tuple[str, str], ...]:
        """The volumes backed up with the rootfs: (path in the container, host path)."""
        return tuple((m.path, m.volume) for m in self.mountpoints if m.backup)


def validate_vmid(value: Any) -> int:
    """A vmid as an int in 100..999999999; accepts an int or its decimal spelling."""
    if isinstance(value, bool):
        vmid = None
    elif isinstance(value, int):
        vmid = value
    elif isinstance(value, str) and re.match(r"^[1-9][0-9]*$", value.strip()):
        vmid = int(value)
    else:
        vmid = None
    if vmid is None or not VMID_MIN <= vmid <= VMID_MAX:
        raise ConfigError(f"'{value}' is not a valid vmid; a vmid is a whole number from "
                          f"{VMID_MIN} to {VMID_MAX}")
    return vmid


def guest_path(config_dir: str, vmid: int) -> str:
    return os.path.join(config_dir, GUESTS_DIR, f"{vmid}.conf")


def _split(text: str, separators: str) -> Tuple[str, ...]:
    seen: List[str] = []
    for item in re.split(separators, text):
        if item and item not in seen:
            seen.append(item)
    return tuple(seen)


def _check_absolute(value: str, what: str) -> str:
    if not value.startswith("/"):
        raise ConfigError(f"{what}: '{value}' is not an absolute path; give its full path")
    return value


def _check_items(items: Tuple[str, ...], pattern: "re.Pattern[str]", what: str,
                 rule: str) -> Tuple[str, ...]:
    for item in items:
        if not pattern.match(item):
            raise ConfigError(f"{what}: '{item}' is not valid; {rule}")
    return items


def _container_path(value: str, what: str) -> str:
    # pve-container's verify_lxc_mp_string, and an absolute path
    if (not value.startswith("/") or re.search(r"/\.\.?(/|$)", value) or "," in value
            or "=" in value):
        raise ConfigError(f"{what}: '{value}' is not an absolute path without '.', '..', ',' "
                          f"or '='")
    return value


def parse_mountpoint(key: str, value: str, what: str) -> MountPoint:
    """An ``mpN`` line's value (``<host directory>,mp=<path in the container>[,backup=1]``)."""
    if not _MP_KEY_RE.match(key):
        raise ConfigError(f"{what}: '{key}' is not a mount point key (mp0 to mp255)")
    volume, *options = value.split(",")
    settings: Dict[str, str] = {}
    for option in options:
        name, sep, setting = option.partition("=")
        if not sep or name not in ("mp", "backup") or name in settings:
            raise ConfigError(f"{what}: '{option}' is not understood; write "
                              f"'<host directory>,mp=<path in the container>[,backup=1]'")
        settings[name] = setting
    if "mp" not in settings:
        raise ConfigError(f"{what}: no mp=<path in the container>; write "
                          f"'{volume},mp=/path/in/container,backup=1'")
    if settings.get("backup", "0") not in ("0", "1"):
        raise ConfigError(f"{what}: backup={settings['backup']} is not 0 or 1")
    return MountPoint(key, _container_path(volume, f"{what} host directory"),
                      _container_path(settings["mp"], f"{what} mp"),
                      settings.get("backup") == "1")


def _parse_value(key: str, value: str, what: str) -> Any:
    if key in ("qmp", "agent", "lxcpath"):
        return _check_absolute(value, what)
    if _MP_KEY_RE.match(key):
        return parse_mountpoint(key, value, what)
    if key == "lxc":
        if not _LXC_NAME_RE.match(value):
            raise ConfigError(f"{what}: '{value}' is not an LXC container name (letters, "
                              f"digits, '_', '.', '-'); list the containers with 'lxc-ls -f'")
        return value
    if key == "type":
        if value not in GUEST_TYPES:
            raise ConfigError(f"{what}: '{value}' is not a guest type guestvault knows; known "
                              f"types: {', '.join(GUEST_TYPES)}; {TYPE_HELP}")
        return value
    if key == "pool":
        if not _POOL_RE.match(value):
            raise ConfigError(f"{what}: '{value}' is not a valid pool name; use letters, "
                              f"digits, '.', '-' and '_'")
        return value
    if key == "tags":
        return _check_items(_split(value, r"[;,\s]+"), _TAG_RE, what,
                            "a tag starts with a letter, digit or '_' and contains only "
                            "letters, digits, '_', '-', '+' and '.'")
    if key in ("include", "exclude"):
        return _check_items(_split(value, r"\s*,\s*"), _DISK_RE, what,
                            "a disk id is a QEMU device id such as virtio0 or scsi1")
    return value


def _check_entry(fields: Dict[str, Any], where: str) -> None:
    if fields.get("type", "qemu") == "lxc":
        wrong = [key for key in _QEMU_KEYS if fields.get(key)]
        if wrong:
            raise ConfigError(f"{where}: {', '.join(wrong)} only apply to QEMU guests (type "
                              f"qemu), and this entry has type lxc; remove them")
        if not fields.get("lxc"):
            raise ConfigError(f"{where}: type lxc needs an 'lxc' line naming the container, "
                              f"e.g. 'lxc: web' for the container of "
                              f"'lxc-ls -f -P /var/lib/lxc'")
        return
    wrong = [key for key in fields if key in _LXC_KEYS or _MP_KEY_RE.match(key)]
    wrong = [key for key in wrong if fields[key]]
    if wrong:
        raise ConfigError(f"{where}: {', '.join(wrong)} only apply to LXC containers; add "
                          f"'type: lxc' or remove them")
    if not fields.get("qmp"):
        raise ConfigError(f"{where}: no 'qmp' line; add one naming the guest's QMP socket, "
                          f"e.g. 'qmp: /run/qemu/guest.qmp' for QEMU started with "
                          f"-qmp unix:/run/qemu/guest.qmp,server=on,wait=off")
    if fields.get("include") and fields.get("exclude"):
        raise ConfigError(f"{where}: sets both 'include' and 'exclude'; use include to list "
                          f"the disks to back up, or exclude to list the disks to skip")


def parse_guest(text: str, vmid: int, path: str) -> GuestEntry:
    """Parse the text of ``<vmid>.conf``; ``path`` is used in errors and kept as ``source``."""
    fields: Dict[str, Any] = {}
    description: List[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        where = f"{path} line {lineno}"
        match = _LINE_RE.match(stripped)
        if not match:
            raise ConfigError(f"{where}: cannot parse '{stripped}'; expected 'key: value'")
        key, value = match.group(1), match.group(2).strip()
        if key not in KEYS and not _MP_KEY_RE.match(key):
            raise ConfigError(f"{where}: unknown key '{key}'; known keys: {', '.join(KEYS)}, "
                              f"mp0 to mp255")
        if key == "description":
            description.append(value)
            continue
        if key in fields:
            raise ConfigError(f"{where}: '{key}' is set a second time; keep one line")
        if not value:
            raise ConfigError(f"{where}: '{key}' has no value; give one or remove the line")
        fields[key] = _parse_value(key, value, f"{where}: {key}")
    _check_entry(fields, path)
    return GuestEntry(
        vmid=vmid,
        name=fields.get("name"),
        qmp_socket=fields.get("qmp", ""),
        agent_socket=fields.get("agent"),
        pool=fields.get("pool"),
        tags=fields.get("tags", ()),
        include=fields.get("include", ()),
        exclude=fields.get("exclude", ()),
        start_command=fields.get("start"),
        description="\n".join(description) if description else None,
        type=fields.get("type", "qemu"),
        lxc=fields.get("lxc"),
        lxcpath=fields.get("lxcpath"),
        mountpoints=tuple(sorted((v for k, v in fields.items() if _MP_KEY_RE.match(k)),
                                 key=lambda m: int(m.key[2:]))),
        source=path,
    )


def _known_vmids(config_dir: str) -> List[int]:
    try:
        names = os.listdir(os.path.join(config_dir, GUESTS_DIR))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise ConfigError(f"cannot list {os.path.join(config_dir, GUESTS_DIR)}: "
                          f"{err.strerror}") from None
    vmids = []
    for file_name in names:
        match = _FILE_RE.match(file_name)
        if match:
            try:
                vmids.append(validate_vmid(match.group(1)))
            except ConfigError:
                raise ConfigError(
                    f"{os.path.join(config_dir, GUESTS_DIR, file_name)}: '{match.group(1)}' is "
                    f"not a valid vmid (a whole number from {VMID_MIN} to {VMID_MAX}, no leading "
                    f"zeros); rename the file") from None
    return sorted(vmids)


def load_guest(config_dir: str, vmid: Any) -> GuestEntry:
    """The registry entry of ``vmid``; :class:`GuestNotFound` when the node has no such guest."""
    vmid = validate_vmid(vmid)
    path = guest_path(config_dir, vmid)
    text = read_text(path)
    if text is None:
        known = ", ".join(str(v) for v in _known_vmids(config_dir)) or "none"
        raise GuestNotFound(
            f"guest {vmid} is not registered on this node (no {path}); registered guests: "
            f"{known}. To register it, create {path} with at least a line "
            f"'qmp: /path/to/its/qmp.sock' (a VM), or 'type: lxc' and 'lxc: <container name>' "
            f"(a container)")
    return parse_guest(text, vmid, path)


def list_guests(config_dir: str) -> List[GuestEntry]:
    """Every registered guest, sorted by vmid; files not named ``<digits>.conf`` are ignored."""
    return [load_guest(config_dir, vmid) for vmid in _known_vmids(config_dir)]


def render_guest(entry: GuestEntry) -> str:
    """The text of ``entry``'s ``<vmid>.conf``; refuses values that would not read back the same."""
    where = f"guest {entry.vmid}"
    validate_vmid(entry.vmid)
    lines: List[str] = []

    def add(key: str, value: Optional[str]) -> None:
        if value is None:
            return
        if "\n" in value or "\r" in value or value != value.strip() or not value:
            raise ConfigError(f"{where}: {key} {value!r} cannot be written on one line; remove "
                              f"line breaks and surrounding spaces")
        _parse_value(key, value, f"{where}: {key}")
        lines.append(f"{key}: {value}")

    def add_list(key: str, items: Tuple[str, ...], separator: str) -> None:
        if items:
            text = separator.join(items)
            if _split(text, r"[;,\s]+" if key == "tags" else r"\s*,\s*") != tuple(items):
                raise ConfigError(f"{where}: {key} {list(items)!r} contains separators, "
                                  f"duplicates or empty items")
            add(key, text)

    _check_entry({"qmp": entry.qmp_socket, "agent": entry.agent_socket,
                  "include": entry.include, "exclude": entry.exclude,
                  "start": entry.start_command, "type": entry.type, "lxc": entry.lxc,
                  "lxcpath": entry.lxcpath, **{m.key: m for m in entry.mountpoints}}, where)
    add("name", entry.name)
    add("qmp", entry.qmp_socket or None)
    add("agent", entry.agent_socket)
    add("pool", entry.pool)
    add_list("tags", entry.tags, ";")
    add_list("include", entry.include, ",")
    add_list("exclude", entry.exclude, ",")
    add("start", entry.start_command)
    if entry.type != "qemu":
        add("type", entry.type)        # the default is not written: files read back the same
    add("lxc", entry.lxc)
    add("lxcpath", entry.lxcpath)
    keys = [m.key for m in entry.mountpoints]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"{where}: mount point keys {keys} repeat one; number them "
                          f"mp0, mp1, ...")
    for mountpoint in entry.mountpoints:
        if not _MP_KEY_RE.match(mountpoint.key):
            raise ConfigError(f"{where}: '{mountpoint.key}' is not a mount point key (mp0 to "
                              f"mp255)")
        add(mountpoint.key, mountpoint.render())
    if entry.description is not None:
        for line in entry.description.split("\n"):
            if "\r" in line or line != line.strip():
                raise ConfigError(f"{where}: description line {line!r} has surrounding spaces "
                                  f"or a carriage return, which would not read back the same")
            lines.append(f"description: {line}".rstrip())
    return "\n".join(lines) + "\n"
