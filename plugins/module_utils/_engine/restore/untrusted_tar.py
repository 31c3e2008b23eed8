"""Extracting a tar stream made from an untrusted filesystem, onto the host.

The names and links in it are the stream's to choose, so nothing outside the destination may
be touched: a name with ``..`` or an absolute one is refused, and every name is reached from
the destination one component at a time by file descriptor (``O_NOFOLLOW``, ``dir_fd``), so a
symbolic link or a file the stream made earlier is never passed through. A name the stream
gives twice with another type (a directory, then a symbolic link to a host directory) is
refused, and the last pass over directories (their mode, owner and times, set once their
files are written) reopens each one the same way and checks that it is still the directory
this extraction made. Device nodes and FIFOs are not extracted and are reported; setuid,
setgid and sticky bits are dropped, as Python's ``data`` extraction filter does (Debian 12's
Python 3.11.2 predates that filter). Files are fsync'd as they are written.

``extract`` fills an empty directory and empties it again on any error: a caller extracts
into a hidden staging directory and renames the result into place (``merge``).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tarfile

from ..errors import StorageError

COPY_BYTES = 1 << 20
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_KINDS = ((stat.S_ISDIR, 'directory'), (stat.S_ISREG, 'file'), (stat.S_ISLNK, 'symbolic link'))


class UnsafeMember(StorageError):
    """A tar member would land outside its target directory, or is not what it claims."""


class TooLarge(UnsafeMember):
    """The stream holds more file data than the extraction's limit."""


def member_path(name):
    """The member's path relative to the archive root ('' for the root itself), or raise."""
    parts = [part for part in name.split('/') if part not in ('', '.')]
    if name.startswith('/') or '..' in parts:
        raise UnsafeMember(f"the tar stream holds a path that escapes its directory: {name!r}; "
                           "nothing was extracted")
    return '/'.join(parts)


def extract(stream, dest, max_bytes=None, select=None):
    """Extract the tar ``stream`` (a binary file object, read once from its start) into
    ``dest``, an empty directory; at most ``max_bytes`` of file data, if given; only the
    members whose path (``member_path``) ``select`` accepts, if given.

    Returns ``{'files': n, 'bytes': n, 'directories': n, 'links': n, 'not_extracted':
    [names of device nodes, FIFOs and other special members]}``. On any error ``dest`` is
    emptied again before the error is raised."""
    if os.listdir(dest):
        raise StorageError(f"{dest} is not empty; a tar stream is extracted into an empty "
                           "directory")
    root = os.open(dest, _DIRECTORY)
    try:
        tree = _Tree(root, max_bytes)
        try:
            with tarfile.open(fileobj=stream, mode='r|') as archive:
                for member in archive:
                    if select is None or select(member_path(member.name)):
                        tree.add(archive, member)
            tree.finish_directories()
        except tarfile.TarError as exc:
            raise UnsafeMember(f"the tar stream is unreadable ({exc}); nothing was "
                               "extracted") from None
        return tree.counts
    except BaseException:
        _empty(dest)
        raise
    finally:
        os.close(root)


