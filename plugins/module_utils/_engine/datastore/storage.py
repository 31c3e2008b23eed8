"""A datastore storage: Proxmox Backup Server's directory layout (docs/datastore-format.md).

Snapshots are laid out as on a directory storage (``vm/<vmid>/<time>/``, written hidden and
renamed), so listing, locking, staging and removal are the directory storage's. What differs is
inside a snapshot: the manifest is ``index.json.blob`` (notes and verify state live in its
unprotected part), and the guest's configuration and the run's log are blobs. Their encoding is
the datastore format's business: it hands this storage a codec (``read_index``,
``write_manifest``, ``update_unprotected``, ``encode_file``, ``decode_file``), so the storage
never decodes a blob itself and the layers still point down only.

Besides snapshots the datastore holds ``.chunks/`` (the format's chunk store) and, for garbage
collection, its writer registry (``writers.py``: ``.writers/`` locally, leases on an object
store), so GC never sweeps a chunk a running backup may still put in its index.

One class serves both kinds of datastore: the few places where one in a Backend differs (its
listing brings the cache in line, a commit uploads, removal and protection change the bucket
first) ask its ``SnapshotMirror``, which does nothing for a datastore on a file system.
"""
from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Protocol

from ..errors import GuestvaultError, StorageError
from ..storage.directory import PROTECTED, DirStorage, StagedBackup
from ..storage.files import write_file_atomic
from .backend import Backend
from .writers import LocalWriters, WriterRegistry

MANIFEST = 'index.json.blob'
GUEST_CONFIG = 'guest.json.blob'
CLIENT_LOG = 'client.log.blob'
OWNER = 'owner'
OWNER_TEXT = 'root@pam\n'      # PBS lists a group only with an owner; root@pam is PBS's admin
BACKUP_TYPES = ('vm', 'ct', 'host')     # PBS's backup groups: VMs, containers, host archives
NAMESPACES = 'ns'
INDEX_SUFFIXES = ('.fidx', '.didx')


def walk_index_files(root):
    """The ``.fidx`` and ``.didx`` files of every snapshot under ``root``, as PBS's GC finds them:
    ``<type>/<id>/<time>/`` for each backup type, in the root namespace and in every namespace
    (``ns/<name>/``, nested) below it, whatever the snapshot's manifest says: a snapshot whose
    manifest is damaged still needs its chunks once the manifest is repaired.

    Hidden entries are skipped: a ``.<time>.tmp`` snapshot being written belongs to a running
    backup, whose chunks the writer cutoff protects; one a killed run left is never made visible,
    so its chunks are garbage. A folder that cannot be listed stops the walk (StorageError):
    skipping it would sweep the chunks of every snapshot inside."""
    for backup_type in BACKUP_TYPES:
        for group in _subfolders(os.path.join(root, backup_type)):
            for snapshot in _subfolders(group):
                for name in _listing(snapshot):
                    if name.endswith(INDEX_SUFFIXES) and not name.startswith('.'):
                        yield os.path.join(snapshot, name)
    for namespace in _subfolders(os.path.join(root, NAMESPACES)):
        yield from walk_index_files(namespace)


def _listing(folder):
    try:
        return sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []                   # removed meanwhile (a prune), or a file: nothing in it
    except OSError as exc:
        raise StorageError(f"cannot list {folder}: {exc.strerror or exc}; garbage collection "
                           "stops before removing anything, as the chunks of the snapshots in "
                           "it cannot be known. Fix its permissions or file system") from None


def _subfolders(folder):
    return [os.path.join(folder, name) for name in _listing(folder)
            if not name.startswith('.') and os.path.isdir(os.path.join(folder, name))]


