"""One backup of one guest: lock, hooks, consistency mode, capture, finalize.

The order of steps is what makes a backup safe:

1. every option is validated and the notes template rendered before anything changes;
2. the guest is locked on the node and on the storage (``lockwait``), leftovers of killed runs are
   cleared, and the level is decided from what the storage and the guest's bitmaps say;
3. target images are created in a hidden ``.tmp`` directory; one QMP transaction fixes the point
   in time for all disks at once and adds the next bitmap of the chain;
4. when every job has succeeded the images are closed, hashed and fsynced, the manifest written,
   and the directory renamed: only now does the backup exist;
5. only then are the chain's old bitmaps dropped. A failure anywhere before that removes the new
   bitmap instead, so the previous bitmap still counts every write since the previous backup.
"""
from __future__ import annotations

import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from ..policy import chain as chains
from ..policy.config import load_storage, load_vzdump_defaults
from ..guest.consistency import MODES, StopMode, snapshot_mode, suspend_mode
from ..guest.disks import discover_disks, require_idle, select_disks
from ..errors import BackupFailed, ConfigError, GuestvaultError, HookFailed, QmpCommandFailed
from .hooks import HookScript
from ..policy.notes import render_notes
from ..format.qemu_img import allocated_bytes, create_qcow2
from ..guest.qmp import QmpSession
from .locate import require_storage, resolve_guest
from ..guest.registry import GuestEntry
from ..storage.directory import (DirStorage, file_lock, format_time, fsync_path, parse_time,
                          sha256_file)
from ..version import TOOL_VERSION

MANIFEST_FORMAT = 1
COMPRESSIONS = {'0': None, '1': 'zstd', 'zstd': 'zstd', 'gzip': 'zlib', 'zlib': 'zlib'}
# Built-in defaults, overridden by vzdump.conf, overridden by the caller (as vzdump does).
DEFAULTS = {'mode': 'snapshot', 'bwlimit': 0, 'lockwait': 180, 'stopwait': 10,
            'compress': '0', 'protected': False, 'freeze_timeout': 60}
JOB_PREFIX = 'guestvault-'
TARGET_PREFIX = 'gvt-'
RUN_DIR = os.environ.get('GUESTVAULT_RUN_DIR', '/run/lock/guestvault')


@dataclass
class BackupRequest:
    vmid: int
    qmp_socket: str = None
    agent_socket: str = None
    storage: str = None
    dumpdir: str = None
    config_dir: str = '/etc/guestvault'
    level: str = 'auto'
    chain: str = None
    chain_period: str = 'none'
    include: list = None
    exclude: list = None
    include_raw: bool = False
    mode: str = None
    stopwait: float = None       # minutes, as vzdump
    lockwait: float = None       # minutes, as vzdump
    freeze_timeout: float = None  # seconds the guest agent may take to freeze
    bwlimit: int = None          # KiB/s for the whole guest, 0 = unlimited
    max_workers: int = None
    compress: str = None
    notes_template: str = None
    protected: bool = None
    script: str = None
    cluster: str = ''
    node: str = None
    max_age: str = None          # skip when a backup younger than this exists ("12h", "1d")
    check_mode: bool = False


@dataclass
class Plan:
    """Everything decided before the first change; check mode returns exactly this."""
    request: BackupRequest
    options: dict
    guest: GuestEntry
    storage: DirStorage
    disks: list
    all_disks: list = field(default_factory=list)
    decision: chains.LevelDecision = None
    warnings: list = field(default_factory=list)
    notes: str = None
    hook: HookScript = None


