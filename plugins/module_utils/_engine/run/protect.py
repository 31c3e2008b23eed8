"""protect: a backup's protection and notes, within the storage's max-protected-backups."""
from __future__ import annotations

from ..errors import StorageError
from ..guest.registry import validate_vmid
from ..policy.config import load_storage
from ..storage import catalog
from ..storage.files import private_files
from . import guest_runs
from .locate import require_storage


def check_protected_room(config_dir, store, vmid):
    """vzdump refuses one more protected backup beyond the storage's max-protected-backups
    (a dumpdir has no limit)."""
    if not store.id:
        return
    limit = load_storage(config_dir, store.id).max_protected_backups
    count = sum(1 for b in store.backups(vmid) if b.protected)
    if 0 <= limit <= count:
        raise StorageError(
            f"guest {vmid} already has {count} protected backup(s) on {store.label}, the "
            f"storage's max-protected-backups is {limit}; unprotect one first "
            "(guestvault.backup.protect) or raise max-protected-backups in storage.cfg")


def protect_backup(vmid, backup='latest', protected=None, notes=None, storage=None,
                   dumpdir=None, config_dir='/etc/guestvault', check_mode=False, lockwait=180):
    """Set or clear a backup's protection and notes; changed only when the state differs."""
    vmid = validate_vmid(vmid)
    store = require_storage(config_dir, storage, dumpdir)
    with private_files(), store.guest_lock(vmid, lockwait * 60, shared=check_mode,
                                           holder=guest_runs.holder(vmid, 'protect')):
        return _protect(store, vmid, backup, protected, notes, config_dir, check_mode)


def _protect(store, vmid, backup, protected, notes, config_dir, check_mode):
    warnings = []
    record = catalog.resolve(store, vmid, backup, warnings=warnings)
    before = {'protected': record.protected, 'notes': store.read_notes(record) or ''}
    after = dict(before)
    if protected is not None:
        after['protected'] = bool(protected)
    if notes is not None:
        after['notes'] = notes
    if after['protected'] and not before['protected']:
        check_protected_room(config_dir, store, vmid)
    changed = after != before
    if changed and not check_mode:
        if after['notes'] != before['notes']:
            store.set_notes(record, after['notes'])
        if after['protected'] != before['protected']:
            store.set_protected(record, after['protected'])
    return {'changed': changed, 'backup': record.id, 'protected': after['protected'],
            'notes': after['notes'], 'diff': {'before': before, 'after': after},
            'warnings': warnings}
