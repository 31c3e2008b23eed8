"""Restore: new standalone images of a backup's disks, verified, never touching the backups.

The format writes each disk in one pass (the qcow2 chain: ``qemu-img convert`` of the backup's
image, read through its backing chain, 4-5x faster than copying the full and committing each
incremental). The files the restore reads are checked against their manifests while the images
are written, and the images appear under their final names only once both have succeeded, so
nothing unverified ever stands at a target path.

A container's vzdump archive (``record.archive``) is restored into a new LXC container instead
(restore/container.py); guestvault-pct (run/pct_command.py) restores one from a file or a stream
through ``restore_archive``.
"""
from __future__ import annotations

import json
import os
import time

from ..errors import ConfigError, GuestNotFound, StorageError, VerifyFailed
from ..format import qemu_img
from ..guest.registry import GuestEntry, guest_path, load_guest, render_guest
from ..storage.files import fsync_path, new_directory, write_file_atomic
from ..restore.container import ContainerTarget, restore_container
from ..restore.live import run_live_restore
from . import live_server
from .opener import open_backups
from .restore_plan import RestoreRequest, check_request, plan_restore

# RestoreRequest, this verb's request, lives with the plan that live restore shares.
__all__ = ['RestoreRequest', 'restore_archive', 'run_restore']
# Options of one kind of backup only.
_VM_ONLY = ('target_dir', 'disks', 'snapshots', 'new_qmp_socket', 'live')
_CONTAINER_ONLY = ('lxc_name', 'lxcpath', 'start')


def run_restore(request, log=None):
    """Restore as ``request`` says; holds the guest's storage lock shared (prune waits)."""
    check_request(request)
    with open_backups(request, 'restore', shared=True, resolve=False) as opened:
        record = opened.resolve()
        if record.archive is not None:
            return _restore_archive_record(request, opened, log)
        given = [key for key in _CONTAINER_ONLY if getattr(request, key)]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to a container's archive, and "
                              f"{record.id} is a VM's backup; leave them out")
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
        # Verify while the copies run: both read the same files, from the page cache. On every
        # core: a copy (qemu-img convert of a chain) is partly I/O-bound and ends well before
        # the hashing, which then had a core of its own less for nothing (1.5 s of a 3.2 s
        # chain restore on the bench was one hash thread alone after the convert).
        problems = fmt.verify_files(storage, chain, disk_ids)
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


def _restore_archive_record(request, opened, log):
    """A vzdump archive of the storage into a new container (under the shared lock)."""
    record = opened.record
    given = [key for key in _VM_ONLY if getattr(request, key)]
    if request.format != 'qcow2':
        given.append('format')
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot be used with {record.id}: they are for a VM's backup, "
            "and this is a container's archive, restored into a new LXC container (new_vmid, "
            "lxc_name, lxcpath, start); leave them out")
    if record.archive.type != 'lxc':
        raise ConfigError(f"{record.id} is a Proxmox VE {record.archive.type} archive "
                          f"({record.archive.format}); guestvault restores only container "
                          "archives (vzdump-lxc-...): restore it on Proxmox VE with qmrestore")
    result = {'backup': record.id, 'time': record.manifest.time}
    result.update(restore_archive(request, opened.storage.file(record, None), record.id, log))
    result['warnings'] = opened.warnings + result['warnings']
    return result


def restore_archive(request, source, backup_id, log=None):
    """Restore the container archive ``source`` (a path or a binary stream) as ``request``
    says (new_vmid, lxc_name, lxcpath, start, force, bwlimit, config_dir, check_mode), the
    backed-up guest being ``request.vmid`` (None: unknown); restore/container's result."""
    if request.new_vmid is None:
        raise ConfigError(f"new_vmid is required to restore {backup_id}: a container archive "
                          "is restored as a new guest (give the vmid itself, with force, to "
                          "replace the backed-up container)")
    target = ContainerTarget(new_vmid=request.new_vmid, lxc_name=request.lxc_name,
                             lxcpath=request.lxcpath, start=request.start, force=request.force,
                             bwlimit=request.bwlimit, config_dir=request.config_dir,
                             check_mode=request.check_mode)
    return restore_container(source, target, backup_id=backup_id,
                             source_lxcpath=_registered_lxcpath(request.config_dir, request.vmid),
                             log=log)


def _registered_lxcpath(config_dir, vmid):
    """The lxcpath of the backed-up container when it is registered here, else None."""
    if vmid is None:
        return None
    try:
        entry = load_guest(config_dir, vmid)
    except GuestNotFound:
        return None
    return entry.lxcpath if entry.type == 'lxc' else None
