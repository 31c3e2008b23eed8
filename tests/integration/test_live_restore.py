"""Issue 13, live restore from qcow2 chains: a guest runs on its backup at once, its disks copied
back in the background, on real QEMU.

The started guest is a lab guest (prelaunch QEMU, no OS) whose start command is a real shell line
that starts QEMU with -S on $GUESTVAULT_DISK_VD0. Its disk is written through the guest while the
copy runs; once the copy is done, the image must equal the backup with exactly those writes on
top (qemu-img compare against a normal restore with the same writes applied by qemu-io).
"""
import json
import os
import subprocess
import sys
import time

import pytest

from guestvault_engine.errors import ConfigError, GuestvaultError
from guestvault_engine.run.backup import BackupRequest, run_backup
from guestvault_engine.run.inspect import inspect_guest
from guestvault_engine.run.restore import RestoreRequest, run_restore
from labguest import LabGuest
from lab_checks import same_content

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


def job_list(guest):
    return [j for j in guest.execute('query-block-jobs') if j['device'].startswith('guestvault-')]


def wait_for_copies(guest, timeout=300):
    deadline = time.monotonic() + timeout
    while job_list(guest):
        assert time.monotonic() < deadline, job_list(guest)
        time.sleep(0.1)


@pytest.fixture
def backed_up(make_guest, tmp_path):
    """A lab guest with a full and an incremental backup in a dumpdir; (guest, dumpdir, inc)."""
    dumpdir = tmp_path / 'dump'
    dumpdir.mkdir()
    guest = make_guest(disks=[('qcow2', 48 * MiB)], vmid=9301)
    guest.write('vd0', 0x31, 0, 16 * MiB)
    run_backup(BackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=str(dumpdir)))
    guest.write('vd0', 0x32, 8 * MiB, 4 * MiB)
    guest.write('vd0', 0x33, 40 * MiB, 2 * MiB)
    inc = run_backup(BackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                   dumpdir=str(dumpdir)))
    assert inc['level'] == 'inc'
    return guest, str(dumpdir), inc


def live(guest, dumpdir, config_dir, target, **options):
    return run_restore(RestoreRequest(vmid=guest.vmid, dumpdir=dumpdir, config_dir=config_dir,
                                      target_dir=str(target), live=True, new_vmid=NEW_VMID,
                                      **options))


def test_the_guest_runs_at_once_and_ends_on_the_backup_plus_its_own_writes(
        backed_up, config_dir, tmp_path):
    guest, dumpdir, inc = backed_up
    workdir = str(tmp_path / 'restored')
    register(config_dir, workdir)
    # 22 MiB to copy at 2 MiB/s: the copy is still running when the call returns.
    result = live(guest, dumpdir, config_dir, tmp_path / 'target', bwlimit=2048)
    image = result['disks'][0]['target']
    restored = RestoredGuest(workdir, image)
    try:
        assert result['status'] == 'running' and result['vmid_started'] == NEW_VMID
        assert result['jobs'] == [f'guestvault-live-{NEW_VMID}-vd0']
        assert restored.execute('query-status')['status'] == 'running'
        restored.execute('block-job-pause', device=result['jobs'][0])
        copying = inspect_guest(NEW_VMID, config_dir=config_dir)['live_restore']
        assert [(c['disk'], c['done_bytes'] < c['total_bytes']) for c in copying] == \
            [('vd0', True)], copying
        # The guest writes while its disk is copied: over backed-up data and over a hole.
        writes = [(0x77, 9 * MiB, MiB), (0x78, 30 * MiB, 512 * 1024)]
        for pattern, offset, length in writes:
            restored.write('vd0', pattern, offset, length)
        restored.execute('block-job-set-speed', device=result['jobs'][0], speed=0)
        restored.execute('block-job-resume', device=result['jobs'][0])
        wait_for_copies(restored)
        assert inspect_guest(NEW_VMID, config_dir=config_dir)['live_restore'] == []
        restored.qemu_io('vd0', 'flush')
        info = json.loads(subprocess.run(['qemu-img', 'info', '-U', '--output=json', image],
                                         capture_output=True, text=True, check=True).stdout)
        assert 'backing-filename' not in info          # it stands alone
        # The reference: a normal restore of the same backup with the same writes on top.
        ref = run_restore(RestoreRequest(vmid=guest.vmid, dumpdir=dumpdir,
                                         config_dir=config_dir, target_dir=str(tmp_path / 'ref'),
                                         backup=inc['time']))['disks'][0]['target']
        for pattern, offset, length in writes:
            subprocess.run(['qemu-io', '-f', 'qcow2', '-c',
                            f'write -P {pattern:#x} {offset} {length}', ref],
                           check=True, capture_output=True)
        ok, text = same_content(ref, image)
        assert ok, text
    finally:
        restored.stop()
    with open(tmp_path / 'target' / 'guest.json') as handle:
        assert json.load(handle)['restored_from'] == f"vm/{guest.vmid}/{inc['time']}"