class DatastoreStagedBackup(StagedBackup):
    """A snapshot being written; its manifest lists the blobs written before it."""

    def __init__(self, tmp_path, final_path, codec):
        super().__init__(tmp_path, final_path)
        self.codec = codec
        self.notes = None
        self.blobs = {}

    @property
    def log_path(self):
        return self.file(CLIENT_LOG)

    @property
    def text_log_path(self):
        return None          # a blob (encrypted with a key): hooks get a text copy elsewhere

    def write_blob(self, name, data, listed=True):
        raw = self.codec.encode_file(data)
        write_file_atomic(self.file(name), raw)
        if listed:
            self.blobs[name] = raw

    def write_guest_config(self, guest):
        self.write_blob(GUEST_CONFIG, json.dumps(guest, indent=2, sort_keys=True).encode())

    def write_log(self, text):
        # As PBS: the log is uploaded after the manifest and is not listed in it.
        self.write_blob(CLIENT_LOG, text.encode('utf-8', 'replace'), listed=False)

    def set_notes(self, notes):
        self.notes = notes

    def write_manifest(self, manifest):
        self.codec.write_manifest(self.path, manifest, notes=self.notes, blobs=self.blobs)


class SnapshotMirror(Protocol):
    """Where a datastore's snapshots live besides its directory, asked at the few places where
    a datastore on a file system and one on an object store differ (PBS 4 matches its
    ``DatastoreBackend::{Filesystem, S3}`` there): ``FileSystem`` below, for which the directory
    is the truth and every hook does nothing, and ``object_mirror.ObjectMirror``, for which a
    Backend is the truth and the directory its cache."""

    bucket: Optional[Backend]       # the Backend, or None

    def prepare(self, path: str, storage_id: str) -> None:
        """Before the directory is opened (a dropped cache is made again)."""

    def attach(self, storage: 'DatastoreStorage') -> str:
        """The storage is open: check the backend; the storage's label."""

    def writers(self, local: LocalWriters, label: str) -> WriterRegistry:
        """The writer registry: the local one, or leases across nodes."""

    def staged(self, tmp_path: str, final_path: str) -> 'DatastoreStagedBackup':
        """A snapshot to write (its commit uploads it, on an object store)."""

    def before_stage(self, vmid: int) -> None:
        """The guest's group exists (its owner) before a snapshot is staged."""

    def guest_ids(self, local: Callable[[], List[int]]) -> List[int]:
        """The guests with backups; ``local()`` lists those the directory holds."""

    def sync_guest(self, vmid: int) -> None:
        """Bring the directory of one guest in line with the truth before it is listed."""

    def other_index_files(self) -> List[str]:
        """Before garbage collection's mark: every guest synced, and local copies of the index
        files the directory does not follow (other groups and namespaces)."""

    def before_remove(self, record) -> None:
        """Refuse a protected snapshot (StorageError), then remove it from the truth."""

    def remove_stale(self, vmid: int) -> List[str]:
        """What killed runs left beyond the directory: a description of each removed."""

    def set_protected(self, record, protected: bool) -> None:
        """Record protection in the truth, before the directory's marker."""

    def manifest_changed(self, record) -> None:
        """A committed manifest was rewritten (notes, verify state) in the directory."""

    def free_bytes(self, local: Callable[[], int]) -> int:
        """The room for backups; ``local()`` is the directory's."""


class FileSystem:
    """The mirror of a datastore on a file system: the directory is the truth, nothing else
    to keep in line."""

    bucket = None

    def prepare(self, path, storage_id):
        pass

    def attach(self, storage):
        self.storage = storage
        return f"datastore {storage.id} ({storage.path})"

    def writers(self, local, label):
        return local

    def staged(self, tmp_path, final_path):
        return DatastoreStagedBackup(tmp_path, final_path, self.storage.codec)

    def before_stage(self, vmid):
        pass

    def guest_ids(self, local):
        return local()

    def sync_guest(self, vmid):
        pass

    def other_index_files(self):
        return []

    def before_remove(self, record):
        pass

    def remove_stale(self, vmid):
        return []

    def set_protected(self, record, protected):
        pass

    def manifest_changed(self, record):
        pass

    def free_bytes(self, local):
        return local()


