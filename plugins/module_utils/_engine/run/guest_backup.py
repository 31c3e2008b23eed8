"""One backup of one guest: lock, hooks, consistency mode, capture, finalize.

The order of steps is what makes a backup safe:

1. every option is validated and the notes template rendered before anything changes;
2. the guest is held on the node before its QMP socket is opened (a second run waits, up to
   ``lockwait``), then locked on the storage; what killed runs left is cleared, the level is
   decided from what the storage and the guest's bitmaps say, and orphan bitmaps are removed;
3. target images are created in a hidden ``.tmp`` directory; one QMP transaction fixes the point
   in time for all disks at once and adds the next bitmap of the chain;
4. when every job has succeeded the images are closed, hashed and fsynced, the manifest written,
   and the directory renamed: only now does the backup exist;
5. only then are the chain's old bitmaps dropped. A failure anywhere before that removes the new
   bitmap instead, so the previous bitmap still counts every write since the previous backup.
"""
from __future__ import annotations

import errno
import os
import signal
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta, timezone

from ..errors import BackupFailed, ConfigError, GuestvaultError, HookFailed
from ..format.base import accept_capture
from ..format.capture import TREE
from ..guest.capture import DiskJob
from ..guest.disks import discover_disks, require_idle, select_disks
from ..guest.kind import GuestKind, guest_kind
from ..guest.nbd import require_libnbd
from ..guest.registry import GuestEntry
from ..paths import CONFIG_DIR
from ..policy import chain as chains
from ..policy.config import inert_option_warning, load_vzdump_defaults
from ..policy.notes import render_notes
from ..storage import catalog
from ..storage.files import private_files
from ..times import format_time, parse_age, parse_time
from ..vocabulary import COMPRESS, LZO_ADVICE, MODES, QCOW2_COMPRESSION, normalize_compress
from . import guest_runs, leftovers
from .backup_log import BackupLog
from .hooks import HookScript
from .locate import format_of, require_storage, resolve_guest
from .notices import notified_backup
from .protect import check_protected_room
from .opener import guest_lock
from .request import Request
from .tree_backup import run_tree_backup, tree_options

# Built-in defaults, overridden by vzdump.conf, overridden by the caller (as vzdump does).
DEFAULTS = {'mode': 'snapshot', 'bwlimit': 0, 'lockwait': 180, 'stopwait': 10,
            'compress': '0', 'protected': False, 'freeze_timeout': 60}


@dataclass
class GuestBackupRequest(Request):
    vmid: int
    qmp_socket: str = None
    agent_socket: str = None
    storage: str = None
    dumpdir: str = None
    config_dir: str = CONFIG_DIR
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
    # containers (run/tree_backup.py); None: vzdump.conf's, else vzdump's default
    exclude_path: list = None
    stdexcludes: bool = None
    tmpdir: str = None
    zstd: int = None             # zstd threads, 0: half of the cores
    pigz: int = None             # gzip with pigz threads when > 0
    stdout: object = None        # a binary stream: the archive goes there, nothing else is kept
    warn_inert: bool = True      # warn about vzdump.conf options that have no effect yet
    # The call's type=vzdump notification (run/notices.py): the module's, not each guest's of
    # a node command run, which sends one for the whole run.
    notify: bool = False
    notification_mode: str = None   # None: vzdump.conf's, else auto
    mailto: list = None
    mailnotification: str = None
    check_mode: bool = False

    @classmethod
    def from_params(cls, params, check_mode=False):
        """The module nests max_workers in ``performance``, as vzdump.conf does, and sends its
        call's notification."""
        request = super().from_params(params, check_mode)
        request.max_workers = (params.get('performance') or {}).get('max_workers')
        request.notify = True
        return request


@dataclass
class Plan:
    """Everything decided before the first change; check mode returns exactly this."""
    request: GuestBackupRequest
    options: dict
    guest: GuestEntry
    kind: GuestKind              # how the guest is reached and captured (its entry's type)
    storage: object              # a storage.base.Storage
    format: object               # the storage's format.base.Format
    disks: list
    all_disks: list = field(default_factory=list)
    decision: chains.LevelDecision = None
    warnings: list = field(default_factory=list)
    notes: str = None
    hook: HookScript = None
    when: datetime = None        # the backup's name: its point in time, to the second
    expected_bytes: int = 0      # about what the backup will write


