"""``repeat-missed`` as a real systemd timer does it, for the units guestvault renders.

``apply_job`` writes a job's timer and service as the backup_job module does (only the node command is a stand-in that
records its runs); a real systemd 252 runs them as PID 1 of private namespaces (``systemd_pid1``), so no systemd on the
host is needed. The node "was down" for ``DOWN_FOR`` seconds of a once-a-minute schedule: the stamp file of each timer
that had run before says so. When systemd is back:

- ``repeat-missed`` (``Persistent=true``): the missed runs happen as ONE run, at once, and the next run is the next
  scheduled one (nothing else is queued);
- without it (``Persistent=false``): the missed runs are skipped, the next run is the next scheduled one;
- a job that never ran (no stamp yet) does not run at once even with ``repeat-missed``.

One boot serves all three jobs; it starts well before a minute boundary and every check is done before that boundary,
so no scheduled run can mix in. About 5 s (up to 15 s more waiting for a minute's early part).
"""
import os
import time

import pytest

from guestvault_engine.run.backup_job import apply_job, unit_names
from systemd_pid1 import SystemdPid1, epoch, probe

DOWN_FOR = 5 * 60           # the node was down for five scheduled (once-a-minute) runs
LATEST_START_SECOND = 45    # boot no later in the minute, so the checks end before the next scheduled run
CATCH_UP_TIMEOUT = 10       # seconds for the catch-up run to appear (it takes well under one here)
SETTLE = 3                  # seconds after it in which no second run may appear
JOBS = {                    # job id: (repeat-missed, ran before the node went down)
    'caughtup': (True, True),
    'skipped': (False, True),
    'fresh': (True, False),
}
FAKE_DUMP = '''#!/bin/sh
# Stands in for the node command: records that systemd ran the job, when and with which arguments.
echo "$(date +%s) $*" >> {runs}
'''


@pytest.fixture(scope='module')
def systemd_works(tmp_path_factory):
    reason = probe(tmp_path_factory.mktemp('probe'), timeout=10)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope='module')
def node_back(systemd_works, tmp_path_factory):
    """What the node's systemd did in the first seconds after it came back: runs and unit properties of each job."""
    root = tmp_path_factory.mktemp('node')
    runs = root / 'runs.log'
    command = _fake_dump(root, runs)
    node = SystemdPid1(root)
    try:
        down_since = time.time() - DOWN_FOR
        for job_id, (repeat_missed, ran_before) in JOBS.items():
            _install_job(node, root, command, job_id, repeat_missed)
            if ran_before:
                node.plant_stamp(unit_names(job_id)[0], down_since)
        _wait_for_early_in_a_minute()
        booted_at = time.time()
        node.start(timeout=10)
        _wait_for_run(runs, 'caughtup', CATCH_UP_TIMEOUT)
        time.sleep(SETTLE)
        observed = _observe(node, runs, booted_at)
        if time.time() >= observed['next_boundary']:
            pytest.fail(f"checks ended after the minute boundary {observed['next_boundary']}: scheduled runs may have "
                        f"mixed in; the machine is too slow for this test\nlog:\n{node.log_tail()}")
        yield observed
    finally:
        node.stop()


def test_missed_runs_of_a_repeat_missed_job_happen_once_as_soon_as_the_node_is_back(node_back):
    job = node_back['jobs']['caughtup']
    assert job['timer']['Persistent'] == 'yes'
    assert len(job['runs']) == 1, f"{DOWN_FOR // 60} missed runs must collapse into one run: {job['runs']}"
    started, args = job['runs'][0]
    assert started - node_back['booted_at'] < 5, 'the catch-up run is at once, not at the next scheduled time'
    assert args == f"--job caughtup --config-dir {node_back['config_dir']}"
    # ExecStopPost ran the clean-up once the run had ended (what clears a killed run's leftovers).
    assert [a for _t, a in job['cleanups']] == [
        f"--job caughtup --cleanup --config-dir {node_back['config_dir']}"]
    assert job['service']['Result'] == 'success' and job['service']['ExecMainStatus'] == '0'
    # Nothing else is queued: the next run is the next scheduled one, and the stamp moved on, so the next boot (or
    # restart) does not repeat this run.
    assert _epoch(job['timer']['NextElapseUSecRealtime']) == node_back['next_boundary']
    assert _epoch(job['timer']['LastTriggerUSec']) >= node_back['booted_at'] - 1
    assert job['stamp_mtime'] >= node_back['booted_at'] - 1


