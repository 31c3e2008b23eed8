#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: guestvault contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: file_restore
short_description: List or extract files from a guest's backup without restoring its disks
version_added: 0.1.0
description:
  - Lists a directory of a backup, or extracts files and directories from it into a directory
    (O(dest)) or a tar archive (O(archive)), from a qcow2 chain or a datastore (local or S3),
    full or incremental.
  - Nothing of the guest is mounted on the host. As in Proxmox Backup Server, a throw-away
    appliance VM (Debian's kernel and a busybox initramfs with LVM and blkid, built from Debian's
    packages on first use into C(/var/cache/guestvault/appliance)) reads the backup's disks
    read-only through a new overlay, finds partitions (MBR, GPT), LVM logical volumes and ext2/3/4,
    xfs and vfat filesystems by itself, mounts the chosen one read-only (a journal is replayed into
    the overlay, never into the backup) and returns a listing or a tar stream. The overlay is
    removed afterwards.
  - From a datastore, the appliance reads the snapshot through the engine's NBD server, which
    checks every chunk against its digest; an encrypted datastore needs its key on this node.
  - Extracted paths keep their place below the filesystem's root (C(/etc/hosts) lands in
    C(<dest>/etc/hosts)). They are written into a hidden directory inside O(dest), each file
    fsync'd, then renamed into place; an archive is written hidden beside O(archive) and renamed.
    Names that would escape O(dest) (C(..), absolute names, files behind a symbolic link the
    backup holds, a name given twice with another type) are refused and nothing is extracted;
    device nodes and FIFOs are not extracted (RV(not_extracted), with a warning); setuid, setgid
    and sticky bits are dropped. Run as root, files keep the guest's numeric owner.
  - Idempotent - when every path asked for is already in O(dest) (or O(archive) exists), nothing
    is done unless O(overwrite) is set.
  - The overlays and listings live in a private directory under C(/var/tmp) (or
    C($GUESTVAULT_WORK_DIR)) for the call only; a tar stream is written beside its target, so
    extracting needs the space of the files there, once.
  - Each call boots the appliance once (about 3.5 s here under TCG, which is used where KVM does
    not boot it; the probe is done once per host). Extraction ran at about 40 MiB/s under TCG.
author:
  - guestvault developers (@guestvault)
extends_documentation_fragment:
  - guestvault.backup.storage
  - guestvault.backup.backups
  - guestvault.backup.backups.selection
requirements:
  - qemu-system-x86_64 and qemu-img (Debian packages qemu-system-x86, qemu-utils) on the node
  - apt access to a Debian mirror the first time, to build the appliance
attributes:
  check_mode:
    description:
      - Listing changes nothing. Extracting in check mode runs the appliance to count what would
        be extracted (files, bytes) and checks the size limit, but writes nothing.
    support: full
  diff_mode:
    description: Shows the paths an extraction writes.
    support: full
options:
  vmid:
    description: The guest whose backup to read.
    type: int
    required: true
  filesystem:
    description:
      - The filesystem to read, as the result's RV(filesystems) names it - C(<disk>) for a
        filesystem on a whole disk, C(<disk>/part<N>) for a partition, C(lvm/<vg>/<lv>) for a
        logical volume.
      - Needed only when the backup holds more than one filesystem the appliance can read; the
        error then lists them.
    type: str
  paths:
    description:
      - Paths inside the guest's filesystem, from its root. Without O(dest) and O(archive), the
        one directory (or file) to list; with them, the files and directories to extract.
      - Symbolic links on the way are followed inside the guest's filesystem.
      - An empty path is refused (the root is V(/)); so are empty O(backup), O(filesystem),
        O(dest) and O(archive), which would otherwise stand for their defaults.
    type: list
    elements: str
    default: ['/']
    aliases: [path]
  dest:
    description: Extract into this directory (created if missing).
    type: path
  archive:
    description: Extract into this tar file instead (its directory must exist).
    type: path
  overwrite:
    description: Replace paths already in O(dest), or an existing O(archive).
    type: bool
    default: false
  max_size:
    description:
      - The most file data to extract, in bytes or with a K, M, G or T suffix (powers of 1024).
        Larger requests fail before anything is written, saying how big they are.
    type: str
    default: 4G
  timeout:
    description: Seconds the appliance may take for one request (more than 0).
    type: float
    default: 1800
seealso:
  - module: guestvault.backup.restore
  - module: guestvault.backup.backup_info