def _resolve_options(request):
    defaults = load_vzdump_defaults(request.config_dir)
    options = dict(DEFAULTS)
    for key in DEFAULTS:
        if defaults.get(key) is not None:
            options[key] = defaults[key]
    for key in ('mode', 'bwlimit', 'lockwait', 'stopwait', 'compress', 'protected',
                'freeze_timeout'):
        value = getattr(request, key)
        if value is not None:
            options[key] = value
    options['compress'] = str(options['compress']).lower()
    if options['compress'] in ('true', 'false'):
        options['compress'] = '1' if options['compress'] == 'true' else '0'
    if options['compress'] not in COMPRESSIONS:
        raise ConfigError(f"compress {options['compress']!r} is not supported; use 0, 1, zstd "
                          "or gzip (lzo has no qcow2 equivalent)")
    if options['mode'] not in MODES:
        raise ConfigError(f"mode {options['mode']!r} is not one of {', '.join(MODES)}")
    for key in ('bwlimit', 'lockwait', 'stopwait', 'freeze_timeout'):
        if float(options[key]) < 0:
            raise ConfigError(f"{key} must not be negative")
    perf = defaults.get('performance') or {}
    options['max_workers'] = (request.max_workers if request.max_workers is not None
                              else perf.get('max-workers'))
    if options['max_workers'] is not None and not 1 <= int(options['max_workers']) <= 256:
        raise ConfigError(f"performance max_workers {options['max_workers']} is out of range: "
                          "use 1 to 256 parallel requests per disk")
    options['notes_template'] = request.notes_template or defaults.get('notes-template')
    options['script'] = request.script or defaults.get('script')
    options['storage'] = request.storage
    options['dumpdir'] = request.dumpdir
    if not request.storage and not request.dumpdir:
        options['storage'] = defaults.get('storage')
        options['dumpdir'] = defaults.get('dumpdir')
    return options


def _guest_entry(request):
    return resolve_guest(request.vmid, request.qmp_socket, request.agent_socket,
                         request.config_dir)


def _chain_tip(backups, chain_name):
    """The newest backup of the chain to continue: the named one, else the newest chain."""
    in_chains = [b for b in backups if b.index.get('chain') and b.index['level'] in ('full', 'inc')]
    if chain_name:
        in_chains = [b for b in in_chains if b.index['chain'] == chain_name]
    if not in_chains:
        return None
    tip = in_chains[-1]
    return chains.ChainTip(backup_time=tip.time, chain=tip.index['chain'],
                           chain_start=parse_time(tip.index['chain_start']),
                           disk_ids=tuple(d['id'] for d in tip.index['disks']
                                          if d.get('bitmap')))


def prepare_backup(request, qmp):
    """Validate the request (options, guest, storage, hook, notes), changing nothing."""
    options = _resolve_options(request)
    guest = _guest_entry(request)
    storage = require_storage(request.config_dir, options['storage'], options['dumpdir'])
    hook = HookScript(options['script']) if options['script'] else None
    options['node'] = request.node or socket.gethostname()
    guest = replace(guest, name=guest.name or _qemu_name(qmp) or f"vm{guest.vmid}")
    notes = None
    if options['notes_template']:
        notes = render_notes(options['notes_template'], {
            'cluster': request.cluster or '', 'guestname': guest.name,
            'node': options['node'], 'vmid': str(guest.vmid)})
    chains.check_level_options(request.level, request.chain, request.chain_period or 'none')
    if options['protected'] and storage.id:
        _check_protected_room(request.config_dir, storage, guest.vmid)
    plan = Plan(request, options, guest, storage, disks=[], notes=notes, hook=hook)
    _select(plan, qmp)  # unknown disk ids fail here, before any lock is taken
    return plan


def _select(plan, qmp):
    request, guest = plan.request, plan.guest
    include = request.include if request.include is not None else (guest.include or None)
    exclude = request.exclude if request.exclude is not None else (guest.exclude or None)
    plan.all_disks = discover_disks(qmp)
    plan.disks, plan.warnings = select_disks(plan.all_disks, include, exclude,
                                             request.include_raw)


def decide_backup(plan, qmp, now=None):
    """Fill in the disks and the level: what the backup would take, changing nothing."""
    request, guest = plan.request, plan.guest
    _select(plan, qmp)
    require_idle(plan.disks)
    tip = _chain_tip(plan.storage.backups(guest.vmid), request.chain)
    plan.decision = chains.decide_level(request.level, now or datetime.now(timezone.utc),
                                        plan.disks, tip, request.chain,
                                        request.chain_period or 'none')
    return plan


