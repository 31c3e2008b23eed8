"""procs.run_bounded: a timeout ends the whole process tree, a grandchild in its own session too."""
import os
import signal
import subprocess
import sys
import time

import pytest

from procs import _gone, run_bounded

# The child starts a grandchild in a session of its own (as ansible starts its worker), which
# starts a great-grandchild; all three hold the captured stdout and would sleep for ten minutes.
TREE = '''
import os, subprocess, sys, time
grandchild = subprocess.Popen(['sh', '-c', 'sleep 600 & echo $! > {pids}.sleep; wait'],
                              start_new_session=True)
with open({pids!r} + '.child', 'w') as handle:
    handle.write(f'{{grandchild.pid}} {{os.getsid(grandchild.pid)}} {{os.getsid(0)}}\\n')
print('tree started', flush=True)
time.sleep(600)
'''


def _numbers(path, count):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        numbers = [int(n) for n in path.read_text().split()] if path.exists() else []
        if len(numbers) == count:
            return numbers
        time.sleep(0.05)
    raise AssertionError(f'{path}: not {count} numbers')


def test_a_timed_out_tree_is_gone_including_a_grandchild_in_its_own_session(tmp_path):
    script = TREE.format(pids=str(tmp_path / 'pids'))
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as raised:
        run_bounded([sys.executable, '-c', script], timeout=2, capture_output=True, text=True)
    # Bounded: subprocess.run would wait here for the grandchild's hold on the pipe to end.
    assert time.monotonic() - started < 30
    assert 'tree started' in raised.value.output
    grandchild, its_session, child_session = _numbers(tmp_path / 'pids.child', 3)
    (great_grandchild,) = _numbers(tmp_path / 'pids.sleep', 1)
    try:
        assert its_session == grandchild != child_session   # it had a session of its own
        assert _gone(grandchild) and _gone(great_grandchild)
    finally:        # should the test fail, leave no sleeper behind
        for pid in (great_grandchild, grandchild):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_command_within_its_time_runs_as_with_subprocess_run(tmp_path):
    result = run_bounded(['sh', '-c', 'cat; echo err >&2; exit 3'], timeout=60, input='in',
                         capture_output=True, text=True, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (3, 'in', 'err\n')
    with pytest.raises(subprocess.CalledProcessError):
        run_bounded(['false'], timeout=60, check=True)
