"""guestvault-dump, the node command that scheduled jobs run, on real guests."""
import json
import os
import pathlib
import pty
import re
import subprocess
import sys

import pytest

from lab_checks import backups_in, same_content
from procs import run_bounded

MiB = 1 << 20
ROOT = os.path.join(os.path.dirname(__file__), '..', '..')
COMMAND = os.path.join(ROOT, 'bin', 'guestvault-dump')


def register(config_dir, vmid, qmp, **extra):
    lines = [f"name: g{vmid}", f"qmp: {qmp}"] + [f"{k}: {v}" for k, v in extra.items()]
    with open(os.path.join(config_dir, 'guests.d', f'{vmid}.conf'), 'w') as handle:
        handle.write('\n'.join(lines) + '\n')


@pytest.fixture
def node(make_guest, config_dir, store, tmp_path):
    guests = {vmid: make_guest(disks=[('qcow2', 8 * MiB)], vmid=vmid) for vmid in (301, 302)}
    for vmid, guest in guests.items():
        register(config_dir, vmid, guest.qmp_socket, pool='web')
    register(config_dir, 303, str(tmp_path / 'nobody.sock'))   # registered, but not running
    state_dir = tmp_path / 'state'
    env = dict(os.environ, GUESTVAULT_STATE_DIR=str(state_dir),
               GUESTVAULT_FLEECING_DIR=str(tmp_path / 'fleecing'))

    def dump(*args):
        # The command runs hooks and qemu-img: a timeout ends them too.
        return run_bounded([sys.executable, COMMAND, '--config-dir', config_dir, *args], 300,
                           capture_output=True, text=True, env=env)
    return guests, dump, state_dir


def test_all_guests_one_after_another_a_failure_does_not_stop_the_others(node, store, tmp_path):
    guests, dump, _state = node
    proc = dump('--all', '--dumpdir', store, '--quiet')
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert backups_in(store, 301) and backups_in(store, 302) and not backups_in(store, 303)
    for vmid, guest in guests.items():
        guest.write('vd0', vmid % 256, 0, MiB)
    proc = dump('--pool', 'web', '--dumpdir', store, '--prune-backups', 'keep-last=1')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '2 of 2 guest(s) backed up' in proc.stdout
    for vmid, guest in guests.items():
        assert len(backups_in(store, vmid)) == 1            # pruned after the backup
        newest = os.path.join(store, 'vm', str(vmid), backups_in(store, vmid)[0], 'vd0.qcow2')
        ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / f'{vmid}.qcow2')), newest)
        assert ok, out


def test_a_job_from_jobs_cfg_runs_with_its_hooks_and_records_its_state(node, store, config_dir,
                                                                       tmp_path):
    guests, dump, state_dir = node
    record = tmp_path / 'phases.txt'
    hook = tmp_path / 'hook.sh'
    hook.write_text(f'#!/bin/sh\necho "$1 $3" >> {record}\n')
    hook.chmod(0o755)
    with open(os.path.join(config_dir, 'jobs.cfg'), 'w') as handle:
        handle.write(f"vzdump: nightly\n\tschedule mon..fri 23:00\n\tvmid 301\n"
                     f"\tdumpdir {store}\n\tscript {hook}\n\tprune-backups keep-last=3\n\n"
                     f"vzdump: elsewhere\n\tschedule daily\n\tall 1\n\tnode othernode\n"
                     f"\tdumpdir {store}\n")
    proc = dump('--job', 'nightly', '--node', 'node1')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    phases = [line.split()[0] for line in record.read_text().splitlines()]
    assert phases == ['job-init', 'job-start', 'backup-start', 'backup-end', 'log-end', 'job-end']
    state = json.loads((state_dir / 'nightly.json').read_text())
    assert state['result'] == 'ok' and state['guests']['301']['level'] == 'full'
    assert backups_in(store, 302) == []
    proc = dump('--job', 'elsewhere', '--node', 'node1')
    assert proc.returncode == 0 and 'does not run on node node1' in proc.stdout
    assert backups_in(store, 302) == []


def test_configuration_errors_are_one_line_and_exit_2(node, store):
    _guests, dump, _state = node
    proc = dump('--job', 'missing')
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1
    assert "no job 'missing'" in proc.stderr
    proc = dump('301', '--exclude', '301', '--dumpdir', store)
    assert proc.returncode == 2 and 'both selected and excluded' in proc.stderr
    proc = dump('--dumpdir', store)
    assert proc.returncode == 2 and 'no guests selected' in proc.stderr