def _check_protected_room(config_dir, storage, vmid):
    """vzdump refuses a protected backup beyond the storage's max-protected-backups."""
    limit = load_storage(config_dir, storage.id).max_protected_backups
    count = sum(1 for b in storage.backups(vmid) if b.protected)
    if 0 <= limit <= count:
        raise ConfigError(f"guest {vmid} already has {count} protected backup(s) on "
                          f"{storage.label}, its max-protected-backups is {limit}; unprotect "
                          "one (guestvault.backup.protect) or raise the limit in storage.cfg")


def _qemu_name(qmp):
    try:
        return qmp.execute('query-name').get('name', '')
    except QmpCommandFailed:
        return ''


class _Log:
    """client.log of the backup, mirrored to the caller's log function."""

    def __init__(self, sink):
        self.sink = sink
        self.lines = []
        self.started = time.monotonic()

    def __call__(self, message):
        line = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} INFO: {message}"
        self.lines.append(line)
        if self.sink:
            self.sink(message)

    def text(self):
        return '\n'.join(self.lines) + '\n'


def _hash_and_sync(paths):
    """sha256 and fsync of every image, concurrently: hashing is CPU, fsync is I/O."""
    def one(path):
        fsync_path(path)
        return sha256_file(path)
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        return list(pool.map(one, paths))


@contextmanager
def _terminate_as_error():
    """Turn SIGTERM (systemd stop, Ansible timeout) into an exception so cleanup runs."""
    def handler(signum, frame):
        raise BackupFailed(f"interrupted by signal {signum}; the partial backup was removed")
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _clear_leftovers(qmp, vmid, log):
    """Cancel jobs and close target nodes that a killed run of this guest left in QEMU."""
    prefix = f"{JOB_PREFIX}{vmid}-"
    jobs = [j['device'] for j in qmp.execute('query-block-jobs') if j['device'].startswith(prefix)]
    for job in jobs:
        log(f"cancelling block job {job} left by an interrupted run")
        qmp.cancel_job(job)
    if jobs:
        qmp.wait_for_jobs(jobs, timeout=60)
    for node in qmp.execute('query-named-block-nodes', {'flat': True}):
        if node['node-name'].startswith(f"{TARGET_PREFIX}{vmid}-"):
            log(f"closing target node {node['node-name']} left by an interrupted run")
            try:
                qmp.execute('blockdev-del', {'node-name': node['node-name']})
            except QmpCommandFailed:
                pass


