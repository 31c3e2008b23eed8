"""vzdump archive names as pve-storage parses them, and a directory storage that lists
``vzdump-lxc-<vmid>-<time>.tar.zst`` archives beside its VM backups: scan, guest_ids, notes and
protection in PVE's companions, removal with its companions, a ``.dat`` never listed but stale,
and prune, protect and backup_info over them (real files; no archive content is read here)."""
import os
from datetime import datetime, timezone

import pytest

from storage_contract import take
from guestvault_engine.errors import StorageError
from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
from guestvault_engine.run.protect import ProtectRequest, run_protect
from guestvault_engine.run.prune import PruneRequest, run_prune
from guestvault_engine.storage import catalog, vzdump_names
from guestvault_engine.storage.directory import DirStorage


@pytest.fixture(autouse=True)
def berlin(monkeypatch):
    """Archive names are local time: a zone with an offset shows it."""
    monkeypatch.setenv('TZ', 'Europe/Berlin')
    import time
    time.tzset()
    yield
    monkeypatch.delenv('TZ')
    time.tzset()


NAME = 'vzdump-lxc-777-2024_07_01-12_30_05.tar.zst'


def test_standard_names_parse_as_pve_storage_parses_them():
    parsed = vzdump_names.parse(NAME)
    assert (parsed.type, parsed.vmid, parsed.format, parsed.compression) == \
        ('lxc', 777, 'tar', 'zst')
    # 12:30:05 in Berlin in July (CEST, UTC+2)
    assert parsed.time == datetime(2024, 7, 1, 10, 30, 5, tzinfo=timezone.utc)
    assert parsed.log_name == 'vzdump-lxc-777-2024_07_01-12_30_05.log'
    assert parsed.notes_name == NAME + '.notes'
    assert parsed.protected_name == NAME + '.protected'
    assert parsed.dat_name == 'vzdump-lxc-777-2024_07_01-12_30_05.tar.dat'
    assert vzdump_names.dat_name('vzdump-lxc-777-2024_07_01-12_30_05.tar') == \
        'vzdump-lxc-777-2024_07_01-12_30_05.dat'
    tgz = vzdump_names.parse('vzdump-openvz-100-2015_01_01-00_00_00.tgz')
    assert (tgz.type, tgz.format, tgz.compression) == ('openvz', 'tar', 'gz')
    vma = vzdump_names.parse('vzdump-qemu-100-2015_01_01-00_00_00.vma.lzo')
    assert (vma.type, vma.format, vma.compression) == ('qemu', 'vma', 'lzo')


@pytest.mark.parametrize('name', [
    'vzdump-lxc-99-2024_07_01-12_30_05.tar.zst',         # vmid below 100
    'vzdump-lxc-777-2024_07_01-12_30_05.tar.xz',         # unknown compression
    'vzdump-lxc-777-2024_07_01-12_30_05.tar.dat',        # being written
    'vzdump-lxc-777-2024_07_01-12_30_05.tar.zst.notes',
    'vzdump-lxc-777-2024_07_01-12_30_05.log',
    'vzdump-lxc-777-2024_13_01-12_30_05.tar',            # no 13th month
    'vzdump-lxc-777-custom.tar.zst',                     # PVE lists it, but without a vmid
])
def test_other_names_are_no_backups(name):
    assert vzdump_names.parse(name) is None


def test_names_are_written_in_local_time_and_read_back():
    when = datetime(2024, 1, 5, 23, 0, 1, tzinfo=timezone.utc)     # 00:00:01 CET next day
    name = vzdump_names.archive_name('lxc', 300, when, 'gzip')
    assert name == 'vzdump-lxc-300-2024_01_06-00_00_01.tar.gz'
    assert vzdump_names.parse(name).time == when
    assert vzdump_names.archive_name('lxc', 300, when, '0').endswith('00_00_01.tar')
    assert vzdump_names.archive_name('lxc', 300, when, 'lzo').endswith('.tar.lzo')


def put(folder, name, data=b'archive bytes'):
    path = os.path.join(folder, name)
    with open(path, 'wb') as handle:
        handle.write(data)
    return path


@pytest.fixture
def store(tmp_path):
    return DirStorage(str(tmp_path))


