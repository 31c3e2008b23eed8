#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: guest_info
short_description: Show a guest's disks, dirty bitmaps and backup chains, or a container's trees and archives
version_added: 0.1.0
description:
  - Reads, over QMP, which disks a guest has, which of them can be backed up incrementally, and
    the dirty bitmaps on each (guestvault's and any other tool's), with how much data each counts
    as changed.
  - With O(storage) or O(dumpdir), also lists the guest's backup chains on that storage and
    whether each can be continued by an incremental backup (its bitmap is present and
    consistent), like qmpbackup's C(info --show bitmaps).
  - Of an LXC container (a registry entry whose C(type) is V(lxc)), shows instead its state, its root
    file system and what kind it is, the volumes backed up with it and the mounts left out,
    its archives on O(storage) or O(dumpdir), and what a killed backup of it left (a frozen
    container, a temporary copy, a snapshot), with a warning saying how to clear it.
  - Changes nothing.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.guest
  - guestvault.backup.storage
  - guestvault.backup.backups
requirements:
  - qemu.qmp (Python) on the node
attributes:
  check_mode:
    description: Read-only; runs the same in check mode.
    support: full
  diff_mode:
    description: Read-only.
    support: none
options:
  storage:
    description: A storage id from C(storage.cfg) (a directory storage or a V(datastore)) whose chains to show.
    type: str
  dumpdir:
    description: A backup directory whose chains to show, instead of O(storage).
    type: path
  chain_period:
    description:
      - The O(guestvault.backup.guest_backup#module:chain_period) the next backup would use, so that
        RV(chains[].can_continue) answers for it (V(monthly) ends a chain when a month begins).
    type: str
    choices: [none, monthly]
    default: none
"""

EXAMPLES = r"""
- name: Which disks and bitmaps does guest 101 have?
  guestvault.backup.guest_info:
    vmid: 101
  register: guest

- name: Disks that can be backed up incrementally
  ansible.builtin.debug:
    msg: "{{ guest.disks | selectattr('supports_bitmaps') | map(attribute='id') | list }}"

- name: Can each chain on the NFS storage be continued?
  guestvault.backup.guest_info:
    vmid: 101
    storage: backup-nfs
  register: info

- name: Chains that need a full backup next
  ansible.builtin.debug:
    msg: "{{ info.chains | community.general.json_query('[?!can_continue].chain') }}"

- name: A container (registered with type lxc) and its archives on the local storage
  guestvault.backup.guest_info:
    vmid: 120
    storage: local
  register: container

- name: Is it running, and would snapshot mode fall back to suspend?
  ansible.builtin.debug:
    msg: "{{ container.status }}, {{ container.container.snapshot_problem or 'snapshot mode works' }}"
"""

RETURN = r"""
vmid:
  description: The guest's id.
  returned: always
  type: int
  sample: 101
type:
  description: The guest's kind, its registry entry's C(type) (V(qemu) or V(lxc)).
  returned: always
  type: str
  sample: qemu
name:
  description: The guest's name (of a container without one in the registry, the container's).
  returned: always
  type: str
  sample: web01
status:
  description:
    - Of a VM, QEMU's run state (C(running), C(paused), C(prelaunch), ...).
    - Of a container, LXC's state (C(RUNNING), C(STOPPED), C(FROZEN), ...).
  returned: always
  type: str
  sample: running
qmp_socket:
  description: The QMP socket used.
  returned: of a VM
  type: str
container:
  description: The container, as a backup reads it.
  returned: of a container
  type: dict
  contains:
    name:
      description: The LXC container's name.
      type: str
      sample: web
    lxcpath:
      description: The directory holding it.
      type: str
      sample: /var/lib/lxc
    config:
      description: Its LXC config file.
      type: str
    unprivileged:
      description: Whether it has an id map (C(lxc.idmap)).
      type: bool
    rootfs:
      description: The host directory of its root file system (C(lxc.rootfs.path)).
      type: str
    rootfs_kind:
      description:
        - V(dir), V(btrfs subvolume) (snapshot mode can snapshot it), the storage backend of a
          root file system guestvault cannot read (V(zfs), V(lvm), ...), or null when the
          directory does not exist.
      type: str
    snapshot_problem:
      description: Why snapshot mode cannot snapshot the trees and falls back to suspend mode, as vzdump does; null when it can.
      type: str
    volumes:
      description: The volumes backed up with the root file system (registry C(mpN) with C(backup=1)).
      type: list
      elements: dict
      contains:
        key:
          description: The registry key (V(mp0) ...).
          type: str
        volume:
          description: The host directory.
          type: str
        path:
          description: Where the container sees it.
          type: str
    excluded_mounts:
      description:
        - What the container sees mounted that no backup holds - C(lxc.mount.entry) lines and
          C(mpN) volumes without C(backup=1) - each with C(path) (in the container),
          C(source) and C(by) (V(lxc.mount.entry) or the C(mpN) key).
      type: list
      elements: dict
