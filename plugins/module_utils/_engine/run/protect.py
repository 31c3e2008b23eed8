"""protect: a backup's protection and notes, within the storage's max-protected-backups."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import StorageError
from ..paths import CONFIG_DIR
from ..policy.config import load_storage
from .opener import open_backups
from .request import Request


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


@dataclass
class ProtectRequest(Request):
    vmid: int
    backup: str = 'latest'
    protected: bool = None       # None: unchanged
    notes: str = None            # None: unchanged; '' removes them
    storage: str = None
    dumpdir: str = None
    config_dir: str = CONFIG_DIR
    lockwait: float = 180        # minutes
    check_mode: bool = False


def run_protect(request):
    """Set or clear a backup's protection and notes; changed only when the state differs.
    Check mode only reads, so it shares the lock."""
    with open_backups(request, 'protect', shared=request.check_mode) as opened:
        return _protect(opened, request)


def _protect(opened, request):
    store, vmid, record = opened.storage, opened.vmid, opened.record
    protected, notes, check_mode = request.protected, request.notes, request.check_mode
    before = {'protected': record.protected, 'notes': store.read_notes(record) or ''}
    after = dict(before)
    if protected is not None:
        after['protected'] = bool(protected)
    if notes is not None:
        after['notes'] = notes
    if after['protected'] and not before['protected']:
        check_protected_room(request.config_dir, store, vmid)
    changed = after != before
    if changed and not check_mode:
        if after['notes'] != before['notes']:
            store.set_notes(record, after['notes'])
        if after['protected'] != before['protected']:
            store.set_protected(record, after['protected'])
    return {'changed': changed, 'backup': record.id, 'protected': after['protected'],
            'notes': after['notes'], 'diff': {'before': before, 'after': after},
            'warnings': opened.warnings}
