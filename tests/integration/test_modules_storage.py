"""The storage modules as users run them: restore, prune, protect, verify and backup_info.

One lab guest per test module takes a chain of real backups (a full and three incrementals of two
disks, through the engine's ``run_guest_backup`` for speed), and its disks are saved after each backup as
the reference for that point in time. Every test gets its own copy of that storage, so tests that
prune, protect or damage backups never see each other. Restored images are compared with
``qemu-img compare`` against the reference of their backup's point in time; failures must say
what to fix and leave the storage byte for byte as it was.

The modules run from the installed collection in real ``ansible``/``ansible-playbook`` processes
(``ansible_runner.py``; the ``ansible`` fixture is in conftest.py).
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

from ansible_runner import Unsafe, assert_failed_with, documented_return, tree
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from lab_checks import backups_in, same_content
from labguest import LabGuest

MiB = 1 << 20
VMID = 9001
OTHER_VMID = 9002
DISKS = ('vd0', 'vd1')
SIZES = {'vd0': 16 * MiB, 'vd1': 8 * MiB}
BACKUP = 'guestvault.backup.guest_backup'
RESTORE = 'guestvault.backup.restore'
PRUNE = 'guestvault.backup.prune'
PROTECT = 'guestvault.backup.protect'
VERIFY = 'guestvault.backup.verify'
INFO = 'guestvault.backup.backup_info'

# What the guest writes before each backup: (disk, byte pattern or None for zeroes, offset, length).
WRITES = [
    [('vd0', 0x11, 0, 2 * MiB), ('vd1', 0x51, 0, MiB)],
    [('vd0', 0x22, 3 * MiB, 2 * MiB), ('vd1', 0x52, 2 * MiB, MiB)],
    [('vd0', 0x33, MiB, 3 * MiB), ('vd0', None, 0, MiB // 2)],   # overwrites both, zeroes some
    [('vd0', 0x44, 8 * MiB, MiB), ('vd1', 0x54, 0, MiB // 2)],
]


@dataclass
class Chain:
    """A storage with one chain of guest VMID; refs[i][d] is disk d's content at backup i."""
    store: str
    times: list
    chain: str
    refs: list

    def id(self, index):
        return f'vm/{VMID}/{self.times[index]}'


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    """Take the chain once per module; the guest is gone again before the first test runs."""
    base = tmp_path_factory.mktemp('storage-lab')
    store, etc, run_dir = base / 'store', base / 'etc', base / 'run'
    for path in (store, etc / 'guests.d', run_dir):
        path.mkdir(parents=True)
    guest = LabGuest(str(base / 'guest'), disks=[('qcow2', SIZES[d]) for d in DISKS], vmid=VMID,
                     name='web01')
    times, refs, results = [], [], []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv('GUESTVAULT_RUN_DIR', str(run_dir))
        guest.start()
        try:
            for step, writes in enumerate(WRITES):
                for disk, pattern, offset, length in writes:
                    if pattern is None:
                        guest.discard(disk, offset, length)
                    else:
                        guest.write(disk, pattern, offset, length)
                result = run_guest_backup(GuestBackupRequest(vmid=VMID, qmp_socket=guest.qmp_socket,
                                                             dumpdir=str(store), config_dir=str(etc)))
                results.append(result)
                times.append(result['time'])
                refs.append([guest.snapshot_disk(i, str(base / f'ref{step}-{disk}.qcow2'))
                             for i, disk in enumerate(DISKS)])
        finally:
            guest.stop()
    assert [r['level'] for r in results] == ['full', 'inc', 'inc', 'inc']
    assert len({r['chain'] for r in results}) == 1
    return Chain(str(store), times, results[0]['chain'], refs)


@pytest.fixture
def dumpdir(lab, tmp_path):
    """This test's own copy of the lab's storage."""
    path = tmp_path / 'backups'
    shutil.copytree(lab.store, path, symlinks=True)
    return str(path)


# ----------------------------------------------------------------------------- helpers

def write_storage_cfg(config_dir, path, *lines, storage_id='local'):
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"dir: {storage_id}\n\tpath {path}\n\tcontent backup\n"
                     + ''.join(f"\t{line}\n" for line in lines))


