"""guest_backup for a guest whose capture is a file tree (a container): vzdump's archive.

run/guest_backup.py hands a request here when the guest's kind yields a TREE capture
(format/capture.py), after the options are resolved. The steps, as PVE's vzdump runs them for a
container:

1. everything is checked before anything changes: the container is known to LXC, the storage
   takes archives, the exclusions leave something, the notes template renders;
2. the guest is held on this node and locked on the storage (prune waits); what a killed run
   left (a frozen container, a temporary copy, a ``.dat``) is cleared;
3. the guest kind fixes the point in time in the requested mode (stop, suspend, snapshot) and
   yields the tree; the archive is written as ``<name>.dat`` inside that window (stop mode
   restarts the container only after it) and renamed when complete: only then does the backup
   exist;
4. its notes, protection and log are written beside it, as PVE names them.

With ``stdout`` (the node command's ``--stdout``) the archive goes to that stream and nothing
else is written: no storage, no rename, no notes, no protection, no prune (as vzdump).
"""
from __future__ import annotations

import os
import time
from contextlib import ExitStack
from datetime import datetime, timezone

from ..errors import ConfigError, HookFailed
from ..format.vzdump_archive.writer import exclusions, write_archive
from ..policy.chain import check_container_level
from ..policy.notes import render_notes
from ..storage import vzdump_names
from ..storage.files import private_files, write_file_atomic
from ..times import format_time, parse_age
from . import guest_runs, leftovers
from .backup_log import BackupLog
from .hooks import HookScript
from .locate import require_storage
from .opener import guest_lock
from .protect import check_protected_room

# vzdump's defaults for the container keys of vzdump.conf
TREE_DEFAULTS = {'stdexcludes': True, 'zstd': 1, 'pigz': 0, 'tmpdir': None, 'exclude_path': []}
# what a container's backup cannot do, with what to do instead
_VM_ONLY = {'include': "a container's volumes are chosen by its mpN lines with backup=1",
            'exclude': "a container's volumes are chosen by its mpN lines with backup=1; "
                       "leave files out with exclude_path",
            'include_raw': "a container has no disk images",
            'freeze_timeout': "a container is frozen by LXC, not a guest agent",
            'max_workers': "a container's archive is one tar stream"}


def tree_options(request, defaults):
    """The container keys: the request's, else vzdump.conf's, else vzdump's defaults."""
    options = dict(TREE_DEFAULTS)
    for key, conf_key in (('stdexcludes', 'stdexcludes'), ('zstd', 'zstd'), ('pigz', 'pigz'),
                          ('tmpdir', 'tmpdir'), ('exclude_path', 'exclude-path')):
        value = getattr(request, key)
        if value is None:
            value = defaults.get(conf_key)
        if value is not None:
            options[key] = value
    return options


def _check_request(request, options):
    """What a container's backup refuses, before anything is read or changed."""
    check_container_level(request.vmid, request.level, request.chain)
    given = {'include': bool(request.include), 'exclude': bool(request.exclude),
             'include_raw': bool(request.include_raw),
             'freeze_timeout': request.freeze_timeout is not None,
             'max_workers': request.max_workers is not None}
    for key, advice in _VM_ONLY.items():
        if given[key]:
            raise ConfigError(f"guest {request.vmid} is a container: {key} does not apply "
                              f"({advice})")
    if options['tmpdir'] and not os.path.isabs(options['tmpdir']):
        raise ConfigError(f"tmpdir {options['tmpdir']!r} is a relative path; give an absolute "
                          "path")
    for key in ('zstd', 'pigz'):
        if int(options[key]) < 0:
            raise ConfigError(f"{key} must not be negative (0 means half of the cores for "
                              "zstd, and no pigz for pigz)")


