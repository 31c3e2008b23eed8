"""The part of Handlebars that PVE's notification templates use, with proxmox-notify's helpers.

Why our own: an admin's PVE override templates must render unchanged, and they use a handful of
constructs and PVE's own helpers (``table``, ``duration``, ``human-bytes``, ...), which no Python
renderer has. pybars3, the one Python Handlebars, has had no release since 2019 and pulls in
PyMeta3; this subset is a tokenizer and a tree walk.

Supported: ``{{path}}`` (escaped in HTML templates), ``{{{path}}}`` (never escaped), ``{{!
comment}}``, ``{{#each path}}..{{else}}..{{/each}}`` (with ``this``, ``@index``, ``@key``,
``@first``, ``@last``), ``{{#if path}}..{{else}}..{{/if}}``, ``{{#unless ..}}``, ``~`` whitespace
control, ``@root.path``, and helper calls ``{{helper arg ...}}`` whose arguments are paths or
literals. Paths are looked up in the current context (``this``), as handlebars-rust does.
Helpers: ``table``, ``duration``, ``human-bytes``, ``timestamp``, ``relative-percentage``,
``json``, ``escape``, ``url-encode``.
"""
from __future__ import annotations

import html
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, List
from urllib.parse import quote

from ..errors import ConfigError

# {{~? {? body }? ~?}}: the third brace closes only a tag that a third brace opened
_TAG = re.compile(r'\{\{(~?)(\{)?(.*?)(?(2)\})(~?)\}\}', re.DOTALL)
_NUMBER = re.compile(r'^-?[0-9]+(\.[0-9]+)?$')


class TemplateError(ConfigError):
    """A template does not parse or names an unknown helper."""


@dataclass
class _Node:
    kind: str                    # 'text', 'value', 'block'
    text: str = ''
    raw: bool = False
    children: List['_Node'] = field(default_factory=list)
    otherwise: List['_Node'] = field(default_factory=list)


# --------------------------------------------------------------------------- parsing

def _tokens(source, name):
    pos = 0
    strip_next = False
    for match in _TAG.finditer(source):
        text = source[pos:match.start()]
        if strip_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        if text:
            yield 'text', text, False
        yield 'tag', match.group(3).strip(), bool(match.group(2))
        strip_next = bool(match.group(4))
        pos = match.end()
    text = source[pos:]
    if strip_next:
        text = text.lstrip()
    if text:
        yield 'text', text, False


def parse(source: str, name: str = 'template') -> List[_Node]:
    root: List[_Node] = []
    stack = [(None, root, None)]           # (open block, list being filled, block node)
    for kind, text, raw in _tokens(source, name):
        current = stack[-1][1]
        if kind == 'text':
            current.append(_Node('text', text))
        elif text.startswith('!'):
            continue
        elif text.startswith('#'):
            helper, _sep, arg = text[1:].partition(' ')
            if helper not in ('each', 'if', 'unless'):
                raise TemplateError(f"template {name}: block '{{{{#{helper}}}}}' is not "
                                    "supported; use #each, #if or #unless")
            node = _Node('block', f"{helper} {arg.strip()}")
            current.append(node)
            stack.append((helper, node.children, node))
        elif text == 'else':
            if stack[-1][0] is None:
                raise TemplateError(f"template {name}: '{{{{else}}}}' outside a block")
            stack[-1] = (stack[-1][0], stack[-1][2].otherwise, stack[-1][2])
        elif text.startswith('/'):
            if stack[-1][0] != text[1:].strip():
                raise TemplateError(f"template {name}: '{{{{{text}}}}}' closes no open "
                                    f"'{{{{#{text[1:].strip()}}}}}'")
            stack.pop()
        else:
            current.append(_Node('value', text, raw))
    if len(stack) > 1:
        raise TemplateError(f"template {name}: '{{{{#{stack[-1][0]}}}}}' is never closed")
    return root


# --------------------------------------------------------------------------- rendering

@dataclass
class _Scope:
    this: Any
    root: Any
    extra: dict = field(default_factory=dict)   # @index, @key, @first, @last


def _lookup(path, scope):
    if path.startswith('@root'):
        value, path = scope.root, path[len('@root'):].lstrip('.')
    elif path.startswith('@'):
        return scope.extra.get(path)
    else:
        value = scope.this
        if path == 'this' or path == '.':
            return value
        if path.startswith('this.'):
            path = path[len('this.'):]
    for part in path.split('.') if path else []:
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def _argument(token, scope):
    if token[:1] in '"\'':
        return token[1:-1]
    if _NUMBER.match(token):
        return float(token) if '.' in token else int(token)
    if token in ('true', 'false', 'null'):
        return {'true': True, 'false': False, 'null': None}[token]
    return _lookup(token, scope)


def _truthy(value):
    return value not in (None, False, 0, '', [], {})


def as_text(value) -> str:
    if value is None:
        return ''
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(',', ':'))
    return str(value)


