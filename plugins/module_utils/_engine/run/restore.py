"""Restore: new standalone images of a backup's disks, verified, never touching the backups.

The format writes each disk in one pass (the qcow2 chain: ``qemu-img convert`` of the backup's
image, read through its backing chain, 4-5x faster than copying the full and committing each
incremental). The files the restore reads are checked against their manifests while the images
are written, and the images appear under their final names only once both have succeeded, so
nothing unverified ever stands at a target path.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from ..errors import ConfigError, StorageError, VerifyFailed
from ..format import qemu_img
from ..guest.registry import GuestEntry, guest_path, render_guest, validate_vmid
from ..storage import catalog
from ..storage.files import fsync_path, new_directory, private_files, write_file_atomic
from ..vocabulary import RESTORE_FORMATS
from . import guest_runs
from .locate import format_of, require_storage


@dataclass
class RestoreRequest:
    vmid: int
    target_dir: str
    backup: str = None           # None or 'latest': the newest
    until: object = None
    storage: str = None
    dumpdir: str = None
    config_dir: str = '/etc/guestvault'
    disks: list = None
    format: str = 'qcow2'
    snapshots: bool = False
    bwlimit: int = 0             # KiB/s read from the storage, 0 = unlimited
    force: bool = False
    new_vmid: int = None
    new_qmp_socket: str = None
    lockwait: float = 180        # minutes to wait while a backup or prune of the guest runs
    check_mode: bool = False
    live: bool = False           # start the guest at once, copy its disks in the background


def _check_target_dir(request, storage):
    target = request.target_dir
    if not target or not os.path.isabs(target):
        raise ConfigError(f"target_dir {target!r} must be an absolute path")
    real = os.path.realpath(target)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(f"target_dir {target} exists and is not a directory; give a directory")
    for forbidden, what in ((storage.path, 'the backup storage'),
                            (request.config_dir, 'the guestvault configuration')):
        root = os.path.realpath(forbidden)
        if os.path.commonpath([real, root]) == root:
            raise ConfigError(f"target_dir {target} lies inside {what} ({forbidden}); restore "
                              "to a directory outside it")
    return real


def check_request(request):
    """Every option that needs no storage, checked before anything is locked, started or made."""
    validate_vmid(request.vmid)
    if request.new_vmid is not None:
        validate_vmid(request.new_vmid)
    if request.format not in RESTORE_FORMATS:
        raise ConfigError(f"format {request.format!r} is not one of "
                          f"{', '.join(RESTORE_FORMATS)}")
    if request.snapshots and request.format != 'qcow2':
        raise ConfigError("snapshots needs format qcow2: only qcow2 holds internal snapshots")
    for key, unit in (('bwlimit', 'KiB/s, 0 for no limit'), ('lockwait', 'minutes')):
        value = getattr(request, key)
        if value is not None and float(value) < 0:
            raise ConfigError(f"{key} {value} is negative; give {unit}")
    if request.disks is not None and (not request.disks or not all(request.disks)):
        raise ConfigError(f"disks {request.disks!r} names no disk (or an empty one); leave "
                          "disks out to restore every disk, or name each disk by its id")
    if request.new_qmp_socket is not None and not os.path.isabs(request.new_qmp_socket):
        raise ConfigError(f"new_qmp_socket {request.new_qmp_socket!r} must be an absolute path")


def plan_restore(request):
    """What a restore would write, where and how big; changes nothing."""
    check_request(request)
    vmid = validate_vmid(request.vmid)
    storage = require_storage(request.config_dir, request.storage, request.dumpdir)
    target_dir = _check_target_dir(request, storage)
    fmt = format_of(storage)
    warnings = []
    record = catalog.resolve(storage, vmid, request.backup, request.until, warnings=warnings)
    chain = fmt.dependencies(storage, record)
    by_id = {d['id']: d for d in record.index['disks']}
    wanted = list(request.disks) if request.disks else list(by_id)
    twice = sorted({d for d in wanted if wanted.count(d) > 1})
    if twice:
        raise ConfigError(f"disks names {', '.join(twice)} more than once; name each disk once")
    unknown = [d for d in wanted if d not in by_id]
    if unknown:
        raise ConfigError(f"backup {record.id} has no disk(s) {', '.join(unknown)}; it has "
                          f"{', '.join(by_id)}")
    new_vmid = validate_vmid(request.new_vmid) if request.new_vmid is not None else None
    if new_vmid is not None and os.path.exists(guest_path(request.config_dir, new_vmid)) \
            and not request.force:
        raise ConfigError(f"guest {new_vmid} is already registered "
                          f"({guest_path(request.config_dir, new_vmid)}); choose another "
                          "new_vmid or set force")
    disks, problems = [], []
    for disk_id in wanted:
        disk = by_id[disk_id]
        target = os.path.join(target_dir, f"{disk_id}.{request.format}")
        if os.path.exists(target):
            if qemu_img.in_use(target):
                problems.append(f"{target} is in use by a running QEMU; stop that guest first "
                                "(force does not override this)")
            elif not request.force:
                problems.append(f"{target} exists; set force to overwrite it")
        disks.append({'id': disk_id, 'target': target,
                      'format': request.format, 'virtual_size': disk['virtual_size'],
                      'data_bytes': fmt.restored_bytes(chain, disk_id)})
    if problems:
        raise StorageError('; '.join(problems))
    return {'storage': storage, 'format': fmt, 'record': record, 'chain': chain,
            'disks': disks, 'target_dir': target_dir, 'new_vmid': new_vmid,
            'warnings': warnings}


def run_restore(request, log=None):
    """Restore as ``request`` says; holds the guest's storage lock shared (prune waits)."""
    check_request(request)
    storage = require_storage(request.config_dir, request.storage, request.dumpdir)
    vmid = validate_vmid(request.vmid)
    with private_files(), storage.guest_lock(vmid, float(request.lockwait) * 60, shared=True,
                                             holder=guest_runs.holder(vmid, 'restore')):
        if request.live:
            from .live_restore import run_live_restore  # it plans with this module
            return run_live_restore(request, log)
        return _restore(request, log)


