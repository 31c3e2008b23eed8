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

from ...errors import GuestNotFound
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


def find_leftovers(vmid):
    """What ``clear_leftovers`` would undo now, changing nothing: ``interrupted_run`` (the
    killed capture's journal: container, lxcpath, mode, pid; None when none was killed),
    ``frozen`` (its container is still frozen), ``stopped`` (stop mode stopped it and it is
    still stopped), ``temp_dir`` and ``snapshots`` (those that still exist)."""
    journal = leftovers(vmid)
    found = {'interrupted_run': None, 'frozen': False, 'stopped': False, 'temp_dir': None,
             'snapshots': []}
    if journal is None:
        return found
    found['interrupted_run'] = {key: journal.get(key)
                                for key in ('container', 'lxcpath', 'mode', 'pid')}
    state = container = None
    if journal.get('container'):
        container = Container(journal['container'], journal['lxcpath'])
        try:
            state = container.state()
        except GuestNotFound:
            container = None    # destroyed since: nothing to thaw or start, the files still go
    # frozen() also sees a freezer cgroup set by a run killed before lxc-freeze recorded it
    found['frozen'] = container is not None and container.frozen(state) \
        and journal.get('mode') in ('suspend', 'snapshot')
    found['stopped'] = state == STOPPED and bool(journal.get('restart'))
    temp_dir = journal.get('temp_dir')
    found['temp_dir'] = temp_dir if temp_dir and os.path.lexists(temp_dir) else None
    found['snapshots'] = [s for s in journal.get('snapshots', []) if os.path.lexists(s)]
    return found


def clear_leftovers(vmid, log, check_mode=False):
    """Undo what a killed capture of ``vmid`` left: thaw the container it froze, start the one
    stop mode stopped, remove its temporary copy and snapshots. Returns the journal (None when
    nothing was left)."""
    journal = leftovers(vmid)
    if journal is None or check_mode:
        return journal
    found = find_leftovers(vmid)
    run = found['interrupted_run']
    container = Container(run['container'], run['lxcpath']) if run['container'] else None
    if found['frozen']:
        log(f"container {container.name} was left frozen by a killed backup; thawing it")
        container.thaw()
    elif found['stopped']:
        log(f"container {container.name} was stopped by a killed stop-mode backup; "
            "starting it again")
        container.start()
    for snapshot in found['snapshots']:
        log(f"deleting the snapshot {snapshot} a killed backup left")
        delete_snapshot(snapshot)
    if found['temp_dir']:
        log(f"removing the temporary copy {found['temp_dir']} a killed backup left")
        shutil.rmtree(found['temp_dir'])
    forget(vmid)
    return journal
