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
  collection never sweeps while a backup writes anywhere. Each running backup and each GC holds a
  *lease*, an object under ``.leases/`` refreshed every minute; a GC sweeps only when it sees no
  live writer lease after putting its own, and a backup starts only when it sees no live GC lease
  after putting its own, so of two that start at once at least one sees the other (S3 is
  strongly consistent). A lease of a run on this node that has ended (its process is gone, or
  it released the lease while S3 failed) is stale at once and removed; any other lapses after
  LEASE_TTL. A GC that removed chunks writes a new ``.gc-generation``, which tells
  every node's cache that what it knew to be stored may be gone.

Locks on one guest (``guest_lock``) stay local to the node that runs the guest, as with PBS:
a vmid is backed up from one node at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from ..errors import GuestvaultError, StorageError
from ..times import format_time, parse_time
from .object_chunks import GC_GENERATION
from .storage import BACKUP_TYPES, CLIENT_LOG, INDEX_SUFFIXES, MANIFEST, NAMESPACES, OWNER, \
    OWNER_TEXT, DatastoreStagedBackup, DatastoreStorage, walk_index_files
from ..storage.directory import PROTECTED, report_wait
from ..storage.files import fsync_path, write_file_atomic

LEASES = '.leases/'
GC_INDEXES = '.gc-indexes'      # in the cache: index files of groups the cache does not follow
# A lease not refreshed for this long belongs to a run that died (it refreshes every minute).
LEASE_TTL = 600
LEASE_REFRESH = 60
GC_WAIT_POLL = 2.0


def snapshot_key(storage_path, snapshot_path):
    """The key prefix (``vm/<vmid>/<time>/``) of a snapshot directory in the cache."""
    relative = os.path.relpath(snapshot_path, storage_path)
    return relative.replace(os.sep, '/').rstrip('/') + '/'


class ObjectStagedBackup(DatastoreStagedBackup):
    """A snapshot staged in the cache; ``commit`` uploads it, the manifest last."""

    def __init__(self, tmp_path, final_path, codec, storage):
        super().__init__(tmp_path, final_path, codec)
        self.storage = storage
        self.prefix = snapshot_key(storage.path, final_path)
        self.uploaded = False

    def commit(self):
        names = sorted(n for n in os.listdir(self.path) if n not in (MANIFEST, CLIENT_LOG))
        try:
            for name in names:
                self._upload(name)
            self.uploaded = True         # from here a failure must delete what went up
            self._upload(MANIFEST)
        except GuestvaultError:
            self.storage.delete_snapshot_keys(self.prefix)
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
            self.storage.bucket.put(self.prefix + name, handle.read())

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
                self.storage.delete_snapshot_keys(self.prefix)
            except GuestvaultError:
                pass  # a manifest-less remainder is removed by the guest's next run
        super().discard()