def test_a_guest_started_on_other_images_is_stopped_and_nothing_is_left(
        backed_up, config_dir, tmp_path):
    guest, dumpdir, _inc = backed_up
    workdir = str(tmp_path / 'restored')
    other = tmp_path / 'other.qcow2'
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', str(other), '48M'], check=True)
    register(config_dir, workdir, variable='OTHER_DISK',
             start=f"OTHER_DISK={other} {sys.executable} {os.path.join(workdir, 'start.py')}")
    with pytest.raises(GuestvaultError, match=r'must use \$GUESTVAULT_DISK_VD0.*the guest was '
                                              r'stopped and the new images removed'):
        live(guest, dumpdir, config_dir, tmp_path / 'target')
    assert not os.path.exists(tmp_path / 'target' / 'vd0.qcow2')
    # It was started (its console log exists) and has quit (QEMU removes its pidfile on exit).
    assert os.path.exists(os.path.join(workdir, 'qemu.log'))
    deadline = time.monotonic() + 300
    pidfile = os.path.join(workdir, 'qemu.pid')
    while os.path.exists(pidfile) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(pidfile), 'the wrongly started guest still runs'


def test_live_restore_refuses_what_it_cannot_do(backed_up, config_dir, tmp_path):
    guest, dumpdir, _inc = backed_up
    with pytest.raises(ConfigError, match=f'starts guest {NEW_VMID}, which is not registered'):
        live(guest, dumpdir, config_dir, tmp_path / 't1')
    register(config_dir, str(tmp_path / 'restored'), start='false')
    with pytest.raises(ConfigError, match='format raw cannot'):
        live(guest, dumpdir, config_dir, tmp_path / 't2', format='raw')
    with pytest.raises(GuestvaultError, match='the start command failed'):
        live(guest, dumpdir, config_dir, tmp_path / 't3')
    assert not os.path.exists(tmp_path / 't3' / 'vd0.qcow2')
    # The source guest itself is running: it is not started over its own disks.
    with open(os.path.join(config_dir, 'guests.d', f'{guest.vmid}.conf'), 'w') as handle:
        handle.write(f"qmp: {guest.qmp_socket}\nstart: true\n")
    with pytest.raises(ConfigError, match=f'guest {guest.vmid} is running'):
        run_restore(RestoreRequest(vmid=guest.vmid, dumpdir=dumpdir, config_dir=config_dir,
                                   target_dir=str(tmp_path / 't4'), live=True))
    planned = live(guest, dumpdir, config_dir, tmp_path / 't5', check_mode=True)
    assert planned['live'] and not os.path.exists(tmp_path / 't5')


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


def test_a_linux_guest_answers_its_agent_before_its_disk_is_copied_and_ends_clean(
        linux_guest, image, config_dir, tmp_path):
    from linuxguest import LinuxGuest, inspect_ext4
    source = linux_guest(vmid=9311)
    dumpdir = tmp_path / 'dump'
    dumpdir.mkdir()
    deadline = time.monotonic() + 300
    while len(source.journal().entries) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    backup = run_backup(BackupRequest(vmid=source.vmid, qmp_socket=source.qmp_socket,
                                      agent_socket=source.agent_socket, dumpdir=str(dumpdir),
                                      mode='snapshot'))
    assert backup['frozen_filesystems']
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
    result = run_restore(RestoreRequest(vmid=source.vmid, dumpdir=str(dumpdir),
                                        config_dir=config_dir, target_dir=str(tmp_path / 'target'),
                                        live=True, new_vmid=NEW_VMID, bwlimit=1024))
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
