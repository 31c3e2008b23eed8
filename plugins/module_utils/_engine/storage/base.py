"""The Storage interface: where backups live, independent of how their disks are encoded.

The run layer talks to a storage only through these methods, so a second storage (objects on S3
behind a local cache) is one more implementation, not a second code path. A storage knows
backups as records (one per point in time of one guest) with a manifest (``index``, a dict the
format defines) and small mutable state beside it (protection, notes, verify state). It never
looks inside a format's files.

=====================  ===========================================================================
method                 contract
=====================  ===========================================================================
``backups(vmid)``      complete backups of a guest, oldest first (a partial one is never listed)
``guest_ids()``        vmids that have a directory of backups
``guest_lock``         context manager: readers share, writers exclude; ``LockTimeout`` after wait;
                       ``holder`` describes the run to those that wait
``stage(vmid, when)``  a hidden ``StagedBackup`` that becomes visible in one step on ``commit``
``remove(record)``     make a backup invisible in one step, then delete it; refuses protected ones
``remove_stale``       delete what killed runs left (hidden staging areas); call under the lock
``next_backup_time``   a free name for a backup taken at ``now``
``free_bytes()``       room left for backups
``set_protected`` ...  protection, notes, verify state, size of one backup
``stage_manifest``     replace a manifest in two steps that a crash cannot leave half-done
=====================  ===========================================================================
"""
from __future__ import annotations

from ..times import parse_time


class BackupRecord:
    """A complete backup as found on a storage: its location, manifest and protection."""

    def __init__(self, path, index, protected):
        self.path = path
        self.index = index
        self.protected = protected

    @property
    def time(self):
        return parse_time(self.index['time'])

    @property
    def id(self):
        return f"vm/{self.index['vmid']}/{self.index['time']}"

    def __repr__(self):
        return f"BackupRecord({self.id!r}, level={self.index.get('level')!r})"


class Storage:
    """Base of the storages; see the module docstring for what each method promises."""

    kind = None     # 'dir'; later 's3'
    id = None       # the storage.cfg id, None for a dumpdir
    label = None    # how messages name it: "storage backup-nfs (/mnt/backup)"

    def backups(self, vmid):
        raise NotImplementedError

    def guest_ids(self):
        raise NotImplementedError

    def guest_lock(self, vmid, wait_seconds, shared=False, holder=None):
        raise NotImplementedError

    def stage(self, vmid, when):
        raise NotImplementedError

    def remove(self, record):
        raise NotImplementedError

    def remove_stale(self, vmid):
        raise NotImplementedError

    def next_backup_time(self, vmid, now):
        raise NotImplementedError
