"""The node's record of the runs that touch a guest: who holds the guest, and what a capture in
flight has put into QEMU and onto the storage.

- **The lock** (``<run dir>/<vmid>.lock``): every verb that talks to the guest's QMP socket
  holds it before connecting, because QEMU serves one QMP client at a time. A second run waits
  (``lockwait``) and is told who it waits for: the holder writes one line into the lock file.
- **The journal** (``<run dir>/<vmid>.run``): written before a backup's point in time, removed
  when the backup is complete or has been undone. A journal left behind means the run was
  killed (SIGKILL, power loss); it lists the block jobs, target nodes, new bitmaps and hidden
  directory to clean up. The next run of the guest (or ``guestvault-dump --cleanup``, which the
  job's service runs as ``ExecStopPost``) cleans them up.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from ..paths import run_dir
from ..storage.directory import file_lock
from ..storage.files import write_file_atomic

_VERBS = {'backup': 'a backup', 'cleanup': 'a clean-up', 'inspect': 'guest_info',
          'bitmaps': 'guest_bitmaps', 'prune': 'a prune', 'protect': 'protect',
          'verify': 'a verify', 'restore': 'a restore', 'file_restore': 'a file restore'}


def holder(vmid, verb):
    """This run, in one line, for the runs that wait for a lock it holds (node or storage)."""
    since = datetime.now(timezone.utc)
    return (f"{_VERBS.get(verb, verb)} of guest {vmid} is running (pid {os.getpid()}, since "
            f"{since:%H:%M:%S} UTC)")


def hold(vmid, verb, wait_seconds, log=None):
    """Hold guest ``vmid`` on this node for ``verb`` (waiting up to ``wait_seconds``)."""
    return file_lock(os.path.join(run_dir(), f"{vmid}.lock"), wait_seconds,
                     f"guest {vmid} on this node", holder=holder(vmid, verb), on_wait=log)


def nbd_socket(vmid):
    """The unix socket a pull-mode backup of ``vmid`` has QEMU export its point in time on."""
    return os.path.join(run_dir(), f"{int(vmid)}.nbd")


def _journal_path(vmid):
    return os.path.join(run_dir(), f"{vmid}.run")


def record(vmid, **state):
    """Write the journal of the capture now in flight (call with the guest held)."""
    state.update(pid=os.getpid(), since=datetime.now(timezone.utc).isoformat())
    write_file_atomic(_journal_path(vmid), json.dumps(state, indent=2, sort_keys=True) + '\n')


def forget(vmid):
    """The capture is complete or undone: nothing is left to clean up."""
    try:
        os.unlink(_journal_path(vmid))
    except FileNotFoundError:
        pass


def leftover(vmid):
    """The journal a killed run left (a dict), or None. Call with the guest held, so the run
    that wrote it is known to be gone."""
    try:
        with open(_journal_path(vmid)) as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}  # half-written by a run killed while writing it: nothing usable in it
