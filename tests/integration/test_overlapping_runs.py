"""Issue 10: runs that overlap or are killed, on real QEMU.

A second backup of a guest waits for the first and says for whom; a killed run's block job,
target node, hidden directory and bitmap are reported by guest_info and cleared by the next run,
by guest_bitmaps cleanup=true or by ``guestvault-dump --cleanup``; backups are private files
whatever the umask; hooks see a clean environment.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.run.restore import RestoreRequest, run_restore
from lab_checks import backups_in, hidden_in, same_content
from procs import run_bounded

MiB = 1 << 20
ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
result = run_guest_backup(GuestBackupRequest(**json.loads(sys.argv[1])), log=lambda m: print(m, flush=True))
print('RESULT ' + json.dumps({{'backup': result['backup'], 'level': result['level']}}), flush=True)
"""


def bitmap_names(guest):
    """Every named bitmap on any node (while a job runs, query-block shows only its filter's)."""
    return sorted({b['name'] for node in guest.execute('query-named-block-nodes', flat=True)
                   for b in node.get('dirty-bitmaps', []) if b.get('name')})


def backup(guest, store, config_dir, log=None, **options):
    """A backup in this process, as a module runs it."""
    return run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=store,
                                               config_dir=config_dir, **options), log=log)


def start_backup(guest, store, config_dir, env=None, **options):
    """A backup in its own process (as a second run or a job would be), its log on stdout."""
    request = dict(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=store,
                   config_dir=config_dir, **options)
    script = RUNNER.format(tests=os.path.join(os.path.dirname(__file__), '..'))
    return subprocess.Popen([sys.executable, '-c', script, json.dumps(request)],
                            env=dict(os.environ, **(env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for_job(guest, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = guest.execute('query-block-jobs')
        if jobs and jobs[0]['offset'] > 0:
            return jobs
        if proc.poll() is not None:
            pytest.fail(f"backup ended before its job was seen: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"backup job never started: {proc.communicate()}")


def finished(proc, timeout=300):
    out = proc.communicate(timeout=timeout)[0]
    assert proc.returncode == 0, out
    result = json.loads(out.rsplit('RESULT ', 1)[1])
    return result, out


def kill_mid_full(guest, store, config_dir):
    """A full backup killed with SIGKILL while QEMU copies: its job goes on in QEMU."""
    proc = start_backup(guest, store, config_dir, level='full', bwlimit=256)
    jobs = wait_for_job(guest, proc)
    proc.kill()
    proc.communicate(timeout=300)
    return jobs


def test_a_second_backup_waits_for_the_first_and_says_for_whom(make_guest, store, config_dir):
    guest = make_guest(disks=[('qcow2', 12 * MiB)])
    guest.write('vd0', 0x41, 0, 12 * MiB)
    started = time.monotonic()
    first = start_backup(guest, store, config_dir, level='full', bwlimit=512)  # ~24 s
    # Once the first is copying (a loaded machine may take longer than 0.5 s to start a Python
    # process, and then the second would simply be first), the second starts 0.5 s later.
    wait_for_job(guest, first)
    time.sleep(0.5)
    second = start_backup(guest, store, config_dir)
    (one, one_log), (two, two_log) = finished(first), finished(second)
    assert time.monotonic() - started >= 20          # the first really lasted long
    assert sorted(backups_in(store, guest.vmid)) == sorted(
        [one['backup'].split('/')[-1], two['backup'].split('/')[-1]])
    assert f"a backup of guest {guest.vmid} is running (pid {first.pid}, since " in two_log
    assert 'waiting up to lockwait 180 min' in two_log
    assert two['level'] == 'inc'                      # after the first, on its chain


def test_a_killed_full_leaves_a_job_and_a_bitmap_that_the_next_incremental_removes(
        make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0x42, 0, 8 * MiB)
    base = backup(guest, store, config_dir, level='full')
    kill_mid_full(guest, store, config_dir)
    assert len(bitmap_names(guest)) == 2             # the chain's, and the killed run's new one
    assert hidden_in(store, guest.vmid)
    guest.write('vd0', 0x43, 0, MiB)
    log = []
    inc = backup(guest, store, config_dir, log=log.append, level='inc')
    assert inc['parent'] == base['time']
    assert any(line.startswith('removed orphan bitmap ') and 'killed' in line for line in log), log
    assert any(line.startswith('cancelling block job guestvault-') for line in log), log
    assert bitmap_names(guest) == [inc['disks'][0]['bitmap']]
    assert guest.execute('query-block-jobs') == [] and hidden_in(store, guest.vmid) == []
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(inc['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_a_kill_after_the_rename_before_the_old_bitmap_goes_leaves_a_correct_chain(
        make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0x44, 0, 4 * MiB)
    base = backup(guest, store, config_dir, level='full')
    guest.write('vd0', 0x45, 0, MiB)
    marker = tmp_path / 'stopped'
    proc = start_backup(guest, store, config_dir, level='inc',
                        env={'GUESTVAULT_TEST_STOP': f'after-commit:{marker}'})
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=300)
    stored = backups_in(store, guest.vmid)
    assert len(stored) == 2                           # the incremental was complete
    assert len(bitmap_names(guest)) == 2              # the old bitmap was not dropped yet
    guest.write('vd0', 0x46, 2 * MiB, MiB)
    log = []
    nxt = backup(guest, store, config_dir, log=log.append)
    assert nxt['level'] == 'inc' and nxt['parent'] == stored[1] != base['time']
    assert any('superseded' in line for line in log), log
    assert bitmap_names(guest) == [nxt['disks'][0]['bitmap']]
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(nxt['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_guest_info_reports_a_leftover_job_and_guest_bitmaps_clears_it(
        ansible, make_guest, store, config_dir):
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0x47, 0, 8 * MiB)
    jobs = kill_mid_full(guest, store, config_dir)
    base = {'vmid': guest.vmid, 'qmp_socket': guest.qmp_socket, 'config_dir': config_dir}
    info = ansible.module('guestvault.backup.guest_info', dict(base, dumpdir=store))
    assert info['_status'] == 'ok', info             # a job's nameless bitmap does not crash it
    left = info['leftovers']
    assert left['jobs'] == [jobs[0]['device']] and len(left['targets']) == 1
    assert left['interrupted_run']['pid'] and len(left['hidden_dirs']) == 1
    (orphan,) = left['orphan_bitmaps']
    assert 'killed' in orphan['reason']
    flagged = [b for d in info['disks'] for b in d['bitmaps'] if b['orphan']]
    assert [b['name'] for b in flagged] == [orphan['name']] and info['disks'][0]['in_job']
    predicted = ansible.module('guestvault.backup.guest_bitmaps',
                               dict(base, dumpdir=store, cleanup=True), check=True)
    assert predicted['changed'] is True and guest.execute('query-block-jobs') != []
    cleared = ansible.module('guestvault.backup.guest_bitmaps', dict(base, dumpdir=store,
                                                                     cleanup=True))
    assert cleared['_status'] == 'ok' and cleared['changed'] is True, cleared
    assert guest.execute('query-block-jobs') == [] and hidden_in(store, guest.vmid) == []
    assert bitmap_names(guest) == []
    assert not [n for n in guest.execute('query-named-block-nodes', flat=True)
                if n['node-name'].startswith('gvt-')]
    again = ansible.module('guestvault.backup.guest_bitmaps', dict(base, dumpdir=store,
                                                                   cleanup=True))
    assert again['changed'] is False
    info = ansible.module('guestvault.backup.guest_info', dict(base, dumpdir=store))
    assert info['leftovers'] == {'jobs': [], 'targets': [], 'interrupted_run': None,
                                 'hidden_dirs': [], 'orphan_bitmaps': [], 'exports': [],
                                 'nbd_server': None, 'frozen_bitmaps': [], 'fleecing': []}


def test_the_node_command_cleanup_clears_a_killed_run(make_guest, store, config_dir):
    """What the job service's ExecStopPost runs after a killed run."""
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0x48, 0, 8 * MiB)
    with open(os.path.join(config_dir, 'guests.d', f'{guest.vmid}.conf'), 'w') as handle:
        handle.write(f'qmp: {guest.qmp_socket}\n')
    kill_mid_full(guest, store, config_dir)
    command = [os.path.join(ROOT, 'bin', 'guestvault-dump'), str(guest.vmid), '--dumpdir', store,
               '--config-dir', config_dir, '--cleanup']
    proc = run_bounded([sys.executable] + command, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'cancelling block job' in proc.stdout and 'removed orphan bitmap' in proc.stdout
    assert guest.execute('query-block-jobs') == [] and hidden_in(store, guest.vmid) == []
    proc = run_bounded([sys.executable] + command, timeout=300, capture_output=True, text=True)
    assert proc.returncode == 0 and 'nothing left over' in proc.stdout, proc.stdout


def test_backups_and_restores_are_private_whatever_the_umask(make_guest, store, config_dir,
                                                             tmp_path):
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0x49, 0, MiB)
    previous = os.umask(0)
    try:
        result = backup(guest, store, config_dir, notes_template='{{vmid}}', protected=True)
        restored = run_restore(RestoreRequest(vmid=guest.vmid, dumpdir=store,
                                              config_dir=config_dir,
                                              target_dir=str(tmp_path / 'restored' / 'a')))
    finally:
        os.umask(previous)
    assert os.umask(previous) == previous            # the engine gave the umask back
    found = []
    for top in (os.path.join(store, 'vm'), restored['target_dir']):
        for root, dirs, files in os.walk(top):
            found += [(os.path.join(root, n), 0o700) for n in dirs]
            found += [(os.path.join(root, n), 0o600) for n in files if n != '.lock']
        found.append((top, 0o700))
    assert len(found) > 8
    wrong = [(p, oct(os.stat(p).st_mode & 0o777)) for p, mode in found
             if os.stat(p).st_mode & 0o777 != mode]
    assert wrong == []
    assert os.path.basename(result['backup_dir']) in os.listdir(os.path.join(store, 'vm',
                                                                             str(guest.vmid)))


def test_a_hook_run_from_ansible_sees_only_vzdumps_variables(ansible, make_guest, store,
                                                             tmp_path, monkeypatch):
    monkeypatch.setenv('FOO_SECRET', 'hunter2')     # reaches the module's process, not the hook
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    dump = tmp_path / 'env'
    hook = tmp_path / 'hook.sh'
    hook.write_text(f'#!/bin/sh\n[ "$1" = backup-end ] && env > {dump}\nexit 0\n')
    hook.chmod(0o755)
    result = ansible.module('guestvault.backup.guest_backup', {
        'vmid': guest.vmid, 'qmp_socket': guest.qmp_socket, 'dumpdir': store,
        'script': str(hook)})
    assert result['_status'] == 'ok', result
    seen = dict(line.split('=', 1) for line in dump.read_text().splitlines())
    assert set(seen) - {'PWD'} == {'PATH', 'STOREID', 'DUMPDIR', 'VMTYPE', 'HOSTNAME', 'TARGET',
                                   'LOGFILE'}
    assert seen['TARGET'] == result['backup_dir']
