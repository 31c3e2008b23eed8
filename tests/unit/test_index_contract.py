"""The Index contract (tests/index_contract.py) over both index kinds: fixed and dynamic."""
import pytest

from index_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from guestvault_engine.datastore.dynamic_index import DynamicIndexWriter
from guestvault_engine.datastore.fixed_index import encode_fixed_index


@pytest.fixture(params=['fixed', 'dynamic'])
def index_file(request, tmp_path):
    def make(lengths, digests):
        if request.param == 'fixed':
            path = tmp_path / 'drive-scsi0.img.fidx'
            path.write_bytes(encode_fixed_index(sum(lengths), digests, chunk_size=lengths[0]))
            return str(path)
        path = tmp_path / 'root.pxar.didx'
        writer = DynamicIndexWriter(path)
        end = 0
        for length, digest in zip(lengths, digests):
            end += length
            writer.add_chunk(end, digest)
        writer.close(durable=False)
        return str(path)
    return make
