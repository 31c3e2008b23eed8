"""The qcow2 chain's pure decisions: what a prune must fold, and where images point."""
from guestvault_engine.format.qcow2 import Qcow2Chain, backing_path, image_name
from guestvault_engine.storage.base import BackupRecord


def record(time, parent=None):
    index = {'vmid': 100, 'time': time, 'parent': parent, 'level': 'inc' if parent else 'full'}
    return BackupRecord(f'/s/vm/100/{time}', index, False)


def chain(*times):
    """A full and incrementals, each building on the one before."""
    records, parent = [], None
    for time in times:
        records.append(record(time, parent))
        parent = time
    return records


def folds(backups, removed):
    return [(r.index['time'], p) for r, p in Qcow2Chain().plan_removal(backups, set(removed))]


def test_removing_nothing_or_only_the_tip_folds_nothing():
    backups = chain('t1', 't2', 't3')
    assert folds(backups, []) == []
    assert folds(backups, ['t3']) == []


def test_a_kept_incremental_whose_parent_goes_reads_through_its_nearest_kept_ancestor():
    backups = chain('t1', 't2', 't3', 't4', 't5')
    assert folds(backups, ['t2', 't3']) == [('t4', 't1')]
    assert folds(backups, ['t2', 't4']) == [('t3', 't1'), ('t5', 't3')]


def test_when_the_full_goes_the_oldest_kept_incremental_becomes_a_full():
    backups = chain('t1', 't2', 't3')
    assert folds(backups, ['t1']) == [('t2', None)]
    assert folds(backups, ['t1', 't2']) == [('t3', None)]


def test_independent_chains_fold_independently():
    backups = sorted(chain('a1', 'a2') + chain('b1', 'b2'), key=lambda r: r.index['time'])
    assert folds(backups, ['a1']) == [('a2', None)]


def test_images_are_named_by_disk_and_incrementals_point_at_the_parent_relatively():
    assert image_name('virtio0') == 'virtio0.qcow2'
    assert backing_path('2026-03-10T01:00:00Z', 'virtio0') == '../2026-03-10T01:00:00Z/virtio0.qcow2'
