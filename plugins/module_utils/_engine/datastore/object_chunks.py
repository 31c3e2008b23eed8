"""The chunk store of a datastore on an object store (a ``Backend``: S3, or the memory double of
the unit tests): each chunk an object ``.chunks/XXXX/<digest hex>``.

The objects are the same DataBlobs a local store keeps in files. What differs:
- **inserting** is a conditional put (``put_new``, S3's ``If-None-Match: *``): the first writer
  of a chunk creates it, any other (another worker, another node) learns it exists; nothing is
  overwritten, so two nodes backing up clones of one image store the shared chunks once. A
  backup's inserts (``durable=False``) go to an upload pool of their own (``UPLOAD_WORKERS``
  requests in flight, a bounded queue), so uploads overlap however few threads the pipeline
  runs; ``sync()``, which comes before any index is written, waits for every upload and raises
  the first error, and a chunk's marker is made only once its upload has answered;
- **what this node knows is stored** is kept in the local cache as an empty marker file per
  chunk (``<cache>/.chunks/XXXX/<digest>``), so an unchanged chunk costs no request at all. The
  markers are a cache: a GC on any node writes a new ``.gc-generation``, and a node that sees a
  generation its markers were not made under drops them before it backs up. A cache that starts
  empty (new, or just dropped) is filled from one listing of ``.chunks/`` (a request per 1000
  chunks), and for that backup a chunk with no marker is taken as new without a HEAD (the
  conditional put still refuses one another node stored since the listing); a cache kept from
  earlier backups asks with one HEAD before it uploads a chunk it has no marker of, which another
  node may have stored since. A backup checks
  every chunk its index names with one HEAD each before it keeps the snapshot, and drops the
  markers of any that is gone, except of the chunks this store created itself during the backup
  (a GC cannot have swept those: see ``missing``);
- **garbage collection** cannot touch an object's time without copying it, so it marks in
  memory: the digests every index names. The sweep lists ``.chunks/`` and deletes, with
  multi-object deletes, each chunk no index names whose upload is older than the cutoff; it runs
  only while no backup writes anywhere (the storage's leases);
- **verify** moves a corrupt chunk to ``<digest>.<n>.bad`` (a server-side copy, then a delete).

It is composed over its backend and shares the layout helpers of ``chunk_store`` (the local
store), not its class: the two differ in every method that touches a chunk.
"""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptData, StorageError
from ..storage.files import touch_atime
from .chunk_store import CHUNK_DIR, MAX_BAD_COPIES, chunk_relpath, digest_hex, is_chunk_name

GC_GENERATION = '.gc-generation'    # in the backend: rewritten by every GC that ran
GENERATION_FILE = '.generation'
CHECKED_FILE = '.conditional-puts-checked'
# Requests in flight at once (HEADs, GETs): S3 is latency-bound, not CPU-bound.
PARALLEL_REQUESTS = 16
# Backup and restore workers: each waits on a request about as long as it computes.
REQUEST_WORKERS = 8
# A backup's uploads in flight at once, and how many more may wait in the queue: the queue holds
# their blobs (up to 4 MiB each), so a full pool bounds the memory a backup's uploads take.
UPLOAD_WORKERS = 16
UPLOAD_QUEUE = 16


def read_gc_generation(backend):
    """What ``.gc-generation`` holds (None before the first GC)."""
    data = backend.get(GC_GENERATION)
    return data.decode('ascii', 'replace').strip() if data is not None else None


