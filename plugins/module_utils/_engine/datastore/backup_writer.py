"""Back up one disk into a datastore: read its chunks, store the new ones, write its fixed index.

``write_disk_index`` is the whole pipeline for one disk:

1. Classify every 4 MiB chunk of the source. A full backup reads the chunks that intersect data
   (the source's ``extents``); a chunk that is all hole takes the zero chunk's digest without a
   read. An incremental (a ``previous`` index of the same geometry and an incremental source)
   reads only the chunks its ``dirty_extents`` touch; every other chunk takes the previous
   digest once ``touch_if_present`` proves that chunk is in the store and not renamed ``.bad``
   (the touch also keeps it through a garbage collection running meanwhile) - a chunk that is
   not there is read from the source instead, which is the whole point in time.
2. A reader thread (its own ``source.reader()``) reads under the ``bwlimit`` token bucket and
   keeps ``READ_AHEAD`` chunks in flight; ``workers`` compute threads, each with its own
   compressor, detect all-zero data (a memcmp), hash, and encode the chunk unless the store has it
   (``touch_if_present``, again a touch): zstd 1 when smaller, AES-256-GCM with a key;
   ``workers`` writer threads ``insert(durable=False)`` it. Before, each worker read, computed and
   wrote in turn, and its core idled while it waited on QEMU or the disk (issue 24).
3. One ``syncfs`` of the store makes every new chunk durable, *then* the index is written under
   a hidden name, fsynced and renamed: an index never names a chunk a power cut could lose.

The zero chunk (keyed when encrypted; a short last chunk has a zero chunk of its own length) is
stored once per length used. Nothing is written to the index path until every chunk is stored; a
failure leaves at most orphan chunks, which garbage collection removes after its grace.
"""
from __future__ import annotations

import collections
import queue
import threading
import time

from ..errors import BackupFailed
from .blob import encode_blob, encode_blob_in_place, new_compressor
from .crypt import chunk_digest
from .file_formats import BLOB_HEADER_SIZE, DEFAULT_CHUNK_SIZE
from .fixed_index import FixedIndexWriter
from .workers import RateLimiter, Stages

# Chunks a backup's reader keeps in flight on its connection while the compute threads work.
READ_AHEAD = 2


