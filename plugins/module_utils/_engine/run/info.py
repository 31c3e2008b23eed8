"""backup_info: the backups on a storage, of one guest or of all."""
from __future__ import annotations

from ..guest.registry import validate_vmid
from ..storage import catalog
from .locate import require_storage


def list_backups(vmid=None, storage=None, dumpdir=None, config_dir='/etc/guestvault'):
    store = require_storage(config_dir, storage, dumpdir)
    if vmid is not None:
        vmid = validate_vmid(vmid)
    return {'storage': store.id, 'storage_path': store.path,
            'backups': [catalog.describe(store, b) for b in catalog.all_backups(store, vmid)]}
