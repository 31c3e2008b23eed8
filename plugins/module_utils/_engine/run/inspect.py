"""Read-only views of a guest (disks, bitmaps, chains) and the removal of its chain bitmaps.

The counterparts of qmpbackup's ``info --show bitmaps`` and ``cleanup --remove-bitmaps``.
"""
from __future__ import annotations

from datetime import datetime, timezone

from ..errors import DiskSelectionError
from ..guest import live
from ..guest.disks import discover_disks, select_disks
from ..guest.qmp import QmpSession
from ..policy import chain as chains
from ..times import format_time
from . import guest_runs, leftovers, live_server
from .locate import format_of, open_storage, resolve_guest


def _bitmap_view(bitmap, orphan_reason=None):
    parsed = chains.parse_bitmap_name(bitmap['name'])
    return {
        'orphan': orphan_reason is not None, 'orphan_reason': orphan_reason,
        'name': bitmap['name'], 'chain': parsed[0] if parsed else None,
        'since': parsed[1] if parsed else None, 'guestvault': parsed is not None,
        'dirty_bytes': bitmap.get('count', 0), 'granularity': bitmap.get('granularity'),
        'recording': bitmap.get('recording'), 'persistent': bitmap.get('persistent'),
        'inconsistent': bool(bitmap.get('inconsistent')), 'busy': bool(bitmap.get('busy')),
    }


def _chains_on_storage(storage, entry, disks, chain_period, now):
    """Each chain on the storage, and whether a backup (with the registry's disk selection)
    could continue it: the same rule as guest_backup's level decision."""
    try:
        selected, _warnings = select_disks(disks, entry.include or None, entry.exclude or None)
        selection_problem = None
    except DiskSelectionError as exc:
        selected, selection_problem = [], str(exc)
    backups = storage.backups(entry.vmid)
    names = sorted({b.index['chain'] for b in backups if b.index.get('chain')},
                   key=lambda name: chains.chain_tip(backups, name).backup_time)
    key = format_of(storage).key_fingerprint
    views = []
    for name in names:
        tip = chains.chain_tip(backups, name)
        members = [b for b in backups if b.index.get('chain') == name]
        problem = selection_problem or chains.key_change(tip, key) \
            or chains.chain_problem(tip, selected, chain_period, now)
        views.append({
            'chain': name, 'start': format_time(tip.chain_start),
            'backups': [format_time(b.time) for b in members],
            'latest': format_time(tip.backup_time),
            'bitmap': chains.bitmap_name(name, tip.backup_time),
            'can_continue': problem is None, 'reason': problem,
        })
    return views


def inspect_guest(vmid, qmp_socket=None, config_dir='/etc/guestvault', storage=None,
                  dumpdir=None, chain_period='none', now=None, lockwait=180):
    """A guest's disks, bitmaps (orphans flagged), chains on a storage, and what killed runs
    left behind. Waits, up to ``lockwait`` minutes, while another run holds the guest."""
    entry = resolve_guest(vmid, qmp_socket, None, config_dir)
    store = open_storage(config_dir, storage, dumpdir)
    with guest_runs.hold(entry.vmid, 'inspect', float(lockwait) * 60):
        with QmpSession(entry.qmp_socket) as qmp:
            status = qmp.status()
            disks = discover_disks(qmp)
            name = entry.name or qmp.guest_name()
            left = leftovers.find(qmp, entry.vmid, disks, store)
            copying = live.stream_progress(qmp, entry.vmid)
    orphans = {(o['disk'], o['name']): o['reason'] for o in left['orphan_bitmaps']}
    result = {
        'vmid': entry.vmid, 'name': name, 'status': status, 'qmp_socket': entry.qmp_socket,
        'disks': [dict(d.as_dict(), supports_bitmaps=d.supports_bitmaps, read_only=d.read_only,
                       in_job=d.in_job,
                       bitmaps=[_bitmap_view(b, orphans.get((d.id, b['name'])))
                                for b in d.bitmaps])
                  for d in disks],
        'leftovers': left,
        # a live restore's background copies still running (restore with live)
        'live_restore': copying,
        # its NBD server (a datastore's): whether it runs, and what stopped it
        'live_restore_server': live_server.read_state(entry.vmid),
    }
    stopped = (result['live_restore_server'] or {}).get('error')
    if stopped:
        result['warnings'] = [
            f"the live restore of guest {entry.vmid} stopped: {stopped['error']}"
            + f"; {stopped.get('what_to_do') or stopped.get('disks')}"]
    if store is not None:
        result['chains'] = _chains_on_storage(store, entry, disks, chain_period,
                                              now or datetime.now(timezone.utc))
        result['storage_path'] = store.path
    return result


