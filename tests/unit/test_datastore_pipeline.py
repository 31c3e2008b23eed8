"""The datastore pipeline on real files: back up a raw image into a chunk store, restore it, verify
it, collect garbage (datastore/: sources, backup_writer, image_restore, verify, gc)."""
import contextlib
import filecmp
import hashlib
import os
import random
import shutil
import threading

import pytest

from guestvault_engine.errors import BackupFailed, CorruptData, EncryptionKeyError, StorageError
from guestvault_engine.format import qemu_img
from guestvault_engine.datastore import (backup_writer, chunk_store, fixed_index, gc,
                                         image_restore, key_file)
from guestvault_engine.datastore.backup_writer import write_disk_index
from guestvault_engine.datastore.file_formats import (
    ENCRYPTED_BLOB_MAGIC, ENCRYPTED_COMPRESSED_BLOB_MAGIC)
from guestvault_engine.datastore.image_restore import restore_disk_image
from guestvault_engine.datastore.sources import RawFileSource
from guestvault_engine.datastore.verify import verify_disk_index
from guestvault_engine.storage import files

MiB = 1024 * 1024
CHUNK = 4 * MiB
SIZE = 6 * CHUNK + 12345          # a short last chunk
HAS_QEMU_IMG = shutil.which('qemu-img') is not None


def make_image(path):
    """Chunk 0: random data; 1: a hole; 2: written zeroes; 3: a little data in a hole; 4: data
    repeated from chunk 0; 5: a hole; 6 (short): data at its end."""
    first = os.urandom(CHUNK)
    with open(path, 'wb') as handle:
        handle.truncate(SIZE)
        handle.seek(0)
        handle.write(first)
        handle.seek(2 * CHUNK)
        handle.write(bytes(CHUNK))
        handle.seek(3 * CHUNK + 5000)
        handle.write(b'some data' * 100)
        handle.seek(4 * CHUNK)
        handle.write(first)
        handle.seek(SIZE - 1000)
        handle.write(os.urandom(1000))
    return path


