"""What killed runs leave behind, found and cleared: block jobs still copying, target nodes
still open, hidden directories growing on the storage, and bitmaps nobody needs; of a pull run
(the datastore) also its NBD exports and NBD server, its frozen bitmaps and its fleecing images;
of a container's capture the container frozen or stopped, its temporary copy, its snapshots
(guest/lxc/leftovers.py) and the archive it was writing.

A run killed with SIGKILL cannot clean up after itself; QEMU goes on copying into the hidden
directory and counting writes in the run's new bitmap. Every run of the guest (and
``guest_bitmaps cleanup=true``, and the job service's ``ExecStopPost``) clears it first, holding
the guest (``guest_runs.hold``), so the run that made it is known to be gone.
"""
from __future__ import annotations

import glob
import os
import re
import shutil

from ..errors import LockTimeout
from ..format.capture import TREE
from ..guest.capture import cancel_jobs, close_targets, our_jobs, our_targets
from ..guest.disks import discover_disks
from ..guest.kind import guest_kind
from ..guest.lxc import leftovers as lxc_leftovers
from ..guest.pull import (delete_exports, our_exports, our_frozen_bitmaps,
                          stop_nbd_server)
from ..guest.qmp import QmpSession
from ..paths import fleecing_dir
from ..policy.chain import orphan_bitmaps
from . import guest_runs
from .locate import resolve_guest

_STAGED = re.compile(r'^\.\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ\.tmp$')


def interrupted_bitmaps(journal):
    """The bitmaps a killed run added, unless its backup was stored before it was killed (then
    they are the chain's live bitmaps)."""
    if not journal or (journal.get('final_dir') and os.path.isdir(journal['final_dir'])):
        return []
    return [tuple(pair) for pair in journal.get('new_bitmaps', [])]


def find(qmp, vmid, disks, storage=None):
    """What is left over, for guest_info: nothing is changed."""
    journal = guest_runs.leftover(vmid)
    backups = storage.backups(vmid) if storage is not None else []
    orphans = orphan_bitmaps(disks, backups, interrupted_bitmaps(journal))
    exports = our_exports(qmp, vmid)
    socket = (journal or {}).get('nbd_socket')
    return {
        'jobs': our_jobs(qmp, vmid),
        'targets': our_targets(qmp, vmid),
        'interrupted_run': _describe(journal),
        'hidden_dirs': _hidden_dirs(vmid, journal, storage),
        'orphan_bitmaps': [{'disk': d.id, 'name': name, 'reason': why}
                           for d, name, why in orphans],
        'exports': exports,
        # The killed run's server, if it got as far as starting it (QEMU has one NBD server;
        # another tool's is left alone).
        'nbd_server': socket if socket and (exports or os.path.exists(socket)) else None,
        'frozen_bitmaps': [{'disk': _disk_id(disks, node), 'name': name}
                           for node, name in our_frozen_bitmaps(disks, vmid)],
        'fleecing': _fleecing(vmid, journal),
    }


def find_container(vmid, storage=None):
    """What a killed capture of container ``vmid`` left, for guest_info: guest/lxc's leftovers
    (the container frozen or stopped, a temporary copy, snapshots) and, on the storage, the
    archives it was writing (``partial_backups``). Nothing is changed."""
    found = lxc_leftovers.find_leftovers(vmid)
    found['partial_backups'] = storage.stale_paths(vmid) if storage is not None else []
    return found


def clear_container(vmid, storage, log, check_mode=False):
    """Undo what killed captures of container ``vmid`` left (``find_container``'s list); call
    with the guest held. Returns what was (or would be) cleared."""
    found = find_container(vmid, storage)
    if check_mode:
        return found
    lxc_leftovers.clear_leftovers(vmid, log)
    for name in storage.remove_stale(vmid) if storage is not None else ():
        log(f"removed {name}, left by an interrupted run")
    return found


def anything(found):
    """Whether ``find``/``clear`` (of a VM or a container) found anything a killed run left."""
    return any(found.values())


def clear(qmp, vmid, disks, storage, log, check_mode=False):
    """Clear what killed runs left: their jobs, target nodes, hidden directories and the
    bitmaps they added. Returns what was (or would be) cleared, shaped as ``find``'s result.

    Inconsistent and superseded bitmaps are left to ``remove_orphans``, which a backup calls
    after its level decision, so that the decision still names them as its reason.
    """
    journal = guest_runs.leftover(vmid)
    found = find(qmp, vmid, disks, storage)
    added = set(interrupted_bitmaps(journal))
    found['orphan_bitmaps'] = [o for o in found['orphan_bitmaps']
                               if (_node(disks, o['disk']), o['name']) in added]
    if check_mode:
        return found
    # A pull run's point in time comes down in the order it went up: exports (they hold the
    # fleecing nodes), the sync=none jobs, the NBD server, the nodes, the frozen bitmaps.
    for export in found['exports']:
        log(f"removing NBD export {export} left by an interrupted run")
    delete_exports(qmp, found['exports'])
    if found['jobs']:
        for job in found['jobs']:
            log(f"cancelling block job {job} left by an interrupted run")
        cancel_jobs(qmp, found['jobs'])
    if found['nbd_server'] or found['exports']:
        log("stopping the NBD server left by an interrupted run")
        stop_nbd_server(qmp, found['nbd_server'])
    for node in found['targets']:
        log(f"closing target node {node} left by an interrupted run")
    close_targets(qmp, found['targets'])
    for frozen in found['frozen_bitmaps']:
        qmp.remove_bitmap(_node(disks, frozen['disk']), frozen['name'])
        log(f"removed frozen bitmap {frozen['name']} of disk {frozen['disk']}, left by an "
            "interrupted run")
    for path in found['fleecing']:
        _remove_path(path)
        log(f"removed fleecing image {path}, left by an interrupted run")
    staged = _journal_dir(vmid, journal)
    if staged:
        shutil.rmtree(staged, ignore_errors=True)
        log(f"removed {staged}, left by an interrupted run")
    for name in storage.remove_stale(vmid) if storage is not None else ():
        log(f"removed {name}, left by an interrupted run")
    _remove(qmp, disks, found['orphan_bitmaps'], log)
    if journal is not None:
        guest_runs.forget(vmid)
    return found


