"""The consistency modes on a real Linux guest (tools/linuxguest.py): what the restored filesystem
looks like after a backup in ``snapshot`` mode (with and without fsfreeze through qemu-ga),
``suspend`` mode and ``stop`` mode, while a workload inside the guest keeps writing files and a
journal of their checksums.

A copy of a mounted, unfrozen ext4 always carries ``needs_recovery`` (FACTS.md), so that flag tells
a frozen or cleanly unmounted point in time from a crash-consistent one; ``inspect_ext4`` checks it,
runs ``e2fsck -fn``, and checks every file the restored journal lists (size and sha256). Every
backup copies with a bandwidth limit, so the copy spans seconds of guest writes.
"""
import os
import time

import pytest

from guestvault_engine.guest import qmp as engine_qmp
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.errors import ConsistencyError, QmpCommandFailed
from guestvault_engine.run.restore import RestoreRequest, run_restore
from lab_checks import backups_in
from linuxguest import LinuxGuest, inspect_ext4

BWLIMIT = 8192   # KiB/s for the guest: about 3 s for the data disk's few tens of MiB


@pytest.fixture(scope='module')
def agent_guest(image, tmp_path_factory):
    """One guest with qemu-ga and the workload for the snapshot-mode tests (the dead-agent test
    runs last: it leaves the agent stopped)."""
    guest = LinuxGuest(str(tmp_path_factory.mktemp('agent-guest')), image, vmid=9201).start()
    try:
        yield guest.wait_ready(300)
    finally:
        guest.stop()


class Run:
    """One backup run: its result (or error) and the engine's log."""

    def __init__(self, guest, store, config_dir, agent=True, **options):
        self.lines = []
        where = {'storage': options.pop('storage')} if 'storage' in options else {'dumpdir': store}
        request = GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                     agent_socket=guest.agent_socket if agent else None,
                                     config_dir=config_dir, bwlimit=BWLIMIT, **where, **options)
        self.result = run_guest_backup(request, log=self.lines.append)

    @property
    def log(self):
        return '\n'.join(self.lines)


def written_files(guest, at_least, timeout=300):
    """The live journal once the workload has finished ``at_least`` files."""
    deadline = time.monotonic() + timeout
    while True:
        journal = guest.journal()
        if len(journal.entries) >= at_least:
            return journal
        assert time.monotonic() < deadline, f"the workload wrote only {len(journal.entries)} files"
        time.sleep(0.5)


def restored(store, config_dir, vmid, target):
    result = run_restore(RestoreRequest(vmid=vmid, target_dir=str(target), dumpdir=store,
                                        config_dir=config_dir))
    return result['disks'][0]['target']


def writes_go_on(guest, seconds=2.0):
    """Whether the guest's disk sees writes (it is not frozen): QEMU's own write counter grows."""
    def writes():
        stats = guest.execute('query-blockstats', **{'query-nodes': False})
        return sum(s['stats']['wr_operations'] for s in stats)
    first = writes()
    time.sleep(seconds)
    return writes() > first


def hook_calls(guest):
    """The phases qemu-ga ran its fsfreeze hook for, in order, from the guest's console."""
    return [line.split()[-1] for line in guest.console().splitlines()
            if 'GUESTVAULT-FSFREEZE-HOOK' in line]


# --------------------------------------------------------------------------- snapshot mode

