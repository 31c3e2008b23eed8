"""The chunk-store contract (tests/chunk_store_contract.py) over the local store and over the
store on a Backend (the memory double and a directory); S3 runs it in
tests/integration/test_s3_backend.py."""
import pytest

from chunk_store_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from chunk_store_contract import Harness
from storage_contract import assert_conforms
from guestvault_engine.datastore.chunks import ChunkStore
from guestvault_engine.datastore import chunk_store
from guestvault_engine.datastore.backends.local import LocalBackend
from guestvault_engine.datastore.backends.memory import MemoryBackend
from guestvault_engine.datastore.object_chunks import ObjectChunkStore


@pytest.fixture(params=['local store', 'memory backend', 'directory backend'])
def chunks(request, tmp_path, monkeypatch):
    if request.param == 'local store':
        # a store without its 65536 prefix directories (made as chunks need them)
        monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 0)
        store = chunk_store.FileChunkStore(tmp_path / 'datastore')
        store.prepare()

        def damage(digest, raw):
            with open(store.chunk_path(digest), 'wb') as handle:
                handle.write(raw)
        return Harness(store, damage, tmp_path)
    backend = MemoryBackend() if request.param == 'memory backend' \
        else LocalBackend((tmp_path / 'objects').__fspath__())
    if request.param == 'directory backend':
        (tmp_path / 'objects').mkdir()
    store = ObjectChunkStore(backend, tmp_path / 'cache')
    store.prepare()
    return Harness(store, lambda digest, raw: backend.put(store.key(digest), raw), tmp_path)


@pytest.mark.parametrize('implementation', [chunk_store.FileChunkStore, ObjectChunkStore])
def test_each_chunk_store_has_the_protocols_members(implementation):
    assert_conforms(implementation, ChunkStore)


def test_the_stores_under_test_are_chunk_stores(chunks):
    assert_conforms(type(chunks.store), ChunkStore, chunks.store)
    assert isinstance(chunks.store, ChunkStore)
