"""Prune on real chains: the policy's marks are carried out, and every kept backup still
restores the content it had, also when its parents are removed."""
import os
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.storage import catalog
from guestvault_engine.run.protect import ProtectRequest, run_protect
from guestvault_engine.run.verify import VerifyRequest, run_verify
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.errors import ConfigError
from guestvault_engine.run.prune import PruneRequest, run_prune
from guestvault_engine.run.restore import RestoreRequest, run_restore
from lab_checks import backups_in, hidden_in, same_content

MiB = 1 << 20


@pytest.fixture
def chain6(make_guest, store, config_dir, tmp_path):
    """full + 5 incrementals on two disks, each with known content."""
    guest = make_guest(disks=[('qcow2', 16 * MiB), ('qcow2', 8 * MiB)])
    points = []
    for step in range(6):
        guest.write('vd0', 0x10 + step, step * 2 * MiB, 3 * MiB)   # overlaps the previous
        guest.write('vd1', 0x40 + step, (step % 3) * MiB, MiB)
        if step == 4:
            guest.discard('vd0', 0, MiB)
        result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                     dumpdir=store, config_dir=config_dir))
        refs = [guest.snapshot_disk(i, str(tmp_path / f'ref{step}-{i}.qcow2')) for i in (0, 1)]
        points.append((result, refs))
    assert [p[0]['level'] for p in points] == ['full'] + ['inc'] * 5
    return guest, points


def assert_restores(guest, store, config_dir, tmp_path, points, times):
    for result, refs in points:
        if result['time'] not in times:
            continue
        target = tmp_path / f"check-{result['time'].replace(':', '')}"
        run_restore(RestoreRequest(vmid=guest.vmid, dumpdir=store, config_dir=config_dir,
                                   target_dir=str(target), backup=result['time']))
        for index, disk in enumerate(('vd0', 'vd1')):
            ok, out = same_content(refs[index], str(target / f'{disk}.qcow2'))
            assert ok, f"{result['time']} {disk}: {out}"
        assert run_verify(VerifyRequest(guest.vmid, result['time'], dumpdir=store,
                                        config_dir=config_dir))['verify_state'] == 'ok'


def prune(guest, store, config_dir, policy, **options):
    return run_prune(PruneRequest(vmid=guest.vmid, dumpdir=store, config_dir=config_dir,
                                  prune_backups=policy, timezone='UTC', **options))


def test_pruning_the_middle_of_a_chain_keeps_every_kept_backup_bit_exact(
        chain6, store, config_dir, tmp_path):
    guest, points = chain6
    times = [p[0]['time'] for p in points]
    # Remove the full and two incrementals in the middle, keep three.
    plan = [t for i, t in enumerate(times) if i not in (0, 2, 3)]
    marks = {t: ('keep' if t in plan else 'remove') for t in times}
    # keep-last alone cannot express this selection, so protect the ones to keep and prune all
    # unprotected ones (keep-last=1 keeps the newest); protection is what keeps them.
    for t in plan[:-1]:
        run_protect(ProtectRequest(guest.vmid, t, protected=True, dumpdir=store, config_dir=config_dir))
    result = prune(guest, store, config_dir, 'keep-last=1')
    assert {b['time']: b['mark'] for b in result['backups']} == {
        t: ('protected' if t in plan[:-1] else marks[t]) for t in times}
    removed = [f"vm/{guest.vmid}/{t}" for t in times if marks[t] == 'remove']
    assert sorted(result['removed']) == sorted(removed)
    assert backups_in(store, guest.vmid) == plan and hidden_in(store, guest.vmid) == []
    assert result['bytes_freed'] > 0
    assert [f['new_parent'] for f in result['folded']] == [None, plan[0]]
    assert_restores(guest, store, config_dir, tmp_path, points, plan)
    # The folded backups are still one chain: the oldest kept one is now a full.
    levels = {b.index['time']: (b.index['level'], b.index['parent'])
              for b in catalog.all_backups(catalog_storage(store), guest.vmid)}
    assert levels[plan[0]] == ('full', None) and levels[plan[1]] == ('inc', plan[0])


def catalog_storage(store):
    from guestvault_engine.storage.directory import DirStorage
    return DirStorage(store)


def test_check_mode_reports_rules_and_bytes_and_removes_nothing(chain6, store, config_dir):
    guest, points = chain6
    before = backups_in(store, guest.vmid)
    result = prune(guest, store, config_dir, 'keep-last=2', check_mode=True)
    assert [b['mark'] for b in result['backups']] == ['keep', 'keep'] + ['remove'] * 4
    assert [b['rule'] for b in result['backups'][:2]] == ['last #1', 'last #2']
    assert result['bytes_freed'] > 0 and result['changed'] is True
    assert backups_in(store, guest.vmid) == before