def file_hashes(root):
    """{relative path: sha256} of every file under ``root``: what must not change."""
    found = {}
    for base, _dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(base, name)
            with open(path, 'rb') as handle:
                found[os.path.relpath(path, root)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def backup_path(store, time, vmid=VMID):
    return os.path.join(store, 'vm', str(vmid), time)


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def epoch(time):
    return int(datetime.strptime(time, '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)
               .timestamp())


def image_info(path):
    return json.loads(subprocess.run(['qemu-img', 'info', '-U', '--output=json', path],
                                     capture_output=True, text=True, check=True).stdout)


def assert_images_equal(directory, refs, what, standalone=True):
    """Each disk's image in ``directory`` holds what the reference holds (qemu-img compare)."""
    for index, disk in enumerate(DISKS):
        image = os.path.join(directory, f'{disk}.qcow2')
        if standalone:
            assert 'backing-filename' not in image_info(image), f'{what}: {image} has a backing file'
        ok, out = same_content(refs[index], image)
        assert ok, f'{what} {disk}: {out}'


def returned_keys(module, *when):
    """The RETURN keys documented as returned ``always`` (and any of ``when``)."""
    return {key for key, doc in documented_return(module).items()
            if doc['returned'] in ('always',) + when}


def damage_one_byte(image):
    """Flip one byte of guest data stored in ``image`` itself (not in its backing file)."""
    extents = json.loads(subprocess.run(['qemu-img', 'map', '-U', '--output=json', image],
                                        capture_output=True, text=True, check=True).stdout)
    offset = next(e['offset'] for e in extents if e['data'] and e.get('depth', 0) == 0) + 1000
    with open(image, 'r+b') as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


# ----------------------------------------------------------------------------- restore

def test_restore_ad_hoc_gives_standalone_images_and_a_second_run_needs_force(
        ansible, lab, dumpdir, tmp_path):
    target = tmp_path / 'restored'
    stored = file_hashes(dumpdir)
    command = f"vmid={VMID} backup=latest dumpdir={dumpdir} target_dir={target}"
    result = ansible.module(RESTORE, command)
    assert result['_status'] == 'ok' and result['changed'] is True, result
    assert returned_keys('restore', 'changed') - set(result) == set()
    assert (result['backup'], result['time'], result['level'], result['chain_length']) == (
        lab.id(3), lab.times[3], 'inc', 4)
    assert result['target_dir'] == os.path.realpath(target)
    assert result['verified'] is True and result['snapshots'] is False
    assert result['new_vmid'] is None and 'registry_entry' not in result
    disk_keys = set(documented_return('restore')['disks']['contains'])
    assert [sorted(disk_keys - set(d)) for d in result['disks']] == [[], []]
    assert [(d['id'], d['target'], d['format'], d['virtual_size']) for d in result['disks']] == [
        (disk, os.path.join(result['target_dir'], f'{disk}.qcow2'), 'qcow2', SIZES[disk])
        for disk in DISKS]
    assert [d['size'] for d in result['disks']] == [
        os.path.getsize(d['target']) for d in result['disks']]
    assert sorted(os.listdir(target)) == ['guest.json', 'vd0.qcow2', 'vd1.qcow2']
    assert_images_equal(str(target), lab.refs[3], 'latest')
    with open(target / 'guest.json') as handle:
        assert json.load(handle)['restored_from'] == lab.id(3)
    assert result['guest_config'] == os.path.join(result['target_dir'], 'guest.json')
    assert file_hashes(dumpdir) == stored          # a restore never alters backups

    first = file_hashes(target)
    again = ansible.module(RESTORE, command)
    assert_failed_with(again, f"{target / 'vd0.qcow2'} exists", 'set force to overwrite it')
    assert file_hashes(target) == first and sorted(os.listdir(target)) == sorted(first)

    older = ansible.module(RESTORE, {'vmid': VMID, 'backup': lab.id(0), 'dumpdir': dumpdir,
                                     'target_dir': str(target), 'force': True})
    assert older['_status'] == 'ok' and older['backup'] == lab.id(0), older
    assert older['chain_length'] == 1 and older['level'] == 'full'
    assert_images_equal(str(target), lab.refs[0], 'forced over with the full backup')
    assert file_hashes(dumpdir) == stored


def test_until_restores_the_newest_backup_at_or_before_it(ansible, lab, dumpdir, tmp_path):
    args = {'vmid': VMID, 'dumpdir': dumpdir}
    # Backups are at least a second apart: half a second after #1 lies between #1 and #2.
    for until, expected in ((lab.times[2], 2), (f'{epoch(lab.times[1])}.5', 1)):
        target = tmp_path / f'until-{expected}'
        result = ansible.module(RESTORE, dict(args, until=until, target_dir=str(target)))
        assert result['_status'] == 'ok', result
        assert result['backup'] == lab.id(expected) and result['chain_length'] == expected + 1
        assert_images_equal(str(target), lab.refs[expected], f'until {until}')


def test_restore_check_mode_reports_targets_and_sizes_and_writes_nothing(
        ansible, lab, dumpdir, tmp_path):
    target = tmp_path / 'plan'
    stored = file_hashes(dumpdir)
    result = ansible.module(RESTORE, {'vmid': VMID, 'dumpdir': dumpdir, 'target_dir': str(target),
                                      'backup': lab.times[1], 'format': 'raw'}, check=True)
    assert result['_status'] == 'ok' and result['changed'] is True, result
    assert returned_keys('restore') - set(result) == set()
    assert (result['backup'], result['chain_length']) == (lab.id(1), 2)
    assert [(d['id'], d['target'], d['format'], d['virtual_size']) for d in result['disks']] == [
        (disk, os.path.join(os.path.realpath(target), f'{disk}.raw'), 'raw', SIZES[disk])
        for disk in DISKS]
    # At most this much guest data: at least what the disks hold at that point in time.
    written = {'vd0': 4 * MiB, 'vd1': 2 * MiB}
    assert [d['data_bytes'] >= written[d['id']] for d in result['disks']] == [True, True]
    assert not target.exists()
    assert file_hashes(dumpdir) == stored


def test_backup_and_until_together_are_refused(ansible, lab, dumpdir, tmp_path):
    target = tmp_path / 'restored'
    result = ansible.module(RESTORE, {'vmid': VMID, 'dumpdir': dumpdir, 'target_dir': str(target),
                                      'backup': 'latest', 'until': lab.times[1]})
    assert_failed_with(result, 'mutually exclusive', 'backup', 'until')
    assert not target.exists()


# (extra module args, words the message must contain); '{store}', '{etc}', '{tmp}', '{t0}', '{t3}'
# stand for the test's storage, config dir, tmp dir and the times of the first and newest backup.
BAD_RESTORES = {
    'unknown backup time': (
        {'backup': '2001-01-01T00:00:00Z'},
        [f'guest {VMID} has no backup 2001-01-01T00:00:00Z on dumpdir {{store}}', 'its backups: ',
         '{t3}']),
    'not a backup id': (
        {'backup': 'yesterday'},
        [f"backup 'yesterday' is not a backup id of guest {VMID}", "'latest'",
         f'vm/{VMID}/<time>']),
    "another guest's backup id": (
        {'backup': f'vm/{OTHER_VMID}/{{t0}}'},
        [f"belongs to guest {OTHER_VMID}, not to guest {VMID}"]),
    'a guest without backups': (
        {'vmid': OTHER_VMID},
        [f'guest {OTHER_VMID} has no backups on dumpdir {{store}}']),
    'until before the first backup': (
        {'until': '2001-01-01T00:00:00Z'},
        [f'guest {VMID} has no backup at or before 2001-01-01T00:00:00Z',
         'its first backup is {t0}']),
    'until that is no time': (
        {'until': 'last friday'},
        ["until: 'last friday' is not a time", 'ISO 8601', 'epoch seconds']),
    'unknown disk': (
        {'disks': ['vd0', 'vd7']},
        [f'backup vm/{VMID}/{{t3}} has no disk(s) vd7; it has vd0, vd1']),
    'relative target_dir': (
        {'target_dir': 'restored'},
        ["target_dir 'restored' must be an absolute path"]),
    'target_dir inside the storage': (
        {'target_dir': '{store}/restored'},
        ['target_dir {store}/restored lies inside the backup storage ({store})',
         'restore to a directory outside it']),
    'target_dir inside the storage through a symlink': (
        {'target_dir': '{tmp}/link-to-backups/restored'},
        ['target_dir {tmp}/link-to-backups/restored lies inside the backup storage']),
    'target_dir inside the configuration': (
        {'target_dir': '{etc}/restored'},
        ['target_dir {etc}/restored lies inside the guestvault configuration ({etc})']),
    'target_dir is a file': (
        {'target_dir': '{tmp}/a-file'},
        ['target_dir {tmp}/a-file', 'not a directory']),
}


def _fill(value, places):
    if isinstance(value, dict):
        return {k: _fill(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, places) for v in value]
    if isinstance(value, str):
        return value.format(**places)
    return value


@pytest.mark.parametrize('case', BAD_RESTORES)
def test_a_bad_restore_request_says_what_to_fix_and_writes_nothing(
        case, ansible, lab, dumpdir, config_dir, tmp_path):
    (tmp_path / 'a-file').write_text('not a directory\n')
    (tmp_path / 'link-to-backups').symlink_to(dumpdir)
    places = {'store': dumpdir, 'etc': config_dir, 'tmp': str(tmp_path), 't0': lab.times[0],
              't3': lab.times[3]}
    extra, words = BAD_RESTORES[case]
    args = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir,
            'target_dir': str(tmp_path / 'restored')}
    args.update(_fill(extra, places))
    stored, config = file_hashes(dumpdir), tree(config_dir)
    result = ansible.module(RESTORE, args)
    assert_failed_with(result, *_fill(words, places))
    assert file_hashes(dumpdir) == stored and tree(config_dir) == config
    for where in (tmp_path, dumpdir, config_dir, ansible.workdir, os.path.expanduser('~')):
        assert not os.path.exists(os.path.join(where, 'restored')), where
    assert (tmp_path / 'a-file').read_text() == 'not a directory\n'


def test_a_disk_named_twice_is_restored_once_or_refused(ansible, lab, dumpdir, tmp_path):
    target = tmp_path / 'restored'
    result = ansible.module(RESTORE, {'vmid': VMID, 'dumpdir': dumpdir, 'target_dir': str(target),
                                      'disks': ['vd0', 'vd0']})
    # refused while planning, before the target directory is made
    assert_failed_with(result, 'vd0', 'more than once')
    assert 'lock' not in result['msg'], result['msg']
    assert not target.exists()


# ----------------------------------------------------------------------------- prune

def test_prune_check_mode_marks_every_backup_and_removes_nothing(ansible, lab, dumpdir,
                                                                 config_dir):
    stored = file_hashes(dumpdir)
    sizes = [dir_size(backup_path(dumpdir, t)) for t in lab.times]
    base = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir}
    result = ansible.module(PRUNE, dict(base, keep_last=2), check=True)
    assert result['_status'] == 'ok' and result['changed'] is True, result
    assert returned_keys('prune', 'unless O(simulate)') - set(result) == set()
    assert [(b['id'], b['time'], b['mark'], b['rule'], b['size']) for b in result['backups']] == [
        (lab.id(3), lab.times[3], 'keep', 'last #1', sizes[3]),
        (lab.id(2), lab.times[2], 'keep', 'last #2', sizes[2]),
        (lab.id(1), lab.times[1], 'remove', None, sizes[1]),
        (lab.id(0), lab.times[0], 'remove', None, sizes[0])]
    assert result['removed'] == [lab.id(1), lab.id(0)]
    assert result['bytes_freed'] == sizes[0] + sizes[1]
    assert result['folded'] == [{'id': lab.id(2), 'new_parent': None}]
    assert (result['policy'], result['policy_source']) == ('keep-last=2', 'given')
    assert file_hashes(dumpdir) == stored

    as_string = ansible.module(PRUNE, dict(base, prune_backups='keep-last=2'), check=True)
    assert as_string['_status'] == 'ok', as_string
    for key in ('changed', 'backups', 'removed', 'bytes_freed', 'folded', 'policy',
                'policy_source'):
        assert as_string[key] == result[key], key
    assert file_hashes(dumpdir) == stored


