"""A datastore snapshot's disks as read-only block exports: what restore/nbd_server.py serves.

Every read is served from the chunks the index names (datastore/index.py), each checked (CRC, decryption,
digest) before a byte of it is returned; the zero chunk is never read. An export offers what
the NBD server asks of any export (``name``, ``size``, ``read``, ``keep_chunks``,
``first_data_offset``) and ``extents`` (where its zero chunks are); the Datastore Format
makes them in ``open_block_exports``.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from .image_restore import chunk_name, load_chunk, zero_digests

CACHED_CHUNKS = 8


class SnapshotExport:
    """One disk of a snapshot, readable at any offset, chunk by checked chunk."""

    def __init__(self, name, index, chunks, crypt, what):
        self.name = name
        self.index = index
        self.chunks = chunks
        self.crypt = crypt
        self.what = what
        self.size = index.size
        self._zeros = zero_digests(index, crypt)
        self._cache = OrderedDict()
        self._lock = threading.Lock()

    def _chunk(self, position):
        with self._lock:
            data = self._cache.get(position)
            if data is not None:
                self._cache.move_to_end(position)
                return data
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

    def read(self, offset, length):
        parts = []
        while length > 0:
            position, inside = self.index.chunk_at(offset)
            data = self._chunk(position)
            piece = data[inside:inside + length]
            parts.append(piece)
            offset += len(piece)
            length -= len(piece)
        return b''.join(parts)

    def extents(self, offset, length):
        """``(length, zero)`` runs covering ``length`` bytes from ``offset``, one per chunk:
        zero where the index names the zero chunk (a hole or zeroes when backed up), which the
        NBD server reports as a hole and never reads."""
        runs = []
        while length > 0:
            position, inside = self.index.chunk_at(offset)
            start, end = self.index.chunk_range(position)
            size = min(end - start - inside, length)
            runs.append((size, self._zeros.get(self.index.digest(position)) == end - start))
            offset += size
            length -= size
        return runs

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
        for _position, offset, length, digest in self.index:
            if self._zeros.get(digest) != length:
                return offset
        return None
