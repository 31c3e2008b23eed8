"""What a mode needs to know about the file systems under a container: their type (PVE picks
suspend mode's temporary directory by it) and, on btrfs, read-only snapshots of subvolumes
(snapshot mode). LVM-thin and ZFS snapshots are not available: this needs device-mapper or the
ZFS module, which guestvault's nodes are not assumed to have."""
from __future__ import annotations

import os
import subprocess

from ...errors import ContainerError

# File systems vzdump trusts to hold a temporary copy with every POSIX attribute (VZDump.pm).
POSIX_FILESYSTEMS = ('ext3', 'ext4', 'nfs', 'nfs4', 'reiserfs', 'xfs')
BTRFS_TIMEOUT = 300.0      # a snapshot commits a btrfs transaction: seconds on a busy disk


def fs_type(path: str) -> str:
    """The type of the file system ``path`` is on (its longest mount point in mountinfo)."""
    path = os.path.realpath(path)
    best, kind = '', 'unknown'
    with open('/proc/self/mountinfo', encoding='utf-8') as handle:
        for line in handle:
            fields = line.split()
            mount_point = fields[4].replace('\\040', ' ')
            fstype = fields[fields.index('-') + 1]
            inside = path == mount_point or path.startswith(mount_point.rstrip('/') + '/')
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, fstype
    return kind


def _btrfs(*args):
    try:
        return subprocess.run(['btrfs', *args], capture_output=True, text=True,
                              timeout=BTRFS_TIMEOUT, check=False, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ContainerError("btrfs is not installed; install btrfs-progs (apt-get install "
                             "btrfs-progs) for snapshot mode on btrfs") from None


def _subvolume(path: str) -> bool:
    return os.stat(path).st_ino == 256     # every btrfs subvolume's root directory is inode 256


def tree_kind(path: str):
    """What the tree at ``path`` is: 'btrfs subvolume', 'dir' (any other directory), or None
    when it is no directory."""
    if not os.path.isdir(path):
        return None
    return 'btrfs subvolume' if fs_type(path) == 'btrfs' and _subvolume(path) else 'dir'


def not_snapshottable(path: str) -> str:
    """Why ``path`` cannot have a btrfs snapshot taken here (empty when it can): it must be a
    btrfs subvolume whose parent directory is on the same btrfs, where the snapshot goes."""
    if fs_type(path) != 'btrfs':
        return f"'{path}' is not on btrfs"
    if not _subvolume(path):
        return f"'{path}' is a directory on btrfs, not a subvolume"
    if fs_type(os.path.dirname(os.path.realpath(path))) != 'btrfs':
        return f"the directory holding '{path}' is not on btrfs, so no snapshot can go there"
    return ''


def snapshot_path(subvolume: str, vmid: int) -> str:
    """Where the read-only snapshot of ``subvolume`` goes: a hidden sibling named after it."""
    real = os.path.realpath(subvolume)
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.vzdump-{vmid}")


def create_snapshot(subvolume: str, target: str) -> None:
    proc = _btrfs('subvolume', 'snapshot', '-r', subvolume, target)
    if proc.returncode != 0:
        raise ContainerError(f"btrfs could not snapshot {subvolume} to {target}: "
                             f"{proc.stderr.strip()}")


def delete_snapshot(target: str) -> None:
    """Delete the snapshot ``target`` (a missing one is already gone)."""
    if not os.path.lexists(target):
        return
    proc = _btrfs('subvolume', 'delete', target)
    if proc.returncode != 0:
        raise ContainerError(f"btrfs could not delete the snapshot {target}: "
                             f"{proc.stderr.strip()}; delete it with 'btrfs subvolume delete "
                             f"{target}'")