def test_snapshot_with_the_agent_restores_a_clean_filesystem_with_every_finished_file(
        agent_guest, store, config_dir, tmp_path):
    before = written_files(agent_guest, 5)
    run = Run(agent_guest, store, config_dir, mode='snapshot')
    assert run.result['frozen_filesystems'] == 1, run.log          # the ext4 data disk
    frozen_for = run.result['freeze_seconds']
    assert 0 < frozen_for < run.result['duration'] and f"frozen for at most {frozen_for:.3f} s" in run.log
    assert 'froze' in run.log and 'thawed' in run.log
    # qemu-ga itself ran its fsfreeze hook for both (tools/linuxguest/fsfreeze-hook).
    assert hook_calls(agent_guest) == ['freeze', 'thaw'] * (len(hook_calls(agent_guest)) // 2)
    assert hook_calls(agent_guest)[-2:] == ['freeze', 'thaw']
    assert not [w for w in run.result['warnings'] if 'frozen' in w], run.result['warnings']
    assert agent_guest.agent_call('guest-fsfreeze-status') == 'thawed'
    after = agent_guest.journal()
    report = inspect_ext4(restored(store, config_dir, 9201, tmp_path / 'restored'),
                          str(tmp_path / 'inspect'), replay=False)
    # Frozen: the journal was committed, nothing for a replay to do; every listed file is whole.
    assert not report.needs_recovery and report.fsck_exit == 0, report.fsck_output
    assert report.bad_files == [] and not report.torn_tail
    # Every file finished before the backup is in it; the guest kept writing during the copy.
    assert max(before.entries) <= report.last_seq < max(after.entries)


def test_a_datastore_backup_with_the_agent_restores_a_clean_filesystem(
        agent_guest, config_dir, tmp_path, datastore_path, monkeypatch):
    """Pull capture (fleecing + NBD) inside the freeze, on the real guest: the restored disk is
    as clean as from the qcow2 chain, and the guest kept writing while the chunks were read."""
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(tmp_path / 'fleecing'))
    with open(f"{config_dir}/storage.cfg", 'w') as handle:
        handle.write(f"datastore: ds\n\tpath {datastore_path}\n")
    before = written_files(agent_guest, 5)
    run = Run(agent_guest, None, config_dir, mode='snapshot', storage='ds')
    assert run.result['frozen_filesystems'] == 1 and 'thawed' in run.log, run.log
    assert agent_guest.agent_call('guest-fsfreeze-status') == 'thawed'
    after = agent_guest.journal()
    result = run_restore(RestoreRequest(vmid=9201, target_dir=str(tmp_path / 'restored'),
                                        storage='ds', config_dir=config_dir))
    report = inspect_ext4(result['disks'][0]['target'], str(tmp_path / 'inspect'), replay=False)
    assert not report.needs_recovery and report.fsck_exit == 0, report.fsck_output
    assert report.bad_files == [] and not report.torn_tail
    assert max(before.entries) <= report.last_seq < max(after.entries)


def test_a_backup_failing_while_the_guest_is_frozen_still_thaws_it(
        agent_guest, store, config_dir, monkeypatch):
    written_files(agent_guest, 5)

    def refused(self, actions):
        # What QEMU answers when the transaction cannot start (here injected at the QMP edge,
        # as no real fault can be timed into the frozen instant); the freeze before it is real.
        raise QmpCommandFailed('transaction', 'GenericError', 'injected failure')
    monkeypatch.setattr(engine_qmp.QmpSession, 'transaction', refused)
    lines = []
    with pytest.raises(QmpCommandFailed):
        run_guest_backup(GuestBackupRequest(vmid=9201, qmp_socket=agent_guest.qmp_socket,
                                            agent_socket=agent_guest.agent_socket, dumpdir=store,
                                            config_dir=config_dir, mode='snapshot'), log=lines.append)
    log = '\n'.join(lines)
    assert 'froze' in log and 'thawed' in log, log
    assert hook_calls(agent_guest)[-2:] == ['freeze', 'thaw']
    assert agent_guest.agent_call('guest-fsfreeze-status') == 'thawed'
    assert writes_go_on(agent_guest)
    assert backups_in(store, 9201) == []


def test_an_agent_that_hangs_in_the_freeze_is_thawed_once_it_answers(
        agent_guest, store, config_dir, tmp_path):
    # The guest's fsfreeze hook (tools/linuxguest/fsfreeze-hook) makes the freeze take 6 s: the
    # backup gives up after freeze_timeout, goes on crash-consistent, and thaws when qemu-ga
    # finally froze, so no freeze is left behind.
    agent_guest.guest_exec(['sh', '-c', 'echo 6 > /run/freeze_delay'])
    try:
        run = Run(agent_guest, store, config_dir, mode='snapshot', freeze_timeout=2)
    finally:
        agent_guest.guest_exec(['rm', '-f', '/run/freeze_delay'])
    assert run.result['frozen_filesystems'] is None
    assert any('fsfreeze failed' in w for w in run.result['warnings']), run.result['warnings']
    assert 'thawed' in run.log, run.log
    assert agent_guest.agent_call('guest-fsfreeze-status') == 'thawed'
    assert writes_go_on(agent_guest)
    report = inspect_ext4(restored(store, config_dir, 9201, tmp_path / 'restored'),
                          str(tmp_path / 'inspect'))
    assert report.after_replay is None or report.after_replay.clean, report


