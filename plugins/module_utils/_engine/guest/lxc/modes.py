"""vzdump's three container modes, as pve-container's ``src/PVE/VZDump/LXC.pm`` and
pve-manager's ``PVE/VZDump.pm`` do them. ``tree_capture`` is a context manager that yields the
container's file tree at one point in time (a ``TreeCapture``) and a ``TreeReport``; the caller
archives the tree inside the with-block, and leaving it undoes what the mode did:

- **stop**: ``lxc-stop`` cleanly within stopwait; the tree is the rootfs itself (and the
  included volumes); on leaving, the container is started again (downtime reported).
- **suspend**: rsync the rootfs and the volumes into a temporary directory, freeze, rsync what
  changed, thaw; the tree is the copy, removed on leaving (frozen time reported).
- **snapshot**: freeze, syncfs, a read-only btrfs snapshot of each subvolume, thaw; the tree is
  the snapshot, deleted on leaving. Where a tree is not a btrfs subvolume, vzdump's
  "mode failure - ..." and "trying 'suspend' mode instead".

A container that is not running is backed up as it is, in stop mode, without being started.
Only ``lxc.rootfs.path`` and the included volumes are read, never the container's mount view
(``/proc/<pid>/root``): the ``lxc.mount.entry`` bind mounts (the busybox template mounts the
host's /lib and /usr/lib) exist only in the container's mount namespace, and rsync and tar run
with ``--one-file-system``. A frozen container is thawed in a finally block, so also when the
archiving fails or the run is killed with SIGTERM (which the run layer turns into an
exception); what SIGKILL leaves, ``leftovers.clear_leftovers`` undoes.

Hook phases are vzdump's: ``pre-stop`` before the container is stopped or frozen,
``pre-restart`` before it is started or after the snapshot, ``post-restart`` when it runs again.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

from ...errors import BackupFailed, ConfigError, StorageError
from ...format.capture import TreeCapture
from ...paths import work_dir
from ...storage.files import sync_filesystem
from ...vocabulary import MODES
from .config import LxcConfig
from .container import FROZEN, RUNNING, Container
from .filesystems import (POSIX_FILESYSTEMS, create_snapshot, delete_snapshot, fs_type,
                          not_snapshottable, snapshot_path)
from .leftovers import forget, record

# PVE's rsync of a running container (LXC.pm's rsync_vm), without --relative: each tree is
# copied into a directory of its own.
RSYNC = ('rsync', '--stats', '-h', '-X', '-A', '--numeric-ids', '-aH', '--delete',
         '--no-whole-file', '--sparse', '--one-file-system')
RSYNC_VANISHED = 24       # "some files vanished before they could be transferred"
READABLE_BACKENDS = ('dir', 'btrfs')


@dataclass
class TreeReport:
    """What a mode did, for the result and the log."""

    mode: str                                  # the mode actually used
    downtime_seconds: Optional[float] = None   # stop: from the stop request to running again
    frozen_seconds: Optional[float] = None     # suspend, snapshot: from freeze to thawed
    warnings: List[str] = field(default_factory=list)


def temp_dir_for(vmid: int, tmpdir: Optional[str] = None, dumpdir: Optional[str] = None,
                 basename: Optional[str] = None) -> str:
    """The temporary directory of a suspend-mode copy, as vzdump picks it: in the ``tmpdir``
    option, else ``<dumpdir>/<archive basename>.tmp`` when the dump directory is on a file system
    that keeps every attribute, else the work directory (/var/tmp)."""
    if tmpdir:
        return os.path.join(tmpdir, f"vzdumptmp{os.getpid()}_{vmid}")
    if dumpdir and basename and fs_type(dumpdir) in POSIX_FILESYSTEMS:
        return os.path.join(dumpdir, f"{basename}.tmp")
    return os.path.join(work_dir(), f"vzdumptmp{os.getpid()}_{vmid}")


@contextmanager
def tree_capture(container: Container, config: LxcConfig, volumes: Sequence[Tuple[str, str]],
                 mode: str, *, vmid: int, temp_dir: str, stopwait: float,
                 hook: Optional[Callable[[str], None]] = None,
                 log: Optional[Callable[[str], None]] = None, bwlimit: int = 0):
    """Yield ``(TreeCapture, TreeReport)`` of ``container`` in ``mode``. ``volumes`` are the
    included volumes as (path in the container, host path); ``temp_dir`` is the directory
    suspend mode makes for its copy (``temp_dir_for``); ``stopwait`` is in seconds; ``bwlimit``
    in KiB/s for the copies."""
    hook = hook or (lambda phase: None)
    log = log or (lambda line: None)
    if mode not in MODES:
        raise ConfigError(f"mode '{mode}' is not one of {', '.join(MODES)}")
    check_trees(container, config, volumes)
    state = container.state()
    if state == FROZEN:
        raise BackupFailed(
            f"container {container.name} is frozen, so no consistent backup can be taken; if "
            f"a killed backup left it so, run the guest's cleanup, else thaw it with "
            f"'lxc-unfreeze -P {container.lxcpath} -n {container.name}'")
    if state != RUNNING:
        report = TreeReport('stop')
        if mode != 'stop':
            report.warnings.append(f"container {container.name} is {state}, not running: "
                                   f"backed up in stop mode instead of {mode}, as vzdump does")
            log(report.warnings[-1])
        yield _capture(config.rootfs, volumes, config), report
        return
    warnings = []
    if mode == 'snapshot':
        reason = snapshot_problem(config, volumes)
        if reason:
            warnings.append(f"mode failure - {reason}; trying 'suspend' mode instead")
            log(f"mode failure - {reason}")
            log("trying 'suspend' mode instead")
            mode = 'suspend'
    if mode == 'stop':
        context = _stop(container, config, volumes, vmid, stopwait, hook, log)
    elif mode == 'suspend':
        context = _suspend(container, config, volumes, vmid, temp_dir, hook, log, bwlimit)
    else:
        context = _snapshot(container, config, volumes, vmid, hook, log)
    with context as (capture, report):
        report.warnings[:0] = warnings
        yield capture, report


def snapshot_problem(config: LxcConfig, volumes: Sequence[Tuple[str, str]]) -> str:
    """Why snapshot mode cannot snapshot the rootfs and the included volumes, and falls back
    to suspend mode (empty when it can)."""
    return '; '.join(filter(None, (not_snapshottable(path)
                                   for path in [config.rootfs] + _hosts(volumes))))


def check_trees(container, config, volumes):
    """ConfigError when a tree to back up cannot be read: a rootfs on a backend guestvault does
    not read, or a rootfs or volume that is not a directory."""
    if config.rootfs_backend not in READABLE_BACKENDS:
        raise ConfigError(
            f"the rootfs of container {container.name} is a {config.rootfs_backend} volume "
            f"({config.rootfs}), which guestvault cannot back up: it reads directory and btrfs "
            "root file systems (lxc.rootfs.path dir:... or btrfs:...); LVM-thin and ZFS volumes "
            "and their snapshots need device-mapper or the ZFS module, which it does not use")
    trees = [('rootfs', config.rootfs)] + [(f"volume {mp}", host) for mp, host in volumes]
    for what, path in trees:
        if not os.path.isdir(path):
            raise ConfigError(f"the {what} of container {container.name} is {path}, which is "
                              "not a directory; fix lxc.rootfs.path or the registry's mpN line")


def _hosts(volumes):
    return [host for mp, host in volumes]


def _capture(root, volumes, config, copies=None):
    """The tree of ``root`` and the volumes (read at ``copies`` when they were copied)."""
    hosts = _hosts(volumes) if copies is None else copies
    return TreeCapture(root=root, volumes=[(volume[0], host) for volume, host
                                           in zip(volumes, hosts)],
                       id_map=list(config.idmap))


def _journal(container, vmid, mode, **state):
    record(vmid, container=container.name, lxcpath=container.lxcpath, mode=mode, **state)


@contextmanager
def _stop(container, config, volumes, vmid, stopwait, hook, log):
    report = TreeReport('stop')
    _journal(container, vmid, 'stop', restart=True)
    started = time.monotonic()
    try:
        hook('pre-stop')
        log(f"stopping container {container.name} (waiting up to {stopwait:g} s)")
        container.stop(stopwait)
    except BaseException:
        if container.state() != RUNNING:
            container.start()          # stopped after all (a late signal): bring it back
        forget(vmid)
        raise
    try:
        yield _capture(config.rootfs, volumes, config), report
    finally:
        try:
            hook('pre-restart')
        finally:
            log(f"starting container {container.name} again")
            container.start()
            report.downtime_seconds = round(time.monotonic() - started, 3)
            log(f"container was down for {report.downtime_seconds:.3f} s")
            forget(vmid)
        hook('post-restart')


@contextmanager
def _suspend(container, config, volumes, vmid, temp_dir, hook, log, bwlimit):
    report = TreeReport('suspend')
    copies = [os.path.join(temp_dir, 'rootfs')] + [os.path.join(temp_dir, f"volume{number}")
                                                   for number in range(len(volumes))]
    trees = list(zip([config.rootfs] + _hosts(volumes), copies))
    _journal(container, vmid, 'suspend', temp_dir=temp_dir)
    made = False
    try:
        try:
            os.mkdir(temp_dir, 0o700)
            made = True
        except FileExistsError:
            raise StorageError(f"the temporary directory {temp_dir} exists already (left by "
                               "an earlier run?); remove it, or run the guest's cleanup") from None
        except OSError as err:
            raise StorageError(f"cannot make the temporary directory {temp_dir}: "
                               f"{err.strerror}; set tmpdir to a writable local directory") from None
        for source, copy in trees:
            _rsync(source, copy, 'first', bwlimit, log, live=True)
        hook('pre-stop')
        log(f"freezing container {container.name}")
        with _frozen(container, report, log):
            for source, copy in trees:
                _rsync(source, copy, 'final', bwlimit, log, live=False)
        hook('pre-restart')
        hook('post-restart')
        yield _capture(copies[0], volumes, config, copies[1:]), report
    finally:
        if made:
            shutil.rmtree(temp_dir)
        forget(vmid)


@contextmanager
def _frozen(container, report, log):
    """The container frozen for the with-block, thawed whatever happens in it; the time it was
    frozen goes into ``report``."""
    frozen = time.monotonic()
    try:
        container.freeze()
        yield
    finally:
        container.thaw()
        report.frozen_seconds = round(time.monotonic() - frozen, 3)
        log(f"container was frozen for {report.frozen_seconds:.3f} s")


@contextmanager
def _snapshot(container, config, volumes, vmid, hook, log):
    report = TreeReport('snapshot')
    sources = [config.rootfs] + _hosts(volumes)
    targets = [snapshot_path(source, vmid) for source in sources]
    for target in targets:
        if os.path.lexists(target):
            log(f"found old vzdump snapshot {target} (force removal)")
            delete_snapshot(target)
    _journal(container, vmid, 'snapshot', snapshots=targets)
    made = []
    try:
        hook('pre-stop')
        log(f"freezing container {container.name} for its snapshot")
        with _frozen(container, report, log):
            for source, target in zip(sources, targets):
                # the container's writes that are still in the page cache reach the disk, so
                # the snapshot holds every write made before the freeze
                sync_filesystem(source)
                create_snapshot(source, target)
                made.append(target)
        hook('pre-restart')
        hook('post-restart')
        yield _capture(targets[0], volumes, config, targets[1:]), report
    finally:
        for target in made:
            delete_snapshot(target)
        forget(vmid)


def _rsync(source, copy, text, bwlimit, log, live):
    argv = list(RSYNC) + ([f"--bwlimit={int(bwlimit)}"] if bwlimit else [])
    argv += [source.rstrip('/') + '/', copy + '/']
    log(f"starting {text} sync {source} to {copy}")
    started = time.monotonic()
    # No timeout: the copy takes as long as the data does. An exception (SIGTERM) in the wait
    # kills rsync (subprocess.run does).
    proc = subprocess.run(argv, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if proc.returncode == RSYNC_VANISHED and live:
        # files deleted by the running container during the first pass; the final pass,
        # frozen, copies the tree as it is
        log(f"{text} sync: some files vanished while they were copied (the final sync "
            "catches up)")
    elif proc.returncode != 0:
        if 'No space left on device' in proc.stderr:
            raise StorageError(
                f"the temporary directory {os.path.dirname(copy)} is full (rsync: No space "
                "left on device); suspend mode copies the whole container there, so set tmpdir "
                "to a directory with room for it, or use snapshot or stop mode")
        raise BackupFailed(f"the {text} sync of {source} failed (rsync exit "
                           f"{proc.returncode}): {proc.stderr.strip()[-500:]}")
    match = re.search(r'^Total transferred file size: (.+)$', proc.stdout, re.MULTILINE)
    log(f"{text} sync finished - transferred {match.group(1) if match else '?'} in "
        f"{time.monotonic() - started:.1f}s")
