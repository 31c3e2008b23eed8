"""Declare a node's ``vzdump.conf``, ``storage.cfg`` and ``notifications.cfg`` (with its secrets
in ``priv/notifications.cfg``) from plain data (what Ansible passes).

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

import base64

from ..config.files import declare_file, read_text
from ..errors import ConfigError, StorageError
from ..policy.notifications_cfg import (NOTIFICATIONS_CFG, PRIV_NOTIFICATIONS_CFG,
                                        PRIVATE_SCHEMAS, SCHEMAS, parse_notifications_cfg,
                                        render_notifications_cfg)
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
# priv/notifications.cfg: an SMTP password, a Gotify token, a webhook secret's value
_NOTIFY_SECRET = re.compile(r"^(\s+(?:password|token)\s+)\S.*$|(\bsecret\s+name=[^,\s]+,value=)\S+",
                            re.MULTILINE)


def _masked(text: str) -> str:
    """``text`` with every inline S3 secret and notification secret replaced, for diffs that
    Ansible prints."""
    text = _SECRET_LINE.sub(r"\1********", text)
    return _NOTIFY_SECRET.sub(lambda m: (m.group(1) or m.group(2)) + "********", text)


# --------------------------------------------------------------------------- notifications

NOTIFICATION_TYPES = tuple(SCHEMAS)      # the targets' types and 'matcher'
_WHERE_RE = re.compile(r"^(?P<file>[^:]*?) line (?P<line>\d+): ")


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _one_line(value: Any, what: str) -> str:
    text = ("1" if value else "0") if isinstance(value, bool) else str(value)
    if "\n" in text or "\r" in text:
        raise ConfigError(f"{what}: the value has a line break; give it on one line")
    return text


def _notification_lines(name: str, options: Mapping[str, Any], kind: str) -> List[str]:
    """A declared target or matcher (public) or its secrets (private) as ``key value`` lines:
    lists give one line per item, a webhook's ``header`` and ``secret`` are dictionaries of
    name: plain value, stored base64 as PVE stores them (``body`` too)."""
    lines = []
    for user_key, value in sorted(options.items(), key=lambda item: _dashed(item[0])):
        key = _dashed(user_key)
        what = f"notifications '{name}': {key}" if kind == "public" else \
            f"notification_secrets '{name}': {key}"
        if key == "type" or value is None:
            continue
        if key in ("header", "secret") and isinstance(value, Mapping):
            for item, text in value.items():
                pair = f"name={item}" if text is None else \
                    f"name={item},value={_b64(_one_line(text, what))}"
                lines.append(f"\t{key} {pair}")
            continue
        if key == "body":
            value = _b64(str(value))
        for item in value if isinstance(value, list) else [value]:
            lines.append(f"\t{key} {_one_line(item, what)}")
    return lines


def _declared_notification_type(name: str, options: Any) -> str:
    if not isinstance(options, Mapping):
        raise ConfigError(f"notifications '{name}': give its options as a dictionary (type, "
                          f"...), not {type(options).__name__}")
    kind = options.get("type")
    if kind not in SCHEMAS:
        raise ConfigError(f"notifications '{name}': type '{kind}' is not one of "
                          f"{', '.join(NOTIFICATION_TYPES)}; give it as 'type'")
    for user_key, value in options.items():
        key = _dashed(user_key)
        secret_value = key == "secret" and isinstance(value, Mapping) and \
            any(v is not None for v in value.values())
        if (key in PRIVATE_SCHEMAS.get(kind, {}) and key != "secret") or secret_value:
            raise ConfigError(f"notifications '{name}': {key} is a secret; give it in "
                              "notification_secrets (a no_log option), not here")
    return kind


def _sections_text(sections: List[Tuple[str, str, List[str]]]):
    """The text of ``(type, name, lines)`` sections and ``{line number: name}`` of each line."""
    text, owner = [], {}
    for kind, name, lines in sections:
        if text:
            text.append("")
        for line in [f"{kind}: {name}"] + lines:
            text.append(line)
            owner[len(text)] = name
    return "\n".join(text) + ("\n" if text else ""), owner


def render_notifications(notifications: Mapping[str, Any],
                         secrets: Optional[Mapping[str, Any]] = None) -> Tuple[str, str]:
    """(notifications.cfg text, priv/notifications.cfg text) of declared targets and matchers and
    their secrets, checked by the engine's parser; an error names the entry and the key."""
    public = [(_declared_notification_type(name, options), name,
               _notification_lines(name, options, "public"))
              for name, options in notifications.items()]
    types = {name: kind for kind, name, _lines in public}
    private = []
    for name, options in (secrets or {}).items():
        if name not in types:
            raise ConfigError(f"notification_secrets '{name}': no target of that name is "
                              f"declared in notifications; declared: {', '.join(types) or 'none'}")
        if not isinstance(options, Mapping):
            raise ConfigError(f"notification_secrets '{name}': give them as a dictionary "
                              "(password, token or secret)")
        lines = _notification_lines(name, options, "private")
        if lines:
            private.append((types[name], name, lines))
        if types[name] == "webhook" and isinstance(options.get("secret"), Mapping):
            # the public file names each secret, as PVE writes it
            public = [(k, n, ls + [f"\tsecret name={item}" for item in options["secret"]]
                       if n == name else ls) for k, n, ls in public]
    public_text, public_owner = _sections_text(public)
    private_text, private_owner = _sections_text(private)
    try:
        config = parse_notifications_cfg(public_text, NOTIFICATIONS_CFG, private_text,
                                         PRIV_NOTIFICATIONS_CFG)
    except ConfigError as err:
        raise _named_entry(err, public_owner, private_owner) from None
    return render_notifications_cfg(config)