def test_prune_removes_folds_and_a_second_run_changes_nothing(ansible, lab, dumpdir, config_dir):
    before = sum(dir_size(backup_path(dumpdir, t)) for t in lab.times)
    base = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir}
    result = ansible.module(PRUNE, dict(base, keep_last=2))
    assert result['_status'] == 'ok' and result['changed'] is True, result
    assert result['removed'] == [lab.id(1), lab.id(0)]
    assert backups_in(dumpdir, VMID) == lab.times[2:]
    assert result['bytes_freed'] == before - sum(dir_size(backup_path(dumpdir, t))
                                                 for t in lab.times[2:])
    assert result['folded'] == [{'id': lab.id(2), 'new_parent': None}]
    # The kept backups still hold their points in time: #2 now stands alone, #3 builds on it.
    for step in (2, 3):
        assert_images_equal(backup_path(dumpdir, lab.times[step]), lab.refs[step],
                            f'kept backup {step}', standalone=step == 2)
    assert image_info(os.path.join(backup_path(dumpdir, lab.times[3]), 'vd0.qcow2'))[
        'backing-filename'] == f'../{lab.times[2]}/vd0.qcow2'

    kept = file_hashes(dumpdir)
    again = ansible.module(PRUNE, dict(base, prune_backups='keep-last=2'))
    assert again['_status'] == 'ok' and again['changed'] is False, again
    assert (again['removed'], again['bytes_freed'], again['folded']) == ([], 0, [])
    assert [(b['id'], b['mark'], b['rule']) for b in again['backups']] == [
        (lab.id(3), 'keep', 'last #1'), (lab.id(2), 'keep', 'last #2')]
    assert file_hashes(dumpdir) == kept


