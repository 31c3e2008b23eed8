"""A datastore storage: Proxmox Backup Server's directory layout (docs/datastore-format.md).

Snapshots are laid out as on a directory storage (``vm/<vmid>/<time>/``, written hidden and
renamed), so listing, locking, staging and removal are the directory storage's. What differs is
inside a snapshot: the manifest is ``index.json.blob`` (notes and verify state live in its
unprotected part), and the guest's configuration and the run's log are blobs. Their encoding is
the datastore format's business: it hands this storage a codec (``read_index``,
``write_manifest``, ``update_unprotected``, ``encode_file``, ``decode_file``), so the storage
never decodes a blob itself and the layers still point down only.

Besides snapshots the datastore holds ``.chunks/`` (the format's chunk store) and, for garbage
collection, ``.writers/``: one locked file per running backup, naming when it started, so GC
never sweeps a chunk a running backup may still put in its index.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import time
import uuid
from contextlib import contextmanager

from ..errors import GuestvaultError, StorageError
from ..storage.directory import PROTECTED, DirStorage, StagedBackup
from ..storage.files import write_file_atomic

MANIFEST = 'index.json.blob'
GUEST_CONFIG = 'guest.json.blob'
CLIENT_LOG = 'client.log.blob'
OWNER = 'owner'
OWNER_TEXT = 'root@pam\n'      # PBS lists a group only with an owner; root@pam is PBS's admin
WRITERS = '.writers'
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


class DatastoreStorage(DirStorage):
    """A Proxmox Backup Server datastore on a local or mounted file system."""

    kind = 'datastore'

    def __init__(self, path, storage_id, codec):
        super().__init__(path, storage_id)
        self.label = f"datastore {storage_id} ({self.path})"
        self.codec = codec

    def staged_class(self, tmp_path, final_path):
        return DatastoreStagedBackup(tmp_path, final_path, self.codec)

    manifest_name = MANIFEST

    def read_index(self, backup_dir):
        return self.codec.read_index(backup_dir)

    def stage(self, vmid, when):
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

    def index_files(self):
        """Every index file of every snapshot in the datastore (garbage collection's mark)."""
        return list(walk_index_files(self.path))

    # -- running backups, for garbage collection -------------------------------------------------
    @contextmanager
    def collecting_garbage(self, check_mode=False):
        """Held by a garbage collection: ``(now, start of the oldest running backup or None)``,
        from which the sweep's cutoff follows."""
        yield time.time(), self.oldest_writer_start()

    @contextmanager
    def writer(self, wait_seconds=0):
        """Announce a running backup (or a live restore's server, which reads a snapshot for
        hours): a file in ``.writers`` holding its start, locked while it runs (the kernel
        drops the lock if the process dies)."""
        folder = os.path.join(self.path, WRITERS)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        path = os.path.join(folder, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        handle = open(path, 'w')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            # The start on the file system's clock, which also stamps the atimes of the chunks
            # this writer touches next; it lags time.time() by up to a tick, and a touch a tick
            # after a time.time() start could otherwise fall before the cutoff with grace 0.
            started = min(time.time(), os.fstat(handle.fileno()).st_mtime)
            handle.write(f"{started:.6f}\n")
            handle.flush()
            yield
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
            handle.close()

    def oldest_writer_start(self):
        """The start (epoch) of the oldest backup still writing here, or None. A writer file
        nobody holds is a killed run's and is removed."""
        folder = os.path.join(self.path, WRITERS)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return None
        oldest = None
        for name in names:
            path = os.path.join(folder, name)
            try:
                handle = open(path, 'r+')
            except OSError:
                continue
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    try:
                        started = float(handle.readline().strip() or time.time())
                    except ValueError:
                        started = os.fstat(handle.fileno()).st_mtime
                    oldest = started if oldest is None else min(oldest, started)
                    continue
                os.unlink(path)  # nobody holds it: the run that made it is gone
        return oldest

    def backup_size(self, record):
        total = 0
        for name in os.listdir(record.path):
            if name != PROTECTED:
                try:
                    total += os.path.getsize(os.path.join(record.path, name))
                except OSError:
                    pass
        return total
