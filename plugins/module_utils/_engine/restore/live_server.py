"""The process that serves a backup's block exports over NBD while a live restore copies them.

A live restore hands ``LiveServer`` to ``Format.open_block_exports`` as its server: a format
whose disks QEMU cannot open as files (a datastore snapshot) then has them served by this
process, which asks the format for the same exports again (``Format.open_block_exports`` with a
``ThreadServer`` that holds them); a format that needs no server (a qcow2 chain) never starts it.

``start_server`` spawns it and returns once it listens; it outlives the call (an Ansible module
returns long before the copy is done), so it is started in a session of its own, with the
engine's import path handed over. Its entry point is the run layer's (``entry``, run/live_server:
it opens the storage by its id, as only run/locate.py can, then calls ``main`` here). It imports
everything it will need (it reads one chunk of each disk, which also checks the key) before it
says it is ready: under Ansible the engine's
files are gone once the module has returned. It stops by itself when QEMU has let go of every
export (each stream done), or after ``IDLE_TIMEOUT`` if QEMU never came.

While it serves, it holds the snapshot as a reader (the guest's shared lock on the storage: a
prune waits for it, and is told which live restore it waits for) and as a writer for garbage
collection (``storage.writer()``, then every chunk it serves touched), so neither a prune nor a
GC can take the backup away from a guest that still reads it.

It is two processes: the server, and a supervisor that forked it and only waits. Whatever ends
the server (a crash, kill -9, the OOM killer), the supervisor then removes its socket and, if a
copy is not done, pauses the guest and writes ``live-restore-error.json`` (how much was copied,
what to do). A supervisor is used rather than QEMU's own error policies: ``rerror=stop`` belongs
to the guest's device, which the user's start command owns, pauses only on a guest read of what
is not copied yet, and can neither say why nor clean up.

When a read fails (a chunk missing or damaged), the server pauses the guest over QMP and writes
``live-restore-error.json`` in the target directory, saying what state the disks are in.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone

from ..errors import GuestvaultError
from ..guest import live
from ..paths import run_dir
from ..storage import catalog
from ..storage.files import write_file_atomic
from .nbd_server import ThreadServer

IDLE_TIMEOUT = 600.0
SUPERVISOR_ATTEMPTS = 1500          # 5 minutes of tries, 0.2 s apart
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
sys.exit(importlib.import_module(args['entry']).main(args))
"""


class LiveServer:
    """The server a live restore hands to ``Format.open_block_exports``: the exports are served
    by a process of their own that outlives this call. Leaving the context by an exception
    stops it (the live restore failed); else it runs on until QEMU has copied every disk.

    ``entry``: the module whose ``main(args)`` the process runs (the run layer's, which opens
    the storage and calls ``main`` here)."""

    def __init__(self, entry, config_dir, storage_id, record, disk_ids, socket_path, qmp_socket,
                 target_dir, log_path, vmid_started, lockwait_seconds):
        self.start = (entry, config_dir, storage_id, record, disk_ids, socket_path, qmp_socket,
                      target_dir, log_path, vmid_started, lockwait_seconds)
        self.socket_path = socket_path
        self.vmid_started = vmid_started
        self.pid = None       # the server's, once started

    @contextmanager
    def serve(self, make_exports):
        """``make_exports`` is left unused: the server's process makes the exports itself."""
        process, self.pid = start_server(*self.start)
        try:
            yield self.socket_path
        except BaseException:
            stop_server(process, self.socket_path, self.vmid_started)
            raise


def _engine_package():
    """(the engine's package name, its directory when that is not named like the package)."""
    package = __name__.rsplit('.', 2)[0]
    directory = importlib.import_module(package).__path__[0]
    aliased = os.path.basename(directory) != package.rsplit('.', 1)[-1]
    return package, directory if aliased else None


def state_path(vmid):
    """Where a running live restore of guest ``vmid`` is recorded (guest_info reads it)."""
    return os.path.join(run_dir(), f"live-{int(vmid)}.json")


def read_state(vmid):
    """The record of guest ``vmid``'s live restore (None when none was started since boot, or
    its copy is done), with ``running`` (its server lives) and ``error`` (what stopped it)."""
    try:
        with open(state_path(vmid)) as handle:
            state = json.load(handle)
    except (OSError, ValueError):
        return None
    state['running'] = _alive(state.get('server_pid'))
    try:
        with open(os.path.join(state['target_dir'], ERROR_FILE)) as handle:
            state['error'] = json.load(handle)
    except (OSError, ValueError, KeyError):
        state['error'] = None
    return state


