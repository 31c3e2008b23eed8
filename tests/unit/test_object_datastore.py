"""A datastore on an object store runs over any Backend: the storage, its chunk store and its
format that datastore/build.py assembles for S3, here on the in-memory backend (the S3 cases on
SeaweedFS are tests/integration/test_s3_datastore.py)."""
import os
import threading
import shutil
from datetime import datetime, timezone

import pytest

from guestvault_engine.datastore.backends.memory import MemoryBackend
from guestvault_engine.datastore.build import build_datastore
from guestvault_engine.datastore.object_chunks import ObjectChunkStore
from guestvault_engine.errors import StorageError
from test_storage_datastore import index_for, index_name


def test_snapshots_live_in_the_backend_and_a_dropped_cache_is_rebuilt(tmp_path):
    backend = MemoryBackend()
    store = build_datastore(str(tmp_path / 'cache'), 'mem', bucket=backend)
    assert isinstance(store.format.chunks, ObjectChunkStore)
    staged = store.stage(100, datetime(2026, 12, 1, 10, 0, 5, tzinfo=timezone.utc))
    with open(staged.file(index_name('virtio0')), 'wb') as handle:
        handle.write(b'x')
    staged.write_guest_config({'vmid': 100, 'name': 'g'})
    staged.set_notes('first')
    staged.set_protected()
    staged.write_manifest(index_for(100, '2026-12-01T10:00:05Z'))
    assert list(backend.objects('vm/100/2')) == []      # nothing is in the backend before commit
    staged.commit()
    staged.write_log('line one\n')                      # as a backup: after the commit
    prefix = 'vm/100/2026-12-01T10:00:05Z/'
    assert sorted(key for key, *_rest in backend.objects(prefix)) == [
        prefix + name for name in ('.protected', 'client.log.blob', 'drive-virtio0.img.fidx',
                                   'guest.json.blob', 'index.json.blob')]
    assert backend.get('vm/100/owner') == b'root@pam\n'

    shutil.rmtree(tmp_path / 'cache')
    again = build_datastore(str(tmp_path / 'cache'), 'mem', bucket=backend)
    [record] = again.backups(100)
    assert record.id == 'vm/100/2026-12-01T10:00:05Z' and record.protected
    assert again.read_notes(record) == 'first'
    # notes and verify state change the manifest in the backend, seen from a fresh cache
    again.set_notes(record, 'second')
    again.write_verify_state(record, {'state': 'ok', 'time': 't', 'problems': []})
    shutil.rmtree(tmp_path / 'cache')
    third = build_datastore(str(tmp_path / 'cache'), 'mem', bucket=backend)
    [record] = third.backups(100)
    assert third.read_notes(record) == 'second'
    assert third.read_verify_state(record)['state'] == 'ok'
    assert again.read_log(record) == 'line one\n'
    with pytest.raises(StorageError, match='is protected'):
        again.remove(record)
    again.set_protected(record, False)
    [record] = again.backups(100)
    again.remove(record)
    assert list(backend.objects('vm/100/2')) == [] and again.backups(100) == []


def test_an_upload_pools_first_error_comes_at_sync_and_nothing_is_marked(tmp_path):
    # The in-memory double of tests/integration/test_s3_backend.py's refused-upload test.
    from guestvault_engine.datastore import blob

    class Refusing(MemoryBackend):
        def put_new(self, key, data):
            raise StorageError(f"{self.label}: cannot upload {key}: refused")

    store = ObjectChunkStore(Refusing(), tmp_path / 'cache')
    store.create()
    chunks = [blob.encode_chunk(f'chunk {n}'.encode() * 100) for n in range(3)]
    for raw, digest in chunks:
        try:
            store.insert(digest, raw, durable=False)
        except StorageError:
            break                       # a later insert may see the first failure already
    with pytest.raises(StorageError, match='cannot upload'):
        store.sync()
    assert not any(os.path.exists(store.chunk_path(digest)) for _raw, digest in chunks)
    store.sync()                        # raised once; the pool takes uploads again
    good = ObjectChunkStore(MemoryBackend(), tmp_path / 'good')
    good.create()
    for raw, digest in chunks:
        good.insert(digest, raw, durable=False)
    good.sync()
    assert all(good.backend.get(good.key(digest)) == raw for raw, digest in chunks)


