"""Prune: apply a retention policy to a storage without ever breaking a kept backup.

``retention.select_for_prune`` decides (a pure function, shown as is in check mode); this module
carries the decision out. Removing a backup that a kept incremental reads through would break
that incremental, so first its data is folded into the kept one: ``qemu-img rebase`` (safe mode)
of a copy of the kept image onto its nearest kept ancestor (or onto nothing, making it a full)
writes in exactly the clusters that differ, so every kept backup still restores bit-exact.
The kept backup's manifest is replaced through a pending file that a crash cannot leave
half-applied (``catalog.recover_pending``).
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from ..storage import catalog
from ..policy.config import load_storage, load_vzdump_defaults
from ..errors import StorageError
from .locate import require_storage
from ..format.qemu_img import allocated_bytes, qemu_img_binary
from ..policy.retention import RetentionPolicy, as_policy, select_for_prune
from ..storage.directory import PROTECTED, fsync_path, sha256_file


@dataclass
class PruneRequest:
    vmid: int = None             # None: every guest on the storage
    storage: str = None
    dumpdir: str = None
    config_dir: str = '/etc/guestvault'
    prune_backups: object = None  # property string or dict; None: the storage's, else vzdump.conf's
    timezone: str = None
    lockwait: float = 180        # minutes
    check_mode: bool = False


def resolve_policy(request, storage):
    """The retention to apply: given, else the storage's prune-backups, else vzdump.conf's."""
    if request.prune_backups not in (None, '', {}):
        what = 'prune_backups' if isinstance(request.prune_backups, str) else 'keep options'
        return as_policy(request.prune_backups, what=what), 'given'
    if storage.id:
        configured = load_storage(request.config_dir, storage.id).prune_backups
        if configured:
            return RetentionPolicy.from_options(configured), f"storage {storage.id}"
    defaults = load_vzdump_defaults(request.config_dir).get('prune-backups')
    if defaults:
        return RetentionPolicy.from_options(defaults), 'vzdump.conf'
    return RetentionPolicy.from_options({'keep-all': True}), 'default (keep everything)'


def _nearest_kept_ancestor(record, by_time, removed):
    parent = record.index.get('parent')
    while parent is not None and parent in removed:
        parent = by_time[parent].index.get('parent')
    return parent


def plan_folds(backups, removed):
    """Kept backups whose parent goes: [(kept record, new parent time or None)], oldest first."""
    by_time = {b.index['time']: b for b in backups}
    folds = []
    for record in backups:
        parent = record.index.get('parent')
        if record.index['time'] in removed or parent is None or parent not in removed:
            continue
        folds.append((record, _nearest_kept_ancestor(record, by_time, removed)))
    return folds


def fold(record, new_parent, log):
    """Make ``record`` read through ``new_parent`` (or stand alone) with the same content."""
    index = dict(record.index)
    disks = []
    temps = {}
    try:
        for disk in index['disks']:
            disk = dict(disk)
            if disk.get('backing'):
                image = os.path.join(record.path, disk['file'])
                temp = os.path.join(record.path, f".{disk['file']}.folding")
                temps[image] = temp
                shutil.copyfile(image, temp)
                backing = f"../{new_parent}/{disk['id']}.qcow2" if new_parent else ''
                args = [qemu_img_binary(), 'rebase', '-q', '-f', 'qcow2', '-b', backing]
                if backing:
                    args += ['-F', 'qcow2']
                proc = subprocess.run(args + [temp], capture_output=True, text=True, check=False)
                if proc.returncode != 0:
                    raise StorageError(f"folding {record.id} ({disk['id']}) failed: "
                                       f"{proc.stderr.strip()}")
                fsync_path(temp)
                disk.update(backing=backing or None, sha256=sha256_file(temp),
                            size=os.path.getsize(temp), bytes_written=allocated_bytes(temp),
                            level='inc' if backing else 'full')
            disks.append(disk)
        index.update(disks=disks, parent=new_parent,
                     level='inc' if new_parent else 'full')
        pending = catalog.write_index(record, index)
        for image, temp in temps.items():
            os.replace(temp, image)
        fsync_path(record.path)
        catalog.commit_index(record, pending)
    except BaseException:
        for temp in temps.values():
            if os.path.exists(temp):
                os.unlink(temp)
        raise
    log(f"folded the data {record.id} read from removed backups into it; it now "
        + (f"builds on {new_parent}" if new_parent else "stands alone (full)"))


def remove_backup(storage, record):
    """Make the backup invisible in one rename, then delete it."""
    # Asked on disk, not from the listing: protection may have been set since.
    if record.protected or os.path.exists(os.path.join(record.path, PROTECTED)):
        raise StorageError(f"backup {record.id} is protected and is not removed")
    storage.inside(record.path)
    hidden = os.path.join(os.path.dirname(record.path),
                          f".{os.path.basename(record.path)}.removing.tmp")
    os.rename(record.path, hidden)
    fsync_path(os.path.dirname(record.path))
    shutil.rmtree(hidden)


def _guest_bytes(backups):
    return sum(catalog.backup_size(b) for b in backups)


def prune_guest(storage, vmid, policy, tz, check_mode, lockwait_seconds, log):
    # Check mode only reads, so it shares the lock (and creates nothing).
    with storage.guest_lock(vmid, lockwait_seconds, shared=check_mode):
        if not check_mode:
            for backup_id, applied in catalog.recover_pending(storage, vmid, sha256_file):
                log(f"{'completed' if applied else 'dropped'} an interrupted manifest update of "
                    f"{backup_id}")
        backups = storage.backups(vmid)
        by_time = {b.index['time']: b for b in backups}
        marks = select_for_prune(
            [{'id': b.index['time'], 'time': b.time, 'protected': b.protected} for b in backups],
            policy, tz)
        removed = {m.id for m in marks if m.mark == 'remove'}
        folds = plan_folds(backups, removed)
        sizes = {t: catalog.backup_size(b) for t, b in by_time.items()}
        report = [{'id': by_time[m.id].id, 'vmid': vmid, 'time': m.id, 'mark': m.mark,
                   'rule': m.rule, 'size': sizes[m.id], 'protected': by_time[m.id].protected,
                   'level': by_time[m.id].index['level']} for m in marks]
        fold_report = [{'id': r.id, 'new_parent': p} for r, p in folds]
        if check_mode:
            return report, fold_report, sum(sizes[t] for t in removed)
        before = _guest_bytes(backups)
        for record, new_parent in folds:
            fold(record, new_parent, log)
        for time_id in sorted(removed):
            remove_backup(storage, by_time[time_id])
            log(f"removed {by_time[time_id].id}")
        freed = before - _guest_bytes(storage.backups(vmid))
        return report, fold_report, freed


def run_prune(request, log=None):
    log = log or (lambda message: None)
    storage = require_storage(request.config_dir, request.storage, request.dumpdir)
    policy, source = resolve_policy(request, storage)
    vmids = [request.vmid] if request.vmid is not None else catalog.guest_ids(storage)
    result = {'policy': policy.as_property_string(), 'policy_source': source, 'backups': [],
              'folded': [], 'bytes_freed': 0, 'storage': storage.id,
              'storage_path': storage.path}
    result['warnings'] = []
    if request.vmid is not None and not storage.backups(request.vmid):
        result['warnings'].append(f"guest {request.vmid} has no backups on {storage.label}; "
                                  "is the vmid right?")
    for vmid in vmids:
        report, folds, freed = prune_guest(storage, vmid, policy, request.timezone,
                                           request.check_mode, float(request.lockwait) * 60,
                                           log)
        result['backups'] += report
        result['folded'] += folds
        result['bytes_freed'] += freed
    result['removed'] = [b['id'] for b in result['backups'] if b['mark'] == 'remove']
    result['changed'] = bool(result['removed'])
    return result
