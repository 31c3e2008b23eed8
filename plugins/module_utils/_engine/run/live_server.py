"""The process that serves a datastore snapshot over NBD while a live restore copies it.

``start_server`` spawns it and returns once it listens; it outlives the call (an Ansible module
returns long before the copy is done), so it is started in a session of its own, with the
engine's import path handed over, and it imports everything it will need (it reads one chunk of
each disk, which also checks the key) before it says it is ready: under Ansible the engine's
files are gone once the module has returned. It stops by itself when QEMU has let go of every
export (each stream done), or after ``IDLE_TIMEOUT`` if QEMU never came.

When a read fails (a chunk missing or damaged), it pauses the guest over QMP and writes
``live-restore-error.json`` in the target directory, saying what state the disks are in.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

from ..errors import GuestvaultError
from ..format.datastore.nbd_server import NbdServer
from ..guest import live
from ..storage import catalog
from .locate import format_of, require_storage

IDLE_TIMEOUT = 600.0
READY = 'ready'
ERROR_FILE = 'live-restore-error.json'

_BOOT = """
import importlib, importlib.util, json, os, sys
args = json.loads(sys.argv[1])
sys.path[:0] = args['sys_path']
if args.get('package_dir'):
    spec = importlib.util.spec_from_file_location(
        args['package'], os.path.join(args['package_dir'], '__init__.py'),
        submodule_search_locations=[args['package_dir']])
    module = importlib.util.module_from_spec(spec)
    sys.modules[args['package']] = module
    spec.loader.exec_module(module)
sys.exit(importlib.import_module(args['package'] + '.run.live_server').main(args))
"""


def _engine_package():
    """(the engine's package name, its directory when that is not named like the package)."""
    package = __name__.rsplit('.', 2)[0]
    directory = importlib.import_module(package).__path__[0]
    aliased = os.path.basename(directory) != package.rsplit('.', 1)[-1]
    return package, directory if aliased else None


def start_server(config_dir, storage_id, record, disk_ids, socket_path, qmp_socket, target_dir,
                 log_path, timeout=300):
    """Spawn the server for ``disk_ids`` of ``record``; the Popen once it listens."""
    package, package_dir = _engine_package()
    args = {'sys_path': [p for p in sys.path if p], 'package': package,
            'package_dir': package_dir, 'config_dir': config_dir, 'storage': storage_id,
            'vmid': int(record.index['vmid']), 'backup': record.index['time'],
            'disks': list(disk_ids), 'socket': socket_path, 'qmp_socket': qmp_socket,
            'target_dir': target_dir}
    with open(log_path, 'ab') as log:
        proc = subprocess.Popen([sys.executable, '-c', _BOOT, json.dumps(args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + timeout
    line = proc.stdout.readline().decode('utf-8', 'replace').strip()
    proc.stdout.close()
    if line != READY or not os.path.exists(socket_path):
        proc.kill()
        proc.wait()
        with open(log_path, 'rb') as handle:
            tail = handle.read()[-2000:].decode('utf-8', 'replace').strip()
        raise live.LiveRestoreError(f"the NBD server over {record.id} did not start: "
                                    f"{line or tail or 'no output'} (log {log_path})")
    if time.monotonic() > deadline:
        proc.kill()
        raise live.LiveRestoreError(f"the NBD server over {record.id} took over {timeout} s")
    return proc


def main(args):
    """The server process: open the snapshot, warm up, say ready, serve."""
    try:
        storage = require_storage(args['config_dir'], args['storage'])
        record = catalog.resolve(storage, args['vmid'], args['backup'], None)
        exports = format_of(storage).snapshot_exports(storage, record, set(args['disks']))
        for export in exports.values():
            offset = export.first_data_offset()
            if offset is not None:
                export.read(offset, 1)   # imports the decoders, checks the key and a chunk
    except GuestvaultError as exc:
        _say(str(exc))
        return 1

    def failed(exc, export, offset):
        state = {'error': str(exc), 'export': export.name, 'offset': offset,
                 'disks': ("each restored image holds what was copied before the error and "
                           "still reads the rest from the backup, which can no longer be read; "
                           "the guest was paused: stop it, and restore again (not live) once "
                           "the backup is repaired or from another backup")}
        path = os.path.join(args['target_dir'], ERROR_FILE)
        with open(path, 'w') as handle:
            json.dump(state, handle, indent=2)
        try:
            live.pause_guest(args['qmp_socket'])
        except GuestvaultError:
            pass
    server = NbdServer(args['socket'], exports, on_error=failed,
                       idle_timeout=IDLE_TIMEOUT).listen()
    _say(READY)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    server.serve_forever()
    return 0


def _say(line):
    """One line to the parent (start_server reads the first)."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()
