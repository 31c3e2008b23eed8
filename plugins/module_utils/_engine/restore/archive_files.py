"""file_restore of a vzdump container archive: list, measure and extract paths without the
appliance (an archive is a tar stream already, so there is no disk to boot a VM over).

The archive is untrusted: its tar stream (decompressed by format/vzdump_archive) goes through
``untrusted_tar.extract``, which reaches every name by file descriptor from the destination,
refuses ``..``, absolute names and writes through links, leaves devices and FIFOs out, drops
setuid/setgid/sticky bits and stops at ``max_bytes``. Nothing is mounted. A listing reads only
the headers; ``archive`` (a tar file out) copies the chosen members' headers and data, each
name checked, into a hidden file that is fsynced and renamed. Results have the same keys as
an appliance's (restore/file_restore.py), less the filesystem and appliance ones.
"""
from __future__ import annotations

import os
import shutil
import stat
import tarfile
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone

from ..errors import CorruptData
from ..format.vzdump_archive.reader import list_members, tar_stream
from ..storage.files import fsync_path, new_directory
from . import untrusted_tar
from .file_restore import (PathNotFound, SizeLimitExceeded, already_extracted,
                           extraction_diff, merge_extracted)

__all__ = ['extract_paths', 'list_members', 'restore_archive_files']

_KINDS = {'dir': 'directory', 'file': 'file', 'symlink': 'symlink', 'hardlink': 'hardlink',
          'chardev': 'character device', 'blockdev': 'block device', 'fifo': 'fifo'}


def _selector(paths):
    """Accepts a member's relative path when it is one of ``paths`` (container paths, ``/``
    for everything) or lies below one."""
    wanted = [p.strip('/') for p in paths]
    if '' in wanted:
        return None

    def select(relative):
        return any(relative == p or relative.startswith(p + '/') for p in wanted)
    return select


def extract_paths(source, paths, dest, max_bytes, bwlimit_kib=0):
    """Extract ``paths`` of the archive ``source`` (a path or a binary stream) into ``dest``,
    an empty directory (a caller's staging directory, merged into place afterwards with
    ``untrusted_tar.merge``); at most ``max_bytes`` of file data. Returns untrusted_tar's
    counts; on any error ``dest`` is empty again."""
    with tar_stream(source, bwlimit_kib) as stream:
        try:
            return untrusted_tar.extract(stream, dest, max_bytes, select=_selector(paths))
        except untrusted_tar.TooLarge as exc:
            raise SizeLimitExceeded(f"{exc} (max_size {max_bytes}); raise max_size or ask "
                                    "for less") from None


def restore_archive_files(request, storage, record, paths, max_bytes, result, log):
    """List or extract ``paths`` (checked, relative to the container's root) of the archive
    ``record`` as ``request`` says, into ``result``; under the guest's shared lock."""
    source = storage.file(record, None)
    if not request.extracting:
        return _list(source, paths[0], result)
    if already_extracted(request, paths, result):
        return result
    result['diff'] = extraction_diff(request, paths)
    if request.check_mode:
        files, size, entries = _measure(source, paths, max_bytes)
        result.update(changed=True, files=files, bytes=size, entries_extracted=entries,
                      dest=request.dest, archive=request.archive)
        return result
    started = time.monotonic()
    target_dir = os.path.dirname(request.archive) if request.archive else request.dest
    hidden = os.path.join(target_dir, f".guestvault-file-restore-{uuid.uuid4().hex[:12]}")
    try:
        with new_directory(target_dir):     # a failed extraction leaves no new directory
            if request.archive:
                length, files, size, entries = _copy_members(source, paths, max_bytes,
                                                             hidden + '.tar', request.archive)
                result.update(archive=request.archive, archive_bytes=length)
            else:
                os.mkdir(hidden, 0o700)
                counts = extract_paths(source, paths, hidden, max_bytes)
                files, size = counts['files'], counts['bytes']
                entries = files + counts['directories'] + counts['links'] \
                    + len(counts['not_extracted'])
                _require_found(paths, entries)
                warning = merge_extracted(hidden, request, counts, result)
                if warning:
                    result['warnings'].append(warning)
    finally:
        for path in (hidden + '.tar', hidden):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
    result.update(changed=True, files=files, bytes=size, entries_extracted=entries,
                  seconds=round(time.monotonic() - started, 2))
    log(f"extracted {files} file(s), {size} bytes, from {result['backup']}")
    return result


