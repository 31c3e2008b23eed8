"""The contract every datastore ``Backend`` keeps (datastore/backend.py), as one suite that each
backend runs: tests/unit/test_backend_contract.py over a directory and the memory double,
tests/integration/test_s3_backend.py over S3 on SeaweedFS. A module that imports these tests
provides a ``backend`` fixture: an empty backend of its kind."""
import hashlib
import threading

import pytest

from guestvault_engine.datastore.backend import Backend
from guestvault_engine.errors import StorageError

CHUNK_KEY = '.chunks/bb9f/bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8'


def test_backend_declares_the_protocol(backend):
    assert isinstance(backend, Backend)
    assert backend.label
    backend.check()


def test_get_returns_what_was_put_and_none_for_a_missing_key(backend):
    backend.put('vm/100/2026-01-01T00:00:00Z/index.json.blob', b'manifest')
    backend.put(CHUNK_KEY, bytes(range(256)) * 3)
    assert backend.get('vm/100/2026-01-01T00:00:00Z/index.json.blob') == b'manifest'
    assert backend.get(CHUNK_KEY) == bytes(range(256)) * 3
    assert backend.get('vm/100/none') is None
    assert backend.head('vm/100/none') is None


def test_put_replaces_and_put_new_never_does(backend):
    backend.put('owner', b'first')
    backend.put('owner', b'second')
    assert backend.get('owner') == b'second'
    assert backend.put_new('vm/100/owner', b'root@pam\n') is True
    assert backend.put_new('vm/100/owner', b'someone else\n') is False
    assert backend.get('vm/100/owner') == b'root@pam\n'


def test_put_new_of_one_key_from_many_threads_creates_it_once(backend):
    results = []
    barrier = threading.Barrier(8)

    def writer(number):
        barrier.wait()
        results.append((backend.put_new('.leases/probe', f'{number}'.encode()), number))

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [number for created, number in results if created]
    assert len(results) == 8 and len(winners) == 1
    assert backend.get('.leases/probe') == f'{winners[0]}'.encode()


def test_head_and_objects_give_size_md5_etag_and_time(backend):
    data = b'x' * 1000
    backend.put('vm/100/2026-01-01T00:00:00Z/drive-scsi0.img.fidx', data)
    found = backend.head('vm/100/2026-01-01T00:00:00Z/drive-scsi0.img.fidx')
    assert found['size'] == 1000
    assert found['etag'] == hashlib.md5(data).hexdigest()
    assert isinstance(found['modified'], float) and found['modified'] > 0
    [(key, size, etag, modified)] = backend.objects('vm/100/')
    assert (key, size, etag, modified) == (
        'vm/100/2026-01-01T00:00:00Z/drive-scsi0.img.fidx', 1000, found['etag'],
        found['modified'])


def test_objects_lists_only_under_the_prefix_in_key_order(backend):
    for key in ('vm/101/b', 'vm/100/2/x', 'vm/100/1/y', 'vm/1000/z', 'ct/100/a', 'vm/100/1/x'):
        backend.put(key, key.encode())
    assert [key for key, *_rest in backend.objects('vm/100/')] == [
        'vm/100/1/x', 'vm/100/1/y', 'vm/100/2/x']
    assert [key for key, *_rest in backend.objects('vm/100')] == [
        'vm/100/1/x', 'vm/100/1/y', 'vm/100/2/x', 'vm/1000/z']
    assert [size for _k, size, *_rest in backend.objects('ct/')] == [len(b'ct/100/a')]
    assert len(list(backend.objects())) == 6
    assert list(backend.objects('ns/')) == []


def test_folders_are_the_next_path_part_of_the_keys_below(backend):
    for key in ('vm/100/a', 'vm/101/1/b', 'vm/owner', 'ct/200/c'):
        backend.put(key, b'')
    assert sorted(backend.folders('vm/')) == ['100', '101']
    assert backend.folders('ns/') == []


def test_delete_removes_every_key_given_and_a_missing_one_is_no_error(backend):
    keys = [f'.chunks/0000/{n:064x}' for n in range(5)]
    for key in keys:
        backend.put(key, b'chunk')
    backend.delete(iter(keys[:3] + ['.chunks/0000/never-there']))
    assert [key for key, *_rest in backend.objects('.chunks/')] == keys[3:]
    backend.delete([])
    assert backend.head(keys[0]) is None and backend.get(keys[4]) == b'chunk'
    # what removing a snapshot does: delete what a listing of the same backend yields
    backend.delete(key for key, *_rest in backend.objects('.chunks/0000/'))
    assert list(backend.objects('.chunks/')) == []


def test_copy_puts_a_second_object_and_a_missing_source_is_an_error(backend):
    backend.put(CHUNK_KEY, b'damaged chunk')
    backend.copy(CHUNK_KEY, CHUNK_KEY + '.0.bad')
    backend.delete([CHUNK_KEY])
    assert backend.get(CHUNK_KEY + '.0.bad') == b'damaged chunk'
    assert backend.get(CHUNK_KEY) is None
    with pytest.raises(StorageError):
        backend.copy(CHUNK_KEY, CHUNK_KEY + '.1.bad')
    assert backend.head(CHUNK_KEY + '.1.bad') is None
