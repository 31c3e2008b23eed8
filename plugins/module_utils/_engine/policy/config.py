"""The node's configuration files, in Proxmox VE's syntax so that vzdump users feel at home.

- ``vzdump.conf``: backup defaults, ``key: value`` lines (``prune-backups: keep-last=3``).
- ``storage.cfg``: storages in Proxmox section-config syntax (``dir: <id>`` + indented options);
  ``datastore: <id>`` is a Proxmox Backup Server datastore (a chunk store) at ``path``, on that
  file system or, with ``backend type=s3,client=<endpoint>,bucket=<name>``, in an S3 bucket with
  ``path`` as its local cache; ``s3-endpoint: <id>`` sections name the S3 endpoints (as PBS 4's
  s3.cfg does).
- ``jobs.cfg`` (issue #4) reuses the section-config reader below.

Everything here is parsing and validation on plain text; reading files is confined to the two
``load_*`` functions so the rest can be tested on strings. Every error names the file, the line
and the key, and says what would be accepted, because the user fixes these files by hand.

Example::

    >>> parse_property_string("keep-last=3,keep-daily=13", PRUNE_BACKUPS_SCHEMA, "prune-backups")
    {'keep-last': 3, 'keep-daily': 13}
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

from ..config.files import read_text
from ..errors import ConfigError
from ..vocabulary import COMPRESS, MODES
from .notes import check_notes_template

VZDUMP_CONF = "vzdump.conf"
STORAGE_CFG = "storage.cfg"


# --------------------------------------------------------------------------- property strings

@dataclass(frozen=True)
class Prop:
    """One key of a property string: its type (int, bool or str) and, for ints, its range.

    ``default_key`` marks the key a bare value stands for, as in Proxmox (``fleecing: 1`` means
    ``fleecing: enabled=1``).
    """

    kind: type
    minimum: Optional[int] = None
    maximum: Optional[int] = None
    default_key: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            return "a boolean (1/0, yes/no, true/false, on/off)"
        if self.kind is int:
            if self.minimum is not None and self.maximum is not None:
                return f"an integer from {self.minimum} to {self.maximum}"
            if self.minimum is not None:
                return f"an integer >= {self.minimum}"
            return "an integer"
        return "a string"


SchemaEntry = Union[type, Prop]

_KEEP = Prop(int, minimum=0)
PRUNE_BACKUPS_SCHEMA: Dict[str, SchemaEntry] = {
    "keep-all": Prop(bool),
    "keep-last": _KEEP,
    "keep-hourly": _KEEP,
    "keep-daily": _KEEP,
    "keep-weekly": _KEEP,
    "keep-monthly": _KEEP,
    "keep-yearly": _KEEP,
}
PERFORMANCE_SCHEMA: Dict[str, SchemaEntry] = {
    "max-workers": Prop(int, minimum=1, maximum=256),
    "pbs-entries-max": Prop(int, minimum=1),
}
FLEECING_SCHEMA: Dict[str, SchemaEntry] = {
    "enabled": Prop(bool, default_key=True),
    "storage": Prop(str),
}

_TRUE = ("1", "yes", "true", "on")
_FALSE = ("0", "no", "false", "off")
_INT_RE = re.compile(r"^[+-]?[0-9]+$")
_STORAGE_ID_RE = re.compile(r"^[a-z][a-z0-9\-_.]*[a-z0-9]$", re.IGNORECASE)


def parse_bool(text: str, what: str) -> bool:
    """Proxmox's boolean spellings, case-insensitive."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{what}: '{text}' is not a boolean; use 1/0, yes/no, true/false or on/off")