def _resolve_options(request, kind_name='qemu'):
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
    options['compress'] = normalize_compress(options['compress'])
    if options['compress'] not in COMPRESS:
        raise ConfigError(f"compress {options['compress']!r} is not one of "
                          f"{', '.join(COMPRESS)}")
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
    options['inert'] = inert_option_warning(defaults, 'vzdump.conf', kind_name) \
        if request.warn_inert else None
    options.update(tree_options(request, defaults))
    options['node'] = request.node or socket.gethostname()
    return options


def _guest_entry(request):
    return resolve_guest(request.vmid, request.qmp_socket, request.agent_socket,
                         request.config_dir)


def prepare_backup(request, qmp, options=None, guest=None, kind=None):
    """Validate the request (options, guest, storage, hook, notes), changing nothing."""
    options = options or _resolve_options(request)
    guest = guest or _guest_entry(request)
    kind = kind or guest_kind(guest)
    if options['compress'] not in QCOW2_COMPRESSION:
        raise ConfigError(LZO_ADVICE if options['compress'] == 'lzo' else
                          f"compress {options['compress']!r} has no qcow2 equivalent")
    storage = require_storage(request.config_dir, options['storage'], options['dumpdir'],
                              options['node'])
    hook = HookScript(options['script']) if options['script'] else None
    guest = replace(guest, name=guest.name or qmp.guest_name() or f"vm{guest.vmid}")
    notes = None
    if options['notes_template']:
        notes = render_notes(options['notes_template'], {
            'cluster': request.cluster or '', 'guestname': guest.name,
            'node': options['node'], 'vmid': str(guest.vmid)})
    chains.check_level_options(request.level, request.chain, request.chain_period or 'none')
    if options['protected']:
        check_protected_room(request.config_dir, storage, guest.vmid)
    plan = Plan(request, options, guest, kind, storage, format=format_of(storage), disks=[],
                notes=notes, hook=hook)
    given = [name for name in ('exclude_path', 'stdexcludes', 'tmpdir', 'zstd', 'pigz')
             if getattr(request, name) not in (None, [])]
    if given:
        plan.warnings.append(f"{', '.join(given)} apply to container backups only; they have "
                             f"no effect on VM {guest.vmid}'s backup")
    accept_capture(plan.format, kind.yields, storage.label)
    if plan.format.capture == 'pull':
        require_libnbd(f"a backup into {storage.label}")  # before anything changes
        if options['compress'] != '0':
            options['format_warning'] = (
                f"compress {options['compress']} has no effect on {storage.label}: a datastore "
                "stores every chunk zstd-compressed when that makes it smaller, as Proxmox "
                "Backup Server does")
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
    """Fill in the disks, the backup's name and its level: what the backup would take,
    changing nothing."""
    request, guest = plan.request, plan.guest
    _select(plan, qmp)  # again: a clean-up may have just ended a job or removed bitmaps
    require_idle(plan.disks)
    # The name first: a new generated chain is named after its full backup, so two backups
    # within one second (named a second apart) never share a chain name.
    plan.when = _free_of_bitmaps(plan.storage.next_backup_time(
        guest.vmid, now or datetime.now(timezone.utc)), plan.all_disks)
    backups, damaged = plan.storage.scan(guest.vmid)
    tip = chains.chain_tip(backups, request.chain)
    plan.decision = chains.decide_level(request.level, plan.when, plan.disks, tip,
                                        request.chain, request.chain_period or 'none',
                                        plan.format.key_fingerprint)
    newer = [d for d in damaged if not backups or d.time > backups[-1].time]
    if newer:
        # The level is decided from the good backups only; say so rather than pass it over.
        after = (f"after {backups[-1].id}, the newest good backup" if backups
                 else "as if the guest had no backup")
        plan.warnings.append(catalog.damaged_warning(
            newer, f"This backup is {plan.decision.level} ({plan.decision.reason}), decided "
            f"{after}"))
    return plan


def _free_of_bitmaps(when, disks):
    """``when``, or the first second after it that names none of our bitmaps on ``disks``. A
    bitmap's name holds its chain (a new generated chain is the full's time) and the time it
    counts from, and the names are per disk, not per storage: a full into another storage
    within the same second would otherwise add a bitmap that exists already, which QEMU
    refuses."""
    used = {part for disk in disks for bitmap in disk.bitmaps
            for part in chains.parse_bitmap_name(bitmap['name']) or ()}
    while chains.stamp(when) in used:
        when += timedelta(seconds=1)
    return when


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