def _named_entry(err: ConfigError, public_owner, private_owner) -> ConfigError:
    """The parser's error with ``<file> line N`` (text that exists only in memory) replaced by
    the declared entry it belongs to."""
    message = str(err)
    match = _WHERE_RE.match(message)
    if not match:
        return err
    private = match.group("file") == PRIV_NOTIFICATIONS_CFG
    owner = (private_owner if private else public_owner).get(int(match.group("line")))
    option = "notification_secrets" if private else "notifications"
    return ConfigError(f"{option} '{owner}': {message[match.end():]}")


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
    notifications: Optional[Mapping[str, Any]] = None   # None leaves notifications.cfg alone
    notification_secrets: Optional[Mapping[str, Any]] = None
    node: Optional[str] = None                      # None: this host's name
    check_mode: bool = False


def run_node_config(request: NodeConfigRequest) -> Dict[str, Any]:
    """The node_config module's verb: :func:`apply_node_config` as the request says."""
    return apply_node_config(request.config_dir, vzdump=request.vzdump,
                             storages=request.storages, check_mode=request.check_mode,
                             node=request.node, notifications=request.notifications,
                             notification_secrets=request.notification_secrets)


PRIV_DIR_MODE = 0o700


def _declared_files(vzdump, storages, notifications, notification_secrets, node):
    """``([(file name, text or None for absent, mode)], storage ids, dirs to create)``."""
    wanted: List[Tuple[str, Optional[str], Optional[int]]] = []
    created_dirs: List[str] = []
    storage_ids: List[str] = []
    if vzdump is not None:
        if not isinstance(vzdump, Mapping):
            raise ConfigError("vzdump: give the options as a dictionary")
        wanted.append((VZDUMP_CONF, render_vzdump(vzdump), None))
    if storages is not None:
        if not isinstance(storages, Mapping):
            raise ConfigError("storages: give the storages as a dictionary of id: options")
        text, parsed = parse_declared_storages(storages)
        # an inline S3 secret makes the file root's alone (secret-key-file is better)
        wanted.append((STORAGE_CFG, text, 0o600 if _SECRET_LINE.search(text) else None))
        storage_ids = list(parsed)
        created_dirs = storage_dirs_to_create(parsed, node)
    if notification_secrets is not None and notifications is None:
        raise ConfigError("notification_secrets: give them together with notifications, which "
                          "declares their targets")
    if notifications is not None:
        for option, value in (("notifications", notifications),
                              ("notification_secrets", notification_secrets or {})):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{option}: give a dictionary of name: options")
        public, private = render_notifications(notifications, notification_secrets)
        wanted.append((NOTIFICATIONS_CFG, public, None))
        # the secrets: root's alone, in a root-only directory (absent when there are none)
        wanted.append((PRIV_NOTIFICATIONS_CFG, private or None, 0o600))
    return wanted, storage_ids, created_dirs


