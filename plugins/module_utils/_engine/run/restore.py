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

from ..errors import StorageError, VerifyFailed
from ..format import qemu_img
from ..guest.registry import GuestEntry, guest_path, render_guest
from ..storage.files import fsync_path, new_directory, write_file_atomic
from ..restore.live import run_live_restore
from . import live_server
from .opener import open_backups
from .restore_plan import RestoreRequest, check_request, plan_restore

# RestoreRequest, this verb's request, lives with the plan that live restore shares.
__all__ = ['RestoreRequest', 'run_restore']


def run_restore(request, log=None):
    """Restore as ``request`` says; holds the guest's storage lock shared (prune waits)."""
    check_request(request)
    with open_backups(request, 'restore', shared=True, resolve=False) as opened:
        if request.live:
            return run_live_restore(request, lambda req: plan_restore(req, opened),
                                    live_server.__name__, log)
        return _restore(request, opened, log)


def _restore(request, opened, log):
    log = log or (lambda message: None)
    started = time.monotonic()
    plan = plan_restore(request, opened)
    record, chain = plan.record, plan.chain
    result = {
        'changed': True, 'backup': record.id, 'time': record.manifest.time,
        'level': record.manifest.level, 'chain_length': len(chain),
        'target_dir': plan.target_dir, 'new_vmid': plan.new_vmid,
        'snapshots': bool(request.snapshots),
        'disks': [d.as_result() for d in plan.disks],
        'warnings': plan.warnings,
    }
    if request.check_mode:
        return result
    temps = {d.id: os.path.join(plan.target_dir, f".{d.id}.{d.format}.restoring")
             for d in plan.disks}
    try:
        with new_directory(plan.target_dir):
            _write_images(request, plan, temps, log)
    except BaseException:
        for temp in temps.values():
            for leftover in plan.format.leftovers(temp):
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
    log(f"restored {record.id} to {plan.target_dir} in {result['duration']:.2f} s")
    return result


def _write_images(request, plan, temps, log):
    """Each disk into its hidden temporary, verified, then renamed to its target."""
    storage, fmt, record, chain = plan.storage, plan.format, plan.record, plan.chain
    disk_ids = set(temps)
    if request.snapshots:
        problems = fmt.verify_files(storage, chain, disk_ids)
        if problems:
            raise VerifyFailed("verification failed, nothing restored: " + '; '.join(problems))
        for disk in plan.disks:
            fmt.restore_with_snapshots(storage, chain, disk.id, temps[disk.id], log)
    else:
        copies = {d.id: fmt.start_restore(storage, record, d.id, temps[d.id],
                                          d.format, request.bwlimit)
                  for d in plan.disks}
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
    for disk in plan.disks:
        fsync_path(temps[disk.id])
        os.replace(temps[disk.id], disk.target)
    fsync_path(plan.target_dir)


def _write_guest_config(plan, request, result):
    """The captured configuration beside the images, and the new guest's registry entry."""
    record = plan.record
    guest = plan.storage.read_guest_config(record)
    guest['restored_from'] = record.id
    guest['images'] = {d['id']: d['target'] for d in result['disks']}
    config_path = os.path.join(plan.target_dir, 'guest.json')
    write_file_atomic(config_path, json.dumps(guest, indent=2, sort_keys=True) + '\n')
    result['guest_config'] = config_path
    if plan.new_vmid is None:
        return
    entry = GuestEntry(
        vmid=plan.new_vmid,
        name=f"{record.manifest.guest_name or 'vm'}-restored",
        qmp_socket=request.new_qmp_socket or os.path.join(plan.target_dir, 'qmp.sock'),
        description=f"restored from {record.id} ({', '.join(guest['images'].values())})")
    path = guest_path(request.config_dir, plan.new_vmid)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_file_atomic(path, render_guest(entry))
    result['registry_entry'] = path
