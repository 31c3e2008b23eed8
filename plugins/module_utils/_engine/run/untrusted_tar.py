"""Extracting a tar stream made from an untrusted guest filesystem, onto the host.

The names and links in it are the guest's to choose, so nothing may land outside the target
directory: a name with ``..`` or an absolute one is refused, and no member is written through
a symbolic link an earlier member made (each parent is checked by its real path). Device
nodes and FIFOs are skipped and reported; setuid, setgid and sticky bits are dropped, as
Python's ``data`` extraction filter does (Debian 12's Python 3.11.2 predates that filter).
Files are fsync'd as they are written; ``extract`` works in a staging directory that the
caller renames into place (``merge``), so that a failure leaves nothing half-written behind.
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile

from ..errors import StorageError

COPY_BYTES = 1 << 20


class UnsafeMember(StorageError):
    """A tar member would land outside its target directory."""


def member_path(name):
    """The member's path relative to the archive root ('' for the root itself), or raise."""
    parts = [part for part in name.split('/') if part not in ('', '.')]
    if name.startswith('/') or '..' in parts:
        raise UnsafeMember(f"the backup holds a path that escapes its directory: {name!r}; "
                           "it was not extracted")
    return '/'.join(parts)


def _inside(root, path):
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    return real == real_root or real.startswith(real_root + os.sep)


def extract(tar_path, length, staging):
    """Extract the first ``length`` bytes of ``tar_path`` into ``staging`` (which exists).

    Returns ``{'files': n, 'bytes': n, 'directories': n, 'links': n, 'skipped': [names]}``."""
    counts = {'files': 0, 'bytes': 0, 'directories': 0, 'links': 0, 'skipped': []}
    directories = []
    with open(tar_path, 'rb') as raw:
        bounded = _Bounded(raw, length)
        with tarfile.open(fileobj=bounded, mode='r|') as archive:
            for member in archive:
                relative = member_path(member.name)
                target = os.path.join(staging, relative) if relative else staging
                parent = os.path.dirname(target)
                if not _inside(staging, parent):
                    raise UnsafeMember(f"{member.name!r} lies behind a symbolic link in the "
                                       "backup; it was not extracted")
                # a path asked for comes without its parents' own entries
                os.makedirs(parent, exist_ok=True)
                if member.isdir():
                    if not relative:
                        continue
                    if os.path.lexists(target) and not os.path.isdir(target) \
                            or os.path.islink(target):
                        _remove(target)
                    os.makedirs(target, exist_ok=True)
                    directories.append((target, member))
                    counts['directories'] += 1
                elif member.isreg():
                    _replace(target)
                    _write_file(archive.extractfile(member), target, member)
                    counts['files'] += 1
                    counts['bytes'] += member.size
                elif member.issym():
                    _replace(target)
                    os.symlink(member.linkname, target)
                    _owner(target, member, follow=False)
                    counts['links'] += 1
                elif member.islnk():
                    source = os.path.join(staging, member_path(member.linkname))
                    if not _inside(staging, source) or not os.path.isfile(source) \
                            or os.path.islink(source):
                        raise UnsafeMember(f"{member.name!r} is a hard link to "
                                           f"{member.linkname!r}, which is not a file "
                                           "extracted before it")
                    _replace(target)
                    os.link(source, target)
                    counts['files'] += 1
                else:
                    counts['skipped'].append(relative)
    # directories last: writing into them changed their mtime
    for target, member in reversed(directories):
        os.chmod(target, _mode(member))
        _owner(target, member, follow=True)
        os.utime(target, (member.mtime, member.mtime))
    return counts


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


def _replace(target):
    if os.path.lexists(target):
        _remove(target)


def _remove(target):
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    else:
        os.unlink(target)


def _write_file(source, target, member):
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, 'wb') as out:
        while True:
            block = source.read(COPY_BYTES)
            if not block:
                break
            out.write(block)
        out.flush()
        os.fchmod(out.fileno(), member.mode & 0o777 & ~(stat.S_IWGRP | stat.S_IWOTH))
        if os.geteuid() == 0:
            os.fchown(out.fileno(), member.uid, member.gid)
        os.fsync(out.fileno())
    os.utime(target, (member.mtime, member.mtime))


def _owner(target, member, follow):
    """The guest's numeric owner, as tar does for root; a user keeps their own."""
    if os.geteuid() == 0:
        os.chown(target, member.uid, member.gid, follow_symlinks=follow)


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


class _Bounded:
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
