"""What a run reports to notification targets, and the templates that give it its words.

An :class:`Event` is rendered once, before any target sees it: its title, plain-text body and
HTML body, with the metadata matchers read (severity, fields, time). Templates are PVE's
Handlebars files by name (``<name>-subject.txt.hbs``, ``<name>-body.txt.hbs``,
``<name>-body.html.hbs``): an admin's file in ``<config dir>/notification-templates/default/``
wins over ours, as PVE's ``/etc/pve/notification-templates/default/`` wins over its own. A
broken override is logged and ours used; a missing HTML body is the text body in ``<pre>``.
"""
from __future__ import annotations

import html
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

from ..config.files import read_text
from .handlebars import TemplateError, render

SEVERITIES = ('info', 'notice', 'warning', 'error', 'unknown')
OVERRIDE_DIR = os.path.join('notification-templates', 'default')

# Ours: the same data as PVE's templates, in guestvault's words.
TEMPLATES: Dict[str, str] = {
    'vzdump-subject.txt.hbs': 'vzdump backup status ({{fqdn}}): {{status-text}}\n',
    'vzdump-body.txt.hbs': (
        '{{#if error}}{{error}}\n\n{{/if}}'
        'Guests\n------\n{{table guest-table}}\n'
        'Total time: {{duration total-time}}\n'
        'Total size: {{human-bytes total-size}}\n\n'
        'Log\n---\n{{logs}}\n'),
    'vzdump-body.html.hbs': (
        '<html><body>\n{{#if error}}<p>{{error}}</p>\n{{/if}}'
        '<h2 style="font-size: 1.2em">Guests</h2>\n{{table guest-table}}\n'
        '<p>Total time: {{duration total-time}}<br/>\n'
        'Total size: {{human-bytes total-size}}</p>\n'
        '<h2 style="font-size: 1.2em">Log</h2>\n<pre>{{logs}}</pre>\n</body></html>\n'),
    'test-subject.txt.hbs': 'Test notification from {{hostname}}\n',
    # gc, verify and prune: PBS's subjects; the body is the operation's summary
    'gc-subject.txt.hbs': "Garbage Collect Datastore '{{datastore}}' {{status-text}}\n",
    'verify-subject.txt.hbs': "Verify Datastore '{{datastore}}' {{status-text}}\n",
    'prune-subject.txt.hbs': "Pruning datastore '{{datastore}}' {{status-text}}\n",
    'gc-body.txt.hbs': '{{#if error}}{{error}}\n\n{{/if}}{{summary}}\n',
    'verify-body.txt.hbs': '{{#if error}}{{error}}\n\n{{/if}}{{summary}}\n',
    'prune-body.txt.hbs': '{{#if error}}{{error}}\n\n{{/if}}{{summary}}\n',
    'test-body.txt.hbs': "This is a test of the notification target '{{target}}' "
                         "from guestvault on {{fqdn}}.\n",
}


@dataclass
class Event:
    """One notification: ``fields`` (``type``, ``hostname``, ``job-id``, ``datastore``, ...) and
    ``severity`` are what matchers match; ``title``, ``text`` and ``html`` what targets send."""

    severity: str
    fields: Dict[str, str]
    title: str
    text: str
    html: str
    timestamp: float = field(default_factory=time.time)

    @property
    def type(self) -> str:
        return self.fields.get('type', '')


def _template(config_dir, filename, log):
    """(text, source) of a template: the admin's override when there is one, else ours."""
    override = read_text(os.path.join(config_dir, OVERRIDE_DIR, filename)) if config_dir else None
    if override is not None:
        return override, 'override'
    return TEMPLATES.get(filename), 'ours'


def render_template(name: str, suffix: str, data, config_dir: Optional[str],
                    log: Callable[[str], None] = lambda m: None) -> Optional[str]:
    """``<name>-<suffix>`` rendered; a broken override is logged and ours used instead."""
    filename = f"{name}-{suffix}"
    source, origin = _template(config_dir, filename, log)
    if source is None:
        return None
    try:
        return render(source, data, html_output=suffix.endswith('.html.hbs'), name=filename)
    except TemplateError as exc:
        if origin == 'ours':
            raise
        log(f"WARNING: the override template {filename} cannot be rendered ({exc}); "
            "using guestvault's own")
        return render(TEMPLATES[filename], data, suffix.endswith('.html.hbs'), filename)


def make_event(name: str, severity: str, fields: Dict[str, str], data: dict,
               config_dir: Optional[str], log: Callable[[str], None] = lambda m: None) -> Event:
    """An event whose title and bodies are the ``name`` templates rendered with ``data``."""
    title = render_template(name, 'subject.txt.hbs', data, config_dir, log) or ''
    text = render_template(name, 'body.txt.hbs', data, config_dir, log) or ''
    body_html = render_template(name, 'body.html.hbs', data, config_dir, log)
    if body_html is None:
        body_html = f"<html><body><pre>{html.escape(text)}</pre></body></html>"
    return Event(severity, dict(fields), ' '.join(title.split('\n')).strip(), text, body_html)