def parse_int(text: str, what: str, minimum: Optional[int] = None,
              maximum: Optional[int] = None) -> int:
    if not _INT_RE.match(text.strip()):
        raise ConfigError(f"{what}: '{text}' is not an integer")
    value = int(text)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{what}: {value} is too small, the minimum is {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{what}: {value} is too large, the maximum is {maximum}")
    return value


def _as_prop(entry: SchemaEntry) -> Prop:
    return entry if isinstance(entry, Prop) else Prop(entry)


def _convert(text: str, prop: Prop, what: str) -> Any:
    if prop.kind is bool:
        return parse_bool(text, what)
    if prop.kind is int:
        return parse_int(text, what, prop.minimum, prop.maximum)
    return text


def parse_property_string(text: str, schema: Mapping[str, SchemaEntry], what: str) -> Dict[str, Any]:
    """Parse ``key=value,key=value`` into a dict typed by ``schema``.

    ``schema`` maps each allowed key to ``int``, ``bool``, ``str`` or a :class:`Prop` (ranges,
    default key). ``what`` names the option in errors (e.g. ``"vzdump.conf line 3: prune-backups"``).
    Empty pieces are skipped, as Proxmox does; unknown or repeated keys are errors.
    """
    props = {key: _as_prop(entry) for key, entry in schema.items()}
    allowed = ", ".join(sorted(props))
    default_key = next((key for key, prop in props.items() if prop.default_key), None)
    result: Dict[str, Any] = {}
    for piece in text.split(","):
        piece = piece.strip()
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        key, value = key.strip(), value.strip()
        if not sep:
            if default_key is None:
                raise ConfigError(f"{what}: '{piece}' is not of the form key=value; "
                                  f"allowed keys: {allowed}")
            key, value = default_key, piece
        if key not in props:
            raise ConfigError(f"{what}: unknown key '{key}'; allowed keys: {allowed}")
        if key in result:
            raise ConfigError(f"{what}: key '{key}' is given twice")
        if not value:
            raise ConfigError(f"{what}: key '{key}' has no value; it takes {props[key].describe()}")
        result[key] = _convert(value, props[key], f"{what}: {key}")
    return result


def parse_prune_backups(text: str, what: str) -> Dict[str, Any]:
    """A retention policy, normalised the way Proxmox does it.

    Zero counts are dropped; when no positive count is left the policy is ``{'keep-all': True}``;
    ``keep-all=1`` together with a positive count is a contradiction and an error.
    """
    raw = parse_property_string(text, PRUNE_BACKUPS_SCHEMA, what)
    keep_all = raw.pop("keep-all", False)
    counts = {key: value for key, value in raw.items() if value > 0}
    if not counts:
        return {"keep-all": True}
    if keep_all:
        raise ConfigError(f"{what}: keep-all=1 cannot be combined with "
                          f"{', '.join(sorted(counts))}; remove one or the other")
    return counts


def check_storage_id(storage_id: str, what: str) -> str:
    """Proxmox's storage id rule: a letter first, then letters, digits, '-', '_', '.'."""
    if not _STORAGE_ID_RE.match(storage_id):
        raise ConfigError(
            f"{what}: '{storage_id}' is not a valid storage id; it must start with a letter, "
            f"end with a letter or digit, and contain only letters, digits, '-', '_' and '.'")
    return storage_id


def _absolute_path(text: str, what: str) -> str:
    if not text.startswith("/"):
        raise ConfigError(f"{what}: '{text}' is a relative path; give an absolute path")
    return text


def split_list(text: str) -> List[str]:
    """Proxmox's split_list: items separated by commas, semicolons or whitespace."""
    return [item for item in re.split(r"[\s,;]+", text) if item]


# --------------------------------------------------------------------------- vzdump.conf

def _enum(*choices: str) -> Callable[[str, str], str]:
    def check(text: str, what: str) -> str:
        if text not in choices:
            raise ConfigError(f"{what}: '{text}' is not allowed; use one of {', '.join(choices)}")
        return text
    return check


def _int_option(minimum: Optional[int] = None, maximum: Optional[int] = None):
    return lambda text, what: parse_int(text, what, minimum, maximum)


def _notes_template(text: str, what: str) -> str:
    check_notes_template(text, what)
    return text


def _exclude_paths(text: str, what: str) -> List[str]:
    try:
        return shlex.split(text)
    except ValueError as err:
        raise ConfigError(f"{what}: cannot split '{text}' into paths ({err}); "
                          f"check the quotes") from None


# key -> converter(text, what). A converter raises ConfigError whose message starts with `what`.
VZDUMP_OPTIONS: Dict[str, Callable[[str, str], Any]] = {
    "bwlimit": _int_option(0),
    "compress": _enum(*COMPRESS),
    "dumpdir": _absolute_path,
    "exclude-path": _exclude_paths,
    "fleecing": lambda text, what: parse_property_string(text, FLEECING_SCHEMA, what),
    "ionice": _int_option(0, 8),
    "lockwait": _int_option(0),
    "mailto": lambda text, what: split_list(text),
    "mailnotification": _enum("always", "failure"),
    "mode": _enum(*MODES),
    "notes-template": _notes_template,
    "notification-mode": _enum("auto", "legacy-sendmail", "notification-system"),
    "performance": lambda text, what: parse_property_string(text, PERFORMANCE_SCHEMA, what),
    "pigz": _int_option(0),
    "protected": parse_bool,
    "prune-backups": parse_prune_backups,
    "remove": parse_bool,
    "script": _absolute_path,
    "stdexcludes": parse_bool,
    "stopwait": _int_option(0),
    "storage": check_storage_id,
    "tmpdir": _absolute_path,
    "zstd": _int_option(0),
}
# vzdump options that are read (so vzdump.conf files from Proxmox load) but do nothing yet; a
# user who sets one must not believe it acts, so each run names them once.
INERT_OPTIONS = ("fleecing", "ionice", "remove")
INERT_PROPERTIES = {"performance": ("pbs-entries-max",)}
# vzdump options of container backups only (a VM's backup has no file tree to exclude from,
# tar to compress or copy to make); a VM's run names them, as vzdump ignores them there.
CONTAINER_OPTIONS = ("exclude-path", "pigz", "stdexcludes", "tmpdir", "zstd")


def inert_option_warning(options: Mapping[str, Any], source: str,
                         guest_type: Optional[str] = None) -> Optional[str]:
    """A warning naming the options in ``options`` that guestvault accepts but ignores, or None.
    ``guest_type`` ``'qemu'`` also names the container-only options set; None (a run of
    several guests) or ``'lxc'`` does not."""
    inert = [key for key in INERT_OPTIONS if key in options]
    for key, subkeys in INERT_PROPERTIES.items():
        inert += [f"{key} {sub}" for sub in subkeys if sub in (options.get(key) or {})]
    container_only = [key for key in CONTAINER_OPTIONS if key in options] \
        if guest_type == 'qemu' else []
    parts = []
    if inert:
        parts.append(f"{source} sets {', '.join(inert)}, which guestvault reads but does not "
                     "act on yet; they have no effect (remove them to silence this warning)")
    if container_only:
        parts.append(f"{source} sets {', '.join(container_only)}, which apply to container "
                     "backups only; they have no effect on this VM's backup")
    return '; '.join(parts) or None


# Keys that may appear on several lines; their values are concatenated into one list.
_REPEATABLE = frozenset({"exclude-path", "mailto"})
_KEY_VALUE_RE = re.compile(r"^([^\s:]+):\s*(.*)$")


def _key_value_lines(text: str, path: str) -> Iterator[Tuple[int, str, str]]:
    """Yield (line number, key, value) of a ``key: value`` file; skip blanks and ``#`` comments."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _KEY_VALUE_RE.match(stripped)
        if not match:
            raise ConfigError(f"{path} line {lineno}: cannot parse '{stripped}'; "
                              f"expected 'key: value'")
        yield lineno, match.group(1), match.group(2).strip()


def parse_vzdump_conf(text: str, path: str) -> Dict[str, Any]:
    """Parse vzdump.conf into typed values; absent keys are absent (defaults live with the caller).

    Property strings become dicts (``prune-backups`` normalised by :func:`parse_prune_backups`),
    ``mailto`` a list of addresses, ``exclude-path`` a list of shell-split globs over all its lines.
    """
    allowed = ", ".join(sorted(VZDUMP_OPTIONS))
    result: Dict[str, Any] = {}
    for lineno, key, value in _key_value_lines(text, path):
        where = f"{path} line {lineno}"
        if key not in VZDUMP_OPTIONS:
            raise ConfigError(f"{where}: unknown option '{key}'; known options: {allowed}")
        if not value:
            raise ConfigError(f"{where}: option '{key}' has no value")
        if key in result and key not in _REPEATABLE:
            raise ConfigError(f"{where}: option '{key}' is set a second time; keep one line")
        parsed = VZDUMP_OPTIONS[key](value, f"{where}: {key}")
        if key in _REPEATABLE:
            result.setdefault(key, []).extend(parsed)
        else:
            result[key] = parsed
    return result


def load_vzdump_defaults(config_dir: str) -> Dict[str, Any]:
    """``<config_dir>/vzdump.conf`` parsed, or ``{}`` when the node has none (it is optional)."""
    path = os.path.join(config_dir, VZDUMP_CONF)
    text = read_text(path)
    if text is None:
        return {}
    return parse_vzdump_conf(text, path)


# --------------------------------------------------------------------------- section config

@dataclass
class Section:
    """One ``type: id`` block of a Proxmox section-config file, options still as text."""

    type: str
    id: str
    line: int
    options: List[Tuple[int, str, Optional[str]]] = field(default_factory=list)


_HEADER_RE = re.compile(r"^(\S+):\s*(\S+)\s*$")
_OPTION_RE = re.compile(r"^\s+(\S+)(?:\s+(.*\S))?\s*$")


def parse_sections(text: str, path: str) -> List[Section]:
    """Split a section-config file (storage.cfg, jobs.cfg) into sections.

    A section is a header ``type: id`` at the start of a line followed by indented ``key value``
    lines; it ends at a blank line or at the next header. ``#`` lines are comments anywhere.
    A key without a value gets ``None`` (Proxmox writes flags such as ``disable`` bare).
    """
    sections: List[Section] = []
    current: Optional[Section] = None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.lstrip().startswith("#"):
            continue
        if not line.strip():
            current = None
            continue
        if line[0] in " \t":
            if current is None:
                raise ConfigError(
                    f"{path} line {lineno}: indented option '{line.strip()}' is outside a "
                    f"section; put it directly under its 'type: id' header, with no blank line "
                    f"in between")
            match = _OPTION_RE.match(line)
            # _OPTION_RE matches every indented, non-blank line.
            current.options.append((lineno, match.group(1), match.group(2)))
            continue
        match = _HEADER_RE.match(line)
        if not match:
            raise ConfigError(f"{path} line {lineno}: cannot parse '{line.strip()}'; expected a "
                              f"section header 'type: id' or an indented 'key value' option")
        current = Section(type=match.group(1).lower(), id=match.group(2), line=lineno)
        sections.append(current)
    return sections


# --------------------------------------------------------------------------- storage.cfg

CONTENT_TYPES = ("backup", "images", "import", "iso", "none", "rootdir", "snippets", "vztmpl")
_COMMON_STORAGE_KEYS = frozenset({
    "path", "content", "prune-backups", "max-protected-backups", "shared", "disable", "nodes",
    "bwlimit", "content-dirs", "create-base-path", "create-subdirs", "format", "is_mountpoint",
    "maxfiles", "mkdir", "preallocation",
})
# A datastore holds Proxmox Backup Server's chunk store, not a Proxmox VE directory, so it
# takes only what means something for one: no content-dirs, format, mkdir, ... The key's
# passphrase is never written here, only the file that holds it.
_DATASTORE_KEYS = frozenset({
    "path", "content", "prune-backups", "max-protected-backups", "disable", "nodes",
    "encryption-key", "encryption-passphrase-file", "backend",
})
# An S3 endpoint is not a storage: datastores name it in their backend (PBS 4 keeps these in
# s3.cfg; here they sit in storage.cfg beside the datastores). The secret may be given inline,
# as PBS does, or, better, as a file only root can read.
_S3_ENDPOINT_KEYS = frozenset({
    "endpoint", "region", "access-key", "secret-key", "secret-key-file", "path-style", "port",
    "fingerprint", "ca-file",
})
STORAGE_TYPES: Dict[str, frozenset] = {
    "dir": _COMMON_STORAGE_KEYS,
    "nfs": _COMMON_STORAGE_KEYS | {"server", "export", "options"},
    "cifs": _COMMON_STORAGE_KEYS | {"server", "share", "username", "domain", "smbversion",
                                    "subdir", "options"},
    "datastore": _DATASTORE_KEYS,
    "s3-endpoint": _S3_ENDPOINT_KEYS,
}
# What a storage type holds: directories of qcow2 chains, or a PBS chunk store.
STORAGE_KINDS: Dict[str, str] = {"dir": "dir", "nfs": "dir", "cifs": "dir",
                                 "datastore": "datastore", "s3-endpoint": "s3-endpoint"}
# ``backend`` of a datastore, as PBS 4 writes it (``type=s3,client=<endpoint>,bucket=<name>``).
BACKEND_SCHEMA: Dict[str, SchemaEntry] = {
    "type": Prop(str, default_key=True),
    "client": Prop(str),
    "bucket": Prop(str),
}
BACKEND_TYPES = ("filesystem", "s3")
# S3's rules for bucket names (3-63 lower-case letters, digits, dots, hyphens).
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
# Proxmox treats network file systems as shared whatever the config says.
_SHARED_TYPES = frozenset({"nfs", "cifs"})
_BOOL_STORAGE_KEYS = frozenset({"shared", "disable", "create-base-path", "create-subdirs",
                                "mkdir", "path-style"})
DEFAULT_MAX_PROTECTED_BACKUPS = 5


@dataclass
class StorageConfig:
    """A storage from storage.cfg; ``options`` keeps every option as written, for later use.

    ``prune_backups`` is ``None`` when the storage sets no retention, so the caller can fall back
    to vzdump.conf. ``max_protected_backups`` is -1 for unlimited. ``type`` is the section's
    type as written (``dir``, ``nfs``, ``cifs``, ``datastore``); :attr:`kind` says what it holds.
    ``encryption_key`` (a PBS key file) and ``encryption_passphrase_file`` (the passphrase of a
    scrypt key, first line) are set only on a datastore.
    """

    id: str
    type: str
    path: str
    content: List[str] = field(default_factory=lambda: ["backup"])
    prune_backups: Optional[Dict[str, Any]] = None
    max_protected_backups: int = DEFAULT_MAX_PROTECTED_BACKUPS
    shared: bool = False
    disable: bool = False
    nodes: List[str] = field(default_factory=list)
    encryption_key: Optional[str] = None
    encryption_passphrase_file: Optional[str] = None
    backend: Optional[Dict[str, Any]] = None
    options: Dict[str, Optional[str]] = field(default_factory=dict)
    source: Optional[str] = field(default=None, compare=False)
    line: Optional[int] = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        """``dir`` (a directory of qcow2 chains: dir, nfs, cifs), ``datastore`` (PBS's format)
        or ``s3-endpoint`` (not a storage: what an S3 datastore's backend names)."""
        return STORAGE_KINDS.get(self.type, "dir")

    @property
    def s3_backend(self) -> Optional[Dict[str, Any]]:
        """``{'client': endpoint id, 'bucket': name}`` of a datastore on S3, else None."""
        if self.backend and self.backend.get("type") == "s3":
            return self.backend
        return None


def _parse_content(text: str, what: str) -> List[str]:
    items = [item for item in text.split(",") if item.strip()]
    items = [item.strip() for item in items]
    unknown = [item for item in items if item not in CONTENT_TYPES]
    if unknown:
        raise ConfigError(f"{what}: unknown content type '{unknown[0]}'; "
                          f"known types: {', '.join(CONTENT_TYPES)}")
    if "none" in items and len(items) > 1:
        raise ConfigError(f"{what}: 'none' cannot be combined with other content types")
    return items


def _storage_from_section(section: Section, path: str) -> StorageConfig:
    header = f"{path} line {section.line}"
    allowed_keys = STORAGE_TYPES.get(section.type)
    if allowed_keys is None:
        raise ConfigError(f"{header}: storage type '{section.type}' is not supported; "
                          f"use one of {', '.join(STORAGE_TYPES)}")
    check_storage_id(section.id, header)
    seen: Dict[str, Optional[str]] = {}
    storage = StorageConfig(id=section.id, type=section.type, path="", source=path,
                            line=section.line, shared=section.type in _SHARED_TYPES)
    for lineno, key, value in section.options:
        what = f"{path} line {lineno}: {key}"
        if key not in allowed_keys:
            raise ConfigError(f"{path} line {lineno}: unknown option '{key}' for a "
                              f"{section.type} storage; known options: "
                              f"{', '.join(sorted(allowed_keys))}")
        if key in seen:
            raise ConfigError(f"{path} line {lineno}: option '{key}' is set a second time in "
                              f"storage '{section.id}'; keep one line")
        seen[key] = value
        if value is None:
            if key not in _BOOL_STORAGE_KEYS:
                raise ConfigError(f"{what}: needs a value, as in '{key} <value>'")
            value = "1"
        if key == "path":
            storage.path = _absolute_path(value, what).rstrip("/") or "/"
        elif key == "content":
            storage.content = _parse_content(value, what)
        elif key == "prune-backups":
            storage.prune_backups = parse_prune_backups(value, what)
        elif key == "max-protected-backups":
            storage.max_protected_backups = parse_int(value, what, minimum=-1)
        elif key == "shared":
            storage.shared = parse_bool(value, what) or section.type in _SHARED_TYPES
        elif key == "disable":
            storage.disable = parse_bool(value, what)
        elif key == "nodes":
            storage.nodes = split_list(value)
        elif key == "encryption-key":
            storage.encryption_key = _file_path(value, what)
        elif key == "encryption-passphrase-file":
            storage.encryption_passphrase_file = _file_path(value, what)
        elif key == "backend":
            storage.backend = _parse_backend(value, what)
        elif key == "secret-key-file":
            _file_path(value, what)
        elif key == "ca-file":
            _existing_file(value, what)
        elif key == "endpoint":
            _check_endpoint(value, what)
        elif key == "fingerprint":
            _check_fingerprint(value, what)
        elif key == "port":
            parse_int(value, what, minimum=1, maximum=65535)
        elif key in _BOOL_STORAGE_KEYS:
            parse_bool(value, what)
    storage.options = seen
    if section.type == "s3-endpoint":
        _check_s3_endpoint(section, seen, header)
        return storage
    if not storage.path:
        raise ConfigError(f"{header}: {section.type} storage '{section.id}' has no path; add an "
                          f"indented line 'path /absolute/directory' under the header")
    if storage.encryption_passphrase_file and not storage.encryption_key:
        raise ConfigError(f"{header}: datastore '{section.id}' has an "
                          f"encryption-passphrase-file but no encryption-key; add "
                          f"'encryption-key /path/to/key.json' (the passphrase unlocks that key "
                          f"file), or remove the passphrase file line")
    return storage


def _parse_backend(text: str, what: str) -> Dict[str, Any]:
    backend = parse_property_string(text, BACKEND_SCHEMA, what)
    kind = backend.get("type", "filesystem")
    if kind not in BACKEND_TYPES:
        raise ConfigError(f"{what}: backend type '{kind}' is not supported; use "
                          f"{' or '.join(BACKEND_TYPES)}")
    backend["type"] = kind
    if kind == "s3":
        for needed in ("client", "bucket"):
            if not backend.get(needed):
                raise ConfigError(f"{what}: an s3 backend needs {needed}=..., as in "
                                  "'backend type=s3,client=<s3-endpoint id>,bucket=<bucket>'")
        if not _BUCKET_RE.match(backend["bucket"]) or ".." in backend["bucket"]:
            raise ConfigError(f"{what}: '{backend['bucket']}' is not a valid S3 bucket name "
                              "(3-63 lower-case letters, digits, dots and hyphens)")
    elif set(backend) - {"type"}:
        raise ConfigError(f"{what}: client and bucket are only for 'type=s3'")
    return backend


def _check_s3_endpoint(section: Section, seen: Mapping[str, Optional[str]], header: str) -> None:
    missing = [key for key in ("endpoint", "access-key") if not seen.get(key)]
    if missing:
        raise ConfigError(f"{header}: s3-endpoint '{section.id}' has no {missing[0]}; add an "
                          f"indented line '{missing[0]} <value>' under the header")
    if bool(seen.get("secret-key")) == bool(seen.get("secret-key-file")):
        raise ConfigError(f"{header}: s3-endpoint '{section.id}' needs exactly one of "
                          "secret-key and secret-key-file (a file only root can read is better)")


def _check_endpoint(text: str, what: str) -> None:
    """An S3 endpoint: a bare host (PBS's form, https) or an http/https URL."""
    if "://" not in text:
        if "/" in text or not text.strip():
            raise ConfigError(f"{what}: '{text}' is not a host name; give a bare host "
                              "(s3.example.com, https is used) or an http:// or https:// URL")
        return
    scheme, rest = text.split("://", 1)
    if scheme.lower() not in ("http", "https") or not rest.split("/", 1)[0]:
        raise ConfigError(f"{what}: '{text}' is not an http or https URL; give a bare host "
                          "(s3.example.com, https is used) or an http:// or https:// URL")


_FINGERPRINT_RE = re.compile(r"(?:[0-9a-fA-F]{2}:){31}[0-9a-fA-F]{2}|[0-9a-fA-F]{64}")


def _check_fingerprint(text: str, what: str) -> None:
    if not _FINGERPRINT_RE.fullmatch(text):
        raise ConfigError(f"{what}: '{text}' is not a sha256 fingerprint; give the certificate's "
                          "32 bytes as hex pairs with colons (ab:cd:...), as "
                          "'openssl x509 -noout -fingerprint -sha256' prints them")


def _existing_file(text: str, what: str) -> str:
    """``_file_path`` of a file that must exist now (a CA certificate)."""
    _file_path(text, what)
    if not os.path.isfile(text):
        raise ConfigError(f"{what}: {text} does not exist or is not a file; give the path of "
                          "the PEM file of the CA that signed the endpoint's certificate")
    return text


def _file_path(text: str, what: str) -> str:
    """An absolute path of a file (a key file, a passphrase file): not a directory name."""
    _absolute_path(text, what)
    if text.endswith("/"):
        raise ConfigError(f"{what}: '{text}' names a directory; give the path of the file")
    return text


def parse_storage_cfg(text: str, path: str) -> Dict[str, StorageConfig]:
    """Parse storage.cfg into ``{id: StorageConfig}``, in file order."""
    storages: Dict[str, StorageConfig] = {}
    for section in parse_sections(text, path):
        if section.id in storages:
            raise ConfigError(f"{path} line {section.line}: storage '{section.id}' is defined "
                              f"twice (first at line {storages[section.id].line}); rename or "
                              f"remove one")
        storages[section.id] = _storage_from_section(section, path)
    return storages


def find_storage(config_dir: str, storage_id: str) -> StorageConfig:
    """The storage ``storage_id`` as ``<config_dir>/storage.cfg`` defines it; ConfigError when
    the file or the id is missing, naming the storages that are defined."""
    path = os.path.join(config_dir, STORAGE_CFG)
    text = read_text(path)
    if text is None:
        raise ConfigError(
            f"{path} does not exist; create it with a storage for backups, e.g.\n"
            f"dir: {storage_id if _STORAGE_ID_RE.match(storage_id) else 'local'}\n"
            f"\tpath /var/lib/guestvault\n\tcontent backup")
    storages = parse_storage_cfg(text, path)
    storage = storages.get(storage_id)
    if storage is None:
        known = ", ".join(storages) or "none"
        raise ConfigError(f"storage '{storage_id}' is not defined in {path}; defined storages: "
                          f"{known}")
    return storage


def load_storage(config_dir: str, storage_id: str, node: Optional[str] = None) -> StorageConfig:
    """The storage ``storage_id`` from ``<config_dir>/storage.cfg``, checked usable for backups.

    Refuses a disabled storage, one whose ``content`` excludes ``backup``, and, when ``node`` is
    given, one whose ``nodes`` list does not name that node.
    """
    storage = find_storage(config_dir, storage_id)
    where = f"{os.path.join(config_dir, STORAGE_CFG)} line {storage.line}"
    if storage.kind == "s3-endpoint":
        raise ConfigError(f"'{storage_id}' is an S3 endpoint ({where}), not a storage; name a "
                          f"datastore whose 'backend type=s3,client={storage_id},bucket=...' "
                          "uses it")
    if storage.disable:
        raise ConfigError(f"storage '{storage_id}' is disabled ({where}); remove its 'disable' "
                          f"line to use it")
    if "backup" not in storage.content:
        raise ConfigError(f"storage '{storage_id}' does not allow backups ({where}); add "
                          f"'backup' to its content line")
    if node is not None and storage.nodes and node not in storage.nodes:
        raise ConfigError(f"storage '{storage_id}' is not available on node '{node}' ({where}); "
                          f"its nodes are {', '.join(storage.nodes)}")
    return storage


@dataclass(frozen=True)
class S3Endpoint:
    """An ``s3-endpoint`` section with its secret read (from ``secret-key`` or its file).

    ``url`` is what the S3 client connects to: ``endpoint`` as given when it has a scheme
    (``http://127.0.0.1:8333``), else ``https://<endpoint>[:port]``. PBS's ``{{region}}``
    placeholder is filled in; a ``{{bucket}}.`` prefix means virtual-hosted addressing, which
    the client does by itself, so it is dropped from the URL.
    """

    id: str
    url: str
    region: str
    access_key: str
    secret_key: str = field(repr=False)
    path_style: bool = False
    fingerprint: Optional[str] = None
    ca_file: Optional[str] = None


def load_s3_endpoint(config_dir: str, storage: StorageConfig) -> S3Endpoint:
    """The S3 endpoint a datastore's backend names, from the same storage.cfg."""
    backend = storage.s3_backend
    endpoint_id = backend["client"]
    where = f"datastore '{storage.id}' (backend client={endpoint_id})"
    try:
        section = find_storage(config_dir, endpoint_id)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}; add an 's3-endpoint: {endpoint_id}' section") \
            from None
    if section.kind != "s3-endpoint":
        raise ConfigError(f"{where}: '{endpoint_id}' is a {section.type} storage, not an "
                          "s3-endpoint")
    options = section.options
    secret = options.get("secret-key")
    if options.get("secret-key-file"):
        try:
            with open(options["secret-key-file"], encoding="utf-8") as handle:
                secret = handle.readline().strip()
        except OSError as err:
            raise ConfigError(f"s3-endpoint '{endpoint_id}': cannot read secret-key-file "
                              f"{options['secret-key-file']}: {err.strerror}") from None
        if not secret:
            raise ConfigError(f"s3-endpoint '{endpoint_id}': secret-key-file "
                              f"{options['secret-key-file']} is empty; its first line is the "
                              "secret key")
    region = options.get("region") or "us-east-1"
    host = options["endpoint"].replace("{{region}}", region)
    if host.startswith("{{bucket}}."):
        host = host[len("{{bucket}}."):]
    if "://" not in host:
        port = options.get("port")
        host = f"https://{host}" + (f":{port}" if port else "")
    return S3Endpoint(id=endpoint_id, url=host.rstrip("/"), region=region,
                      access_key=options["access-key"], secret_key=secret,
                      path_style=parse_bool(options.get("path-style") or "0", "path-style"),
                      fingerprint=options.get("fingerprint"), ca_file=options.get("ca-file"))


# --------------------------------------------------------------------------- rendering

# The inverse of the parsers above: parse_vzdump_conf(render_vzdump_conf(x)) == x and
# parse_storage_cfg(render_storage_cfg(x)) == x for whatever those parsers return. Output is
# stable: vzdump.conf keys and a storage's options in sorted order (``path`` first), storages in
# the order given, so the same configuration always gives the same bytes.

def _check_one_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what}: the value must be one line; it contains a line break")
    return text


def render_property_string(values: Mapping[str, Any], schema: Mapping[str, SchemaEntry],
                           what: str) -> str:
    """``{'keep-last': 3, 'keep-daily': 13}`` -> ``keep-last=3,keep-daily=13``, in schema order.

    Keys unknown to ``schema`` are an error; booleans are written 1/0.
    """
    unknown = [key for key in values if key not in schema]
    if unknown:
        raise ConfigError(f"{what}: unknown key '{unknown[0]}'; allowed keys: "
                          f"{', '.join(sorted(schema))}")
    return ",".join(f"{key}={_render_scalar(values[key], f'{what}: {key}')}"
                    for key in schema if key in values)


def _render_scalar(value: Any, what: str) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, str)):
        return _check_one_line(str(value), what)
    raise ConfigError(f"{what}: cannot write a {type(value).__name__} here; give a string, "
                      f"an integer or a boolean")