def overwrite(path, offset, data):
    with open(path, 'r+b') as handle:
        handle.seek(offset)
        handle.write(data)


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A store without the 65536 prefix directories (insert makes the ones it needs)."""
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 0)
    made = chunk_store.FileChunkStore(tmp_path / 'store')
    made.create()
    monkeypatch.undo()
    return made


@pytest.fixture
def image(tmp_path):
    return make_image(str(tmp_path / 'disk.raw'))


def backup(image, store, tmp_path, name='a', **options):
    path = str(tmp_path / f'{name}.fidx')
    return path, write_disk_index(RawFileSource(image, options.pop('dirty', None)), path, store,
                                  **options)


def stored_chunks(store):
    found = []
    for folder in os.listdir(store.chunk_dir):
        found += [name for name in os.listdir(os.path.join(store.chunk_dir, folder))
                  if chunk_store.is_chunk_name(name)]
    return sorted(found)


def test_raw_file_source_extents_and_reads(image):
    source = RawFileSource(image)
    extents = source.extents()
    assert extents[0] == (0, CHUNK, False) and extents[1][0] == CHUNK and extents[1][2] is True
    assert sum(length for _offset, length, _zero in extents) == SIZE
    assert [o for o, _n, _z in extents] == sorted(o for o, _n, _z in extents)
    assert not source.incremental
    with pytest.raises(BackupFailed, match='no incremental'):
        source.dirty_extents()
    with source.reader() as reader:
        assert reader.pread(9, 3 * CHUNK + 5000) == b'some data'
        buffer = bytearray(9)
        reader.pread_into(buffer, 3 * CHUNK + 5000)
        assert buffer == b'some data'
        with pytest.raises(StorageError, match='shrank'):
            reader.pread_into(bytearray(10), SIZE - 5)
    assert RawFileSource(image, dirty=[(0, 1)]).dirty_extents() == [(0, 1)]


@pytest.mark.parametrize('workers', [1, 3])
def test_full_backup_then_restore_raw_is_identical_and_sparse(image, store, tmp_path, workers):
    index_path, result = backup(image, store, tmp_path, workers=workers)
    assert result['size'] == SIZE and result['chunks'] == 7
    # holes (1, 5) are not read; written zeroes (2) are read and found zero
    assert result['read_chunks'] == 5 and result['read_bytes'] == 4 * CHUNK + 12345
    assert result['zero_chunks'] == 3
    # chunk 0 = chunk 4, one zero chunk, chunks 3 and 6
    assert result['new_chunks'] == 4 and len(stored_chunks(store)) == 4
    assert result['new_bytes'] == sum(os.path.getsize(store.chunk_path(bytes.fromhex(name)))
                                      for name in stored_chunks(store))
    index = fixed_index.read_fixed_index(index_path)
    assert result['csum'] == index.index_csum.hex()
    assert index.digest(1) == index.digest(2) == index.digest(5) == chunk_store.ZERO_CHUNK_DIGEST
    assert index.digest(0) == index.digest(4)
    target = str(tmp_path / 'restored.raw')
    restored = restore_disk_image(index, store, target, 'raw', workers=workers)
    assert restored['zero_chunks'] == 3 and restored['read_chunks'] == 4
    assert filecmp.cmp(image, target, shallow=False)
    # thin: the holes and the zero chunk, and the zero blocks inside chunk 3, are not allocated
    assert os.stat(target).st_blocks * 512 < 2 * CHUNK + 2 * MiB


@pytest.mark.skipif(not HAS_QEMU_IMG, reason='needs qemu-img')
def test_restore_to_qcow2_compares_identical(image, store, tmp_path):
    index_path, _result = backup(image, store, tmp_path)
    target = str(tmp_path / 'restored.qcow2')
    result = restore_disk_image(fixed_index.read_fixed_index(index_path), store, target, 'qcow2')
    assert result['method'] == 'raw+convert'
    assert qemu_img.info(target)['format'] == 'qcow2'
    assert qemu_img.compare(image, target) == (True, '')
    assert sorted(os.listdir(tmp_path)) == ['a.fidx', 'disk.raw', 'restored.qcow2', 'store']
    overwrite(image, 10, b'x')
    assert qemu_img.compare(image, target)[0] is False        # the comparison can fail


def test_second_full_of_unchanged_data_writes_no_chunk(image, store, tmp_path):
    first_path, first = backup(image, store, tmp_path)
    second_path, second = backup(image, store, tmp_path, name='b', workers=2)
    assert second['new_chunks'] == 0 and second['new_bytes'] == 0
    assert second['csum'] == first['csum']
    assert open(first_path, 'rb').read()[32:] == open(second_path, 'rb').read()[32:]


def test_incremental_reads_only_dirty_chunks(image, store, tmp_path):
    first_path, _first = backup(image, store, tmp_path)
    previous = fixed_index.read_fixed_index(first_path)
    overwrite(image, 3 * CHUNK + 10, b'changed')
    overwrite(image, SIZE - 10, b'tail')
    reads = []
    original = RawFileSource.reader

    def counting_reader(self):
        manager = original(self)

        class Counting:
            def __enter__(self):
                inner = manager.__enter__()

                class Reader:
                    def pread(self, length, offset):
                        reads.append(offset)
                        return inner.pread(length, offset)

                return Reader()

            def __exit__(self, *exc):
                return manager.__exit__(*exc)

        return Counting()

    dirty = [(3 * CHUNK + 10, 7), (SIZE - 10, 4)]
    path = str(tmp_path / 'inc.fidx')
    source = RawFileSource(image, dirty)
    source.reader = counting_reader.__get__(source)
    result = write_disk_index(source, path, store, previous=previous)
    assert result['incremental'] is True
    assert sorted(reads) == [3 * CHUNK, 6 * CHUNK]
    assert result['read_chunks'] == 2 and result['new_chunks'] == 2
    # 0, 4 and the written zeroes of 2 are taken from the previous index; 1 and 5 are holes
    assert result['reused_chunks'] == 3 and result['zero_chunks'] == 2
    index = fixed_index.read_fixed_index(path)
    for position in (0, 1, 2, 4, 5):
        assert index.digest(position) == previous.digest(position)
    assert index.digest(3) != previous.digest(3)
    target = str(tmp_path / 'restored.raw')
    restore_disk_image(index, store, target, 'raw')
    assert filecmp.cmp(image, target, shallow=False)


def test_incremental_reads_a_chunk_missing_from_the_store(image, store, tmp_path):
    first_path, _first = backup(image, store, tmp_path)
    previous = fixed_index.read_fixed_index(first_path)
    os.unlink(store.chunk_path(previous.digest(0)))            # chunks 0 and 4 share it
    path, result = backup(image, store, tmp_path, name='inc', previous=previous, dirty=[])
    assert result['read_chunks'] == 2 and result['new_chunks'] == 1
    assert store.contains(previous.digest(0))
    restore_disk_image(fixed_index.read_fixed_index(path), store, str(tmp_path / 'r.raw'))
    assert filecmp.cmp(image, str(tmp_path / 'r.raw'), shallow=False)


def test_a_previous_index_of_another_size_reads_everything(image, store, tmp_path):
    first_path, _first = backup(image, store, tmp_path)
    previous = fixed_index.read_fixed_index(first_path)
    with open(image, 'r+b') as handle:
        handle.truncate(SIZE + CHUNK)
    _path, result = backup(image, store, tmp_path, name='inc', previous=previous, dirty=[])
    assert result['incremental'] is False and result['read_chunks'] == 5


def test_encrypted_round_trip_and_wrong_key(image, store, tmp_path):
    config, _created = key_file.KeyFile.create(kdf='none')
    index_path, result = backup(image, store, tmp_path, crypt=config)
    index = fixed_index.read_fixed_index(index_path)
    assert index.digest(1) == config.compute_digest(bytes(CHUNK)) != chunk_store.ZERO_CHUNK_DIGEST
    assert index.digest(6) == config.compute_digest(
        open(image, 'rb').read()[6 * CHUNK:])
    for name in stored_chunks(store):
        assert open(store.chunk_path(bytes.fromhex(name)), 'rb').read(8) in (
            ENCRYPTED_BLOB_MAGIC, ENCRYPTED_COMPRESSED_BLOB_MAGIC)
    target = str(tmp_path / 'r.raw')
    restore_disk_image(index, store, target, crypt=config)
    assert filecmp.cmp(image, target, shallow=False)
    assert result['new_chunks'] == 4
    other, _created = key_file.KeyFile.create(kdf='none')
    # the reads in flight finish in any order: any chunk may be the first one decoded
    with pytest.raises(EncryptionKeyError,
                       match=f"at offset [0-9]+ .*{other.short_fingerprint}"):
        restore_disk_image(index, store, target, crypt=other, workers=1)
    assert not os.path.exists(target)                          # the partial target is removed
    with pytest.raises(EncryptionKeyError, match='without its encryption key'):
        restore_disk_image(index, store, target)
    assert verify_disk_index(index_path, store, verified=set(), corrupt=set()) == []


def test_corrupt_chunk_is_named_renamed_bad_and_rewritten_by_the_next_backup(image, store,
                                                                             tmp_path):
    index_path, _result = backup(image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    digest = index.digest(3)
    path = store.chunk_path(digest)
    raw = bytearray(open(path, 'rb').read())
    raw[-1] ^= 0xff
    open(path, 'wb').write(raw)
    with pytest.raises(CorruptData, match=f"snap/disk: the chunk at offset {3 * CHUNK} "
                                          f"\\({digest.hex()}\\).*CRC32"):
        restore_disk_image(index, store, str(tmp_path / 'r.raw'), what='snap/disk')
    assert not os.path.exists(tmp_path / 'r.raw')
    verified, corrupt = set(), set()
    problems = verify_disk_index(index_path, store, verified=verified, corrupt=corrupt,
                                 what='snap/disk')
    assert len(problems) == 1
    assert f"snap/disk: {index_path}: the chunk {digest.hex()} at offset {3 * CHUNK}" in \
        problems[0] and 'CRC32' in problems[0] and '.0.bad' in problems[0]
    assert corrupt == {digest} and len(verified) == 3
    assert not os.path.exists(path) and os.path.exists(f"{path}.0.bad")
    # a second snapshot naming the same chunk is named too, without decoding it again
    shutil.copy(index_path, tmp_path / 'b.fidx')
    again = verify_disk_index(str(tmp_path / 'b.fidx'), store, verified=verified,
                              corrupt=corrupt, what='snap2/disk')
    assert len(again) == 1 and 'snap2/disk' in again[0] and digest.hex() in again[0]
    # the next backup writes a fresh copy
    _path, result = backup(image, store, tmp_path, name='c')
    assert result['new_chunks'] == 1 and os.path.exists(path)
    assert verify_disk_index(index_path, store, verified=set(), corrupt=set()) == []


def test_verify_names_a_missing_chunk_a_truncated_index_and_an_unknown_magic(image, store,
                                                                             tmp_path):
    index_path, _result = backup(image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    os.unlink(store.chunk_path(index.digest(6)))
    wrong = store.chunk_path(index.digest(3))
    raw = open(wrong, 'rb').read()
    open(wrong, 'wb').write(b'NOTABLOB' + raw[8:])
    problems = verify_disk_index(index_path, store, verified=set(), corrupt=set(), what='s/d')
    assert len(problems) == 2
    assert f"chunk {index.digest(3).hex()} at offset {3 * CHUNK}" in problems[0]
    assert 'unknown magic' in problems[0]
    assert f"chunk {index.digest(6).hex()} at offset {6 * CHUNK} is missing" in problems[1]
    assert all(index_path in problem for problem in problems)
    # verify renamed the chunk of unknown magic: a restore finds it missing
    with pytest.raises(CorruptData, match=f"s/d: the chunk at offset {3 * CHUNK} .*missing"):
        restore_disk_image(index, store, str(tmp_path / 'r.raw'), what='s/d')
    raw = open(index_path, 'rb').read()
    open(index_path, 'wb').write(raw[:-40])
    problems = verify_disk_index(index_path, store, verified=set(), corrupt=set(), what='s/d')
    assert len(problems) == 1 and index_path in problems[0] and 'truncated' in problems[0]


def age(path, seconds):
    info = os.stat(path)
    os.utime(path, (info.st_atime - seconds, info.st_mtime - seconds))


def test_gc_removes_unreferenced_chunks_after_the_grace_only(image, store, tmp_path):
    first_path, _first = backup(image, store, tmp_path)
    overwrite(image, 0, os.urandom(100))
    second_path, second = backup(image, store, tmp_path, name='b')
    assert second['new_chunks'] == 1
    first = fixed_index.read_fixed_index(first_path)
    orphan = first.digest(0)           # only the first index names it (and then not chunk 4)
    overwrite(image, 4 * CHUNK, os.urandom(100))
    third_path, _third = backup(image, store, tmp_path, name='c')
    os.unlink(first_path)
    os.unlink(second_path)
    before = stored_chunks(store)
    for name in before:
        age(store.chunk_path(bytes.fromhex(name)), 7200)
    now = None
    kept_fresh = gc.collect_garbage(store, [third_path], grace_seconds=3 * 3600, now=now)
    assert kept_fresh['removed_chunks'] == 0 and stored_chunks(store) == before
    third = fixed_index.read_fixed_index(third_path)
    referenced = {third.digest(position).hex() for position in range(third.count)}
    for name in before:
        age(store.chunk_path(bytes.fromhex(name)), 7200)
    check = gc.collect_garbage(store, [third_path], grace_seconds=3600, check_mode=True)
    assert stored_chunks(store) == before
    real = gc.collect_garbage(store, [third_path], grace_seconds=3600)
    for key in ('removed_chunks', 'removed_bytes', 'kept_chunks', 'kept_bytes',
                'referenced_chunks', 'logical_bytes', 'dedup_factor', 'bad_chunks_removed'):
        assert check[key] == real[key], key
    assert real['removed_chunks'] == len(before) - len(referenced) == 1
    assert orphan.hex() not in stored_chunks(store)
    assert stored_chunks(store) == sorted(referenced)
    assert real['index_files'] == 1 and real['logical_bytes'] == SIZE
    assert real['dedup_factor'] == round(SIZE / real['kept_bytes'], 3)
    restore_disk_image(third, store, str(tmp_path / 'r.raw'))
    assert filecmp.cmp(image, str(tmp_path / 'r.raw'), shallow=False)


def test_gc_keeps_chunks_of_a_backup_that_started_before_the_mark(image, store, tmp_path):
    backup_started = 1_000_000.0
    _index_path, _result = backup(image, store, tmp_path)    # its index is not written yet
    for name in stored_chunks(store):
        os.utime(store.chunk_path(bytes.fromhex(name)), (backup_started + 10, backup_started))
    mark = backup_started + 7200
    report = gc.collect_garbage(store, [], grace_seconds=300, now=mark,
                                oldest_writer_start=backup_started)
    assert report['removed_chunks'] == 0 and report['pending_chunks'] == 0
    assert report['cutoff'] == backup_started - 300
    for name in stored_chunks(store):             # untouched since before the backup started
        os.utime(store.chunk_path(bytes.fromhex(name)), (backup_started - 100, backup_started))
    report = gc.collect_garbage(store, [], grace_seconds=300, now=mark,
                                oldest_writer_start=backup_started)
    assert report['removed_chunks'] == 0 and report['pending_chunks'] == 4
    report = gc.collect_garbage(store, [], grace_seconds=300, now=mark)
    assert report['removed_chunks'] == 4 and stored_chunks(store) == []


def test_gc_check_mode_changes_nothing(image, store, tmp_path):
    index_path, _result = backup(image, store, tmp_path)
    names = stored_chunks(store)
    for name in names:
        os.utime(store.chunk_path(bytes.fromhex(name)), (1000, 1000))
    stale = os.path.join(os.path.dirname(store.chunk_path(bytes.fromhex(names[0]))),
                         '.x.1.abc.tmp')
    open(stale, 'wb').close()
    os.utime(stale, (1000, 1000))
    report = gc.collect_garbage(store, [], grace_seconds=0, check_mode=True)
    assert report['removed_chunks'] == 4 and report['removed_temporaries'] == 1
    assert stored_chunks(store) == names and os.path.exists(stale)
    assert {os.stat(store.chunk_path(bytes.fromhex(name))).st_atime for name in names} == {1000}
    report = gc.collect_garbage(store, [index_path], grace_seconds=0, check_mode=True)
    assert report['removed_chunks'] == 0 and report['kept_chunks'] == 4
    assert {os.stat(store.chunk_path(bytes.fromhex(name))).st_atime for name in names} == {1000}
    report = gc.collect_garbage(store, [], grace_seconds=0)
    assert report['removed_chunks'] == 4 and not os.path.exists(stale)


def test_gc_bad_copies_stay_while_needed(image, store, tmp_path):
    index_path, _result = backup(image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    digest = index.digest(3)
    bad = store.mark_bad(digest)
    os.utime(bad, (1000, 1000))
    report = gc.collect_garbage(store, [index_path], grace_seconds=0)
    assert report['missing_chunks'] == 1 and report['bad_chunks_kept'] == 1
    assert os.path.exists(bad) and os.stat(bad).st_atime > 1000       # touched by the mark
    backup(image, store, tmp_path, name='b')                           # a fresh copy
    os.utime(bad, (1000, 1000))
    report = gc.collect_garbage(store, [index_path], grace_seconds=0)
    assert report['bad_chunks_removed'] == 1 and not os.path.exists(bad)


def test_bwlimit_and_progress(image, store, tmp_path):
    seen = []
    _path, result = backup(image, store, tmp_path, bwlimit=64 * 1024,
                           progress=lambda done, total: seen.append((done, total)))
    # 4 MiB + 4 MiB + ... read at 64 MiB/s: the first request is free, the rest wait
    assert result['duration'] >= (result['read_bytes'] - CHUNK) / (64 * MiB) * 0.9
    assert seen[-1] == (SIZE, SIZE) and all(t == SIZE for _d, t in seen)
    assert [d for d, _t in seen] == sorted(d for d, _t in seen)


def test_a_failed_backup_writes_no_index(image, store, tmp_path, monkeypatch):
    def failing_insert(digest, blob, durable=True):
        raise StorageError("cannot store chunk: No space left on device")

    monkeypatch.setattr(store, 'insert', failing_insert)
    with pytest.raises(StorageError, match='No space left'):
        backup(image, store, tmp_path, workers=2)
    assert not os.path.exists(tmp_path / 'a.fidx')
    assert [name for name in os.listdir(tmp_path) if name.endswith('.tmp')] == []


def test_chunks_are_synced_before_the_index_is_written(image, store, tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(chunk_store, 'sync_filesystem',
                        lambda path: order.append(('sync', str(path))))
    real_close = fixed_index.FixedIndexWriter.close

    def close(self, durable=True):
        order.append(('index', durable))
        return real_close(self, durable)

    monkeypatch.setattr(fixed_index.FixedIndexWriter, 'close', close)
    backup(image, store, tmp_path)
    assert order == [('sync', store.base), ('index', True)]


def test_sync_filesystem_and_touch_atime(tmp_path):
    path = tmp_path / 'f'
    path.write_bytes(b'x')
    os.utime(path, (1000, 2000))
    files.sync_filesystem(str(tmp_path))
    assert files.touch_atime(str(path)) is True
    assert os.stat(path).st_atime > 1000 and os.stat(path).st_mtime == 2000
    assert files.touch_atime(str(tmp_path / 'absent')) is False


def test_zero_digest_of_the_short_last_chunk(tmp_path, store):
    image = str(tmp_path / 'zeros.raw')
    with open(image, 'wb') as handle:
        handle.write(bytes(CHUNK + 100))               # written zeroes, not holes
    path, result = backup(image, store, tmp_path)
    index = fixed_index.read_fixed_index(path)
    assert result['zero_chunks'] == 2 and result['new_chunks'] == 2
    assert index.digest(1) == hashlib.sha256(bytes(100)).digest()
    restore_disk_image(index, store, str(tmp_path / 'r.raw'))
    assert open(tmp_path / 'r.raw', 'rb').read() == bytes(CHUNK + 100)
    assert os.stat(tmp_path / 'r.raw').st_blocks == 0


def test_verify_sums_up_many_problems_of_one_kind_in_one_line(image, store, tmp_path):
    """Issue 20, 13a: every chunk gone is one line with the count and a few offsets, not one
    line per chunk."""
    index_path, _result = backup(image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    for digest in index.distinct_digests():
        os.unlink(store.chunk_path(digest))
    problems = verify_disk_index(index_path, store, verified=set(), corrupt=set(), what='s/d')
    [line] = problems
    assert line.startswith(f"s/d: {index_path}: 4 chunks are missing from the chunk store")
    assert line.endswith(f"(the first at offsets 0, {CHUNK}, {3 * CHUNK})"), line


class RecordingSource(RawFileSource):
    """A raw file whose readers start reads and finish them later, as ``NbdReader`` does (the
    read itself happens at ``finish_read``): it records the reads in flight and the buffers."""

    def __init__(self, path):
        super().__init__(path)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.started = []
        self.buffers = set()

    @contextlib.contextmanager
    def reader(self):
        with super().reader() as raw:
            yield RecordingReader(self, raw)


class RecordingReader:
    def __init__(self, source, raw):
        self.source = source
        self.raw = raw

    def start_read(self, buffer, offset):
        source = self.source
        with source.lock:
            source.in_flight += 1
            source.most_in_flight = max(source.most_in_flight, source.in_flight)
            source.started.append(offset)
            source.buffers.add(id(memoryview(buffer).obj))
        return buffer, offset

    def finish_read(self, token):
        buffer, offset = token
        self.raw.pread_into(buffer, offset)
        with self.source.lock:
            self.source.in_flight -= 1

    def pread_into(self, buffer, offset):
        self.finish_read(self.start_read(buffer, offset))


def index_digests(path):
    index = fixed_index.read_fixed_index(str(path))
    return [index.digest(position) for position in range(index.count)]


@pytest.fixture
def data_image(tmp_path):
    """16 chunks of random data: every one is read, hashed and written."""
    path = tmp_path / 'data.raw'
    path.write_bytes(os.urandom(16 * CHUNK))
    return str(path)


def test_the_reader_keeps_chunks_in_flight_and_buffers_are_reused(data_image, store, tmp_path):
    source = RecordingSource(data_image)
    write_disk_index(source, str(tmp_path / 'a.fidx'), store, workers=1)
    # even with one compute thread, the connection has the next chunk requested while one is
    # waited for (before, a worker's read was its only one)
    assert source.most_in_flight == backup_writer.READ_AHEAD
    assert sorted(source.started) == [n * CHUNK for n in range(16)]
    # bounded memory: a fixed set of chunk buffers, reused
    assert len(source.buffers) <= backup_writer.buffer_count(1)
    _path, plain = backup(data_image, store, tmp_path, name='b')
    assert index_digests(tmp_path / 'a.fidx') == index_digests(tmp_path / 'b.fidx')
    assert plain['new_chunks'] == 0 and plain['reused_chunks'] == 0


def test_reading_goes_on_while_a_chunk_is_written(data_image, store, tmp_path, monkeypatch):
    """A slow write (the disk, an object store) does not hold the reads back: while the first
    chunks' inserts wait, the reader reads further (before, each worker read, computed and wrote
    in turn, so two slow inserts stopped all reading after two chunks)."""
    source = RecordingSource(data_image)
    real_insert = store.insert
    read_on = threading.Event()
    stalled = []

    def slow_insert(digest, blob, durable=True):
        # generous: the machine may be busy; this only ever waits this long when reading stalled
        if not read_on.wait(60):
            stalled.append(digest)
            read_on.set()
        return real_insert(digest, blob, durable)

    monkeypatch.setattr(store, 'insert', slow_insert)
    original_finish = RecordingReader.finish_read

    def finish_read(self, token):
        original_finish(self, token)
        with self.source.lock:
            if len(self.source.started) >= 6:
                read_on.set()

    monkeypatch.setattr(RecordingReader, 'finish_read', finish_read)
    result = write_disk_index(source, str(tmp_path / 'a.fidx'), store, workers=2)
    assert stalled == []
    assert result['new_chunks'] == 16


def test_a_read_error_stops_the_backup_and_is_raised(data_image, store, tmp_path, monkeypatch):
    def finish_read(self, token):
        if token[1] == 5 * CHUNK:
            raise BackupFailed("reading 4194304 bytes at offset 20971520 failed: gone")
        self.raw.pread_into(*token)

    monkeypatch.setattr(RecordingReader, 'finish_read', finish_read)
    source = RecordingSource(data_image)
    with pytest.raises(BackupFailed, match='offset 20971520 failed'):
        write_disk_index(source, str(tmp_path / 'a.fidx'), store, workers=2)
    assert not os.path.exists(tmp_path / 'a.fidx')
    # the reader stopped at the error: nothing after the chunks already in the pipeline
    assert max(source.started) < 5 * CHUNK + (backup_writer.READ_AHEAD + 1) * CHUNK


# -- the restore's pipeline (issue 24, goal 4) --------------------------------------------------

class ReadRecorder:
    """Wraps a store's reads (``read_into`` where it has one, else ``read_view``): records the
    chunks read and the buffers they were read into."""

    def __init__(self, store, monkeypatch):
        self.lock = threading.Lock()
        self.count = 0
        self.buffers = set()
        self.on_read = None
        for method in ('read_into', 'read_view'):
            real = getattr(store, method, None)
            if real is not None:
                monkeypatch.setattr(store, method, self._wrap(real))

    def _wrap(self, real):
        def read(digest, *buffer):
            found = real(digest, *buffer)
            with self.lock:
                self.count += 1
                self.buffers.update(id(b) for b in buffer)
            if self.on_read is not None:
                self.on_read(self.count)
            return found
        return read


def test_restore_reads_on_while_a_chunk_is_written(data_image, store, tmp_path, monkeypatch):
    """A slow target disk does not hold the reads back: while the first chunks' writes wait, the
    readers read further (before, each thread read, decoded and wrote in turn, so two slow writes
    stopped all reading after two chunks)."""
    index_path, _result = backup(data_image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    reads = ReadRecorder(store, monkeypatch)
    read_on = threading.Event()
    stalled = []
    reads.on_read = lambda count: read_on.set() if count >= 6 else None
    real_pwrite = files.DirectFiles.pwrite

    def slow_pwrite(self, fd, data, offset, direct=True):
        # generous: the machine may be busy; this only ever waits this long when reading stalled
        if not read_on.wait(60):
            stalled.append(offset)
            read_on.set()
        return real_pwrite(self, fd, data, offset, direct)

    monkeypatch.setattr(files.DirectFiles, 'pwrite', slow_pwrite)
    target = tmp_path / 'r.raw'
    result = restore_disk_image(index, store, str(target), workers=2)
    assert stalled == []
    assert result['read_chunks'] == 16
    assert filecmp.cmp(data_image, target, shallow=False)


def test_restore_keeps_many_chunk_reads_in_flight(data_image, store, tmp_path, monkeypatch):
    """Reads of chunk files wait on the disk's latency (most blobs are small), so a restore keeps
    ``READS_IN_FLIGHT`` of them going, not one per worker: here every read waits until 8 are
    waiting together (before, two workers had two readers and the first read waited in vain)."""
    index_path, _result = backup(data_image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    together = 8
    assert image_restore.READS_IN_FLIGHT >= together
    waiting, lock, all_in = [0], threading.Lock(), threading.Event()
    alone = []
    real_read_into = store.read_into

    def read_into(digest, buffer):
        with lock:
            waiting[0] += 1
            if waiting[0] >= together:
                all_in.set()
        # generous: the machine may be busy; this only ever waits this long when reads are
        # not kept in flight together
        if not all_in.wait(60):
            alone.append(digest)
            all_in.set()
        return real_read_into(digest, buffer)

    monkeypatch.setattr(store, 'read_into', read_into)
    target = tmp_path / 'r.raw'
    result = restore_disk_image(index, store, str(target), workers=2)
    assert alone == []
    assert result['read_chunks'] == 16
    assert filecmp.cmp(data_image, target, shallow=False)


def test_restore_reuses_a_fixed_set_of_buffers(data_image, store, tmp_path, monkeypatch):
    index_path, _result = backup(data_image, store, tmp_path)
    reads = ReadRecorder(store, monkeypatch)
    target = tmp_path / 'r.raw'
    restore_disk_image(fixed_index.read_fixed_index(index_path), store, str(target), workers=2)
    assert reads.count == 16
    # bounded memory: the 16 chunks were read into a few buffers, each reused
    assert 0 < len(reads.buffers) <= image_restore.buffer_counts(2)[0]
    assert filecmp.cmp(data_image, target, shallow=False)


def test_a_damaged_chunk_stops_the_restore_and_is_named(data_image, store, tmp_path,
                                                        monkeypatch):
    """A chunk damaged on disk (a bit flipped in its payload; no CRC is computed unless a check
    fails) is named with its offset and as damaged (CRC32), the readers stop, and no target is
    left that could look complete."""
    index_path, _result = backup(data_image, store, tmp_path, compress=False)
    index = fixed_index.read_fixed_index(index_path)
    digest = index.digest(3)
    path = store.chunk_path(digest)
    raw = bytearray(open(path, 'rb').read())
    raw[100000] ^= 0x01
    open(path, 'wb').write(raw)
    reads = ReadRecorder(store, monkeypatch)
    # fewer reads in flight than the image's 16 chunks, so reads after the error can be missed
    monkeypatch.setattr(image_restore, 'READS_IN_FLIGHT', 2)
    target = tmp_path / 'r.raw'
    with pytest.raises(CorruptData, match=f"snap/disk: the chunk at offset {3 * CHUNK} "
                                          f"\\({digest.hex()}\\).*CRC32 mismatch.*damaged"):
        restore_disk_image(index, store, str(target), what='snap/disk', workers=2)
    assert not target.exists()
    assert sorted(os.listdir(tmp_path)) == ['a.fidx', 'data.raw', 'store']
    # the first error stopped the readers: not every chunk after it was read
    assert reads.count < 16


def test_a_chunk_file_too_large_for_its_chunk_is_named(image, store, tmp_path):
    index_path, _result = backup(image, store, tmp_path)
    index = fixed_index.read_fixed_index(index_path)
    digest = index.digest(0)
    with open(store.chunk_path(digest), 'ab') as handle:
        handle.write(bytes(CHUNK))
    # the image may hold this chunk at more than one offset: any reader can meet it first
    with pytest.raises(CorruptData, match=f"s/d: the chunk at offset [0-9]+ \\({digest.hex()}\\): "
                                          f"chunk {digest.hex()}: 83886.. bytes, more than"):
        restore_disk_image(index, store, str(tmp_path / 'r.raw'), what='s/d')
    assert not os.path.exists(tmp_path / 'r.raw')


def reference_data_runs(data, length, block=image_restore.SPARSE_BLOCK):
    """data_runs as a plain loop over every block: the definition the fast search must match."""
    runs, start = [], None
    for offset in range(0, length, block):
        if not bytes(data[offset:min(offset + block, length)]).strip(b'\0'):
            if start is not None:
                runs.append((start, offset))
                start = None
        elif start is None:
            start = offset
    if start is not None:
        runs.append((start, length))
    return runs


@pytest.mark.parametrize('seed', range(60))
def test_data_runs_match_a_block_by_block_scan(seed):
    # zero runs of random lengths at random (mostly unaligned) places, a short last block, and
    # chunks that are all data or all zeroes; in a 4 MiB chunk also runs of up to 300 blocks
    rng = random.Random(seed)
    block = image_restore.SPARSE_BLOCK
    length = rng.choice([16 * block, 16 * block - rng.randrange(1, block), 3 * block + 17,
                         1024 * block, 1024 * block - rng.randrange(1, block)])
    data = bytearray(os.urandom(length)) if seed % 5 else bytearray(length)
    longest = 300 * block if length > 16 * block else 3 * block
    for _run in range(rng.randrange(0, 8)):
        start = rng.randrange(0, length)
        end = min(length, start + rng.randrange(1, longest))
        data[start:end] = bytes(end - start)
    if seed % 7 == 0:               # the last (maybe short) block all zero
        tail = length - (length % block or block)
        data[tail:] = bytes(length - tail)
    assert list(image_restore.data_runs(data, length)) == reference_data_runs(data, length)


class CountingSearches:
    """A chunk's data whose ``find`` calls are counted (each one is a step of Python)."""

    def __init__(self, data):
        self.data = data
        self.searches = 0

    def find(self, *args):
        self.searches += 1
        return self.data.find(*args)

    def __getitem__(self, key):
        return self.data[key]


def test_a_mostly_empty_chunk_costs_a_few_searches_not_one_per_block():
    """A 4 MiB chunk with one 256 KiB write in it, as most chunks of a disk with scattered
    writes are: its 960 zero blocks are measured in a few dozen searches (a search per block,
    each a step of Python holding the GIL, cost 0.5 ms per chunk, 10 % of a raw restore's CPU)."""
    block = image_restore.SPARSE_BLOCK
    data = bytearray(1024 * block)
    data[300 * block:364 * block] = os.urandom(64 * block)
    counted = CountingSearches(data)
    assert list(image_restore.data_runs(counted, len(data))) == [(300 * block, 364 * block)]
    assert counted.searches <= 60