def test_missed_runs_of_a_job_without_repeat_missed_are_skipped(node_back):
    job = node_back['jobs']['skipped']
    assert job['timer']['Persistent'] == 'no'
    assert job['runs'] == []
    # Armed, not broken: it waits for the next scheduled run.
    assert (job['timer']['ActiveState'], job['timer']['SubState']) == ('active', 'waiting')
    assert _epoch(job['timer']['NextElapseUSecRealtime']) == node_back['next_boundary']


def test_a_repeat_missed_job_that_never_ran_does_not_run_at_once(node_back):
    job = node_back['jobs']['fresh']
    assert job['timer']['Persistent'] == 'yes'
    assert job['runs'] == []
    assert (job['timer']['ActiveState'], job['timer']['SubState']) == ('active', 'waiting')
    assert _epoch(job['timer']['NextElapseUSecRealtime']) == node_back['next_boundary']
    # systemd made the stamp (now): from here on, missed runs of this job are repeated.
    assert job['stamp_mtime'] >= node_back['booted_at'] - 1


# ----------------------------------------------------------------------------- helpers

def _fake_dump(root, runs):
    path = root / 'bin' / 'guestvault-dump'
    path.parent.mkdir()
    path.write_text(FAKE_DUMP.format(runs=runs), encoding='utf-8')
    path.chmod(0o755)
    return str(path)


def _install_job(node, root, command, job_id, repeat_missed):
    """The job's units exactly as the backup_job module writes them (in the node's unit directory), enabled."""
    config_dir = root / 'etc'
    config_dir.mkdir(exist_ok=True)
    options = {'schedule': 'minutely', 'vmid': [9001], 'repeat-missed': repeat_missed}
    result = apply_job(job_id, options, config_dir=str(config_dir), unit_dir=str(node.unit_dir), command=command,
                       manage_systemd=False)
    assert result['changed'] and len(result['units']) == 2, result
    node.enable(unit_names(job_id)[0])


def _wait_for_early_in_a_minute():
    """Once a minute the timers fire anyway; booting early in a minute keeps those runs out of the checks."""
    second = time.time() % 60
    if second > LATEST_START_SECOND:
        time.sleep(60 - second + 1)


def _read_runs(runs):
    """[(epoch, args)] per job id."""
    per_job = {job_id: [] for job_id in JOBS}
    if runs.exists():
        for line in runs.read_text(encoding='utf-8').splitlines():
            started, args = line.split(' ', 1)
            per_job[args.split()[1]].append((int(started), args))
    return per_job


def _wait_for_run(runs, job_id, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not _read_runs(runs)[job_id]:
        time.sleep(0.1)


def _observe(node, runs, booted_at):
    per_job = _read_runs(runs)
    jobs = {}
    for job_id in JOBS:
        timer, service = unit_names(job_id)
        stamp = node.stamp_path(timer)
        jobs[job_id] = {
            # ExecStopPost's clean-up after each run is recorded too; it is not a backup run.
            'runs': [run for run in per_job[job_id] if '--cleanup' not in run[1].split()],
            'cleanups': [run for run in per_job[job_id] if '--cleanup' in run[1].split()],
            'timer': node.show(timer, 'Persistent', 'ActiveState', 'SubState', 'LastTriggerUSec', 'NextElapseUSecRealtime'),
            'service': node.show(service, 'ActiveState', 'Result', 'ExecMainStatus'),
            'stamp_mtime': os.stat(stamp).st_mtime if stamp.exists() else None,
        }
    return {'jobs': jobs, 'booted_at': booted_at, 'next_boundary': (int(booted_at) // 60 + 1) * 60,
            'config_dir': str(node.workdir / 'etc')}


def _epoch(timestamp):
    """Epoch seconds of a timestamp property; ``n/a`` (never) fails the test."""
    value = epoch(timestamp)
    assert value is not None, f"not a timestamp: {timestamp!r}"
    return value