class ObjectChunkStore:
    """Chunks in ``backend``; markers of stored chunks under the local cache ``cache_dir``."""

    request_workers = REQUEST_WORKERS

    def __init__(self, backend, cache_dir):
        self.base = os.fspath(cache_dir)
        self.chunk_dir = os.path.join(self.base, CHUNK_DIR)
        self.backend = backend
        self._uploads = _UploadPool(self._upload)
        # the chunks (hex) this store created since prepare(): uploaded after any GC's cutoff
        self._created = set()
        # whether prepare() filled the markers from a listing of the bucket: then a chunk with
        # no marker was not stored when this backup began, and needs no HEAD
        self._listed = False

    def __repr__(self):
        return f"ObjectChunkStore({self.backend.label!r})"

    @property
    def where(self):
        return f"{self.backend.label} ({CHUNK_DIR}/)"

    @staticmethod
    def key(digest):
        return chunk_relpath(digest).replace(os.sep, '/')

    def chunk_path(self, digest):
        """The marker of a chunk in the cache."""
        return os.path.join(self.base, chunk_relpath(digest))

    # -- the store -----------------------------------------------------------------------------
    def exists(self):
        return True   # the bucket is checked when the storage opens

    def create(self):
        os.makedirs(self.chunk_dir, mode=0o700, exist_ok=True)

    def check(self):
        self.backend.check()

    def prepare(self):
        """Before a backup: the endpoint honours conditional puts (checked once per cache), and
        the markers are dropped when a GC ran since they were made (it may have removed chunks)."""
        self.create()
        checked = os.path.join(self.chunk_dir, CHECKED_FILE)
        if not os.path.exists(checked):
            self._check_conditional_puts()
            open(checked, 'w').close()
        self._created = set()
        # a backup that failed before its sync() leaves its uploads' outcome behind: this
        # backup must neither wait for them at its own sync() nor inherit their error
        self._uploads.forget()
        generation = read_gc_generation(self.backend) or ''
        path = os.path.join(self.chunk_dir, GENERATION_FILE)
        try:
            with open(path) as handle:
                known = handle.read().strip()
        except FileNotFoundError:
            known = None
        self._listed = False
        if known == generation:
            return
        if known is not None:
            for name in os.listdir(self.chunk_dir):
                if name not in (GENERATION_FILE, CHECKED_FILE):
                    shutil.rmtree(os.path.join(self.chunk_dir, name), ignore_errors=True)
        self._mark_listed()
        with open(path, 'w') as handle:
            handle.write(generation + '\n')
        self._listed = True

    def _mark_listed(self):
        """A marker for every chunk the bucket lists (one request per 1000 keys): an empty
        cache would otherwise send a HEAD for each chunk a backup reads, on its critical path.
        Chunks moved aside (``.bad``) are no chunks."""
        prefix = CHUNK_DIR + '/'
        for key, _size, _etag, _modified in self.backend.objects(prefix):
            name = key.rsplit('/', 1)[-1]
            if is_chunk_name(name) and '.' not in name:
                self._mark(bytes.fromhex(name))

    def _check_conditional_puts(self):
        """Without ``If-None-Match: *`` two nodes storing one chunk would overwrite each other
        (a damaged upload could replace a good chunk that snapshots already name): refuse
        an endpoint that ignores it."""
        key = f".leases/probe-{uuid.uuid4().hex}"
        try:
            first = self.backend.put_new(key, b'probe')
            second = self.backend.put_new(key, b'probe')
        finally:
            self.backend.delete([key])
        if not first or second:
            raise StorageError(
                f"{self.backend.label} does not refuse a second conditional put "
                "(If-None-Match: *) of one key; guestvault needs an S3 endpoint that supports "
                "conditional writes (AWS S3, a recent MinIO, Ceph RGW or SeaweedFS)")

    def sync(self):
        """Wait for every upload ``insert(durable=False)`` queued (an object is durable when its
        put has answered); the first upload error is raised here, before an index names it."""
        self._uploads.wait()

    def touch(self, digest, must_exist=True):
        """Touch a chunk's marker (a live restore's ``keep_chunks``: a GC on S3 does not sweep
        while a writer holds its lease, so only the cache's marker is touched)."""
        if touch_atime(self.chunk_path(digest)):
            return True
        if must_exist:
            raise CorruptData(f"chunk {digest_hex(digest)} is missing from {self.where}")
        return False

    # -- markers -------------------------------------------------------------------------------
    def _mark(self, digest):
        path = self.chunk_path(digest)
        try:
            open(path, 'a').close()
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            open(path, 'a').close()

    def _unmark(self, digest):
        self._created.discard(digest_hex(digest))    # moved aside or swept: missing() must look again
        try:
            os.unlink(self.chunk_path(digest))
        except FileNotFoundError:
            pass

    def touch_if_present(self, digest):
        """Whether the bucket holds the chunk: known here (a marker); else, unless the markers
        were listed at ``prepare``, one HEAD, which is cheaper than uploading 4 MiB that another
        node already stored."""
        if os.path.exists(self.chunk_path(digest)):
            return True
        if self._listed:
            return False
        if self.contains(digest):
            self._mark(digest)
            return True
        return False

    def contains(self, digest):
        return self.backend.head(self.key(digest)) is not None

    def missing(self, digests):
        """One HEAD per digest, in parallel; a missing chunk's marker is dropped, so the next
        backup uploads it again. A chunk this store created since ``prepare`` needs none: its
        upload is newer than the cutoff of any GC running now, and no GC starts while the
        backup holds its lease, so none can have swept it."""
        digests = [digest for digest in digests if digest_hex(digest) not in self._created]
        with ThreadPoolExecutor(PARALLEL_REQUESTS, 's3-head') as pool:
            found = list(pool.map(self.contains, digests))
        gone = [digest for digest, present in zip(digests, found) if not present]
        for digest in gone:
            self._unmark(digest)
        return gone

    # -- one chunk -----------------------------------------------------------------------------
    def insert(self, digest, blob, durable=True):
        """``durable=False`` queues the upload and returns at once (``sync`` waits for it): the
        chunk counts as new, since whether another writer stored it in the same instant is known
        only when its put answers."""
        if durable:
            return not self._upload(digest, blob), len(blob)
        # a copy: the caller may reuse its buffer while the upload waits in the queue
        self._uploads.submit(digest, bytes(blob))
        return False, len(blob)

    def _upload(self, digest, blob):
        """Put one chunk (conditionally); marked stored once the put has answered."""
        created = self.backend.put_new(self.key(digest), blob)
        if created:
            self._created.add(digest_hex(digest))
        self._mark(digest)
        return created

    def read(self, digest):
        data = self.backend.get(self.key(digest))
        if data is None:
            raise CorruptData(f"chunk {digest_hex(digest)} is missing from {self.where}")
        return data

    def read_view(self, digest):
        return self.read(digest)

    def mark_bad(self, digest):
        key = self.key(digest)
        if self.backend.head(key) is None:
            return None
        for counter in range(MAX_BAD_COPIES):
            target = f"{key}.{counter}.bad"
            if counter == MAX_BAD_COPIES - 1 or self.backend.head(target) is None:
                break
        self.backend.copy(key, target)
        self.backend.delete([key])
        self._unmark(digest)
        return target

    # -- garbage collection (gc.collect_garbage runs it) --------------------------------------
    def gc_check(self):
        pass  # the bucket was checked when the storage opened

    def gc_mark(self, referenced):
        """An object's time cannot be touched without copying it: the mark stays in memory (the
        referenced digests), and the sweep finds the missing chunks."""
        return None

    def gc_sweep(self, referenced, cutoff, protect_from, check_mode, result, progress):
        """List ``.chunks/`` and delete, with multi-object deletes, each chunk no index names
        whose upload is older than ``cutoff`` (``now`` is the bucket's clock at the start), and
        each ``.bad`` copy no index needs; the chunk names present."""
        present, bad, doomed = set(), [], []
        for key, size, _etag, modified in self.backend.objects(CHUNK_DIR + '/'):
            name = key.rsplit('/', 1)[-1]
            if not is_chunk_name(name):
                continue
            if len(name) > 64:
                bad.append((key, name[:64].lower(), size, modified))
                continue
            name = name.lower()
            present.add(name)
            if name in referenced or modified >= cutoff:
                result['kept_chunks'] += 1
                result['kept_bytes'] += size
                if name in referenced:
                    result['referenced_bytes'] += size
                else:
                    result['pending_chunks'] += 1
                continue
            doomed.append((key, name, size, 'removed_chunks'))
        for key, digest, size, modified in bad:
            if (digest in referenced and digest not in present) or modified >= cutoff:
                result['bad_chunks_kept'] += 1
                continue
            doomed.append((key, None, size, 'bad_chunks_removed'))
        for _key, _name, size, counter in doomed:
            result[counter] += 1
            result['removed_bytes'] += size
        if not check_mode and doomed:
            self.backend.delete(key for key, _n, _s, _c in doomed)
            for _key, name, _size, _counter in doomed:
                if name is not None:
                    self._unmark(name)
        if progress is not None:
            progress('sweep', 1, 1)     # one listing, no prefix directories to count
        return present