class _Tree:
    """What one extraction made below its root (an open directory), reached by descriptor."""

    def __init__(self, root, max_bytes):
        self.root = root
        self.max_bytes = max_bytes
        self.counts = {'files': 0, 'bytes': 0, 'directories': 0, 'links': 0,
                       'not_extracted': []}
        self.directories = {}     # parts -> ((st_dev, st_ino), member or None if implied)
        self.files = set()        # (st_dev, st_ino) of the regular files written

    def add(self, archive, member):
        relative = member_path(member.name)
        kind = 'directory' if member.isdir() else 'file' if member.isreg() or member.islnk() \
            else 'symbolic link' if member.issym() else None
        if kind is None:
            self.counts['not_extracted'].append(relative)
            return
        if not relative:
            if kind != 'directory':
                raise UnsafeMember(f"the tar stream holds its root {member.name!r} as a {kind}; "
                                   "nothing was extracted")
            return
        parts = tuple(relative.split('/'))
        parent = self._open_directory(parts[:-1], member.name, create=True)
        try:
            self._add_at(archive, member, kind, parts, parent)
        except (OSError, OverflowError, ValueError) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise StorageError(f"extracting {member.name!r} failed: no space left on "
                                   "the device; free space there or extract less") from None
            raise UnsafeMember(f"the tar stream's {member.name!r} could not be extracted "
                               f"({exc}); nothing was extracted") from None
        finally:
            os.close(parent)

    def _add_at(self, archive, member, kind, parts, parent):
        name = parts[-1]
        existing = _lstat(name, parent)
        if existing is not None:
            was = _kind(existing.st_mode)
            if was != kind:
                raise UnsafeMember(f"the tar stream holds {member.name!r} twice, first as a "
                                   f"{was}, then as a {kind}; such a stream is refused as "
                                   "unsafe (nothing was extracted)")
            if kind != 'directory' and not member.islnk():
                os.unlink(name, dir_fd=parent)     # a later member replaces it, as tar does
        if member.isdir():
            if existing is None:
                os.mkdir(name, 0o700, dir_fd=parent)
                existing = _lstat(name, parent)
            self.directories[parts] = ((existing.st_dev, existing.st_ino), member)
            self.counts['directories'] += 1
        elif member.isreg():
            if self.max_bytes is not None and self.counts['bytes'] + member.size > self.max_bytes:
                raise TooLarge(f"the tar stream holds more than {self.max_bytes} bytes of "
                               f"files (at {member.name!r}); nothing was extracted")
            self.files.add(_write_file(archive.extractfile(member), name, parent, member))
            self.counts['files'] += 1
            self.counts['bytes'] += member.size
        elif member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
            _set_owner_and_time(name, parent, member)
            self.counts['links'] += 1
        else:
            self._link(member, name, parent, existing)

    def _link(self, member, name, parent, existing):
        """A hard link, only to a regular file this extraction wrote."""
        source_parts = tuple(member_path(member.linkname).split('/'))
        refused = UnsafeMember(f"{member.name!r} is a hard link to {member.linkname!r}, which "
                               "is not a file extracted before it; nothing was extracted")
        try:
            source_dir = self._open_directory(source_parts[:-1], member.name, create=False)
        except FileNotFoundError:
            raise refused from None
        try:
            source = _lstat(source_parts[-1], source_dir)
            if source is None or not stat.S_ISREG(source.st_mode) \
                    or (source.st_dev, source.st_ino) not in self.files:
                raise refused
            if existing is not None and existing.st_ino == source.st_ino:
                return
            if existing is not None:
                os.unlink(name, dir_fd=parent)
            os.link(source_parts[-1], name, src_dir_fd=source_dir, dst_dir_fd=parent,
                    follow_symlinks=False)
            self.counts['files'] += 1
        finally:
            os.close(source_dir)

    def _open_directory(self, parts, member_name, create):
        """A descriptor of the directory ``parts`` below the root; missing ones are made when
        ``create`` (a path asked for comes without its parents' own entries)."""
        fd = os.dup(self.root)
        try:
            for depth, name in enumerate(parts, 1):
                try:
                    child = os.open(name, _DIRECTORY, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(name, 0o700, dir_fd=fd)
                    child = os.open(name, _DIRECTORY, dir_fd=fd)
                    made = os.fstat(child)
                    self.directories[parts[:depth]] = ((made.st_dev, made.st_ino), None)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    was = _kind(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode)
                    raise UnsafeMember(f"{member_name!r} lies behind a {was} of the tar "
                                       f"stream, {'/'.join(parts[:depth])!r}, not a directory; "
                                       "nothing was extracted") from None
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def finish_directories(self):
        """Each directory's own mode, owner and times, last (writing into it changed its
        mtime): only on the directory this extraction made, reopened without following."""
        for parts, (identity, member) in reversed(list(self.directories.items())):
            if member is None:
                continue
            fd = self._open_directory(parts, member.name, create=False)
            try:
                found = os.fstat(fd)
                if (found.st_dev, found.st_ino) != identity:
                    raise UnsafeMember(f"{member.name!r} is no longer the directory this "
                                       "extraction made; nothing was extracted")
                os.fchmod(fd, _mode(member))
                if os.geteuid() == 0:
                    os.fchown(fd, member.uid, member.gid)
                os.utime(fd, (member.mtime, member.mtime))
            finally:
                os.close(fd)


def stream_length(tar_path):
    """Where the tar stream at the start of ``tar_path`` ends (after its two zero blocks):
    its headers are read, its data skipped."""
    try:
        with tarfile.open(tar_path, mode='r:') as archive:
            for _member in archive:
                pass
            end = archive.offset
    except tarfile.TarError as exc:
        raise UnsafeMember(f"the appliance's tar stream is unreadable ({exc}); nothing was "
                           "extracted") from None
    return end + 2 * tarfile.BLOCKSIZE


def _mode(member):
    return member.mode & 0o777 & ~(stat.S_IWGRP | stat.S_IWOTH) | 0o700 * member.isdir()


def _kind(mode):
    return next((name for test, name in _KINDS if test(mode)), 'special file')


def _lstat(name, dir_fd):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove(target):
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    else:
        os.unlink(target)


def _empty(directory):
    """Remove what an extraction made in ``directory`` (best effort: the first error is the
    one the caller needs to see)."""
    try:
        for name in os.listdir(directory):
            _remove(os.path.join(directory, name))
    except OSError:
        pass


def _write_file(source, name, dir_fd, member):
    """Write one regular file in ``dir_fd``; returns its (st_dev, st_ino)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    with os.fdopen(fd, 'wb') as out:
        shutil.copyfileobj(source, out, COPY_BYTES)
        out.flush()
        os.fchmod(out.fileno(), _mode(member))
        if os.geteuid() == 0:
            os.fchown(out.fileno(), member.uid, member.gid)
        os.utime(out.fileno(), (member.mtime, member.mtime))
        os.fsync(out.fileno())
        made = os.fstat(out.fileno())
    return made.st_dev, made.st_ino


def _set_owner_and_time(name, dir_fd, member):
    """A symbolic link's own owner (the guest's numeric one, as tar does for root; a user
    keeps their own) and time, never its target's."""
    if os.geteuid() == 0:
        os.chown(name, member.uid, member.gid, dir_fd=dir_fd, follow_symlinks=False)
    os.utime(name, (member.mtime, member.mtime), dir_fd=dir_fd, follow_symlinks=False)