HOLD_GUEST = """
import sys
sys.path.insert(0, {tests!r})
import conftest  # noqa: F401  (puts the engine on the path)
from guestvault_engine.run import guest_runs
from guestvault_engine.storage.directory import DirStorage
with DirStorage(sys.argv[1]).guest_lock({vmid}, 0, holder=guest_runs.holder({vmid}, 'backup')):
    print('held', flush=True)
    sys.stdin.readline()                     # held until the test says so
"""


def opened_by_others(path, me):
    """Pids other than ``me`` that have ``path`` open."""
    found = set()
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
            if int(pid) != me and any(os.readlink(f'/proc/{pid}/fd/{fd}') == path for fd in fds):
                found.add(int(pid))
        except OSError:
            continue
    return found


def test_a_prune_that_waited_for_the_guests_lock_says_for_whom_and_how_long(
        ansible, lab, dumpdir, config_dir):
    """Issue 20: the wait for a lock is a warning in the module's result, naming the holder."""
    lock = os.path.join(dumpdir, 'vm', str(VMID), '.lock')
    holder = subprocess.Popen([sys.executable, '-c', HOLD_GUEST.format(
        tests=os.path.join(os.path.dirname(__file__), '..'), vmid=VMID), dumpdir],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    outcome = {}
    pruning = threading.Thread(target=lambda: outcome.update(ansible.module(
        PRUNE, {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir, 'keep_last': 3})))
    try:
        assert holder.stdout.readline().strip() == 'held'
        pruning.start()
        # The prune has opened the lock file, so it waits (flock) until the holder lets go.
        deadline = time.monotonic() + 300
        while not opened_by_others(lock, holder.pid) and pruning.is_alive():
            assert time.monotonic() < deadline, 'the prune never reached the lock'
            time.sleep(0.1)
        holder.stdin.write('\n')
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        if pruning.is_alive():
            pruning.join(timeout=600)
    assert outcome['_status'] == 'ok' and outcome['removed'] == [lab.id(0)], outcome
    waits = [w for w in outcome.get('warnings', []) if w.startswith('waited ')]
    assert len(waits) == 1, outcome.get('warnings')
    assert re.fullmatch(rf"waited \d+\.\d s for guest {VMID} on dumpdir {re.escape(dumpdir)}: "
                        rf"a backup of guest {VMID} is running \(pid {holder.pid}, "
                        r"since \d\d:\d\d:\d\d UTC\)", waits[0]), waits[0]


def test_prune_without_a_policy_applies_the_storages_prune_backups(ansible, lab, dumpdir,
                                                                   config_dir):
    write_storage_cfg(config_dir, dumpdir, 'prune-backups keep-last=3')
    result = ansible.module(PRUNE, {'vmid': VMID, 'storage': 'local', 'config_dir': config_dir},
                            check=True)
    assert result['_status'] == 'ok', result
    assert (result['policy'], result['policy_source']) == ('keep-last=3', 'storage local')
    assert result['removed'] == [lab.id(0)]
    assert backups_in(dumpdir, VMID) == lab.times


def test_prune_backups_together_with_keep_options_is_refused(ansible, lab, dumpdir, config_dir):
    stored = file_hashes(dumpdir)
    result = ansible.module(PRUNE, {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir,
                                    'prune_backups': 'keep-last=2', 'keep_last': 2})
    assert_failed_with(result, 'mutually exclusive', 'prune_backups', 'keep_last')
    assert file_hashes(dumpdir) == stored


def test_prune_check_mode_of_a_guest_without_backups_writes_nothing(ansible, lab, dumpdir,
                                                                    config_dir):
    before = tree(dumpdir)
    result = ansible.module(PRUNE, {'vmid': OTHER_VMID, 'dumpdir': dumpdir,
                                    'config_dir': config_dir, 'keep_last': 1}, check=True)
    assert result['_status'] == 'ok' and result['changed'] is False, result
    assert result['backups'] == [] and result['removed'] == []
    assert tree(dumpdir) == before


BAD_POLICIES = {
    'keep-last=-1': ({'prune_backups': 'keep-last=-1'},
                     ['keep-last: -1 is too small, the minimum is 0']),
    'keep-lats=1': ({'prune_backups': 'keep-lats=1'},
                    ["unknown key 'keep-lats'", 'allowed keys: ', 'keep-last']),
    'keep-all=1,keep-last=1': ({'prune_backups': 'keep-all=1,keep-last=1'},
                               ['keep-all=1 cannot be combined with keep-last',
                                'remove one or the other']),
    'keep_last: -1': ({'keep_last': -1}, ['keep-last: -1 is too small, the minimum is 0']),
}


@pytest.mark.parametrize('case', BAD_POLICIES)
def test_a_bad_policy_fails_and_changes_nothing(case, ansible, lab, dumpdir, config_dir):
    extra, words = BAD_POLICIES[case]
    stored = file_hashes(dumpdir)
    result = ansible.module(PRUNE, dict({'vmid': VMID, 'dumpdir': dumpdir,
                                         'config_dir': config_dir}, **extra))
    assert_failed_with(result, *words)
    assert file_hashes(dumpdir) == stored


# Three days, two backups a day, given as epoch seconds and as ISO 8601 (with an offset).
NOV8 = 1762560000                                          # 2025-11-08T00:00:00Z
SIMULATED = [
    {'time': NOV8 + 8 * 3600},                       # 2025-11-08T08:00:00Z
    {'time': '2025-11-08T20:00:00Z', 'id': 'sat-evening'},
    {'time': '2025-11-09T09:00:00+01:00'},                 # 2025-11-09T08:00:00Z
    {'time': str(NOV8 + 86400 + 20 * 3600)},         # 2025-11-09T20:00:00Z
    {'time': '2025-11-10T08:00:00Z'},
    {'time': NOV8 + 2 * 86400 + 20 * 3600, 'id': 'mon-evening'},
]


def test_simulate_marks_like_the_proxmox_prune_simulator(ansible, tmp_path):
    # No storage at all: a configuration directory that does not even exist.
    base = {'config_dir': str(tmp_path / 'no-etc'), 'timezone': 'UTC', 'simulate': SIMULATED}
    daily = ansible.module(PRUNE, dict(base, prune_backups='keep-daily=2'))
    assert daily['_status'] == 'ok' and daily['changed'] is False, daily
    assert returned_keys('prune') - set(daily) == set()
    assert 'bytes_freed' not in daily and daily['policy'] == 'keep-daily=2'
    # keep-daily keeps the newest backup of each of the two newest days.
    assert [(b['id'], b['time'], b['mark'], b['rule']) for b in daily['backups']] == [
        ('mon-evening', '2025-11-10T20:00:00Z', 'keep', 'daily #1'),
        ('2025-11-10T08:00:00Z', '2025-11-10T08:00:00Z', 'remove', None),
        ('2025-11-09T20:00:00Z', '2025-11-09T20:00:00Z', 'keep', 'daily #2'),
        ('2025-11-09T08:00:00Z', '2025-11-09T08:00:00Z', 'remove', None),
        ('sat-evening', '2025-11-08T20:00:00Z', 'remove', None),
        ('2025-11-08T08:00:00Z', '2025-11-08T08:00:00Z', 'remove', None)]
    assert daily['removed'] == ['2025-11-10T08:00:00Z', '2025-11-09T08:00:00Z', 'sat-evening',
                                '2025-11-08T08:00:00Z']
    assert not (tmp_path / 'no-etc').exists()

    # Proxmox's rules in order: keep-last takes Monday evening, so keep-daily skips Monday (its
    # morning goes); a protected backup is kept but covers no day, so Sunday still gets one.
    entries = [dict(e, protected=True) if e['time'] == str(NOV8 + 86400 + 20 * 3600) else e
               for e in SIMULATED]
    mixed = ansible.module(PRUNE, dict(base, keep_last=1, keep_daily=2, simulate=entries))
    assert mixed['_status'] == 'ok', mixed
    assert mixed['policy'] == 'keep-last=1,keep-daily=2'
    assert [(b['id'], b['mark'], b['rule']) for b in mixed['backups']] == [
        ('mon-evening', 'keep', 'last #1'),
        ('2025-11-10T08:00:00Z', 'remove', None),
        ('2025-11-09T20:00:00Z', 'protected', 'protected'),
        ('2025-11-09T08:00:00Z', 'keep', 'daily #1'),
        ('sat-evening', 'keep', 'daily #2'),
        ('2025-11-08T08:00:00Z', 'remove', None)]


def test_pruning_the_middle_of_a_chain_keeps_every_kept_backup_restorable(
        ansible, lab, dumpdir, config_dir, tmp_path):
    base = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir}
    protect = ansible.module(PROTECT, dict(base, backup=lab.times[0], protected=True))
    assert protect['_status'] == 'ok' and protect['changed'] is True, protect
    result = ansible.module(PRUNE, dict(base, keep_last=2))
    assert result['_status'] == 'ok', result
    assert [(b['id'], b['mark'], b['rule']) for b in result['backups']] == [
        (lab.id(3), 'keep', 'last #1'), (lab.id(2), 'keep', 'last #2'),
        (lab.id(1), 'remove', None), (lab.id(0), 'protected', 'protected')]
    assert result['removed'] == [lab.id(1)]
    assert result['folded'] == [{'id': lab.id(2), 'new_parent': lab.times[0]}]
    assert backups_in(dumpdir, VMID) == [lab.times[0], lab.times[2], lab.times[3]]
    assert os.path.exists(os.path.join(backup_path(dumpdir, lab.times[0]), '.protected'))
    for step in (0, 2, 3):
        target = tmp_path / f'restore-{step}'
        restored = ansible.module(RESTORE, dict(base, backup=lab.times[step],
                                                target_dir=str(target)))
        assert restored['_status'] == 'ok', restored
        assert restored['chain_length'] == {0: 1, 2: 2, 3: 3}[step]
        assert_images_equal(str(target), lab.refs[step], f'backup {step} after the prune')
    # The folded backup's new manifest matches its image and its new backing file.
    verified = ansible.module(VERIFY, dict(base, backup=lab.times[3]))
    assert verified['_status'] == 'ok' and verified['chain'] == [lab.times[i] for i in (0, 2, 3)]


