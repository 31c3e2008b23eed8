"""verify: re-read a backup as a restore would and check it; record what was found.

What is checked is the format's business (the qcow2 chain: every image of the chain against its
manifest's sha256, ``qemu-img check`` of the backup's own images, each incremental's backing
link). The outcome is stored as the backup's verify state, shown by backup_info.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import BackupDamaged, VerifyFailed
from ..paths import CONFIG_DIR
from ..times import format_time
from .locate import format_of
from .notices import notified_operation
from .opener import open_backups
from .request import Request


@dataclass
class VerifyRequest(Request):
    vmid: int
    backup: str = 'latest'
    storage: str = None
    dumpdir: str = None
    config_dir: str = CONFIG_DIR
    lockwait: float = 180        # minutes
    fail: bool = False           # a damaged backup raises VerifyFailed
    notify: str = 'never'        # always, error or never: the type=verify notification
    check_mode: bool = False

    @classmethod
    def from_params(cls, params, check_mode=False):
        """The module fails on a damaged backup, so a playbook stops there."""
        request = super().from_params(params, check_mode)
        request.fail = True
        return request


def run_verify(request, log=None):
    """Returns the state written (``ok`` or ``failed``) with the problems found; with ``fail``,
    a damaged backup raises VerifyFailed (carrying that result), so a playbook stops. Its
    notification goes out as ``request.notify`` says."""
    return notified_operation('verify', request, lambda: _run(request), _verify_summary,
                              _verify_failure, log)


def _verify_summary(result):
    return (f"Backup {result['backup']}: {result['verify_state']}"
            + ''.join(f"\n- {problem}" for problem in result['problems']))


def _verify_failure(result):
    if result['verify_state'] != 'ok':
        return f"backup {result['backup']} failed verification"
    return None


def _run(request):
    with open_backups(request, 'verify', shared=True, resolve=False) as opened:
        result = _verify(opened, request.check_mode)
    if request.fail and result['verify_state'] != 'ok':
        raise VerifyFailed(f"backup {result['backup']} failed verification: "
                           + '; '.join(result['problems']), result)
    return result


def _verify(opened, check_mode):
    store, warnings = opened.storage, opened.warnings
    try:
        record = opened.resolve()
    except BackupDamaged as exc:
        # Nothing to read and nowhere to record a state: the damage is the finding.
        return {'changed': False, 'backup': exc.damaged.id, 'verify_state': 'failed',
                'problems': [str(exc)], 'chain': [], 'previous_state': 'unknown',
                'warnings': warnings}
    chain, problems = format_of(store, record).verify(store, record, check_mode=check_mode)
    state = {'state': 'failed' if problems else 'ok', 'problems': problems,
             'time': format_time(datetime.now(timezone.utc)),
             'chain': [r.manifest.time for r in chain]}
    previous = store.read_verify_state(record)
    if not check_mode:
        store.write_verify_state(record, state)
    return {'changed': not check_mode, 'backup': record.id, 'verify_state': state['state'],
            'problems': problems, 'chain': state['chain'],
            'previous_state': previous['state'] if previous else 'none', 'warnings': warnings}
