"""The fixed index (``.fidx``) of a disk image, as Proxmox Backup Server writes it (fixed_index.rs).

A 4096-byte header (``file_formats``: magic, uuid, ctime, index checksum, image size, chunk size,
zeroed reserved bytes), then one 32-byte chunk digest per ``chunk_size`` of the image, the last
chunk possibly shorter. There are exactly ``ceil(size / chunk_size)`` digests: PBS refuses a file
of any other length. The index checksum is SHA-256 over the digests as they lie in the file
(``digest0 || digest1 || ...``); the manifest records it, with the image size, as the file's
``csum`` and ``size``.

PBS cannot hold an empty image in a fixed index (it maps the digest area, which must not be
empty), and its offset arithmetic assumes a power-of-two chunk size; both are refused here too.
"""
from __future__ import annotations

import hashlib
import os
import time
import uuid as uuid_module

from ..errors import CorruptData, StorageError
from ..storage.files import write_file_hidden
from .file_formats import (DEFAULT_CHUNK_SIZE, DIGEST_SIZE, FIXED_INDEX_HEADER, FIXED_INDEX_MAGIC,
                           INDEX_HEADER_SIZE, describe_magic)


def chunk_count(size, chunk_size):
    return (size + chunk_size - 1) // chunk_size


def _check_geometry(size, chunk_size, name):
    if chunk_size <= 0 or chunk_size & (chunk_size - 1):
        raise CorruptData(f"{name}: chunk size {chunk_size} is not a power of two")
    if size <= 0:
        raise CorruptData(f"{name}: image size {size}; a fixed index cannot describe an empty "
                          "image")


class FixedIndex:
    """A fixed index in memory: the header's fields and the digests."""

    __slots__ = ('size', 'chunk_size', 'uuid', 'ctime', 'index_csum', 'digests')

    def __init__(self, size, chunk_size, digests, uuid, ctime, index_csum=None):
        self.size = size
        self.chunk_size = chunk_size
        self.digests = bytes(digests)
        self.uuid = bytes(uuid)
        self.ctime = ctime
        self.index_csum = self.compute_csum() if index_csum is None else bytes(index_csum)

    def __repr__(self):
        return (f"FixedIndex(size={self.size}, chunk_size={self.chunk_size}, "
                f"chunks={self.count})")

    @property
    def count(self):
        return len(self.digests) // DIGEST_SIZE

    def digest(self, position):
        if not 0 <= position < self.count:
            raise IndexError(f"chunk {position} of {self.count}")
        start = position * DIGEST_SIZE
        return self.digests[start:start + DIGEST_SIZE]

    def distinct_digests(self):
        """The set of digests the index names (each chunk once, however often it repeats)."""
        return {self.digests[start:start + DIGEST_SIZE]
                for start in range(0, len(self.digests), DIGEST_SIZE)}

    def __iter__(self):
        """``(position, start offset, length, digest)`` for every chunk, in order."""
        for position in range(self.count):
            start = position * self.chunk_size
            yield position, start, min(self.chunk_size, self.size - start), self.digest(position)

    def chunk_range(self, position):
        """``(start, end)`` of chunk ``position`` in the image."""
        start = position * self.chunk_size
        return start, min(start + self.chunk_size, self.size)

    def chunk_at(self, offset):
        """``(position, offset within the chunk)`` of an image offset."""
        if not 0 <= offset < self.size:
            raise IndexError(f"offset {offset} outside the image of {self.size} bytes")
        return divmod(offset, self.chunk_size)

    def compute_csum(self):
        """The index checksum: SHA-256 over the digests."""
        return hashlib.sha256(self.digests).digest()

    def encode(self):
        """The file's bytes."""
        header = FIXED_INDEX_HEADER.pack(FIXED_INDEX_MAGIC, self.uuid, self.ctime,
                                         self.index_csum, self.size, self.chunk_size)
        return header + self.digests


def encode_fixed_index(size, digests, chunk_size=DEFAULT_CHUNK_SIZE, uuid=None, ctime=None):
    """The bytes of a fixed index over ``digests`` (32-byte digests, in order, or their join)."""
    raw = b''.join(digests) if not isinstance(digests, (bytes, bytearray)) else bytes(digests)
    _check_geometry(size, chunk_size, 'fixed index')
    if len(raw) != chunk_count(size, chunk_size) * DIGEST_SIZE:
        raise ValueError(f"{len(raw) // DIGEST_SIZE} digests for {chunk_count(size, chunk_size)} "
                         "chunks")
    uuid = uuid_module.uuid4().bytes if uuid is None else uuid
    ctime = int(time.time()) if ctime is None else ctime
    return FixedIndex(size, chunk_size, raw, uuid, ctime).encode()