# ----------------------------------------------------------------------------- protect

def test_protect_and_notes_change_only_what_differs(ansible, lab, dumpdir, config_dir):
    base = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir, 'backup': lab.id(1)}
    directory = backup_path(dumpdir, lab.times[1])
    sentinel, notes = os.path.join(directory, '.protected'), os.path.join(directory, 'notes')

    planned = ansible.module(PROTECT, dict(base, protected=True), check=True)
    assert planned['_status'] == 'ok' and planned['changed'] is True, planned
    assert not os.path.exists(sentinel)

    result = ansible.module(PROTECT, dict(base, protected=True), diff=True)
    assert result['_status'] == 'ok' and result['changed'] is True, result
    assert returned_keys('protect') - set(result) == set()
    assert (result['backup'], result['protected'], result['notes']) == (lab.id(1), True, '')
    assert result['diff'] == {'before': {'protected': False, 'notes': ''},
                              'after': {'protected': True, 'notes': ''}}
    assert os.path.exists(sentinel)

    again = ansible.module(PROTECT, dict(base, protected=True), diff=True)
    assert again['_status'] == 'ok' and again['changed'] is False, again
    assert again['diff']['before'] == again['diff']['after'] == {'protected': True, 'notes': ''}

    noted = ansible.module(PROTECT, dict(base, notes='before the upgrade\nkeep it'))
    assert noted['changed'] is True and noted['notes'] == 'before the upgrade\nkeep it'
    with open(notes) as handle:
        assert handle.read() == 'before the upgrade\nkeep it'
    cleared = ansible.module(PROTECT, dict(base, notes=''))
    assert cleared['changed'] is True and cleared['notes'] == '' and not os.path.exists(notes)

    released = ansible.module(PROTECT, dict(base, protected=False))
    assert released['changed'] is True and released['protected'] is False
    assert not os.path.exists(sentinel)
    original = backup_path(lab.store, lab.times[1])
    assert sorted(os.listdir(directory)) == sorted(os.listdir(original))


