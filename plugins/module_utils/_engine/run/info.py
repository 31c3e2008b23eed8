"""backup_info: the backups on a storage, of one guest or of all."""
from __future__ import annotations

from ..guest.registry import validate_vmid
from ..storage import catalog
from .locate import require_storage


def list_backups(vmid=None, storage=None, dumpdir=None, config_dir='/etc/guestvault'):
    store = require_storage(config_dir, storage, dumpdir)
    if vmid is not None:
        vmid = validate_vmid(vmid)
    backups, damaged = catalog.all_and_damaged(store, vmid)
    return {'storage': store.id, 'storage_path': store.path,
            'backups': [catalog.describe(store, b) for b in backups],
            'damaged': [catalog.describe_damaged(d) for d in damaged],
            'warnings': [f"backup {d.id} is damaged and cannot be restored: {d.reason}; restore "
                         "its manifest from a copy, or remove the directory if it cannot be "
                         "repaired" for d in damaged]}
