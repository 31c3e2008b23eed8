"""verify: re-read a backup as a restore would and check it; record what was found.

What is checked is the format's business (the qcow2 chain: every image of the chain against its
manifest's sha256, ``qemu-img check`` of the backup's own images, each incremental's backing
link). The outcome is stored as the backup's verify state, shown by backup_info.
"""
from __future__ import annotations

from datetime import datetime, timezone

from ..errors import BackupDamaged, VerifyFailed
from ..guest.registry import validate_vmid
from ..storage import catalog
from ..storage.files import private_files
from ..times import format_time
from . import guest_runs
from .locate import format_of, require_storage


def verify_backup(vmid, backup='latest', storage=None, dumpdir=None,
                  config_dir='/etc/guestvault', check_mode=False, lockwait=180, fail=False):
    """Returns the state written (``ok`` or ``failed``) with the problems found; with ``fail``,
    a damaged backup raises VerifyFailed (carrying that result), so a playbook stops."""
    vmid = validate_vmid(vmid)
    store = require_storage(config_dir, storage, dumpdir)
    with private_files(), store.guest_lock(vmid, lockwait * 60, shared=True,
                                           holder=guest_runs.holder(vmid, 'verify')):
        result = _verify(store, vmid, backup, check_mode)
    if fail and result['verify_state'] != 'ok':
        raise VerifyFailed(f"backup {result['backup']} failed verification: "
                           + '; '.join(result['problems']), result)
    return result


def _verify(store, vmid, backup, check_mode):
    warnings = []
    try:
        record = catalog.resolve(store, vmid, backup, warnings=warnings)
    except BackupDamaged as exc:
        # Nothing to read and nowhere to record a state: the damage is the finding.
        return {'changed': False, 'backup': exc.damaged.id, 'verify_state': 'failed',
                'problems': [str(exc)], 'chain': [], 'previous_state': 'unknown',
                'warnings': warnings}
    chain, problems = format_of(store).verify(store, record, check_mode=check_mode)
    state = {'state': 'failed' if problems else 'ok', 'problems': problems,
             'time': format_time(datetime.now(timezone.utc)),
             'chain': [r.index['time'] for r in chain]}
    previous = store.read_verify_state(record)
    if not check_mode:
        store.write_verify_state(record, state)
    return {'changed': not check_mode, 'backup': record.id, 'verify_state': state['state'],
            'problems': problems, 'chain': state['chain'],
            'previous_state': previous['state'] if previous else 'none', 'warnings': warnings}