class _Capture:
    """The QEMU side of one backup: target nodes, the transaction, the jobs."""

    def __init__(self, qmp, plan, staged, when, log):
        self.qmp = qmp
        self.plan = plan
        self.staged = staged
        self.when = when
        self.log = log
        run = uuid.uuid4().hex[:6]
        vmid = plan.guest.vmid
        self.targets = {}   # disk id -> node name
        self.jobs = {}      # disk id -> job id
        self.new_bitmaps = []  # (node, name) added by the transaction
        self.disk_levels = {}
        for index, disk in enumerate(plan.disks):
            self.targets[disk.id] = f"{TARGET_PREFIX}{vmid}-{run}-{index}"
            self.jobs[disk.id] = f"{JOB_PREFIX}{vmid}-{run}-{disk.id}"

    def create_targets(self):
        """Create the target images and open them in QEMU."""
        self._create_images()
        self.open_targets()

    def open_targets(self):
        for disk in self.plan.disks:
            self.qmp.execute('blockdev-add', {
                'driver': 'qcow2', 'node-name': self.targets[disk.id],
                'file': {'driver': 'file', 'filename': self.staged.file(f"{disk.id}.qcow2")}})

    def _create_images(self):
        decision = self.plan.decision
        compression = COMPRESSIONS[self.plan.options['compress']]
        parent = format_time(decision.parent) if decision.parent else None
        for disk in self.plan.disks:
            chained = decision.level == 'inc' and disk.supports_bitmaps
            self.disk_levels[disk.id] = 'inc' if chained else 'full'
            path = self.staged.file(f"{disk.id}.qcow2")
            backing = f"../{parent}/{disk.id}.qcow2" if chained else None
            create_qcow2(path, disk.virtual_size, backing=backing, compression=compression)

    def remove_colliding_bitmaps(self):
        """A run killed within this same second left the bitmap this run is about to add; it
        counts nothing that a stored backup needs (QEMU refuses remove+add in one transaction)."""
        new = chains.bitmap_name(self.plan.decision.chain, self.when)
        for disk in self.plan.disks:
            if any(b['name'] == new for b in disk.bitmaps):
                self.qmp.execute('block-dirty-bitmap-remove', {'node': disk.node, 'name': new})

    def actions(self):
        decision = self.plan.decision
        options = self.plan.options
        speed = int(options['bwlimit']) * 1024 // len(self.plan.disks)
        actions = []
        for disk in self.plan.disks:
            job = {'job-id': self.jobs[disk.id], 'device': disk.node,
                   'target': self.targets[disk.id], 'sync': 'full'}
            if speed:
                job['speed'] = speed
            if options['max_workers']:
                job['x-perf'] = {'max-workers': int(options['max_workers'])}
            if COMPRESSIONS[options['compress']]:
                job['compress'] = True
            if decision.level != 'copy' and disk.supports_bitmaps:
                new = chains.bitmap_name(decision.chain, self.when)
                actions.append(('block-dirty-bitmap-add',
                                {'node': disk.node, 'name': new, 'persistent': True}))
                self.new_bitmaps.append((disk.node, new))
                if self.disk_levels[disk.id] == 'inc':
                    # bitmap-mode never: the parent's bitmap is dropped only after the backup is
                    # safely stored, so a failure here loses nothing.
                    job.update({'sync': 'bitmap', 'bitmap-mode': 'never',
                                'bitmap': chains.bitmap_name(decision.chain, decision.parent)})
            actions.append(('blockdev-backup', job))
        return actions

    def run_jobs(self, progress=None):
        outcomes = self.qmp.wait_for_jobs(list(self.jobs.values()), progress=progress)
        failed = [o for o in outcomes.values() if not o.ok]
        if failed or len(outcomes) < len(self.jobs):
            real = [o for o in failed if o.error != 'cancelled'] or failed
            raise BackupFailed("backup job failed: " + '; '.join(
                f"{o.job_id}: {o.error}" for o in real))
        return {disk: outcomes[job] for disk, job in self.jobs.items()}

    def close_targets(self):
        for node in self.targets.values():
            try:
                self.qmp.execute('blockdev-del', {'node-name': node})
            except QmpCommandFailed:
                pass  # never added, or already closed

    def abort(self):
        """Undo the QEMU side after a failure: stop jobs, close targets, drop new bitmaps."""
        try:
            running = {j['device'] for j in self.qmp.execute('query-block-jobs')}
            mine = [j for j in self.jobs.values() if j in running]
            for job in mine:
                self.qmp.cancel_job(job)
            if mine:
                self.qmp.wait_for_jobs(mine, timeout=60)
            self.close_targets()
            for node, name in self.new_bitmaps:
                try:
                    self.qmp.execute('block-dirty-bitmap-remove', {'node': node, 'name': name})
                except QmpCommandFailed:
                    pass
        except GuestvaultError as exc:  # QEMU gone: its bitmaps went with it
            self.log(f"cleanup in QEMU incomplete: {exc}")


def run_backup(request, log=None, progress=None, now=None):
    """Take one backup as ``request`` says; returns a result dict (see guest_backup RETURN)."""
    with QmpSession(_socket_for(request)) as qmp:
        return _run(request, qmp, log, progress, now)


def _socket_for(request):
    return request.qmp_socket or _guest_entry(request).qmp_socket