def test_a_failed_upload_cancels_the_queued_ones_and_the_next_backup_starts_clean(tmp_path):
    # Against a dead endpoint every queued upload would wait out its retries after the first
    # failed, and a backup that failed before its sync() would hand its error to the next one.
    from guestvault_engine.datastore import blob, object_chunks

    gate = threading.Event()
    calls = []

    class Dead(MemoryBackend):
        def put_new(self, key, data):
            calls.append(key)
            gate.wait(60)
            raise StorageError(f"{self.label}: cannot upload {key}: connection refused")

    store = ObjectChunkStore(Dead(), tmp_path / 'cache')
    store.create()
    queued = object_chunks.UPLOAD_WORKERS + object_chunks.UPLOAD_QUEUE
    chunks = [blob.encode_chunk(f'chunk {n}'.encode() * 100) for n in range(queued)]
    for raw, digest in chunks:
        store.insert(digest, raw, durable=False)
    gate.set()
    with pytest.raises(StorageError, match='connection refused'):
        store.sync()
    # the running ones finished; none of the queued ones was ever sent
    assert len(calls) == object_chunks.UPLOAD_WORKERS

    failed = ObjectChunkStore(Dead(), tmp_path / 'cache2')
    failed.create()
    gate.clear()
    raw, digest = chunks[0]
    failed.insert(digest, raw, durable=False)
    gate.set()
    failed._uploads._pool.shutdown(wait=True)     # pylint: disable=protected-access
    failed.backend = MemoryBackend()               # the endpoint is back for the next backup
    failed._check_conditional_puts = lambda: None  # pylint: disable=protected-access
    failed.prepare()
    failed.insert(digest, raw, durable=False)
    failed.sync()                                  # no error inherited from the failed backup
    assert failed.backend.get(failed.key(digest)) == raw


def test_an_empty_cache_is_filled_from_one_listing_and_sends_no_head_per_chunk(tmp_path):
    # A new node's (or a just-dropped) cache used to send a HEAD for every chunk a backup read,
    # one at a time on the backup's critical path.
    from guestvault_engine.datastore import blob

    class Counting(MemoryBackend):
        heads = 0

        def head(self, key):
            Counting.heads += 1
            return super().head(key)

    backend = Counting()
    first = ObjectChunkStore(backend, tmp_path / 'node1')
    first.prepare()
    stored = [blob.encode_chunk(f'stored {n}'.encode() * 100) for n in range(3)]
    for raw, digest in stored:
        first.insert(digest, raw, durable=False)
    first.sync()
    bad_raw, bad_digest = blob.encode_chunk(b'moved aside' * 100)
    first.insert(bad_digest, bad_raw)
    first.mark_bad(bad_digest)
    new_raw, new_digest = blob.encode_chunk(b'never stored' * 100)

    second = ObjectChunkStore(backend, tmp_path / 'node2')     # another node, an empty cache
    Counting.heads = 0
    second.prepare()
    assert all(second.touch_if_present(digest) for _raw, digest in stored)
    assert not second.touch_if_present(new_digest)
    assert not second.touch_if_present(bad_digest)          # a chunk moved aside is no chunk
    assert Counting.heads == 0
    # a stored chunk with no marker yet after the listing (another node, meanwhile): the
    # conditional put refuses it, and nothing is overwritten
    late_raw, late_digest = blob.encode_chunk(b'stored meanwhile' * 100)
    first.insert(late_digest, late_raw)
    assert second.insert(late_digest, late_raw) == (True, len(late_raw))

    # a cache kept from an earlier backup (same GC generation) is not listed again: a chunk it
    # has no marker of may have been stored by another node since, so it asks
    second.prepare()
    assert second.touch_if_present(new_digest) is False and Counting.heads == 1
    first.insert(new_digest, new_raw)
    assert second.touch_if_present(new_digest) is True and Counting.heads == 2
