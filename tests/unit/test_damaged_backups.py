"""Issue 20, finding 2: a backup whose manifest cannot be read is listed as damaged, with the
reason, and never passed over in silence (storage/directory.py scan, storage/catalog.py, prune)."""
import os
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.errors import BackupDamaged
from guestvault_engine.policy.retention import RetentionPolicy
from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
from guestvault_engine.run.prune import prune_guest
from guestvault_engine.storage import catalog
from guestvault_engine.storage.directory import DirStorage
from guestvault_engine.times import format_time

T = datetime(2026, 3, 10, 1, 0, 0, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path):
    """Guest 100: good backups at T and T+1h, the newest (T+2h) with a damaged index.json."""
    path = tmp_path / 'store'
    path.mkdir()
    storage = DirStorage(str(path), 'local')
    for hours in range(3):
        when = T + timedelta(hours=hours)
        with storage.guest_lock(100, 0):
            staged = storage.stage(100, when)
        staged.write_json('index.json', {'vmid': 100, 'time': format_time(when),
                                         'level': 'full', 'disks': []})
        staged.commit()
    newest = os.path.join(storage.guest_dir(100), format_time(T + timedelta(hours=2)))
    with open(os.path.join(newest, 'index.json'), 'w') as handle:
        handle.write('{"vmid": 100, "ti')           # a torn write
    return storage


def test_the_listing_keeps_good_backups_and_names_the_damaged_one_with_its_reason(store):
    records, damaged = store.scan(100)
    assert [r.index['time'] for r in records] == ['2026-03-10T01:00:00Z', '2026-03-10T02:00:00Z']
    assert [r.path for r in store.backups(100)] == [r.path for r in records]
    [broken] = damaged
    assert broken.id == 'vm/100/2026-03-10T03:00:00Z' and broken.vmid == 100
    assert 'index.json is not valid JSON' in broken.reason
    os.unlink(os.path.join(broken.path, 'index.json'))
    [broken] = store.damaged(100)
    assert broken.reason.endswith('index.json is missing')


def test_latest_and_until_warn_naming_the_damaged_one_and_use_the_newest_good_one(store):
    warnings = []
    record = catalog.resolve(store, 100, 'latest', warnings=warnings)
    assert record.index['time'] == '2026-03-10T02:00:00Z'
    [warning] = warnings
    assert 'vm/100/2026-03-10T03:00:00Z' in warning and 'not valid JSON' in warning
    assert 'Using vm/100/2026-03-10T02:00:00Z' in warning
    warnings = []
    catalog.resolve(store, 100, until='2026-03-10T02:30:00Z', warnings=warnings)
    assert warnings == []                     # the damaged one is after until


def test_naming_a_damaged_backup_says_what_is_wrong(store):
    for name in ('2026-03-10T03:00:00Z', 'vm/100/2026-03-10T03:00:00Z'):
        with pytest.raises(BackupDamaged, match='vm/100/2026-03-10T03:00:00Z is damaged: .*JSON'):
            catalog.resolve(store, 100, name)


def test_the_next_backup_is_named_after_a_damaged_newest(store):
    when = store.next_backup_time(100, T + timedelta(hours=2))
    assert when == T + timedelta(hours=2, seconds=1)


def test_backup_info_lists_it_as_damaged(store):
    listed = run_backup_info(BackupInfoRequest(100, dumpdir=store.path))
    assert len(listed['backups']) == 2
    [damaged] = listed['damaged']
    assert damaged['id'] == 'vm/100/2026-03-10T03:00:00Z' and 'JSON' in damaged['reason']
    assert damaged['epoch'] == int((T + timedelta(hours=2)).timestamp())
    assert 'vm/100/2026-03-10T03:00:00Z' in listed['warnings'][0]


def test_prune_neither_counts_nor_removes_a_damaged_backup(store):
    policy = RetentionPolicy.from_options({'keep-last': 1})
    for check_mode in (True, False):
        report, _folds, _freed, damaged = prune_guest(store, 100, policy, None, check_mode, 0,
                                                      lambda message: None)
        # keep-last=1 keeps the newest good backup, not the damaged one
        assert {r['time']: r['mark'] for r in report} == {'2026-03-10T01:00:00Z': 'remove',
                                                          '2026-03-10T02:00:00Z': 'keep'}
        assert [d.id for d in damaged] == ['vm/100/2026-03-10T03:00:00Z']
    assert [r.index['time'] for r in store.backups(100)] == ['2026-03-10T02:00:00Z']
    assert len(store.damaged(100)) == 1