def test_archives_are_listed_with_vm_backups_and_dats_are_not(store, tmp_path):
    take(store, vmid=777)                                   # a qcow2-chain backup dir
    put(tmp_path, NAME)
    put(tmp_path, 'vzdump-lxc-777-2024_07_02-00_00_00.tar.dat')
    put(tmp_path, 'vzdump-lxc-778-2024_07_01-12_30_05.tar.lzo', b'x' * 10)
    put(tmp_path, 'vzdump-lxc-777-2024_07_01-12_30_05.log', b'log')
    backups = store.backups(777)
    assert [b.id for b in backups] == [NAME, 'vm/777/2026-12-01T10:00:05Z']
    archive = backups[0]
    assert archive.manifest.time == '2024-07-01T10:30:05Z' and archive.manifest.level == 'full'
    assert store.guest_ids() == [777, 778]
    assert store.backup_size(store.backups(778)[0]) == 10
    assert store.stale_paths(777) == [str(tmp_path / 'vzdump-lxc-777-2024_07_02-00_00_00.tar.dat')]
    assert store.remove_stale(777) == ['vzdump-lxc-777-2024_07_02-00_00_00.tar.dat']
    assert store.stale_paths(778) == [] and len(store.backups(777)) == 2
    result = archive.as_result()
    assert (result['id'], result['path'], result['size'], result['protected'],
            result['type'], result['format']) == (NAME, str(tmp_path / NAME), 13, False, 'lxc',
                                                  'vzdump')
    assert catalog.resolve(store, 777, NAME) is not None
    assert catalog.resolve(store, 777, '2024-07-01T10:30:05Z').id == NAME


def test_notes_and_protection_live_in_pves_companions_and_remove_takes_them(store, tmp_path):
    put(tmp_path, NAME)
    [record] = store.backups(777)
    store.set_notes(record, 'before the upgrade')
    store.set_protected(record, True)
    assert (tmp_path / (NAME + '.notes')).read_text() == 'before the upgrade'
    assert (tmp_path / (NAME + '.protected')).exists()
    [record] = store.backups(777)
    assert record.protected and record.notes == 'before the upgrade'
    with pytest.raises(StorageError, match='protected'):
        store.remove(record)
    store.set_protected(record, False)
    put(tmp_path, 'vzdump-lxc-777-2024_07_01-12_30_05.log', b'log')
    store.write_verify_state(record, {'state': 'ok'})
    assert store.read_verify_state(record) == {'state': 'ok'}
    store.remove(record)
    assert sorted(os.listdir(tmp_path)) == ['vm'] or sorted(os.listdir(tmp_path)) == []
    with pytest.raises(StorageError, match='no manifest'):
        store.update_manifest(record, level='inc')


def test_prune_protect_and_backup_info_treat_archives_like_vm_backups(store, tmp_path):
    for day in (1, 2, 3):
        put(tmp_path, f'vzdump-lxc-777-2024_07_0{day}-12_00_00.tar.zst')
    put(tmp_path, 'vzdump-lxc-777-2024_07_01-12_00_00.log')
    protected = run_protect(ProtectRequest(vmid=777, dumpdir=str(tmp_path),
                                           backup='vzdump-lxc-777-2024_07_01-12_00_00.tar.zst',
                                           protected=True, notes='keep'))
    assert protected['changed'] and protected['backup'] == \
        'vzdump-lxc-777-2024_07_01-12_00_00.tar.zst'
    result = run_prune(PruneRequest(vmid=777, dumpdir=str(tmp_path),
                                    prune_backups='keep-last=1'))
    assert result['removed'] == ['vzdump-lxc-777-2024_07_02-12_00_00.tar.zst']
    assert sorted(n for n in os.listdir(tmp_path) if n != 'vm') == [
        'vzdump-lxc-777-2024_07_01-12_00_00.log',
        'vzdump-lxc-777-2024_07_01-12_00_00.tar.zst',
        'vzdump-lxc-777-2024_07_01-12_00_00.tar.zst.notes',
        'vzdump-lxc-777-2024_07_01-12_00_00.tar.zst.protected',
        'vzdump-lxc-777-2024_07_03-12_00_00.tar.zst']
    info = run_backup_info(BackupInfoRequest(dumpdir=str(tmp_path)))
    assert [(b['id'], b['protected'], b['notes']) for b in info['backups']] == [
        ('vzdump-lxc-777-2024_07_01-12_00_00.tar.zst', True, 'keep'),
        ('vzdump-lxc-777-2024_07_03-12_00_00.tar.zst', False, None)]


def test_a_dir_storage_keeps_archives_in_its_dump_directory_and_a_dumpdir_in_itself(tmp_path):
    from guestvault_engine.run.locate import open_storage
    (tmp_path / 'etc').mkdir()
    (tmp_path / 'etc' / 'storage.cfg').write_text(f"dir: local\n\tpath {tmp_path / 'st'}\n")
    (tmp_path / 'st').mkdir()
    (tmp_path / 'st' / NAME).write_bytes(b'not listed: vzdump writes into dump/')
    storage = open_storage(str(tmp_path / 'etc'), 'local')
    assert storage.archive_dir == str(tmp_path / 'st' / 'dump')
    assert storage.backups(777) == [] and storage.guest_ids() == []   # no dump/ yet
    (tmp_path / 'st' / 'dump').mkdir()
    os.rename(tmp_path / 'st' / NAME, tmp_path / 'st' / 'dump' / NAME)
    [record] = storage.backups(777)
    assert record.path == str(tmp_path / 'st' / 'dump' / NAME)
    dumpdir = open_storage(str(tmp_path / 'etc'), dumpdir=str(tmp_path / 'st' / 'dump'))
    assert [b.path for b in dumpdir.backups(777)] == [record.path]
