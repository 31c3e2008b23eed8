"""The contract every ``Storage`` keeps (storage/base.py), as one suite that each storage runs:
tests/unit/test_storage_contract.py over the directory storage, a local datastore (plain and
encrypted) and a datastore on the in-memory backend. A module that imports these tests provides
a ``storage`` fixture: an empty storage of its kind. Everything is checked on real files."""
import inspect
import json
import os
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.errors import LockTimeout, StorageError
from guestvault_engine.storage.base import Storage
from guestvault_engine.storage.records import BackupRecord, DamagedBackup, Manifest

T = datetime(2026, 12, 1, 10, 0, 5, tzinfo=timezone.utc)
STAMP = '2026-12-01T10:00:05Z'
INDEX_FILE = 'drive-virtio0.img.fidx'


def manifest_for(vmid, when):
    """A manifest both formats' storages accept, with a key no version of guestvault knows."""
    return {'vmid': vmid, 'time': when, 'level': 'full', 'parent': None, 'chain': 'c',
            'guest_name': 'g', 'mode': 'snapshot', 'from_the_future': {'kept': [1, 2]},
            'disks': [{'id': 'virtio0', 'file': INDEX_FILE, 'virtual_size': 8 << 20,
                       'size': 8 << 20, 'level': 'full', 'csum': 'ab' * 32, 'bitmap': None,
                       'chunks': 2}]}


def take(storage, vmid=100, when=T, commit=True, **state):
    staged = storage.stage(vmid, when)
    with open(staged.file(INDEX_FILE), 'wb') as handle:
        handle.write(b'x')
    staged.write_guest_config({'vmid': vmid, 'name': 'g'})
    if state.get('notes'):
        staged.set_notes(state['notes'])
    if state.get('protected'):
        staged.set_protected()
    staged.write_manifest(Manifest.from_dict(manifest_for(vmid, when.strftime(
        '%Y-%m-%dT%H:%M:%SZ'))))
    if commit:
        staged.commit()
    return staged


def members(protocol):
    return {name for name in dir(protocol) if not name.startswith('_')} \
        | set(getattr(protocol, '__annotations__', {}))


def assert_conforms(implementation, protocol, instance=None):
    """Every member of ``protocol`` is on ``implementation``; each method takes the protocol's
    parameters, by the same names, in the same order, optional where the protocol's are (a
    default's value may differ: an S3 writer waits longer for a GC than a local one)."""
    for name in sorted(members(protocol)):
        if name in getattr(protocol, '__annotations__', {}):
            # attributes are set by __init__: checked on an instance, when given one
            assert instance is None or hasattr(instance, name), \
                f"{implementation.__name__} lacks the attribute {name}"
            continue
        assert hasattr(implementation, name), f"{implementation.__name__} lacks {name}"
        wanted = inspect.signature(getattr(protocol, name))
        got = inspect.signature(getattr(implementation, name))

        def shape(signature):
            return [(p.name, p.kind, p.default is p.empty) for p in signature.parameters.values()]
        assert shape(got) == shape(wanted), \
            f"{implementation.__name__}.{name}{got} is not {name}{wanted}"


def test_the_storage_has_every_member_of_the_protocol(storage):
    assert_conforms(type(storage), Storage, storage)
    assert isinstance(storage, Storage) and storage.label and storage.kind


def test_a_backup_is_listed_only_once_committed_and_its_manifest_round_trips(storage):
    staged = take(storage, commit=False)
    assert storage.backups(100) == [] and storage.guest_ids() in ([], [100])
    staged.commit()
    [record] = storage.backups(100)
    assert isinstance(record, BackupRecord) and record.id == f'vm/100/{STAMP}'
    assert record.time == T and record.storage is storage and not record.protected
    written = manifest_for(100, STAMP)
    assert {k: v for k, v in record.index.items() if k in written} == written
    assert record.manifest.disk('virtio0').virtual_size == 8 << 20
    assert record.manifest.get('from_the_future') == {'kept': [1, 2]}
    assert storage.guest_ids() == [100]
    assert storage.read_guest_config(record)['name'] == 'g'
    assert storage.backup_size(record) > 0
    assert os.path.exists(storage.file(record, INDEX_FILE))


