"""Declare a node's ``vzdump.conf`` and ``storage.cfg`` from plain data (what Ansible passes).

The declared values are rendered into Proxmox syntax and then read back by the same parsers the
backup engine uses, so a value the engine would refuse at backup time is refused here, before
anything is written. A file is rewritten (atomically) only when its text changes; a ``dir``
storage's missing path is created with mode 0750, as Proxmox does when it activates the storage.

Example::

    apply_node_config('/etc/guestvault',
                      vzdump={'mode': 'snapshot', 'prune_backups': {'keep_daily': 3}},
                      storages={'backup-nfs': {'path': '/mnt/backup', 'content': ['backup']}})
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

from ..config.files import declare_file, read_text
from ..errors import ConfigError, StorageError
from ..policy.config import (STORAGE_CFG, STORAGE_TYPES, VZDUMP_CONF, VZDUMP_OPTIONS,
                             StorageConfig, check_storage_id, parse_bool, parse_sections,
                             parse_storage_cfg, parse_vzdump_conf, render_storage_cfg,
                             render_vzdump_conf)
from ..paths import CONFIG_DIR
from .request import Request

STORAGE_DIR_MODE = 0o750
CONFIG_DIR_MODE = 0o755
_LINE_RE = re.compile(r" line \d+:")


def _dashed(key: Any) -> str:
    return str(key).replace("_", "-")


def _without_line(err: ConfigError) -> ConfigError:
    """The parser's error without the line number of text that exists only in memory."""
    return ConfigError(_LINE_RE.sub(":", str(err), count=1))


def _property_dict(value: Any) -> Any:
    """``{keep_daily: 3}`` -> ``{'keep-daily': 3}``; ``None`` values dropped; other values kept."""
    if not isinstance(value, Mapping):
        return value
    return {_dashed(key): item for key, item in value.items() if item is not None}


def vzdump_options(vzdump: Mapping[str, Any]) -> Dict[str, Any]:
    """Declared vzdump.conf options keyed as in the file; a ``None`` value leaves a key unset."""
    options: Dict[str, Any] = {}
    for user_key, value in vzdump.items():
        if value is None:
            continue
        key = _dashed(user_key)
        if key not in VZDUMP_OPTIONS:
            raise ConfigError(f"vzdump: unknown option '{user_key}'; known options (with '-' or "
                              f"'_'): {', '.join(sorted(VZDUMP_OPTIONS))}")
        if key in options:
            raise ConfigError(f"vzdump: option '{key}' is given twice ('-' and '_' spellings "
                              f"are the same option); keep one")
        options[key] = _property_dict(value)
    return options


def render_vzdump(vzdump: Mapping[str, Any]) -> str:
    """vzdump.conf text of the declared options, checked by the engine's parser."""
    options = vzdump_options(vzdump)
    try:
        text = render_vzdump_conf(options)
    except ConfigError as err:
        raise ConfigError(f"vzdump: {err}") from None
    try:
        parsed = parse_vzdump_conf(text, "vzdump")
    except ConfigError as err:
        raise _without_line(err) from None
    # Written from the parsed values: one spelling per meaning ('yes' and true both give '1').
    return render_vzdump_conf(parsed)


def _storage_key(user_key: Any, allowed: frozenset, what: str) -> str:
    key = str(user_key)
    for candidate in (key, key.replace("_", "-"), key.replace("-", "_")):
        if candidate in allowed:
            return candidate
    raise ConfigError(f"{what}: unknown option '{user_key}'; known options (with '-' or '_'): "
                      f"{', '.join(sorted(allowed))}")


def storage_options(storage_id: str, storage: Any) -> Dict[str, Any]:
    """A declared storage as ``{'type': ..., key-as-in-storage.cfg: value}``."""
    what = f"storage '{storage_id}'"
    check_storage_id(str(storage_id), what)
    if not isinstance(storage, Mapping):
        raise ConfigError(f"{what}: give its options as a dictionary (type, path, content, ...), "
                          f"not {type(storage).__name__}")
    kind = storage.get("type") or "dir"
    allowed = STORAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise ConfigError(f"{what}: storage type '{kind}' is not supported; use one of "
                          f"{', '.join(STORAGE_TYPES)}")
    options: Dict[str, Any] = {"type": kind}
    for user_key, value in storage.items():
        if user_key == "type" or value is None:
            continue
        key = _storage_key(user_key, allowed, what)
        if key in options:
            raise ConfigError(f"{what}: option '{key}' is given twice ('-' and '_' spellings "
                              f"are the same option); keep one")
        options[key] = _property_dict(value)
    if not options.get("path") and kind != "s3-endpoint":
        raise ConfigError(f"{what}: a {kind} storage needs 'path', an absolute directory")
    return options


def parse_declared_storages(storages: Mapping[str, Any]) -> Tuple[str, Dict[str, StorageConfig]]:
    """(storage.cfg text, parsed storages) of the declared storages, each checked on its own."""
    declared = {}
    for storage_id, storage in storages.items():
        options = storage_options(storage_id, storage)
        what = f"storage '{storage_id}'"
        try:
            text = render_storage_cfg({storage_id: options})
        except ConfigError as err:
            raise ConfigError(str(err) if str(err).startswith(what) else f"{what}: {err}") \
                from None
        try:
            parse_storage_cfg(text, what)
        except ConfigError as err:
            raise _without_line(err) from None
        declared[storage_id] = options
    text = render_storage_cfg(declared)
    return text, parse_storage_cfg(text, STORAGE_CFG)


def _wants_path_created(storage: StorageConfig, node: str) -> bool:
    """Whether Proxmox would create this storage's directory on ``node`` when activating it."""
    if storage.type != "dir" or storage.disable:
        return False
    if storage.nodes and node not in storage.nodes:
        return False
    for key in ("create-base-path", "mkdir"):
        if key in storage.options and not parse_bool(storage.options[key] or "1", key):
            return False
    return True