def remove_bitmaps(vmid, qmp_socket=None, config_dir='/etc/guestvault', chain=None,
                   orphans=False, cleanup=False, storage=None, dumpdir=None, check_mode=False,
                   lockwait=180):
    """Remove guestvault's bitmaps (all, one chain's, or with ``orphans`` only those nobody
    needs) or, with ``cleanup``, what killed runs left (their block jobs, target nodes, hidden
    directories and orphan bitmaps): ``{'changed', 'removed', 'cleared', 'diff'}``.

    Other tools' bitmaps are never touched. After removing a chain's bitmap the next ``auto``
    backup of that chain is a full one; removing orphans never changes what the next backup
    does.
    """
    entry = resolve_guest(vmid, qmp_socket, None, config_dir)
    store = open_storage(config_dir, storage, dumpdir)
    with guest_runs.hold(entry.vmid, 'bitmaps', float(lockwait) * 60):
        with QmpSession(entry.qmp_socket) as qmp:
            disks = discover_disks(qmp)
            before = {d.id: [b['name'] for b in d.bitmaps] for d in disks}
            if cleanup:
                cleared = leftovers.clear(qmp, entry.vmid, disks, store, lambda m: None,
                                          check_mode=check_mode)
                more = leftovers.remove_orphans(qmp, entry.vmid, disks, store, lambda m: None,
                                                check_mode=check_mode)
                seen = {(o['disk'], o['name']) for o in cleared['orphan_bitmaps']}
                cleared['orphan_bitmaps'] += [o for o in more if (o['disk'], o['name']) not in seen]
                removed = [{'disk': o['disk'], 'name': o['name']} for o in cleared['orphan_bitmaps']]
            else:
                cleared = None
                removed = _select_bitmaps(qmp, entry.vmid, disks, store, chain, orphans)
                if not check_mode:
                    for item in removed:
                        qmp.remove_bitmap(item['node'], item['name'], missing_ok=False)
    gone = {(r['disk'], r['name']) for r in removed}
    after = {disk: [n for n in names if (disk, n) not in gone] for disk, names in before.items()}
    cleared_anything = bool(cleared and leftovers.anything(dict(cleared, orphan_bitmaps=None)))
    return {'changed': bool(removed) or cleared_anything, 'removed': removed,
            'cleared': cleared, 'diff': {'before': before, 'after': after}}


def _select_bitmaps(qmp, vmid, disks, store, chain, orphans):
    """Our bitmaps to remove: one chain's, the orphans, or all."""
    wanted = {(o['disk'], o['name']) for o in
              leftovers.find(qmp, vmid, disks, store)['orphan_bitmaps']} if orphans else None
    selected = []
    for disk in disks:
        for bitmap in disk.bitmaps:
            parsed = chains.parse_bitmap_name(bitmap['name'])
            if parsed is None or (chain is not None and parsed[0] != chain):
                continue
            if wanted is not None and (disk.id, bitmap['name']) not in wanted:
                continue
            selected.append({'disk': disk.id, 'node': disk.node, 'name': bitmap['name']})
    return selected