def apply_node_config(config_dir: str, vzdump: Optional[Mapping[str, Any]] = None,
                      storages: Optional[Mapping[str, Any]] = None, check_mode: bool = False,
                      node: Optional[str] = None,
                      notifications: Optional[Mapping[str, Any]] = None,
                      notification_secrets: Optional[Mapping[str, Any]] = None
                      ) -> Dict[str, Any]:
    """Make ``vzdump.conf``, ``storage.cfg`` and ``notifications.cfg`` (with
    ``priv/notifications.cfg``) in ``config_dir`` say what is declared.

    ``None`` leaves a file alone; an empty dict makes it empty. Everything is validated before
    anything is written; nothing is written in check mode. Returns ``{'changed', 'files':
    {name: {'path', 'changed'}}, 'created_dirs': [...], 'storages': [ids], 'removed_storages':
    [ids storage.cfg held that the declaration leaves out], 'notifications': [names], 'diff':
    [...]}``; secrets appear in no part of it.
    """
    node = node or socket.gethostname()
    wanted, storage_ids, created_dirs = _declared_files(vzdump, storages, notifications,
                                                        notification_secrets, node)
    files: Dict[str, Dict[str, Any]] = {}
    diff: List[Dict[str, Any]] = []
    to_write = []
    removed: List[str] = []
    for name, after, mode in wanted:
        path = os.path.join(config_dir, name)
        before = read_text(path)
        changed = before != after
        files[name] = {"path": path, "changed": changed}
        note = ""
        if name == STORAGE_CFG:
            removed = _removed_storages(before, storage_ids)
            if removed:
                note = f" (replaced as a whole: removes storage {', '.join(removed)})"
        if name == PRIV_NOTIFICATIONS_CFG:
            note = " (absent)" if after is None else " (secrets masked)"
        if changed:
            to_write.append((path, after, mode))
            diff.append(_file_diff(path, before, after or "", note))
    diff += [_dir_diff(path) for path in created_dirs]
    make_config_dir = bool(to_write) and not os.path.isdir(config_dir)
    result = {"changed": bool(to_write or created_dirs), "files": files,
              "created_dirs": ([config_dir] if make_config_dir else []) + created_dirs,
              "storages": storage_ids, "removed_storages": removed,
              "notifications": list(notifications or {}), "diff": diff}
    if check_mode:
        return result
    try:
        for path in created_dirs:
            os.makedirs(path, mode=STORAGE_DIR_MODE)
            os.chmod(path, STORAGE_DIR_MODE)  # makedirs' mode is filtered by the umask
        if make_config_dir:
            os.makedirs(config_dir, mode=CONFIG_DIR_MODE)
        for path, text, mode in to_write:
            if mode == 0o600 and text is not None:
                _private_dir(os.path.dirname(path), config_dir)
            declare_file(path, text, mode=mode)
    except OSError as err:
        raise StorageError(f"cannot write the node configuration: {err.filename or config_dir}: "
                           f"{err.strerror}; check that the directory exists and is writable "
                           "by the user Ansible runs the module as") from None
    return result


def _private_dir(directory: str, config_dir: str) -> None:
    """``priv/`` made root-only (0700) before a secret goes in, also when it was there before."""
    if os.path.normpath(directory) == os.path.normpath(config_dir):
        return
    os.makedirs(directory, mode=PRIV_DIR_MODE, exist_ok=True)
    os.chmod(directory, PRIV_DIR_MODE)
