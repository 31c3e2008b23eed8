"""Backup jobs in Proxmox's ``jobs.cfg`` syntax: parsed, validated, rendered.

A job is a section ``vzdump: <id>`` whose options are vzdump's (``storage``, ``mode``,
``prune-backups``, ...) plus the job's own: ``schedule`` (a Proxmox calendar event), the guest
selection (``vmid``, ``all``, ``pool``, ``exclude``), ``node``, ``enabled``, ``repeat-missed`` and
``comment``; and guestvault's ``level``, ``chain``, ``chain-period``.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..config.files import declare_file, read_text
from ..errors import ConfigError
from ..vocabulary import CHAIN_PERIODS, LEVELS
from .calendar import CalendarEvent
from .config import VZDUMP_OPTIONS, parse_bool, parse_sections

JOBS_CFG = 'jobs.cfg'
_JOB_ID = re.compile(r'[A-Za-z][A-Za-z0-9_-]{0,63}')


def _vmid_list(text, what):
    items = [item.strip() for item in re.split(r'[,;\s]+', str(text)) if item.strip()]
    vmids = []
    for item in items:
        if not item.isdigit() or not 100 <= int(item) <= 999999999:
            raise ConfigError(f"{what}: {item!r} is not a vmid (100 to 999999999)")
        vmids.append(int(item))
    return vmids


def _schedule(text, what):
    try:
        CalendarEvent.parse(text)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    return text.strip()


def _choice(*choices):
    def check(text, what):
        if text not in choices:
            raise ConfigError(f"{what}: {text!r} is not one of {', '.join(choices)}")
        return text
    return check


def _text(text, what):
    if '\n' in text:
        raise ConfigError(f"{what}: must be a single line")
    return text


JOB_OPTIONS = dict(VZDUMP_OPTIONS)
JOB_OPTIONS.update({
    'schedule': _schedule,
    'enabled': parse_bool,
    'comment': _text,
    'node': lambda text, what: [n for n in re.split(r'[,;\s]+', text) if n],
    'vmid': _vmid_list,
    'exclude': _vmid_list,
    'all': parse_bool,
    'pool': _text,
    'repeat-missed': parse_bool,
    'level': _choice(*LEVELS),
    'chain': _text,
    'chain-period': _choice(*CHAIN_PERIODS),
})
# The order options are written in: the schedule and selection first, then alphabetical.
_FIRST = ('schedule', 'enabled', 'comment', 'node', 'all', 'vmid', 'pool', 'exclude')


@dataclass
class Job:
    id: str
    options: dict = field(default_factory=dict)
    source: str = None
    line: int = None

    @property
    def enabled(self):
        return self.options.get('enabled', True)

    def runs_on(self, node):
        nodes = self.options.get('node')
        return not nodes or node in nodes


def check_job_id(job_id):
    if not _JOB_ID.fullmatch(str(job_id or '')):
        raise ConfigError(f"job id {job_id!r} is not valid: use 1-64 letters, digits, '-' or "
                          "'_', starting with a letter (e.g. 'nightly')")
    return job_id


def validate_job(job_id, raw, where='job'):
    """Typed, checked options of one job from ``{key: text}``; ConfigError says what to fix."""
    check_job_id(job_id)
    options = {}
    for key, value in raw.items():
        if key not in JOB_OPTIONS:
            raise ConfigError(f"{where}: unknown option '{key}'; known: "
                              f"{', '.join(sorted(JOB_OPTIONS))}")
        if value is None or str(value) == '':
            raise ConfigError(f"{where}: option '{key}' has no value")
        parser = JOB_OPTIONS[key]
        options[key] = parser(str(value), f"{where}: {key}")
    if 'schedule' not in options:
        raise ConfigError(f"{where}: a job needs a schedule, e.g. 'schedule mon..fri 23:00'")
    selected = bool(options.get('vmid')) + bool(options.get('all')) + bool(options.get('pool'))
    if selected == 0:
        raise ConfigError(f"{where}: the job selects no guest; set vmid, all or pool")
    if options.get('vmid') and (options.get('all') or options.get('pool')):
        raise ConfigError(f"{where}: vmid lists guests itself; do not combine it with all or pool")
    both = sorted(set(options.get('vmid') or ()) & set(options.get('exclude') or ()))
    if both:
        raise ConfigError(f"{where}: guest(s) {', '.join(map(str, both))} are both in vmid and "
                          "in exclude; name each guest in one list only")
    if options.get('storage') and options.get('dumpdir'):
        raise ConfigError(f"{where}: storage and dumpdir are mutually exclusive")
    return options


def parse_jobs_cfg(text, path):
    jobs = {}
    for section in parse_sections(text, path):
        where = f"{path} line {section.line}"
        if section.type != 'vzdump':
            raise ConfigError(f"{where}: unknown job type '{section.type}'; guestvault runs "
                              "'vzdump' jobs")
        if section.id in jobs:
            raise ConfigError(f"{where}: job '{section.id}' is defined twice")
        raw = {}
        for lineno, key, value in section.options:
            if key in raw:
                raise ConfigError(f"{path} line {lineno}: option '{key}' is set twice in job "
                                  f"'{section.id}'")
            raw[key] = '1' if value is None else value
        jobs[section.id] = Job(section.id, validate_job(section.id, raw, where), path,
                               section.line)
    return jobs


def _render_value(key, value):
    if isinstance(value, bool):
        return '1' if value else '0'
    if key in ('vmid', 'exclude'):
        return ','.join(str(v) for v in value)
    if key in ('node', 'mailto', 'exclude-path'):
        return ','.join(value) if key != 'exclude-path' else ' '.join(value)
    if isinstance(value, dict):  # property strings: prune-backups, performance, fleecing
        return ','.join(f"{k}={_render_value(k, v)}" for k, v in value.items())
    return str(value)


def render_job(job):
    keys = [k for k in _FIRST if k in job.options]
    keys += sorted(k for k in job.options if k not in _FIRST)
    lines = [f"vzdump: {job.id}"]
    lines += [f"\t{key} {_render_value(key, job.options[key])}" for key in keys]
    return '\n'.join(lines) + '\n'


def render_jobs_cfg(jobs):
    return '\n'.join(render_job(jobs[job_id]) for job_id in sorted(jobs))


def jobs_path(config_dir):
    return os.path.join(config_dir, JOBS_CFG)


def load_jobs(config_dir):
    path = jobs_path(config_dir)
    text = read_text(path)
    return {} if text is None else parse_jobs_cfg(text, path)


def save_jobs(config_dir, jobs):
    declare_file(jobs_path(config_dir), render_jobs_cfg(jobs))