def conflicts(staging, dest):
    """Paths under ``dest`` that ``merge`` would replace (a directory on both sides merges)."""
    found = []
    for name in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, name), os.path.join(dest, name)
        if not os.path.lexists(target):
            continue
        if os.path.isdir(source) and not os.path.islink(source) \
                and os.path.isdir(target) and not os.path.islink(target):
            found += conflicts(source, target)
        else:
            found.append(target)
    return found


def merge(staging, dest):
    """Move the staged tree into ``dest``: a new entry is renamed into place, an existing one
    replaced, a directory on both sides merged. Returns the paths written at the top."""
    written = []
    for name in sorted(os.listdir(staging)):
        source, target = os.path.join(staging, name), os.path.join(dest, name)
        if os.path.isdir(source) and not os.path.islink(source) \
                and os.path.isdir(target) and not os.path.islink(target):
            merge(source, target)
        else:
            if os.path.lexists(target):
                _remove(target)
            os.rename(source, target)
        written.append(target)
    _fsync_dir(dest)
    return written


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Bounded:
    """A read-only file object that ends after ``length`` bytes (the tar stream's own end
    is followed by the output disk's zeroes)."""

    def __init__(self, raw, length):
        self._raw = raw
        self._left = length

    def read(self, size=-1):
        if self._left <= 0:
            return b''
        size = self._left if size is None or size < 0 else min(size, self._left)
        data = self._raw.read(size)
        self._left -= len(data)
        return data
