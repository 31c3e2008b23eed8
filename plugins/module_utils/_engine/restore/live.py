"""restore with ``live``: the guest runs in seconds, its disks copied back while it runs.

1. A new qcow2 per restored disk in ``target_dir``, whose backing is the backup's block export
   (``Format.open_block_exports``: for a qcow2 chain, the backup's own image, read through its
   chain; for a datastore, an export of the NBD server over the snapshot, which runs in a
   process of its own that outlives the call: restore/live_server.LiveServer).
2. The target guest is started with its registry's ``start:`` command, which finds each image
   in ``$GUESTVAULT_DISK_<DISK>`` (and ``$GUESTVAULT_RESTORE_DIR``, ``$GUESTVAULT_VMID``,
   ``$GUESTVAULT_QMP_SOCKET``): guestvault does not own the guest's QEMU command line, the start
   command does, as for stop mode. It should start QEMU with ``-S``.
3. The guest's disks are checked to be those images, a ``block-stream`` per disk starts, and the
   guest runs (``cont``). The call returns then; the copies go on inside QEMU, and guest_info
   shows their progress. When they are done the images stand alone.

If anything fails before the guest runs, the guest is stopped again, the NBD server ended and
the new images removed: the error says so. The target guest must be stopped (its QMP socket not answering) and
registered with a start command; a restore into the original guest's own images is refused
(``target_dir`` would have to hold them), so an admin chooses where the new images go.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import replace

from ..errors import ConfigError, GuestNotFound, GuestUnreachable, GuestvaultError
from ..format import qemu_img
from ..guest import live
from ..guest.kind import require_vm
from ..guest.qmp import QmpSession
from ..guest.registry import load_guest
from ..paths import run_dir
from ..storage.files import new_directory, private_files, write_file_atomic
from .live_server import ERROR_FILE, LiveServer

LIVE_FORMAT = 'qcow2'


def target_guest(request):
    """The registry entry of the guest a live restore starts: ``new_vmid``, else ``vmid``."""
    vmid = request.new_vmid if request.new_vmid is not None else request.vmid
    try:
        entry = load_guest(request.config_dir, vmid)
    except GuestNotFound:
        raise ConfigError(
            f"live restore starts guest {vmid}, which is not registered; register it first "
            f"(guestvault.backup.guest_registry) with its qmp socket and a start command that "
            "starts QEMU with -S on the images named by $GUESTVAULT_DISK_<DISK>") from None
    require_vm(entry, "live restore starts a VM on images that read the backup's disks",
               "restore it without live: a container's archive is restored whole, into a "
               "new container")
    if not entry.start_command:
        raise ConfigError(f"guest {vmid} has no start command (start:) in its registry entry; "
                          "live restore needs one that starts QEMU with -S on the images named "
                          "by $GUESTVAULT_DISK_<DISK>")
    if not entry.qmp_socket:
        raise ConfigError(f"guest {vmid} has no qmp socket in its registry entry")
    if _answers(entry.qmp_socket):
        raise ConfigError(f"guest {vmid} is running ({entry.qmp_socket} answers); live restore "
                          "starts it on the restored images: stop it first, or restore to a "
                          "new_vmid")
    return entry


def _server(request, plan, entry, server_entry):
    """The server that serves the backup's exports, if its format needs one: a process of its
    own (restore/live_server), started by ``open_block_exports``."""
    socket_path = os.path.join(run_dir(), f"live-{entry.vmid}-{uuid.uuid4().hex[:8]}.sock")
    return LiveServer(server_entry, request.config_dir, plan.storage.id, plan.record,
                      [d.id for d in plan.disks], socket_path, entry.qmp_socket,
                      plan.target_dir,
                      os.path.join(plan.target_dir, 'live-restore-server.log'),
                      entry.vmid, float(request.lockwait) * 60)


def _stop_guest(entry, qmp):
    """Quit the guest a failed live restore started (``qmp``: its session, if reached)."""
    if qmp is None and _answers(entry.qmp_socket):
        # started, but not reached in time
        qmp = QmpSession(entry.qmp_socket).connect()
    if qmp is not None:
        live.stop_guest(qmp)


def _answers(socket_path):
    if not os.path.exists(socket_path):
        return False
    try:
        with QmpSession(socket_path, timeout=10.0):
            return True
    except GuestUnreachable:
        return False


def run_live_restore(request, make_plan, server_entry, log=None):
    """restore with ``live``, inside run_restore's opener (the guest's backups locked shared).
    ``make_plan(request)``: the restore's plan (run/restore_plan); ``server_entry``: the module
    whose ``main(args)`` a live-restore server's process runs (run/live_server)."""
    log = log or (lambda message: None)
    if request.format != LIVE_FORMAT:
        raise ConfigError(f"live restore writes qcow2 images (each reads the backup until it is "
                          f"copied); format {request.format} cannot: leave format at qcow2")
    if request.snapshots:
        raise ConfigError("live and snapshots cannot be combined; restore the snapshots "
                          "without live")
    entry = target_guest(request)
    started = time.monotonic()
    with private_files():
        # the target guest is registered (it has the start command): not a new registration
        plan = make_plan(replace(request, new_vmid=None))
        record, storage, fmt = plan.record, plan.storage, plan.format
        result = {
            'changed': True, 'live': True, 'backup': record.id, 'time': record.manifest.time,
            'level': record.manifest.level, 'target_dir': plan.target_dir,
            'new_vmid': request.new_vmid, 'vmid_started': entry.vmid, 'snapshots': False,
            'disks': [d.as_result('id', 'target', 'format', 'virtual_size')
                      for d in plan.disks],
            'warnings': plan.warnings,
        }
        if request.check_mode:
            return result
        images = {d.id: d.target for d in plan.disks}
        server = _server(request, plan, entry, server_entry)
        qmp = None
        with new_directory(plan.target_dir):
            try:
                error_file = os.path.join(plan.target_dir, ERROR_FILE)
                if os.path.exists(error_file):
                    os.unlink(error_file)             # an earlier live restore's, into it
                # A server the format starts outlives this call; an error in here stops it,
                # after the guest that reads it has been stopped.
                with fmt.open_block_exports(storage, record, list(images), server) as exports:
                    try:
                        for disk in result['disks']:
                            disk['backing'] = exports[disk['id']].uri
                        for disk in plan.disks:
                            if os.path.exists(disk.target):
                                os.unlink(disk.target)      # plan_restore allowed it (force)
                            export = exports[disk.id]
                            qemu_img.create_qcow2(disk.target, disk.virtual_size,
                                                  backing=export.uri,
                                                  backing_format=export.format)
                        env = {'GUESTVAULT_RESTORE_DIR': plan.target_dir,
                               'GUESTVAULT_VMID': str(entry.vmid),
                               'GUESTVAULT_QMP_SOCKET': entry.qmp_socket,
                               **{live.env_name(disk_id): path
                                  for disk_id, path in images.items()}}
                        log(f"starting guest {entry.vmid} on {len(images)} new image(s) "
                            f"reading {record.id}: {entry.start_command}")
                        qmp = live.start_guest(entry.start_command, entry.qmp_socket, env)
                        disks = live.check_images(qmp, images)
                        jobs = live.start_streams(qmp, entry.vmid, disks, list(images),
                                                  speed=int(request.bwlimit or 0) * 1024)
                        status = live.resume(qmp)
                    except BaseException:
                        _stop_guest(entry, qmp)
                        raise
            except BaseException as exc:
                for path in images.values():
                    if os.path.exists(path):
                        os.unlink(path)
                if not isinstance(exc, GuestvaultError):
                    raise
                raise live.LiveRestoreError(
                    f"live restore of {record.id} failed before guest {entry.vmid} ran ({exc}); "
                    "the guest was stopped and the new images removed, the backup is "
                    "untouched") from exc
        progress = live.stream_progress(qmp, entry.vmid)
        qmp.close()
    result.update(status=status, jobs=jobs, streams=progress,
                  server_pid=server.pid,
                  seconds_until_running=round(time.monotonic() - started, 3))
    guest = storage.read_guest_config(record)
    guest.update(restored_from=record.id, images=images, live=True)
    write_file_atomic(os.path.join(plan.target_dir, 'guest.json'),
                      json.dumps(guest, indent=2, sort_keys=True) + '\n')
    result['guest_config'] = os.path.join(plan.target_dir, 'guest.json')
    log(f"guest {entry.vmid} runs on its restored images after "
        f"{result['seconds_until_running']:.2f} s; copying {record.id} in the background")
    return result