def storage_dirs_to_create(storages: Mapping[str, StorageConfig], node: str) -> List[str]:
    """The missing paths of the ``dir`` storages this node activates; a non-directory fails."""
    missing = []
    for storage in storages.values():
        if not _wants_path_created(storage, node):
            continue
        if os.path.isdir(storage.path):
            continue
        if os.path.lexists(storage.path):
            raise ConfigError(f"storage '{storage.id}': path {storage.path} exists and is not a "
                              f"directory")
        missing.append(storage.path)
    return missing


_SECRET_LINE = re.compile(r"^(\s+secret-key\s+)\S.*$", re.MULTILINE)


def _masked(text: str) -> str:
    """``text`` with every inline S3 secret replaced, for diffs that Ansible prints."""
    return _SECRET_LINE.sub(r"\1********", text)


def _file_diff(path: str, before: Optional[str], after: str, note: str = "") -> Dict[str, Any]:
    return {"before_header": path if before is not None else f"{path} (absent)",
            "after_header": path + note, "before": _masked(before or ""), "after": _masked(after)}


def _removed_storages(before: Optional[str], declared: List[str]) -> List[str]:
    """The storages ``before`` (storage.cfg now) defines that the declaration leaves out: the
    file is replaced as a whole, so they go. A file that does not parse names none."""
    try:
        existing = [section.id for section in parse_sections(before or "", STORAGE_CFG)]
    except ConfigError:
        return []
    return [storage_id for storage_id in existing if storage_id not in declared]


def _dir_diff(path: str) -> Dict[str, Any]:
    return {"before_header": path, "after_header": path,
            "before": {"path": path, "state": "absent"},
            "after": {"path": path, "state": "directory", "mode": f"0{STORAGE_DIR_MODE:o}"}}


@dataclass
class NodeConfigRequest(Request):
    config_dir: str = CONFIG_DIR
    vzdump: Optional[Mapping[str, Any]] = None      # None leaves vzdump.conf alone
    storages: Optional[Mapping[str, Any]] = None    # None leaves storage.cfg alone
    node: Optional[str] = None                      # None: this host's name
    check_mode: bool = False


def run_node_config(request: NodeConfigRequest) -> Dict[str, Any]:
    """The node_config module's verb: :func:`apply_node_config` as the request says."""
    return apply_node_config(request.config_dir, vzdump=request.vzdump,
                             storages=request.storages, check_mode=request.check_mode,
                             node=request.node)


def apply_node_config(config_dir: str, vzdump: Optional[Mapping[str, Any]] = None,
                      storages: Optional[Mapping[str, Any]] = None, check_mode: bool = False,
                      node: Optional[str] = None) -> Dict[str, Any]:
    """Make ``vzdump.conf`` and ``storage.cfg`` in ``config_dir`` say what is declared.

    ``None`` leaves a file alone; an empty dict makes it empty. Everything is validated before
    anything is written; nothing is written in check mode. Returns ``{'changed', 'files':
    {name: {'path', 'changed'}}, 'created_dirs': [...], 'storages': [ids], 'removed_storages':
    [ids storage.cfg held that the declaration leaves out], 'diff': [...]}``.
    """
    node = node or socket.gethostname()
    wanted: List[Tuple[str, str]] = []
    created_dirs: List[str] = []
    storage_ids: List[str] = []
    if vzdump is not None:
        if not isinstance(vzdump, Mapping):
            raise ConfigError("vzdump: give the options as a dictionary")
        wanted.append((VZDUMP_CONF, render_vzdump(vzdump)))
    if storages is not None:
        if not isinstance(storages, Mapping):
            raise ConfigError("storages: give the storages as a dictionary of id: options")
        text, parsed = parse_declared_storages(storages)
        wanted.append((STORAGE_CFG, text))
        storage_ids = list(parsed)
        created_dirs = storage_dirs_to_create(parsed, node)

    files: Dict[str, Dict[str, Any]] = {}
    diff: List[Dict[str, Any]] = []
    to_write = []
    removed: List[str] = []
    for name, after in wanted:
        path = os.path.join(config_dir, name)
        before = read_text(path)
        changed = before != after
        files[name] = {"path": path, "changed": changed}
        note = ""
        if name == STORAGE_CFG:
            removed = _removed_storages(before, storage_ids)
            if removed:
                note = f" (replaced as a whole: removes storage {', '.join(removed)})"
        if changed:
            to_write.append((path, after))
            diff.append(_file_diff(path, before, after, note))
    diff += [_dir_diff(path) for path in created_dirs]
    make_config_dir = bool(to_write) and not os.path.isdir(config_dir)
    result = {"changed": bool(to_write or created_dirs), "files": files,
              "created_dirs": ([config_dir] if make_config_dir else []) + created_dirs,
              "storages": storage_ids, "removed_storages": removed, "diff": diff}
    if check_mode:
        return result
    try:
        for path in created_dirs:
            os.makedirs(path, mode=STORAGE_DIR_MODE)
            os.chmod(path, STORAGE_DIR_MODE)  # makedirs' mode is filtered by the umask
        if make_config_dir:
            os.makedirs(config_dir, mode=CONFIG_DIR_MODE)
        for path, text in to_write:
            # an inline S3 secret makes the file root's alone (secret-key-file is better)
            declare_file(path, text, mode=0o600 if _SECRET_LINE.search(text) else None)
    except OSError as err:
        raise StorageError(f"cannot write the node configuration: {err.filename or config_dir}: "
                           f"{err.strerror}; check that the directory exists and is writable "
                           "by the user Ansible runs the module as") from None
    return result
