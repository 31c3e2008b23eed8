"""Read-only views of a guest (disks, bitmaps, chains) and the removal of its chain bitmaps.

The counterparts of qmpbackup's ``info --show bitmaps`` and ``cleanup --remove-bitmaps``.
"""
from __future__ import annotations

from ..policy import chain as chains
from ..guest.disks import discover_disks
from .locate import open_storage, resolve_guest
from ..guest.qmp import QmpSession
from ..storage.directory import format_time


def _bitmap_view(bitmap):
    parsed = chains.parse_bitmap_name(bitmap['name'])
    return {
        'name': bitmap['name'], 'chain': parsed[0] if parsed else None,
        'since': parsed[1] if parsed else None, 'guestvault': parsed is not None,
        'dirty_bytes': bitmap.get('count', 0), 'granularity': bitmap.get('granularity'),
        'recording': bitmap.get('recording'), 'persistent': bitmap.get('persistent'),
        'inconsistent': bool(bitmap.get('inconsistent')), 'busy': bool(bitmap.get('busy')),
    }


def _chains_on_storage(storage, vmid, disks):
    by_chain = {}
    for backup in storage.backups(vmid):
        chain = backup.index.get('chain')
        if chain:
            by_chain.setdefault(chain, []).append(backup)
    views = []
    for chain, backups in sorted(by_chain.items(), key=lambda kv: kv[1][-1].time):
        tip = backups[-1]
        wanted = chains.bitmap_name(chain, tip.time)
        chained = [d for d in disks if d.supports_bitmaps
                   and d.id in {x['id'] for x in tip.index['disks'] if x.get('bitmap')}]
        valid = bool(chained) and all(
            any(b['name'] == wanted and not b.get('inconsistent') for b in d.bitmaps)
            for d in chained)
        views.append({
            'chain': chain, 'start': tip.index.get('chain_start'),
            'backups': [format_time(b.time) for b in backups],
            'latest': format_time(tip.time), 'bitmap': wanted,
            'can_continue': valid,
        })
    return views


def inspect_guest(vmid, qmp_socket=None, config_dir='/etc/guestvault', storage=None,
                  dumpdir=None):
    entry = resolve_guest(vmid, qmp_socket, None, config_dir)
    store = open_storage(config_dir, storage, dumpdir)
    with QmpSession(entry.qmp_socket) as qmp:
        status = qmp.status()
        disks = discover_disks(qmp)
        name = entry.name or qmp.execute('query-name').get('name', '')
    result = {
        'vmid': entry.vmid, 'name': name, 'status': status, 'qmp_socket': entry.qmp_socket,
        'disks': [dict(d.as_dict(), supports_bitmaps=d.supports_bitmaps,
                       read_only=d.read_only, bitmaps=[_bitmap_view(b) for b in d.bitmaps])
                  for d in disks],
    }
    if store is not None:
        result['chains'] = _chains_on_storage(store, entry.vmid, disks)
        result['storage_path'] = store.path
    return result


def remove_bitmaps(vmid, qmp_socket=None, config_dir='/etc/guestvault', chain=None,
                   check_mode=False):
    """Remove guestvault's bitmaps (all, or one chain's); returns (removed, before, after).

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
                qmp.execute('block-dirty-bitmap-remove', {'node': item['node'],
                                                          'name': item['name']})
    gone = {(r['disk'], r['name']) for r in removed}
    after = {disk: [n for n in names if (disk, n) not in gone] for disk, names in before.items()}
    return removed, before, after