# Property-string options of vzdump.conf and the schema their dicts are written with.
_VZDUMP_PROPERTY_SCHEMAS: Dict[str, Mapping[str, SchemaEntry]] = {
    "fleecing": FLEECING_SCHEMA,
    "performance": PERFORMANCE_SCHEMA,
    "prune-backups": PRUNE_BACKUPS_SCHEMA,
}


def render_vzdump_value(key: str, value: Any, what: Optional[str] = None) -> List[str]:
    """The text of option ``key`` as vzdump.conf lines' values (one, or several for exclude-path).

    ``value`` is what :func:`parse_vzdump_conf` returns for the key (dict for property strings,
    list for ``mailto``/``exclude-path``, bool, int, str), or already the option's text.
    """
    what = what or key
    if key in _VZDUMP_PROPERTY_SCHEMAS and isinstance(value, Mapping):
        text = render_property_string(value, _VZDUMP_PROPERTY_SCHEMAS[key], what)
        # An empty property string would read back as "no value"; a lone comma is empty too.
        return [text or ","]
    if key == "exclude-path" and isinstance(value, (list, tuple)):
        return [shlex.quote(_check_one_line(str(path), what)) for path in value]
    if key == "mailto" and isinstance(value, (list, tuple)):
        return [",".join(_render_scalar(item, what) for item in value) or ","]
    return [_render_scalar(value, what)]


