"""guest_bitmaps: remove guestvault's bitmaps from a guest, or what killed runs left.

The counterpart of qmpbackup's ``cleanup --remove-bitmaps``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..guest.disks import discover_disks
from ..guest.kind import require_vm
from ..guest.qmp import QmpSession
from ..paths import CONFIG_DIR
from ..policy import chain as chains
from . import guest_runs, leftovers
from .locate import open_storage, resolve_guest
from .request import Request


@dataclass
class GuestBitmapsRequest(Request):
    vmid: int
    qmp_socket: str = None       # None: the registry's
    config_dir: str = CONFIG_DIR
    chain: str = None            # only this chain's bitmaps
    orphans: bool = False        # only the bitmaps nobody needs
    cleanup: bool = False        # what killed runs left, orphan bitmaps included
    storage: str = None
    dumpdir: str = None
    lockwait: float = 180        # minutes
    check_mode: bool = False


def run_guest_bitmaps(request):
    """Remove guestvault's bitmaps (all, one chain's, or with ``orphans`` only those nobody
    needs) or, with ``cleanup``, what killed runs left (their block jobs, target nodes, hidden
    directories and orphan bitmaps): ``{'changed', 'removed', 'cleared', 'diff'}``.

    Other tools' bitmaps are never touched. After removing a chain's bitmap the next ``auto``
    backup of that chain is a full one; removing orphans never changes what the next backup
    does.
    """
    chain, orphans, cleanup, check_mode = (request.chain, request.orphans, request.cleanup,
                                           request.check_mode)
    entry = resolve_guest(request.vmid, request.qmp_socket, None, request.config_dir)
    require_vm(entry, "guest_bitmaps works on a VM's dirty bitmaps: a container has no disks "
               "and no bitmaps, and each of its backups is full",
               f"to clear what a killed backup of it left, run 'guestvault-dump --cleanup "
               f"{entry.vmid}' on its node (guest_info shows what is left)")
    store = open_storage(request.config_dir, request.storage, request.dumpdir)
    with guest_runs.hold(entry.vmid, 'bitmaps', float(request.lockwait) * 60):
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
