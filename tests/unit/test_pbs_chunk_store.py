"""The chunk store's paths and rules (pbs-datastore/src/chunk_store.rs), and the hidden atomic
write it relies on (storage/files.py)."""
import hashlib
import os

import pytest

from guestvault_engine.errors import CorruptData, StorageError
from guestvault_engine.datastore import blob, chunk_store
from guestvault_engine.datastore.crypt import CryptConfig
from guestvault_engine.storage.files import write_file_hidden

MiB = 1024 * 1024
KEY = bytes([1]) * 32


def test_chunk_path_is_chunks_first_two_bytes_in_hex_then_the_digest():
    digest = bytes([0xab, 0x0c]) + bytes(range(30))
    assert chunk_store.chunk_relpath(digest) == os.path.join('.chunks', 'ab0c', digest.hex())
    assert chunk_store.chunk_relpath(digest.hex().upper()) == chunk_store.chunk_relpath(digest)
    store = chunk_store.FileChunkStore('/srv/store')
    assert store.chunk_path(digest) == f"/srv/store/.chunks/ab0c/{digest.hex()}"
    with pytest.raises(ValueError):
        chunk_store.chunk_relpath(b'short')
    with pytest.raises(ValueError):
        chunk_store.chunk_relpath('z' * 64)


def test_create_makes_every_prefix_directory_and_the_lock(tmp_path, monkeypatch):
    assert chunk_store.SUBDIR_COUNT == 65536            # 0000 .. ffff, as PBS creates them
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 20)
    store = chunk_store.FileChunkStore(tmp_path)
    assert not store.exists()
    with pytest.raises(StorageError, match='not a datastore'):
        store.check()
    store.create()
    names = sorted(os.listdir(tmp_path / '.chunks'))
    assert names == [f"{n:04x}" for n in range(20)] and names[-1] == '0013'
    assert (tmp_path / '.lock').read_bytes() == b''
    os.rmdir(tmp_path / '.chunks' / '0005')
    store.create()                                     # an interrupted creation is finished
    assert len(os.listdir(tmp_path / '.chunks')) == 20
    store.check()


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store whose prefix directories are made when a test needs them (65536 take seconds)."""
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 0)
    made = chunk_store.FileChunkStore(tmp_path)
    made.create()
    monkeypatch.undo()
    return made


def insert(store, digest, raw):
    os.makedirs(os.path.dirname(store.chunk_path(digest)), exist_ok=True)
    return store.insert(digest, raw)


def put(store, data, crypt=None, compress=True):
    raw, digest = blob.encode_chunk(data, crypt, compress)
    return raw, digest, insert(store, digest, raw)


def test_insert_once_then_duplicate_touches(store):
    raw, digest, result = put(store, b'chunk data' * 100)
    assert result == (False, len(raw))
    path = store.chunk_path(digest)
    assert open(path, 'rb').read() == raw
    assert os.listdir(os.path.dirname(path)) == [digest.hex()]     # no temporary left
    os.utime(path, (1000, 2000))
    assert store.insert(digest, raw) == (True, len(raw))
    assert os.stat(path).st_atime > 1000 and os.stat(path).st_mtime == 2000
    assert store.read(digest) == raw and store.contains(digest)


def test_insert_rules_for_a_copy_of_another_size(store):
    data = bytes(10_000)
    compressed, digest = blob.encode_chunk(data)
    plain = blob.encode_chunk(data, compress=False)[0]
    path = store.chunk_path(digest)
    os.makedirs(os.path.dirname(path))
    open(path, 'wb').close()                                       # an empty file is replaced
    assert store.insert(digest, plain) == (False, len(plain))
    assert store.insert(digest, compressed) == (False, len(compressed))   # smaller replaces
    assert store.insert(digest, plain) == (True, len(compressed))         # bigger is dropped
    assert open(path, 'rb').read() == compressed


def test_encrypted_chunk_never_replaces_an_unencrypted_one(store):
    config = CryptConfig(KEY)
    raw, digest, _inserted = put(store, b'x' * 5000)
    encrypted = blob.encode_blob(b'x' * 5000, config)
    with pytest.raises(StorageError, match='encrypted chunk would replace an unencrypted'):
        store.insert(digest, encrypted)
    data = os.urandom(3000)
    first, keyed = blob.encode_chunk(data, config, compress=False)
    insert(store, keyed, first)
    with pytest.raises(StorageError, match='two uncompressed encrypted copies'):
        store.insert(keyed, first + b'!')
    assert store.insert(keyed, blob.encode_blob(bytes(3000), config)) == (True, len(first))


def test_touch_sets_atime_only_and_reports_missing(store):
    raw, digest, _inserted = put(store, b'abc' * 50)
    path = store.chunk_path(digest)
    os.utime(path, (1000, 2000))
    assert store.touch(digest) is True
    assert os.stat(path).st_atime > 1000 and os.stat(path).st_mtime == 2000
    absent = hashlib.sha256(b'absent').digest()
    assert store.touch(absent, must_exist=False) is False
    with pytest.raises(CorruptData, match=f"chunk {absent.hex()} is missing"):
        store.touch(absent)
    with pytest.raises(CorruptData, match='missing'):
        store.read(absent)


def test_mark_bad_renames_as_pbs_verify_does(store):
    raw, digest, _inserted = put(store, b'bad' * 30)
    path = store.chunk_path(digest)
    assert store.mark_bad(digest) == f"{path}.0.bad"
    put(store, b'bad' * 30)
    assert store.mark_bad(digest) == f"{path}.1.bad"
    assert store.mark_bad(digest) is None
    put(store, b'bad' * 30)
    folder = os.path.dirname(path)
    open(os.path.join(folder, f".{digest.hex()}.123.abc.tmp"), 'wb').close()
    found = sorted((name, bad) for _path, name, bad in store.chunk_files())
    assert found == [(digest.hex(), False), (f"{digest.hex()}.0.bad", True),
                     (f"{digest.hex()}.1.bad", True)]


def test_chunk_names_as_pbs_iterates_them():
    hex64 = 'ab' * 32
    assert chunk_store.is_chunk_name(hex64)
    assert chunk_store.is_chunk_name(hex64 + '.3.bad')
    assert not chunk_store.is_chunk_name('.' + hex64 + '.1.x.tmp')
    assert not chunk_store.is_chunk_name(hex64[:-1])
    assert not chunk_store.is_chunk_name(hex64 + '.tmp')


def test_zero_chunk_digest():
    assert chunk_store.ZERO_CHUNK_DIGEST == hashlib.sha256(bytes(4 * MiB)).digest()
    assert chunk_store.ZERO_CHUNK_DIGEST.hex().startswith('bb9f8df6')
    raw, digest = chunk_store.zero_chunk()
    assert digest == chunk_store.ZERO_CHUNK_DIGEST
    assert len(raw) < 1000 and blob.decode_blob(raw, digest=digest) == bytes(4 * MiB)
    config = CryptConfig(KEY)
    raw, digest = chunk_store.zero_chunk(crypt=config)
    assert digest == config.compute_digest(bytes(4 * MiB)) != chunk_store.ZERO_CHUNK_DIGEST
    assert blob.decode_blob(raw, config, digest) == bytes(4 * MiB)


def test_write_file_hidden(tmp_path):
    path = str(tmp_path / 'file')
    write_file_hidden(path, b'one')
    write_file_hidden(path, b'two', durable=False)
    assert open(path, 'rb').read() == b'two'
    with pytest.raises(FileExistsError):
        write_file_hidden(path, b'three', exclusive=True)
    write_file_hidden(str(tmp_path / 'new'), b'four', exclusive=True, mode=0o640)
    assert (tmp_path / 'new').read_bytes() == b'four'
    assert sorted(os.listdir(tmp_path)) == ['file', 'new']

    class Unwritable:
        def __len__(self):
            return 1

    with pytest.raises(TypeError):
        write_file_hidden(path, Unwritable())
    assert sorted(os.listdir(tmp_path)) == ['file', 'new']          # the temporary is removed


def test_a_chunk_read_into_a_buffer_is_the_blob_and_one_too_large_is_corrupt(
        tmp_path, monkeypatch):
    import mmap
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 1)
    store = chunk_store.FileChunkStore(tmp_path)
    store.create()
    raw, digest = blob.encode_chunk(os.urandom(3 * 4096 + 100))
    store.insert(digest, raw)
    buffer = mmap.mmap(-1, 8 * 4096)
    assert bytes(store.read_into(digest, buffer)) == raw
    with pytest.raises(CorruptData, match=f"chunk {digest.hex()}: .*more than a blob of its"):
        store.read_into(digest, mmap.mmap(-1, 4096))
    os.unlink(store.chunk_path(digest))
    with pytest.raises(CorruptData, match='missing'):
        store.read_into(digest, buffer)