def render_vzdump_conf(options: Mapping[str, Any]) -> str:
    """vzdump.conf text of ``options`` (keys as in the file: ``prune-backups``), sorted by key."""
    lines = []
    for key in sorted(options):
        if key not in VZDUMP_OPTIONS:
            raise ConfigError(f"vzdump.conf: unknown option '{key}'; known options: "
                              f"{', '.join(sorted(VZDUMP_OPTIONS))}")
        lines += [f"{key}: {text}" for text in render_vzdump_value(key, options[key], key)]
    return "".join(line + "\n" for line in lines)


_STORAGE_PROPERTY_SCHEMAS: Dict[str, Mapping[str, SchemaEntry]] = {
    "prune-backups": PRUNE_BACKUPS_SCHEMA,
    "backend": BACKEND_SCHEMA,
}


def render_storage_value(key: str, value: Any, what: Optional[str] = None) -> Optional[str]:
    """The text of storage option ``key`` (``None`` for a bare flag line such as ``disable``)."""
    what = what or key
    if value is None:
        return None
    if key in _STORAGE_PROPERTY_SCHEMAS and isinstance(value, Mapping):
        return render_property_string(value, _STORAGE_PROPERTY_SCHEMAS[key], what) or ","
    if isinstance(value, (list, tuple)):
        return ",".join(_render_scalar(item, what) for item in value)
    return _render_scalar(value, what)