def run_tree_backup(request, options, guest, kind, log, now=None):
    """One archive of container ``guest`` as ``request`` says; the guest_backup result."""
    started = time.monotonic()
    clog = BackupLog(log)
    _check_request(request, options)
    patterns, warnings = exclusions(options['exclude_path'], bool(options['stdexcludes']))
    if request.stdout is not None:
        return _to_stream(request, options, guest, kind, clog, warnings)
    storage = require_storage(request.config_dir, options['storage'], options['dumpdir'],
                              options['node'])
    if not hasattr(storage, 'archive_dir'):
        raise ConfigError(f"{storage.label} is a datastore, which does not take container "
                          "backups yet (Proxmox Backup Server keeps them as pxar archives); "
                          "back the container up to a dir: storage or a dumpdir")
    hook = HookScript(options['script']) if options['script'] else None
    with ExitStack() as stack:
        stack.enter_context(private_files())
        stack.enter_context(guest_runs.hold(guest.vmid, 'backup',
                                            float(options['lockwait']) * 60, clog))
        handle = stack.enter_context(kind.connect(guest))
        name = guest.name or guest.lxc
        notes = _notes(options, request, guest, name)
        if options['protected']:
            check_protected_room(request.config_dir, storage, guest.vmid)
        skip = _recent_enough(request, storage, guest, name, now)
        if skip is not None:
            return skip
        when = storage.next_backup_time(guest.vmid, now or datetime.now(timezone.utc))
        archive = vzdump_names.archive_name('lxc', guest.vmid, when, options['compress'])
        path = os.path.join(storage.archive_dir, archive)
        result = {'changed': True, 'vmid': guest.vmid, 'guest_name': name, 'type': kind.name,
                  'format': 'vzdump', 'backup': archive, 'archive': path,
                  'time': format_time(when), 'level': 'full', 'requested_level': request.level,
                  'level_reason': 'a container is always backed up in full',
                  'mode': options['mode'], 'requested_mode': options['mode'],
                  'storage': storage.id, 'storage_path': storage.path, 'notes': notes,
                  'protected': bool(options['protected']),
                  'exclude_path': patterns, 'warnings': _warnings(options) + warnings}
        if request.check_mode:
            return result
        stack.enter_context(guest_lock(storage, guest.vmid, 'backup', options['lockwait'],
                                       shared=False))
        leftovers.clear_container(guest.vmid, storage, clog)
        os.makedirs(storage.archive_dir, mode=0o700, exist_ok=True)
        return _take(request, options, storage, guest, kind, handle, hook, path, result,
                     clog, started)


def _take(request, options, storage, guest, kind, handle, hook, path, result, clog, started):
    parsed = vzdump_names.parse(os.path.basename(path))
    log_path = os.path.join(storage.archive_dir, parsed.log_name)
    env = {'STOREID': storage.id or '', 'DUMPDIR': storage.archive_dir, 'VMTYPE': kind.name,
           'HOSTNAME': options['node'], 'TARGET': path, 'TARFILE': path, 'LOGFILE': log_path}
    mode = options['mode']

    def run_hook(phase):
        if hook:
            hook.run(phase, mode=mode, vmid=guest.vmid, env=env, log=clog)

    report = None
    try:
        clog(f"starting backup of CT {guest.vmid} ({result['guest_name']}) to "
             f"{storage.label}: {os.path.basename(path)}, mode {mode}")
        run_hook('backup-start')
        with kind.tree_capture(guest, handle, mode, _capture_options(options, storage, parsed),
                               run_hook, clog) as (tree, report):
            written = _write(options, kind, guest, handle, tree, path, result, clog)
        run_hook('backup-end')
    except BaseException as exc:
        clog(f"backup failed: {exc}")
        _discard(path)
        if hook and not isinstance(exc, KeyboardInterrupt):
            try:
                run_hook('backup-abort')
            except HookFailed as hook_exc:
                clog(f"backup-abort hook failed too: {hook_exc}")
        raise
    # The archive is complete and in place: from here on, problems are warnings.
    record = next((b for b in storage.backups(guest.vmid) if b.path == path), None)
    if record is None:      # renamed, yet not listed: say so rather than fail a kept backup
        result['warnings'].append(f"the archive {path} is written but its storage does not "
                                  "list it; its notes and protection were not set")
    else:
        if result['notes']:
            storage.set_notes(record, result['notes'])
        if options['protected']:
            storage.set_protected(record, True)
    seconds = time.monotonic() - started
    clog(f"archive {os.path.basename(path)}: {written.bytes_written} bytes "
         f"({written.tar_bytes} bytes of tar) in {seconds:.2f} s")
    write_file_atomic(log_path, clog.text())
    env['LOGFILE'] = log_path
    try:
        run_hook('log-end')     # as vzdump: a failing log-end only warns
    except HookFailed as exc:
        result['warnings'].append(str(exc))
    result.update(mode=report.mode, duration=round(seconds, 3),
                  bytes_written=written.bytes_written, tar_bytes=written.tar_bytes,
                  warnings=result['warnings'] + report.warnings + written.warnings,
                  downtime_seconds=_rounded(report.downtime_seconds),
                  frozen_seconds=_rounded(report.frozen_seconds), log=log_path)
    return result