"""

EXAMPLES = r"""
- name: What is in /etc of guest 101's latest backup
  guestvault.backup.file_restore:
    vmid: 101
    storage: backup-nfs
    path: /etc
  register: listing

- name: The guest's nginx configuration as it was last Friday night
  guestvault.backup.file_restore:
    vmid: 101
    storage: pbs-local
    backup: "2026-11-20T23:00:00Z"
    paths: [/etc/nginx, /etc/hosts]
    dest: /srv/restore/101

- name: A home directory from a logical volume, as a tar file
  guestvault.backup.file_restore:
    vmid: 101
    storage: backup-nfs
    filesystem: lvm/vg0/home
    path: /alice
    archive: /srv/restore/101-alice.tar
    max_size: 20G
"""

RETURN = r"""
backup:
  description: Id of the backup read.
  returned: success
  type: str
  sample: vm/101/2026-11-22T01:00:00Z
time:
  description: The backup's point in time.
  returned: success
  type: str
level:
  description: The backup's level (V(full) or V(inc)).
  returned: success
  type: str
filesystems:
  description: Every block device the appliance found with data, readable or not.
  returned: when the appliance ran
  type: list
  elements: dict
  contains:
    name:
      description: What O(filesystem) calls it.
      type: str
      sample: lvm/vg0/root
    type:
      description: Its type as blkid says (V(ext4), V(xfs), V(vfat), V(LVM2_member), ...); null if unknown.
      type: str
    size:
      description: Size of the device in bytes.
      type: int
    uuid:
      description: Its UUID, if it has one.
      type: str
    label:
      description: Its label, if it has one.
      type: str
filesystem:
  description: The filesystem read.
  returned: when the appliance ran
  type: str
filesystem_type:
  description: Its type.
  returned: when the appliance ran
  type: str
path:
  description: The path listed.
  returned: when listing
  type: str
entries:
  description: The directory's entries (or the one file), sorted by name.
  returned: when listing
  type: list
  elements: dict
  contains:
    name:
      description: The entry's name; bytes that are not UTF-8 are shown as C(\xNN).
      type: str
    type:
      description: V(file), V(directory), V(symlink), V(block device), V(character device), V(fifo) or V(socket).
      type: str
    size:
      description: Size in bytes.
      type: int
    mode:
      description: Permission bits, octal.
      type: str
      sample: "0644"
    uid:
      description: Owner's numeric id.
      type: int
    gid:
      description: Group's numeric id.
      type: int
    mtime:
      description: Modification time (ISO 8601, UTC).
      type: str
    target:
      description: A symbolic link's target.
      type: str
      returned: for symbolic links
files:
  description: Regular files extracted (in check mode, that would be).
  returned: when extracting
  type: int
bytes:
  description: Their bytes.
  returned: when extracting
  type: int
entries_extracted:
  description: Files, directories and links extracted, all told.
  returned: when extracting
  type: int
dest:
  description: The directory extracted into.
  returned: when extracting into O(dest)
  type: str
written:
  description: The top-level paths written or merged into O(dest).
  returned: when extracting into O(dest), not in check mode
  type: list
  elements: str
not_extracted:
  description:
    - Device nodes, FIFOs and other special files in the paths asked for, which are not
      extracted (a warning names them too); relative to the filesystem's root.
  returned: when extracting into O(dest), not in check mode
  type: list
  elements: str
  sample: [dev/null, run/initctl]
replaced:
  description: Paths in O(dest) that O(overwrite) replaced.
  returned: when extracting into O(dest), not in check mode
  type: list
  elements: str
archive:
  description: The tar file written.
  returned: when extracting into O(archive)
  type: str
archive_bytes:
  description: Its size.
  returned: when extracting into O(archive), not in check mode
  type: int
appliance_seconds:
  description: How long the appliance ran.
  returned: when the appliance ran
  type: float
appliance_accel:
  description: The accelerator it ran on (V(kvm) or V(tcg)).
  returned: when the appliance ran
  type: str
"""

from ansible_collections.guestvault.backup.plugins.module_utils._ansible import run_module
from ansible_collections.guestvault.backup.plugins.module_utils._argspec import file_restore_argument_spec
from ansible_collections.guestvault.backup.plugins.module_utils._engine.run.file_restore import FileRestoreRequest, run_file_restore


def main():
    run_module(file_restore_argument_spec(), run_file_restore, FileRestoreRequest)


if __name__ == '__main__':
    main()