def remove_orphans(qmp, vmid, disks, storage, log, check_mode=False):
    """Remove the bitmaps no stored backup and no live chain needs; [{disk, name, reason}]."""
    backups = storage.backups(vmid) if storage is not None else []
    orphans = [{'disk': d.id, 'name': name, 'reason': why}
               for d, name, why in orphan_bitmaps(disks, backups,
                                                  interrupted_bitmaps(guest_runs.leftover(vmid)))]
    if not check_mode:
        _remove(qmp, disks, orphans, log)
    return orphans


def clear_guest(vmid, config_dir, storage, log):
    """Clear one guest's leftovers now, unless a run holds it (that run clears its own): what
    ``guestvault-dump --cleanup`` does for each guest, e.g. as the job service's ExecStopPost.
    Returns whether anything was left over."""
    entry = resolve_guest(vmid, config_dir=config_dir)
    container = guest_kind(entry).yields == TREE
    try:
        with guest_runs.hold(vmid, 'cleanup', 0):
            if container:
                return anything(clear_container(vmid, storage, log))
            with QmpSession(entry.qmp_socket) as qmp:
                disks = discover_disks(qmp)
                found = clear(qmp, vmid, disks, storage, log)
                orphans = remove_orphans(qmp, vmid, disks, storage, log)
    except LockTimeout:
        log("another run holds the guest; it clears its own leftovers")
        return False
    return anything(found) or bool(orphans)


def _node(disks, disk_id):
    return next(d.node for d in disks if d.id == disk_id)


def _disk_id(disks, node):
    return next(d.id for d in disks if d.node == node)


def _fleecing_dir_pattern(vmid):
    """``<vmid>-<time>``: a capture's directory under the fleecing root."""
    return re.compile(rf'^{vmid}-\d{{4}}-?\d\d-?\d\dT\d\d:?\d\d:?\d\dZ$')


def _fleecing(vmid, journal):
    """Fleecing images of killed pull runs: the journal's, and any capture directory of this
    guest under the fleecing root (a run of the guest holds it, so none of them is live)."""
    found = []
    pattern = _fleecing_dir_pattern(vmid)
    for image in (journal or {}).get('fleecing_images') or ():
        if os.path.isfile(image) and image.endswith('.qcow2'):
            parent = os.path.dirname(image)
            found.append(parent if pattern.match(os.path.basename(parent)) else image)
    root = fleecing_dir()
    for path in sorted(glob.glob(os.path.join(glob.escape(root), f'{vmid}-*'))):
        if pattern.match(os.path.basename(path)) and os.path.isdir(path):
            found.append(path)
    return sorted(set(found))


def _remove_path(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _remove(qmp, disks, orphans, log):
    """Remove bitmaps and drop them from the disks' lists, so later decisions see the guest as
    it now is."""
    by_id = {d.id: d for d in disks}
    for orphan in orphans:
        disk = by_id[orphan['disk']]
        qmp.remove_bitmap(disk.node, orphan['name'], missing_ok=False)
        disk.bitmaps = [b for b in disk.bitmaps if b['name'] != orphan['name']]
        log(f"removed orphan bitmap {orphan['name']} of disk {disk.id}: {orphan['reason']}")


def _describe(journal):
    if journal is None:
        return None
    return {'pid': journal.get('pid'), 'since': journal.get('since'),
            'backup_dir': journal.get('final_dir'), 'storage_path': journal.get('storage_path')}


def _journal_dir(vmid, journal):
    """The staging directory the journal names, if it is one of this guest's (the journal is
    ours, but a path is only ever removed when it has the shape of a staging directory)."""
    path = (journal or {}).get('staged_dir')
    if path and _STAGED.match(os.path.basename(path)) \
            and os.path.basename(os.path.dirname(path)) == str(vmid) and os.path.isdir(path):
        return path
    return None


def _hidden_dirs(vmid, journal, storage):
    """Staging directories of killed runs: the journal's (on whatever storage it wrote to) and
    any hidden leftovers on the storage at hand."""
    found = [path for path in (_journal_dir(vmid, journal),) if path]
    if storage is not None:
        found += [p for p in storage.stale_paths(vmid) if p not in found]
    return found
