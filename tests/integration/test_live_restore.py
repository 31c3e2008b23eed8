"""Issue 13, live restore from qcow2 chains: a guest runs on its backup at once, its disks copied
back in the background, on real QEMU.

The started guest is a lab guest (prelaunch QEMU, no OS) whose start command is a real shell line
that starts QEMU with -S on $GUESTVAULT_DISK_VD0. Its disk is written through the guest while the
copy runs; once the copy is done, the image must equal the backup with exactly those writes on
top (qemu-img compare against a normal restore with the same writes applied by qemu-io).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from guestvault_engine.errors import ConfigError, GuestvaultError, StorageError
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.run.guest_info import GuestInfoRequest, run_guest_info
from guestvault_engine.run.restore import RestoreRequest, run_restore
from labguest import LabGuest
from lab_checks import backup_location, same_content

MiB = 1 << 20
TOOLS = os.path.join(os.path.dirname(__file__), '..', '..', 'tools')
NEW_VMID = 9302

STARTER = """
import os, sys
sys.path.insert(0, {tools!r})
from labguest import LabGuest


class Restored(LabGuest):
    def disk_path(self, index):
        return os.environ[{variable!r}]


Restored({workdir!r}, disks=[('qcow2', 0)], vmid=int(os.environ['GUESTVAULT_VMID'])).start()
"""


class RestoredGuest(LabGuest):
    """The test's handle on the started guest: its control socket, its restored image."""

    def __init__(self, workdir, image):
        super().__init__(workdir, disks=[('qcow2', 0)], vmid=NEW_VMID)
        self.image = image

    def disk_path(self, index):
        return self.image


def register(config_dir, workdir, variable='GUESTVAULT_DISK_VD0', start=None):
    """guests.d/<NEW_VMID>.conf with a start command running STARTER."""
    os.makedirs(workdir, exist_ok=True)
    script = os.path.join(workdir, 'start.py')
    with open(script, 'w') as handle:
        handle.write(STARTER.format(tools=os.path.abspath(TOOLS), variable=variable,
                                    workdir=workdir))
    with open(os.path.join(config_dir, 'guests.d', f'{NEW_VMID}.conf'), 'w') as handle:
        handle.write(f"name: restored\nqmp: {os.path.join(workdir, 'qmp.sock')}\n"
                     f"start: {start or f'{sys.executable} {script}'}\n")


def allocated(image):
    """Bytes of guest data an image holds (qemu-img map: allocated, not zero)."""
    extents = json.loads(subprocess.run(['qemu-img', 'map', '-U', '--output=json', image],
                                        capture_output=True, text=True, check=True).stdout)
    return sum(e['length'] for e in extents if e['data'] and not e.get('zero'))


def present(image):
    """``[(start, end)]`` of what an image holds itself (qemu-img map: present), zeroes
    included."""
    extents = json.loads(subprocess.run(['qemu-img', 'map', '-U', '--output=json', image],
                                        capture_output=True, text=True, check=True).stdout)
    return [(e['start'], e['start'] + e['length']) for e in extents if e['present']]


def job_list(guest):
    return [j for j in guest.execute('query-block-jobs') if j['device'].startswith('guestvault-')]


def wait_for_copies(guest, timeout=300):
    deadline = time.monotonic() + timeout
    while job_list(guest):
        assert time.monotonic() < deadline, job_list(guest)
        time.sleep(0.1)


@pytest.fixture(params=['qcow2-chain', 'datastore'])
def backed_up(request, make_guest, tmp_path, config_dir, monkeypatch):
    """A lab guest with a full and an incremental backup, in a dumpdir (a qcow2 chain) or a
    datastore: (guest, where the backups are as restore options, the incremental)."""
    where = backup_location(request.param, request, config_dir, tmp_path, monkeypatch)
    guest = make_guest(disks=[('qcow2', 48 * MiB)], vmid=9301)
    guest.write('vd0', 0x31, 0, 16 * MiB)
    run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                        config_dir=config_dir, **where))
    guest.write('vd0', 0x32, 8 * MiB, 4 * MiB)
    guest.write('vd0', 0x33, 40 * MiB, 2 * MiB)
    inc = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                              config_dir=config_dir, **where))
    assert inc['level'] == 'inc'
    return guest, where, inc


