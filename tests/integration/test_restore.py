"""Restore on real QEMU backups: every point of a chain comes back bit-exact, verified first."""
import hashlib
import itertools
import os
import subprocess
import threading

import pytest

from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.errors import ConfigError, StorageError
from guestvault_engine.format import qcow2
from guestvault_engine.run.restore import RestoreRequest, VerifyFailed, run_restore
from lab_checks import same_content, small_tmpfs
from labguest import LabGuest

MiB = 1 << 20


@pytest.fixture
def chain(make_guest, store, config_dir, tmp_path):
    """A guest with two disks and a chain full + 2 incrementals, with the content at each."""
    guest = make_guest(disks=[('qcow2', 16 * MiB), ('qcow2', 8 * MiB)])
    points = []
    for step, (pattern, offset) in enumerate([(0x11, 0), (0x22, 3 * MiB), (0x33, 5 * MiB)]):
        guest.write('vd0', pattern, offset, 2 * MiB)
        guest.write('vd1', pattern + 1, offset // 2, MiB)
        result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                     dumpdir=store, config_dir=config_dir))
        refs = [guest.snapshot_disk(i, str(tmp_path / f'ref{step}-{i}.qcow2')) for i in (0, 1)]
        points.append((result, refs))
    assert [point[0]['level'] for point in points] == ['full', 'inc', 'inc']
    return guest, points


def restore(guest, store, config_dir, target, **options):
    return run_restore(RestoreRequest(vmid=guest.vmid, dumpdir=store, config_dir=config_dir,
                                      target_dir=str(target), **options))


def file_hashes(root):
    hashes = {}
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, 'rb') as handle:
                hashes[path] = hashlib.sha256(handle.read()).hexdigest()
    return hashes


def test_every_backup_of_a_chain_restores_bit_exact_and_backups_stay_untouched(
        chain, store, config_dir, tmp_path):
    guest, points = chain
    before = file_hashes(store)
    for step, (backup, refs) in enumerate(points):
        target = tmp_path / f'restore{step}'
        result = restore(guest, store, config_dir, target, backup=backup['time'])
        assert result['backup'] == backup['backup'] and result['verified'] is True
        for index, disk in enumerate(('vd0', 'vd1')):
            image = target / f'{disk}.qcow2'
            info = subprocess.run(['qemu-img', 'info', '--output=json', str(image)],
                                  capture_output=True, text=True, check=True).stdout
            assert '"backing-filename"' not in info          # standalone
            ok, out = same_content(refs[index], str(image))
            assert ok, out
        assert os.path.exists(target / 'guest.json')
    assert file_hashes(store) == before


def test_latest_and_until_choose_the_right_backup(chain, store, config_dir, tmp_path):
    guest, points = chain
    latest = restore(guest, store, config_dir, tmp_path / 'a')
    assert latest['backup'] == points[-1][0]['backup']
    middle = restore(guest, store, config_dir, tmp_path / 'b', until=points[1][0]['time'])
    assert middle['backup'] == points[1][0]['backup']
    with pytest.raises(StorageError, match='no backup at or before'):
        restore(guest, store, config_dir, tmp_path / 'c', until='2001-01-01T00:00:00Z')
    with pytest.raises(StorageError, match='has no backup 2001'):
        restore(guest, store, config_dir, tmp_path / 'c', backup='2001-01-01T00:00:00Z')


def test_raw_restore_is_thin_and_selected_disks_only(chain, store, config_dir, tmp_path):
    guest, points = chain
    target = tmp_path / 'raw'
    result = restore(guest, store, config_dir, target, format='raw', disks=['vd0'])
    assert [d['id'] for d in result['disks']] == ['vd0']
    assert sorted(os.listdir(target)) == ['guest.json', 'vd0.raw']
    image = target / 'vd0.raw'
    assert os.path.getsize(image) == 16 * MiB
    assert os.stat(image).st_blocks * 512 < 10 * MiB        # holes stay holes
    ok, out = same_content(points[-1][1][0], str(image))
    assert ok, out


def test_snapshots_hold_every_point_of_the_chain(chain, store, config_dir, tmp_path):
    guest, points = chain
    target = tmp_path / 'snap'
    restore(guest, store, config_dir, target, snapshots=True, disks=['vd0'])
    image = str(target / 'vd0.qcow2')
    listing = subprocess.run(['qemu-img', 'snapshot', '-l', image], capture_output=True,
                             text=True, check=True).stdout
    for step, (backup, refs) in enumerate(points):
        assert backup['time'] in listing
        out = str(tmp_path / f'snap{step}.qcow2')
        subprocess.run(['qemu-img', 'convert', '-l', f"snapshot.name={backup['time']}", '-O',
                        'qcow2', image, out], check=True)
        ok, text = same_content(refs[0], out)
        assert ok, f"snapshot {backup['time']}: {text}"
    ok, text = same_content(points[-1][1][0], image)   # the active state is the newest
    assert ok, text


