"""Declare backup jobs: the ``jobs.cfg`` section and the systemd timer + service that run it.

Each enabled job becomes ``guestvault-job-<id>.timer`` (``OnCalendar=`` from the job's Proxmox
schedule, ``Persistent=`` from ``repeat-missed``) and ``guestvault-job-<id>.service`` (runs the
node command for the job). The node runs its jobs by itself, whether or not a controller is up.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import List

from ..config.files import declare_file, read_text
from ..errors import ConfigError
from ..paths import CONFIG_DIR, NODE_COMMAND, UNIT_DIR
from ..format.capture import TREE
from ..guest.kind import guest_kind
from ..guest.registry import list_guests
from ..policy.calendar import CalendarEvent, looks_like_hour_mistake, to_systemd_oncalendar
from ..policy.chain import check_container_level
from ..policy.config import find_storage
from ..policy.jobs_cfg import Job, load_jobs, render_job, save_jobs, validate_job
from .node_command import select_guests
from .request import Request

# The backup_job module's options and the jobs.cfg keys they are written as.
JOB_OPTION_KEYS = {
    'schedule': 'schedule', 'vmid': 'vmid', 'all': 'all', 'pool': 'pool', 'exclude': 'exclude',
    'node': 'node', 'storage': 'storage', 'dumpdir': 'dumpdir', 'mode': 'mode',
    'level': 'level', 'chain': 'chain', 'chain_period': 'chain-period', 'compress': 'compress',
    'prune_backups': 'prune-backups', 'notes_template': 'notes-template', 'bwlimit': 'bwlimit',
    'script': 'script', 'protected': 'protected', 'repeat_missed': 'repeat-missed',
    'enabled': 'enabled', 'comment': 'comment',
}


@dataclass
class BackupJobRequest(Request):
    """A job as the backup_job module declares it (JOB_OPTION_KEYS: its jobs.cfg keys)."""
    id: str
    state: str = 'present'
    schedule: str = None
    vmid: List[int] = None
    all: bool = None
    pool: str = None
    exclude: List[int] = None
    node: List[str] = None
    storage: str = None
    dumpdir: str = None
    mode: str = None
    level: str = None
    chain: str = None
    chain_period: str = None
    compress: str = None
    prune_backups: str = None
    notes_template: str = None
    bwlimit: int = None
    script: str = None
    protected: bool = None
    repeat_missed: bool = False
    enabled: bool = True
    comment: str = None
    config_dir: str = CONFIG_DIR
    unit_dir: str = UNIT_DIR
    command: str = NODE_COMMAND
    check_mode: bool = False


def unit_names(job_id):
    return f"guestvault-job-{job_id}.timer", f"guestvault-job-{job_id}.service"


def render_units(job, command=NODE_COMMAND, config_dir=CONFIG_DIR):
    """(timer text, service text) of a job."""
    schedule = job.options['schedule']
    calendars = to_systemd_oncalendar(CalendarEvent.parse(schedule))
    timer_name, service_name = unit_names(job.id)
    persistent = 'true' if job.options.get('repeat-missed') else 'false'
    timer = '\n'.join([
        '[Unit]',
        f"Description=guestvault backup job {job.id} ({schedule})",
        '',
        '[Timer]',
        *[f"OnCalendar={c}" for c in calendars],
        # A run missed while the node was down happens once when it is back (repeat-missed).
        f"Persistent={persistent}",
        f"Unit={service_name}",
        '',
        '[Install]',
        'WantedBy=timers.target',
        ''])
    config = '' if config_dir == CONFIG_DIR else f" --config-dir {config_dir}"
    service = '\n'.join([
        '[Unit]',
        f"Description=guestvault backup job {job.id}",
        f"Documentation=file://{config_dir}/jobs.cfg",
        '',
        '[Service]',
        'Type=oneshot',
        f"ExecStart={command} --job {job.id}{config}",
        # Also after a kill (SIGKILL, a stop timeout): clear what the run left in QEMU and on
        # the storage now, not at the next night's run.
        f"ExecStopPost={command} --job {job.id} --cleanup{config}",
        # vzdump's default: best-effort I/O priority 7, so guests keep their disks.
        'IOSchedulingClass=best-effort',
        'IOSchedulingPriority=7',
        'Nice=10',
        ''])
    return timer, service


def schedule_warning(schedule):
    """A warning when a schedule looks like Proxmox's lone-number-is-a-minute trap."""
    return looks_like_hour_mistake(schedule)


def systemd_running():
    return os.path.isdir('/run/systemd/system') and shutil.which('systemctl') is not None


