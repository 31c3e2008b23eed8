"""Garbage collection's mark on a datastore: every index file under the backup groups counts,
fixed or dynamic, whatever its snapshot's manifest says; an index that cannot be parsed stops the
run before anything is removed (datastore/gc.py, datastore/storage.py walk_index_files)."""
import os

import pytest

from guestvault_engine.errors import CorruptData
from guestvault_engine.datastore import blob, chunk_store, gc
from guestvault_engine.datastore.dynamic_index import DynamicIndexWriter
from guestvault_engine.datastore.fixed_index import encode_fixed_index
from guestvault_engine.datastore.snapshot import SnapshotCodec
from guestvault_engine.datastore.storage import DatastoreStorage

CHUNK = 4 * 1024 * 1024
OLD = 1_000_000


@pytest.fixture
def datastore(tmp_path, monkeypatch):
    """A datastore (storage and chunk store) whose chunks are all older than any cutoff."""
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 0)
    chunks = chunk_store.FileChunkStore(tmp_path)
    chunks.create()
    monkeypatch.undo()
    return DatastoreStorage(str(tmp_path), 'ds', SnapshotCodec()), chunks


def chunk(chunks, text):
    raw, digest = blob.encode_chunk(text.encode() * 50)
    os.makedirs(os.path.dirname(chunks.chunk_path(digest)), exist_ok=True)
    chunks.insert(digest, raw)
    os.utime(chunks.chunk_path(digest), (OLD, OLD))
    return digest


def stored(chunks):
    return {name for folder in os.listdir(chunks.chunk_dir)
            if os.path.isdir(os.path.join(chunks.chunk_dir, folder))
            for name in os.listdir(os.path.join(chunks.chunk_dir, folder))
            if chunk_store.is_chunk_name(name)}


def snapshot(root, group, when='2026-03-01T10:00:00Z'):
    path = os.path.join(str(root), *group.split('/'), when)
    os.makedirs(path)
    return path


def fidx(folder, digests, name='drive-scsi0.img.fidx'):
    path = os.path.join(folder, name)
    with open(path, 'wb') as handle:
        handle.write(encode_fixed_index(len(digests) * CHUNK, digests))
    return path


def didx(folder, digests, name='root.pxar.didx'):
    writer = DynamicIndexWriter(os.path.join(folder, name))
    for number, digest in enumerate(digests):
        writer.add_chunk((number + 1) * 1000, digest)
    writer.close(durable=False)
    return writer.path


def collect(storage, chunks, **options):
    return gc.collect_garbage(chunks, storage.index_files(), grace_seconds=0, **options)


def test_the_digests_of_a_dynamic_index_are_kept(datastore, tmp_path):
    storage, chunks = datastore
    kept = [chunk(chunks, 'pxar one'), chunk(chunks, 'pxar two')]
    garbage = chunk(chunks, 'nobody names me')
    didx(snapshot(tmp_path, 'ct/200'), kept + kept[:1])
    didx(snapshot(tmp_path, 'host/backup-node'), kept[1:], name='etc.pxar.didx')
    report = collect(storage, chunks)
    assert stored(chunks) == {d.hex() for d in kept}
    assert report['index_files'] == 2 and report['referenced_chunks'] == 2
    assert report['removed_chunks'] == 1 and garbage.hex() not in stored(chunks)
    assert report['logical_bytes'] == 3000 + 1000 and report['warnings'] == []


def test_a_snapshot_with_a_damaged_manifest_keeps_its_chunks(datastore, tmp_path):
    storage, chunks = datastore
    digests = [chunk(chunks, 'disk data'), chunk(chunks, 'more disk data')]
    folder = snapshot(tmp_path, 'vm/100')
    fidx(folder, digests)
    with open(os.path.join(folder, 'index.json.blob'), 'wb') as handle:
        handle.write(b'not a blob at all')           # no backup listing can read this
    assert storage.backups(100) == []
    report = collect(storage, chunks)
    assert report['removed_chunks'] == 0 and stored(chunks) == {d.hex() for d in digests}


def test_namespaces_count_and_a_killed_runs_staging_folder_does_not(datastore, tmp_path):
    storage, chunks = datastore
    in_namespace = chunk(chunks, 'namespaced')
    staged_only = chunk(chunks, 'left by a killed backup')
    fidx(snapshot(tmp_path / 'ns' / 'team' / 'ns' / 'sub', 'vm/101'), [in_namespace])
    fidx(snapshot(tmp_path, 'vm/102', '.2026-03-01T11:00:00Z.tmp'), [staged_only])
    report = collect(storage, chunks)
    assert stored(chunks) == {in_namespace.hex()} and report['removed_chunks'] == 1


@pytest.mark.parametrize('damage, message', [
    (lambda raw: raw[:-10], 'truncated'),
    (lambda raw: b'NOTMAGIC' + raw[8:], 'unknown magic'),
    (lambda raw: raw[:100], 'header'),
])
@pytest.mark.parametrize('kind', ['fidx', 'didx'])
@pytest.mark.parametrize('check_mode', [True, False])
def test_an_index_that_cannot_be_parsed_stops_the_run_before_anything_is_removed(
        datastore, tmp_path, damage, message, kind, check_mode):
    storage, chunks = datastore
    garbage = chunk(chunks, 'garbage, but not while an index is unreadable')
    named = chunk(chunks, 'named by the damaged index')
    folder = snapshot(tmp_path, 'vm/103' if kind == 'fidx' else 'ct/103')
    path = fidx(folder, [named]) if kind == 'fidx' else didx(folder, [named])
    with open(path, 'rb') as handle:
        raw = handle.read()
    with open(path, 'wb') as handle:
        handle.write(damage(raw))
    before = {name: os.stat(chunks.chunk_path(bytes.fromhex(name))).st_atime
              for name in stored(chunks)}
    with pytest.raises(CorruptData, match=message) as caught:
        collect(storage, chunks, check_mode=check_mode)
    assert path in str(caught.value) and 'before removing anything' in str(caught.value)
    assert {garbage.hex(), named.hex()} == set(before)
    after = {name: os.stat(chunks.chunk_path(bytes.fromhex(name))).st_atime
             for name in stored(chunks)}
    assert after == before                            # not even marked


def test_missing_chunks_are_a_warning_naming_the_snapshots(datastore, tmp_path):
    storage, chunks = datastore
    present = chunk(chunks, 'still here')
    gone = chunk(chunks, 'about to vanish')
    fidx(snapshot(tmp_path, 'vm/104'), [present, gone])
    fidx(snapshot(tmp_path, 'vm/105'), [present])
    os.unlink(chunks.chunk_path(gone))
    for check_mode in (True, False):
        report = collect(storage, chunks, check_mode=check_mode)
        assert report['missing_chunks'] == 1
        [warning] = report['warnings']
        assert '1 chunk is missing' in warning and 'vm/104/2026-03-01T10:00:00Z' in warning
        assert 'vm/105' not in warning and 'verify' in warning
