"""A directory storage laid out like a Proxmox Backup Server datastore (docs/architecture.md).

``<path>/vm/<vmid>/<time>/`` holds one backup. It is written as ``.<time>.tmp/`` and renamed only
once every file in it is on disk, so a backup directory that exists is complete; anything a crash
leaves behind is a hidden ``.tmp`` directory that the next run of that guest removes.

vzdump archives (``<archive dir>/vzdump-lxc-<vmid>-<time>.tar.zst``, storage/vzdump_names.py: the
archive directory is a dumpdir itself, or ``<path>/dump`` of a ``dir:`` storage, where vzdump
writes them) are backups of their guest too (``ArchiveRecord``), with PVE's companions
(``<archive>.notes``, ``<archive>.protected``, ``<stem>.log``) as their state; guestvault adds
``<archive>.verify.json`` for the last verify. A ``.dat`` (an archive being written) is never
listed; one a killed run left is a stale path.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from datetime import timedelta, timezone

from ..errors import ConfigError, GuestvaultError, LockTimeout, StorageError
from ..times import format_time, parse_time
from . import vzdump_names
from .records import ArchiveRecord, BackupRecord, DamagedBackup, Manifest, as_manifest
from .files import fsync_path, write_file_atomic

INDEX = 'index.json'
PENDING_INDEX = 'index.json.new'
PROTECTED = '.protected'
NOTES = 'notes'
GUEST_CONFIG = 'guest.json'
CLIENT_LOG = 'client.log'
VERIFY = 'verify.json'
ARCHIVE_VERIFY_EXT = '.verify.json'
# How far the newest backup's name may lie ahead of the clock before a backup is refused.
CLOCK_SKEW_LIMIT = 120


# The collectors lock_waits() has open: each wait for a lock is added to every one.
_WAIT_SINKS = []


@contextmanager
def lock_waits():
    """Collect, while inside, every wait for a lock as one line (what was locked, by whom, for how
    long): a module's result carries them as warnings, whichever verb waited."""
    sink = []
    _WAIT_SINKS.append(sink)
    try:
        yield sink
    finally:
        _WAIT_SINKS.remove(sink)


def report_wait(line):
    """Tell the open ``lock_waits`` collectors that this run waited (see there)."""
    for sink in _WAIT_SINKS:
        sink.append(line)


