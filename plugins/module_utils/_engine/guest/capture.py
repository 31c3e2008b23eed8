"""The QEMU side of a backup: target nodes, the transaction that fixes the point in time, the
block jobs, and the clean-up of what a killed run left behind.

Push capture (the qcow2 chain): QEMU's ``blockdev-backup`` copies each disk into a target image
the format created. One QMP ``transaction`` adds the chain's next persistent bitmap and starts
every disk's job, so all disks share one point in time and the bitmap hand-off is atomic with
it. Callers give names and levels; this module knows nothing of chains or files' meaning.
"""
from __future__ import annotations

import uuid

from ..errors import BackupFailed, GuestvaultError, QmpCommandFailed
from ..format.capture import BLOCK

JOB_PREFIX = 'guestvault-'
TARGET_PREFIX = 'gvt-'


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
    return [n['node-name'] for n in qmp.execute('query-named-block-nodes', {'flat': True})
            if n['node-name'].startswith(prefix)]


def cancel_jobs(qmp, jobs):
    for job in jobs:
        qmp.cancel_job(job)
    if jobs:
        qmp.wait_for_jobs(jobs, timeout=60)


def close_targets(qmp, nodes):
    for node in nodes:
        try:
            qmp.execute('blockdev-del', {'node-name': node})
        except QmpCommandFailed:
            pass  # never added, or already closed


class PushCapture:
    """Target nodes, the transaction and the jobs of one backup of one guest (a BlockCapture)."""

    kind = BLOCK

    def __init__(self, qmp, vmid, jobs, log):
        self.qmp = qmp
        self.log = log
        self.disk_jobs = list(jobs)
        run = uuid.uuid4().hex[:6]
        self.targets = {}      # disk id -> target node name
        self.jobs = {}         # disk id -> block job id
        self.new_bitmaps = []  # (node, name) added by the transaction
        for index, job in enumerate(self.disk_jobs):
            self.targets[job.disk.id] = f"{TARGET_PREFIX}{vmid}-{run}-{index}"
            self.jobs[job.disk.id] = f"{JOB_PREFIX}{vmid}-{run}-{job.disk.id}"

    def open_targets(self):
        """Open the target images in QEMU (again, after QEMU was restarted by stop mode)."""
        for job in self.disk_jobs:
            self.qmp.execute('blockdev-add', {
                'driver': 'qcow2', 'node-name': self.targets[job.disk.id],
                'file': {'driver': 'file', 'filename': job.target_path}})

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

    def run_jobs(self, progress=None):
        """Wait for every job; {disk id: bytes it went through}. BackupFailed on any failure."""
        outcomes = self.qmp.wait_for_jobs(list(self.jobs.values()), progress=progress)
        failed = [o for o in outcomes.values() if not o.ok]
        if failed or len(outcomes) < len(self.jobs):
            real = [o for o in failed if o.error != 'cancelled'] or failed
            raise BackupFailed("backup job failed: " + '; '.join(
                f"{o.job_id}: {o.error}" for o in real))
        return {disk: outcomes[job].offset for disk, job in self.jobs.items()}

    def close_targets(self):
        close_targets(self.qmp, self.targets.values())

    def journal_entries(self):
        """What a kill from the start on would leave, for ``guest_runs.record(**entries)``."""
        return {
            'jobs': sorted(self.jobs.values()),
            'targets': sorted(self.targets.values()),
            'new_bitmaps': [[job.disk.node, job.new_bitmap] for job in self.disk_jobs
                            if job.new_bitmap],
        }

    def abort(self):
        """Undo the QEMU side after a failure: stop jobs, close targets, drop new bitmaps."""
        try:
            running = {j['device'] for j in self.qmp.execute('query-block-jobs')}
            cancel_jobs(self.qmp, [j for j in self.jobs.values() if j in running])
            self.close_targets()
            for node, name in self.new_bitmaps:
                self.qmp.remove_bitmap(node, name)
        except GuestvaultError as exc:  # QEMU gone: its bitmaps went with it
            self.log(f"cleanup in QEMU incomplete: {exc}")
