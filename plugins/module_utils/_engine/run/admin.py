"""Verify, protect and annotate stored backups (the verbs that do not take or restore one)."""
from __future__ import annotations

import os
from datetime import datetime, timezone

from ..storage import catalog
from ..policy.config import load_storage
from ..errors import StorageError
from .locate import require_storage
from ..format.qemu_img import check as qemu_img_check
from ..format.qemu_img import info as qemu_img_info
from ..guest.registry import validate_vmid
from .restore import verify_chain_files
from ..storage.directory import format_time


def verify_backup(vmid, backup='latest', storage=None, dumpdir=None,
                  config_dir='/etc/guestvault', check_mode=False, lockwait=180):
    """Re-read a backup's chain and check it; record the outcome in the backup's verify state.

    Checks: every image of the chain against its manifest's sha256; ``qemu-img check`` of each
    of the backup's own images; each incremental image's backing file is the parent's image the
    manifest names. Returns the state written (``ok`` or ``failed``) with the problems found.
    """
    vmid = validate_vmid(vmid)
    store = require_storage(config_dir, storage, dumpdir)
    with store.guest_lock(vmid, lockwait * 60, shared=True):
        return _verify(store, vmid, backup, check_mode)


def _verify(store, vmid, backup, check_mode):
    record = catalog.resolve(store, vmid, backup)
    problems = []
    try:
        chain = catalog.chain_of(store, record)
    except StorageError as exc:
        chain = [record]
        problems.append(str(exc))
    problems += verify_chain_files(chain)
    for disk in record.index['disks']:
        path = os.path.join(record.path, disk['file'])
        if not os.path.exists(path):
            continue  # already reported
        ok, message = qemu_img_check(path, fmt='qcow2')
        if not ok:
            problems.append(f"{record.id}: qemu-img check of {disk['file']}: {message}")
        backing = qemu_img_info(path, fmt='qcow2').get('backing-filename')
        if backing != disk.get('backing'):
            problems.append(f"{record.id}: {disk['file']} reads through {backing!r}, its "
                            f"manifest says {disk.get('backing')!r}")
    state = {'state': 'failed' if problems else 'ok', 'problems': problems,
             'time': format_time(datetime.now(timezone.utc)),
             'chain': [r.index['time'] for r in chain]}
    previous = catalog.read_verify_state(record)
    if not check_mode:
        catalog.write_verify_state(record, state)
    return {'changed': not check_mode, 'backup': record.id, 'verify_state': state['state'],
            'problems': problems, 'chain': state['chain'],
            'previous_state': previous['state'] if previous else 'none'}


def _max_protected(config_dir, storage):
    """max-protected-backups of a configured storage (-1: unlimited); dumpdirs have no limit."""
    if not storage:
        return -1
    return load_storage(config_dir, storage).max_protected_backups


def protect_backup(vmid, backup='latest', protected=None, notes=None, storage=None,
                   dumpdir=None, config_dir='/etc/guestvault', check_mode=False, lockwait=180):
    """Set or clear a backup's protection and notes; changed only when the state differs."""
    vmid = validate_vmid(vmid)
    store = require_storage(config_dir, storage, dumpdir)
    with store.guest_lock(vmid, lockwait * 60, shared=check_mode):
        return _protect(store, vmid, backup, protected, notes, storage, config_dir, check_mode)


def _protect(store, vmid, backup, protected, notes, storage, config_dir, check_mode):
    record = catalog.resolve(store, vmid, backup)
    before = {'protected': record.protected, 'notes': catalog.read_notes(record) or ''}
    after = dict(before)
    if protected is not None:
        after['protected'] = bool(protected)
    if notes is not None:
        after['notes'] = notes
    if after['protected'] and not before['protected']:
        limit = _max_protected(config_dir, storage)
        count = sum(1 for b in store.backups(vmid) if b.protected)
        if 0 <= limit <= count:
            raise StorageError(
                f"guest {vmid} already has {count} protected backup(s) on {store.label}, the "
                f"storage's max-protected-backups is {limit}; unprotect one first or raise "
                "max-protected-backups in storage.cfg")
    changed = after != before
    if changed and not check_mode:
        if after['notes'] != before['notes']:
            catalog.set_notes(record, after['notes'])
        if after['protected'] != before['protected']:
            catalog.set_protected(record, after['protected'])
    return {'changed': changed, 'backup': record.id, 'protected': after['protected'],
            'notes': after['notes'], 'diff': {'before': before, 'after': after}}


def list_backups(vmid=None, storage=None, dumpdir=None, config_dir='/etc/guestvault'):
    store = require_storage(config_dir, storage, dumpdir)
    if vmid is not None:
        vmid = validate_vmid(vmid)
    return {'storage': store.id, 'storage_path': store.path,
            'backups': [catalog.describe(b) for b in catalog.all_backups(store, vmid)]}