def live(guest, where, config_dir, target, **options):
    return run_restore(RestoreRequest(vmid=guest.vmid, config_dir=config_dir,
                                      target_dir=str(target), live=True, new_vmid=NEW_VMID,
                                      **where, **options))


def test_the_guest_runs_at_once_and_ends_on_the_backup_plus_its_own_writes(
        backed_up, config_dir, tmp_path):
    guest, where, inc = backed_up
    workdir = str(tmp_path / 'restored')
    register(config_dir, workdir)
    # 22 MiB to copy at 2 MiB/s: the copy is still running when the call returns.
    result = live(guest, where, config_dir, tmp_path / 'target', bwlimit=2048)
    image = result['disks'][0]['target']
    restored = RestoredGuest(workdir, image)
    try:
        assert result['status'] == 'running' and result['vmid_started'] == NEW_VMID
        assert result['jobs'] == [f'guestvault-live-{NEW_VMID}-vd0']
        assert restored.execute('query-status')['status'] == 'running'
        restored.execute('block-job-pause', device=result['jobs'][0])
        copying = run_guest_info(GuestInfoRequest(NEW_VMID, config_dir=config_dir))['live_restore']
        assert [(c['disk'], c['done_bytes'] < c['total_bytes']) for c in copying] == \
            [('vd0', True)], copying
        # The guest writes while its disk is copied: over backed-up data and over a hole.
        writes = [(0x77, 9 * MiB, MiB), (0x78, 30 * MiB, 512 * 1024)]
        for pattern, offset, length in writes:
            restored.write('vd0', pattern, offset, length)
        restored.execute('block-job-set-speed', device=result['jobs'][0], speed=0)
        restored.execute('block-job-resume', device=result['jobs'][0])
        wait_for_copies(restored)
        assert run_guest_info(GuestInfoRequest(NEW_VMID, config_dir=config_dir))['live_restore'] == []
        backing = result['disks'][0]['backing']
        if 'storage' in where:
            # Read through the NBD server over the snapshot, which ends once QEMU let go of it.
            assert backing.startswith('nbd+unix:///drive-vd0.img.fidx?socket=')
            socket_path = backing.split('socket=', 1)[1]
            deadline = time.monotonic() + 300
            while os.path.exists(socket_path) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not os.path.exists(socket_path), 'the NBD server did not end'
        else:
            assert backing.endswith(f"{inc['time']}/vd0.qcow2")
        restored.qemu_io('vd0', 'flush')
        info = json.loads(subprocess.run(['qemu-img', 'info', '-U', '--output=json', image],
                                         capture_output=True, text=True, check=True).stdout)
        assert 'backing-filename' not in info          # it stands alone
        # The reference: a normal restore of the same backup with the same writes on top.
        ref = run_restore(RestoreRequest(vmid=guest.vmid, config_dir=config_dir,
                                         target_dir=str(tmp_path / 'ref'), backup=inc['time'],
                                         **where))['disks'][0]['target']
        for pattern, offset, length in writes:
            subprocess.run(['qemu-io', '-f', 'qcow2', '-c',
                            f'write -P {pattern:#x} {offset} {length}', ref],
                           check=True, capture_output=True)
        ok, text = same_content(ref, image)
        assert ok, text
        # Thin as a plain restore: holes of the backup stay holes (plus what the guest wrote).
        assert allocated(image) <= allocated(ref) + 2 * MiB, (allocated(image), allocated(ref))
        if 'storage' in where:
            # The copy skipped the backup's zero chunks (16-28 MiB, not written by the guest):
            # it neither read them nor wrote them as zeroes, a round trip per 512 KiB each.
            assert not [(start, end) for start, end in present(image)
                        if start < 28 * MiB and end > 16 * MiB], present(image)
    finally:
        restored.stop()
    with open(tmp_path / 'target' / 'guest.json') as handle:
        assert json.load(handle)['restored_from'] == f"vm/{guest.vmid}/{inc['time']}"