def _restore(request, log):
    log = log or (lambda message: None)
    started = time.monotonic()
    plan = plan_restore(request)
    record, chain = plan['record'], plan['chain']
    result = {
        'changed': True, 'backup': record.id, 'time': record.index['time'],
        'level': record.index['level'], 'chain_length': len(chain),
        'target_dir': plan['target_dir'], 'new_vmid': plan['new_vmid'],
        'snapshots': bool(request.snapshots),
        'disks': [{k: d[k] for k in ('id', 'target', 'format', 'virtual_size', 'data_bytes')}
                  for d in plan['disks']],
        'warnings': plan['warnings'],
    }
    if request.check_mode:
        return result
    temps = {d['id']: os.path.join(plan['target_dir'], f".{d['id']}.{d['format']}.restoring")
             for d in plan['disks']}
    try:
        with new_directory(plan['target_dir']):
            _write_images(request, plan, temps, log)
    except BaseException:
        for temp in temps.values():
            for leftover in plan['format'].leftovers(temp):
                if os.path.exists(leftover):
                    os.unlink(leftover)
        raise
    for disk in result['disks']:
        disk['size'] = os.path.getsize(disk['target'])
        if disk['format'] == 'qcow2':
            disk['data_bytes'] = qemu_img.allocated_bytes(disk['target'])
    _write_guest_config(plan, request, result)
    result['duration'] = round(time.monotonic() - started, 3)
    result['verified'] = True
    log(f"restored {record.id} to {plan['target_dir']} in {result['duration']:.2f} s")
    return result


def _write_images(request, plan, temps, log):
    """Each disk into its hidden temporary, verified, then renamed to its target."""
    storage, fmt, record, chain = plan['storage'], plan['format'], plan['record'], plan['chain']
    disk_ids = set(temps)
    if request.snapshots:
        problems = fmt.verify_files(storage, chain, disk_ids)
        if problems:
            raise VerifyFailed("verification failed, nothing restored: " + '; '.join(problems))
        for disk in plan['disks']:
            fmt.restore_with_snapshots(storage, chain, disk['id'], temps[disk['id']], log)
    else:
        copies = {d['id']: fmt.start_restore(storage, record, d['id'], temps[d['id']],
                                             d['format'], request.bwlimit)
                  for d in plan['disks']}
        # Verify while the copies run: both read the same files, from the page cache.
        problems = fmt.verify_files(storage, chain, disk_ids,
                                    workers=max(1, (os.cpu_count() or 2) - len(copies)))
        failed = []
        for disk_id, proc in copies.items():
            if problems:
                proc.kill()
            _out, err = proc.communicate()
            if proc.returncode != 0 and not problems:
                failed.append(f"{disk_id}: {err.strip()}")
        if problems:
            raise VerifyFailed("verification failed, nothing restored: " + '; '.join(problems))
        if failed:
            raise StorageError("qemu-img convert failed: " + '; '.join(failed))
    for disk in plan['disks']:
        fsync_path(temps[disk['id']])
        os.replace(temps[disk['id']], disk['target'])
    fsync_path(plan['target_dir'])


def _write_guest_config(plan, request, result):
    """The captured configuration beside the images, and the new guest's registry entry."""
    record = plan['record']
    guest = plan['storage'].read_guest_config(record)
    guest['restored_from'] = record.id
    guest['images'] = {d['id']: d['target'] for d in result['disks']}
    config_path = os.path.join(plan['target_dir'], 'guest.json')
    write_file_atomic(config_path, json.dumps(guest, indent=2, sort_keys=True) + '\n')
    result['guest_config'] = config_path
    if plan['new_vmid'] is None:
        return
    entry = GuestEntry(
        vmid=plan['new_vmid'],
        name=f"{record.index.get('guest_name') or 'vm'}-restored",
        qmp_socket=request.new_qmp_socket or os.path.join(plan['target_dir'], 'qmp.sock'),
        description=f"restored from {record.id} ({', '.join(guest['images'].values())})")
    path = guest_path(request.config_dir, plan['new_vmid'])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file_atomic(path, render_guest(entry))
    result['registry_entry'] = path