def test_keep_last_removes_the_oldest_and_the_rest_still_restore(chain6, store, config_dir,
                                                                 tmp_path):
    guest, points = chain6
    result = prune(guest, store, config_dir, {'keep-last': 2})
    kept = [p[0]['time'] for p in points[-2:]]
    assert backups_in(store, guest.vmid) == kept
    assert_restores(guest, store, config_dir, tmp_path, points, kept)
    # The chain goes on: the guest's bitmap still belongs to the newest kept backup.
    guest.write('vd0', 0x7F, 0, MiB)
    nxt = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=store,
                                              config_dir=config_dir))
    assert nxt['level'] == 'inc' and nxt['parent'] == kept[-1]
    again = prune(guest, store, config_dir, {'keep-last': 2})
    assert again['removed'] == [f"vm/{guest.vmid}/{kept[0]}"]
    assert prune(guest, store, config_dir, {'keep-last': 2})['changed'] is False  # idempotent


def test_no_policy_keeps_everything_and_storage_cfg_policy_applies(chain6, store, config_dir):
    guest, points = chain6
    assert prune(guest, store, config_dir, None)['removed'] == []
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"dir: backups\n\tpath {store}\n\tcontent backup\n\tprune-backups keep-last=4\n")
    result = run_prune(PruneRequest(vmid=guest.vmid, storage='backups', config_dir=config_dir))
    assert result['policy_source'] == 'storage backups' and len(result['removed']) == 2


def test_bad_retention_input_is_refused_before_anything_changes(chain6, store, config_dir):
    guest, points = chain6
    before = backups_in(store, guest.vmid)
    for bad in ('keep-last=-1', 'keep-lats=3', 'keep-all=1,keep-last=2', 'keep-daily=x'):
        with pytest.raises(ConfigError):
            prune(guest, store, config_dir, bad)
    assert backups_in(store, guest.vmid) == before


def test_an_interrupted_manifest_update_is_completed_or_dropped(chain6, store, config_dir):
    guest, points = chain6
    storage = catalog_storage(store)
    record = catalog.resolve(storage, guest.vmid, points[1][0]['time'])
    good = dict(record.index, notes_marker=True)
    storage.stage_manifest(record, good)                 # matches the files: completed
    bad = dict(record.index)
    bad['disks'] = [dict(d, sha256='0' * 64) for d in bad['disks']]
    other = catalog.resolve(storage, guest.vmid, points[2][0]['time'])
    storage.stage_manifest(other, bad)                   # does not match: dropped
    prune(guest, store, config_dir, None)
    assert catalog.resolve(storage, guest.vmid,
                           points[1][0]['time']).index.get('notes_marker') is True
    assert not os.path.exists(os.path.join(other.path, 'index.json.new'))
    assert run_verify(VerifyRequest(guest.vmid, points[2][0]['time'], dumpdir=store,
                                    config_dir=config_dir))['verify_state'] == 'ok'


def test_daily_retention_over_real_backup_directories(make_guest, store, config_dir, tmp_path):
    """Backups a day apart (named by their time): keep-daily keeps one per day."""
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    base = datetime(2026, 11, 1, 22, 0, tzinfo=timezone.utc)
    for day in range(5):
        for hour in (0, 1):
            run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                dumpdir=store, config_dir=config_dir, level='copy'))
    # Re-date the copies (copy backups are independent) to two a day over five days.
    storage = catalog_storage(store)
    for i, record in enumerate(storage.backups(guest.vmid)):
        when = base + timedelta(days=i // 2, hours=i % 2)
        stamp = when.strftime('%Y-%m-%dT%H:%M:%SZ')
        index = dict(record.index, time=stamp)
        storage.commit_manifest(record, storage.stage_manifest(record, index))
        os.rename(record.path, os.path.join(os.path.dirname(record.path), stamp))
    result = prune(guest, store, config_dir, 'keep-daily=3')
    kept = sorted(b['time'] for b in result['backups'] if b['mark'] == 'keep')
    assert kept == ['2026-11-03T23:00:00Z', '2026-11-04T23:00:00Z', '2026-11-05T23:00:00Z']
    assert [b['rule'] for b in result['backups'] if b['mark'] == 'keep'] == [
        'daily #1', 'daily #2', 'daily #3']
    assert backups_in(store, guest.vmid) == kept
