#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: restore
short_description: Restore a guest's backup as new standalone disk images, or a container
version_added: 0.1.0
description:
  - Writes new, standalone images (qcow2 or thin raw) of all or selected disks of one backup into
    a target directory, with the guest's captured configuration (C(guest.json)) beside them.
    Optionally registers them as a new guest in the node's registry.
  - A container's vzdump archive (C(vzdump-lxc-<vmid>-<time>.tar.zst), named by O(backup) or the
    latest) is restored as C(pct restore) does, into a new LXC container
    C(<lxcpath>/<lxc_name>) registered as guest O(new_vmid) of type C(lxc). The archive's own
    LXC config (kept by guestvault's backups) is recreated with only C(lxc.rootfs.path) changed
    to C(dir:<lxcpath>/<lxc_name>/rootfs); an archive made by Proxmox VE gets a config written
    from its C(pct.conf), with a warning for each network and mount point that could not be
    recreated (the container gets no network). An unprivileged container stays unprivileged
    (its id map kept, its files owned by the mapped ids). The rootfs appears under its name only
    when it is complete, then the config and the registry entry; a failure leaves neither, and
    an existing container untouched. A Proxmox VE VM archive (C(.vma)) is refused.
  - An incremental backup restores in one pass, reading through its chain. Every file the
    restore reads is checked against its backup's manifest (sha256); the new images appear
    under their final names only when the check and the copy both succeeded.
  - Backups are never altered by a restore.
  - The restored images and C(guest.json) are private (0600, a new target directory 0700)
    whatever the umask, since they hold a guest's whole disks.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage
  - guestvault.backup.backups
requirements:
  - qemu-img (Debian package qemu-utils) on the node
  - for a container's archive, GNU tar, zstd (or gzip, lzop) and lxc on the node
attributes:
  check_mode:
    description: Reports what would be written, where, and how big.
    support: full
  diff_mode:
    description: A container's archive - the new container's LXC config (before, if replaced, and after).
    support: partial
options:
  vmid:
    description: The guest whose backup to restore.
    type: int
    required: true
  backup:
    description:
      - Which backup, V(latest) or its time (C(2026-11-22T01:00:00Z)) or id
        (C(vm/101/2026-11-22T01:00:00Z)). Without O(backup) and O(until), the latest.
    type: str
  until:
    description:
      - Instead of O(backup), the newest backup at or before this time (ISO 8601 or epoch
        seconds).
    type: str
  target_dir:
    description:
      - Absolute directory for the new images (C(<disk>.qcow2) or C(<disk>.raw)); created if
        missing, and removed again (with the directories created for it) when the restore
        fails. It may not lie inside the storage or the configuration directory.
      - Required for a VM's backup; refused for a container's archive (see O(lxcpath)).
    type: path
  disks:
    description: Device ids of the disks to restore; default all of the backup's. An empty list is refused.
    type: list
    elements: str
  format:
    description: Format of the new images. V(raw) images are sparse (thin).
    type: str
    default: qcow2
    choices: [qcow2, raw]
  snapshots:
    description:
      - Write one qcow2 per disk that holds every backup of the chain up to the chosen one as an
        internal snapshot named by its time, the chosen one being the active state; switch with
        C(qemu-img snapshot -a TIME) while the guest is off.
    type: bool
    default: false
  live:
    description:
      - Live restore - start the guest at once on new qcow2 images that read the backup until
        their data is copied, and copy it in the background (QEMU's C(block-stream)) while the
        guest runs; the guest's own reads are served as they come. Returns as soon as the guest
        runs; M(guestvault.backup.guest_info) shows the copies' progress (C(live_restore)), and
        when they are done the images no longer depend on the backup.
      - The guest started is O(new_vmid) if given, else O(vmid). It must be registered
        (M(guestvault.backup.guest_registry)) with its C(qmp) socket and a C(start) command that
        starts QEMU with C(-S) on the images named by C($GUESTVAULT_DISK_<DISK>) (the disk's id
        in capitals, for example C($GUESTVAULT_DISK_VIRTIO0)); C($GUESTVAULT_RESTORE_DIR),
        C($GUESTVAULT_VMID) and C($GUESTVAULT_QMP_SOCKET) are set too. It must not be running.
      - If the guest cannot be started on its images, it is stopped again, the new images are
        removed and the error says so; the backup is never touched.
      - Needs O(format=qcow2). From a qcow2 chain the images read the backup's own qcow2
        images; from a datastore they read an NBD server over the snapshot (a process of its
        own, which checks every chunk it serves and ends when the copies are done). If a chunk
        turns out damaged during the copy, that server pauses the guest and writes
        C(live-restore-error.json) in O(target_dir), saying what state the disks are in. The
        backup's files are not checked against the manifest before the guest
        starts, since that would read them whole; M(guestvault.backup.verify) checks them.
      - O(bwlimit) limits the background copy.
    type: bool
    default: false
  bwlimit:
    description: Read-side bandwidth limit in KiB/s per disk; V(0) is unlimited. A negative value is refused.
    type: int
    default: 0
  force:
    description:
      - Overwrite existing target images, and an existing registry entry of O(new_vmid). An
        image that a running QEMU holds open is never overwritten.
      - For a container's archive, replace an existing container C(<lxcpath>/<lxc_name>) and
        the registry entry of O(new_vmid). The old container is stopped (cleanly, never
        killed) only once the new rootfs is complete, then its rootfs and config are replaced,
        and a warning says so. Without O(force) either one existing is an error and nothing
        changes.
    type: bool
    default: false
  new_vmid:
    description:
      - Register the restored images as this new guest (C(<config_dir>/guests.d/<new_vmid>.conf)).
      - Required for a container's archive, whose container is registered as this guest.
    type: int
  lxc_name:
    description:
      - A container's archive only - the new container's name; default O(new_vmid), as Proxmox
        VE names its containers.
    type: str
  lxcpath:
    description:
      - A container's archive only - the directory that holds the new container; default the
        backed-up guest's C(lxcpath) when O(vmid) is registered here, else C(/var/lib/lxc).
    type: path
  start:
    description:
      - A container's archive only - start the new container (C(lxc-start)) and wait until it
        runs. If it does not start, the restore itself is complete and the error says so.
    type: bool
    default: false
  new_qmp_socket:
    description: The QMP socket path to record for the new guest; default C(<target_dir>/qmp.sock).
    type: path
seealso:
  - module: guestvault.backup.backup_info
  - module: guestvault.backup.verify
"""

EXAMPLES = r"""
- name: Restore guest 101's latest backup next to the broken one
  guestvault.backup.restore:
    vmid: 101
    storage: backup-nfs
    target_dir: /var/lib/qemu/101-restored

- name: The state of last Friday night, as thin raw images of the system disk only
  guestvault.backup.restore:
    vmid: 101
    storage: backup-nfs
    until: "2026-11-20T23:59:59Z"
    disks: [virtio0]
    format: raw
    target_dir: /srv/restore/101

- name: Every point of the chain in one image per disk, as a new guest 9101
  guestvault.backup.restore:
    vmid: 101
    storage: backup-nfs
    snapshots: true
    new_vmid: 9101
    target_dir: /var/lib/qemu/9101

- name: Container 105's archive as a new container 305, started
  guestvault.backup.restore:
    vmid: 105
    storage: backup
    backup: vzdump-lxc-105-2026_11_22-01_00_00.tar.zst
    new_vmid: 305
    start: true

- name: 3 a.m. - run guest 101 from its newest backup now, copy its disks back meanwhile
  guestvault.backup.restore:
    vmid: 101
    storage: backup-nfs
    live: true
    target_dir: /var/lib/qemu/101-restored
"""

RETURN = r"""
backup:
  description: Id of the restored backup.
  returned: always
  type: str
  sample: vm/101/2026-11-22T01:00:00Z
time:
  description: The backup's point in time.
  returned: always
  type: str
level:
  description: The backup's level.
  returned: a VM's backup
  type: str
chain_length:
  description: How many backups the restore reads (1 for a full backup).
  returned: a VM's backup
  type: int
target_dir:
  description: Where the images are (or would be) written.
  returned: a VM's backup
  type: str
disks:
  description: The images written (or, in check mode, that would be).
  returned: a VM's backup
  type: list
  elements: dict
  contains:
    id:
      description: Device id.
      type: str
    target:
      description: Path of the new image.
      type: str
    format:
      description: Its format.
      type: str
    virtual_size:
      description: Disk size in bytes.
      type: int
    data_bytes:
      description: Guest data in the new image (in check mode, at most this much).
      type: int
    size:
      description: Size of the image file.
      type: int
      returned: success, not in check mode
verified:
  description: Whether every file read was checked against its manifest (always true on success).
  returned: success, not in check mode
  type: bool
snapshots:
  description: Whether the images hold the chain as internal snapshots.
  returned: a VM's backup
  type: bool
new_vmid:
  description: The new guest's id, if registered.
  returned: always
  type: int
registry_entry:
  description: The new guest's registry file.
  returned: when O(new_vmid) is set
  type: str
lxc_name:
  description: The new container's name.
  returned: a container's archive
  type: str
lxcpath:
  description: The directory that holds the new container.
  returned: a container's archive
  type: str
rootfs:
  description: The new container's root file system (a directory).
  returned: a container's archive
  type: str
config:
  description: The new container's LXC config file (its text is the C(diff) with C(--diff)).
  returned: a container's archive
  type: str
started:
  description: Whether the new container was started (O(start)).
  returned: a container's archive
  type: bool
unprivileged:
  description: Whether the new container runs with the archive's id map.
  returned: a container's archive
  type: bool
replaced:
  description: Whether an existing container or registry entry was (or would be) replaced (O(force)).
  returned: a container's archive
  type: bool
bytes:
  description: Bytes of the archive's tar stream extracted (0 in check mode).
  returned: a container's archive
  type: int
guest_config:
  description: Path of the captured guest configuration written beside the images.
  returned: success, not in check mode
  type: str
duration:
  description: Seconds the restore took.
  returned: success, not in check mode, not O(live)
  type: float
live:
  description: Whether the guest was started on images that read the backup (O(live)).
  returned: when O(live)
  type: bool
vmid_started:
  description: The guest a live restore started.
  returned: when O(live)
  type: int
status:
  description: The started guest's QEMU status (V(running)).
  returned: when O(live), not in check mode
  type: str
seconds_until_running:
  description: Seconds from the call until the guest ran.
  returned: when O(live), not in check mode
  type: float
server_pid:
  description:
    - The process id of the NBD server a live restore from a datastore reads the snapshot
      through (null for a qcow2 chain). It holds the snapshot until the copy is done (a prune
      waits for it); should it end before, the guest is paused and
      C(<target_dir>/live-restore-error.json) says why (M(guestvault.backup.guest_info) too).
  returned: when O(live), not in check mode
  type: int
jobs:
  description: The background copies, one QEMU block job per disk.
  returned: when O(live), not in check mode
  type: list
  elements: str
streams:
  description: The copies' progress when the call returned (as guest_info's C(live_restore)).
  returned: when O(live), not in check mode
  type: list
  elements: dict
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import restore_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.restore import RestoreRequest, run_restore


def main():
    run_module(restore_argument_spec(), run_restore, RestoreRequest)


if __name__ == '__main__':
    main()