# storage.cfg keys with a typed StorageConfig field, and the field (``path`` aside).
_TYPED_STORAGE_FIELDS = (
    ("content", "content"), ("prune-backups", "prune_backups"),
    ("max-protected-backups", "max_protected_backups"), ("shared", "shared"),
    ("disable", "disable"), ("nodes", "nodes"), ("encryption-key", "encryption_key"),
    ("encryption-passphrase-file", "encryption_passphrase_file"), ("backend", "backend"),
)


def _storage_field_options(storage: StorageConfig) -> Dict[str, Any]:
    """The typed fields of ``storage`` that differ from what an absent option would give."""
    defaults = StorageConfig(id=storage.id, type=storage.type, path="",
                             shared=storage.type in _SHARED_TYPES)
    fields: Dict[str, Any] = {"path": storage.path}
    for key, attr in _TYPED_STORAGE_FIELDS:
        value = getattr(storage, attr)
        if value != getattr(defaults, attr):
            fields[key] = value
    return fields


def _reads_back_as(storage: StorageConfig, key: str, text: Optional[str]) -> bool:
    """Whether option text ``text`` gives ``storage`` its current typed value for ``key``."""
    probe = f"{storage.type}: {storage.id}\n\tpath /\n"
    if key != "path":
        probe += f"\t{key}" + ("" if text is None else f" {text}") + "\n"
    else:
        probe = f"{storage.type}: {storage.id}\n\tpath {text}\n"
    try:
        parsed = parse_storage_cfg(probe, "probe")[storage.id]
    except ConfigError:
        return False
    return _storage_field_options(parsed).get(key) == _storage_field_options(storage).get(key)


