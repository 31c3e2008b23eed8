"""The Backend and chunk-store contracts (tests/backend_contract.py, tests/chunk_store_contract.py)
over S3: backends/s3.py's S3Bucket, and the object chunk store on it, against a real SeaweedFS
cluster (one for the module), a fresh bucket per test."""
import uuid

import pytest

from backend_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from chunk_store_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from chunk_store_contract import Harness
from guestvault_engine.datastore.object_chunks import ObjectChunkStore
from guestvault_engine.run.locate import require_storage
from seaweed import SeaweedCluster


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