class ObjectDatastoreStorage(DatastoreStorage):
    """A datastore whose bucket holds everything and whose ``path`` is the local cache."""

    kind = 'datastore'

    def __init__(self, path, storage_id, codec, bucket):
        # ``bucket``: any Backend (backends/s3.py's S3Bucket in production)
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)   # a dropped cache is rebuilt
        except OSError as exc:
            raise StorageError(f"cannot create the cache {path} of datastore {storage_id}: "
                               f"{exc.strerror or exc}") from None
        super().__init__(path, storage_id, codec)
        self.bucket = bucket
        self.label = f"datastore {storage_id} ({bucket.label}, cache {self.path})"
        self.bucket.check()

    def staged_class(self, tmp_path, final_path):
        return ObjectStagedBackup(tmp_path, final_path, self.codec, self)

    def stage(self, vmid, when):
        self.bucket.put_new(f"vm/{int(vmid)}/{OWNER}", OWNER_TEXT.encode())
        return super().stage(vmid, when)

    # -- listing: the bucket is the truth, the cache follows it ----------------------------------
    def guest_ids(self):
        return sorted(int(name) for name in self.bucket.folders('vm/') if name.isdigit())

    def scan(self, vmid):
        self.sync_guest(vmid)
        return super().scan(vmid)

    def index_files(self):
        """Every index file in the bucket, as local copies: the VMs' snapshots through the cache
        (each with its manifest, damaged or not), and the index files of other groups a PBS
        sharing the bucket wrote (containers, hosts, namespaces), which the cache does not
        hold, downloaded afresh into ``.gc-indexes/`` under their keys."""
        for vmid in self.guest_ids():
            self.sync_guest(vmid)
        others = os.path.join(self.path, GC_INDEXES)
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
        return super().index_files() + list(walk_index_files(others))

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
        gdir = self.guest_dir(vmid)
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
                raise StorageError(f"cannot copy snapshot vm/{vmid}/{name} of {self.label} into "
                                   f"the cache {self.path}; check its free space and "
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

    def remove(self, record):
        if record.protected or os.path.exists(os.path.join(record.path, PROTECTED)) \
                or self.bucket.head(snapshot_key(self.path, record.path) + PROTECTED):
            raise StorageError(f"backup {record.id} is protected and is not removed")
        self.inside(record.path)
        self.delete_snapshot_keys(snapshot_key(self.path, record.path))
        super().remove(record)

    def remove_stale(self, vmid):
        """Also the keys of uploads a killed run left (a snapshot without manifest)."""
        removed = super().remove_stale(vmid)
        for name, files in self.remote_snapshots(vmid).items():
            if MANIFEST not in files:
                self.bucket.delete(f"vm/{int(vmid)}/{name}/{file_name}" for file_name in files)
                removed.append(f"{name} (an incomplete upload in {self.bucket.label})")
        return removed

    def set_protected(self, record, protected):
        key = snapshot_key(self.path, record.path) + PROTECTED
        if protected:
            self.bucket.put(key, b'')
        else:
            self.bucket.delete([key])
        super().set_protected(record, protected)

    def _upload_manifest(self, record):
        with open(os.path.join(record.path, MANIFEST), 'rb') as handle:
            self.bucket.put(snapshot_key(self.path, record.path) + MANIFEST, handle.read())

    def update_manifest(self, record, **changes):
        super().update_manifest(record, **changes)
        self._upload_manifest(record)

    def free_bytes(self):
        return sys.maxsize  # a bucket has no size a client can ask for

    # -- leases: backups and garbage collections across nodes -----------------------------------
    @contextmanager
    def writer(self, wait_seconds=180 * 60):
        """A backup's lease; waits while a garbage collection sweeps (up to ``wait_seconds``)."""
        with super().writer(), _Lease(self.bucket, 'writer') as lease:
            deadline = time.monotonic() + wait_seconds
            waited_since = seen = None
            while True:
                collecting = self._live_leases('gc', lease.server_time())
                if not collecting:
                    break
                waited_since, seen = waited_since or time.monotonic(), collecting
                if time.monotonic() >= deadline:
                    raise StorageError(
                        f"a garbage collection of {self.label} is running "
                        f"({_describe(collecting)}) and did not end within "
                        f"{wait_seconds / 60:g} min; wait for it or raise lockwait")
                time.sleep(GC_WAIT_POLL)
            if waited_since is not None:
                report_wait(f"waited {time.monotonic() - waited_since:.1f} s for a garbage "
                            f"collection of {self.label} ({_describe(seen)})")
            yield

    @contextmanager
    def collecting_garbage(self, check_mode=False):
        """Held by a garbage collection: ``(server time now, None)`` for its cutoff; refuses while
        a backup writes anywhere. A GC that ran writes a new generation for the caches."""
        if check_mode:
            yield time.time(), None
            return
        with _Lease(self.bucket, 'gc') as lease:
            now = lease.server_time()
            writing = self._live_leases('writer', now)
            if writing:
                raise StorageError(
                    f"garbage collection of {self.label} does not sweep while backups write "
                    f"into it ({_describe(writing)}); run it again when they have finished")
            try:
                yield now, None
            finally:
                self.bucket.put(GC_GENERATION, uuid.uuid4().hex.encode())

    def _live_leases(self, kind, now):
        """The leases of ``kind`` that are live: refreshed within LEASE_TTL, and not of a run on
        this node that has ended (those are removed), each with its ``expires`` (epoch)."""
        live, ended = [], []
        for key, _size, _etag, modified in self.bucket.objects(f"{LEASES}{kind}-"):
            if modified < now - LEASE_TTL:
                continue
            try:
                lease = json.loads(self.bucket.get(key) or b'{}')
            except ValueError:
                lease = {}
            if _ended_here(key, lease):
                ended.append(key)
                continue
            live.append(dict(lease, expires=modified + LEASE_TTL))
        if ended:
            try:
                self.bucket.delete(ended)
            except GuestvaultError:
                pass  # ignored all the same; the next look tries again
        return live


# Keys of the leases this process holds now: a lease naming this process that is not here was
# released while its delete failed (an S3 outage), and is stale.
_HELD = set()


def _process_start(pid):
    """When process ``pid`` started (clock ticks since boot), or None if there is no such
    process: with the pid it names one process, as a pid is reused and its start time is not."""
    try:
        with open(f"/proc/{int(pid)}/stat", 'rb') as handle:
            return int(handle.read().rsplit(b')', 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _ended_here(key, lease):
    """Whether ``lease`` belongs to a run on this node that has ended: its process is gone (or
    its pid names another process now), or it is this process and no longer holds the lease."""
    pid = lease.get('pid')
    if lease.get('node') != socket.gethostname() or not isinstance(pid, int):
        return False
    started = _process_start(pid)
    if started is None or lease.get('pid_start', started) != started:
        return True
    return pid == os.getpid() and key not in _HELD


class _Lease:
    """An object ``.leases/<kind>-<id>`` naming its holder, refreshed on a thread until released."""

    def __init__(self, bucket, kind):
        self.bucket = bucket
        self.key = f"{LEASES}{kind}-{uuid.uuid4().hex}"
        self.body = json.dumps({'kind': kind, 'node': socket.gethostname(),
                                'pid': os.getpid(), 'pid_start': _process_start(os.getpid()),
                                'started': time.time()}).encode()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def __enter__(self):
        self.bucket.put(self.key, self.body)
        _HELD.add(self.key)
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name='guestvault-lease')
        self._thread.start()
        return self

    def _refresh(self):
        while not self._stop.wait(LEASE_REFRESH):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.bucket.put(self.key, self.body)
                except GuestvaultError:
                    pass  # retried next minute; a lease lapses only after LEASE_TTL

    def server_time(self):
        """The bucket's clock (the lease's own modification time), so nodes' clocks never
        decide whether a lease is live."""
        found = self.bucket.head(self.key)
        return found['modified'] if found else time.time()

    def __exit__(self, *exc_info):
        self._stop.set()
        # A refresh in flight ends before the delete, so it cannot put the lease back after it.
        with self._lock:
            _HELD.discard(self.key)
            try:
                self.bucket.delete([self.key])
            except GuestvaultError:
                pass  # S3 is failing: the lease is stale now (see _ended_here), and lapses
        if self._thread is not None:
            self._thread.join(timeout=5)


def _describe(leases):
    shown = [f"node {lease.get('node', '?')} pid {lease.get('pid', '?')}, "
             f"{lease.get('kind', 'lease')} lease until "
             f"{format_time(datetime.fromtimestamp(lease['expires'], timezone.utc))} "
             "unless renewed" for lease in leases[:3]]
    more = f" and {len(leases) - 3} more" if len(leases) > 3 else ''
    return '; '.join(shown) + more


def _md5(path):
    try:
        with open(path, 'rb') as handle:
            return hashlib.md5(handle.read()).hexdigest()
    except OSError:
        return None