def test_a_guest_started_on_other_images_is_stopped_and_nothing_is_left(
        backed_up, config_dir, tmp_path):
    guest, where, _inc = backed_up
    workdir = str(tmp_path / 'restored')
    other = tmp_path / 'other.qcow2'
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', str(other), '48M'], check=True)
    register(config_dir, workdir, variable='OTHER_DISK',
             start=f"OTHER_DISK={other} {sys.executable} {os.path.join(workdir, 'start.py')}")
    with pytest.raises(GuestvaultError, match=r'must use \$GUESTVAULT_DISK_VD0.*the guest was '
                                              r'stopped and the new images removed'):
        live(guest, where, config_dir, tmp_path / 'target')
    assert not os.path.exists(tmp_path / 'target' / 'vd0.qcow2')
    # It was started (its console log exists) and has quit (QEMU removes its pidfile on exit).
    assert os.path.exists(os.path.join(workdir, 'qemu.log'))
    deadline = time.monotonic() + 300
    pidfile = os.path.join(workdir, 'qemu.pid')
    while os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(pidfile), 'the wrongly started guest still runs'


def test_live_restore_refuses_what_it_cannot_do(backed_up, config_dir, tmp_path):
    guest, where, _inc = backed_up
    with pytest.raises(ConfigError, match=f'starts guest {NEW_VMID}, which is not registered'):
        live(guest, where, config_dir, tmp_path / 't1')
    # Bad input is refused before anything starts or is made (issue 20, finding 12).
    register(config_dir, str(tmp_path / 'restored'))
    for options, error in (({'bwlimit': -5}, 'bwlimit -5 is negative; give KiB/s'),
                           ({'lockwait': -1}, 'lockwait -1 is negative'),
                           ({'disks': []}, 'names no disk'), ({'disks': ['']}, 'names no disk'),
                           ({'new_qmp_socket': 'q.sock'}, 'must be an absolute path')):
        with pytest.raises(ConfigError, match=error):
            live(guest, where, config_dir, tmp_path / 'new' / 't0', **options)
        assert not os.path.exists(tmp_path / 'new')
        assert not os.path.exists(tmp_path / 'restored' / 'qemu.log'), 'the guest was started'
    register(config_dir, str(tmp_path / 'restored'), start='false')
    with pytest.raises(ConfigError, match='format raw cannot'):
        live(guest, where, config_dir, tmp_path / 't2', format='raw')
    with pytest.raises(GuestvaultError, match='the start command failed'):
        live(guest, where, config_dir, tmp_path / 't3' / 'deeper')
    assert not os.path.exists(tmp_path / 't3'), 'the failed restore left what it made'
    # A target_dir that was there before stays, without what the call put in it.
    (tmp_path / 't3').mkdir()
    with pytest.raises(GuestvaultError, match='the start command failed'):
        live(guest, where, config_dir, tmp_path / 't3')
    assert os.path.isdir(tmp_path / 't3')
    assert not os.path.exists(tmp_path / 't3' / 'vd0.qcow2')
    # The source guest itself is running: it is not started over its own disks.
    with open(os.path.join(config_dir, 'guests.d', f'{guest.vmid}.conf'), 'w') as handle:
        handle.write(f"qmp: {guest.qmp_socket}\nstart: true\n")
    with pytest.raises(ConfigError, match=f'guest {guest.vmid} is running'):
        run_restore(RestoreRequest(vmid=guest.vmid, config_dir=config_dir,
                                   target_dir=str(tmp_path / 't4'), live=True, **where))
    planned = live(guest, where, config_dir, tmp_path / 't5', check_mode=True)
    assert planned['live'] and not os.path.exists(tmp_path / 't5')


