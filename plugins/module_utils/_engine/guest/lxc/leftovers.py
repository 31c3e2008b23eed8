"""What a killed container capture leaves: a frozen container, a container stop mode stopped
and did not start again, a temporary copy, a btrfs snapshot.

A mode writes its journal (``<run dir>/<vmid>.lxc.json``) before it changes anything and removes
it when everything is undone; its finally blocks undo on any exception (the run layer turns
SIGTERM into one). Only SIGKILL or a crash leaves the journal, and ``clear_leftovers`` (called
with the guest held on the node, so its writer is known to be gone) undoes what it names.
"""
from __future__ import annotations

import json
import os
import shutil

from ...paths import run_dir
from ...storage.files import write_file_atomic
from .container import STOPPED, Container
from .filesystems import delete_snapshot


def _path(vmid):
    return os.path.join(run_dir(), f"{int(vmid)}.lxc.json")


def record(vmid, **state):
    """The capture in flight: ``container``, ``lxcpath``, ``mode``, and what it may leave:
    ``temp_dir``, ``snapshots``, ``restart`` (stop mode stopped a running container)."""
    state['pid'] = os.getpid()
    write_file_atomic(_path(vmid), json.dumps(state, indent=2, sort_keys=True) + '\n')


def forget(vmid):
    try:
        os.unlink(_path(vmid))
    except FileNotFoundError:
        pass


def leftovers(vmid):
    """What a killed capture of ``vmid`` left (the journal, a dict), or None. Changes nothing."""
    try:
        with open(_path(vmid), encoding='utf-8') as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError:
        return {}      # cut short while being written, before anything was changed


def clear_leftovers(vmid, log, check_mode=False):
    """Undo what a killed capture of ``vmid`` left: thaw the container it froze, start the one
    stop mode stopped, remove its temporary copy and snapshots. Returns the journal (None when
    nothing was left)."""
    journal = leftovers(vmid)
    if journal is None or check_mode:
        return journal
    if journal.get('container'):
        container = Container(journal['container'], journal['lxcpath'])
        state = container.state()
        if journal.get('mode') in ('suspend', 'snapshot') and container.frozen(state):
            log(f"container {container.name} was left frozen by a killed backup; thawing it")
            container.thaw()
        elif state == STOPPED and journal.get('restart'):
            log(f"container {container.name} was stopped by a killed stop-mode backup; "
                "starting it again")
            container.start()
    for snapshot in journal.get('snapshots', []):
        if os.path.lexists(snapshot):
            log(f"deleting the snapshot {snapshot} a killed backup left")
            delete_snapshot(snapshot)
    temp_dir = journal.get('temp_dir')
    if temp_dir and os.path.lexists(temp_dir):
        log(f"removing the temporary copy {temp_dir} a killed backup left")
        shutil.rmtree(temp_dir)
    forget(vmid)
    return journal