def test_a_partial_backup_is_never_listed_and_remove_stale_deletes_it(storage):
    take(storage, commit=False)                  # a run killed before its commit
    assert storage.backups(100) == [] and storage.damaged(100) == []
    assert storage.stale_paths(100)
    storage.remove_stale(100)
    assert storage.stale_paths(100) == [] and storage.backups(100) == []


def test_a_protected_backup_is_refused_removal_until_unprotected(storage):
    take(storage, protected=True)
    [record] = storage.backups(100)
    assert record.protected
    with pytest.raises(StorageError, match='protected'):
        storage.remove(record)
    assert len(storage.backups(100)) == 1
    storage.set_protected(record, False)
    assert not record.protected and not storage.backups(100)[0].protected
    storage.remove(record)
    assert storage.backups(100) == []


def test_notes_and_verify_state_round_trip(storage):
    take(storage, notes='first')
    [record] = storage.backups(100)
    assert record.notes == 'first' and record.verify_state is None
    storage.set_notes(record, 'second')
    state = {'state': 'failed', 'problems': ['x'], 'time': STAMP, 'chain': [STAMP]}
    storage.write_verify_state(record, state)
    [again] = storage.backups(100)
    assert again.notes == 'second' and again.verify_state['state'] == 'failed'
    assert again.verify_state['problems'] == ['x']
    storage.set_notes(again, None)
    assert storage.backups(100)[0].notes is None
    result = storage.backups(100)[0].as_result()
    assert result['id'] == f'vm/100/{STAMP}' and result['verify_state'] == 'failed'
    assert result['notes'] is None and result['disks'][0]['id'] == 'virtio0'


def test_the_guest_lock_is_shared_by_readers_and_excludes_writers(storage):
    take(storage)
    with storage.guest_lock(100, 0, shared=True):
        with storage.guest_lock(100, 0, shared=True):
            pass
        with pytest.raises(LockTimeout):
            with storage.guest_lock(100, 0):
                pytest.fail('a writer got the lock readers hold')
    with storage.guest_lock(100, 0):
        with pytest.raises(LockTimeout):
            with storage.guest_lock(100, 0, shared=True):
                pytest.fail('a reader got the lock a writer holds')
    with storage.guest_lock(100, 0):
        pass                                      # released: free again


def test_next_backup_time_is_now_or_one_second_after_the_newest(storage):
    assert storage.next_backup_time(100, T + timedelta(microseconds=500)) == T
    take(storage)
    assert storage.next_backup_time(100, T) == T + timedelta(seconds=1)
    with pytest.raises(StorageError):
        storage.next_backup_time(100, T - timedelta(seconds=600))


def test_a_backup_whose_manifest_cannot_be_read_is_listed_as_damaged(storage):
    take(storage)
    take(storage, when=T + timedelta(hours=1))
    newest = storage.backups(100)[-1]
    manifest = [n for n in os.listdir(newest.path) if n.startswith('index.json')][0]
    with open(os.path.join(newest.path, manifest), 'wb') as handle:
        handle.write(b'{ not json')
    if getattr(storage, 'bucket', None) is not None:  # the bucket is the truth: damage it there
        key = os.path.relpath(os.path.join(newest.path, manifest), storage.path)
        storage.bucket.put(key, b'{ not json')
    backups, damaged = storage.scan(100)
    assert [b.id for b in backups] == [f'vm/100/{STAMP}']
    assert [(type(d), d.id) for d in damaged] == [(DamagedBackup, 'vm/100/2026-12-01T11:00:05Z')]
    assert damaged[0].reason


def test_a_writer_is_held_while_inside(storage):
    with storage.writer(0):
        pass


def test_a_manifest_is_replaced_in_two_steps(storage):
    take(storage)
    [record] = storage.backups(100)
    record.update_manifest(lambda m: m.update({'notes': 'through the manifest'}))
    [again] = storage.backups(100)
    assert again.manifest.notes == 'through the manifest' == record.manifest.notes
    assert json.loads(json.dumps(again.index)) == again.index
