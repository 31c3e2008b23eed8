"""The contract of a datastore's chunk store, as one suite every kind runs: the local store
(chunk_store.FileChunkStore, files under ``.chunks``) and the store over a Backend
(object_chunks.ObjectChunkStore) on the memory double and on a directory in
tests/unit/test_chunk_store_contract.py, on S3 (SeaweedFS) in tests/integration/test_s3_backend.py.

A module that imports these tests provides a ``chunks`` fixture: a ``Harness`` over an empty,
prepared store. Garbage collection is run with its mark start two hours ahead and one hour of
grace, so every chunk stored is older than the cutoff on any clock, a bucket's included."""
import os
import time

import pytest

from guestvault_engine.datastore import blob, gc
from guestvault_engine.datastore.fixed_index import encode_fixed_index
from guestvault_engine.datastore.verify import verify_disk_index
from guestvault_engine.errors import CorruptData

CHUNK = 4 * 1024 * 1024


class Harness:
    """A chunk store under test, with how to damage one of its chunks behind its back."""

    def __init__(self, store, damage, tmp_path):
        self.store = store
        self.damage = damage            # damage(digest, raw bytes)
        self.tmp_path = tmp_path

    def add(self, text):
        raw, digest = blob.encode_chunk(text.encode() * 100)
        self.store.insert(digest, raw)
        return digest, raw

    def index(self, digests, name='drive-scsi0.img.fidx', size=None):
        path = os.path.join(str(self.tmp_path), name)
        with open(path, 'wb') as handle:
            handle.write(encode_fixed_index(size or len(digests) * CHUNK, digests))
        return path

    def collect(self, index_paths, **options):
        return gc.collect_garbage(self.store, index_paths, grace_seconds=3600,
                                  now=time.time() + 7200, **options)


def test_insert_stores_once_and_read_returns_what_was_put(chunks):
    raw, digest = blob.encode_chunk(b'guestvault' * 1000)
    assert chunks.store.missing([digest]) == [digest]
    assert chunks.store.insert(digest, raw) == (False, len(raw))
    duplicate, _size = chunks.store.insert(digest, raw)
    assert duplicate is True
    assert bytes(chunks.store.read(digest)) == raw
    assert bytes(chunks.store.read_view(digest)) == raw
    assert chunks.store.missing([digest]) == []
    assert chunks.store.touch_if_present(digest) is True


def test_a_missing_chunk_is_reported_not_invented(chunks):
    _raw, digest = blob.encode_chunk(b'never stored' * 100)
    assert chunks.store.touch_if_present(digest) is False
    with pytest.raises(CorruptData, match=f"chunk {digest.hex()} is missing from"):
        chunks.store.read(digest)


def test_a_damaged_chunk_is_found_moved_aside_and_written_afresh(chunks):
    digest, raw = chunks.add('to be damaged')
    index = chunks.index([digest], size=len('to be damaged') * 100)
    assert verify_disk_index(index, chunks.store, verified=set(), corrupt=set()) == []
    chunks.damage(digest, raw[:-1] + bytes([raw[-1] ^ 0xff]))
    [problem] = verify_disk_index(index, chunks.store, verified=set(), corrupt=set())
    assert f'the chunk {digest.hex()} at offset 0 is bad: ' in problem
    assert problem.endswith('.0.bad')                  # "renamed to <chunk>.0.bad"
    assert chunks.store.missing([digest]) == [digest]
    assert chunks.store.insert(digest, raw) == (False, len(raw))
    assert verify_disk_index(index, chunks.store, verified=set(), corrupt=set()) == []


def test_gc_keeps_what_an_index_names_and_removes_the_rest_once_old(chunks):
    kept, _stored = chunks.add('kept')
    gone = [chunks.add(f'garbage {n}')[0] for n in range(2)]
    index = chunks.index([kept])
    check = chunks.collect([index], check_mode=True)
    assert (check['removed_chunks'], check['kept_chunks'], check['referenced_chunks']) == (2, 1, 1)
    assert chunks.store.missing(gone) == []             # check mode removes nothing
    report = chunks.collect([index])
    assert (report['removed_chunks'], report['kept_chunks']) == (2, 1)
    assert report['missing_chunks'] == 0 and report['warnings'] == []
    assert chunks.store.missing([kept] + gone) == gone
    assert chunks.collect([index])['removed_chunks'] == 0


def test_gc_within_the_grace_keeps_unreferenced_chunks(chunks):
    chunks.add('fresh garbage')
    report = gc.collect_garbage(chunks.store, [], grace_seconds=3600)
    assert (report['removed_chunks'], report['kept_chunks']) == (0, 1)


def test_gc_names_the_chunks_an_index_needs_that_are_gone(chunks):
    kept, _stored = chunks.add('kept')
    _raw, lost = blob.encode_chunk(b'lost' * 100)
    report = chunks.collect([chunks.index([kept, lost])])
    assert report['missing_chunks'] == 1 and report['removed_chunks'] == 0
    assert '1 chunk is missing from the chunk store' in report['warnings'][0]


def test_gc_removes_a_bad_copy_no_index_needs(chunks):
    digest, raw = chunks.add('damaged once')
    chunks.store.mark_bad(digest)
    chunks.store.insert(digest, raw)
    index = chunks.index([digest])
    report = chunks.collect([index])
    assert (report['bad_chunks_removed'], report['kept_chunks']) == (1, 1)
    # a bad copy stays while an index needs a chunk that has no good copy
    chunks.store.mark_bad(digest)
    report = chunks.collect([index])
    assert (report['bad_chunks_kept'], report['missing_chunks']) == (1, 1)