def run_guest_backup(request, log=None, progress=None, now=None):
    """Take one backup as ``request`` says; returns a result dict (see guest_backup RETURN).
    With ``request.notify`` (the module), the call's vzdump notification goes out too.

    The guest is held on this node before its QMP socket is opened (QEMU serves one client at a
    time), so a second run of the same guest waits for the first, up to ``lockwait``.
    """
    if request.notify and not request.check_mode:
        return notified_backup(request, lambda say: _backup(request, say, progress, now), log)
    return _backup(request, log, progress, now)


def _backup(request, log, progress, now):
    started = time.monotonic()
    clog = BackupLog(log)
    guest = _guest_entry(request)
    kind = guest_kind(guest)
    options = _resolve_options(request, kind.name)
    if request.stdout is not None and kind.yields != TREE:
        raise ConfigError(f"guest {guest.vmid} is a VM: stdout takes a container's archive "
                          "only (vzdump writes a VM's as VMA, which guestvault does not); "
                          "back it up to a storage instead")
    if kind.yields == TREE:     # a container: vzdump's archive of its file tree
        with _terminate_as_error():
            return run_tree_backup(request, options, guest, kind, log, now)
    with ExitStack() as stack:
        stack.enter_context(_terminate_as_error())
        stack.enter_context(private_files())
        stack.enter_context(guest_runs.hold(guest.vmid, 'backup',
                                            float(options['lockwait']) * 60, clog))
        qmp = stack.enter_context(kind.connect(guest))
        plan = prepare_backup(request, qmp, options, guest, kind)
        skip = _recent_enough(plan, now or datetime.now(timezone.utc))
        if skip is not None:
            return skip
        if request.check_mode:
            decide_backup(plan, qmp, now)
            _check_room(plan, clog)
            return dict(_plan_result(plan), changed=True)
        vmid = plan.guest.vmid
        stack.enter_context(guest_lock(plan.storage, vmid, 'backup', options['lockwait'],
                                       shared=False))
        stack.enter_context(plan.storage.writer(float(options['lockwait']) * 60))
        # Leftovers of killed runs first: their jobs would still hold the disks.
        leftovers.clear(qmp, vmid, plan.all_disks, plan.storage, clog)
        decide_backup(plan, qmp, now)
        if plan.decision.fallback:
            clog(plan.decision.reason)
        # Decided, so the reason could still name them: now the bitmaps nobody needs go.
        leftovers.remove_orphans(qmp, vmid, plan.all_disks, plan.storage, clog)
        _check_room(plan, clog)
        return _take(plan, qmp, clog, progress, started)


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
        backups = [b for b in backups if b.manifest.chain == plan.request.chain]
    if not backups:
        return None
    newest = backups[-1]
    age = (now - newest.time).total_seconds()
    if age >= limit:
        return None
    manifest = newest.manifest
    reason = f"backup {newest.id} is {age:.0f} s old, younger than max_age {plan.request.max_age}"
    return {
        'changed': False, 'vmid': plan.guest.vmid, 'guest_name': plan.guest.name,
        'backup': newest.id, 'backup_dir': newest.path, 'time': manifest.time,
        'level': manifest.level, 'requested_level': plan.request.level, 'level_reason': reason,
        'skipped_reason': reason, 'chain': manifest.chain, 'parent': manifest.parent,
        'mode': manifest.mode, 'storage': plan.storage.id,
        'storage_path': plan.storage.path, 'disks': manifest.to_dict()['disks'],
        'notes': newest.notes,
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
        'warnings': [w for w in (plan.options['inert'], plan.options.get('format_warning')) if w]
        + list(plan.warnings)
        + list(d.warnings),
        'notes': plan.notes, 'protected': bool(plan.options['protected']),
    }


