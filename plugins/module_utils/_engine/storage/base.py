"""The Storage protocol: where backups live, independent of how their disks are encoded.

The run layer (and the formats) reach a storage only through these members, so another storage
is one more implementation, not a second code path. Implementations: ``DirStorage``
(storage/directory.py), ``DatastoreStorage`` (datastore/, with an ``ObjectMirror`` on an object store).
A storage knows backups as ``BackupRecord``s (storage/records.py): a ``Manifest`` the format
defines, and small mutable state beside it (protection, notes, verify state). It never looks
inside a format's files. The members are the ones run/ and the formats call (found by
tests/unit/test_storage_contract.py's call-set check); docs/architecture.md has the same table.
``tests/storage_contract.py`` checks each contract on every implementation.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from .records import BackupRecord, DamagedBackup

# The records a storage lists are part of its interface.
__all__ = ['BackupRecord', 'DamagedBackup', 'StagedBackup', 'Storage']


class StagedBackup(Protocol):
    """A backup being written: hidden until ``commit``; the format writes ``file(name)``."""

    path: str

    def file(self, name):
        """The path of one file in the staged backup (the format's images or indexes)."""

    def write_manifest(self, manifest):
        """The ``Manifest`` (or its dict), written as the backup's manifest, byte for byte."""

    def write_guest_config(self, guest):
        """The guest as captured (a dict)."""

    def write_log(self, text):
        """The run's log."""

    def set_notes(self, notes):
        """Rendered notes."""

    def set_protected(self):
        """Protect the backup from removal."""

    def commit(self):
        """Make every file durable, then the backup visible in one step."""

    def discard(self):
        """Remove it (also after ``commit``: a backup whose backup-end hook failed)."""


@runtime_checkable
class Storage(Protocol):
    """Where backups live; each member's contract is in its docstring."""

    kind: str       # 'dir' or 'datastore'
    id: str         # the storage.cfg id, None for a dumpdir
    label: str      # how messages name it: "storage backup-nfs (/mnt/backup)"
    path: str       # its directory (a datastore on S3: the local cache)

    # -- listing ---------------------------------------------------------------------------
    def scan(self, vmid):
        """``(backups, damaged)`` of one guest, each oldest first: complete backups as
        ``BackupRecord``s (a partial one is never listed), and directories named as a backup
        whose manifest cannot be read, as ``DamagedBackup``s with the reason."""

    def backups(self, vmid):
        """``scan(vmid)[0]``: the complete backups, oldest first."""

    def damaged(self, vmid):
        """``scan(vmid)[1]``: the damaged backups, never a BackupRecord."""

    def guest_ids(self):
        """The vmids that have a directory of backups, sorted."""

    def index_files(self):
        """(datastores) every ``.fidx``/``.didx`` of every snapshot, whatever its manifest says;
        hidden staging folders skipped (garbage collection's mark)."""

    # -- locking and writing ---------------------------------------------------------------
    def guest_lock(self, vmid, wait_seconds, shared=False, holder=None):
        """Context manager: readers share, writers exclude; ``LockTimeout`` after
        ``wait_seconds``; ``holder`` describes the run to those that wait."""

    def next_backup_time(self, vmid, now):
        """A free name for a backup taken at ``now``: ``now`` to the second, or one second
        after the newest; StorageError when the newest lies more than 120 s ahead."""

    def stage(self, vmid, when):
        """A hidden ``StagedBackup`` that becomes visible in one step on ``commit``."""

    def remove(self, record):
        """Make a backup invisible in one step, then delete it; StorageError if protected."""

    def stale_paths(self, vmid):
        """What killed runs left (hidden staging areas), for the guest's leftovers report."""

    def remove_stale(self, vmid):
        """Delete ``stale_paths``; call under the guest's lock."""

    def free_bytes(self):
        """Room left for backups."""

    def writer(self, wait_seconds=0):
        """Context manager held by a running backup (or a live restore's server): a datastore's
        garbage collection spares every chunk it may name."""

    def collecting_garbage(self, check_mode=False):
        """(datastores) Context manager held by a garbage collection: ``(now, start of the
        oldest running writer or None)``, from which the sweep's cutoff follows."""

    # -- the small mutable state of one backup -----------------------------------------------
    def set_protected(self, record, protected):
        """Protect or unprotect; ``record.protected`` follows."""

    def read_notes(self, record):
        """The backup's notes, or None."""

    def set_notes(self, record, notes):
        """Replace the notes (empty or None removes them)."""

    def read_verify_state(self, record):
        """The last verify's state (``{'state': 'ok'|'failed', ...}``), or None."""

    def write_verify_state(self, record, state):
        """Record a verify's state."""

    def read_guest_config(self, record):
        """The guest as the backup captured it; ``{}`` when unreadable."""

    def backup_size(self, record):
        """Bytes the backup occupies."""

    def file(self, record, name):
        """The path of one of a backup's files (formats read their images through this)."""

    # -- replacing a manifest ----------------------------------------------------------------
    def update_manifest(self, record, **changes):
        """Change keys of a committed backup's manifest, and ``record.manifest`` with them;
        the one way a manifest changes after its commit (``BackupRecord.update_manifest``)."""

    def stage_manifest(self, record, manifest):
        """Write a replacement manifest beside the current one; its path."""

    def commit_manifest(self, record, pending):
        """Swap the staged manifest in; ``record.manifest`` is re-read."""

    def pending_manifests(self, vmid):
        """``[(record, pending Manifest or None, pending path)]`` a crash left between the two
        steps; the format completes or drops each (``Format.recover``)."""

    def drop_pending_manifest(self, pending):
        """Remove a staged manifest."""
