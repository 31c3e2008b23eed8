#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: guest_backup
short_description: Back up a QEMU VM (full or incremental, over QMP) or an LXC container
version_added: 0.1.0
description:
  - Takes a consistent, live backup of all (or selected) disks of one QEMU guest at one point in
    time, into a directory storage laid out like a Proxmox Backup Server datastore
    (C(vm/<vmid>/<time>/)).
  - Full and incremental backups are tied together by persistent dirty bitmaps in the guest's
    qcow2 images, so an incremental backup copies only what changed and survives a QEMU restart.
  - A backup becomes visible only when it is complete; a failed or interrupted run leaves the
    chain's bitmap as it was, so the next backup loses no write.
  - Before it starts, a backup clears what killed runs of the guest left (a block job still
    copying, its target node, its hidden directory, and bitmaps no stored backup needs) and says
    so in its log.
  - Backups are private whatever the umask (directories 0700, files 0600), since they hold whole
    disks.
  - Consistency modes, naming, notes templates, protection and hook scripts follow Proxmox
    vzdump. Defaults come from C(vzdump.conf) in O(config_dir), overridden by the options given.
  - A container (a registry entry of type C(lxc)) is backed up as vzdump does it, into a
    directory storage (its C(dump/) directory) or O(dumpdir), as
    C(vzdump-lxc-<vmid>-<YYYY_MM_DD-HH_MM_SS>.tar[.zst|.gz|.lzo]), named in local time, which
    Proxmox VE's C(pct restore) reads. Its rootfs and the volumes with C(backup=1) are archived
    with GNU tar and PVE's flags (C(--one-file-system --sparse --numeric-owner --acls --xattrs));
    bind mounts never are. C(./etc/vzdump/pct.conf) is the first member; the LXC config is kept as
    C(./etc/vzdump/lxc.conf). An unprivileged container's archive holds the container's own ids.
    The archive is written as C(.dat) and renamed when complete; notes, protection and the log
    are the files PVE writes beside it. A container's backup is always full, and a datastore
    does not take one yet.
author:
  - guestvault developers (@guestvault)
requirements:
  - qemu.qmp (Python) on the node
  - qemu-img (Debian package qemu-utils) on the node
extends_documentation_fragment:
  - guestvault.backup.guest
  - guestvault.backup.storage
attributes:
  check_mode:
    description: Reports the level the backup would take and why, and the disks, changing nothing.
    support: full
  diff_mode:
    description: Not applicable; a backup always adds a new backup.
    support: none