def parse_fixed_index(raw, name='fixed index', check_csum=True):
    """A ``FixedIndex`` from a file's bytes; ``CorruptData`` naming what is wrong.

    ``check_csum`` compares the header's index checksum with the digests (PBS writes it on close;
    its verify compares the digests with the manifest's csum instead, which the caller can do
    with ``index_csum``).
    """
    if len(raw) < INDEX_HEADER_SIZE:
        raise CorruptData(f"{name}: {len(raw)} bytes, less than the {INDEX_HEADER_SIZE}-byte "
                          "header of a fixed index; the file is truncated")
    magic, uuid, ctime, index_csum, size, chunk_size = FIXED_INDEX_HEADER.unpack_from(raw)
    if magic != FIXED_INDEX_MAGIC:
        known = describe_magic(magic)
        what = f"the magic of a {known}" if known else f"an unknown magic ({magic.hex()})"
        raise CorruptData(f"{name}: {what}, not of a fixed index")
    _check_geometry(size, chunk_size, name)
    expected = chunk_count(size, chunk_size) * DIGEST_SIZE
    found = len(raw) - INDEX_HEADER_SIZE
    if found != expected:
        state = "truncated" if found < expected else "longer than its header says"
        raise CorruptData(f"{name}: {found} bytes of digests where {size} bytes in chunks of "
                          f"{chunk_size} need {expected}; the file is {state}")
    index = FixedIndex(size, chunk_size, bytes(raw[INDEX_HEADER_SIZE:]), uuid, ctime, index_csum)
    if check_csum and index.compute_csum() != index.index_csum:
        raise CorruptData(f"{name}: the index checksum in the header does not match the digests")
    return index


def read_fixed_index(path, check_csum=True):
    try:
        with open(path, 'rb') as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise StorageError(f"the fixed index {path} is missing") from None
    return parse_fixed_index(raw, str(path), check_csum)


class FixedIndexWriter:
    """Build a fixed index in any order, then write it in one piece (hidden, fsynced, renamed).

    Digests are held in memory: 32 bytes per chunk, 8 MiB for a 1 TiB disk in 4 MiB chunks.
    ``close`` refuses an index with a chunk never given, so a half-filled index never exists.
    """

    def __init__(self, path, size, chunk_size=DEFAULT_CHUNK_SIZE, uuid=None, ctime=None):
        _check_geometry(size, chunk_size, str(path))
        self.path = path
        self.size = size
        self.chunk_size = chunk_size
        self.count = chunk_count(size, chunk_size)
        self.uuid = uuid_module.uuid4().bytes if uuid is None else bytes(uuid)
        self.ctime = int(time.time()) if ctime is None else ctime
        self._digests = bytearray(self.count * DIGEST_SIZE)
        self._given = bytearray(self.count)
        self.index_csum = None

    def add_digest(self, position, digest):
        if not 0 <= position < self.count:
            raise IndexError(f"chunk {position} outside the {self.count} chunks of {self.path}")
        if len(digest) != DIGEST_SIZE:
            raise ValueError(f"a digest has {DIGEST_SIZE} bytes, not {len(digest)}")
        start = position * DIGEST_SIZE
        self._digests[start:start + DIGEST_SIZE] = digest
        self._given[position] = 1

    def position_of(self, offset, length):
        """The chunk that starts at ``offset`` and has ``length`` bytes; ``ValueError`` for one
        that is not aligned or not the right size (only the last chunk may be shorter)."""
        if offset % self.chunk_size or not 0 <= offset < self.size:
            raise ValueError(f"offset {offset} is not the start of a chunk of {self.path}")
        if length != min(self.chunk_size, self.size - offset):
            raise ValueError(f"a chunk at {offset} of {self.path} has "
                             f"{min(self.chunk_size, self.size - offset)} bytes, not {length}")
        return offset // self.chunk_size

    def missing(self):
        """Positions never given a digest."""
        return [position for position, given in enumerate(self._given) if not given]

    def index(self):
        return FixedIndex(self.size, self.chunk_size, self._digests, self.uuid, self.ctime)

    def close(self, durable=True):
        """Write the file; returns the index checksum (the manifest's csum)."""
        missing = self.missing()
        if missing:
            raise StorageError(f"{self.path}: {len(missing)} of {self.count} chunks have no "
                               f"digest (first at offset {missing[0] * self.chunk_size}); the "
                               "index is not written")
        index = self.index()
        write_file_hidden(os.fspath(self.path), index.encode(), durable=durable)
        self.index_csum = index.index_csum
        return index.index_csum