class DatastoreStorage(DirStorage):
    """A Proxmox Backup Server datastore: in a directory on a local or mounted file system, or,
    with an ``ObjectMirror``, in a Backend with the directory as its cache. Everything a
    datastore does is here; ``mirror`` does what differs."""

    kind = 'datastore'

    def __init__(self, path, storage_id, codec, mirror=None):
        self.mirror = mirror or FileSystem()
        self.mirror.prepare(path, storage_id)
        super().__init__(path, storage_id)
        self.codec = codec
        self.bucket = self.mirror.bucket
        self.label = self.mirror.attach(self)
        self.local_writers = LocalWriters(self.path)
        self.writers = self.mirror.writers(self.local_writers, self.label)

    def staged_class(self, tmp_path, final_path):
        return self.mirror.staged(tmp_path, final_path)

    manifest_name = MANIFEST

    def read_index(self, backup_dir):
        return self.codec.read_index(backup_dir)

    def stage(self, vmid, when):
        self.mirror.before_stage(vmid)
        staged = super().stage(vmid, when)
        owner = os.path.join(self.guest_dir(vmid), OWNER)
        if not os.path.exists(owner):
            write_file_atomic(owner, OWNER_TEXT)
        return staged

    # -- the small mutable state of one snapshot: in the manifest's unprotected part ------------
    def read_notes(self, record):
        return record.manifest.notes

    def set_notes(self, record, notes):
        self.update_manifest(record, notes=notes or None)

    def read_verify_state(self, record):
        return record.manifest.verify

    def write_verify_state(self, record, state):
        self.update_manifest(record, verify=state)

    def update_manifest(self, record, **changes):
        """Change ``notes`` or ``verify`` in the manifest's unprotected part, and in ``record``:
        the one way a snapshot changes after its commit (protection aside: a file of its own,
        as PBS keeps it). A datastore with a backend uploads the manifest after."""
        self.codec.update_unprotected(record.path, **changes)
        record.manifest.update(changes)
        self.mirror.manifest_changed(record)

    def read_guest_config(self, record):
        try:
            with open(os.path.join(record.path, GUEST_CONFIG), 'rb') as handle:
                return json.loads(self.codec.decode_file(handle.read(), GUEST_CONFIG))
        except (OSError, ValueError, GuestvaultError):
            return {}

    def read_log(self, record):
        try:
            with open(os.path.join(record.path, CLIENT_LOG), 'rb') as handle:
                return self.codec.decode_file(handle.read(), CLIENT_LOG).decode('utf-8',
                                                                                'replace')
        except (OSError, GuestvaultError):
            return None

    def pending_manifests(self, vmid):
        return []  # snapshots are never rewritten: nothing can be left half-replaced

    # -- listing and changing snapshots: the directory, kept in line by the mirror --------------
    def guest_ids(self):
        return self.mirror.guest_ids(super().guest_ids)

    def scan(self, vmid):
        self.mirror.sync_guest(vmid)
        return super().scan(vmid)

    def index_files(self):
        """Every index file of every snapshot in the datastore (garbage collection's mark)."""
        others = self.mirror.other_index_files()
        return list(walk_index_files(self.path)) + others

    def remove(self, record):
        self.mirror.before_remove(record)
        super().remove(record)

    def remove_stale(self, vmid):
        return super().remove_stale(vmid) + self.mirror.remove_stale(vmid)

    def set_protected(self, record, protected):
        self.mirror.set_protected(record, protected)
        super().set_protected(record, protected)

    def free_bytes(self):
        return self.mirror.free_bytes(super().free_bytes)

    # -- running backups and garbage collections: the writer registry ---------------------------
    def collecting_garbage(self, check_mode=False):
        """Held by a garbage collection: ``(now, start of the oldest running backup or None)``,
        from which the sweep's cutoff follows (``writers.py``)."""
        return self.writers.collecting_garbage(check_mode)

    def writer(self, wait_seconds=None):
        """Held by a running backup (or a live restore's server, which reads a snapshot for
        hours), so garbage collection spares what it may still name (``writers.py``)."""
        if wait_seconds is None:
            return self.writers.writer()
        return self.writers.writer(wait_seconds)

    def oldest_writer_start(self):
        """The start (epoch) of the oldest backup writing through this node's file system."""
        return self.local_writers.oldest_start()

    def backup_size(self, record):
        total = 0
        for name in os.listdir(record.path):
            if name != PROTECTED:
                try:
                    total += os.path.getsize(os.path.join(record.path, name))
                except OSError:
                    pass
        return total
