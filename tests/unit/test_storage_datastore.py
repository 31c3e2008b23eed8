"""The datastore storage and its snapshot codec: listing, staging, notes, verify state, writers."""
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from guestvault_engine.errors import StorageError
from guestvault_engine.datastore.crypt import CryptConfig
from guestvault_engine.datastore.manifest import BackupManifest
from guestvault_engine.datastore.snapshot import SnapshotCodec, index_name
from guestvault_engine.storage.base import BackupRecord
from guestvault_engine.datastore.storage import DatastoreStorage

CSUM = 'ab' * 32


def index_for(vmid, when, level='full'):
    return {'vmid': vmid, 'time': when, 'level': level, 'parent': None, 'chain': 'c',
            'guest_name': 'g', 'mode': 'snapshot',
            'disks': [{'id': 'virtio0', 'file': index_name('virtio0'), 'virtual_size': 8 << 20,
                       'size': 8 << 20, 'level': level, 'csum': CSUM, 'bitmap': None}]}


def take(store, vmid, when, notes=None, protected=False):
    staged = store.stage(vmid, datetime.strptime(when, '%Y-%m-%dT%H:%M:%SZ').replace(
        tzinfo=timezone.utc))
    with open(staged.file(index_name('virtio0')), 'wb') as handle:
        handle.write(b'x')
    staged.write_guest_config({'vmid': vmid, 'name': 'g'})
    if notes:
        staged.set_notes(notes)
    if protected:
        staged.set_protected()
    staged.write_manifest(index_for(vmid, when))
    staged.write_log('line one\n')
    staged.commit()
    return staged.path


@pytest.fixture(params=['plain', 'encrypted'])
def store(tmp_path, request):
    crypt = CryptConfig(bytes(range(32))) if request.param == 'encrypted' else None
    return DatastoreStorage(str(tmp_path), 'ds', SnapshotCodec(crypt))


def test_a_snapshot_is_listed_once_committed_with_pbs_files(store, tmp_path):
    staged = store.stage(100, datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc))
    assert store.backups(100) == []                     # hidden while written
    staged.discard()
    path = take(store, 100, '2026-12-01T10:00:05Z', notes='first', protected=True)
    assert sorted(os.listdir(path)) == ['.protected', 'client.log.blob', 'drive-virtio0.img.fidx',
                                        'guest.json.blob', 'index.json.blob']
    with open(tmp_path / 'vm' / '100' / 'owner') as handle:
        assert handle.read() == 'root@pam\n'
    [record] = store.backups(100)
    assert record.id == 'vm/100/2026-12-01T10:00:05Z' and record.protected
    assert store.read_notes(record) == 'first'
    assert store.read_guest_config(record) == {'vmid': 100, 'name': 'g'}
    assert store.read_log(record) == 'line one\n'
    with open(os.path.join(path, 'index.json.blob'), 'rb') as handle:
        manifest = BackupManifest.decode(handle.read(), store.codec.crypt)
    names = [f.filename for f in manifest.files]
    assert names == ['drive-virtio0.img.fidx', 'guest.json.blob']   # the log is not listed
    assert manifest.notes == 'first'
    mode = 'encrypt' if store.codec.crypt else 'none'
    assert {f.crypt_mode for f in manifest.files} == {mode}
    if store.codec.crypt:
        assert manifest.signature and manifest.fingerprint == store.codec.crypt.fingerprint


def test_notes_and_verify_state_live_in_the_manifest_and_keep_its_signature(store):
    path = take(store, 101, '2026-12-01T11:00:00Z')
    [record] = store.backups(101)
    before = store.codec.read_manifest(path).signature
    store.set_notes(record, 'changed later')
    store.write_verify_state(record, {'state': 'failed', 'problems': ['p'], 'time': 't',
                                      'chain': []})
    [record] = store.backups(101)
    assert store.read_notes(record) == 'changed later'
    assert store.read_verify_state(record)['state'] == 'failed'
    assert store.read_verify_state(record)['problems'] == ['p']
    manifest = store.codec.read_manifest(path, check_signature=True)  # still valid
    assert manifest.signature == before
    assert manifest.unprotected['verify_state']['state'] == 'failed'
    assert manifest.unprotected['verify_state']['upid'].startswith('UPID:')


def test_a_snapshot_written_by_a_pbs_client_lists_as_a_full_backup(tmp_path):
    store = DatastoreStorage(str(tmp_path), 'ds', SnapshotCodec())
    snap = tmp_path / 'vm' / '300' / '2026-01-02T03:04:05Z'
    snap.mkdir(parents=True)
    manifest = BackupManifest('vm', '300', 1767323045)
    manifest.add_file('drive-scsi0.img.fidx', 1 << 30, bytes(32))
    manifest.add_file('qemu-server.conf.blob', 10, bytes(32))
    (snap / 'index.json.blob').write_bytes(manifest.encode())
    [record] = store.backups(300)
    assert record.index['level'] == 'full' and record.index['time'] == '2026-01-02T03:04:05Z'
    assert [(d['id'], d['virtual_size']) for d in record.index['disks']] == [('scsi0', 1 << 30)]


def test_a_damaged_manifest_is_not_a_backup(store, tmp_path):
    path = take(store, 102, '2026-12-01T12:00:00Z')
    with open(os.path.join(path, 'index.json.blob'), 'r+b') as handle:
        handle.seek(20)
        handle.write(b'\xff\xff')
    assert store.backups(102) == []


def test_writers_announce_themselves_and_a_dead_ones_file_is_dropped(store, tmp_path):
    assert store.oldest_writer_start() is None
    with store.writer():
        started = store.oldest_writer_start()
        assert started is not None and abs(started - datetime.now().timestamp()) < 60
    assert store.oldest_writer_start() is None
    # A writer file left by a killed process (nobody holds its lock) is removed.
    folder = tmp_path / '.writers'
    (folder / '1-dead').write_text('12.5\n')
    assert store.oldest_writer_start() is None and not (folder / '1-dead').exists()
    # One held by another live process counts.
    held = folder / '2-live'
    held.write_text('42.0\n')
    proc = subprocess.Popen([sys.executable, '-c',
                             'import fcntl,sys,time; f=open(sys.argv[1]); '
                             'fcntl.flock(f, fcntl.LOCK_EX); print("ok", flush=True); '
                             'time.sleep(30)', str(held)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'ok'
        assert store.oldest_writer_start() == 42.0
    finally:
        proc.kill()
        proc.wait()


def test_removal_renames_then_deletes_and_refuses_protected(store):
    take(store, 103, '2026-12-01T13:00:00Z', protected=True)
    take(store, 103, '2026-12-01T13:00:01Z')
    first, second = store.backups(103)
    with pytest.raises(StorageError, match='protected'):
        store.remove(first)
    store.remove(second)
    assert [b.id for b in store.backups(103)] == [first.id]
    # a record's index is plain JSON: it comes back from a round trip unchanged
    assert isinstance(first, BackupRecord) and json.loads(json.dumps(first.index)) == first.index