def _run(request, qmp, log, progress, now):
    started = time.monotonic()
    clog = _Log(log)
    plan = prepare_backup(request, qmp)
    skip = _recent_enough(plan, now or datetime.now(timezone.utc))
    if skip is not None:
        return skip
    if request.check_mode:
        result = _plan_result(decide_backup(plan, qmp, now))
        result['changed'] = True
        return result
    vmid = plan.guest.vmid
    lock_wait = float(plan.options['lockwait']) * 60
    os.makedirs(RUN_DIR, exist_ok=True)
    with ExitStack() as stack:
        stack.enter_context(_terminate_as_error())
        stack.enter_context(file_lock(os.path.join(RUN_DIR, f"{vmid}.lock"), lock_wait,
                                      f"guest {vmid} on this node"))
        stack.enter_context(plan.storage.guest_lock(vmid, lock_wait))
        # Leftovers of a killed run first: its job would still hold the disks.
        _clear_leftovers(qmp, vmid, clog)
        for name in plan.storage.remove_stale(vmid):
            clog(f"removed {name}, left by an interrupted run")
        decide_backup(plan, qmp, now)
        if plan.decision.fallback:
            clog(plan.decision.reason)
        return _take(plan, qmp, clog, progress, started)


_AGE_UNITS = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400, 'w': 604800}


def parse_age(text):
    """Seconds in an age such as ``90``, ``90s``, ``30m``, ``12h``, ``1d`` or ``2w``."""
    value = str(text).strip().lower()
    unit = _AGE_UNITS.get(value[-1:], None)
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        seconds = -1
    if seconds <= 0:
        raise ConfigError(f"max_age {text!r} is not an age: use a positive number of seconds or "
                          "a number with s, m, h, d or w (e.g. 12h)")
    return seconds


def _recent_enough(plan, now):
    """With max_age: the result of a skipped run when a recent enough backup exists, else None.

    This is what makes a playbook that takes backups idempotent: running it twice within
    max_age takes one backup.
    """
    if not plan.request.max_age:
        return None
    limit = parse_age(plan.request.max_age)
    backups = plan.storage.backups(plan.guest.vmid)
    if plan.request.chain:
        backups = [b for b in backups if b.index.get('chain') == plan.request.chain]
    if not backups:
        return None
    newest = backups[-1]
    age = (now - newest.time).total_seconds()
    if age >= limit:
        return None
    index = newest.index
    reason = f"backup {newest.id} is {age:.0f} s old, younger than max_age {plan.request.max_age}"
    notes_path = os.path.join(newest.path, 'notes')
    return {
        'changed': False, 'vmid': plan.guest.vmid, 'guest_name': plan.guest.name,
        'backup': newest.id, 'backup_dir': newest.path, 'time': index['time'],
        'level': index['level'], 'requested_level': plan.request.level, 'level_reason': reason,
        'skipped_reason': reason, 'chain': index.get('chain'), 'parent': index.get('parent'),
        'mode': index.get('mode'), 'storage': plan.storage.id,
        'storage_path': plan.storage.path, 'disks': index['disks'],
        'notes': open(notes_path).read() if os.path.exists(notes_path) else None,
        'protected': newest.protected, 'warnings': [],
    }


def _plan_result(plan):
    d = plan.decision
    return {
        'changed': False, 'vmid': plan.guest.vmid, 'guest_name': plan.guest.name,
        'level': d.level, 'requested_level': plan.request.level, 'level_reason': d.reason,
        'chain': d.chain, 'parent': d.as_dict()['parent'], 'mode': plan.options['mode'],
        'storage': plan.storage.id, 'storage_path': plan.storage.path,
        'disks': [{'id': x.id, 'node': x.node, 'format': x.format,
                   'virtual_size': x.virtual_size,
                   'level': 'inc' if d.level == 'inc' and x.supports_bitmaps else 'full'}
                  for x in plan.disks],
        'warnings': list(plan.warnings) + list(d.warnings),
        'notes': plan.notes, 'protected': bool(plan.options['protected']),
    }


