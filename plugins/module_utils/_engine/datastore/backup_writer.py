"""Back up one disk into a datastore: read its chunks, store the new ones, write its fixed index.

``write_disk_index`` is the whole pipeline for one disk:

1. Classify every 4 MiB chunk of the source. A full backup reads the chunks that intersect data
   (the source's ``extents``); a chunk that is all hole takes the zero chunk's digest without a
   read. An incremental (a ``previous`` index of the same geometry and an incremental source)
   reads only the chunks its ``dirty_extents`` touch; every other chunk takes the previous
   digest once ``touch_if_present`` proves that chunk is in the store and not renamed ``.bad``
   (the touch also keeps it through a garbage collection running meanwhile) - a chunk that is
   not there is read from the source instead, which is the whole point in time.
2. On ``workers`` threads, each with its own ``source.reader()`` and compressor: read (under the
   ``bwlimit`` token bucket), detect all-zero data (a memcmp), hash, and store the chunk unless the
   store has it (``touch_if_present``, again a touch): encode (zstd 1 when smaller, AES-256-GCM
   with a key) and ``insert(durable=False)``.
3. One ``syncfs`` of the store makes every new chunk durable, *then* the index is written under
   a hidden name, fsynced and renamed: an index never names a chunk a power cut could lose.

The zero chunk (keyed when encrypted; a short last chunk has a zero chunk of its own length) is
stored once per length used. Nothing is written to the index path until every chunk is stored; a
failure leaves at most orphan chunks, which garbage collection removes after its grace.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

from ..errors import BackupFailed
from .blob import encode_blob, new_compressor
from .crypt import chunk_digest
from .file_formats import DEFAULT_CHUNK_SIZE
from .fixed_index import FixedIndexWriter
from .workers import RateLimiter, run_parallel


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
    limiter = RateLimiter(bwlimit)
    known = set()

    @contextmanager
    def setup():
        with source.reader() as reader:
            into = getattr(reader, 'pread_into', None)
            yield (reader, into, bytearray(chunk_size) if into else None,
                   new_compressor() if compress else None)

    def work(state, position):
        reader, into, buffer, compressor = state
        offset = position * chunk_size
        length = length_of(position)
        limiter.take(length)
        if into is not None:
            view = memoryview(buffer)[:length] if length != chunk_size else buffer
            into(view, offset)
            data_read = buffer if length == chunk_size else bytes(view)
        else:
            data_read = reader.pread(length, offset)
            if len(data_read) != length:
                raise BackupFailed(f"{what}: {len(data_read)} bytes read at offset {offset}, "
                                   f"not {length}")
        new = 0
        stored = 0
        if data_read == zero.zeros(length):
            digest = zero.use(length)
            kind = 'zero_chunks'
        else:
            kind = None
            digest = chunk_digest(data_read, crypt)
            with lock:                       # one worker stores a chunk that repeats
                claimed = digest in known
                known.add(digest)
            if not claimed and not chunks.touch_if_present(digest):
                blob = encode_blob(data_read, crypt, compress, compressor)
                duplicate, stored = chunks.insert(digest, blob, durable=False)
                new = 0 if duplicate else 1
        writer.add_digest(position, digest)
        with lock:
            stats['read_chunks'] += 1
            stats['read_bytes'] += length
            if kind:
                stats[kind] += 1
            if new:
                stats['new_chunks'] += 1
                stats['new_bytes'] += stored
            report(length)

    run_parallel(to_read, workers, work, setup)
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