options:
  storage:
    description:
      - Id of a storage in C(<config_dir>/storage.cfg) - a directory storage (V(dir), V(nfs),
        V(cifs)), which holds qcow2 chains, or a V(datastore), which holds Proxmox Backup
        Server's deduplicating chunk store (encrypted with its C(encryption-key), see
        M(guestvault.backup.encryption_key)).
    type: str
  dumpdir:
    description:
      - A directory to store backups in, instead of a configured O(storage).
      - Without O(storage) and O(dumpdir), the C(storage) or C(dumpdir) of C(vzdump.conf) is used.
    type: path
  level:
    description:
      - V(full) starts a new chain; V(inc) copies only what changed since the chain's newest
        backup on this storage and fails if that is impossible; V(auto) is V(inc) when the chain
        is valid and otherwise V(full), returning why in RV(level_reason); V(copy) is a full backup
        that neither starts nor touches a chain.
      - On a datastore whose C(encryption-key) differs from the one the chain's newest backup
        was made with (another key, a key added or removed), V(inc) and V(auto) take a V(full)
        backup that starts a new chain, with a warning, as Proxmox Backup Server's client does.
    type: str
    default: auto
    choices: [full, inc, auto, copy]
  chain:
    description:
      - Name of the chain to start or continue (letters, digits, C(-), C(_); starts with a letter).
        Several named chains of one guest coexist, each with its own bitmap.
      - Without a name, a full backup starts a new chain named after its time (and retires the
        previous unnamed chain's bitmap), and V(inc)/V(auto) continue the guest's newest chain.
    type: str
  chain_period:
    description:
      - With O(level=auto), V(monthly) starts a new full chain when the month (in UTC) changes.
    type: str
    default: none
    choices: [none, monthly]
  include:
    description: Device ids of the disks to back up (default all), e.g. C(virtio0).
    type: list
    elements: str
  exclude:
    description: Device ids of disks not to back up.
    type: list
    elements: str
  include_raw:
    description:
      - Also back up raw-format disks. They cannot hold a dirty bitmap, so they are copied whole
        in every backup. Naming a raw disk in O(include) without this is an error.
      - The UEFI variable store (C(pflash1)) is included unless excluded; the firmware code
        (C(pflash0)) is read-only and never backed up.
    type: bool
    default: false
  mode:
    description:
      - V(snapshot) keeps the guest running; with a guest agent, its filesystems are frozen for the
        instant of the point in time (thaw guaranteed). Without one the backup is crash-consistent
        and a warning says so.
      - "For a container: V(snapshot) freezes it, takes a read-only btrfs snapshot of its rootfs
        and thaws it; where the rootfs is not a btrfs subvolume it falls back to V(suspend), as
        vzdump does, with C(mode failure) in the log and RV(warnings). V(suspend) copies the
        running container with rsync into O(tmpdir), freezes it, copies what changed and thaws
        it (RV(frozen_seconds)). V(stop) stops it with C(lxc-stop) within O(stopwait), archives
        it and starts it again (RV(downtime_seconds)). A container that is not running is backed
        up as it is, without being started. The container is thawed or started again also when
        the backup fails."
      - V(suspend) pauses the guest's vCPUs around the point in time.
      - V(stop) shuts the guest down (guest agent, else ACPI) within O(stopwait), fixes the point
        in time while it is off and starts it again at once. A guest whose QEMU stays after
        shutdown (C(-no-shutdown)) is restarted with C(system_reset), so its QEMU must not run
        with C(-no-reboot); one whose QEMU exits is started with the registry's C(start) command.
      - Default from C(vzdump.conf), else V(snapshot).
    type: str
    choices: [snapshot, suspend, stop]
  stopwait:
    description: Minutes to wait for the guest to shut down in O(mode=stop). Default 10.
    type: float
  lockwait:
    description:
      - Minutes to wait while another run holds the guest (a scheduled job, an ad-hoc backup, a
        prune of its backups). Default 180. The run waits before it connects to QEMU (which serves
        one QMP client at a time), and its log says whom it waits for.
    type: float
  freeze_timeout:
    description:
      - Seconds the guest agent may take to freeze the filesystems. Default 60.
      - After a freeze that timed out the backup goes on crash-consistent (with a warning) and a
        thaw is retried for up to 60 s, so a freeze that completes late is undone.
    type: float
  bwlimit:
    description: Bandwidth limit for the whole guest in KiB/s; V(0) is unlimited.
    type: int
  performance:
    description: Tuning of the copy, as vzdump's C(performance).
    type: dict
    suboptions:
      max_workers:
        description: Parallel requests per disk (QEMU's backup C(x-perf.max-workers)).
        type: int
  compress:
    description:
      - Compress the backup's images (qcow2 compressed clusters), with vzdump's values. V(zstd) (or
        V(1)) is fast; V(gzip) (zlib clusters) is much slower. V(0) stores uncompressed.
      - V(lzo) is vzdump syntax with no qcow2 equivalent; it is refused with the advice to use V(zstd).
      - "For a container, the archive's compression, as vzdump: V(zstd) (threads from O(zstd)),
        V(gzip) (C(pigz) when O(pigz) > 0), V(lzo) or V(1) (C(lzop)), V(0) (a plain C(.tar))."
    type: str
    choices: ['0', '1', gzip, lzo, zstd]
  notes_template:
    description:
      - Notes stored with the backup. C({{cluster}}), C({{guestname}}), C({{node}}) and
        C({{vmid}}) are replaced, C(\n) starts a new line and C(\\) is a backslash; an unknown
        variable is an error.
      - Ansible would expand C({{...}}) itself, so mark the value C(!unsafe) (see examples).
    type: str
  protected:
    description: Protect the new backup from removal (prune and removal refuse it).
    type: bool
  script:
    description:
      - A vzdump hook script, called as C(SCRIPT PHASE MODE VMID) in the phases C(backup-start),
        C(pre-stop), C(pre-restart), C(post-restart), C(backup-end), C(backup-abort) and
        C(log-end), with C(STOREID), C(DUMPDIR), C(VMTYPE), C(HOSTNAME), C(TARGET) and C(LOGFILE) in
        its environment. A non-zero exit aborts the backup and nothing is kept.
    type: path
  cluster:
    description: Value of C({{cluster}}) in O(notes_template).
    type: str
    default: ''
  node:
    description: The node's name for notes and hooks; default the host name.
    type: str
  exclude_path:
    description:
      - "Containers: files to leave out of the archive, vzdump's C(exclude-path): a pattern that
        starts with C(/) is anchored at the container's root (C(/var/cache/*)), any other matches
        in every directory (C(*.tmp)). A pattern that would leave nothing is refused; a trailing
        slash warns, as vzdump warns. Default from C(vzdump.conf)."
      - Has no effect on a VM's backup (a warning says so).
    type: list
    elements: str
  stdexcludes:
    description:
      - "Containers: also leave out C(/tmp/?*), C(/var/tmp/?*) and C(/var/run/?*.pid), as
        vzdump's C(stdexcludes). Default from C(vzdump.conf), else V(true)."
    type: bool
  tmpdir:
    description:
      - "Containers in V(suspend) mode (and V(snapshot) mode where it falls back): the directory
        the running container is copied into. Default from C(vzdump.conf), else as vzdump picks
        it: beside the archive when the storage's file system keeps every attribute, else
        C(/var/tmp)."
    type: path
  zstd:
    description:
      - "Containers: zstd threads for O(compress=zstd); V(0) is half of the node's cores, as
        vzdump. Default from C(vzdump.conf), else V(1)."
    type: int
  pigz:
    description:
      - "Containers: with O(compress=gzip), compress with C(pigz) on this many threads when it
        is larger than V(0). Default from C(vzdump.conf), else V(0) (C(gzip))."
    type: int
  max_age:
    description:
      - Take no backup when the guest's newest backup on the storage (of O(chain), if given) is
        younger than this; the task then reports V(changed=false) and RV(skipped_reason). Makes
        a playbook that takes backups idempotent.
      - Seconds, or a number with C(s), C(m), C(h), C(d) or C(w), e.g. C(12h).
    type: str
  notification_mode:
    description:
      - Where the call's one C(type=vzdump) notification goes, as vzdump decides -
        V(legacy-sendmail) (a mail to O(mailto)), V(notification-system) (the targets that the
        matchers of C(<config_dir>/notifications.cfg) choose; Proxmox VE's built-in
        C(default-matcher) mails root), or V(auto) (legacy mail when O(mailto) is given, else the
        notification system).
      - Default from C(vzdump.conf), else V(auto).
      - The event's severity is V(error) when the backup failed, else V(info); its fields are
        C(type) (V(vzdump)) and C(hostname). A notification that cannot be delivered is a
        warning, never a failure of the task; check mode and a task refused for bad input
        notify nobody.
    type: str
    choices: [auto, legacy-sendmail, notification-system]
  mailto:
    description:
      - Addresses of vzdump's legacy mail (see O(notification_mode)). Default from
        C(vzdump.conf).
    type: list
    elements: str
  mailnotification:
    description:
      - With legacy mail, V(always) mail, or only on V(failure). Default from C(vzdump.conf),
        else V(always).
    type: str
    choices: [always, failure]
notes:
  - Only disks in qcow2 v3 images can be backed up incrementally. Persistent bitmaps are written
    to the image when QEMU closes it; after a QEMU crash they are inconsistent and V(auto) takes a
    full backup.
  - One backup per guest runs at a time, on the node and per storage.
seealso:
  - module: guestvault.backup.guest_info
  - module: guestvault.backup.guest_bitmaps
"""

EXAMPLES = r"""
- name: Back up container 777 (registry type lxc) as vzdump does, leaving caches out
  guestvault.backup.guest_backup:
    vmid: 777
    storage: local
    mode: suspend
    exclude_path:
      - /var/cache/*
      - "*.tmp"

- name: Nightly backup of guest 101, incremental when possible
  guestvault.backup.guest_backup:
    vmid: 101
    storage: backup-nfs

- name: Weekly full backup, protected, with notes (note the !unsafe tag)
  guestvault.backup.guest_backup:
    vmid: 101
    storage: backup-nfs
    level: full
    protected: true
    notes_template: !unsafe '{{guestname}} on {{node}}\nweekly full'

- name: A guest that is not in the registry, straight by its QMP socket, frozen through its agent
  guestvault.backup.guest_backup:
    vmid: 205
    qmp_socket: /run/qemu/205.qmp
    agent_socket: /run/qemu/205.qga
    dumpdir: /srv/backup
    mode: snapshot
    bwlimit: 102400
    compress: zstd

- name: At most one backup a day, however often the playbook runs
  guestvault.backup.guest_backup:
    vmid: 101
    storage: backup-nfs
    max_age: 20h

- name: What would a backup do? (check mode)
  guestvault.backup.guest_backup:
    vmid: 101
    storage: backup-nfs
  check_mode: true
  register: plan

- name: Say why it would take a full backup
  ansible.builtin.debug:
    msg: "{{ plan.level }}: {{ plan.level_reason }}"
"""

RETURN = r"""
notifications:
  description:
    - What each notification target did with the call's notification - C(target), C(type),
      C(ok), and C(answer) (what its server answered) or C(error) (why it failed; also a
      warning). Empty when nothing was sent. Never holds a secret.
  returned: when a notification was due (not in check mode)
  type: list
  elements: dict
  sample: [{target: ops, type: sendmail, ok: true, answer: /usr/sbin/sendmail accepted the mail for ops@example.com}]
backup:
  description:
    - Id of the new backup, C(vm/<vmid>/<time>) (with O(max_age), of the recent one).
    - A container's is the archive's file name, as Proxmox VE's volume ids name it.
  returned: changed or skipped by O(max_age)
  type: str
  sample: vm/101/2026-11-22T01:00:00Z
archive:
  description: A container's archive (C(-) when written to standard output by the node command).
  returned: changed, for a container
  type: str
  sample: /srv/backup/dump/vzdump-lxc-777-2026_11_22-02_00_00.tar.zst
type:
  description: The guest's kind, C(lxc) for a container (a VM's result has no RV(type)).
  returned: for a container
  type: str
  sample: lxc
frozen_seconds:
  description: A container in V(suspend) or V(snapshot) mode, the seconds it was frozen.
  returned: changed, for a container
  type: float
  sample: 0.21
tar_bytes:
  description: A container's archive, the bytes of its tar stream before compression.
  returned: changed, for a container
  type: int
  sample: 104857600
exclude_path:
  description: A container's exclusion patterns as given to tar (O(exclude_path), then stdexcludes).
  returned: for a container
  type: list
  elements: str
  sample: ['/var/cache/*', '/tmp/?*']
skipped_reason:
  description: Why no backup was taken (O(max_age)).
  returned: when skipped
  type: str
  sample: backup vm/101/2026-11-22T01:00:00Z is 3600 s old, younger than max_age 20h
backup_dir:
  description: Directory of the new backup.
  returned: changed
  type: str
  sample: /srv/backup/vm/101/2026-11-22T01:00:00Z
time:
  description: The backup's point in time (UTC).
  returned: changed
  type: str
  sample: '2026-11-22T01:00:00Z'
vmid:
  description: The guest's id.
  returned: always
  type: int
  sample: 101
guest_name:
  description: The guest's name (registry, else QEMU's C(-name)).
  returned: always
  type: str
  sample: web01
level:
  description: The level taken (or, in check mode, that would be taken), V(full), V(inc) or V(copy).
  returned: always
  type: str
  sample: inc
requested_level:
  description: The level asked for.
  returned: always
  type: str
  sample: auto
level_reason:
  description: Why this level; for a fallback to full, what was wrong with the chain.
  returned: always
  type: str
  sample: "auto: full because disk virtio0 has no bitmap guestvault.nightly.20261121T010000Z"
chain:
  description: The chain the backup belongs to (null for V(copy)).
  returned: always
  type: str
  sample: nightly
parent:
  description: The backup an incremental builds on (null otherwise).
  returned: always
  type: str
  sample: '2026-11-21T01:00:00Z'
mode:
  description: The consistency mode used.
  returned: always
  type: str
  sample: snapshot
storage:
  description: The storage id (null with a dumpdir).
  returned: always
  type: str
  sample: backup-nfs
storage_path:
  description: The storage's directory.
  returned: always
  type: str
  sample: /srv/backup
disks:
  description: The disks in the backup.
  returned: always
  type: list
  elements: dict
  contains:
    id:
      description: Device id.
      type: str
      sample: virtio0
    format:
      description: Format of the guest's image.
      type: str
      sample: qcow2
    virtual_size:
      description: Size of the disk in bytes.
      type: int
      sample: 34359738368
    level:
      description: V(full) or V(inc) for this disk (raw disks are always full).
      type: str
      sample: inc
    bytes_written:
      description:
        - Bytes of guest data stored in this backup's image (for V(inc), the changed data; holes
          and zeroes take no space and do not count).
      type: int
      sample: 67108864
    bytes_processed:
      description: Bytes of the disk the backup job went through (the disk size for V(full)).
      type: int
      sample: 34359738368
    size:
      description: Size of the backup's image file in bytes.
      type: int
      sample: 67305472
    segment_size:
      description: The image file's digests cover segments of this many bytes (qcow2 chain).
      type: int
      sample: 4194304
    segment_sha256:
      description:
        - sha256 of each segment of the backup's image file, in file order, as recorded in
          C(index.json) (qcow2 chain). Backups of older versions record one C(sha256) of the
          whole file instead; verify checks either.
      type: list
      elements: str
bytes_written:
  description: Sum of RV(disks[].bytes_written).
  returned: changed
  type: int
  sample: 67108864
duration:
  description: Seconds the whole backup took.
  returned: changed
  type: float
  sample: 4.2
copy_seconds:
  description: Seconds the data copy took (from the point in time to the last job's end).
  returned: changed
  type: float
  sample: 3.1
throughput:
  description: RV(bytes_written) per second of RV(copy_seconds).
  returned: changed
  type: int
  sample: 1073741824
warnings:
  description: Things the user should know, e.g. that the filesystems were not frozen.
  returned: when there are any
  type: list
  elements: str
notes:
  description: The rendered notes.
  returned: always
  type: str
protected:
  description: Whether the backup is protected.
  returned: always
  type: bool
frozen_filesystems:
  description: Number of filesystems the guest agent froze (null when none were).
  returned: changed
  type: int
freeze_seconds:
  description: How long the guest's filesystems were frozen, from the freeze to the thaw (V(snapshot) mode with an agent).
  returned: changed
  type: float
pause_seconds:
  description: How long the vCPUs were paused (V(suspend) mode).
  returned: changed
  type: float
downtime_seconds:
  description: How long the guest was down (V(stop) mode).
  returned: changed
  type: float
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import guest_backup_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.guest_backup import GuestBackupRequest, run_guest_backup


def main():
    run_module(guest_backup_argument_spec(), run_guest_backup, GuestBackupRequest, needs_qmp=True)


if __name__ == '__main__':
    main()
