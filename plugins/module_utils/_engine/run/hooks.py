"""vzdump-compatible hook scripts, so scripts written for Proxmox run unchanged.

The script is called as ``SCRIPT PHASE`` for job phases and ``SCRIPT PHASE MODE VMID`` for guest
phases, with the run's details in environment variables, as PVE::VZDump does:

========================  =================================================================
variable                  set in
========================  =================================================================
``STOREID``, ``DUMPDIR``  every phase (when the job writes to a storage / a directory)
``VMTYPE``, ``HOSTNAME``  guest phases (``qemu`` or ``lxc``; the node's name)
``TARGET``                ``backup-end``: the backup just written
``TARFILE``               a container's phases: the archive, as ``TARGET`` (vzdump keeps
                          this older name for container archives)
``LOGFILE``               ``log-end``: the backup's whole log, as text (a datastore's is
                          a copy: the store keeps it as a blob)
========================  =================================================================

Besides these and ``PATH``, a hook sees nothing of the environment guestvault runs in (an
Ansible run's ``ANSIBLE_*`` variables, a controller's secrets). The caller decides which of
these to pass in which phase, and which phases' failures abort the backup (vzdump ignores
failures in ``backup-abort`` and ``log-end``); this module only runs the script, streams its
output and reports failure.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from typing import Callable, List, Mapping, Optional, Tuple

from ..errors import ConfigError, HookFailed
from ..vocabulary import MODES

JOB_PHASES = ("job-init", "job-start", "job-end", "job-abort")
GUEST_PHASES = ("backup-start", "pre-stop", "pre-restart", "post-restart", "backup-end",
                "backup-abort", "log-end")
# Variables vzdump defines for hooks: with PATH, the whole environment a hook gets.
HOOK_ENV_VARS = ("STOREID", "DUMPDIR", "VMTYPE", "HOSTNAME", "TARGET", "TARFILE", "LOGFILE")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How many of the last output lines a HookFailed message quotes.
TAIL_LINES = 5


class HookScript:
    """A hook script checked up front, so a typo in ``script:`` fails before any guest is touched.

    Example::

        hook = HookScript("/usr/local/bin/backup-hook")
        hook.run("job-start", env={"STOREID": "local", "DUMPDIR": "/srv/backup"}, log=print)
        hook.run("backup-end", mode="snapshot", vmid=105,
                 env={"VMTYPE": "qemu", "HOSTNAME": "mail", "TARGET": "/srv/backup/vm/105/..."})
    """

    def __init__(self, path: str) -> None:
        if not os.path.isabs(path):
            raise ConfigError(f"hook script '{path}' is a relative path; give its absolute path")
        if not os.path.exists(path):
            raise ConfigError(f"hook script {path} does not exist; create it or fix the "
                              f"'script' option that names it")
        if not os.path.isfile(path):
            raise ConfigError(f"hook script {path} is not a regular file; point 'script' at "
                              f"the script itself")
        if not os.access(path, os.X_OK):
            raise ConfigError(f"hook script {path} is not executable; run 'chmod +x {path}'")
        self.path = path

    def __repr__(self) -> str:
        return f"HookScript({self.path!r})"

    def run(self, phase: str, *, mode: Optional[str] = None, vmid: Optional[int] = None,
            env: Optional[Mapping[str, object]] = None, log: Optional[Callable[[str], None]] = None,
            timeout: Optional[float] = None) -> List[str]:
        """Run the script for ``phase`` and return its output lines (stdout and stderr merged).

        Each line also goes to ``log`` as soon as it is printed. ``env`` entries whose value is
        ``None`` are left unset. Raises :class:`HookFailed` on a non-zero exit, on a signal, or
        when ``timeout`` seconds pass (the script and its children are then killed).
        """
        argv = [self.path, phase] + _phase_arguments(phase, mode, vmid)
        # A clean environment: the caller's (an Ansible run's ANSIBLE_* and whatever secrets
        # the controller had) is none of the hook's business.
        environment = {'PATH': os.environ.get('PATH') or DEFAULT_PATH}
        for key, value in (env or {}).items():
            if key not in HOOK_ENV_VARS:
                raise ValueError(f"{key} is not one of vzdump's hook variables {HOOK_ENV_VARS}")
            if value is not None:
                environment[key] = str(value)
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env=environment, start_new_session=True)
        except OSError as err:
            raise HookFailed(f"hook script {self.path} could not be started in phase {phase}: "
                             f"{err.strerror}; check its first line (#!interpreter)") from None
        try:
            output, finished = _collect(process, log, timeout)
        except BaseException:
            # Interrupted (or log raised): the hook must not outlive the run that started it.
            _kill(process)
            raise
        if not finished:
            raise HookFailed(f"hook script {self.path} did not finish phase {phase} within "
                             f"{timeout:g} seconds and was killed{_tail(output)}")
        code = process.wait()
        if code < 0:
            raise HookFailed(f"hook script {self.path} was killed by signal {-code} in phase "
                             f"{phase}{_tail(output)}")
        if code != 0:
            raise HookFailed(f"hook script {self.path} failed in phase {phase} with exit code "
                             f"{code}{_tail(output)}")
        return output


def _phase_arguments(phase: str, mode: Optional[str], vmid: Optional[int]) -> List[str]:
    if phase in JOB_PHASES:
        if mode is not None or vmid is not None:
            raise ValueError(f"job phase {phase} takes no mode or vmid")
        return []
    if phase in GUEST_PHASES:
        if mode not in MODES or vmid is None:
            raise ValueError(f"guest phase {phase} needs mode (one of {MODES}) and vmid, "
                             f"got mode={mode!r} vmid={vmid!r}")
        return [mode, str(int(vmid))]
    raise ValueError(f"unknown hook phase {phase!r}; phases: {JOB_PHASES + GUEST_PHASES}")


_EOF = object()


def _collect(process: "subprocess.Popen[bytes]", log: Optional[Callable[[str], None]],
             timeout: Optional[float]) -> Tuple[List[str], bool]:
    """Read output lines until the script closes its output; return them and whether it did.

    A thread reads the pipe so that the deadline holds even while the script is silent, and
    ``log`` is still called on the caller's thread. As with vzdump, a background child that
    keeps the output open keeps the hook running.
    """
    lines: "queue.Queue[object]" = queue.Queue()

    def reader() -> None:
        for raw in process.stdout:
            lines.put(raw.decode("utf-8", errors="replace").rstrip("\r\n"))
        lines.put(_EOF)

    thread = threading.Thread(target=reader, name=f"hook-output-{process.pid}", daemon=True)
    thread.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    output: List[str] = []
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            _kill(process)
            # A child that left the process group may still hold the pipe; do not wait for it.
            thread.join(timeout=1.0)
            _drain_queue(lines, output, log)
            if not thread.is_alive():
                process.stdout.close()
            return output, False
        try:
            item = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if item is _EOF:
            thread.join()
            process.stdout.close()
            return output, True
        output.append(item)  # type: ignore[arg-type]
        if log is not None:
            log(item)  # type: ignore[arg-type]


def _drain_queue(lines: "queue.Queue[object]", output: List[str],
                 log: Optional[Callable[[str], None]]) -> None:
    while True:
        try:
            item = lines.get_nowait()
        except queue.Empty:
            return
        if item is _EOF:
            continue
        output.append(item)  # type: ignore[arg-type]
        if log is not None:
            log(item)  # type: ignore[arg-type]


def _kill(process: "subprocess.Popen[bytes]") -> None:
    """Kill the script's whole process group: a hook's children must not outlive the backup."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(lines: List[str]) -> str:
    if not lines:
        return " (no output)"
    shown = lines[-TAIL_LINES:]
    return "; last output:\n" + "\n".join(f"  {line}" for line in shown)
