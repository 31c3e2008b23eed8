"""A directory storage laid out like a Proxmox Backup Server datastore (see DESIGN.md).

``<path>/vm/<vmid>/<time>/`` holds one backup. It is written as ``.<time>.tmp/`` and renamed only
once every file in it is on disk, so a backup directory that exists is complete; anything a crash
leaves behind is a hidden ``.tmp`` directory that the next run of that guest removes.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from ..errors import LockTimeout, StorageError

TIME_FORMAT = '%Y-%m-%dT%H:%M:%SZ'
INDEX = 'index.json'
PROTECTED = '.protected'


def format_time(when):
    return when.astimezone(timezone.utc).strftime(TIME_FORMAT)


def parse_time(text):
    return datetime.strptime(text, TIME_FORMAT).replace(tzinfo=timezone.utc)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path):
    """sha256 of a file, as the manifest records it for every image."""
    with open(path, 'rb', buffering=0) as handle:
        if hasattr(hashlib, 'file_digest'):  # Python 3.11+: no copy through Python objects
            return hashlib.file_digest(handle, 'sha256').hexdigest()
        digest = hashlib.sha256()
        for chunk in iter(lambda: handle.read(8 << 20), b''):
            digest.update(chunk)
        return digest.hexdigest()


def write_file_atomic(path, data):
    """Write bytes or text under a temporary name, fsync, rename: never a half-written file."""
    tmp = f"{path}.tmp{os.getpid()}"
    mode = 'wb' if isinstance(data, bytes) else 'w'
    with open(tmp, mode) as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or '.')


@contextmanager
def file_lock(path, wait_seconds, what, shared=False):
    """Hold a flock on ``path``; the kernel drops it if the holder dies.

    Readers (restore, verify) share the lock; writers (backup, prune, protect) hold it alone.
    """
    handle = open(path, 'a+')
    deadline = time.monotonic() + max(0.0, wait_seconds)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"{what} is locked by another run (lock {path}) and stayed locked for "
                        f"lockwait ({wait_seconds / 60:g} min); wait for it to finish or raise "
                        "lockwait") from None
                time.sleep(0.2)
        yield
    finally:
        handle.close()


class BackupRecord:
    """A complete backup as found on storage."""

    def __init__(self, path, index, protected):
        self.path = path
        self.index = index
        self.protected = protected

    @property
    def time(self):
        return parse_time(self.index['time'])

    @property
    def id(self):
        return f"vm/{self.index['vmid']}/{self.index['time']}"

    def __repr__(self):
        return f"BackupRecord({self.id!r}, level={self.index.get('level')!r})"


class StagedBackup:
    """A backup being written: a hidden directory that becomes visible on ``commit``."""

    def __init__(self, tmp_path, final_path):
        self.path = tmp_path
        self.final_path = final_path
        os.mkdir(tmp_path, 0o750)

    def file(self, name):
        return os.path.join(self.path, name)

    def write(self, name, data):
        write_file_atomic(self.file(name), data)

    def write_json(self, name, obj):
        self.write(name, json.dumps(obj, indent=2, sort_keys=True) + '\n')

    def commit(self):
        """Make every file durable, then make the backup visible in one rename."""
        for name in os.listdir(self.path):
            fsync_path(self.file(name))
        fsync_path(self.path)
        os.rename(self.path, self.final_path)
        fsync_path(os.path.dirname(self.final_path))
        self.path = self.final_path

    def discard(self):
        shutil.rmtree(self.path, ignore_errors=True)


class DirStorage:
    def __init__(self, path, storage_id=None):
        self.id = storage_id
        self.path = os.path.abspath(path)
        label = f"storage {storage_id} ({self.path})" if storage_id else f"dumpdir {self.path}"
        if not os.path.isdir(self.path):
            raise StorageError(f"{label} does not exist or is not a directory; create it or "
                               "fix the path")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise StorageError(f"{label} is not writable by this user; fix its permissions")
        self.label = label

    def guest_dir(self, vmid):
        return os.path.join(self.path, 'vm', str(int(vmid)))

    def inside(self, path):
        """``path`` resolved, if it lies within the storage; else StorageError."""
        real = os.path.realpath(path)
        root = os.path.realpath(self.path)
        if os.path.commonpath([real, root]) != root:
            raise StorageError(f"{path} is outside {self.label}; refusing to touch it")
        return real

    @contextmanager
    def guest_lock(self, vmid, wait_seconds, shared=False):
        gdir = self.guest_dir(vmid)
        if shared and not os.path.isdir(gdir):
            yield  # a reader of a guest without backups: nothing to lock, nothing to create
            return
        os.makedirs(gdir, mode=0o750, exist_ok=True)
        with file_lock(os.path.join(gdir, '.lock'), wait_seconds,
                       f"guest {vmid} on {self.label}", shared=shared):
            yield

    def backups(self, vmid):
        """Complete backups of one guest, oldest first."""
        gdir = self.guest_dir(vmid)
        if not os.path.isdir(gdir):
            return []
        found = []
        for name in sorted(os.listdir(gdir)):
            if name.startswith('.'):
                continue
            index_path = os.path.join(gdir, name, INDEX)
            try:
                parse_time(name)
                with open(index_path) as handle:
                    index = json.load(handle)
            except (ValueError, OSError):
                continue  # not a backup directory of ours
            found.append(BackupRecord(os.path.join(gdir, name), index,
                                      os.path.exists(os.path.join(gdir, name, PROTECTED))))
        found.sort(key=lambda b: b.time)
        return found

    def remove_stale(self, vmid):
        """Remove what killed runs left (call with the guest's lock held); return the names."""
        gdir = self.guest_dir(vmid)
        removed = []
        for name in os.listdir(gdir) if os.path.isdir(gdir) else ():
            path = os.path.join(gdir, name)
            if not (name.startswith('.') and name.endswith('.tmp')):
                continue
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                raise StorageError(f"cannot remove {path}, left by an interrupted run: {exc}; "
                                   "remove it by hand") from exc
            removed.append(name)
        return removed

    def next_backup_time(self, vmid, now):
        """``now`` to the second, made later than the newest backup so names never collide."""
        when = now.astimezone(timezone.utc).replace(microsecond=0)
        existing = self.backups(vmid)
        if existing and when <= existing[-1].time:
            when = existing[-1].time + timedelta(seconds=1)
        return when

    def stage(self, vmid, when):
        name = format_time(when)
        gdir = self.guest_dir(vmid)
        final = os.path.join(gdir, name)
        if os.path.exists(final):
            raise StorageError(f"backup {final} already exists")
        try:
            return StagedBackup(os.path.join(gdir, f".{name}.tmp"), final)
        except OSError as exc:
            raise StorageError(f"cannot create a backup directory in {gdir}: {exc}") from exc