def _list(source, path, result):
    entries = []
    for member in list_members(source, '/' + path):
        entry = {'name': os.path.relpath(member['path'], '/' + path)
                 if member['path'] != '/' + path else os.path.basename(member['path']),
                 'type': _KINDS.get(member['type'], 'unknown'), 'size': member['size'],
                 'mode': f"{member['mode']:04o}", 'uid': member['uid'], 'gid': member['gid'],
                 'mtime': datetime.fromtimestamp(int(member['mtime']), timezone.utc).isoformat()}
        if member['link'] is not None:
            entry['target'] = member['link']
        entries.append(entry)
    if not entries and path and not _present(source, path):
        raise PathNotFound(f"/{path} is not in the archive; list its parent directory to see "
                           "what is there")
    entries.sort(key=lambda e: e['name'])
    result.update(changed=False, entries=entries, path='/' + path)
    return result


def _present(source, path):
    """Whether ``path`` is a member (an empty directory lists nothing, yet is there)."""
    parent = os.path.dirname('/' + path)
    return any(m['path'] == '/' + path for m in list_members(source, parent))


@contextmanager
def _chosen(source, paths):
    """The members ``paths`` selects, as ``(member, archive)``, each name checked."""
    select = _selector(paths)
    # _chosen is itself a context manager: leaving its caller's with-block exits tar_stream's
    with tar_stream(source) as stream:  # pylint: disable=contextmanager-generator-missing-cleanup
        try:
            with tarfile.open(fileobj=stream, mode='r|') as archive:
                yield ((member, archive) for member in archive
                       if _selected(member, select))
        except tarfile.TarError as exc:
            raise CorruptData(f"the archive is damaged or truncated ({exc})") from None


def _selected(member, select):
    relative = untrusted_tar.member_path(member.name)      # UnsafeMember for '..' and the like
    return bool(relative) and (select is None or select(relative))


def _measure(source, paths, max_bytes):
    """Check mode: ``(files, bytes, entries)`` the paths hold; PathNotFound,
    SizeLimitExceeded."""
    files = size = entries = 0
    with _chosen(source, paths) as members:
        for member, _archive in members:
            entries += 1
            if member.isreg():
                files += 1
                size += member.size
    _check_size(size, max_bytes)
    _require_found(paths, entries)
    return files, size, entries


def _check_size(size, max_bytes):
    if size > max_bytes:
        raise SizeLimitExceeded(f"the paths asked for hold {size} bytes or more, more than "
                                f"max_size ({max_bytes} bytes); raise max_size or ask for less")


def _require_found(paths, entries):
    if not entries:
        raise PathNotFound(f"{', '.join('/' + p for p in paths)} is not in the archive; list "
                           "its parent directory to see what is there")


def _copy_members(source, paths, max_bytes, hidden, final):
    """The chosen members as a tar file at ``final`` (written hidden, fsynced, renamed; devices
    and FIFOs left out, as in dest; setuid and setgid dropped): ``(its size, files, bytes,
    entries)``."""
    files = size = entries = 0
    with open(hidden, 'xb') as raw:
        with tarfile.open(fileobj=raw, mode='w|', format=tarfile.PAX_FORMAT) as out:
            with _chosen(source, paths) as members:
                for member, archive in members:
                    if not (member.isreg() or member.isdir() or member.issym()
                            or member.islnk()):
                        continue
                    entries += 1
                    if member.isreg():
                        files += 1
                        size += member.size
                        _check_size(size, max_bytes)
                    member.mode = stat.S_IMODE(member.mode) & ~0o7000
                    out.addfile(member,
                                archive.extractfile(member) if member.isreg() else None)
        _require_found(paths, entries)
        raw.flush()
        os.fsync(raw.fileno())
        length = raw.tell()
    os.replace(hidden, final)
    fsync_path(os.path.dirname(final))
    return length, files, size, entries