backups:
  description: The container's archives on the storage, oldest first, as M(guestvault.backup.backup_info) returns them.
  returned: of a container, when O(storage) or O(dumpdir) is given
  type: list
  elements: dict
disks:
  description: The guest's disks with media.
  returned: of a VM
  type: list
  elements: dict
  contains:
    id:
      description: Device id.
      type: str
      sample: virtio0
    node:
      description: QEMU block node name.
      type: str
    format:
      description: Image format.
      type: str
      sample: qcow2
    virtual_size:
      description: Size in bytes.
      type: int
    filename:
      description: The image file.
      type: str
    supports_bitmaps:
      description: Whether the disk can be backed up incrementally (qcow2 v3).
      type: bool
    read_only:
      description: Whether the disk is read-only.
      type: bool
    in_job:
      description: Whether a block job (ours or another tool's) is copying the disk now.
      type: bool
    bitmaps:
      description: Dirty bitmaps on the disk.
      type: list
      elements: dict
      contains:
        name:
          description: Bitmap name.
          type: str
        guestvault:
          description: Whether the bitmap is one of guestvault's chain bitmaps.
          type: bool
        chain:
          description: The chain it belongs to (guestvault bitmaps).
          type: str
        since:
          description: Time stamp of the backup it counts changes since.
          type: str
        dirty_bytes:
          description: Bytes marked changed.
          type: int
        inconsistent:
          description: QEMU stopped without saving it; unusable.
          type: bool
        orphan:
          description:
            - Whether no stored backup and no live chain needs this guestvault bitmap. That is so
              when a killed run added it, when it is inconsistent, or (with O(storage)/O(dumpdir))
              when a newer backup of its chain on that storage has superseded it. The next backup of the guest removes
              it, or M(guestvault.backup.guest_bitmaps) with O(guestvault.backup.guest_bitmaps#module:orphans) now.
          type: bool
        orphan_reason:
          description: Why it is an orphan (null when it is not).
          type: str
        busy:
          description: In use by a running job.
          type: bool
        recording:
          description: Whether it records writes.
          type: bool
        persistent:
          description: Whether it is stored in the image.
          type: bool
        granularity:
          description: Bytes per bit.
          type: int
chains:
  description: The guest's chains on the storage, oldest first.
  returned: of a VM, when O(storage) or O(dumpdir) is given
  type: list
  elements: dict
  contains:
    chain:
      description: Chain id.
      type: str
    start:
      description: Time of the chain's full backup.
      type: str
    backups:
      description: Times of the chain's backups.
      type: list
      elements: str
    latest:
      description: The newest backup of the chain.
      type: str
    bitmap:
      description: Name of the bitmap that an incremental backup needs.
      type: str
    can_continue:
      description:
        - Whether the next O(guestvault.backup.guest_backup#module:level=auto) backup (with the
          registry's disk selection) would be incremental in this chain. The same rule as the
          backup's own level decision; RV(chains[].reason) says why not.
      type: bool
    reason:
      description: Why the chain cannot continue (null when it can).
      type: str
live_restore:
  description:
    - The background copies of a live restore (M(guestvault.backup.restore) with
      O(guestvault.backup.restore#module:live)) still running in this guest, one per disk.
      Empty when none runs; a disk whose copy is done no longer reads from the backup.
  returned: of a VM
  type: list
  elements: dict
  contains:
    disk:
      description: The disk's device id.
      type: str
    job:
      description: The QEMU block job (C(guestvault-live-<vmid>-<disk>)).
      type: str
    status:
      description: QEMU's status of the job (V(running), V(paused), ...).
      type: str
    io_status:
      description:
        - V(ok), or V(failed) (V(nospace)) when reading the backup (writing the image) failed. The
          copy is then paused where it was; resume it with QMP's C(block-job-resume) once the
          cause is fixed.
      type: str
    done_bytes:
      description: Bytes copied so far.
      type: int
    total_bytes:
      description: Bytes to copy in all (QEMU's estimate; it can grow while the guest writes).
      type: int
    percent:
      description: C(done_bytes) of C(total_bytes), in percent.
      type: float
    speed:
      description: The copy's speed limit in bytes per second, 0 for none.
      type: int
live_restore_server:
  description:
    - The NBD server of this guest's live restore from a datastore, while its copy is not
      done or after something stopped it (null otherwise). While it runs it holds the
      snapshot; a prune of it waits, a garbage collection keeps its chunks.
    - When the server ended before every disk was copied (killed, crashed), the guest was
      paused, C(error) says how much was copied and what to do, and a warning says so.
  returned: of a VM
  type: dict
  contains:
    backup:
      description: The snapshot served (C(vm/<vmid>/<time>)).
      type: str
    storage:
      description: The datastore's storage id.
      type: str
    target_dir:
      description: Where the restored images are (and C(live-restore-error.json)).
      type: str
    socket:
      description: The unix socket the images read the snapshot through.
      type: str
    server_pid:
      description: The server's process id.
      type: int
    running:
      description: Whether the server still runs.
      type: bool
    since:
      description: When the server started (ISO 8601, UTC).
      type: str
    error:
      description:
        - What stopped the live restore (C(live-restore-error.json)), or null. C(error) says
          what happened, C(copied) how far each disk got (C(disk), C(done_bytes),
          C(total_bytes), C(percent)) when the server ended early, C(disks) the state of the
          images, C(what_to_do) the way on.
      type: dict
leftovers:
  description:
    - What killed runs of guestvault left for this guest; all empty after a clean run. Every
      backup of the guest clears them first; M(guestvault.backup.guest_bitmaps) with
      O(guestvault.backup.guest_bitmaps#module:cleanup) clears them now.
    - Of a container, the keys C(interrupted_run), C(frozen), C(stopped), C(temp_dir),
      C(snapshots) and C(partial_backups) (the others are a VM's), and a warning when there is
      any; C(guestvault-dump --cleanup <vmid>) on the node clears them, as the job service's
      C(ExecStopPost) does after a killed job.
  returned: always
  type: dict
  contains:
    frozen:
      description: A container a killed suspend or snapshot backup left frozen.
      type: bool
    stopped:
      description: A container a killed stop-mode backup stopped and did not start again.
      type: bool
    temp_dir:
      description: The temporary copy a killed suspend-mode backup of a container left (null when none).
      type: str
    snapshots:
      description: The btrfs snapshots a killed snapshot-mode backup of a container left.
      type: list
      elements: str
    partial_backups:
      description: The archives killed backups of a container were writing (C(.dat)) on O(storage)/O(dumpdir).
      type: list
      elements: str
    jobs:
      description: guestvault block jobs still known to QEMU (still copying into a hidden directory).
      type: list
      elements: str
    targets:
      description: guestvault target nodes still open in QEMU.
      type: list
      elements: str
    interrupted_run:
      description:
        - The run that was killed, as it recorded itself (pid, since, backup_dir, storage_path;
          of a container's capture, container, lxcpath, mode and pid); null when none was.
      type: dict
    hidden_dirs:
      description: Staging directories of killed runs (the recorded one, and any on O(storage)/O(dumpdir)).
      type: list
      elements: str
    orphan_bitmaps:
      description: The orphan bitmaps (disk, name, reason); see RV(disks[].bitmaps[].orphan).
      type: list
      elements: dict
    exports:
      description: NBD exports of guestvault pull captures (datastore backups) still known to QEMU.
      type: list
      elements: str
    nbd_server:
      description: The unix socket of the NBD server a killed pull capture started (null when none was recorded).
      type: str
    frozen_bitmaps:
      description: Frozen copies of bitmaps (disk, name) a killed pull capture left on the disks.
      type: list
      elements: dict
    fleecing:
      description: >-
        Fleecing images (or their capture directories under C(GUESTVAULT_FLEECING_DIR), default
        C(/var/lib/guestvault/fleecing)) of killed pull captures.
      type: list
      elements: str
storage_path:
  description: The storage's directory.
  returned: when O(storage) or O(dumpdir) is given
  type: str
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import guest_info_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.guest_info import GuestInfoRequest, run_guest_info


def main():
    run_module(guest_info_argument_spec(), run_guest_info, GuestInfoRequest, needs_qmp=True)


if __name__ == '__main__':
    main()
