"""A datastore snapshot's disks as read-only block exports: what restore/nbd_server.py serves.

Every read is served from the chunks the index names (datastore/index.py), each checked (CRC, decryption,
digest) before a byte of it is returned; the zero chunk is never read. An export offers what
the NBD server asks of any export (``name``, ``size``, ``read``, ``keep_chunks``,
``first_data_offset``, ``close``), ``extents`` (where its zero chunks are) and ``cached``
(whether a read returns at once); the Datastore Format makes them in ``open_block_exports``.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

from ..errors import GuestvaultError
from .image_restore import chunk_name, load_chunk, zero_digests

# Decoded chunks kept (the reads of one chunk come as several requests: QEMU's stream asks for
# 512 KiB at a time), and chunks decoded ahead of a sequential reader: at most
# (CACHED_CHUNKS + READ_AHEAD + one per concurrent reader) decoded chunks in memory per export.
CACHED_CHUNKS = 8
READ_AHEAD = 2


class SnapshotExport:
    """One disk of a snapshot, readable at any offset, chunk by checked chunk.

    A read or an ``extents`` query that goes on where the previous chunk was read or skipped (a
    copy, e.g. QEMU's block-stream, which asks where the data is, then reads it, one piece at a
    time) starts decoding the next ``READ_AHEAD`` chunks of data from there, however many zero
    chunks lie between, on ``READ_AHEAD`` threads: their reads, checks and decompression overlap
    with the copy's work instead of waiting in front of it, also right after a long hole, which
    a copy skips without reading. A chunk that fails while decoded ahead is dropped: the read
    that needs it decodes it again and gets that error itself."""

    def __init__(self, name, index, chunks, crypt, what):
        self.name = name
        self.index = index
        self.chunks = chunks
        self.crypt = crypt
        self.what = what
        self.size = index.size
        self._zeros = zero_digests(index, crypt)
        # the positions of the chunks with data, in order: where a read ahead looks
        self._data = [position for position in range(index.count) if not self._is_zero(position)]
        self._cache = OrderedDict()     # position -> decoded data, least recently used first
        self._loading = {}              # position -> Event set when its decoding ended
        self._ahead = 0                 # decodings ahead running
        # on threads that stay, each reusing its read buffer (a new thread allocated and
        # faulted in one per chunk)
        self._decoders = ThreadPoolExecutor(READ_AHEAD, f'read-ahead-{name}')
        self._lock = threading.Lock()

    def _is_zero(self, position):
        start, end = self.index.chunk_range(position)
        return self._zeros.get(self.index.digest(position)) == end - start

    def _load(self, position):
        """The checked data of one chunk, into the cache."""
        digest = self.index.digest(position)
        offset, end = self.index.chunk_range(position)
        length = end - offset
        if self._zeros.get(digest) == length:
            data = bytes(length)
        else:
            data = bytes(load_chunk(self.chunks, digest, self.crypt,
                                    chunk_name(self.what, offset, digest), length))
        with self._lock:
            self._cache[position] = data
            while len(self._cache) > CACHED_CHUNKS:
                self._cache.popitem(last=False)
        return data

    def _chunk(self, position):
        while True:
            with self._lock:
                data = self._cache.get(position)
                if data is not None:
                    self._cache.move_to_end(position)
                    return data
                loading = self._loading.get(position)
                if loading is None:     # nobody decodes it: this read does
                    loading = self._loading[position] = threading.Event()
                    break
            # Decoded by another read or ahead: look again once done (when that failed or the
            # chunk already left the cache, this read decodes it itself)
            loading.wait()
        try:
            return self._load(position)
        finally:
            self._loaded(position, loading)

    def _loaded(self, position, loading):
        with self._lock:
            del self._loading[position]
        loading.set()

    def _read_ahead(self, position):
        """Start decoding the next ``READ_AHEAD`` chunks of data from ``position`` on (zero
        chunks skipped) that are neither cached nor being decoded, when the reader looks
        sequential: the chunk before ``position`` is cached, or is a zero chunk (which a copy
        skips)."""
        with self._lock:
            sequential = position - 1 in self._cache
        if not sequential and not (position > 0 and self._is_zero(position - 1)):
            return
        first = bisect.bisect_left(self._data, position)
        # (``position`` itself first, when it has data: a copy that asked where it is reads it next)
        for ahead in self._data[first:first + 1 + READ_AHEAD]:
            with self._lock:
                if ahead in self._cache or ahead in self._loading or self._ahead >= READ_AHEAD:
                    continue
                loading = self._loading[ahead] = threading.Event()
                self._ahead += 1
            try:
                self._decoders.submit(self._decode_ahead, ahead, loading)
            except RuntimeError:        # closed (its server ended): the read decodes it
                with self._lock:
                    self._ahead -= 1
                self._loaded(ahead, loading)
                return

    def _decode_ahead(self, position, loading):
        try:
            self._load(position)
        except GuestvaultError:
            pass        # dropped: the read that needs this chunk decodes it and reports it
        finally:
            with self._lock:
                self._ahead -= 1
            self._loaded(position, loading)

    def read(self, offset, length):
        """The bytes at ``offset``: within one chunk a view of its decoded data (not copied)."""
        parts = []
        while length > 0:
            position, inside = self.index.chunk_at(offset)
            self._read_ahead(position)
            piece = memoryview(self._chunk(position))[inside:inside + length]
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return parts[0] if len(parts) == 1 else b''.join(parts)

    def cached(self, offset, length):
        """Whether every chunk of ``length`` bytes from ``offset`` is decoded (or a zero
        chunk), so that a read of them returns at once."""
        end = offset + length
        while offset < end:
            position, _inside = self.index.chunk_at(offset)
            with self._lock:
                if position not in self._cache and not self._is_zero(position):
                    return False
            offset = self.index.chunk_range(position)[1]
        return True

    def extents(self, offset, length):
        """``(length, zero)`` runs covering ``length`` bytes from ``offset``, one per chunk:
        zero where the index names the zero chunk (a hole or zeroes when backed up), which the
        NBD server reports as a hole and never reads. A copy asks this before it reads (or skips)
        each piece: the chunks of data it will read next start decoding (``_read_ahead``)."""
        if length > 0:
            self._read_ahead(self.index.chunk_at(offset)[0])
        runs = []
        while length > 0:
            position, inside = self.index.chunk_at(offset)
            start, end = self.index.chunk_range(position)
            size = min(end - start - inside, length)
            runs.append((size, self._is_zero(position)))
            offset += size
            length -= size
        return runs

    def close(self):
        """Let the read-ahead threads go once the decodings started end (not cancelled: a read
        may wait for one); a read after this decodes what it needs itself."""
        self._decoders.shutdown(wait=False)

    def keep_chunks(self):
        """Touch every chunk the export reads, as garbage collection's mark does. Call it once
        registered as a writer (``storage.writer()``): every later collection's cutoff is then
        at most that start and these touches come after it, so no chunk is swept while served,
        even if the snapshot's index goes. (On S3 this touches the cache's markers only: a
        collection there does not sweep at all while a writer holds its lease.)"""
        for digest in self.index.distinct_digests():
            if digest not in self._zeros:
                self.chunks.touch(digest, must_exist=False)

    def first_data_offset(self):
        """The offset of the first chunk that is not zero, or None."""
        return self.index.chunk_range(self._data[0])[0] if self._data else None
