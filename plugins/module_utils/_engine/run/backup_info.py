"""backup_info: the backups on a storage, of one guest or of all."""
from __future__ import annotations

from dataclasses import dataclass

from ..guest.registry import validate_vmid
from ..paths import CONFIG_DIR
from ..storage import catalog
from .locate import require_storage
from .request import Request


@dataclass
class BackupInfoRequest(Request):
    vmid: int = None             # None: every guest's
    storage: str = None
    dumpdir: str = None
    config_dir: str = CONFIG_DIR


def run_backup_info(request):
    """Reads only, so it takes no lock (a listing while a backup runs shows what is done)."""
    store = require_storage(request.config_dir, request.storage, request.dumpdir)
    vmid = validate_vmid(request.vmid) if request.vmid is not None else None
    backups, damaged = catalog.all_and_damaged(store, vmid)
    return {'changed': False, 'storage': store.id, 'storage_path': store.path,
            'backups': [b.as_result() for b in backups],
            'damaged': [catalog.describe_damaged(d) for d in damaged],
            'warnings': [f"backup {d.id} is damaged and cannot be restored: {d.reason}; restore "
                         "its manifest from a copy, or remove the directory if it cannot be "
                         "repaired" for d in damaged]}
