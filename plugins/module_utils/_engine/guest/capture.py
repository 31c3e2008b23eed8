"""The QEMU side of a backup: target nodes, the transaction that fixes the point in time, the
block jobs, and the clean-up of what a killed run left behind.

Push capture (the qcow2 chain): QEMU's ``blockdev-backup`` copies each disk into a target image
the format created. One QMP ``transaction`` adds the chain's next persistent bitmap and starts
every disk's job, so all disks share one point in time and the bitmap hand-off is atomic with
it. Callers give names and levels; this module knows nothing of chains or files' meaning.
"""
from __future__ import annotations

import os
import time
import uuid

from ..errors import BackupFailed, GuestvaultError, QmpCommandFailed
from ..format.capture import BLOCK
from .nbd import HAS_LIBNBD, bitmap_dirty_extents

JOB_PREFIX = 'guestvault-'
TARGET_PREFIX = 'gvt-'
EXPORT_PREFIX = 'gvx-'
FILE_SUFFIX = '-file'       # a target's file (protocol) node, under its qcow2 node
WATCH_PREFIX = 'gvwatch-'   # the watcher's bitmaps, on the target's file node (not persistent)
# A new watch bitmap each time an image has grown by WATCH_BATCH bytes, or by 1/WATCH_BATCHES
# of the jobs' length if that is more (QEMU writes in bursts: a batch reads what lay below the
# file's end before its bitmap, so what the last burst wrote is hashed after the job; each
# bitmap costs QEMU a bit set per write). The images' sizes are looked at every WATCH_POLL
# seconds, with the jobs' progress.
WATCH_BATCHES = 128
WATCH_BATCH = 32 << 20
WATCH_GRANULARITY = 1 << 20
WATCH_POLL = 0.02


class DiskJob:
    """What the transaction does for one disk.

    ``new_bitmap``: the persistent bitmap added at the point in time (None: none, as for a copy
    or a raw disk); ``since_bitmap``: for an incremental, the bitmap whose changes are copied.
    """

    def __init__(self, disk, target_path, new_bitmap=None, since_bitmap=None):
        self.disk = disk
        self.target_path = target_path
        self.new_bitmap = new_bitmap
        self.since_bitmap = since_bitmap


def our_jobs(qmp, vmid):
    """Block jobs of guestvault runs of this guest still known to QEMU."""
    prefix = f"{JOB_PREFIX}{vmid}-"
    return [j['device'] for j in qmp.execute('query-block-jobs') if j['device'].startswith(prefix)]


def our_targets(qmp, vmid):
    """Target nodes of guestvault runs of this guest still open in QEMU."""
    prefix = f"{TARGET_PREFIX}{vmid}-"
    names = [n['node-name'] for n in qmp.execute('query-named-block-nodes', {'flat': True})
             if n['node-name'].startswith(prefix)]
    # a file node is its target's (close_targets closes both), also one left alone
    return sorted({name[:-len(FILE_SUFFIX)] if name.endswith(FILE_SUFFIX) else name
                   for name in names})


def cancel_jobs(qmp, jobs):
    for job in jobs:
        qmp.cancel_job(job)
    if jobs:
        qmp.wait_for_jobs(jobs, timeout=60)


def close_targets(qmp, nodes, files=True):
    """Delete target nodes, and (``files``) then their file nodes, which they held."""
    for name in [*nodes, *(node + FILE_SUFFIX for node in nodes if files)]:
        try:
            qmp.execute('blockdev-del', {'node-name': name})
        except QmpCommandFailed:
            pass  # never added, or already closed


def delete_exports(qmp, exports, timeout=30.0):
    """Remove NBD exports (dropping their clients) and wait until QEMU has let go of them."""
    for export in exports:
        try:
            qmp.execute('block-export-del', {'id': export, 'mode': 'hard'})
        except QmpCommandFailed:
            pass  # never added, or already gone
    deadline = time.monotonic() + timeout
    wanted = set(exports)
    while wanted:
        left = {e['id'] for e in qmp.execute('query-block-exports')} & wanted
        if not left:
            return
        if time.monotonic() > deadline:
            raise BackupFailed(f"NBD exports {sorted(left)} were still shutting down after "
                               f"{timeout:.0f} s")
        time.sleep(0.02)


def stop_nbd_server(qmp, socket_path=None):
    """Stop QEMU's NBD server (there is one per QEMU) and remove its socket file."""
    try:
        qmp.execute('nbd-server-stop')
    except QmpCommandFailed:
        pass  # not running
    if socket_path:
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass


