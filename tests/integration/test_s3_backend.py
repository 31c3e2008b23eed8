"""The Backend and chunk-store contracts (tests/backend_contract.py, tests/chunk_store_contract.py)
over S3: backends/s3.py's S3Bucket, and the object chunk store on it, against a real SeaweedFS
cluster (one for the module), a fresh bucket per test."""
import dataclasses
import os
import threading
import uuid

import pytest

from backend_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from chunk_store_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from chunk_store_contract import Harness
from guestvault_engine.datastore import blob
from guestvault_engine.datastore.backends.s3 import S3Bucket
from guestvault_engine.datastore.backup_writer import write_disk_index
from guestvault_engine.datastore.object_chunks import ObjectChunkStore
from guestvault_engine.datastore.sources import RawFileSource
from guestvault_engine.errors import StorageError
from guestvault_engine.run.locate import require_storage
from seaweed import SeaweedCluster

MiB = 1 << 20


@pytest.fixture(scope='module')
def cluster(tmp_path_factory):
    with SeaweedCluster(str(tmp_path_factory.mktemp('seaweed'))) as running:
        yield running


@pytest.fixture
def backend(cluster, config_dir, tmp_path, monkeypatch):
    """An empty bucket, as storage.cfg's datastore on it opens it."""
    monkeypatch.setenv('GUESTVAULT_S3_ATTEMPTS', '3')
    bucket = cluster.create_bucket(f"gv-{uuid.uuid4().hex[:12]}")
    cluster.configure(config_dir, tmp_path / 'cache', bucket)
    return require_storage(config_dir, 's3').bucket


@pytest.fixture
def chunks(backend, tmp_path):
    store = ObjectChunkStore(backend, tmp_path / 'chunk-cache')
    store.prepare()
    return Harness(store, lambda digest, raw: backend.put(store.key(digest), raw), tmp_path)


# -- the upload pool of a backup (issue 24, goal 5) ---------------------------------------------
WAIT = 300      # seconds a test waits for uploads that must meet (machines vary threefold)


class Spy:
    """The real bucket, with each put_new and head counted (and put_new held at a barrier)."""

    def __init__(self, bucket, barrier=None):
        self.bucket = bucket
        self.barrier = barrier
        self.label = bucket.label
        self.heads = 0

    def __getattr__(self, name):
        return getattr(self.bucket, name)

    def put_new(self, key, data):
        if self.barrier is not None:
            self.barrier.wait(WAIT)       # BrokenBarrierError unless enough puts are in flight
        return self.bucket.put_new(key, data)

    def head(self, key):
        self.heads += 1
        return self.bucket.head(key)


def reader_bucket(cluster, backend):
    """The same bucket as an identity that may read and list it, but not put."""
    endpoint = dataclasses.replace(backend.endpoint, access_key=cluster.reader_key,
                                   secret_key=cluster.reader_secret)
    return S3Bucket(endpoint, backend.bucket, max_attempts=1)


def test_a_backups_uploads_overlap_even_from_one_thread(backend, tmp_path):
    # Four inserts from this one thread meet at the barrier only if all four uploads are in
    # flight at once; each insert returns before its upload answers, sync() waits for them.
    spy = Spy(backend)
    store = ObjectChunkStore(spy, tmp_path / 'cache')
    store.prepare()                                     # its probe puts one at a time
    spy.barrier = threading.Barrier(4)
    chunks = [blob.encode_chunk(f'chunk {n}'.encode() * 1000) for n in range(4)]
    for raw, digest in chunks:
        assert store.insert(digest, raw, durable=False) == (False, len(raw))
    store.sync()
    for raw, digest in chunks:
        assert backend.get(store.key(digest)) == raw
        assert os.path.exists(store.chunk_path(digest))     # marked once its put answered


def test_a_refused_upload_fails_at_sync_and_no_index_names_its_chunk(cluster, backend, tmp_path):
    store = ObjectChunkStore(reader_bucket(cluster, backend), tmp_path / 'cache')
    store.create()
    raw, digest = blob.encode_chunk(b'refused' * 1000)
    store.insert(digest, raw, durable=False)            # queued: the refusal comes at sync
    with pytest.raises(StorageError, match='refused the credentials'):
        store.sync()
    assert not os.path.exists(store.chunk_path(digest))
    store.sync()                                        # the error was raised once
    # The whole pipeline: the first refused upload is the backup's error, no index is written,
    # and no chunk is marked stored.
    image = tmp_path / 'disk.raw'
    with open(image, 'wb') as handle:
        for n in range(3):
            handle.write(os.urandom(4 * MiB))
    index = tmp_path / 'drive-virtio0.img.fidx'
    with pytest.raises(StorageError, match='refused the credentials'):
        write_disk_index(RawFileSource(image), str(index), store, workers=2)
    assert not index.exists()
    assert not [name for _dir, _dirs, names in os.walk(store.chunk_dir) for name in names
                if len(name) == 64]
    assert not list(backend.objects('.chunks/'))


def test_a_backup_looks_up_only_the_chunks_it_did_not_create(backend, tmp_path):
    spy = Spy(backend)
    store = ObjectChunkStore(spy, tmp_path / 'cache')
    # one stored by another node before this backup (found in the empty cache's listing at
    # prepare, with no HEAD), then swept behind this store's back
    raw, found = blob.encode_chunk(b'from another node' * 1000)
    backend.put(store.key(found), raw)
    store.prepare()
    created = [blob.encode_chunk(f'new {n}'.encode() * 1000) for n in range(3)]
    for raw, digest in created:
        store.insert(digest, raw, durable=False)
    store.sync()
    spy.heads = 0
    assert store.touch_if_present(found) and spy.heads == 0
    backend.delete([store.key(found)])
    spy.heads = 0
    assert store.missing([digest for _raw, digest in created] + [found]) == [found]
    assert spy.heads == 1       # the created chunks cannot have been swept: no HEAD for them