def start_server(entry, config_dir, storage_id, record, disk_ids, socket_path, qmp_socket,
                 target_dir, log_path, vmid_started, lockwait_seconds):
    """Spawn the server for ``disk_ids`` of ``record``; (the supervisor's Popen, the server's
    pid) once it listens. The server waits up to ``lockwait_seconds`` for the snapshot's lock
    and, on S3, for a garbage collection to end."""
    package, package_dir = _engine_package()
    args = {'sys_path': [p for p in sys.path if p], 'package': package,
            'package_dir': package_dir, 'entry': entry, 'config_dir': config_dir,
            'storage': storage_id,
            'vmid': int(record.manifest.vmid), 'backup': record.manifest.time,
            'backup_id': record.id, 'disks': list(disk_ids), 'socket': socket_path,
            'qmp_socket': qmp_socket, 'target_dir': target_dir, 'vmid_started': vmid_started,
            'lockwait': lockwait_seconds, 'state': state_path(vmid_started)}
    with open(log_path, 'ab') as log:
        proc = subprocess.Popen([sys.executable, '-c', _BOOT, json.dumps(args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                                start_new_session=True)
    line = proc.stdout.readline().decode('utf-8', 'replace').strip()
    proc.stdout.close()
    word, _space, pid = line.partition(' ')
    if word != READY or not pid.isdigit() or not os.path.exists(socket_path):
        stop_server(proc, socket_path, vmid_started)
        with open(log_path, 'rb') as handle:
            tail = handle.read()[-2000:].decode('utf-8', 'replace').strip()
        raise live.LiveRestoreError(f"the NBD server over {record.id} did not start: "
                                    f"{line or tail or 'no output'} (log {log_path})")
    return proc, int(pid)


def stop_server(proc, socket_path, vmid_started):
    """End the supervisor and the server (one process group), remove the socket and the
    record: a live restore that failed before its guest ran."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    _remove(socket_path)
    _remove(state_path(vmid_started))


def main(args, open_storage):
    """Fork the server; this process stays as its supervisor. ``open_storage()``: (the
    storage ``args`` names, its Format), called in the server."""
    child = os.fork()
    if child == 0:
        code = 1
        try:
            code = _serve(args, open_storage)
        except BaseException:        # pylint: disable=broad-except
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)           # never the parent's clean-up, in the child
    # Only the server says ready: if it dies first, start_server reads the end of the pipe.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    return _supervise(args, child)


def _serve(args, open_storage):
    """The server: hold the backup (as a reader and as a writer), warm up, say ready, serve."""
    since = datetime.now(timezone.utc)
    holder = (f"a live restore of {args['backup_id']} to guest {args['vmid_started']} is "
              f"running (pid {os.getpid()}, since {since:%Y-%m-%d %H:%M:%S} UTC)")
    try:
        storage, fmt = open_storage()
        with ExitStack() as held:
            held.enter_context(storage.guest_lock(args['vmid'], args['lockwait'], shared=True,
                                                  holder=holder))
            held.enter_context(storage.writer(args['lockwait']))
            record = catalog.resolve(storage, args['vmid'], args['backup'], None)
            # holds: every chunk served touched (after storage.writer()), one read of each
            # disk (imports the decoders, checks the key and a chunk) before it listens
            server = ThreadServer(args['socket'], on_error=_on_read_error(args),
                                  idle_timeout=IDLE_TIMEOUT, until_clients_gone=True, hold=True)
            held.enter_context(fmt.open_block_exports(storage, record, args['disks'], server))
            write_file_atomic(args['state'], json.dumps({
                'vmid': args['vmid_started'], 'backup': args['backup_id'],
                'storage': args['storage'], 'target_dir': args['target_dir'],
                'socket': args['socket'], 'server_pid': os.getpid(),
                'supervisor_pid': os.getppid(), 'since': since.isoformat()}) + '\n')
            _say(f"{READY} {os.getpid()}")
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            server.wait()
    except GuestvaultError as exc:
        _say(str(exc))
        return 1
    return 0


def _on_read_error(args):
    def failed(exc, export, offset):
        _write_error(args, {
            'error': str(exc), 'export': export.name, 'offset': offset,
            'disks': ("each restored image holds what was copied before the error and still "
                      "reads the rest from the backup, which can no longer be read; the guest "
                      "was paused: stop it, and restore again (not live) once the backup is "
                      "repaired or from another backup")})
        try:
            live.pause_guest(args['qmp_socket'])
        except GuestvaultError:
            pass
    return failed


def _supervise(args, child):
    """Wait for the server to end; then remove its socket and, if a copy is not done, pause
    the guest and say why."""
    _pid, status = os.waitpid(child, 0)
    _remove(args['socket'])            # a server killed by a signal leaves it behind
    # A guest whose socket is there may be busy with another client for a while (guest_info,
    # a backup): keep trying for minutes. A guest that quit has removed its socket.
    attempts = SUPERVISOR_ATTEMPTS if os.path.exists(args['qmp_socket']) else 1
    try:
        copying = live.pause_unfinished(args['qmp_socket'], args['vmid_started'], attempts)
    except GuestvaultError:
        copying = []                   # the guest is gone: nothing reads the server any more
    if not copying:
        _remove(args['state'])         # the copies are done (or the guest was stopped)
        return 0
    _write_error(args, {
        'error': (f"the NBD server over {args['backup_id']} (pid {child}) {_ending(status)} "
                  "before every disk was copied; the guest was paused"),
        'server_pid': child, 'backup': args['backup_id'],
        'copied': [{k: c[k] for k in ('disk', 'done_bytes', 'total_bytes', 'percent')}
                   for c in copying],
        'disks': ("each restored image holds what was copied (see copied) and reads the rest "
                  "from the backup through the server, which is gone"),
        'what_to_do': ("stop the guest (quit) and restore again (restore, live or not, into "
                       "other images: the backup is untouched); the guest cannot go on "
                       "without a server on its images' socket " + args['socket'])})
    return 0


def _write_error(args, state):
    """``live-restore-error.json`` in the target directory; an error already there (the first
    one, e.g. a damaged chunk) is kept in it as ``first_error``."""
    path = os.path.join(args['target_dir'], ERROR_FILE)
    try:
        with open(path) as handle:
            state['first_error'] = json.load(handle)
    except (OSError, ValueError):
        pass
    write_file_atomic(path, json.dumps(state, indent=2, sort_keys=True) + '\n')


def _ending(status):
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = str(number)
        return f"was killed by signal {number} ({name})"
    return f"exited with status {os.WEXITSTATUS(status)}"


def _alive(pid):
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass
    return True


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _say(line):
    """One line to the parent (start_server reads the first)."""
    sys.stdout.write(line + '\n')
    sys.stdout.flush()
