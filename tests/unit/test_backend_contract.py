"""The Backend contract (tests/backend_contract.py) over a directory (LocalBackend) and the
in-memory double (MemoryBackend); S3 runs it in tests/integration/test_s3_backend.py."""
import os

import pytest

from backend_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from guestvault_engine.datastore.backends.local import LocalBackend
from guestvault_engine.datastore.backends.memory import MemoryBackend
from guestvault_engine.errors import StorageError


@pytest.fixture(params=['local', 'memory'])
def backend(request, tmp_path):
    if request.param == 'local':
        return LocalBackend(tmp_path)
    return MemoryBackend()


def test_a_local_backend_lists_no_writer_temporaries_and_refuses_keys_leaving_it(tmp_path):
    backend = LocalBackend(tmp_path / 'root')
    with pytest.raises(StorageError, match='does not exist'):
        backend.check()
    backend.put('vm/100/owner', b'root@pam\n')
    # a writer killed between its write and its rename leaves a hidden temporary
    (tmp_path / 'root' / 'vm' / '100' / '.owner.123.abc.tmp').write_bytes(b'half')
    assert [key for key, *_rest in backend.objects()] == ['vm/100/owner']
    for key in ('../outside', 'vm/../../outside', '/etc/passwd', 'vm//x', ''):
        with pytest.raises(StorageError, match='is not a key'):
            backend.put(key, b'x')
    assert sorted(os.listdir(tmp_path)) == ['root']


def test_the_memory_backend_stamps_objects_with_its_clock():
    now = [1000.0]
    backend = MemoryBackend(clock=lambda: now[0])
    backend.put('a', b'1')
    now[0] = 2000.0
    backend.put_new('b', b'2')
    assert [(key, modified) for key, _s, _e, modified in backend.objects()] == [
        ('a', 1000.0), ('b', 2000.0)]