def test_progress_shows_on_a_terminal_and_stays_out_of_pipes(node, store, config_dir):
    guests, dump, state_dir = node
    guests[301].write('vd0', 0x3c, 0, 8 * MiB)
    # Half of the disk per second: a few progress updates before the backup ends.
    argv = [sys.executable, COMMAND, '--config-dir', config_dir, '301', '--dumpdir', store,
            '--bwlimit', '4096']
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=terminal, env=dict(os.environ, GUESTVAULT_STATE_DIR=str(state_dir)))
    os.close(terminal)
    shown = b''
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:       # EIO: the command closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    percents = [int(p) for p in re.findall(rb'\r\s*(\d+)% of 8 MiB', shown)]
    assert len(set(percents)) >= 2 and percents[-1] == 100, shown
    assert percents == sorted(percents), shown
    piped = dump('301', '--dumpdir', store)
    assert piped.returncode == 0 and '%' not in piped.stderr, piped.stderr


# ----------------------------------------------------------------------------- the launcher

def engine_loaded_by(launcher, **env):
    """(where the launcher's lookup loads node_command from, stderr, exit status)."""
    environ = {k: v for k, v in os.environ.items() if k != 'GUESTVAULT_ENGINE'}
    environ.update(env)
    proc = subprocess.run([sys.executable, '-c', 'import runpy, sys; '
                           'print(runpy.run_path(sys.argv[1])["load_engine"]().__file__)', launcher],
                          cwd='/', env=environ, capture_output=True, text=True, check=False)
    return proc.stdout.strip(), proc.stderr, proc.returncode


def test_the_launcher_finds_the_checkout_an_archive_or_the_override(tmp_path):
    engine = os.path.realpath(os.path.join(ROOT, 'plugins', 'module_utils', '_engine'))
    assert engine_loaded_by(COMMAND)[0] == os.path.join(engine, 'run', 'node_command.py')
    archive = str(tmp_path / 'engine.pyz')
    subprocess.run([sys.executable, os.path.join(ROOT, 'roles', 'node', 'files', 'build_engine.py'),
                    engine, archive], check=True, capture_output=True)
    assert engine_loaded_by(COMMAND, GUESTVAULT_ENGINE=archive)[0] == os.path.join(
        archive, 'guestvault_engine', 'run', 'node_command.py')
    # Away from a checkout, as on a node: only the override or the installed archive.
    elsewhere = str(tmp_path / 'guestvault-dump')
    with open(COMMAND) as source, open(elsewhere, 'w') as copy:
        copy.write(source.read().replace('/usr/lib/guestvault/guestvault-engine.pyz', archive))
    assert engine_loaded_by(elsewhere)[0].startswith(archive + os.sep)
    assert engine_loaded_by(elsewhere, GUESTVAULT_ENGINE=engine)[0].startswith(engine + os.sep)
    where, stderr, status = engine_loaded_by(elsewhere, GUESTVAULT_ENGINE=str(tmp_path / 'nothing'))
    assert status == 2 and where == '' and 'GUESTVAULT_ENGINE=' in stderr and 'neither' in stderr
    os.unlink(archive)
    where, stderr, status = engine_loaded_by(elsewhere)
    assert status == 2 and 'engine is not installed' in stderr and archive in stderr


def test_the_node_command_backs_up_into_a_datastore_and_prunes_it(node, config_dir, tmp_path,
                                                                  datastore_path):
    guests, dump, _state = node
    datastore = pathlib.Path(datastore_path)
    with open(os.path.join(config_dir, 'storage.cfg'), 'a') as handle:
        handle.write(f"datastore: ds\n\tpath {datastore}\n")
    for round_number in range(2):
        for vmid, guest in guests.items():
            guest.write('vd0', 0x10 + round_number, round_number * MiB, MiB)
        proc = dump('--pool', 'web', '--storage', 'ds', '--prune-backups', 'keep-last=1')
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not os.listdir(tmp_path / 'fleecing')
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    for vmid, guest in guests.items():
        snapshots = [n for n in os.listdir(datastore / 'vm' / str(vmid)) if n[0].isdigit()]
        assert len(snapshots) == 1                           # pruned after the backup
        out = run_restore(RestoreRequest(vmid=vmid, storage='ds', config_dir=config_dir,
                                         target_dir=str(tmp_path / f'r{vmid}')))
        ok, text = same_content(guest.snapshot_disk(0, str(tmp_path / f'{vmid}.qcow2')),
                                out['disks'][0]['target'])
        assert ok, text
