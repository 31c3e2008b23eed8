"""The contract of the ``Index`` seam (datastore/index.py), as one suite every index kind runs:
the fixed index (``.fidx``) and the dynamic index (``.didx``), each written by its own codec and
read back through ``read_index``, which picks the kind by magic.

A module that imports these tests provides an ``index_file`` fixture: a function
``make(lengths, digests)`` that writes an index of chunks of those lengths (all equal but the
last for a fixed index) and returns its path."""
import hashlib
import os

import pytest

from guestvault_engine.datastore import gc
from guestvault_engine.datastore.index import Index, read_index
from guestvault_engine.errors import CorruptData, StorageError

LENGTHS = (4096, 4096, 4096, 100)
DIGESTS = [hashlib.sha256(bytes([n])).digest() for n in (1, 2, 1, 3)]   # chunk 0 repeats


def test_read_index_gives_an_index_of_the_files_chunks(index_file):
    index = read_index(index_file(LENGTHS, DIGESTS))
    assert isinstance(index, Index)
    assert index.count == len(LENGTHS)
    assert index.size == sum(LENGTHS)
    assert [index.digest(n) for n in range(index.count)] == DIGESTS
    assert index.distinct_digests() == set(DIGESTS) and len(index.distinct_digests()) == 3


def test_chunks_are_contiguous_and_iteration_agrees_with_chunk_range(index_file):
    index = read_index(index_file(LENGTHS, DIGESTS))
    start = 0
    for (position, offset, length, digest), expected in zip(index, LENGTHS):
        assert (offset, length) == (start, expected)
        assert index.chunk_range(position) == (offset, offset + length)
        assert digest == index.digest(position)
        start += length
    assert start == index.size


def test_chunk_at_finds_the_chunk_of_every_boundary_offset(index_file):
    index = read_index(index_file(LENGTHS, DIGESTS))
    for position in range(index.count):
        start, end = index.chunk_range(position)
        assert index.chunk_at(start) == (position, 0)
        assert index.chunk_at(end - 1) == (position, end - 1 - start)
    for outside in (-1, index.size):
        with pytest.raises(IndexError):
            index.chunk_at(outside)
    with pytest.raises(IndexError):
        index.digest(index.count)


def test_the_header_checksum_is_the_digest_areas(index_file):
    path = index_file(LENGTHS, DIGESTS)
    index = read_index(path)
    assert index.compute_csum() == index.index_csum
    raw = bytearray(open(path, 'rb').read())
    raw[-1] ^= 0xFF                     # a flipped bit in the last digest
    with open(path, 'wb') as handle:
        handle.write(raw)
    with pytest.raises(CorruptData, match='checksum'):
        read_index(path)
    assert read_index(path, check_csum=False).digest(len(LENGTHS) - 1) != DIGESTS[-1]


def test_a_missing_file_is_a_storage_error_and_a_truncated_one_corrupt(index_file):
    path = index_file(LENGTHS, DIGESTS)
    raw = open(path, 'rb').read()
    with open(path, 'wb') as handle:
        handle.write(raw[:-7])
    with pytest.raises(CorruptData, match=os.path.basename(path)):
        read_index(path)
    os.unlink(path)
    with pytest.raises(StorageError, match='is missing') as caught:
        read_index(path)
    assert not isinstance(caught.value, CorruptData)


def test_garbage_collection_marks_what_the_index_names(index_file):
    path = index_file(LENGTHS, DIGESTS)
    digests, files, logical = gc.referenced_digests([path])
    assert digests == {digest.hex() for digest in DIGESTS}
    assert (files, logical) == (1, sum(LENGTHS))