def test_max_protected_backups_refuses_one_more_with_what_to_do(
        ansible, lab, dumpdir, config_dir):
    write_storage_cfg(config_dir, dumpdir, 'max-protected-backups 1')
    base = {'vmid': VMID, 'storage': 'local', 'config_dir': config_dir, 'protected': True}
    first = ansible.module(PROTECT, dict(base, backup=lab.times[0]))
    assert first['_status'] == 'ok' and first['changed'] is True, first
    second = ansible.module(PROTECT, dict(base, backup=lab.times[1]))
    assert_failed_with(second, f'guest {VMID} already has 1 protected backup(s) on storage local',
                       "max-protected-backups is 1", 'unprotect one first',
                       'raise max-protected-backups in storage.cfg')
    assert [os.path.exists(os.path.join(backup_path(dumpdir, t), '.protected'))
            for t in lab.times] == [True, False, False, False]


# ----------------------------------------------------------------------------- verify

def test_verify_ok_is_recorded_and_backup_info_shows_it(ansible, lab, dumpdir, config_dir):
    base = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir}
    planned = ansible.module(VERIFY, base, check=True)
    assert planned['_status'] == 'ok' and planned['changed'] is False, planned
    assert planned['verify_state'] == 'ok'
    assert not os.path.exists(os.path.join(backup_path(dumpdir, lab.times[3]), 'verify.json'))

    result = ansible.module(VERIFY, base)
    assert result['_status'] == 'ok' and result['changed'] is True, result
    assert returned_keys('verify') - set(result) == set()
    assert (result['backup'], result['verify_state'], result['previous_state']) == (
        lab.id(3), 'ok', 'none')
    assert result['problems'] == [] and result['chain'] == lab.times

    info = ansible.module(INFO, base)
    assert info['_status'] == 'ok', info
    assert [b['verify_state'] for b in info['backups']] == ['none', 'none', 'none', 'ok']
    assert info['backups'][3]['verified_at'] is not None