def test_a_failed_restore_removes_the_target_dir_it_made_and_only_that(
        backed_up, config_dir, tmp_path, request):
    """Issue 20, finding 10: the backup's disk file is damaged, so the restore fails on its
    verification, after it made its target directory."""
    guest, where, inc = backed_up
    root = where.get('dumpdir') or request.getfixturevalue('datastore_path')
    backup_dir = os.path.join(root, 'vm',
                              str(guest.vmid), inc['time'])
    disk_file = os.path.join(backup_dir, next(n for n in os.listdir(backup_dir)
                                              if n.startswith(('vd0.', 'drive-vd0.'))))
    with open(disk_file, 'r+b') as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 0xff]))
    request = dict(vmid=guest.vmid, config_dir=config_dir, **where)
    # the damage found (VerifyFailed, CorruptData), after the target was made: no earlier refusal
    with pytest.raises(StorageError, match='vd0'):
        run_restore(RestoreRequest(target_dir=str(tmp_path / 'new' / 'target'), **request))
    assert not os.path.exists(tmp_path / 'new')
    (tmp_path / 'there').mkdir()
    with pytest.raises(StorageError, match='vd0'):
        run_restore(RestoreRequest(target_dir=str(tmp_path / 'there'), **request))
    assert os.listdir(tmp_path / 'there') == []


LINUX_STARTER = """
import os, sys
sys.path.insert(0, {tools!r})
from linuxguest import LinuxGuest
LinuxGuest({workdir!r}, {image!r}, data_disk=os.environ['GUESTVAULT_DISK_VD0'],
           vmid=int(os.environ['GUESTVAULT_VMID']), accel={accel!r}, extra_args=['-S']).start()
"""


def quit_guest(handle, timeout=300):
    """Quit a guest this process did not start, and wait until its QEMU is gone."""
    try:
        handle.execute('quit')
    except Exception:  # already gone
        pass
    handle._close_qmp()
    deadline = time.monotonic() + timeout
    while os.path.exists(handle.pidfile) and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize('kind', ['qcow2-chain', 'datastore'])
def test_a_linux_guest_answers_its_agent_before_its_disk_is_copied_and_ends_clean(
        kind, linux_guest, image, config_dir, tmp_path, request, monkeypatch):
    from linuxguest import LinuxGuest, inspect_ext4
    where = backup_location(kind, request, config_dir, tmp_path, monkeypatch)
    source = linux_guest(vmid=9311)
    deadline = time.monotonic() + 300
    while len(source.journal().entries) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    backup = run_guest_backup(GuestBackupRequest(vmid=source.vmid, qmp_socket=source.qmp_socket,
                                                 agent_socket=source.agent_socket, config_dir=config_dir,
                                                 mode='snapshot', **where))
    assert backup['frozen_filesystems'] == 1        # the ext4 data disk
    accel = source.accel
    source.stop()
    workdir = str(tmp_path / 'restored')
    os.makedirs(workdir)
    script = os.path.join(workdir, 'start.py')
    with open(script, 'w') as handle:
        handle.write(LINUX_STARTER.format(tools=os.path.abspath(TOOLS), workdir=workdir,
                                          image=image.directory, accel=accel))
    with open(os.path.join(config_dir, 'guests.d', f'{NEW_VMID}.conf'), 'w') as handle:
        handle.write(f"qmp: {os.path.join(workdir, 'qmp.sock')}\n"
                     f"start: {sys.executable} {script}\n")
    result = run_restore(RestoreRequest(vmid=source.vmid, config_dir=config_dir,
                                        target_dir=str(tmp_path / 'target'), live=True,
                                        new_vmid=NEW_VMID, bwlimit=1024, **where))
    restored = LinuxGuest(workdir, image, data_disk=result['disks'][0]['target'],
                          vmid=NEW_VMID)
    try:
        # Hold the copy while the guest boots: it must not need the copy to be done.
        restored.execute('block-job-pause', device=result['jobs'][0])
        restored.wait_agent(300)
        running = job_list(restored)
        assert running and running[0]['offset'] < running[0]['len'], running
        restored.execute('block-job-set-speed', device=result['jobs'][0], speed=0)
        restored.execute('block-job-resume', device=result['jobs'][0])
        wait_for_copies(restored)
        # The workload goes on writing onto the restored disk; then freeze and look at it.
        journal = restored.journal()
        at_restore = len(journal.entries)
        deadline = time.monotonic() + 300
        while len(restored.journal().entries) < at_restore + 2:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        restored.agent_call('guest-fsfreeze-freeze')
        try:
            copy = restored.snapshot_data(str(tmp_path / 'after.qcow2'))
        finally:
            restored.agent_call('guest-fsfreeze-thaw')
    finally:
        quit_guest(restored)
    info = json.loads(subprocess.run(['qemu-img', 'info', '--output=json',
                                      result['disks'][0]['target']], capture_output=True,
                                     text=True, check=True).stdout)
    assert 'backing-filename' not in info
    report = inspect_ext4(copy, str(tmp_path / 'inspect'), replay=False)
    assert not report.needs_recovery and report.fsck_exit == 0, report.fsck_output
    assert report.bad_files == [] and report.last_seq >= at_restore + 2


