"""Pull capture (the datastore): QEMU keeps each disk's point in time in a fleecing image and
exports it read-only over NBD; the engine reads the export (``guest/nbd.py``) and the format
chunks it.

Per disk, before the point in time, a thin fleecing qcow2 the caller created (``DiskJob.
target_path``) is opened with the disk's node as its backing. One QMP ``transaction`` then fixes
the point in time for every disk: it adds the chain's next persistent bitmap (if any), for an
incremental a disabled (frozen) bitmap with the previous bitmap merged into it, and a
``blockdev-backup sync=none`` job from the disk into the fleecing node, which copies each
cluster there before the guest overwrites it. The fleecing node then reads as the disk did at
the point in time; an NBD server on a unix socket exports it, carrying the frozen bitmap for an
incremental. The sync=none job is never rate-limited (a slow job would slow the guest's writes);
the reader applies the bandwidth limit.

The fleecing images need room: a cluster the guest overwrites during the backup is copied into
them first, up to each disk's size. In QEMU 7.2 a copy the fleecing image cannot take (ENOSPC)
fails the guest's own write (blockdev-backup's filter breaks the guest write; only an explicit
``copy-before-write`` node has ``on-cbw-error: break-snapshot``), so ``open_targets`` warns when
a fleecing filesystem has less free space than the disks on it could need.

Every name is ours and carries the vmid, so what a killed run leaves can be found in QEMU by
prefix (``run/leftovers.py``): jobs ``guestvault-<vmid>-``, fleecing nodes ``gvt-<vmid>-``,
exports ``gvx-<vmid>-``, frozen bitmaps ``gvfrozen-<vmid>-``.
"""
from __future__ import annotations

import os
import time
import uuid

from ..errors import BackupFailed, GuestvaultError, QmpCommandFailed
from ..format.capture import BLOCK
from .capture import (EXPORT_PREFIX, JOB_PREFIX, TARGET_PREFIX, cancel_jobs, close_targets,
                      delete_exports, stop_nbd_server)
from .nbd import NbdSource

FROZEN_PREFIX = 'gvfrozen-'
# A unix socket's path must fit sockaddr_un.sun_path (108 bytes with its NUL).
MAX_SOCKET_PATH = 107


def our_exports(qmp, vmid):
    """NBD exports of guestvault pull runs of this guest still known to QEMU."""
    prefix = f"{EXPORT_PREFIX}{vmid}-"
    return [e['id'] for e in qmp.execute('query-block-exports') if e['id'].startswith(prefix)]


def our_frozen_bitmaps(disks, vmid):
    """[(node, name)] of frozen bitmaps of pull runs of this guest still on its disks."""
    prefix = f"{FROZEN_PREFIX}{vmid}-"
    return [(d.node, b['name']) for d in disks for b in d.bitmaps
            if b['name'].startswith(prefix)]


def fleecing_space_warnings(disk_jobs):
    """One line per fleecing filesystem with less free space than its disks' sizes (what the
    images take if the guest rewrote every disk whole while the backup reads it)."""
    needed, free, where = {}, {}, {}
    for job in disk_jobs:
        directory = os.path.dirname(os.path.abspath(job.target_path))
        try:
            device = os.stat(directory).st_dev
            stats = os.statvfs(directory)
        except OSError:
            continue  # blockdev-add reports a missing image
        needed[device] = needed.get(device, 0) + int(job.disk.virtual_size)
        free[device] = stats.f_bavail * stats.f_frsize
        where.setdefault(device, directory)
    gib = float(1 << 30)
    return [f"WARNING: the fleecing images in {where[device]} have {free[device] / gib:.1f} GiB "
            f"free, and could need up to {needed[device] / gib:.1f} GiB if the guest rewrote its "
            "disks during the backup; a copy they cannot take fails the guest's write (set "
            "GUESTVAULT_FLEECING_DIR to a larger local filesystem)"
            for device in sorted(needed) if free[device] < needed[device]]