class PushCapture:
    """Target nodes, the transaction and the jobs of one backup of one guest (a BlockCapture)."""

    kind = BLOCK

    def __init__(self, qmp, vmid, jobs, log, socket_path=None):
        self.qmp = qmp
        self.log = log
        self.disk_jobs = list(jobs)
        self.socket_path = socket_path  # where a watcher's dirty bitmaps are read over NBD
        run = uuid.uuid4().hex[:6]
        self.targets = {}      # disk id -> target node name
        self.jobs = {}         # disk id -> block job id
        self.new_bitmaps = []  # (node, name) added by the transaction
        self.export = f"{EXPORT_PREFIX}{vmid}-{run}-watch"
        self._watch = f"{WATCH_PREFIX}{run}-"
        for index, job in enumerate(self.disk_jobs):
            self.targets[job.disk.id] = f"{TARGET_PREFIX}{vmid}-{run}-{index}"
            self.jobs[job.disk.id] = f"{JOB_PREFIX}{vmid}-{run}-{job.disk.id}"

    def open_targets(self):
        """Open the target images in QEMU (again, after QEMU was restarted by stop mode): each
        on a file node of its own, where a watcher's bitmaps see every write to the file."""
        for job in self.disk_jobs:
            node = self.targets[job.disk.id]
            self.qmp.execute('blockdev-add', {'driver': 'file', 'node-name': node + FILE_SUFFIX,
                                              'filename': job.target_path})
            self.qmp.execute('blockdev-add', {'driver': 'qcow2', 'node-name': node,
                                              'file': node + FILE_SUFFIX})

    def actions(self, speed_per_disk=0, max_workers=None, compress=False):
        actions = []
        for job in self.disk_jobs:
            spec = {'job-id': self.jobs[job.disk.id], 'device': job.disk.node,
                    'target': self.targets[job.disk.id], 'sync': 'full'}
            if speed_per_disk:
                spec['speed'] = speed_per_disk
            if max_workers:
                spec['x-perf'] = {'max-workers': int(max_workers)}
            if compress:
                spec['compress'] = True
            if job.new_bitmap:
                actions.append(('block-dirty-bitmap-add',
                                {'node': job.disk.node, 'name': job.new_bitmap,
                                 'persistent': True}))
                self.new_bitmaps.append((job.disk.node, job.new_bitmap))
            if job.since_bitmap:
                # bitmap-mode never: the previous bitmap is dropped only after the backup is
                # safely stored, so a failure here loses nothing.
                spec.update({'sync': 'bitmap', 'bitmap-mode': 'never',
                             'bitmap': job.since_bitmap})
            actions.append(('blockdev-backup', spec))
        return actions

    def start(self, **job_options):
        """Fix the point in time: one transaction for every disk."""
        self.qmp.transaction(self.actions(**job_options))

    def run_jobs(self, progress=None, watcher=None):
        """Wait for every job; {disk id: bytes it went through}. BackupFailed on any failure.

        ``watcher`` (format/overlap.py's OverlappedDigests) reads the targets while QEMU writes
        them: each time an image has grown by ``WATCH_BATCH`` bytes (or 1/``WATCH_BATCHES`` of
        the jobs' length) a new bitmap ``k`` goes on every target's file node, between
        ``watcher.ends()`` and ``watcher.schedule(k, ends)``; after the jobs the qcow2 nodes are
        closed (flushing qcow2's caches through the file nodes), ``watcher.closed()`` hashes the
        rest of the final files while ``watcher.written`` gets each bitmap's dirty ranges per
        target path (None if they could not be read)."""
        batches = []
        grown_from = {}     # the images' sizes at the last bitmap
        # without libnbd (or a socket path) the bitmaps cannot be read: the watcher then hashes
        # every segment after the job, as before
        can_watch = HAS_LIBNBD and self.socket_path is not None

        def watch(done, total):
            if progress is not None:
                progress(done, total)
            # (none once the jobs are through: what they still write is hashed after them)
            if not can_watch or done >= total or len(batches) >= WATCH_BATCHES:
                return
            ends = watcher.ends()   # before the bitmap: below them, QEMU wrote before it
            step = max(WATCH_BATCH, total // WATCH_BATCHES)
            if max(end - grown_from.get(path, 0) for path, end in ends.items()) >= step:
                grown_from.update(ends)
                self._add_watch_bitmap(len(batches))
                batches.append(len(batches))
                watcher.schedule(batches[-1], ends)

        outcomes = self.qmp.wait_for_jobs(
            list(self.jobs.values()), progress=progress if watcher is None else watch,
            interval=WATCH_POLL if watcher is not None and can_watch else 1.0)
        failed = [o for o in outcomes.values() if not o.ok]
        if failed or len(outcomes) < len(self.jobs):
            real = [o for o in failed if o.error != 'cancelled'] or failed
            raise BackupFailed("backup job failed: " + '; '.join(
                f"{o.job_id}: {o.error}" for o in real))
        if watcher is not None:
            self._close(files=False)
            watcher.closed()
            watcher.written(self._written(batches) if batches else {})
        return {disk: outcomes[job].offset for disk, job in self.jobs.items()}

    def _add_watch_bitmap(self, batch):
        # One command per image, not a transaction: QEMU drains every node's I/O before a
        # transaction, which held the backup jobs for 0.04-0.36 s per batch. Each image's
        # bitmap speaks for that image alone, so they need no common point in time.
        for node in self.targets.values():
            self.qmp.execute('block-dirty-bitmap-add', {
                'node': node + FILE_SUFFIX, 'name': f"{self._watch}{batch}",
                'granularity': WATCH_GRANULARITY, 'persistent': False})

    def _written(self, batches):
        """{target path: {batch: dirty ranges}} of the closed targets' file nodes, read over an
        NBD export of each (a read-only export carries only disabled bitmaps); None when QEMU's
        NBD server is taken (another tool's)."""
        names = [f"{self._watch}{batch}" for batch in batches]
        try:
            self.qmp.start_nbd_server(self.socket_path)
        except QmpCommandFailed as exc:
            self.log(f"cannot read which parts of the images QEMU wrote last ({exc}): every "
                     "segment is hashed again")
            return None
        written = {}
        try:
            for job in self.disk_jobs:
                node = self.targets[job.disk.id] + FILE_SUFFIX
                self.qmp.transaction([('block-dirty-bitmap-disable', {'node': node, 'name': n})
                                      for n in names])
                self.qmp.execute('block-export-add', {
                    'type': 'nbd', 'id': self.export, 'node-name': node, 'name': self.export,
                    'writable': False, 'bitmaps': names})
                try:
                    extents = bitmap_dirty_extents(self.socket_path, self.export, names)
                finally:
                    delete_exports(self.qmp, [self.export])
                written[job.target_path] = {batch: extents[name]
                                            for batch, name in zip(batches, names)}
        finally:
            stop_nbd_server(self.qmp, self.socket_path)
        return written

    def close_targets(self):
        """After the copy: close the targets; BackupFailed if QEMU kept one open."""
        self._close(files=True)

    def _close(self, files):
        """Close the target nodes and make sure QEMU let go of them: their images are hashed
        next as final, and a node QEMU kept open could still flush its caches into them."""
        nodes = list(self.targets.values())
        close_targets(self.qmp, nodes, files=files)
        still = {n['node-name'] for n in self.qmp.execute('query-named-block-nodes',
                                                          {'flat': True})}
        kept = [n for n in nodes if n in still]
        if kept:
            raise BackupFailed(
                f"QEMU did not close the backup's target images ({', '.join(kept)}) after its "
                "jobs, so they could still change after being hashed: this backup is discarded. "
                "QEMU refused `blockdev-del` (its log says why); the next run tries again to "
                "remove the nodes.")

    def journal_entries(self):
        """What a kill from the start on would leave, for ``guest_runs.record(**entries)``."""
        return {
            'jobs': sorted(self.jobs.values()),
            'targets': sorted(self.targets.values()),
            'new_bitmaps': [[job.disk.node, job.new_bitmap] for job in self.disk_jobs
                            if job.new_bitmap],
            'exports': [self.export],
            'nbd_socket': self.socket_path,
        }

    def abort(self):
        """Undo the QEMU side after a failure: stop jobs, close targets, drop new bitmaps."""
        try:
            running = {j['device'] for j in self.qmp.execute('query-block-jobs')}
            cancel_jobs(self.qmp, [j for j in self.jobs.values() if j in running])
            close_targets(self.qmp, list(self.targets.values()))
            for node, name in self.new_bitmaps:
                self.qmp.remove_bitmap(node, name)
        except GuestvaultError as exc:  # QEMU gone: its bitmaps went with it
            self.log(f"cleanup in QEMU incomplete: {exc}")
