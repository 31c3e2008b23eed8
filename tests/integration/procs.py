"""Child processes of tests, bounded in time: on a timeout every process the child started goes too.

``subprocess.run(..., timeout=)`` kills only the child. ``ansible`` and ``ansible-playbook`` start
their workers in a session of their own (FACTS.md, processes in tests), so the worker and its
module outlive a killed ``ansible`` (or its killed process group), and, holding the captured pipes
open, make ``subprocess.run``'s own clean-up wait for them forever.

``run_bounded`` runs a command like ``subprocess.run`` and on a timeout (or an interrupt) ends the
whole tree with ``kill_tree``: every descendant by its parent links in ``/proc/*/stat`` (a
``setsid`` does not hide a process from those), plus what is left in the child's own session.
Each found process is stopped first, so none can fork or exit while the tree is walked, then all
are killed, descendants first.

Only a process whose parent had already exited before the walk (an orphan, adopted by PID 1) that
also left the child's session escapes; nothing the tests start does that while it runs.
"""
import os
import signal
import subprocess
import time

__all__ = ['run_bounded', 'kill_tree', 'tree_of']


def _stat(pid):
    """(state, ppid, session) of a process from /proc/PID/stat; None when it is gone."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as handle:
            data = handle.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = data[data.rindex(b')') + 2:].split()
    return fields[0].decode(), int(fields[1]), int(fields[3])


def _processes():
    """{pid: (state, ppid, session)} of every process now."""
    found = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                found[int(name)] = stat
    return found


def _gone(pid):
    """Exited: no longer in /proc, or a zombie its (new) parent has not reaped yet."""
    stat = _stat(pid)
    return stat is None or stat[0] in ('Z', 'X')


def tree_of(pid, processes=None):
    """``pid``'s descendants by parent links, parents before children, plus every other process
    in ``pid``'s session when ``pid`` leads one (orphans that stayed in it)."""
    processes = _processes() if processes is None else processes
    children = {}
    for child, (_state, ppid, _session) in processes.items():
        children.setdefault(ppid, []).append(child)
    tree, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(0), ()):
            if child != pid and child not in tree:
                tree.append(child)
                queue.append(child)
    root = processes.get(pid)
    if root is not None and root[2] == pid:
        tree += [other for other, (_s, _p, session) in processes.items()
                 if session == pid and other != pid and other not in tree]
    return tree


def _signal(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:      # gone already
        pass


def kill_tree(pid, settle=10.0):
    """Stop ``pid`` and its whole tree (see ``tree_of``), then SIGKILL it, descendants first.

    Returns the pids killed, the root last. Waits up to ``settle`` seconds for them to be gone
    (the root's own zombie stays for its parent, normally the caller's Popen, to reap)."""
    _signal(pid, signal.SIGSTOP)
    stopped = [pid]
    deadline = time.monotonic() + settle
    while True:
        processes = _processes()
        new = [p for p in tree_of(pid, processes) if p not in stopped]
        for member in new:
            _signal(member, signal.SIGSTOP)
        stopped += new
        # A SIGSTOP lands asynchronously: walk again until every member has really stopped,
        # so a fork that was under way shows up as a new member.
        running = [p for p in stopped if p in processes and processes[p][0] not in 'TtZX']
        if not new and not running:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    tree = stopped[1:]
    for member in reversed(tree):
        _signal(member, signal.SIGKILL)
    _signal(pid, signal.SIGKILL)
    while time.monotonic() < deadline and not all(_gone(p) for p in tree):
        time.sleep(0.02)
    return [*reversed(tree), pid]


def run_bounded(argv, timeout, *, input=None, capture_output=False, check=False, **kwargs):
    """``subprocess.run(argv, timeout=timeout, ...)`` whose timeout ends the whole process tree.

    Returns a ``subprocess.CompletedProcess``; on a timeout raises ``subprocess.TimeoutExpired``
    carrying the output captured until then (after ``kill_tree``). The child starts in a session
    of its own unless ``start_new_session`` is given, so orphans it leaves in that session are
    found too; an interrupt (Ctrl-C, pytest's own timeout) also ends the tree."""
    if capture_output:
        kwargs['stdout'] = kwargs['stderr'] = subprocess.PIPE
    if input is not None:
        kwargs['stdin'] = subprocess.PIPE
    kwargs.setdefault('start_new_session', True)
    with subprocess.Popen(argv, **kwargs) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            stdout, stderr = _rest_of_output(proc)
            raise subprocess.TimeoutExpired(proc.args, timeout, stdout, stderr) from None
        except BaseException:
            kill_tree(proc.pid)
            raise
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result


def _rest_of_output(proc):
    """All output of a killed child. Its tree is gone, so the pipes end at once; should something
    outside the tree still hold them, stop reading after a few seconds."""
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired as exc:
        def text(data):
            if data is not None and proc.text_mode:
                return data.decode(errors='replace')
            return data
        return text(exc.output), text(exc.stderr)