class PullCapture:
    """Fleecing nodes, the transaction, the sync=none jobs and the NBD exports of one backup of
    one guest. ``socket_path``: where QEMU's NBD server listens (a unix socket in the run
    directory; the caller picks it). A BlockCapture."""

    kind = BLOCK

    def __init__(self, qmp, vmid, jobs, log, socket_path):
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise BackupFailed(f"the NBD socket path {socket_path} is longer than a unix socket "
                               f"allows ({MAX_SOCKET_PATH} bytes); use a shorter run directory "
                               "(GUESTVAULT_RUN_DIR)")
        self.qmp = qmp
        self.vmid = vmid
        self.log = log
        self.socket_path = socket_path
        self.disk_jobs = list(jobs)
        run = uuid.uuid4().hex[:6]
        self.targets = {}         # disk id -> fleecing node name
        self.jobs = {}            # disk id -> sync=none block job id
        self.exports = {}         # disk id -> NBD export id (also the export's name)
        self.frozen = {}          # disk id -> frozen bitmap name (incrementals only)
        self.new_bitmaps = []     # (node, name) added by the transaction
        self._sources = {}
        self._server_started = False
        for index, job in enumerate(self.disk_jobs):
            disk_id = job.disk.id
            self.targets[disk_id] = f"{TARGET_PREFIX}{vmid}-{run}-{index}"
            self.jobs[disk_id] = f"{JOB_PREFIX}{vmid}-{run}-{disk_id}"
            self.exports[disk_id] = f"{EXPORT_PREFIX}{vmid}-{run}-{disk_id}"
            if job.since_bitmap:
                self.frozen[disk_id] = f"{FROZEN_PREFIX}{vmid}-{run}-{index}"
        self.transaction_seconds = None

    def _job(self, disk_id):
        return next(j for j in self.disk_jobs if j.disk.id == disk_id)

    def open_targets(self):
        """Open each fleecing image with its disk's node as backing (again, after QEMU was
        restarted by stop mode)."""
        for warning in fleecing_space_warnings(self.disk_jobs):
            self.log(warning)
        for job in self.disk_jobs:
            self.qmp.execute('blockdev-add', {
                'driver': 'qcow2', 'node-name': self.targets[job.disk.id],
                'file': {'driver': 'file', 'filename': job.target_path},
                'backing': job.disk.node})

    def actions(self):
        actions = []
        self.new_bitmaps = []
        for job in self.disk_jobs:
            node = job.disk.node
            if job.new_bitmap:
                actions.append(('block-dirty-bitmap-add',
                                {'node': node, 'name': job.new_bitmap, 'persistent': True}))
                self.new_bitmaps.append((node, job.new_bitmap))
            frozen = self.frozen.get(job.disk.id)
            if frozen:
                # The previous bitmap goes on counting (it is retired only once the backup is
                # stored); the export reads a frozen copy of it as of the point in time.
                actions.append(('block-dirty-bitmap-add',
                                {'node': node, 'name': frozen, 'disabled': True}))
                actions.append(('block-dirty-bitmap-merge',
                                {'node': node, 'target': frozen, 'bitmaps': [job.since_bitmap]}))
            actions.append(('blockdev-backup', {
                'job-id': self.jobs[job.disk.id], 'device': node,
                'target': self.targets[job.disk.id], 'sync': 'none'}))
        return actions

    def start(self, speed_per_disk=0, max_workers=None, compress=False):
        """Fix the point in time (one transaction for every disk), then export each disk's point
        in time over NBD. ``speed_per_disk``, ``max_workers`` and ``compress`` are accepted for
        PushCapture's interface and not applied: the sync=none job must never slow the guest;
        the reader applies the bandwidth limit."""
        del speed_per_disk, max_workers, compress
        started = time.monotonic()
        self.qmp.transaction(self.actions())
        self.transaction_seconds = time.monotonic() - started
        try:
            self.qmp.start_nbd_server(self.socket_path)
        except QmpCommandFailed as exc:
            raise BackupFailed(
                f"cannot start QEMU's NBD server on {self.socket_path}: {exc}. QEMU runs one NBD "
                "server at a time: if another tool runs one in this guest's QEMU, stop it "
                "(nbd-server-stop) first") from exc
        self._server_started = True
        for job in self.disk_jobs:
            disk_id = job.disk.id
            spec = {'type': 'nbd', 'id': self.exports[disk_id],
                    'node-name': self.targets[disk_id], 'name': self.exports[disk_id],
                    'writable': False}
            if disk_id in self.frozen:
                spec['bitmaps'] = [{'node': job.disk.node, 'name': self.frozen[disk_id]}]
            self.qmp.execute('block-export-add', spec)

    def sources(self):
        """{disk id: NbdSource} of the point in time (opened once; closed by close_targets)."""
        for job in self.disk_jobs:
            disk_id = job.disk.id
            if disk_id not in self._sources:
                self._sources[disk_id] = NbdSource(
                    self.socket_path, self.exports[disk_id],
                    incremental=disk_id in self.frozen, bitmap_name=self.frozen.get(disk_id))
        return dict(self._sources)

    def check_jobs(self):
        """Raise BackupFailed unless every sync=none job still runs without error: a job that
        ended stopped keeping the point in time, so what was read after it may be newer data.
        Call after reading every disk, before the backup is stored."""
        running = {j['device']: j for j in self.qmp.execute('query-block-jobs')}
        broken = []
        for disk_id, job in sorted(self.jobs.items()):
            state = running.get(job)
            if state is None:
                broken.append(f"{disk_id}: its job {job} has ended")
            elif state.get('status') != 'running' or state.get('io-status', 'ok') != 'ok':
                broken.append(f"{disk_id}: its job {job} is {state.get('status')} (I/O status "
                              f"{state.get('io-status', 'ok')})")
        if broken:
            raise BackupFailed("the point in time was not kept for every disk, the backup is "
                               "not consistent: " + '; '.join(broken))

    def _close_sources(self):
        for source in self._sources.values():
            source.close()
        self._sources = {}

    def close_targets(self):
        """Take the point in time down: exports, sync=none jobs, NBD server, fleecing nodes,
        frozen bitmaps. The chain's bitmaps are the caller's (bitmaps_to_retire)."""
        self._close_sources()
        delete_exports(self.qmp, list(self.exports.values()))
        running = {j['device'] for j in self.qmp.execute('query-block-jobs')}
        cancel_jobs(self.qmp, [j for j in self.jobs.values() if j in running])
        if self._server_started:
            stop_nbd_server(self.qmp, self.socket_path)
            self._server_started = False
        close_targets(self.qmp, list(self.targets.values()), files=False)
        for disk_id, name in self.frozen.items():
            self.qmp.remove_bitmap(self._job(disk_id).disk.node, name)

    def abort(self):
        """Undo the QEMU side after a failure: close_targets, and drop the new bitmaps. Never
        raises."""
        try:
            self.close_targets()
        except GuestvaultError as exc:  # QEMU gone: its bitmaps went with it
            self.log(f"cleanup in QEMU incomplete: {exc}")
        try:
            for node, name in self.new_bitmaps:
                self.qmp.remove_bitmap(node, name)
        except GuestvaultError as exc:
            self.log(f"cleanup in QEMU incomplete: {exc}")

    def journal_entries(self):
        """What a kill from the start on would leave, for ``guest_runs.record(**entries)``."""
        return {
            'jobs': sorted(self.jobs.values()),
            'targets': sorted(self.targets.values()),
            'new_bitmaps': [[j.disk.node, j.new_bitmap] for j in self.disk_jobs
                            if j.new_bitmap],
            'exports': sorted(self.exports.values()),
            'nbd_socket': self.socket_path,
            'frozen_bitmaps': [[self._job(d).disk.node, name]
                               for d, name in sorted(self.frozen.items())],
            'fleecing_images': [j.target_path for j in self.disk_jobs],
        }