def test_a_damaged_chunk_met_during_a_datastore_live_restore_pauses_the_guest_and_says_why(
        make_guest, tmp_path, config_dir, datastore_path, monkeypatch):
    from guestvault_engine.datastore.chunk_store import FileChunkStore
    from guestvault_engine.datastore.fixed_index import read_fixed_index
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(tmp_path / 'fleecing'))
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"datastore: ds\n\tpath {datastore_path}\n")
    guest = make_guest(disks=[('qcow2', 48 * MiB)], vmid=9301)
    guest.write('vd0', 0x41, 0, 4 * MiB)
    guest.write('vd0', 0x42, 40 * MiB, 4 * MiB)       # chunk 10, read only by the copy
    result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                 config_dir=config_dir, storage='ds'))
    snapshot = os.path.join(datastore_path, 'vm', str(guest.vmid), result['time'])
    digest = read_fixed_index(os.path.join(snapshot, 'drive-vd0.img.fidx')).digest(10)
    with open(FileChunkStore(datastore_path).chunk_path(digest), 'r+b') as handle:
        handle.seek(20)
        handle.write(b'damaged')
    workdir = str(tmp_path / 'restored')
    register(config_dir, workdir)
    out = live(guest, {'storage': 'ds'}, config_dir, tmp_path / 'target')
    restored = RestoredGuest(workdir, out['disks'][0]['target'])
    try:
        error_file = tmp_path / 'target' / 'live-restore-error.json'
        deadline = time.monotonic() + 300
        while not error_file.exists() or restored.execute('query-status')['status'] == 'running':
            assert time.monotonic() < deadline, 'the damaged chunk went unnoticed'
            time.sleep(0.1)
        with open(error_file) as handle:
            state = json.load(handle)
        assert digest.hex() in state['error'] and 'offset 41943040' in state['error']
        assert 'still reads the rest from the backup' in state['disks']
        assert restored.execute('query-status')['status'] == 'paused'
        # The copy is paused at the error, not gone: guest_info says so.
        deadline = time.monotonic() + 300
        while True:
            copying = run_guest_info(GuestInfoRequest(NEW_VMID, config_dir=config_dir))['live_restore']
            if copying and copying[0]['io_status'] == 'failed':
                break
            assert time.monotonic() < deadline, copying
            time.sleep(0.1)
        assert copying[0]['done_bytes'] < copying[0]['total_bytes']
    finally:
        restored.stop()


def test_the_module_live_restores_from_a_datastore_and_its_server_outlives_the_module(
        ansible, backed_up, config_dir, tmp_path):
    guest, where, inc = backed_up
    if 'storage' not in where:
        pytest.skip('the qcow2 chain needs no server; its module path is the same otherwise')
    workdir = str(tmp_path / 'restored')
    register(config_dir, workdir)
    out = ansible.module('guestvault.backup.restore',
                         dict(where, vmid=guest.vmid, config_dir=config_dir, live=True,
                              new_vmid=NEW_VMID, target_dir=str(tmp_path / 'target'),
                              bwlimit=1024))   # 22 MiB: over 20 s, far longer than a return
    assert out.get('changed') and out['status'] == 'running', out
    restored = RestoredGuest(workdir, out['disks'][0]['target'])
    try:
        # The module has returned (its files are gone); the copy still reads the server.
        assert job_list(restored), 'the copy ended before the module returned'
        restored.execute('block-job-set-speed', device=out['jobs'][0], speed=0)
        wait_for_copies(restored)
        restored.qemu_io('vd0', 'flush')
        ref = run_restore(RestoreRequest(vmid=guest.vmid, config_dir=config_dir,
                                         target_dir=str(tmp_path / 'ref'), backup=inc['time'],
                                         **where))['disks'][0]['target']
        ok, text = same_content(ref, out['disks'][0]['target'])
        assert ok, text
        assert not os.path.exists(tmp_path / 'target' / 'live-restore-error.json')
    finally:
        restored.stop()