def test_snapshot_without_an_agent_is_crash_consistent_and_says_so(
        agent_guest, store, config_dir, tmp_path):
    written_files(agent_guest, 5)
    run = Run(agent_guest, store, config_dir, agent=False, mode='snapshot')
    assert run.result['frozen_filesystems'] is None
    assert any('not frozen' in w and 'crash-consistent' in w for w in run.result['warnings'])
    report = inspect_ext4(restored(store, config_dir, 9201, tmp_path / 'restored'),
                          str(tmp_path / 'inspect'))
    # A copy of a mounted ext4: the journal needs replaying, after which it is clean and every
    # file the journal lists (each fsynced before its line) is whole.
    assert report.needs_recovery
    assert report.after_replay.clean, report.after_replay


def test_a_dead_agent_times_out_and_leaves_no_freeze_behind(agent_guest, store, config_dir):
    # qemu-ga stopped (SIGSTOP) in the guest: it accepts bytes but never answers.
    agent_guest.agent_call('guest-exec', {'path': '/bin/sh', 'arg': [
        '-c', 'sleep 1; kill -STOP "$(cat /run/qemu-ga.pid)"']})
    time.sleep(2)
    started = time.monotonic()
    run = Run(agent_guest, store, config_dir, mode='snapshot', freeze_timeout=3)
    assert time.monotonic() - started < 60
    assert any('not answering' in w and 'crash-consistent' in w for w in run.result['warnings'])
    assert run.result['frozen_filesystems'] is None
    assert writes_go_on(agent_guest)


# --------------------------------------------------------------------------- suspend and stop

def test_suspend_pauses_the_vcpus_only_around_the_point_in_time(linux_guest, store, config_dir,
                                                                tmp_path):
    guest = linux_guest(vmid=9202)
    written_files(guest, 5)
    run = Run(guest, store, config_dir, mode='suspend')
    pause = run.result['pause_seconds']
    assert pause is not None and 0 < pause < run.result['duration'], run.result
    assert f"paused for {pause:.3f} s" in run.log
    assert guest.status() == 'running'
    after = guest.journal()
    report = inspect_ext4(restored(store, config_dir, 9202, tmp_path / 'restored'),
                          str(tmp_path / 'inspect'))
    assert report.needs_recovery        # the vCPUs stopped, the filesystem was not told
    assert report.after_replay.clean, report.after_replay
    assert report.after_replay.last_seq < max(after.entries)   # the guest ran during the copy


def test_stop_shuts_down_through_the_agent_backs_up_the_stopped_disk_and_restarts(
        linux_guest, store, config_dir, tmp_path):
    guest = linux_guest(vmid=9203)
    before = written_files(guest, 5)
    run = Run(guest, store, config_dir, mode='stop', stopwait=1)
    assert 'through the guest agent' in run.log, run.log
    downtime = run.result['downtime_seconds']
    assert downtime is not None and downtime > 0
    assert f"down for {downtime:.3f} s" in run.log
    # Running again right after the point in time: it boots again while the copy runs.
    assert guest.status() == 'running'
    guest.wait_console('GUESTVAULT-POWEROFF', timeout=60)
    _wait_for_second(guest, 'GUESTVAULT-READY', timeout=300)
    disk = restored(store, config_dir, 9203, tmp_path / 'restored')
    report = inspect_ext4(disk, str(tmp_path / 'inspect'), replay=False)
    assert not report.needs_recovery and report.fsck_exit == 0, report.fsck_output   # unmounted
    assert report.bad_files == [] and report.last_seq >= max(before.entries)

    # The restored disk boots: a new guest on it sees the workload's files.
    clone = linux_guest(vmid=9204, data_disk=disk, workload=False)
    journal = clone.journal()
    assert max(journal.entries) == report.last_seq
    seq = max(journal.entries)
    code, out, _err = clone.guest_exec(['sha256sum', f'/data/w/{seq}'])
    assert code == 0 and out.split()[0].decode() == journal.entries[seq][0]