def _storage_options(storage: Union[StorageConfig, Mapping[str, Any]]) -> Tuple[str, Dict]:
    """(type, {key: text or None}) of a storage given as a StorageConfig or a plain dict."""
    if isinstance(storage, StorageConfig) and storage.kind == "s3-endpoint":
        return storage.type, dict(storage.options)     # no path, no typed fields: as written
    if isinstance(storage, StorageConfig):
        options: Dict[str, Any] = {}
        # Options as written win when they still mean the typed value (they keep the user's
        # spelling: 'path /mnt/b/', 'shared yes'); typed fields win when they were changed.
        for key, text in storage.options.items():
            if (key == "path" or key in _BOOL_STORAGE_KEYS
                    or key in dict(_TYPED_STORAGE_FIELDS)) \
                    and not _reads_back_as(storage, key, text):
                continue
            options[key] = text
        for key, value in _storage_field_options(storage).items():
            if key not in options:
                options[key] = render_storage_value(key, value, key)
        return storage.type, options
    values = dict(storage)
    kind = values.pop("type", "dir")
    return kind, {key: render_storage_value(key, value, key) for key, value in values.items()}


def render_storage_cfg(storages: Mapping[str, Union[StorageConfig, Mapping[str, Any]]]) -> str:
    """storage.cfg text of ``{id: StorageConfig or dict}``, one blank line between storages.

    A dict holds option text or typed values keyed as in the file (``type`` defaults to
    ``dir``; ``prune-backups`` may be a dict). Options are written ``path`` first, then sorted.
    """
    blocks = []
    for storage_id, storage in storages.items():
        what = f"storage '{storage_id}'"
        kind, options = _storage_options(storage)
        check_storage_id(str(storage_id), what)
        if not isinstance(kind, str) or not re.match(r"^[a-z][a-z0-9\-]*$", kind):
            raise ConfigError(f"{what}: '{kind}' is not a storage type; use one of "
                              f"{', '.join(STORAGE_TYPES)}")
        lines = [f"{kind}: {storage_id}"]
        for key in sorted(options, key=lambda k: (k != "path", k)):
            if not re.match(r"^[A-Za-z][A-Za-z0-9_\-]*$", key):
                raise ConfigError(f"{what}: '{key}' is not an option name")
            text = options[key]
            lines.append(f"\t{key}" if text is None else f"\t{key} {text}")
        blocks.append("".join(line + "\n" for line in lines))
    return "\n".join(blocks)
