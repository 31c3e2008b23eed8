"""Read-only views of a guest (disks, bitmaps, chains) and the removal of its chain bitmaps.

The counterparts of qmpbackup's ``info --show bitmaps`` and ``cleanup --remove-bitmaps``.
"""
from __future__ import annotations

from datetime import datetime, timezone

from ..errors import DiskSelectionError
from ..guest.disks import discover_disks, select_disks
from ..guest.qmp import QmpSession
from ..policy import chain as chains
from ..times import format_time
from .locate import open_storage, resolve_guest


def _bitmap_view(bitmap):
    parsed = chains.parse_bitmap_name(bitmap['name'])
    return {
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
    views = []
    for name in names:
        tip = chains.chain_tip(backups, name)
        members = [b for b in backups if b.index.get('chain') == name]
        problem = selection_problem or chains.chain_problem(tip, selected, chain_period, now)
        views.append({
            'chain': name, 'start': format_time(tip.chain_start),
            'backups': [format_time(b.time) for b in members],
            'latest': format_time(tip.backup_time),
            'bitmap': chains.bitmap_name(name, tip.backup_time),
            'can_continue': problem is None, 'reason': problem,
        })
    return views


def inspect_guest(vmid, qmp_socket=None, config_dir='/etc/guestvault', storage=None,
                  dumpdir=None, chain_period='none', now=None):
    entry = resolve_guest(vmid, qmp_socket, None, config_dir)
    store = open_storage(config_dir, storage, dumpdir)
    with QmpSession(entry.qmp_socket) as qmp:
        status = qmp.status()
        disks = discover_disks(qmp)
        name = entry.name or qmp.guest_name()
    result = {
        'vmid': entry.vmid, 'name': name, 'status': status, 'qmp_socket': entry.qmp_socket,
        'disks': [dict(d.as_dict(), supports_bitmaps=d.supports_bitmaps,
                       read_only=d.read_only, bitmaps=[_bitmap_view(b) for b in d.bitmaps])
                  for d in disks],
    }
    if store is not None:
        result['chains'] = _chains_on_storage(store, entry, disks, chain_period,
                                              now or datetime.now(timezone.utc))
        result['storage_path'] = store.path
    return result


def remove_bitmaps(vmid, qmp_socket=None, config_dir='/etc/guestvault', chain=None,
                   check_mode=False):
    """Remove guestvault's bitmaps (all, or one chain's): ``{'changed', 'removed', 'diff'}``.

    Other tools' bitmaps are never touched. Afterwards the next ``auto`` backup of the affected
    chains is a full one.
    """
    entry = resolve_guest(vmid, qmp_socket, None, config_dir)
    with QmpSession(entry.qmp_socket) as qmp:
        disks = discover_disks(qmp)
        before, removed = {}, []
        for disk in disks:
            names = [b['name'] for b in disk.bitmaps]
            before[disk.id] = names
            for name in names:
                parsed = chains.parse_bitmap_name(name)
                if parsed and (chain is None or parsed[0] == chain):
                    removed.append({'disk': disk.id, 'node': disk.node, 'name': name})
        if not check_mode:
            for item in removed:
                qmp.remove_bitmap(item['node'], item['name'], missing_ok=False)
    gone = {(r['disk'], r['name']) for r in removed}
    after = {disk: [n for n in names if (disk, n) not in gone] for disk, names in before.items()}
    return {'changed': bool(removed), 'removed': removed,
            'diff': {'before': before, 'after': after}}
