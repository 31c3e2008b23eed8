"""The qcow2 chain's image digests: a sha256 per segment of the file (new backups), one sha256
of the whole file (older backups), both verified against the real file on a real directory
storage; any changed byte, qcow2 metadata or guest data, is found and its segment named."""
import hashlib
import json
import os
import subprocess
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from guestvault_engine.format import qcow2
from guestvault_engine.format.base import TargetImage
from guestvault_engine.storage.directory import DirStorage
from guestvault_engine.times import format_time

SEGMENT = 64 << 10      # one qcow2 cluster: a small image has many segments
WHEN = datetime(2026, 3, 10, 1, 0, 0, tzinfo=timezone.utc)
TIME = format_time(WHEN)


@pytest.fixture(autouse=True)
def small_segments(monkeypatch):
    monkeypatch.setattr(qcow2, 'SEGMENT_SIZE', SEGMENT)


@pytest.fixture
def store(tmp_path):
    path = tmp_path / 'store'
    path.mkdir()
    return DirStorage(str(path), 'local')


def real_image(path, data_clusters=12):
    """A qcow2 made by qemu-img from a raw file: header, tables, then guest data clusters."""
    raw = f"{path}.raw"
    with open(raw, 'wb') as handle:
        handle.truncate(8 << 20)
        for n in range(data_clusters):
            handle.seek(n * 3 * SEGMENT)
            handle.write(os.urandom(SEGMENT))
    subprocess.run(['qemu-img', 'convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, path],
                   check=True)
    os.unlink(raw)


def whole_sha256(path):
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def backup(store, digest_fields=None):
    """A committed backup of one disk whose manifest records ``digest_fields`` for its image
    (default: what a backup records today, through finish_disks)."""
    with store.guest_lock(100, 0):
        staged = store.stage(100, WHEN)
    path = staged.file('vd0.qcow2')
    real_image(path)
    disk = SimpleNamespace(id='vd0', node='drive-vd0', format='qcow2', virtual_size=8 << 20)
    entry = qcow2.Qcow2Chain().finish_disks(
        staged, [disk], {'vd0': TargetImage('vd0', path, 'full')}, {'vd0': 8 << 20}, {})[0]
    entry = entry.to_dict()
    if digest_fields is not None:
        for key in ('segment_size', 'segment_sha256'):
            entry.pop(key)
        entry.update(digest_fields(path))
    staged.write_manifest({'vmid': 100, 'time': TIME, 'level': 'full', 'disks': [entry]})
    staged.commit()
    return store.backups(100)[0]


def flip(path, offset):
    with open(path, 'r+b') as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0x01]))


def problems(store, record):
    return qcow2.Qcow2Chain().verify_files(store, [record])


def test_a_new_backup_records_the_sha256_of_each_segment_of_its_image(store):
    record = backup(store)
    disk = record.manifest.disk('vd0')
    path = store.file(record, 'vd0.qcow2')
    with open(path, 'rb') as handle:
        data = handle.read()
    assert disk.sha256 is None and disk.segment_size == SEGMENT
    assert disk.segment_sha256 == [hashlib.sha256(data[offset:offset + SEGMENT]).hexdigest()
                                   for offset in range(0, len(data), SEGMENT)]
    assert len(disk.segment_sha256) > 10
    assert problems(store, record) == []
    # the image is plain qcow2: qemu-img alone reads it
    assert subprocess.run(['qemu-img', 'check', '-q', path], check=False).returncode == 0


def test_segments_grow_so_a_huge_image_has_at_most_max_segments():
    assert qcow2.segment_size(0) == SEGMENT
    assert qcow2.segment_size(SEGMENT * qcow2.MAX_SEGMENTS) == SEGMENT
    assert qcow2.segment_size(SEGMENT * qcow2.MAX_SEGMENTS + 1) == 2 * SEGMENT


@pytest.mark.parametrize('where', ['header', 'guest data', 'last byte'])
def test_a_flipped_byte_anywhere_is_found_and_its_segment_named(store, where):
    record = backup(store)
    path = store.file(record, 'vd0.qcow2')
    size = os.path.getsize(path)
    offset = {'header': 5, 'guest data': size - 3 * SEGMENT + 100, 'last byte': size - 1}[where]
    flip(path, offset)
    start = offset // SEGMENT * SEGMENT
    end = min(start + SEGMENT, size) - 1
    found = problems(store, record)
    assert len(found) == 1, found
    assert found[0].startswith(f"{record.id}: vd0.qcow2 has sha256 ")
    assert f"in bytes {start}-{end}, its manifest says" in found[0]
    assert 'changed or is damaged' in found[0]


@pytest.mark.parametrize('change', ['truncated', 'grown by a segment'])
def test_a_file_of_another_length_is_found(store, change):
    record = backup(store)
    path = store.file(record, 'vd0.qcow2')
    size = os.path.getsize(path)
    with open(path, 'r+b') as handle:
        handle.truncate(size - SEGMENT if change == 'truncated' else size + SEGMENT)
    found = problems(store, record)
    assert found == [f"{record.id}: vd0.qcow2 has {os.path.getsize(path)} bytes, its manifest "
                     f"says {size}: the file changed or is damaged"]


def test_an_older_manifest_with_one_sha256_of_the_file_still_verifies(store):
    record = backup(store, lambda path: {'sha256': whole_sha256(path)})
    assert record.manifest.disk('vd0').segment_sha256 is None
    assert problems(store, record) == []
    flip(store.file(record, 'vd0.qcow2'), os.path.getsize(store.file(record, 'vd0.qcow2')) // 2)
    found = problems(store, record)
    assert len(found) == 1 and found[0].startswith(f"{record.id}: vd0.qcow2 has sha256 ")
    assert 'in the file, its manifest says' in found[0]


def test_every_digest_an_entry_records_must_match(store):
    # segments right, a whole-file sha256 wrong: still a failed verify, as a pending manifest
    # with a wrong digest must never be taken for one that matches its files
    record = backup(store)
    record.manifest.disk('vd0').sha256 = '0' * 64
    found = problems(store, record)
    assert len(found) == 1 and 'in the file, its manifest says 0000000000000000...' in found[0]


@pytest.mark.parametrize('fields', [{}, {'segment_size': 0, 'segment_sha256': []},
                                    {'segment_size': SEGMENT, 'segment_sha256': None}])
def test_an_entry_without_a_usable_digest_is_a_problem_not_a_pass(store, fields):
    record = backup(store, lambda path: fields)
    assert problems(store, record) == [
        f"{record.id}: vd0.qcow2: its manifest records no usable digest of the file: restore "
        "the backup's index.json from a copy, or remove the backup"]


def test_a_missing_image_is_named(store):
    record = backup(store)
    os.unlink(store.file(record, 'vd0.qcow2'))
    assert problems(store, record) == [f"{record.id}: vd0.qcow2 is missing"]


def test_recover_completes_a_pending_manifest_only_when_its_segments_match(store):
    record = backup(store)
    good = dict(record.index, marker=True)
    store.stage_manifest(record, good)
    assert qcow2.Qcow2Chain().recover(store, 100) == [(record.id, True)]
    record = store.backups(100)[0]
    assert record.index['marker'] is True
    bad = json.loads(json.dumps(record.index))
    bad['disks'][0]['segment_sha256'][1] = '0' * 64
    store.stage_manifest(record, bad)
    assert qcow2.Qcow2Chain().recover(store, 100) == [(record.id, False)]
    assert store.backups(100)[0].index['disks'][0]['segment_sha256'][1] != '0' * 64