def test_a_damaged_byte_fails_verify_naming_the_file_and_is_recorded(ansible, lab, dumpdir,
                                                                     config_dir, tmp_path):
    damage_one_byte(os.path.join(backup_path(dumpdir, lab.times[1]), 'vd1.qcow2'))
    base = {'vmid': VMID, 'dumpdir': dumpdir, 'config_dir': config_dir}
    damaged = ansible.module(VERIFY, dict(base, backup=lab.times[1]))
    assert_failed_with(damaged, f'backup {lab.id(1)} failed verification',
                       f'{lab.id(1)}: vd1.qcow2 has sha256', 'damaged')
    assert damaged['verify_state'] == 'failed'
    # The newest backup reads through the damaged one: it fails too, naming that file.
    newest = ansible.module(VERIFY, base)
    assert_failed_with(newest, f'backup {lab.id(3)} failed verification',
                       f'{lab.id(1)}: vd1.qcow2 has sha256')
    full = ansible.module(VERIFY, dict(base, backup=lab.times[0]))
    assert full['_status'] == 'ok' and full['verify_state'] == 'ok', full

    info = ansible.module(INFO, base)
    assert [b['verify_state'] for b in info['backups']] == ['ok', 'failed', 'none', 'failed']
    # A restore that reads the damaged file refuses and writes nothing.
    target = tmp_path / 'restored'
    restore = ansible.module(RESTORE, dict(base, target_dir=str(target)))
    assert_failed_with(restore, 'verification failed, nothing restored',
                       f'{lab.id(1)}: vd1.qcow2 has sha256')
    assert not target.exists() or os.listdir(target) == []