@contextmanager
def _readable_log(staged, vmid, clog):
    """A plain text file holding the backup's log, for the log-end hook: the stored log itself,
    or (a datastore keeps it as a blob, encrypted with a key) a private copy in the run
    directory, removed after the hook."""
    if staged.text_log_path is not None:
        yield staged.text_log_path
        return
    path = os.path.join(guest_runs.run_dir(), f"{vmid}.log-end.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, 'O_CLOEXEC', 0), 0o600)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8', errors='replace') as handle:
            handle.write(clog.text())
        yield path
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _hook_env(plan, target, logfile):
    return {'STOREID': plan.storage.id or '', 'DUMPDIR': plan.storage.path,
            'VMTYPE': plan.kind.name,
            'HOSTNAME': plan.options['node'], 'TARGET': target, 'LOGFILE': logfile}


def _take(plan, qmp, clog, progress, started):
    vmid = plan.guest.vmid
    mode = plan.options['mode']
    decision = plan.decision
    now = plan.when
    staged = plan.storage.stage(vmid, now)
    env = _hook_env(plan, staged.final_path, staged.log_path)

    def hook(phase):
        if plan.hook:
            plan.hook.run(phase, mode=mode, vmid=vmid, env=env, log=clog)

    capture = None
    targets = {}
    qmp_at_start = qmp
    report = None
    try:
        clog(f"starting backup of VM {vmid} ({plan.guest.name}) to {plan.storage.label}: "
             f"level {decision.level} ({decision.reason}), mode {mode}")
        hook('backup-start')
        compression = QCOW2_COMPRESSION[plan.options['compress']]
        targets = plan.format.create_targets(staged, plan.disks, decision, compression)
        capture = _capture(plan, qmp, targets, now, clog)
        _journal(plan, staged, capture)
        capture.open_targets()
        with _consistency_mode(plan, capture, staged, hook, clog) as report:
            capture.start(speed_per_disk=int(plan.options['bwlimit']) * 1024 // len(plan.disks),
                          max_workers=plan.options['max_workers'], compress=bool(compression))
        qmp = capture.qmp  # stop mode reconnects if QEMU exited on shutdown
        clog(f"point in time {format_time(now)} fixed for disks "
             + ', '.join(d.id for d in plan.disks))
        copy_started = time.monotonic()
        processed = plan.format.copy(staged, capture, targets, progress,
                                     bwlimit_kib=int(plan.options['bwlimit']),
                                     max_workers=plan.options['max_workers'], log=clog)
        copy_seconds = time.monotonic() - copy_started
        capture.close_targets()
        disks = plan.format.finish_disks(
            staged, plan.disks, targets, processed,
            {job.disk.id: job.new_bitmap for job in capture.disk_jobs})
        manifest = _manifest(plan, now, disks, report, time.monotonic() - started)
        clog(f"backup finished: {sum(d.bytes_written for d in disks)} bytes of guest data "
             f"in {copy_seconds:.2f} s")
        _write_metadata(plan, qmp, staged, manifest, clog)
        staged.commit()
        hook('backup-end')
    except BaseException as exc:
        clog(f"backup failed: {exc}")
        if capture is not None:
            capture.abort()
        plan.format.discard_targets(targets)
        guest_runs.forget(vmid)
        full = _storage_full(plan, exc)
        # Also after the rename: a backup whose backup-end hook failed is not kept.
        staged.discard()
        if plan.hook and not isinstance(exc, KeyboardInterrupt):
            try:
                hook('backup-abort')
            except HookFailed as hook_exc:
                clog(f"backup-abort hook failed too: {hook_exc}")
        if full:
            raise full from exc
        raise
    # The backup is stored and complete: from here on, problems are warnings, never a reason to
    # drop it. A bitmap not retired now is an orphan the next run of the guest removes.
    _stop_here_for_tests('after-commit')
    try:
        for node, name in chains.bitmaps_to_retire(plan.all_disks, decision, now):
            qmp.remove_bitmap(node, name, missing_ok=False)
            clog(f"dropped bitmap {name}, superseded by this backup")
    except GuestvaultError as exc:
        plan.warnings.append(f"could not drop the chain's previous bitmap ({exc}); the next "
                             "run of the guest will")
    guest_runs.forget(vmid)
    # As vzdump: the log is complete and in place when log-end runs, so the hook can keep it
    staged.write_log(clog.text())
    with _readable_log(staged, vmid, clog) as logfile:
        env.update(LOGFILE=logfile)
        try:
            hook('log-end')  # as vzdump: a failing log-end only warns
        except HookFailed as exc:
            plan.warnings.append(str(exc))
    if capture.qmp is not qmp_at_start:
        capture.qmp.close()
    result = _plan_result(plan)
    bytes_written = sum(d.bytes_written for d in disks)
    result.update({
        'changed': True, 'backup': f"vm/{vmid}/{format_time(now)}", 'backup_dir': staged.path,
        'time': format_time(now), 'disks': [d.to_dict() for d in disks],
        'duration': round(manifest.duration, 3),
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


def _check_room(plan, clog):
    """Warn before starting when the storage has less room than the backup will need."""
    plan.expected_bytes = chains.expected_bytes(plan.decision, plan.disks)
    free = plan.storage.free_bytes()
    if free < plan.expected_bytes:
        warning = (f"{plan.storage.label} has {free} bytes free, and this {plan.decision.level} "
                   f"backup will write about {plan.expected_bytes} bytes (the disks' "
                   + ("dirty bytes" if plan.decision.level == 'inc' else "allocated size")
                   + "); it may run out of space: prune older backups or free space first")
        plan.warnings.append(warning)
        clog(f"WARNING: {warning}")


def _storage_full(plan, exc):
    """The error to raise when the backup failed because the storage filled up, else None."""
    text = str(exc)
    if not (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) \
            and 'No space left on device' not in text:
        return None
    return BackupFailed(
        f"{plan.storage.label} is full: {plan.storage.free_bytes()} bytes free, and this "
        f"backup needed about {plan.expected_bytes} bytes; nothing was kept. Free space on it "
        "or prune older backups (guestvault.backup.prune), then run the backup again "
        f"({text})")


def _journal(plan, staged, capture):
    """What a kill from here on would leave behind, for the next run to clear."""
    guest_runs.record(
        plan.guest.vmid, storage_path=plan.storage.path, staged_dir=staged.path,
        final_dir=staged.final_path, **capture.journal_entries())


def _capture(plan, qmp, targets, when, clog):
    """The guest kind's capture, as the format reads it: for a VM, QEMU writes the targets
    (push), or exports the point in time over NBD for the engine to read (pull)."""
    jobs = [_disk_job(plan, disk, targets[disk.id], when) for disk in plan.disks]
    return plan.kind.capture(qmp, plan.guest.vmid, jobs, plan.format.capture, clog,
                             socket_path=guest_runs.nbd_socket(plan.guest.vmid))


def _stop_here_for_tests(point):
    """A test stops a run at ``point`` (GUESTVAULT_TEST_STOP=point:marker): the run creates the
    marker file and waits to be killed, so a test can kill it in a window that is otherwise a
    few milliseconds wide."""
    wanted, marker = (os.environ.get('GUESTVAULT_TEST_STOP', '') + ':').split(':')[:2]
    if wanted == point and marker:
        with open(marker, 'w'):
            pass
        while True:
            time.sleep(1)


def _disk_job(plan, disk, target, when):
    """The transaction's part for one disk: the chain's next bitmap, and for an incremental the
    bitmap it copies the changes of."""
    decision = plan.decision
    chained = decision.level != 'copy' and disk.supports_bitmaps
    return DiskJob(
        disk, target.path,
        new_bitmap=chains.bitmap_name(decision.chain, when) if chained else None,
        since_bitmap=chains.bitmap_name(decision.chain, decision.parent)
        if target.level == 'inc' else None)


def _consistency_mode(plan, capture, staged, hook, clog):
    """The guest kind's context manager of the plan's mode, entered around the point in
    time."""
    def reconnected():
        # The guest was restarted (stop mode): what a kill would leave has changed, and the
        # targets opened in the old process are gone.
        _journal(plan, staged, capture)
        capture.open_targets()
    return plan.kind.consistency(plan.options['mode'], capture, plan.guest, plan.options,
                                 plan.disks, hook, clog, reconnected)


def _manifest(plan, when, disks, report, duration):
    decision = plan.decision
    chain_start = when
    if decision.level == 'inc':
        parent = [b for b in plan.storage.backups(plan.guest.vmid) if b.time == decision.parent]
        chain_start = parse_time(parent[0].manifest.chain_start)
    return plan.format.manifest({
        'vmid': plan.guest.vmid, 'guest_name': plan.guest.name, 'node': plan.options['node'],
        'time': format_time(when), 'level': decision.level, 'level_reason': decision.reason,
        'parent': format_time(decision.parent) if decision.parent else None,
        'chain': decision.chain,
        'chain_start': format_time(chain_start) if decision.chain else None,
        'mode': plan.options['mode'], 'compress': QCOW2_COMPRESSION[plan.options['compress']],
        'disks': disks, 'duration': duration,
        'frozen_filesystems': report.frozen if report else None,
        'warnings': list(plan.warnings) + (report.warnings if report else []),
    })


def _write_metadata(plan, qmp, staged, manifest, clog):
    guest = {
        'vmid': plan.guest.vmid, 'name': plan.guest.name,
        'registry': {k: v for k, v in asdict(plan.guest).items() if k != 'source'},
        **qmp.describe(),
        'disks': [d.as_dict() for d in plan.disks],
    }
    staged.write_guest_config(guest)
    if plan.notes:
        staged.set_notes(plan.notes)
    if plan.options['protected']:
        staged.set_protected()
    staged.write_manifest(manifest)
    staged.write_log(clog.text())