def test_stop_mode_into_a_datastore_backs_up_the_stopped_disk_and_restarts(
        linux_guest, config_dir, tmp_path, datastore_path, monkeypatch):
    """Stop mode with pull capture: the point in time is fixed while the guest is off, it runs
    again before the chunks are read over NBD, and the restore is a cleanly unmounted disk."""
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(tmp_path / 'fleecing'))
    with open(f"{config_dir}/storage.cfg", 'w') as handle:
        handle.write(f"datastore: ds\n\tpath {datastore_path}\n")
    guest = linux_guest(vmid=9206)
    before = written_files(guest, 5)
    run = Run(guest, None, config_dir, mode='stop', stopwait=1, storage='ds')
    assert 'through the guest agent' in run.log, run.log
    assert run.result['downtime_seconds'] > 0 and guest.status() == 'running'
    _wait_for_second(guest, 'GUESTVAULT-READY', timeout=300)
    result = run_restore(RestoreRequest(vmid=9206, target_dir=str(tmp_path / 'restored'),
                                        storage='ds', config_dir=config_dir))
    report = inspect_ext4(result['disks'][0]['target'], str(tmp_path / 'inspect'), replay=False)
    assert not report.needs_recovery and report.fsck_exit == 0, report.fsck_output   # unmounted
    assert report.bad_files == [] and report.last_seq >= max(before.entries)
    assert not os.listdir(tmp_path / 'fleecing')          # the fleecing image is gone


def test_stop_without_an_agent_uses_acpi_and_a_guest_ignoring_it_is_left_running(
        linux_guest, store, config_dir, tmp_path):
    guest = linux_guest(vmid=9205, ignore_shutdown=True)
    written_files(guest, 3)
    with pytest.raises(ConsistencyError) as err:
        Run(guest, store, config_dir, agent=False, mode='stop', stopwait=0.1)
    assert 'did not shut down within stopwait' in str(err.value)
    assert guest.status() == 'running' and writes_go_on(guest)
    assert backups_in(store, 9205) == []
    # Now let the guest honour the power button (as a guest with acpid does).
    guest.guest_exec(['sh', '-c', 'echo 0 > /run/ignore_shutdown; '
                      'acpid -c /etc/acpi -p /run/acpid.pid -l /run/acpid.log'])
    run = Run(guest, store, config_dir, agent=False, mode='stop', stopwait=1)
    assert 'ACPI power button' in run.log, run.log
    guest.wait_console('GUESTVAULT-POWER-BUTTON', timeout=60)
    report = inspect_ext4(restored(store, config_dir, 9205, tmp_path / 'restored'),
                          str(tmp_path / 'inspect'), replay=False)
    assert not report.needs_recovery and report.fsck_exit == 0 and report.bad_files == []


def _wait_for_second(guest, marker, timeout):
    deadline = time.monotonic() + timeout
    while guest.console().count(marker) < 2:
        assert time.monotonic() < deadline, f"no second {marker} within {timeout} s"
        time.sleep(0.5)


def test_stop_mode_says_so_when_qemu_runs_with_no_reboot_and_cannot_restart_the_guest(
        linux_guest, store, config_dir):
    # -no-reboot turns system_reset into another shutdown: the guest cannot be started again.
    guest = linux_guest(vmid=9206, workload=False, extra_args=['-no-reboot'])
    with pytest.raises(ConsistencyError) as err:
        Run(guest, store, config_dir, mode='stop', stopwait=1)
    assert '-no-reboot' in str(err.value) and 'left off' in str(err.value)
    assert guest.status() == 'shutdown'
    assert backups_in(store, 9206) == []
