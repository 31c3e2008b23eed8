"""The dynamic index (``.didx``) of a file archive, as Proxmox Backup Server writes it
(dynamic_index.rs).

A 4096-byte header (``file_formats``: magic, uuid, ctime, index checksum, zeroed reserved bytes),
then one 40-byte entry per chunk: the offset in the archive where the chunk *ends* (u64,
little-endian) and its 32-byte digest. Chunks have any size (a content-defined chunker cuts them),
so a chunk's start is the previous entry's end, the first starting at 0; the archive's size is the
last end. The index checksum is SHA-256 over the entries as they lie in the file
(``end0 || digest0 || end1 || digest1 || ...``); the manifest records it, with the archive size,
as the file's ``csum`` and ``size``. An archive may be empty (no entries).

PBS's reader refuses a file shorter than the header, of another magic, or whose entries are not
whole 40-byte records; so does this one, and also ends that go backwards or repeat (PBS's chunker
never writes an empty chunk, so such a file is damaged).
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
import uuid as uuid_module

from ..errors import CorruptData, StorageError
from ..storage.files import write_file_hidden
from .file_formats import (DIGEST_SIZE, DYNAMIC_INDEX_ENTRY_SIZE, DYNAMIC_INDEX_HEADER,
                           DYNAMIC_INDEX_MAGIC, INDEX_HEADER_SIZE, describe_magic)

_END = struct.Struct('<Q')


class DynamicIndex:
    """A dynamic index in memory: the header's fields and the raw entries."""

    __slots__ = ('entries', 'uuid', 'ctime', 'index_csum')

    def __init__(self, entries, uuid, ctime, index_csum=None):
        self.entries = bytes(entries)
        self.uuid = bytes(uuid)
        self.ctime = ctime
        self.index_csum = self.compute_csum() if index_csum is None else bytes(index_csum)

    def __repr__(self):
        return f"DynamicIndex(size={self.size}, chunks={self.count})"

    @property
    def count(self):
        return len(self.entries) // DYNAMIC_INDEX_ENTRY_SIZE

    def end(self, position):
        if not 0 <= position < self.count:
            raise IndexError(f"chunk {position} of {self.count}")
        return _END.unpack_from(self.entries, position * DYNAMIC_INDEX_ENTRY_SIZE)[0]

    def digest(self, position):
        if not 0 <= position < self.count:
            raise IndexError(f"chunk {position} of {self.count}")
        start = position * DYNAMIC_INDEX_ENTRY_SIZE + _END.size
        return self.entries[start:start + DIGEST_SIZE]

    @property
    def size(self):
        """The archive's size: where the last chunk ends (0 for an empty archive)."""
        return self.end(self.count - 1) if self.count else 0

    def __iter__(self):
        """``(position, start offset, length, digest)`` for every chunk, in order."""
        start = 0
        for position in range(self.count):
            end = self.end(position)
            yield position, start, end - start, self.digest(position)
            start = end

    def distinct_digests(self):
        """The set of digests the index names (each chunk once, however often it repeats)."""
        return {self.digest(position) for position in range(self.count)}

    def chunk_range(self, position):
        """``(start, end)`` of chunk ``position`` in the archive."""
        end = self.end(position)
        return (self.end(position - 1) if position else 0), end

    def chunk_at(self, offset):
        """``(position, offset within the chunk)`` of an archive offset: a binary search over
        the ends, as PBS's ``binary_search``."""
        if not 0 <= offset < self.size:
            raise IndexError(f"offset {offset} outside the archive of {self.size} bytes")
        low, high = 0, self.count - 1
        while low < high:               # the first chunk that ends after ``offset``
            middle = (low + high) // 2
            if self.end(middle) <= offset:
                low = middle + 1
            else:
                high = middle
        return low, offset - self.chunk_range(low)[0]

    def compute_csum(self):
        """The index checksum: SHA-256 over the entries (end offsets and digests)."""
        return hashlib.sha256(self.entries).digest()

    def encode(self):
        """The file's bytes."""
        return DYNAMIC_INDEX_HEADER.pack(DYNAMIC_INDEX_MAGIC, self.uuid, self.ctime,
                                         self.index_csum) + self.entries


def parse_dynamic_index(raw, name='dynamic index', check_csum=True):
    """A ``DynamicIndex`` from a file's bytes; ``CorruptData`` naming what is wrong.

    ``check_csum`` compares the header's index checksum with the entries (PBS writes it on
    close; its verify compares the entries with the manifest's csum instead)."""
    if len(raw) < INDEX_HEADER_SIZE:
        raise CorruptData(f"{name}: {len(raw)} bytes, less than the {INDEX_HEADER_SIZE}-byte "
                          "header of a dynamic index; the file is truncated")
    magic, uuid, ctime, index_csum = DYNAMIC_INDEX_HEADER.unpack_from(raw)
    if magic != DYNAMIC_INDEX_MAGIC:
        known = describe_magic(magic)
        what = f"the magic of a {known}" if known else f"an unknown magic ({magic.hex()})"
        raise CorruptData(f"{name}: {what}, not of a dynamic index")
    found = len(raw) - INDEX_HEADER_SIZE
    if found % DYNAMIC_INDEX_ENTRY_SIZE:
        raise CorruptData(f"{name}: {found} bytes of entries are not whole "
                          f"{DYNAMIC_INDEX_ENTRY_SIZE}-byte entries; the file is truncated or "
                          "has bytes appended")
    index = DynamicIndex(raw[INDEX_HEADER_SIZE:], uuid, ctime, index_csum)
    previous = 0
    for position in range(index.count):
        end = index.end(position)
        if end <= previous:
            raise CorruptData(f"{name}: chunk {position} ends at {end}, not after the previous "
                              f"end {previous}; the index is damaged")
        previous = end
    if check_csum and index.compute_csum() != index.index_csum:
        raise CorruptData(f"{name}: the index checksum in the header does not match the entries")
    return index


def read_dynamic_index(path, check_csum=True):
    try:
        with open(path, 'rb') as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise StorageError(f"the dynamic index {path} is missing") from None
    return parse_dynamic_index(raw, str(path), check_csum)


class DynamicIndexWriter:
    """Build a dynamic index chunk by chunk, in archive order, then write it in one piece
    (hidden, fsynced, renamed), so a half-written index never exists under its name."""

    def __init__(self, path, uuid=None, ctime=None):
        self.path = path
        self.uuid = uuid_module.uuid4().bytes if uuid is None else bytes(uuid)
        self.ctime = int(time.time()) if ctime is None else ctime
        self._entries = bytearray()
        self._end = 0
        self.index_csum = None

    def add_chunk(self, end, digest):
        """Append the chunk that ends at archive offset ``end``."""
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest has {DIGEST_SIZE} bytes, not {len(digest)}")
        if end <= self._end:
            raise ValueError(f"a chunk of {self.path} ends at {end}, not after the previous "
                             f"end {self._end}")
        self._entries += _END.pack(end) + bytes(digest)
        self._end = end

    @property
    def size(self):
        return self._end

    def index(self):
        return DynamicIndex(self._entries, self.uuid, self.ctime)

    def close(self, durable=True):
        """Write the file; returns the index checksum (the manifest's csum)."""
        index = self.index()
        write_file_hidden(os.fspath(self.path), index.encode(), durable=durable)
        self.index_csum = index.index_csum
        return index.index_csum