def chunk_flags(extents, count, chunk_size):
    """A bytearray with 1 for every chunk position that the ``(offset, length)`` ranges touch."""
    flags = bytearray(count)
    for offset, length in extents:
        if length <= 0:
            continue
        first = max(0, offset // chunk_size)
        last = min(count - 1, (offset + length - 1) // chunk_size)
        if last >= first:
            flags[first:last + 1] = b'\x01' * (last - first + 1)
    return flags


class ZeroChunks:
    """The zero chunk of each length a backup needs: its digest, and its blob stored once."""

    def __init__(self, store, crypt, compress):
        self.store = store
        self.crypt = crypt
        self.compress = compress
        self._digests = {}
        self._zeros = {}
        self._stored = set()
        self._lock = threading.Lock()
        self.new_chunks = 0
        self.new_bytes = 0

    def zeros(self, length):
        zeros = self._zeros.get(length)
        if zeros is None:
            zeros = self._zeros[length] = bytes(length)
        return zeros

    def digest(self, length):
        digest = self._digests.get(length)
        if digest is None:
            digest = self._digests[length] = chunk_digest(self.zeros(length), self.crypt)
        return digest

    def use(self, length):
        """The zero chunk's digest, stored first if this backup has not stored it yet."""
        digest = self.digest(length)
        if length in self._stored:
            return digest
        with self._lock:
            if length not in self._stored:
                if not self.store.touch_if_present(digest):
                    blob = encode_blob(self.zeros(length), self.crypt, self.compress)
                    duplicate, stored = self.store.insert(digest, blob, durable=False)
                    if not duplicate:
                        self.new_chunks += 1
                        self.new_bytes += stored
                self._stored.add(length)
        return digest


def _store_chunks(source, positions, chunks, writer, zero, stats, report, lock, *, what,
                  length_of, crypt, compress, workers, limiter, chunk_size):
    """Read, hash and store the chunks at ``positions`` and name them in ``writer``.

    Three kinds of threads, so no core waits on another's I/O: one reader (its own connection)
    keeps ``READ_AHEAD`` chunks in flight where the source can (``start_read``); ``workers``
    compute threads detect zero chunks, hash, dedupe and encode; ``workers`` writers insert
    (one would do for local files, an object store wants its requests in parallel). At most
    ``buffer_count(workers)`` chunk buffers exist, reused; ``stats`` and ``report`` are updated
    under ``lock``. The first error stops all threads and is raised.

    A chunk is read into its buffer after ``BLOB_HEADER_SIZE`` bytes of room, so a chunk stored
    as it is (it does not compress, no key) gets its header in front of it and goes to the store
    from where it was read (``encode_blob_in_place``); its buffer is free once it is written.
    """
    workers = max(1, int(workers or 1))
    stages = Stages()
    free = queue.Queue()
    for _number in range(buffer_count(workers)):
        free.put(bytearray(BLOB_HEADER_SIZE + chunk_size))
    computing = queue.Queue(buffer_count(workers))       # (position, length, buffer)
    writing = queue.Queue(workers)         # (digest, blob, length, its buffer or None) or None
    known = set()

    def done(length, kind=None, stored=None):
        with lock:
            stats['read_chunks'] += 1
            stats['read_bytes'] += length
            if kind:
                stats[kind] += 1
            if stored is not None:
                stats['new_chunks'] += 1
                stats['new_bytes'] += stored
            report(length)

    def read_all():
        with source.reader() as reader:
            start = getattr(reader, 'start_read', None)
            pending = collections.deque()

            def hand_on():
                position, buffer, token = pending.popleft()
                if start is not None:
                    reader.finish_read(token)
                stages.put(computing, (position, length_of(position), buffer))

            for position in positions:
                buffer = stages.get(free)
                length = length_of(position)
                offset = position * chunk_size
                limiter.take(length)
                view = memoryview(buffer)[BLOB_HEADER_SIZE:BLOB_HEADER_SIZE + length]
                if start is not None:
                    pending.append((position, buffer, start(view, offset)))
                    if len(pending) >= READ_AHEAD:
                        hand_on()
                    continue
                _read_now(reader, view, offset, what)
                pending.append((position, buffer, None))
                hand_on()
            while pending:
                hand_on()

    def compute():
        compressor = new_compressor() if compress else None
        while True:
            item = stages.get(computing)
            if item is None:
                return
            position, length, buffer = item
            blob, in_place = None, False
            # startswith: a memcmp, without the copy a slice would make
            if buffer.startswith(zero.zeros(length), BLOB_HEADER_SIZE):
                digest, kind = zero.use(length), 'zero_chunks'
            else:
                data = memoryview(buffer)[BLOB_HEADER_SIZE:BLOB_HEADER_SIZE + length]
                digest, kind = chunk_digest(data, crypt), None
                with lock:                       # one thread stores a chunk that repeats
                    claimed = digest in known
                    known.add(digest)
                if not claimed and not chunks.touch_if_present(digest):
                    blob, in_place = encode_blob_in_place(buffer, length, crypt, compress,
                                                          compressor)
            if not in_place:
                free.put(buffer)
            writer.add_digest(position, digest)
            if blob is None:
                done(length, kind)
            else:
                stages.put(writing, (digest, blob, length, buffer if in_place else None))

    def write_all():
        while True:
            item = stages.get(writing)
            if item is None:
                return
            digest, blob, length, buffer = item
            duplicate, stored = chunks.insert(digest, blob, durable=False)
            if buffer is not None:
                free.put(buffer)
            done(length, stored=None if duplicate else stored)

    # each stage's threads end after the last item: start_many hands the next stage its ends
    stages.start_many('chunk-reader', 1, read_all, then=(computing, workers))
    stages.start_many('chunk-compute', workers, compute, then=(writing, workers))
    stages.start_many('chunk-writer', workers, write_all)
    stages.join()


def buffer_count(workers):
    """Chunk buffers of a backup: the reader's in flight, one per compute thread, and as many as
    the writers can hold (one each being written, one each queued) with one to spare, so the
    reader goes on while every writer waits on the disk."""
    return READ_AHEAD + 3 * workers + 1


def _read_now(reader, view, offset, what):
    """Fill ``view`` from ``offset`` with a reader that has no ``start_read``."""
    into = getattr(reader, 'pread_into', None)
    if into is not None:
        into(view, offset)
        return
    data = reader.pread(len(view), offset)
    if len(data) != len(view):
        raise BackupFailed(f"{what}: {len(data)} bytes read at offset {offset}, not "
                           f"{len(view)}")
    view[:] = data


def write_disk_index(source, index_path, chunks, *, crypt=None, previous=None, workers=2,
                     compress=True, bwlimit=0, progress=None, what='drive-virtio0',
                     chunk_size=DEFAULT_CHUNK_SIZE):
    """Back up ``source`` into the store ``chunks`` and write its fixed index at ``index_path``.

    ``previous`` (a ``FixedIndex``) makes it an incremental when ``source.incremental`` and the
    geometry match. ``bwlimit`` is in KiB/s of bytes read; ``progress(done_bytes, total_bytes)``
    is called from the worker threads (under a lock) as chunks are done. Returns ``{size, chunks,
    read_chunks, read_bytes, zero_chunks, reused_chunks, new_chunks, new_bytes, csum, duration,
    incremental}``; ``new_bytes`` counts encoded bytes written to the store.
    """
    started = time.monotonic()
    size = int(source.size)
    if size <= 0:
        raise BackupFailed(f"{what}: the source has {size} bytes; nothing to back up")
    if previous is not None:
        chunk_size = previous.chunk_size if previous.size == size else chunk_size
    writer = FixedIndexWriter(index_path, size, chunk_size)
    count = writer.count
    data = chunk_flags(((o, n) for o, n, zero in source.extents() if not zero), count,
                       chunk_size)
    incremental = (previous is not None and getattr(source, 'incremental', False)
                   and previous.size == size and previous.chunk_size == chunk_size)
    zero = ZeroChunks(chunks, crypt, compress)
    stats = {'read_chunks': 0, 'read_bytes': 0, 'zero_chunks': 0, 'reused_chunks': 0,
             'new_chunks': 0, 'new_bytes': 0}
    done = [0]
    lock = threading.Lock()

    def length_of(position):
        return min(chunk_size, size - position * chunk_size)

    def report(amount):
        done[0] += amount
        if progress is not None:
            progress(done[0], size)

    # 1. classify
    to_read = []
    dirty = chunk_flags(source.dirty_extents(), count, chunk_size) if incremental else None
    proven = set()
    for position in range(count):
        length = length_of(position)
        if not data[position]:
            writer.add_digest(position, zero.use(length))
            stats['zero_chunks'] += 1
            done[0] += length
            continue
        if incremental and not dirty[position]:
            digest = previous.digest(position)
            if digest in proven or chunks.touch_if_present(digest):
                proven.add(digest)
                writer.add_digest(position, digest)
                stats['reused_chunks'] += 1
                done[0] += length
                continue
        to_read.append(position)
    if progress is not None:
        progress(done[0], size)

    # 2. read, hash, store
    _store_chunks(source, to_read, chunks, writer, zero, stats, report, lock, what=what,
                  length_of=length_of, crypt=crypt, compress=compress, workers=workers,
                  limiter=RateLimiter(bwlimit), chunk_size=chunk_size)
    stats['new_chunks'] += zero.new_chunks
    stats['new_bytes'] += zero.new_bytes

    # 3. chunks durable, then the index
    try:
        chunks.sync()
    except OSError as exc:
        raise BackupFailed(f"{what}: the chunks written cannot be made durable: "
                           f"{exc.strerror or exc}") from None
    csum = writer.close(durable=True)
    return dict(stats, size=size, chunks=count, csum=csum.hex(), incremental=incremental,
                duration=round(time.monotonic() - started, 3))