# -- issue 20: what ends or threatens a datastore live restore while it copies ----------------

def listening_pid(socket_path):
    """The process that listens on a unix socket (found as the kernel knows it: the listening
    socket's inode in /proc/net/unix, then the process holding that inode)."""
    with open('/proc/net/unix') as handle:
        next(handle)
        inodes = {fields[6] for fields in (line.split() for line in handle)
                  if len(fields) > 7 and fields[7] == socket_path
                  and int(fields[3], 16) & 0x10000}          # __SO_ACCEPTCON: listening
    assert len(inodes) == 1, (socket_path, inodes)
    wanted = f"socket:[{inodes.pop()}]"
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            fds = os.listdir(f'/proc/{pid}/fd')
            if any(os.readlink(f'/proc/{pid}/fd/{fd}') == wanted for fd in fds):
                return int(pid)
        except OSError:
            continue
    raise AssertionError(f"nobody listens on {socket_path}")


@pytest.fixture
def distinct_chunks(make_guest, tmp_path, config_dir, request, monkeypatch):
    """A lab guest whose first 24 MiB are six distinct 4 MiB chunks, backed up once into a
    datastore, and a plain restore of that backup as the reference: (guest, backup, ref)."""
    where = backup_location('datastore', request, config_dir, tmp_path, monkeypatch)
    guest = make_guest(disks=[('qcow2', 48 * MiB)], vmid=9301)
    for number in range(6):
        guest.write('vd0', 0x50 + number, number * 4 * MiB, 4 * MiB)
    backup = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                 config_dir=config_dir, **where))
    ref = run_restore(RestoreRequest(vmid=guest.vmid, config_dir=config_dir,
                                     target_dir=str(tmp_path / 'ref'), **where))
    register(config_dir, str(tmp_path / 'restored'))
    return guest, backup, ref['disks'][0]['target']


def finish_copies(restored, out, error_file, timeout=300):
    """Lift the copy's speed limit and wait until it is done; a live-restore error fails."""
    restored.execute('block-job-set-speed', device=out['jobs'][0], speed=0)
    deadline = time.monotonic() + timeout
    while job_list(restored):
        assert not os.path.exists(error_file), open(error_file).read()
        assert time.monotonic() < deadline, job_list(restored)
        time.sleep(0.1)
    assert not os.path.exists(error_file), open(error_file).read()
    restored.qemu_io('vd0', 'flush')


def test_killing_the_live_restore_server_pauses_the_guest_and_says_what_was_copied(
        distinct_chunks, config_dir, tmp_path):
    guest, _backup, _ref = distinct_chunks
    # 24 MiB at 1 MiB/s: the copy surely runs when the server is killed.
    out = live(guest, {'storage': 'ds'}, config_dir, tmp_path / 'target', bwlimit=1024)
    restored = RestoredGuest(str(tmp_path / 'restored'), out['disks'][0]['target'])
    socket_path = out['disks'][0]['backing'].split('socket=', 1)[1]
    try:
        server = listening_pid(socket_path)
        assert restored.execute('query-status')['status'] == 'running'
        os.kill(server, signal.SIGKILL)
        error_file = tmp_path / 'target' / 'live-restore-error.json'
        deadline = time.monotonic() + 300
        while not error_file.exists() or restored.execute('query-status')['status'] == 'running':
            assert time.monotonic() < deadline, 'the guest runs on without its server'
            time.sleep(0.1)
        with open(error_file) as handle:
            state = json.load(handle)
        assert f'(pid {server}) was killed by signal 9 (SIGKILL)' in state['error'], state
        assert 'restore again' in state['what_to_do']
        copied = state['copied'][0]
        assert copied['disk'] == 'vd0' and 0 <= copied['done_bytes'] < copied['total_bytes']
        assert restored.execute('query-status')['status'] == 'paused'
        deadline = time.monotonic() + 300
        while os.path.exists(socket_path):         # the dead server's socket is removed
            assert time.monotonic() < deadline, socket_path
            time.sleep(0.1)
        info = run_guest_info(GuestInfoRequest(NEW_VMID, config_dir=config_dir))
        assert info['live_restore_server']['running'] is False
        assert info['live_restore_server']['error']['copied'] == state['copied']
        assert any('killed by signal 9' in w and 'restore again' in w
                   for w in info['warnings']), info['warnings']
        assert out['server_pid'] == server
    finally:
        restored.stop()