# ----------------------------------------------------------------------------- backup_info

def test_backup_info_lists_every_guests_backups_or_one_guests(
        ansible, lab, dumpdir, config_dir, make_guest):
    other = make_guest(disks=[('qcow2', 4 * MiB)], vmid=OTHER_VMID, name='db01')
    other.write('vd0', 0x66, 0, MiB)
    taken = ansible.playbook([{'name': 'back up the second guest', BACKUP: {
        'vmid': OTHER_VMID, 'qmp_socket': other.qmp_socket, 'dumpdir': dumpdir,
        'config_dir': config_dir, 'protected': True,
        'notes_template': Unsafe('{{guestname}} before the upgrade')}}])[0]
    assert taken['_status'] == 'ok', taken
    write_storage_cfg(config_dir, dumpdir)

    info = ansible.module(INFO, {'storage': 'local', 'config_dir': config_dir})
    assert info['_status'] == 'ok' and info['changed'] is False, info
    assert returned_keys('backup_info') - set(info) == set()
    assert (info['storage'], info['storage_path']) == ('local', dumpdir)
    fields = set(documented_return('backup_info')['backups']['contains'])
    assert [sorted(fields - set(b)) for b in info['backups']] == [[]] * 5
    assert [(b['id'], b['vmid'], b['time'], b['epoch'], b['level'], b['parent'])
            for b in info['backups']] == [
        (lab.id(0), VMID, lab.times[0], epoch(lab.times[0]), 'full', None),
        (lab.id(1), VMID, lab.times[1], epoch(lab.times[1]), 'inc', lab.times[0]),
        (lab.id(2), VMID, lab.times[2], epoch(lab.times[2]), 'inc', lab.times[1]),
        (lab.id(3), VMID, lab.times[3], epoch(lab.times[3]), 'inc', lab.times[2]),
        (taken['backup'], OTHER_VMID, taken['time'], epoch(taken['time']), 'full', None)]
    assert [b['chain'] for b in info['backups']] == [lab.chain] * 4 + [taken['chain']]
    assert [b['guest_name'] for b in info['backups']] == ['web01'] * 4 + ['db01']
    assert [b['protected'] for b in info['backups']] == [False] * 4 + [True]
    assert [b['notes'] for b in info['backups']] == [None] * 4 + ['db01 before the upgrade']
    assert [b['verify_state'] for b in info['backups']] == ['none'] * 5
    assert [b['size'] for b in info['backups']] == [dir_size(b['path']) for b in info['backups']]
    assert [b['path'] for b in info['backups']] == [
        backup_path(dumpdir, t) for t in lab.times] + [taken['backup_dir']]
    assert [[(d['id'], d['virtual_size']) for d in b['disks']] for b in info['backups']] == [
        [('vd0', 16 * MiB), ('vd1', 8 * MiB)]] * 4 + [[('vd0', 4 * MiB)]]

    one = ansible.module(INFO, {'vmid': OTHER_VMID, 'dumpdir': dumpdir, 'config_dir': config_dir})
    assert one['_status'] == 'ok', one
    assert (one['storage'], one['storage_path']) == (None, dumpdir)
    assert one['backups'] == info['backups'][4:]


def test_selectattr_queries_on_a_registered_backup_info(ansible, lab, dumpdir, config_dir):
    where = {'dumpdir': dumpdir, 'config_dir': config_dir}
    results = ansible.playbook([
        {'name': 'protect the second backup', PROTECT: dict(
            where, vmid=VMID, backup=lab.times[1], protected=True, notes='keep')},
        {'name': 'list', INFO: where, 'register': 'found'},
        {'name': 'query', 'ansible.builtin.set_fact': {
            'protected_ids': "{{ found.backups | selectattr('protected') | map(attribute='id') "
                             "| list }}",
            'noted': "{{ found.backups | selectattr('notes') | map(attribute='notes') | list }}",
            'incs': f"{{{{ found.backups | selectattr('vmid', 'equalto', {VMID}) "
                    "| selectattr('level', 'equalto', 'inc') | map(attribute='time') | list }}",
            'unverified': "{{ found.backups | selectattr('verify_state', 'equalto', 'none') "
                          "| list | length }}"}},
    ])
    assert [r['_status'] for r in results] == ['ok', 'ok', 'ok'], results
    facts = results[2]['ansible_facts']
    assert facts['protected_ids'] == [lab.id(1)]
    assert facts['noted'] == ['keep']
    assert facts['incs'] == lab.times[1:]
    assert int(facts['unverified']) == 4
