"""Notification targets and matchers in Proxmox VE's ``notifications.cfg`` syntax.

Two section-config files, as PVE keeps them (pve-docs notifications.adoc): the public
``notifications.cfg`` and the root-only ``priv/notifications.cfg`` with the secrets::

    sendmail: admins                    smtp: relay                 (priv/notifications.cfg)
        mailto admin@example.com            password s3cret
        mailto-user root@pam
                                        gotify: phone
    matcher: failures                       token AbCdEf
        target admins
        match-severity error            webhook: chat
        mode all                            secret name=token,value=<base64>

Target types: ``sendmail``, ``smtp``, ``gotify``, ``webhook``; ``matcher`` sections decide which
targets an event goes to (policy/notify_match.py). A webhook's ``header`` values, ``body`` and
``secret`` values are base64, as PVE stores them; they are kept as stored, and decoded only when
a request is built.

PVE's built-ins are there unless a section of the same name replaces them: the ``sendmail:
mail-to-root`` target (root's mail) and ``matcher: default-matcher`` (everything to
mail-to-root). Rendering writes only what is not a built-in.

Everything here is parsing and validation of text; :func:`load_notifications` is the one reader
of files. Errors name the file, the line and the key.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from ..config.files import read_text
from ..errors import ConfigError
from .calendar import DailyDuration
from .config import parse_bool, parse_int, parse_property_string, parse_sections

NOTIFICATIONS_CFG = 'notifications.cfg'
PRIV_NOTIFICATIONS_CFG = os.path.join('priv', 'notifications.cfg')

TARGET_TYPES = ('sendmail', 'smtp', 'gotify', 'webhook')
SEVERITIES = ('info', 'notice', 'warning', 'error', 'unknown')
SMTP_MODES = ('insecure', 'starttls', 'tls')
# proxmox-notify's defaults: the port follows the mode.
SMTP_DEFAULT_PORTS = {'insecure': 25, 'starttls': 587, 'tls': 465}
MATCH_MODES = ('all', 'any')
WEBHOOK_METHODS = ('post', 'put', 'get')

# proxmox-notify's ENTITY_NAME_SCHEMA: a safe id, at most 32 characters.
_NAME_RE = re.compile(r'^[A-Za-z0-9_][A-Za-z0-9._-]{0,31}$')
_FIELD_MATCH_RE = re.compile(r'^(exact|regex):([A-Za-z0-9_][A-Za-z0-9._-]*)=(.*)$')


# --------------------------------------------------------------------------- value converters

def _text(text, what):
    return text


def _choice(*choices):
    def check(text, what):
        if text not in choices:
            raise ConfigError(f"{what}: '{text}' is not allowed; use one of {', '.join(choices)}")
        return text
    return check


def _port(text, what):
    return parse_int(text, what, 1, 65535)


def _base64_text(text, what):
    """A base64 value as stored; checked to decode to UTF-8 text, kept encoded."""
    decode_base64(text, what)
    return text


def decode_base64(text, what):
    """The UTF-8 text a stored base64 value holds; ConfigError names ``what`` (never the value,
    which may be a secret)."""
    try:
        return base64.b64decode(text.encode('ascii'), validate=True).decode('utf-8')
    except (binascii.Error, UnicodeError, ValueError):
        raise ConfigError(f"{what}: not base64 of UTF-8 text; store the value base64-encoded, "
                          "as PVE does (e.g. 'echo -n VALUE | base64 -w0')") from None


def _key_and_base64(text, what):
    """``name=<name>,value=<base64>`` (a webhook header or secret)."""
    pair = parse_property_string(text, {'name': str, 'value': str}, what)
    if 'name' not in pair:
        raise ConfigError(f"{what}: the entry has no name; write 'name=NAME,value=BASE64'")
    if 'value' in pair:
        decode_base64(pair['value'], f"{what} '{pair['name']}'")
    return pair


def _severities(text, what):
    found = [item.strip() for item in text.split(',')]
    unknown = [item for item in found if item not in SEVERITIES]
    if unknown:
        raise ConfigError(f"{what}: unknown severity '{unknown[0]}'; use {', '.join(SEVERITIES)}")
    return found


@dataclass(frozen=True)
class FieldMatch:
    """One ``match-field``: ``exact:<field>=<v1>,<v2>`` or ``regex:<field>=<pattern>``."""

    kind: str
    field: str
    values: Tuple[str, ...] = ()
    pattern: Optional[re.Pattern] = None

    def __str__(self):
        if self.kind == 'exact':
            return f"exact:{self.field}={','.join(self.values)}"
        return f"regex:{self.field}={self.pattern.pattern}"


def _field_match(text, what):
    match = _FIELD_MATCH_RE.match(text)
    if not match:
        raise ConfigError(f"{what}: '{text}' is not 'exact:FIELD=VALUE[,VALUE...]' or "
                          "'regex:FIELD=PATTERN'")
    kind, name, rest = match.groups()
    if kind == 'exact':
        return FieldMatch(kind, name, tuple(value.strip() for value in rest.split(',')))
    try:
        return FieldMatch(kind, name, pattern=re.compile(rest))
    except re.error as err:
        raise ConfigError(f"{what}: '{rest}' is not a valid regular expression ({err})") from None


def _daily_duration(text, what):
    try:
        return DailyDuration.parse(text)
    except ConfigError as err:
        raise ConfigError(f"{what}: {err}") from None


# --------------------------------------------------------------------------- schemas

@dataclass(frozen=True)
class Key:
    convert: Callable
    repeatable: bool = False


_COMMON = {'comment': Key(_text), 'disable': Key(parse_bool)}
_MAIL = {'mailto': Key(_text, True), 'mailto-user': Key(_text, True),
         'from-address': Key(_text), 'author': Key(_text)}
SCHEMAS: Dict[str, Dict[str, Key]] = {
    'sendmail': {**_COMMON, **_MAIL},
    'smtp': {**_COMMON, **_MAIL, 'server': Key(_text), 'port': Key(_port),
             'mode': Key(_choice(*SMTP_MODES)), 'username': Key(_text)},
    'gotify': {**_COMMON, 'server': Key(_text)},
    'webhook': {**_COMMON, 'url': Key(_text), 'method': Key(_choice(*WEBHOOK_METHODS)),
                'header': Key(_key_and_base64, True), 'body': Key(_base64_text),
                'secret': Key(_key_and_base64, True)},
    'matcher': {**_COMMON, 'target': Key(_text, True), 'mode': Key(_choice(*MATCH_MODES)),
                'invert-match': Key(parse_bool), 'match-severity': Key(_severities, True),
                'match-field': Key(_field_match, True),
                'match-calendar': Key(_daily_duration, True)},
}
# What the private file holds, per type; a public file naming these is refused (a secret there
# would be readable by anyone who can read the public file).
PRIVATE_SCHEMAS: Dict[str, Dict[str, Key]] = {
    'smtp': {'password': Key(_text)},
    'gotify': {'token': Key(_text)},
    'webhook': {'secret': Key(_key_and_base64, True)},
}
REQUIRED = {'smtp': ('server', 'from-address'), 'gotify': ('server',), 'webhook': ('url',)}
REQUIRED_PRIVATE = {'gotify': ('token',)}


@dataclass
class Entry:
    """One section: a target (``type`` in TARGET_TYPES) or a matcher. ``options`` hold the typed
    public values (lists for repeatable keys), ``secrets`` those of the private file."""

    type: str
    name: str
    options: dict = field(default_factory=dict)
    secrets: dict = field(default_factory=dict)
    line: Optional[int] = None
    builtin: bool = False
    # {key: [line of each value]}: errors found after parsing name the line
    key_lines: dict = field(default_factory=dict, repr=False)

    def get(self, key, default=None):
        return self.options.get(key, default)

    @property
    def disabled(self):
        return bool(self.options.get('disable'))


@dataclass
class NotificationConfig:
    """Targets and matchers by name, in file order, built-ins first unless replaced."""

    targets: Dict[str, Entry] = field(default_factory=dict)
    matchers: Dict[str, Entry] = field(default_factory=dict)

    def entries(self):
        return list(self.targets.values()) + list(self.matchers.values())


def builtins() -> List[Entry]:
    """PVE's built-in target and matcher: every notification to root's mail."""
    return [Entry('sendmail', 'mail-to-root', {'mailto-user': ['root@pam'],
                                               'comment': "Send mails to root@pam's email address"},
                  builtin=True),
            Entry('matcher', 'default-matcher', {'target': ['mail-to-root'],
                                                 'comment': 'Route all notifications to '
                                                            'mail-to-root'},
                  builtin=True)]


# --------------------------------------------------------------------------- parsing

def _section_options(section, schema, path, kind, key_lines=None):
    """``{key: typed value}`` of one section; ConfigError names the line and the key."""
    options = {}
    for lineno, key, value in section.options:
        if key_lines is not None:
            key_lines.setdefault(key, []).append(lineno)
        what = f"{path} line {lineno}: {key}"
        if key not in schema:
            private = kind == 'public' and key in PRIVATE_SCHEMAS.get(section.type, {}) \
                and key != 'secret'
            hint = (f"it is a secret and belongs in {PRIV_NOTIFICATIONS_CFG}" if private else
                    f"known keys of {section.type}: {', '.join(sorted(schema))}")
            raise ConfigError(f"{path} line {lineno}: unknown key '{key}' in {section.type} "
                              f"'{section.id}'; {hint}")
        if value is None:
            if schema[key].convert is parse_bool:
                value = '1'
            else:
                raise ConfigError(f"{what}: the key has no value")
        converted = schema[key].convert(value, what)
        if kind == 'public' and key == 'secret' and 'value' in converted:
            raise ConfigError(f"{what}: the value of secret '{converted['name']}' belongs in "
                              f"{PRIV_NOTIFICATIONS_CFG}; keep only 'name={converted['name']}' "
                              "here")
        if schema[key].repeatable:
            options.setdefault(key, []).append(converted)
        elif key in options:
            raise ConfigError(f"{what}: set a second time in {section.type} '{section.id}'; "
                              "keep one line")
        else:
            options[key] = converted
    return options


def _check_name(section, path):
    if not _NAME_RE.match(section.id):
        raise ConfigError(f"{path} line {section.line}: '{section.id}' is not a valid name; use "
                          "1 to 32 letters, digits, '_', '-' or '.', not starting with '-' or '.'")


def parse_notifications_cfg(text: str, path: str, priv_text: str = '',
                            priv_path: str = PRIV_NOTIFICATIONS_CFG) -> NotificationConfig:
    """Both files parsed and checked together (a matcher's targets must exist, a private
    section must have its public one)."""
    config = NotificationConfig()
    for entry in builtins():
        (config.matchers if entry.type == 'matcher' else config.targets)[entry.name] = entry
    seen = set()
    for section in parse_sections(text, path):
        where = f"{path} line {section.line}"
        if section.type not in SCHEMAS:
            raise ConfigError(f"{where}: unknown type '{section.type}'; use "
                              f"{', '.join(TARGET_TYPES)} or matcher")
        _check_name(section, path)
        if section.id in seen:
            raise ConfigError(f"{where}: the name '{section.id}' is used a second time; targets "
                              "and matchers share one namespace")
        seen.add(section.id)
        entry = Entry(section.type, section.id, line=section.line)
        entry.options = _section_options(section, SCHEMAS[section.type], path, 'public',
                                         entry.key_lines)
        for key in REQUIRED.get(entry.type, ()):
            if key not in entry.options:
                raise ConfigError(f"{where}: {entry.type} '{entry.name}' needs '{key}'")
        (config.matchers if entry.type == 'matcher' else config.targets)[entry.name] = entry
    _add_secrets(config, priv_text or '', priv_path)
    for entry in config.targets.values():
        for key in REQUIRED_PRIVATE.get(entry.type, ()):
            if key not in entry.secrets:
                raise ConfigError(f"{path} line {entry.line}: {entry.type} '{entry.name}' needs "
                                  f"'{key}' in {priv_path}")
    for matcher in config.matchers.values():
        _check_targets(matcher, config, path)
    return config


def _add_secrets(config, priv_text, priv_path):
    for section in parse_sections(priv_text, priv_path):
        where = f"{priv_path} line {section.line}"
        if section.type not in PRIVATE_SCHEMAS:
            raise ConfigError(f"{where}: type '{section.type}' has no secrets; the private file "
                              f"holds {', '.join(PRIVATE_SCHEMAS)} sections")
        target = config.targets.get(section.id)
        if target is None or target.type != section.type or target.builtin:
            raise ConfigError(f"{where}: {section.type} '{section.id}' is not in "
                              f"{NOTIFICATIONS_CFG}; declare the target there, or remove its "
                              "secrets")
        if target.secrets:
            raise ConfigError(f"{where}: {section.type} '{section.id}' has a second section")
        target.secrets = _section_options(section, PRIVATE_SCHEMAS[section.type], priv_path,
                                          'private')


def _check_targets(matcher, config, path):
    for index, name in enumerate(matcher.get('target', [])):
        if name not in config.targets:
            lines = matcher.key_lines.get('target') or [matcher.line]
            where = f"{path} line {lines[min(index, len(lines) - 1)]}"
            raise ConfigError(f"{where}: target: matcher '{matcher.name}' names the target "
                              f"'{name}', which is not defined; known targets: "
                              f"{', '.join(config.targets) or 'none'}")


def load_notifications(config_dir: str) -> NotificationConfig:
    """``notifications.cfg`` and ``priv/notifications.cfg`` of ``config_dir`` (each optional)."""
    path = os.path.join(config_dir, NOTIFICATIONS_CFG)
    priv_path = os.path.join(config_dir, PRIV_NOTIFICATIONS_CFG)
    return parse_notifications_cfg(read_text(path) or '', path, read_text(priv_path) or '',
                                   priv_path)


# --------------------------------------------------------------------------- rendering

def _render_value(value):
    if isinstance(value, bool):
        return '1' if value else '0'
    if isinstance(value, dict):                     # header/secret: name=..,value=..
        return ','.join(f"{key}={value[key]}" for key in ('name', 'value') if key in value)
    if isinstance(value, DailyDuration):
        return value.text
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ','.join(value)                      # match-severity
    return str(value)


def _render_section(entry_type, name, options, schema):
    lines = [f"{entry_type}: {name}"]
    for key, value in options.items():
        values = value if schema[key].repeatable else [value]
        lines += [f"\t{key} {_render_value(item)}" for item in values]
    return '\n'.join(lines) + '\n'


def render_notifications_cfg(config: NotificationConfig) -> Tuple[str, str]:
    """``(notifications.cfg text, priv/notifications.cfg text)``; built-ins are not written.
    A webhook secret's name is in the public file, its value only in the private one."""
    public, private = [], []
    for entry in config.entries():
        if entry.builtin:
            continue
        options = dict(entry.options)
        if entry.type == 'webhook' and entry.secrets.get('secret'):
            options['secret'] = [{'name': s['name']} for s in entry.secrets['secret']]
        public.append(_render_section(entry.type, entry.name, options, SCHEMAS[entry.type]))
        if entry.secrets:
            private.append(_render_section(entry.type, entry.name, entry.secrets,
                                           PRIVATE_SCHEMAS[entry.type]))
    return '\n'.join(public), '\n'.join(private)
