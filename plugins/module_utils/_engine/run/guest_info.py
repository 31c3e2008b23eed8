"""guest_info: a read-only view of a guest (disks, bitmaps, chains, what killed runs left; of a
container, its trees, volumes, mounts and archives).

The counterpart of qmpbackup's ``info --show bitmaps`` (guest_bitmaps.py removes them).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from ..errors import ConfigError, DiskSelectionError
from ..format.capture import TREE
from ..guest import live
from ..guest.disks import discover_disks, select_disks
from ..guest.kind import guest_kind
from ..guest.lxc.filesystems import tree_kind
from ..guest.lxc.modes import READABLE_BACKENDS, check_trees, snapshot_problem
from ..guest.qmp import QmpSession
from ..paths import CONFIG_DIR
from ..policy import chain as chains
from ..restore import live_server
from ..times import format_time
from . import guest_runs, leftovers
from .locate import format_of, open_storage, resolve_guest
from .request import Request


@dataclass
class GuestInfoRequest(Request):
    vmid: int
    qmp_socket: str = None       # None: the registry's
    config_dir: str = CONFIG_DIR
    storage: str = None          # with storage or dumpdir: the chains on it too
    dumpdir: str = None
    chain_period: str = 'none'
    now: object = None           # a datetime; None: now
    lockwait: float = 180        # minutes


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
    names = sorted({b.manifest.chain for b in backups if b.manifest.chain},
                   key=lambda name: chains.chain_tip(backups, name).backup_time)
    key = format_of(storage).key_fingerprint
    views = []
    for name in names:
        tip = chains.chain_tip(backups, name)
        members = [b for b in backups if b.manifest.chain == name]
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


def _container_view(entry, guest):
    """A container as guest_info shows it (where it is, what a backup reads and leaves out),
    and why a backup of it would fail (None when it would not)."""
    config = guest.config
    volumes = entry.included_volumes
    try:
        check_trees(guest.container, config, volumes)
        problem, snapshot = None, snapshot_problem(config, volumes) or None
    except ConfigError as exc:
        problem, snapshot = str(exc), None
    excluded = ([{'path': target, 'source': source, 'by': 'lxc.mount.entry'}
                 for source, target in config.mounts]
                + [{'path': m.path, 'source': m.volume, 'by': m.key}
                   for m in entry.mountpoints if not m.backup])
    view = {
        'name': guest.container.name, 'lxcpath': guest.container.lxcpath,
        'config': config.path, 'unprivileged': config.unprivileged, 'rootfs': config.rootfs,
        'rootfs_kind': (tree_kind(config.rootfs) if config.rootfs_backend in READABLE_BACKENDS
                        else config.rootfs_backend),
        'snapshot_problem': snapshot,
        'volumes': [{'key': m.key, 'volume': m.volume, 'path': m.path}
                    for m in entry.mountpoints if m.backup],
        # never in a backup: mounts from elsewhere, and volumes without backup=1
        'excluded_mounts': excluded,
    }
    return view, problem


def _leftovers_warning(vmid, name, left):
    """What a killed capture left, in one line with the way to clear it (None: nothing)."""
    if not leftovers.anything(left):
        return None
    what = [text for text, present in (
        (f"container {name} frozen", left['frozen']),
        (f"container {name} stopped", left['stopped']),
        (f"the temporary copy {left['temp_dir']}", left['temp_dir']),
        (f"the snapshot(s) {', '.join(left['snapshots'])}", left['snapshots']),
        (f"the partial archive(s) {', '.join(left['partial_backups'])}",
         left['partial_backups'])) if present]
    return (f"a killed backup of guest {vmid} left {', '.join(what) or 'its journal'}; clear "
            f"it with 'guestvault-dump --cleanup {vmid}' on this node")


def _container_info(request, entry, store):
    """guest_info of a container: its state, trees, volumes and mounts, its backups on the
    storage, and what killed captures left."""
    kind = guest_kind(entry)
    with guest_runs.hold(entry.vmid, 'inspect', float(request.lockwait) * 60):
        with kind.connect(entry) as guest:
            status = guest.container.state()
            left = leftovers.find_container(entry.vmid, store)
    view, problem = _container_view(entry, guest)
    result = {
        'changed': False, 'vmid': entry.vmid, 'type': entry.type,
        'name': entry.name or guest.container.name, 'status': status,
        'container': view, 'leftovers': left,
    }
    warnings = [text for text in (
        problem and f"a backup of guest {entry.vmid} would fail: {problem}",
        _leftovers_warning(entry.vmid, guest.container.name, left)) if text]
    if warnings:
        result['warnings'] = warnings
    if store is not None:
        result['backups'] = [b.as_result() for b in store.backups(entry.vmid)]
        result['storage_path'] = store.path
    return result


def run_guest_info(request):
    """A guest's disks, bitmaps (orphans flagged), chains on a storage, and what killed runs
    left behind; of a container, its trees and backups (``_container_info``). Waits, up to
    ``lockwait`` minutes, while another run holds the guest."""
    entry = resolve_guest(request.vmid, request.qmp_socket, None, request.config_dir)
    store = open_storage(request.config_dir, request.storage, request.dumpdir)
    if guest_kind(entry).yields == TREE:
        return _container_info(request, entry, store)
    with guest_runs.hold(entry.vmid, 'inspect', float(request.lockwait) * 60):
        with QmpSession(entry.qmp_socket) as qmp:
            status = qmp.status()
            disks = discover_disks(qmp)
            name = entry.name or qmp.guest_name()
            left = leftovers.find(qmp, entry.vmid, disks, store)
            copying = live.stream_progress(qmp, entry.vmid)
    orphans = {(o['disk'], o['name']): o['reason'] for o in left['orphan_bitmaps']}
    result = {
        'changed': False, 'vmid': entry.vmid, 'type': entry.type, 'name': name, 'status': status,
        'qmp_socket': entry.qmp_socket,
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
        result['chains'] = _chains_on_storage(store, entry, disks, request.chain_period,
                                              request.now or datetime.now(timezone.utc))
        result['storage_path'] = store.path
    return result
