"""Live-restore on the guest side: start the guest on new images and copy their backing in.

Each restored disk is a new qcow2 whose backing is the backup, so the guest runs at once: a
read of what is not copied yet goes to the backup, a write stays in the new image. QEMU's
``block-stream`` then copies everything the new image does not hold yet, in the background;
the guest's own reads are served as they come, beside the copy. When a stream completes QEMU
drops the backing from the image's header: it stands alone.

Jobs are named ``guestvault-live-<vmid>-<disk>``, so progress is found by prefix (guest_info)
and never mistaken for a backup's jobs. A read error pauses a job (``on-error: stop``) with its
``io-status`` set, so it can be resumed; a finished job dismisses itself.
"""
from __future__ import annotations

import os
import subprocess
import time

from ..errors import GuestvaultError
from .disks import discover_disks
from .qmp import QmpSession, wait_for_socket

RUNNING = 'running'
# A block job in one of these states still has to copy (a done one concludes and is dismissed).
UNFINISHED = ('created', 'running', 'paused', 'standby', 'ready')
START_TIMEOUT = 300


def job_prefix(vmid):
    return f"guestvault-live-{int(vmid)}-"


def env_name(disk_id):
    """The start command's variable naming a disk's image: ``GUESTVAULT_DISK_VIRTIO0``."""
    return 'GUESTVAULT_DISK_' + ''.join(c if c.isalnum() else '_' for c in disk_id.upper())


class LiveRestoreError(GuestvaultError):
    """The guest could not be started on its restored images; the message says what state the
    guest and its images were left in."""


def start_guest(start_command, qmp_socket, env, timeout=START_TIMEOUT):
    """Run the start command (a shell line) with ``env`` added, and connect to the guest it
    starts: an open QmpSession."""
    proc = subprocess.run(start_command, shell=True, capture_output=True, text=True,
                          check=False, env=dict(os.environ, **env), timeout=timeout)
    if proc.returncode != 0:
        raise LiveRestoreError(f"the start command failed ({proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    wait_for_socket(qmp_socket, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            return QmpSession(qmp_socket).connect()
        except GuestvaultError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def check_images(qmp, images):
    """The guest's disks, checked to run on the restored images ``{disk id: path}``."""
    disks = {d.id: d for d in discover_disks(qmp)}
    for disk_id, path in images.items():
        disk = disks.get(disk_id)
        if disk is None:
            raise LiveRestoreError(
                f"the started guest has no disk {disk_id} (it has "
                f"{', '.join(sorted(disks)) or 'none'}); the start command must attach "
                f"${env_name(disk_id)} as device {disk_id}")
        if os.path.realpath(disk.filename) != os.path.realpath(path):
            raise LiveRestoreError(
                f"the started guest's disk {disk_id} is {disk.filename}, not the restored image "
                f"{path}; the start command must use ${env_name(disk_id)}")
    return disks


def start_streams(qmp, vmid, disks, disk_ids, speed=0):
    """One ``block-stream`` per disk (all of its backing into its image); the job ids."""
    jobs = []
    for disk_id in disk_ids:
        job_id = job_prefix(vmid) + disk_id
        # A read error pauses the copy instead of ending it: what was copied stays, guest_info
        # shows the job paused with its io_status, and block-job-resume retries once the
        # backup can be read again.
        arguments = {'job-id': job_id, 'device': disks[disk_id].node, 'on-error': 'stop',
                     'auto-dismiss': True}
        if speed:
            arguments['speed'] = int(speed)
        qmp.execute('block-stream', arguments)
        jobs.append(job_id)
    return jobs


def resume(qmp):
    if qmp.status() != RUNNING:
        qmp.execute('cont')
    return qmp.status()


def stop_guest(qmp):
    """Quit the guest (a failed live-restore leaves it stopped)."""
    try:
        qmp.execute('quit')
    except GuestvaultError:
        pass
    qmp.close()


def pause_guest(qmp_socket, attempts=50):
    """Pause the guest (its vCPUs), connecting for just that: the socket may be in use a
    moment by another client."""
    _on_guest(qmp_socket, lambda qmp: qmp.execute('stop'), attempts)


def pause_unfinished(qmp_socket, vmid, attempts=50):
    """Pause the guest if a live-restore copy of it is not done (its server is gone): that
    copy's progress, as ``stream_progress``; [] when every copy is done."""
    def check(qmp):
        copying = [c for c in stream_progress(qmp, vmid) if c['status'] in UNFINISHED]
        if copying:
            qmp.execute('stop')
        return copying
    return _on_guest(qmp_socket, check, attempts)


def _on_guest(qmp_socket, action, attempts):
    """``action(qmp)`` on a connection made for just that, tried ``attempts`` times: the
    socket may be in use a moment by another client."""
    for attempt in range(attempts):
        try:
            with QmpSession(qmp_socket, timeout=5.0) as qmp:
                return action(qmp)
        except GuestvaultError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2)
    return None


def stream_progress(qmp, vmid):
    """``[{disk, job, status, done_bytes, total_bytes, percent, speed}]`` of the guest's
    live-restore copies still running."""
    prefix = job_prefix(vmid)
    found = []
    for job in qmp.execute('query-block-jobs'):
        if not job.get('device', '').startswith(prefix):
            continue
        total, done = job.get('len') or 0, job.get('offset') or 0
        status = job.get('status') or ('paused' if job.get('paused') else 'running')
        found.append({'disk': job['device'][len(prefix):], 'job': job['device'],
                      'status': status, 'io_status': job.get('io-status', 'ok'),
                      'done_bytes': done, 'total_bytes': total,
                      'percent': round(100.0 * done / total, 1) if total else 0.0,
                      'speed': job.get('speed', 0)})
    return found