class Renderer:
    """Renders parsed templates. ``html`` escapes ``{{..}}`` output and makes ``table`` an HTML
    table, as proxmox-notify's HTML body renderer does; plain text is never escaped."""

    def __init__(self, html_output: bool = False):
        self.html = html_output
        self.helpers = {'table': self._table, 'duration': duration, 'human-bytes': human_bytes,
                        'timestamp': timestamp, 'relative-percentage': relative_percentage,
                        'json': to_json, 'escape': escape, 'url-encode': url_encode}

    def render(self, source: str, data: Any, name: str = 'template') -> str:
        return self._nodes(parse(source, name), _Scope(data, data), name)

    def _nodes(self, nodes, scope, name):
        return ''.join(self._node(node, scope, name) for node in nodes)

    def _node(self, node, scope, name):
        if node.kind == 'text':
            return node.text
        if node.kind == 'block':
            helper, _sep, arg = node.text.partition(' ')
            value = _argument(arg, scope)
            if helper == 'each':
                return self._each(node, value, scope, name)
            chosen = _truthy(value) if helper == 'if' else not _truthy(value)
            return self._nodes(node.children if chosen else node.otherwise, scope, name)
        try:
            words = shlex.split(node.text)
        except ValueError:
            raise TemplateError(f"template {name}: cannot read '{{{{{node.text}}}}}'") from None
        if not words:
            return ''
        if words[0] in self.helpers and len(words) > 1:
            text = self.helpers[words[0]](*[_argument(w, scope) for w in words[1:]])
            # helpers write their output as it is (the HTML table is HTML already)
            return text
        if len(words) > 1:
            raise TemplateError(f"template {name}: unknown helper '{words[0]}'; known: "
                                f"{', '.join(sorted(self.helpers))}")
        text = as_text(_lookup(words[0], scope))
        return html.escape(text) if self.html and not node.raw else text

    def _each(self, node, value, scope, name):
        items = list(value.items()) if isinstance(value, dict) else \
            list(enumerate(value)) if isinstance(value, list) else []
        if not items:
            return self._nodes(node.otherwise, scope, name)
        out = []
        for position, (key, item) in enumerate(items):
            extra = {'@index': position, '@key': key, '@first': position == 0,
                     '@last': position == len(items) - 1}
            out.append(self._nodes(node.children, _Scope(item, scope.root, extra), name))
        return ''.join(out)

    def _table(self, table):
        columns = (table or {}).get('schema', {}).get('columns', [])
        rows = [[_cell(row, column) for column in columns] for row in (table or {}).get('data', [])]
        labels = [column.get('label', column.get('id', '')) for column in columns]
        if self.html:
            cell = 'style="border: 1px solid; border-collapse: collapse; padding: 2px 6px"'
            head = ''.join(f'<th {cell}>{html.escape(label)}</th>' for label in labels)
            body = ''.join('<tr>' + ''.join(f'<td {cell}>{html.escape(value)}</td>'
                                            for value in row) + '</tr>' for row in rows)
            return (f'<table style="border: 1px solid; border-collapse: collapse">'
                    f'<tr>{head}</tr>{body}</table>')
        widths = [max([len(label)] + [len(row[i]) for row in rows])
                  for i, label in enumerate(labels)]
        lines = ['  '.join(text.ljust(width) for text, width in zip(line, widths)).rstrip()
                 for line in [labels, ['-' * width for width in widths]] + rows]
        return '\n'.join(lines) + '\n'


def _cell(row, column):
    value = row.get(column.get('id'))
    renderer = {'duration': duration, 'human-bytes': human_bytes,
                'timestamp': timestamp}.get(column.get('renderer'))
    return renderer(value) if renderer and value is not None else as_text(value)


# --------------------------------------------------------------------------- helpers

def _number(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def duration(value) -> str:
    """Seconds as proxmox-time's TimeSpan shows them: ``1h 2m 3s``, ``45s``."""
    seconds = _number(value)
    if seconds is None:
        return 'ERROR'
    rest, parts = int(seconds), []
    for unit, size in (('d', 86400), ('h', 3600), ('m', 60), ('s', 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return ' '.join(parts) or '0s'


def human_bytes(value) -> str:
    """A size in IEC units (base 2), as proxmox-human-byte: ``1 KiB``, ``1.5 MiB``."""
    size = _number(value)
    if size is None:
        return 'ERROR'
    for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'):
        if abs(size) < 1024 or unit == 'PiB':
            break
        size /= 1024
    return f"{size:.2f}".rstrip('0').rstrip('.') + f" {unit}"


def timestamp(value) -> str:
    """A Unix time in local time, ``YYYY-MM-DD HH:MM:SS``."""
    seconds = _number(value)
    if seconds is None:
        return 'ERROR'
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(seconds))


def relative_percentage(part, whole) -> str:
    part, whole = _number(part), _number(whole)
    if part is None or whole is None:
        return 'ERROR'
    return '-' if whole == 0 else f"{part * 100 / whole:.2f}%"


def to_json(value) -> str:
    return json.dumps(value, separators=(',', ':'), ensure_ascii=False)


def escape(value) -> str:
    """A string JSON-escaped, without its quotes (for a value inside a JSON body)."""
    return json.dumps(as_text(value), ensure_ascii=False)[1:-1]


# proxmox-notify percent-encodes controls and these; every other printable ASCII stays.
_URL_RESERVED = set(':/?#[]@!$&\'()*+,;=% ')
_URL_SAFE = ''.join(chr(c) for c in range(0x21, 0x7f) if chr(c) not in _URL_RESERVED)


def url_encode(value) -> str:
    return quote(as_text(value), safe=_URL_SAFE)


def render(source: str, data: Any, html_output: bool = False, name: str = 'template') -> str:
    """``source`` rendered with ``data``; TemplateError says what in the template is wrong."""
    return Renderer(html_output).render(source, data, name)