def _hook_env(plan, target, logfile):
    return {'STOREID': plan.storage.id or '', 'DUMPDIR': plan.storage.path, 'VMTYPE': 'qemu',
            'HOSTNAME': plan.options['node'], 'TARGET': target, 'LOGFILE': logfile}


def _take(plan, qmp, clog, progress, started):
    vmid = plan.guest.vmid
    mode = plan.options['mode']
    now = datetime.now(timezone.utc).replace(microsecond=0)
    existing = plan.storage.backups(vmid)
    while existing and now <= existing[-1].time:
        time.sleep(0.2)  # one backup per second at most: names are times to the second
        now = datetime.now(timezone.utc).replace(microsecond=0)
    staged = plan.storage.stage(vmid, now)
    env = _hook_env(plan, staged.final_path, staged.file('client.log'))

    def hook(phase):
        if plan.hook:
            plan.hook.run(phase, mode=mode, vmid=vmid, env=env, log=clog)

    capture = _Capture(qmp, plan, staged, now, clog)
    qmp_at_start = qmp
    report = None
    try:
        clog(f"starting backup of VM {vmid} ({plan.guest.name}) to {plan.storage.label}: "
             f"level {plan.decision.level} ({plan.decision.reason}), mode {mode}")
        hook('backup-start')
        capture.create_targets()
        if plan.decision.chain:
            capture.remove_colliding_bitmaps()
        with _consistency_mode(plan, capture, hook, clog) as report:
            capture.qmp.transaction(capture.actions())
        qmp = capture.qmp  # stop mode reconnects if QEMU exited on shutdown
        clog(f"point in time {format_time(now)} fixed for disks "
             + ', '.join(d.id for d in plan.disks))
        copy_started = time.monotonic()
        outcomes = capture.run_jobs(progress)
        copy_seconds = time.monotonic() - copy_started
        capture.close_targets()
        disks = _finish_disks(plan, capture, outcomes, staged)
        index = _manifest(plan, now, capture, disks, report, time.monotonic() - started)
        clog(f"backup finished: {sum(d['bytes_written'] for d in disks)} bytes of guest data "
             f"in {copy_seconds:.2f} s")
        _write_metadata(plan, qmp, staged, index, clog)
        staged.commit()
        hook('backup-end')
    except BaseException as exc:
        clog(f"backup failed: {exc}")
        capture.abort()
        # Also after the rename: a backup whose backup-end hook failed is not kept.
        staged.discard()
        if plan.hook and not isinstance(exc, KeyboardInterrupt):
            try:
                hook('backup-abort')
            except HookFailed as hook_exc:
                clog(f"backup-abort hook failed too: {hook_exc}")
        raise
    # The backup is stored and complete: from here on, problems are warnings, never a reason to
    # drop it. A bitmap not retired now is retired by the chain's next backup.
    try:
        for node, name in chains.bitmaps_to_retire(plan.all_disks, plan.decision, now):
            qmp.execute('block-dirty-bitmap-remove', {'node': node, 'name': name})
            clog(f"dropped bitmap {name}, superseded by this backup")
    except GuestvaultError as exc:
        plan.warnings.append(f"could not drop the chain's previous bitmap ({exc}); the next "
                             "backup of the chain will")
    env.update(LOGFILE=os.path.join(staged.path, 'client.log'))
    try:
        hook('log-end')  # as vzdump: a failing log-end only warns
    except HookFailed as exc:
        plan.warnings.append(str(exc))
    staged.write('client.log', clog.text())
    if capture.qmp is not qmp_at_start:
        capture.qmp.close()
    result = _plan_result(plan)
    bytes_written = sum(d['bytes_written'] for d in disks)
    result.update({
        'changed': True, 'backup': f"vm/{vmid}/{format_time(now)}", 'backup_dir': staged.path,
        'time': format_time(now), 'disks': disks, 'duration': round(index['duration'], 3),
        'copy_seconds': round(copy_seconds, 3),
        'throughput': int(bytes_written / copy_seconds) if copy_seconds > 0 else 0,
        'bytes_written': bytes_written,
        'warnings': result['warnings'] + (report.warnings if report else []),
        'frozen_filesystems': report.frozen if report else None,
        'freeze_seconds': report.freeze_seconds if report else None,
        'pause_seconds': report.pause_seconds if report else None,
        'downtime_seconds': report.downtime_seconds if report else None,
    })
    return result