def test_prune_waits_for_a_live_restore_of_its_snapshot_and_names_it(
        distinct_chunks, config_dir, tmp_path, datastore_path):
    from guestvault_engine.errors import LockTimeout
    from guestvault_engine.run.prune import PruneRequest, run_prune
    guest, backup, ref = distinct_chunks
    run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                        config_dir=config_dir, storage='ds'))
    # The older backup is served; the policy removes it.
    out = live(guest, {'storage': 'ds'}, config_dir, tmp_path / 'target', bwlimit=1024,
               backup=backup['time'])
    restored = RestoredGuest(str(tmp_path / 'restored'), out['disks'][0]['target'])
    prune = PruneRequest(vmid=guest.vmid, storage='ds', config_dir=config_dir,
                         prune_backups='keep-last=1', lockwait=0)
    snapshot = f"vm/{guest.vmid}/{backup['time']}"
    try:
        with pytest.raises(LockTimeout) as refused:
            run_prune(prune)
        assert re.search(rf"a live restore of {snapshot} to guest {NEW_VMID} is running "
                         rf"\(pid {out['server_pid']}, since .* UTC\)", str(refused.value)), \
            str(refused.value)
        assert os.path.isdir(os.path.join(datastore_path, 'vm', str(guest.vmid), backup['time']))
        finish_copies(restored, out, tmp_path / 'target' / 'live-restore-error.json')
        ok, text = same_content(ref, out['disks'][0]['target'])
        assert ok, text
    finally:
        restored.stop()
    # The server ends once the guest let go of it; then the prune goes ahead.
    deadline = time.monotonic() + 300
    while True:
        try:
            pruned = run_prune(prune)
            break
        except LockTimeout:
            assert time.monotonic() < deadline, 'the server kept the snapshot after the copy'
            time.sleep(0.2)
    assert pruned['removed'] == [snapshot]


def test_gc_keeps_the_chunks_a_live_restore_reads_even_when_its_index_is_gone(
        distinct_chunks, config_dir, tmp_path, datastore_path):
    from guestvault_engine.run.garbage_collect import GarbageCollectRequest, run_garbage_collect
    guest, backup, ref = distinct_chunks
    # The last GC was long ago: every chunk's access time is two days old.
    old = time.time() - 2 * 86400
    for folder, _dirs, names in os.walk(os.path.join(datastore_path, '.chunks')):
        for name in names:
            path = os.path.join(folder, name)
            os.utime(path, (old, os.stat(path).st_mtime))
    out = live(guest, {'storage': 'ds'}, config_dir, tmp_path / 'target', bwlimit=1024)
    restored = RestoredGuest(str(tmp_path / 'restored'), out['disks'][0]['target'])
    try:
        # The snapshot's index goes while it is served (prune now waits for the live restore;
        # the index can still go by hand, or a PBS sharing the datastore): nothing names its
        # chunks any more, and GC runs with no grace at all.
        shutil.rmtree(os.path.join(datastore_path, 'vm', str(guest.vmid), backup['time']))
        swept = run_garbage_collect(GarbageCollectRequest(storage='ds', grace='0s', config_dir=config_dir))
        assert swept['index_files'] == 0
        assert job_list(restored), 'the copy ended before the GC ran'
        finish_copies(restored, out, tmp_path / 'target' / 'live-restore-error.json')
        ok, text = same_content(ref, out['disks'][0]['target'])
        assert ok, text
    finally:
        restored.stop()