def _systemctl(*args):
    proc = subprocess.run(['systemctl', *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"systemctl {' '.join(args)} failed: {proc.stderr.strip()}")


def apply_job(job_id, options=None, state='present', config_dir=CONFIG_DIR,
              unit_dir=UNIT_DIR, command=NODE_COMMAND, check_mode=False, manage_systemd=None):
    """Make the job (and its units) exist as declared, or not at all; idempotent.

    ``options`` are jobs.cfg keys (``schedule``, ``vmid``, ``storage``, ...). Returns
    ``{'changed', 'diff': {'before', 'after'}, 'units': [...], 'warnings': [...]}``; nothing is
    written in check mode. Everything is validated before anything is written.
    """
    jobs = load_jobs(config_dir)
    warnings = []
    before_job = render_job(jobs[job_id]) if job_id in jobs else ''
    timer_name, service_name = unit_names(job_id)
    timer_path = os.path.join(unit_dir, timer_name)
    service_path = os.path.join(unit_dir, service_name)
    before = {'job': before_job, 'timer': read_text(timer_path) or '',
              'service': read_text(service_path) or ''}
    if state == 'absent':
        after = {'job': '', 'timer': '', 'service': ''}
        enabled = False
    else:
        raw = {k: v for k, v in (options or {}).items() if v is not None}
        job = Job(job_id, validate_job(job_id, _as_text(raw), f"job {job_id}"))
        _check_storage(job, config_dir, check_mode, warnings)
        _check_containers(job, config_dir, check_mode, warnings)
        timer, service = render_units(job, command, config_dir)
        enabled = job.enabled
        after = {'job': render_job(job),
                 'timer': timer if enabled else '', 'service': service if enabled else ''}
    changed = after != before
    result = {'changed': changed, 'diff': {'before': before, 'after': after},
              'units': [p for p in (timer_path, service_path) if after['timer']],
              'enabled': enabled, 'systemd': False, 'warnings': warnings}
    if not changed or check_mode:
        return result
    if state == 'absent':
        jobs.pop(job_id, None)
    else:
        jobs[job_id] = job
    save_jobs(config_dir, jobs)
    manage = systemd_running() if manage_systemd is None else manage_systemd
    if manage and before['timer'] and not after['timer']:
        _systemctl('disable', '--now', timer_name)
    for path, text in ((timer_path, after['timer']), (service_path, after['service'])):
        declare_file(path, text or None)
    if manage:
        _systemctl('daemon-reload')
        if after['timer']:
            _systemctl('enable', '--now', timer_name)
        result['systemd'] = True
    return result


def run_backup_job(request):
    """``apply_job`` as the backup_job module reports it: the diff as the files' texts, and a
    warning when the schedule looks like Proxmox's lone-number-is-a-minute trap."""
    options = {key: getattr(request, option) for option, key in JOB_OPTION_KEYS.items()}
    result = apply_job(request.id, options, request.state, request.config_dir,
                       request.unit_dir, request.command, request.check_mode)
    schedule = options.get('schedule')
    warning = schedule_warning(schedule) if schedule else None
    if warning:
        result['warnings'].append(warning)
    diff = result['diff']
    result['diff'] = {'before': '\n'.join(v for v in diff['before'].values() if v),
                      'after': '\n'.join(v for v in diff['after'].values() if v)}
    return result


def _check_storage(job, config_dir, check_mode, warnings):
    """A job's storage must be one the node defines, or every run would fail at night.

    In check mode the storage may be one that an earlier task of the same play (the
    vzdump_config role) would add, so there it is a warning instead of an error.
    """
    storage_id = job.options.get('storage')
    if not storage_id:
        return
    try:
        find_storage(config_dir, storage_id)
    except ConfigError as exc:
        if not check_mode:
            raise ConfigError(f"job {job.id}: {exc}") from None
        warnings.append(f"job {job.id}: {exc} (check mode: an earlier task may still add it)")


def _check_containers(job, config_dir, check_mode, warnings):
    """A job holds VMs and containers alike, but level inc and a chain apply to VMs only
    (a container's backup is always full): a job that asks for either and selects a container
    now would fail for it at every run. In check mode it is a warning, as for the storage."""
    level, chain = job.options.get('level'), job.options.get('chain')
    if level != 'inc' and not chain:
        return
    selection = {'vmid': job.options.get('vmid') or [], 'all': job.options.get('all', False),
                 'pool': job.options.get('pool'), 'exclude': job.options.get('exclude') or []}
    try:
        vmids = select_guests(config_dir, selection)
    except ConfigError:
        return         # it selects nobody yet; each run checks the guests it finds
    registered = {g.vmid: g for g in list_guests(config_dir)}
    for vmid in vmids:
        if vmid in registered and guest_kind(registered[vmid]).yields == TREE:
            try:
                check_container_level(vmid, level, chain)
            except ConfigError as exc:
                # level auto: the job's VMs go on with their chains, containers are full
                message = f"job {job.id}: {exc}, or leave it out of the job (exclude {vmid})"
                if not check_mode:
                    raise ConfigError(message) from None
                warnings.append(message)


def _as_text(raw):
    """Module values (lists, bools, ints) as the jobs.cfg text the parser checks."""
    text = {}
    for key, value in raw.items():
        if isinstance(value, bool):
            text[key] = '1' if value else '0'
        elif isinstance(value, (list, tuple)):
            text[key] = ','.join(str(v) for v in value)
        else:
            text[key] = str(value)
    return text