class _UploadPool:
    """``upload(digest, blob)`` on UPLOAD_WORKERS threads, at most UPLOAD_QUEUE more waiting
    (``submit`` blocks until one is free). The first error is kept: every later ``submit`` and
    the next ``wait`` raise it, and the uploads still queued are cancelled (against a dead
    endpoint each would wait out its retries; a backup that is failing has no use for them).
    Uploads already running finish; the orphans they leave are a GC's to sweep."""

    def __init__(self, upload):
        self._upload = upload
        self._free = threading.BoundedSemaphore(UPLOAD_WORKERS + UPLOAD_QUEUE)
        self._lock = threading.Lock()
        self._pool = None
        self._futures = []
        self._error = None

    def submit(self, digest, blob):
        self._free.acquire()
        with self._lock:
            if self._error is not None:
                self._free.release()
                raise self._error
            if self._pool is None:
                self._pool = ThreadPoolExecutor(UPLOAD_WORKERS, 's3-upload')
            future = self._pool.submit(self._upload, digest, blob)
            self._futures.append(future)
        future.add_done_callback(self._done)

    def _done(self, future):
        error = None if future.cancelled() else future.exception()
        queued = []
        with self._lock:
            if error is not None and self._error is None:
                self._error = error
            if self._error is not None:
                # every callback after the first error cancels: it runs on its worker thread
                # before that thread takes the next queued upload
                queued = list(self._futures)
        for other in queued:
            other.cancel()              # only those not started yet
        self._free.release()

    def forget(self):
        """Drop what earlier uploads left: queued ones are cancelled, running ones finish on
        their own (their pool's threads end with them), and their error is not kept."""
        with self._lock:
            pool, futures, self._pool, self._futures = self._pool, self._futures, None, []
            self._error = None
        for future in futures:
            future.cancel()
        if pool is not None:
            pool.shutdown(wait=False)

    def wait(self):
        """Return when every upload submitted so far has answered; raise the first error (once:
        the pool is usable again afterwards)."""
        with self._lock:
            pool = self._pool
        if pool is not None:
            # the futures stay listed meanwhile: a failing upload's callback cancels the rest
            pool.shutdown(wait=True)
        with self._lock:
            if self._pool is pool:
                self._pool, self._futures = None, []
            error, self._error = self._error, None
        if error is not None:
            raise error