def _write(options, kind, guest, handle, tree, out, result, clog):
    """The archive of ``tree`` into ``out`` (a path: .dat then rename; or a stream)."""
    pct_conf, conf_warnings = kind.pct_conf_text(guest, handle, tree)
    result['warnings'] += conf_warnings
    return write_archive(tree, out, pct_conf=pct_conf, lxc_config=kind.lxc_config_text(handle),
                         excludes=options['exclude_path'],
                         stdexcludes=bool(options['stdexcludes']),
                         compress=options['compress'], zstd_threads=int(options['zstd']),
                         pigz=int(options['pigz']), bwlimit_kib=int(options['bwlimit']),
                         log=clog)


def _to_stream(request, options, guest, kind, clog, warnings):
    """--stdout: the archive to the stream; nothing else is written anywhere."""
    started = time.monotonic()
    with ExitStack() as stack:
        stack.enter_context(guest_runs.hold(guest.vmid, 'backup',
                                            float(options['lockwait']) * 60, clog))
        handle = stack.enter_context(kind.connect(guest))
        result = {'changed': True, 'vmid': guest.vmid, 'guest_name': guest.name or guest.lxc,
                  'type': kind.name, 'format': 'vzdump', 'backup': None, 'archive': '-',
                  'level': 'full', 'mode': options['mode'], 'warnings': _warnings(options)
                  + warnings}
        if request.check_mode:
            return result
        leftovers.clear_container(guest.vmid, None, clog)
        with kind.tree_capture(guest, handle, options['mode'],
                               _capture_options(options, None, None), lambda phase: None,
                               clog) as (tree, report):
            written = _write(options, kind, guest, handle, tree, request.stdout, result, clog)
    result.update(mode=report.mode, duration=round(time.monotonic() - started, 3),
                  bytes_written=written.bytes_written, tar_bytes=written.tar_bytes,
                  warnings=result['warnings'] + report.warnings + written.warnings,
                  downtime_seconds=_rounded(report.downtime_seconds),
                  frozen_seconds=_rounded(report.frozen_seconds))
    return result


def _capture_options(options, storage, parsed):
    """What the guest kind needs to fix the point in time, as vzdump's names."""
    return {'stopwait': options['stopwait'], 'tmpdir': options['tmpdir'],
            'dumpdir': storage.archive_dir if storage is not None else None,
            'basename': parsed.stem if parsed is not None else None,
            'bwlimit': options['bwlimit']}


def _notes(options, request, guest, name):
    if not options['notes_template']:
        return None
    return render_notes(options['notes_template'], {
        'cluster': request.cluster or '', 'guestname': name, 'node': options['node'],
        'vmid': str(guest.vmid)})


def _warnings(options):
    return [w for w in (options.get('inert'),) if w]


def _recent_enough(request, storage, guest, name, now):
    """max_age: the result of a skipped run when a young enough archive exists, else None."""
    if not request.max_age:
        return None
    limit = parse_age(request.max_age)
    backups = storage.backups(guest.vmid)
    if not backups:
        return None
    newest = backups[-1]
    age = ((now or datetime.now(timezone.utc)) - newest.time).total_seconds()
    if age >= limit:
        return None
    reason = f"backup {newest.id} is {age:.0f} s old, younger than max_age {request.max_age}"
    return {'changed': False, 'vmid': guest.vmid, 'guest_name': name, 'backup': newest.id,
            'archive': newest.path, 'time': newest.manifest.time, 'level': 'full',
            'skipped_reason': reason, 'level_reason': reason, 'storage': storage.id,
            'storage_path': storage.path, 'notes': newest.notes, 'protected': newest.protected,
            'warnings': []}


def _discard(path):
    """A failed run leaves no archive: the writer removed its .dat; an archive a failed
    backup-end hook follows is removed too (as for VMs)."""
    for leftover in (path, os.path.join(os.path.dirname(path),
                                        vzdump_names.dat_name(os.path.basename(path)))):
        try:
            os.unlink(leftover)
        except FileNotFoundError:
            pass


def _rounded(value):
    return None if value is None else round(value, 3)
