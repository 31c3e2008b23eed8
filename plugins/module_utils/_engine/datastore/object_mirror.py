"""A datastore on an object store (a ``Backend``: an S3 bucket), with a local directory as its
cache (as PBS 4 keeps one). The bucket is named ``bucket`` below: nothing here is S3's own but
what ``backend.py`` asks of every backend.

The bucket holds the datastore exactly as a directory would (``.chunks/XXXX/<digest>``,
``vm/<vmid>/<time>/...``, keys for paths); the bucket is the truth, the cache a copy of what
each snapshot's small files hold, so the snapshot code of a local datastore runs unchanged:
- **writing**: a snapshot is staged in the cache as on a local datastore. On commit its files
  are uploaded, the manifest (``index.json.blob``) last: a snapshot is in the bucket when its
  manifest is, so a killed upload leaves only keys that no listing shows (``remove_stale``
  deletes them). The chunks went up before, while they were read.
- **reading**: every listing of a guest lists its keys in the bucket and brings the cache in
  line: snapshots another node made are fetched, ones another node pruned are dropped, a
  manifest changed elsewhere (notes, verify state) is fetched again. Delete the cache and the
  next listing rebuilds it.
- **several nodes, one bucket**: chunks are shared (the format's conditional puts), and garbage
  collection never sweeps while a backup writes anywhere: the writer registry of a bucket holds
  leases (``writers.LeaseWriters``). A GC that removed chunks writes a new ``.gc-generation``,
  which tells every node's cache that what it knew to be stored may be gone.

``ObjectMirror`` is what ``storage.DatastoreStorage`` asks at the places where such a datastore
differs from one on a file system (its ``SnapshotMirror``); the storage class is the same.

Locks on one guest (``guest_lock``) stay local to the node that runs the guest, as with PBS:
a vmid is backed up from one node at a time.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import uuid

from ..errors import GuestvaultError, StorageError
from ..times import parse_time
from .storage import BACKUP_TYPES, CLIENT_LOG, INDEX_SUFFIXES, MANIFEST, NAMESPACES, OWNER, \
    OWNER_TEXT, DatastoreStagedBackup, walk_index_files
from ..storage.directory import PROTECTED
from ..storage.files import fsync_path, write_file_atomic
from .writers import LeaseWriters

GC_INDEXES = '.gc-indexes'      # in the cache: index files of groups the cache does not follow


def snapshot_key(storage_path, snapshot_path):
    """The key prefix (``vm/<vmid>/<time>/``) of a snapshot directory in the cache."""
    relative = os.path.relpath(snapshot_path, storage_path)
    return relative.replace(os.sep, '/').rstrip('/') + '/'


class ObjectStagedBackup(DatastoreStagedBackup):
    """A snapshot staged in the cache; ``commit`` uploads it, the manifest last."""

    def __init__(self, tmp_path, final_path, codec, mirror):
        super().__init__(tmp_path, final_path, codec)
        self.mirror = mirror
        self.prefix = snapshot_key(mirror.storage.path, final_path)
        self.uploaded = False

    def commit(self):
        names = sorted(n for n in os.listdir(self.path) if n not in (MANIFEST, CLIENT_LOG))
        try:
            for name in names:
                self._upload(name)
            self.uploaded = True         # from here a failure must delete what went up
            self._upload(MANIFEST)
        except GuestvaultError:
            self.mirror.delete_snapshot_keys(self.prefix)
            raise
        try:
            super().commit()
        except OSError:
            # A listing on this node saw the manifest and fetched the snapshot into the cache
            # first: the bucket and the cache already hold it as uploaded.
            if not os.path.isfile(os.path.join(self.final_path, MANIFEST)):
                raise
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = self.final_path

    def _upload(self, name):
        with open(self.file(name), 'rb') as handle:
            self.mirror.bucket.put(self.prefix + name, handle.read())

    def write_log(self, text):
        super().write_log(text)
        if self.uploaded:
            try:
                self._upload(CLIENT_LOG)
            except GuestvaultError:
                pass  # the snapshot is complete without it (PBS's log is optional); kept here

    def discard(self):
        if self.uploaded:
            try:
                self.mirror.delete_snapshot_keys(self.prefix)
            except GuestvaultError:
                pass  # a manifest-less remainder is removed by the guest's next run
        super().discard()


class ObjectMirror:
    """The mirror of a datastore whose bucket holds everything and whose directory is the local
    cache (``storage.SnapshotMirror``). ``bucket``: any Backend (backends/s3.py's S3Bucket in
    production)."""

    def __init__(self, bucket):
        self.bucket = bucket
        self.storage = None

    def prepare(self, path, storage_id):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)   # a dropped cache is rebuilt
        except OSError as exc:
            raise StorageError(f"cannot create the cache {path} of datastore {storage_id}: "
                               f"{exc.strerror or exc}") from None

    def attach(self, storage):
        self.storage = storage
        label = f"datastore {storage.id} ({self.bucket.label}, cache {storage.path})"
        self.bucket.check()
        return label

    def writers(self, local, label):
        return LeaseWriters(self.bucket, local, label)

    def staged(self, tmp_path, final_path):
        return ObjectStagedBackup(tmp_path, final_path, self.storage.codec, self)

    def before_stage(self, vmid):
        self.bucket.put_new(f"vm/{int(vmid)}/{OWNER}", OWNER_TEXT.encode())

    # -- listing: the bucket is the truth, the cache follows it ----------------------------------
    def guest_ids(self, local):
        return sorted(int(name) for name in self.bucket.folders('vm/') if name.isdigit())

    def other_index_files(self):
        """Every guest's snapshots synced into the cache (each with its manifest, damaged or
        not), and the index files of other groups a PBS sharing the bucket wrote (containers,
        hosts, namespaces), which the cache does not hold, downloaded afresh into
        ``.gc-indexes/`` under their keys: their local copies."""
        for vmid in self.guest_ids(None):
            self.sync_guest(vmid)
        others = os.path.join(self.storage.path, GC_INDEXES)
        shutil.rmtree(others, ignore_errors=True)
        for prefix in [f"{kind}/" for kind in BACKUP_TYPES if kind != 'vm'] + [f"{NAMESPACES}/"]:
            for key, _size, _etag, _modified in self.bucket.objects(prefix):
                if not key.endswith(INDEX_SUFFIXES) or '..' in key.split('/'):
                    continue
                data = self.bucket.get(key)
                if data is not None:      # else removed meanwhile: nothing to keep for it
                    local = os.path.join(others, *key.split('/'))
                    os.makedirs(os.path.dirname(local), mode=0o700, exist_ok=True)
                    write_file_atomic(local, data)
        return list(walk_index_files(others))

    def remote_snapshots(self, vmid):
        """``{time name: {file name: (size, etag)}}`` of the guest's snapshots in the bucket,
        complete or not."""
        prefix = f"vm/{int(vmid)}/"
        found = {}
        for key, size, etag, _modified in self.bucket.objects(prefix):
            rest = key[len(prefix):]
            if '/' in rest:
                name, file_name = rest.split('/', 1)
                found.setdefault(name, {})[file_name] = (size, etag)
        return found

    def sync_guest(self, vmid):
        """Bring the cache of one guest in line with the bucket."""
        remote = self.remote_snapshots(vmid)
        gdir = self.storage.guest_dir(vmid)
        complete = {name: files for name, files in remote.items() if MANIFEST in files}
        if not complete and not os.path.isdir(gdir):
            return
        os.makedirs(gdir, mode=0o700, exist_ok=True)
        for name in sorted(os.listdir(gdir)):
            if name.startswith('.') or name in complete or name == OWNER:
                continue
            try:
                parse_time(name)
            except ValueError:
                continue
            shutil.rmtree(os.path.join(gdir, name), ignore_errors=True)  # pruned elsewhere
        for name, files in complete.items():
            local = os.path.join(gdir, name)
            if not os.path.isdir(local):
                self._fetch_snapshot(vmid, name, files, local)
                continue
            self._refresh(vmid, name, files, local)

    def _fetch_snapshot(self, vmid, name, files, local):
        """Download one snapshot's files into the cache, hidden until complete. Another run on
        this node may fetch or commit the same snapshot meanwhile: whoever renames first wins,
        the other drops its copy (both hold what the bucket holds)."""
        hidden = os.path.join(os.path.dirname(local),
                              f".{name}.fetch-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        prefix = f"vm/{int(vmid)}/{name}/"
        try:
            os.mkdir(hidden, 0o700)
            for file_name in files:
                if '/' in file_name or (file_name.startswith('.') and file_name != PROTECTED):
                    continue
                data = b'' if file_name == PROTECTED else self.bucket.get(prefix + file_name)
                if data is None:
                    continue      # pruned while listed: the next listing drops the snapshot
                write_file_atomic(os.path.join(hidden, file_name), data)
            fsync_path(hidden)
            os.rename(hidden, local)
        except OSError:
            if not os.path.isdir(local):
                raise StorageError(f"cannot copy snapshot vm/{vmid}/{name} of {self.storage.label} into "
                                   f"the cache {self.storage.path}; check its free space and "
                                   "permissions") from None
        finally:
            shutil.rmtree(hidden, ignore_errors=True)

    def _refresh(self, vmid, name, files, local):
        """Protection, the manifest and the log as the bucket has them now."""
        prefix = f"vm/{int(vmid)}/{name}/"
        marker = os.path.join(local, PROTECTED)
        if (PROTECTED in files) != os.path.exists(marker):
            if PROTECTED in files:
                write_file_atomic(marker, '')
            else:
                os.unlink(marker)
        for file_name in (MANIFEST, CLIENT_LOG):
            if file_name not in files:
                continue
            path = os.path.join(local, file_name)
            if _md5(path) == files[file_name][1]:
                continue
            data = self.bucket.get(prefix + file_name)
            if data is not None:
                write_file_atomic(path, data)

    # -- changing snapshots ---------------------------------------------------------------------
    def delete_snapshot_keys(self, prefix):
        """Delete a snapshot's keys, its manifest first, so it is never half visible."""
        self.bucket.delete([prefix + MANIFEST])
        self.bucket.delete(key for key, _s, _e, _m in self.bucket.objects(prefix))

    def before_remove(self, record):
        if record.protected or os.path.exists(os.path.join(record.path, PROTECTED)) \
                or self.bucket.head(snapshot_key(self.storage.path, record.path) + PROTECTED):
            raise StorageError(f"backup {record.id} is protected and is not removed")
        self.storage.inside(record.path)
        self.delete_snapshot_keys(snapshot_key(self.storage.path, record.path))

    def remove_stale(self, vmid):
        """The keys of uploads a killed run left (a snapshot without manifest)."""
        removed = []
        for name, files in self.remote_snapshots(vmid).items():
            if MANIFEST not in files:
                self.bucket.delete(f"vm/{int(vmid)}/{name}/{file_name}" for file_name in files)
                removed.append(f"{name} (an incomplete upload in {self.bucket.label})")
        return removed

    def set_protected(self, record, protected):
        key = snapshot_key(self.storage.path, record.path) + PROTECTED
        if protected:
            self.bucket.put(key, b'')
        else:
            self.bucket.delete([key])

    def manifest_changed(self, record):
        with open(os.path.join(record.path, MANIFEST), 'rb') as handle:
            self.bucket.put(snapshot_key(self.storage.path, record.path) + MANIFEST, handle.read())

    def free_bytes(self, local):
        return sys.maxsize  # a bucket has no size a client can ask for


def _md5(path):
    try:
        with open(path, 'rb') as handle:
            return hashlib.md5(handle.read()).hexdigest()
    except OSError:
        return None