def _consistency_mode(plan, capture, hook, clog):
    """The context manager of the plan's mode, entered around the point in time."""
    mode = plan.options['mode']
    if mode == 'snapshot':
        return snapshot_mode(capture.qmp, plan.guest.agent_socket,
                             float(plan.options['freeze_timeout']), clog)
    if mode == 'suspend':
        return suspend_mode(capture.qmp, clog)

    def reconnected(session):
        # QEMU exited on shutdown and was started again: node names may differ, and the
        # target nodes opened in the old process are gone.
        capture.qmp = session
        current = {d.id: d.node for d in discover_disks(session)}
        for disk in plan.disks:
            disk.node = current[disk.id]
        capture.open_targets()
    return StopMode(capture.qmp, plan.guest.agent_socket, float(plan.options['stopwait']) * 60,
                    plan.guest.start_command, hook, clog,
                    on_reconnect=reconnected).around_point_in_time()


def _finish_disks(plan, capture, outcomes, staged):
    files = [staged.file(f"{d.id}.qcow2") for d in plan.disks]
    hashes = _hash_and_sync(files)
    decision = plan.decision
    disks = []
    for disk, path, digest in zip(plan.disks, files, hashes):
        outcome = outcomes[disk.id]
        level = capture.disk_levels[disk.id]
        disks.append({
            'id': disk.id, 'node': disk.node, 'format': disk.format,
            'virtual_size': disk.virtual_size, 'file': os.path.basename(path),
            'level': level, 'bytes_written': allocated_bytes(path),
            'bytes_processed': outcome.offset,
            'size': os.path.getsize(path), 'sha256': digest,
            'bitmap': chains.bitmap_name(decision.chain, capture.when)
            if decision.level != 'copy' and disk.supports_bitmaps else None,
            'backing': f"../{format_time(decision.parent)}/{disk.id}.qcow2"
            if level == 'inc' else None,
        })
    return disks


def _manifest(plan, when, capture, disks, report, duration):
    decision = plan.decision
    chain_start = when
    if decision.level == 'inc':
        parent = [b for b in plan.storage.backups(plan.guest.vmid) if b.time == decision.parent]
        chain_start = parse_time(parent[0].index['chain_start'])
    return {
        'format': MANIFEST_FORMAT, 'tool': f"guestvault {TOOL_VERSION}",
        'vmid': plan.guest.vmid, 'guest_name': plan.guest.name, 'node': plan.options['node'],
        'time': format_time(when), 'level': decision.level, 'level_reason': decision.reason,
        'parent': format_time(decision.parent) if decision.parent else None,
        'chain': decision.chain,
        'chain_start': format_time(chain_start) if decision.chain else None,
        'mode': plan.options['mode'], 'compress': COMPRESSIONS[plan.options['compress']],
        'disks': disks, 'duration': duration,
        'frozen_filesystems': report.frozen if report else None,
        'warnings': list(plan.warnings) + (report.warnings if report else []),
    }


def _write_metadata(plan, qmp, staged, index, clog):
    guest = {
        'vmid': plan.guest.vmid, 'name': plan.guest.name,
        'registry': {k: v for k, v in asdict(plan.guest).items() if k != 'source'},
        'qemu': qmp.execute('query-version'),
        'status': qmp.execute('query-status'),
        'disks': [d.as_dict() for d in plan.disks],
    }
    staged.write_json('guest.json', guest)
    if plan.notes:
        staged.write('notes', plan.notes)
    if plan.options['protected']:
        staged.write('.protected', '')
    staged.write_json('index.json', index)
    staged.write('client.log', clog.text())
