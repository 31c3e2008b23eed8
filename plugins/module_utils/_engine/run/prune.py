"""prune: apply a retention policy to a storage without ever breaking a kept backup.

``retention.select_for_prune`` decides (a pure function, shown as is in check mode); this module
carries the decision out. Before anything is removed, the format is asked what kept backups
need (the qcow2 chain folds a removed parent's data into its kept child), and that is done
first, so every kept backup still restores bit-exact at every moment.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..paths import CONFIG_DIR
from ..policy.config import load_storage, load_vzdump_defaults
from ..policy.retention import RetentionPolicy, as_policy, select_for_prune, simulate
from ..vocabulary import KEEP_OPTIONS
from .locate import format_of, require_storage
from .notices import notified_operation
from .opener import guest_lock
from .request import Request


@dataclass
class PruneRequest(Request):
    vmid: int = None             # None: every guest on the storage
    storage: str = None
    dumpdir: str = None
    config_dir: str = CONFIG_DIR
    prune_backups: object = None  # property string or dict; None: the storage's, else vzdump.conf's
    timezone: str = None
    lockwait: float = 180        # minutes
    simulate: list = None        # backups (dicts with a time): run the simulator on them instead
    notify: str = 'never'        # always, error or never: the type=prune notification
    check_mode: bool = False

    @classmethod
    def from_params(cls, params, check_mode=False):
        """The module gives the policy as prune_backups or as keep_* options."""
        given = {key: params[key] for key in KEEP_OPTIONS if params.get(key) is not None}
        return cls(vmid=params['vmid'], storage=params['storage'], dumpdir=params['dumpdir'],
                   config_dir=params['config_dir'],
                   prune_backups=params.get('prune_backups') or given or None,
                   timezone=params['timezone'], lockwait=params['lockwait'],
                   simulate=params['simulate'], notify=params.get('notify') or 'never',
                   check_mode=check_mode)


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


def _guest_bytes(storage, backups):
    return sum(storage.backup_size(b) for b in backups)


def damaged_warning(broken):
    """What prune says of a damaged backup it leaves alone. Its manifest (level, protection)
    cannot be read, so the policy cannot place it: counting it as kept could remove a good
    backup in its stead, removing it could lose one that a repaired manifest brings back."""
    return (f"backup {broken.id} is damaged ({broken.reason}): prune neither counts it among "
            "the kept backups nor removes it. Restore its manifest from a copy, or remove the "
            "directory by hand if it cannot be repaired")


def prune_guest(storage, vmid, policy, tz, check_mode, lockwait, log):
    """``(report, folds, bytes freed, damaged backups left alone)`` of one guest; ``lockwait``
    in minutes."""
    fmt = format_of(storage)
    # Check mode only reads, so it shares the lock (and creates nothing).
    with guest_lock(storage, vmid, 'prune', lockwait, shared=check_mode):
        if not check_mode:
            for backup_id, applied in fmt.recover(storage, vmid):
                log(f"{'completed' if applied else 'dropped'} an interrupted manifest update of "
                    f"{backup_id}")
        backups, damaged = storage.scan(vmid)
        # Keyed by id: a qcow2 backup and a vzdump archive of one guest may share a time.
        by_id = {b.id: b for b in backups}
        marks = select_for_prune(
            [{'id': b.id, 'time': b.time, 'protected': b.protected} for b in backups],
            policy, tz)
        removed = {m.id for m in marks if m.mark == 'remove'}
        plan = fmt.plan_removal([b for b in backups if b.archive is None],
                                {by_id[i].manifest.time for i in removed
                                 if by_id[i].archive is None})
        sizes = {i: storage.backup_size(b) for i, b in by_id.items()}
        report = [{'id': m.id, 'vmid': vmid, 'time': by_id[m.id].manifest.time,
                   'mark': m.mark, 'rule': m.rule, 'size': sizes[m.id],
                   'protected': by_id[m.id].protected,
                   'level': by_id[m.id].manifest.level} for m in marks]
        fold_report = [{'id': r.id, 'new_parent': p} for r, p in plan]
        if check_mode:
            return report, fold_report, sum(sizes[t] for t in removed), damaged
        before = sum(sizes.values())
        fmt.apply_removal_plan(storage, plan, log)
        for backup_id in sorted(removed, key=lambda i: by_id[i].time):
            storage.remove(by_id[backup_id])
            log(f"removed {backup_id}")
        # Sizes of what is kept, read again (a fold changes them), without listing the guest
        # again: with thousands of snapshots that listing is what a prune would spend most on.
        kept = [b for i, b in by_id.items() if i not in removed]
        freed = before - _guest_bytes(storage, kept)
        return report, fold_report, freed, damaged


def run_prune(request, log=None):
    """Prune as ``request`` says; with ``simulate``, Proxmox's prune simulator instead (no
    storage is read)."""
    if request.simulate is not None:
        return simulate_prune(request.simulate, request.prune_backups, request.timezone)
    return notified_operation('prune', request, lambda: _prune(request, log), _prune_summary,
                              log=log)


def _prune_summary(result):
    return (f"Policy {result['policy']} ({result['policy_source']}): removed "
            f"{len(result['removed'])} backup(s), freed {result['bytes_freed']} bytes"
            + ''.join(f"\n- removed {backup_id}" for backup_id in result['removed']))


def _prune(request, log):
    log = log or (lambda message: None)
    storage = require_storage(request.config_dir, request.storage, request.dumpdir)
    policy, source = resolve_policy(request, storage)
    vmids = [request.vmid] if request.vmid is not None else storage.guest_ids()
    result = {'policy': policy.as_property_string(), 'policy_source': source, 'backups': [],
              'folded': [], 'bytes_freed': 0, 'storage': storage.id,
              'storage_path': storage.path}
    result['warnings'] = []
    result['damaged'] = []
    for vmid in vmids:
        report, folds, freed, damaged = prune_guest(storage, vmid, policy, request.timezone,
                                                    request.check_mode, request.lockwait, log)
        if request.vmid is not None and not report and not damaged:
            # From prune_guest's own listing: a second one costs seconds for many backups.
            result['warnings'].append(f"guest {request.vmid} has no backups on "
                                      f"{storage.label}; is the vmid right?")
        result['warnings'] += [damaged_warning(broken) for broken in damaged]
        result['damaged'] += [broken.id for broken in damaged]
        result['backups'] += report
        result['folded'] += folds
        result['bytes_freed'] += freed
    result['removed'] = [b['id'] for b in result['backups'] if b['mark'] == 'remove']
    result['changed'] = bool(result['removed'])
    return result


def simulate_prune(backups, policy=None, tz=None):
    """Proxmox's prune simulator: which of ``backups`` (dicts with a time) a policy keeps."""
    policy = as_policy(policy or {})
    marks = simulate(backups, policy, tz)
    return {'changed': False, 'backups': marks, 'policy': policy.as_property_string(),
            'removed': [m['id'] for m in marks if m['mark'] == 'remove']}