def test_a_damaged_backup_file_fails_verification_and_nothing_is_written(
        chain, store, config_dir, tmp_path):
    guest, points = chain
    damaged = os.path.join(points[1][0]['backup_dir'], 'vd0.qcow2')
    with open(damaged, 'r+b') as handle:
        handle.seek(os.path.getsize(damaged) - 100)
        handle.write(b'\xde\xad')
    target = tmp_path / 'bad'
    with pytest.raises(VerifyFailed, match='vd0.qcow2'):
        restore(guest, store, config_dir, target)
    assert not target.exists() or sorted(os.listdir(target)) == []
    # A backup before the damage still restores.
    restore(guest, store, config_dir, tmp_path / 'good', backup=points[0][0]['time'])


def test_existing_targets_need_force_and_images_in_use_are_refused(chain, store, config_dir,
                                                                   tmp_path):
    guest, points = chain
    target = tmp_path / 'twice'
    restore(guest, store, config_dir, target)
    with pytest.raises(StorageError, match='set force'):
        restore(guest, store, config_dir, target)
    restore(guest, store, config_dir, target, force=True, backup=points[0][0]['time'])
    ok, out = same_content(points[0][1][0], str(target / 'vd0.qcow2'))
    assert ok, out
    # A QEMU running on the restored image: even force does not overwrite it.
    user = LabGuest(str(tmp_path / 'user'), disks=[('qcow2', 16 * MiB)], vmid=9100)
    os.makedirs(user.workdir)
    os.replace(target / 'vd0.qcow2', user.disk_path(0))
    os.symlink(user.disk_path(0), target / 'vd0.qcow2')
    user.start()
    try:
        with pytest.raises(StorageError, match='in use'):
            restore(guest, store, config_dir, target, force=True)
    finally:
        user.stop()


def test_check_mode_reports_and_writes_nothing(chain, store, config_dir, tmp_path):
    guest, points = chain
    target = tmp_path / 'plan'
    result = restore(guest, store, config_dir, target, check_mode=True)
    assert [(d['id'], d['virtual_size']) for d in result['disks']] == [
        ('vd0', 16 * MiB), ('vd1', 8 * MiB)]
    assert result['disks'][0]['target'] == str(target / 'vd0.qcow2')
    assert not target.exists()


def test_restore_as_a_new_guest_registers_it(chain, store, config_dir, tmp_path):
    guest, points = chain
    target = tmp_path / 'new'
    result = restore(guest, store, config_dir, target, new_vmid=4242)
    entry = open(os.path.join(config_dir, 'guests.d', '4242.conf')).read()
    assert f"qmp: {target / 'qmp.sock'}" in entry and 'restored' in entry
    assert result['registry_entry'].endswith('4242.conf')
    with pytest.raises(ConfigError, match='already registered'):
        restore(guest, store, config_dir, tmp_path / 'new2', new_vmid=4242)


def test_a_target_inside_the_storage_is_refused(chain, store, config_dir):
    guest, points = chain
    with pytest.raises(ConfigError, match='inside the backup storage'):
        restore(guest, store, config_dir, os.path.join(store, 'vm', 'x'))
    with pytest.raises(ConfigError, match='absolute'):
        restore(guest, store, config_dir, 'relative/dir')


def test_a_full_target_disk_fails_cleanly(chain, store, config_dir, tmp_path):
    guest, points = chain
    with small_tmpfs(tmp_path / 'tiny', '2M') as target:
        with pytest.raises(StorageError, match='No space left|space'):
            restore(guest, store, config_dir, target)
        assert os.listdir(target) == []


def test_a_chain_restore_hashes_on_every_core_while_the_copies_run(
        chain, store, config_dir, tmp_path, monkeypatch):
    """The copies (qemu-img convert) are partly I/O-bound and end first: a verify that kept a
    core free for each of them hashed the rest of the chain on one core, the other idle."""
    guest, points = chain
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    # The first two hashes wait for each other: on one hashing thread, the first one waits in
    # vain, the barrier breaks and the restore fails. (Generous: it only ever waits this long
    # when the hashing runs on one thread; machines here vary 3x in speed.)
    together = threading.Barrier(2, timeout=300)
    calls = itertools.count()
    hash_segment = qcow2._hash

    def first_two_together(job):
        if next(calls) < 2:
            together.wait()
        return hash_segment(job)
    monkeypatch.setattr(qcow2, '_hash', first_two_together)
    result = restore(guest, store, config_dir, tmp_path / 'out')
    assert result['verified'] and next(calls) > 2
    for disk, ref in zip(result['disks'], points[-1][1]):
        ok, text = same_content(ref, disk['target'])
        assert ok, text


def test_a_chain_restore_writes_its_images_back_while_the_copies_run(
        chain, store, config_dir, tmp_path, monkeypatch):
    """What a copy wrote goes to writeback while it runs, so the fsync after the copy and the
    verify finds little left to write (the baseline convert + fsync waits for all of it)."""
    guest, points = chain
    written_back = []

    def spy(path):
        written_back.append(os.path.basename(path))
    monkeypatch.setattr(qcow2, 'start_writeback', spy, raising=False)
    target = tmp_path / 'out'
    # A read rate limit keeps each copy running for many writeback intervals.
    result = restore(guest, store, config_dir, target, bwlimit=1024)
    assert {'.vd0.qcow2.restoring', '.vd1.qcow2.restoring'} <= set(written_back)
    for disk, ref in zip(result['disks'], points[-1][1]):
        ok, text = same_content(ref, disk['target'])
        assert ok, text