@contextmanager
def file_lock(path, wait_seconds, what, shared=False, holder=None, on_wait=None):
    """Hold a flock on ``path``; the kernel drops it if the holder dies.

    Readers (restore, verify) share the lock; writers (backup, prune, protect) hold it alone.
    An exclusive holder may describe itself (``holder``, one line), which is kept in the lock
    file while it holds the lock; a shared holder that describes itself (a live restore's
    server, which holds its snapshot for hours) does so in a file of its own beside it,
    ``<lock>.reader-<pid>``, as several readers hold the lock at once. A run that has to wait
    is told once, through ``on_wait``, who it waits for.
    """
    handle = open(path, 'a+')
    deadline = time.monotonic() + max(0.0, wait_seconds)
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    told = False
    waited_since = held_by = None
    try:
        while True:
            try:
                fcntl.flock(handle, mode | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                waited_since = waited_since or time.monotonic()
                held_by = _holder(path) or held_by
                if time.monotonic() >= deadline:
                    raise LockTimeout(
                        f"{what} is locked by another run ({held_by or f'lock {path}'}) and "
                        f"stayed locked for lockwait ({wait_seconds / 60:g} min); wait for it to "
                        "finish or raise lockwait") from None
                if on_wait and not told:
                    on_wait(f"{held_by or f'another run holds {path}'}; waiting up to lockwait "
                            f"{wait_seconds / 60:g} min")
                    told = True
                time.sleep(0.2)
        if waited_since is not None:
            report_wait(f"waited {time.monotonic() - waited_since:.1f} s for {what}: "
                        f"{held_by or 'another run'}")
        if holder and not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(holder + '\n')
            handle.flush()
        elif holder:
            write_file_atomic(_reader_file(path, os.getpid()), holder + '\n')
        yield
    finally:
        if holder and not shared:
            try:
                handle.truncate(0)
            except OSError:
                pass
        elif holder:
            _remove(_reader_file(path, os.getpid()))
        handle.close()


def _reader_file(path, pid):
    return f"{path}.reader-{pid}"


def _holder(path):
    """Who holds the lock: the exclusive holder's line, else a described reader's."""
    try:
        with open(path) as handle:
            line = handle.readline().strip()
    except OSError:
        line = ''
    if line:
        return line
    folder, prefix = os.path.split(_reader_file(path, ''))
    for name in sorted(os.listdir(folder or '.')):
        pid = name[len(prefix):]
        if not (name.startswith(prefix) and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            _remove(os.path.join(folder, name))     # its reader was killed
            continue
        except PermissionError:
            pass                                    # alive, another user's
        with open(os.path.join(folder, name)) as handle:
            return handle.readline().strip()
    return ''


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class StagedBackup:
    """A backup being written: a hidden directory that becomes visible on ``commit``."""

    def __init__(self, tmp_path, final_path):
        self.path = tmp_path
        self.final_path = final_path
        os.mkdir(tmp_path, 0o700)

    def file(self, name):
        return os.path.join(self.path, name)

    def write(self, name, data):
        write_file_atomic(self.file(name), data)

    def write_json(self, name, obj):
        self.write(name, json.dumps(obj, indent=2, sort_keys=True) + '\n')

    @property
    def log_path(self):
        """Where the run's log is (hooks get it as LOGFILE)."""
        return self.file(CLIENT_LOG)

    @property
    def text_log_path(self):
        """``log_path`` when the log is kept as plain text there (a hook can read it), else
        None."""
        return self.log_path

    def write_manifest(self, manifest):
        """The manifest (a Manifest, or its dict), written last before ``commit``."""
        self.write_json(INDEX, as_manifest(manifest).to_dict())

    def write_guest_config(self, guest):
        self.write_json(GUEST_CONFIG, guest)

    def write_log(self, text):
        self.write(CLIENT_LOG, text)

    def set_notes(self, notes):
        self.write(NOTES, notes)

    def set_protected(self):
        self.write(PROTECTED, '')

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
    """Backups as directories on a local or mounted file system."""

    kind = 'dir'
    staged_class = StagedBackup

    def __init__(self, path, storage_id=None, archive_dir=None):
        self.id = storage_id
        self.path = os.path.abspath(path)
        # where vzdump writes archives: a dumpdir itself; a dir: storage's <path>/dump (made by
        # the first archive written)
        self.archive_dir = os.path.abspath(archive_dir) if archive_dir else self.path
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
    def guest_lock(self, vmid, wait_seconds, shared=False, holder=None):
        gdir = self.guest_dir(vmid)
        if shared and not os.path.isdir(gdir):
            yield  # a reader of a guest without backups: nothing to lock, nothing to create
            return
        os.makedirs(gdir, mode=0o700, exist_ok=True)
        with file_lock(os.path.join(gdir, '.lock'), wait_seconds,
                       f"guest {vmid} on {self.label}", shared=shared, holder=holder):
            yield

    def scan(self, vmid):
        """``(complete backups, damaged ones)`` of one guest, each oldest first.

        A directory named as a backup time whose manifest cannot be read is damaged, not
        absent: a backup listing that dropped it would let ``latest`` pass over it in silence
        (and a datastore's GC used to sweep its chunks). Anything else is not ours and is
        skipped."""
        gdir = self.guest_dir(vmid)
        found, damaged = self._archives(vmid), []
        for name in sorted(os.listdir(gdir)) if os.path.isdir(gdir) else ():
            path = os.path.join(gdir, name)
            if name.startswith('.') or not os.path.isdir(path):
                continue
            try:
                parse_time(name)
            except ValueError:
                continue  # not a backup directory of ours
            try:
                index = self.read_index(path)
            except (ValueError, OSError, GuestvaultError) as exc:
                damaged.append(DamagedBackup(path, vmid, name, self._unreadable(path, exc)))
                continue
            found.append(BackupRecord(path, index, os.path.exists(os.path.join(path, PROTECTED)),
                                      self))
        found.sort(key=lambda b: b.time)
        return found, damaged

    def _archive_names(self):
        """The parsed vzdump archive names in the storage's directory (regular files only)."""
        found = []
        try:
            with os.scandir(self.archive_dir) as entries:
                for entry in entries:
                    parsed = vzdump_names.parse(entry.name)
                    if parsed is not None and entry.is_file(follow_symlinks=False):
                        found.append(parsed)
        except FileNotFoundError:
            pass     # a dir: storage's dump/ before its first archive
        return found

    def _archive_dir_names(self):
        try:
            return sorted(os.listdir(self.archive_dir))
        except FileNotFoundError:
            return []

    def _archives(self, vmid):
        """Guest ``vmid``'s vzdump archives as records (complete: a ``.dat`` is not listed)."""
        return [ArchiveRecord(os.path.join(self.archive_dir, a.name), a,
                              os.path.exists(os.path.join(self.archive_dir, a.protected_name)),
                              self)
                for a in self._archive_names() if a.vmid == int(vmid)]

    def _state_file(self, record, name):
        """Where one piece of a backup's small state lives: in its directory, or for an
        archive beside it as PVE names it (``<archive>.notes``, ``<archive>.protected``)."""
        if record.archive is None:
            return os.path.join(record.path, name)
        return record.path + {NOTES: vzdump_names.NOTES_EXT,
                              PROTECTED: vzdump_names.PROTECTED_EXT,
                              VERIFY: ARCHIVE_VERIFY_EXT}[name]

    def _no_manifest(self, record):
        return StorageError(f"backup {record.id} is a vzdump archive: it has no manifest to "
                            "change")

    def backups(self, vmid):
        return self.scan(vmid)[0]

    def damaged(self, vmid):
        return self.scan(vmid)[1]

    manifest_name = INDEX

    def _unreadable(self, path, exc):
        """Why the manifest of the backup in ``path`` cannot be read, for a user to act on."""
        manifest = os.path.join(path, self.manifest_name)
        if isinstance(exc, FileNotFoundError):
            return f"its manifest {manifest} is missing"
        if isinstance(exc, OSError):
            return f"its manifest {manifest} cannot be read ({exc.strerror or exc})"
        if isinstance(exc, ValueError):
            return f"its manifest {manifest} is not valid JSON ({exc})"
        return f"its manifest cannot be read: {exc}"

    def read_index(self, backup_dir):
        """The manifest of the backup in ``backup_dir`` (OSError, ValueError)."""
        with open(os.path.join(backup_dir, INDEX)) as handle:
            return Manifest.from_dict(json.load(handle))

    def stale_paths(self, vmid):
        """What killed runs left in the guest's directory: hidden ``.tmp`` entries."""
        gdir = self.guest_dir(vmid)
        found = [os.path.join(self.archive_dir, name) for name in self._archive_dir_names()
                 if vzdump_names.is_dat_of(name, vmid)]
        if not os.path.isdir(gdir):
            return found
        return found + [os.path.join(gdir, name) for name in sorted(os.listdir(gdir))
                        if name.startswith('.') and name.endswith('.tmp')]

    def remove_stale(self, vmid):
        """Remove what killed runs left (call with the guest's lock held); return the names."""
        removed = []
        for path in self.stale_paths(vmid):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.unlink(path)
            except OSError as exc:
                raise StorageError(f"cannot remove {path}, left by an interrupted run: {exc}; "
                                   "remove it by hand") from exc
            removed.append(os.path.basename(path))
        return removed

    def next_backup_time(self, vmid, now):
        """``now`` to the second, made later than the newest backup so names never collide.

        Names are times to the second, so a second backup within the same second is named one
        second later. A newest backup far ahead of the clock means the clock was stepped back:
        naming this backup after it would misdate it, so that is refused.
        """
        when = now.astimezone(timezone.utc).replace(microsecond=0)
        # A damaged backup holds its name too.
        records, damaged = self.scan(vmid)
        newest = max(records + damaged, key=lambda b: b.time, default=None)
        if newest is not None and when <= newest.time:
            ahead = (newest.time - when).total_seconds()
            if ahead > CLOCK_SKEW_LIMIT:
                raise StorageError(
                    f"the newest backup of guest {vmid} on {self.label} is "
                    f"{format_time(newest.time)}, {ahead:.0f} s after this node's clock "
                    f"({format_time(when)}): the clock was stepped back or is wrong. Fix the "
                    "time (NTP), or move that backup away, before taking another backup")
            when = newest.time + timedelta(seconds=1)
        return when

    def stage(self, vmid, when):
        name = format_time(when)
        gdir = self.guest_dir(vmid)
        final = os.path.join(gdir, name)
        if os.path.exists(final):
            raise StorageError(f"backup {final} already exists")
        try:
            os.makedirs(gdir, mode=0o700, exist_ok=True)
            return self.staged_class(os.path.join(gdir, f".{name}.tmp"), final)
        except OSError as exc:
            raise StorageError(f"cannot create a backup directory in {gdir}: {exc}") from exc

    @contextmanager
    def writer(self, wait_seconds=0):
        """Held by a backup while it writes (a datastore's garbage collection spares what
        running backups may still name); nothing to do for a directory of qcow2 chains."""
        yield

    def free_bytes(self):
        """Bytes a backup can still write here (what an unprivileged writer may use)."""
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def index_files(self):
        return []       # qcow2 chains: no chunk indexes, nothing for a garbage collection

    def collecting_garbage(self, check_mode=False):
        """Refused when called, before any ``with`` body runs: nothing here to collect."""
        raise ConfigError(f"{self.label} holds qcow2 chains, which share no chunks: there is "
                          "no garbage to collect")

    def guest_ids(self):
        root = os.path.join(self.path, 'vm')
        found = {a.vmid for a in self._archive_names()}
        if os.path.isdir(root):
            found.update(int(name) for name in os.listdir(root) if name.isdigit())
        return sorted(found)

    def remove(self, record):
        """Make the backup invisible in one rename, then delete it."""
        # Asked on disk, not from the listing: protection may have been set since.
        if record.protected or os.path.exists(self._state_file(record, PROTECTED)):
            raise StorageError(f"backup {record.id} is protected and is not removed")
        self.inside(record.path)
        if record.archive is not None:
            self._remove_archive(record)
            return
        hidden = os.path.join(os.path.dirname(record.path),
                              f".{os.path.basename(record.path)}.removing.tmp")
        os.rename(record.path, hidden)
        fsync_path(os.path.dirname(record.path))
        shutil.rmtree(hidden)

    def _remove_archive(self, record):
        """An archive goes in one unlink (as pve-storage's archive_remove), then its
        companions: its log, notes and verify state (protection was refused above)."""
        os.unlink(record.path)
        fsync_path(self.archive_dir)
        for path in (os.path.join(self.archive_dir, record.archive.log_name),
                     self._state_file(record, NOTES), self._state_file(record, VERIFY)):
            _set_or_remove(path, None)

    # -- the small mutable state of one backup ---------------------------------------------
    def set_protected(self, record, protected):
        _set_or_remove(self._state_file(record, PROTECTED), '' if protected else None)
        record.protected = protected

    def read_notes(self, record):
        return _read_text(self._state_file(record, NOTES))

    def set_notes(self, record, notes):
        _set_or_remove(self._state_file(record, NOTES), notes or None)

    def read_guest_config(self, record):
        """The guest as the backup captured it ({} when unreadable; an archive's configuration
        is inside it, for its format to read)."""
        if record.archive is not None:
            return {}
        try:
            return json.loads(_read_text(os.path.join(record.path, GUEST_CONFIG)) or '{}')
        except ValueError:
            return {}

    def read_verify_state(self, record):
        text = _read_text(self._state_file(record, VERIFY))
        try:
            return json.loads(text) if text else None
        except ValueError:
            return None

    def write_verify_state(self, record, state):
        write_file_atomic(self._state_file(record, VERIFY),
                          json.dumps(state, indent=2, sort_keys=True) + '\n')

    def backup_size(self, record):
        if record.archive is not None:
            return os.path.getsize(record.path)
        total = 0
        for name in os.listdir(record.path):
            try:
                total += os.path.getsize(os.path.join(record.path, name))
            except OSError:
                pass
        return total

    def file(self, record, name):
        """The path of one of a backup's files (formats read their images through this); an
        archive is its one file (``name`` None or its own name)."""
        if record.archive is not None:
            if name not in (None, record.archive.name):
                raise StorageError(f"backup {record.id} is one archive file; it has no {name}")
            return record.path
        return os.path.join(record.path, name)

    # -- replacing a manifest ----------------------------------------------------------------
    def stage_manifest(self, record, manifest):
        """Write the new manifest beside the old one; ``commit_manifest`` swaps it in.

        A crash in between leaves the pending manifest, which ``pending_manifests`` lists for
        the format to complete or drop (it alone can tell whether its files already match).
        """
        if record.archive is not None:
            raise self._no_manifest(record)
        pending = os.path.join(record.path, PENDING_INDEX)
        write_file_atomic(pending, json.dumps(as_manifest(manifest).to_dict(), indent=2,
                                              sort_keys=True) + '\n')
        return pending

    def commit_manifest(self, record, pending):
        os.replace(pending, os.path.join(record.path, INDEX))
        fsync_path(record.path)
        with open(os.path.join(record.path, INDEX)) as handle:
            record.manifest = Manifest.from_dict(json.load(handle))

    def pending_manifests(self, vmid):
        """[(record, pending Manifest or None if unreadable, pending path)]."""
        found = []
        for record in self.backups(vmid):
            if record.archive is not None:
                continue
            pending = os.path.join(record.path, PENDING_INDEX)
            if not os.path.exists(pending):
                continue
            try:
                with open(pending) as handle:
                    index = Manifest.from_dict(json.load(handle))
            except (OSError, ValueError, TypeError, AttributeError):
                index = None
            found.append((record, index, pending))
        return found

    def update_manifest(self, record, **changes):
        """Change keys of a committed backup's manifest, in the two steps above."""
        if record.archive is not None:
            raise self._no_manifest(record)
        changed = record.manifest.to_dict()
        changed.update(changes)
        self.commit_manifest(record, self.stage_manifest(record, changed))

    def drop_pending_manifest(self, pending):
        os.unlink(pending)


def _read_text(path):
    try:
        with open(path) as handle:
            return handle.read()
    except OSError:
        return None


def _set_or_remove(path, text):
    if text is not None:
        write_file_atomic(path, text)
    elif os.path.exists(path):
        os.unlink(path)
