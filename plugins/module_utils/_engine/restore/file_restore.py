"""File restore's mechanics: list a directory of a backup, or extract files from it, without
restoring the disk and without mounting the guest's filesystem on the host.

A throw-away appliance VM (restore/appliance.py) reads the backup's disks read-only, through the
format's block exports (``Format.open_block_exports``: a qcow2 chain's image directly, a
datastore snapshot through the NBD server run in a thread of this process for the appliance's
lifetime; it checks every chunk and needs the key only here). It finds partitions, LVM logical
volumes and ext2/3/4, xfs and vfat filesystems by itself; with more than one, ``filesystem``
names the one meant (the error lists them).

Extracted files come back as a tar stream on a sparse output disk. ``archive`` keeps that
stream as a tar file (the output disk is a hidden file beside it, cut to the stream's length,
fsync'd and renamed); ``dest`` extracts it with restore/untrusted_tar into a hidden staging
directory inside ``dest``, then renames it into place. Paths keep their place below the
filesystem's root: ``/etc/hosts`` lands in ``dest/etc/hosts``. The verb (its request and its
checks) is run/file_restore.py.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
import uuid
from datetime import datetime, timezone

from ..errors import ConfigError, GuestvaultError, StorageError
from ..paths import work_dir
from ..storage.files import new_directory
from . import appliance, untrusted_tar
from .nbd_server import ThreadServer

DEFAULT_MAX_BYTES = 4 << 30
# room on the output disk for tar's headers and padding beyond the files' own bytes
TAR_SLACK = 256 << 20
LIST_OUTPUT_BYTES = 512 << 20
_SIZE = re.compile(r'^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$', re.I)


class FileRestoreError(GuestvaultError):
    """The appliance could not do what was asked; the message says why."""


class PathNotFound(FileRestoreError):
    """A path asked for is not in the backup's filesystem."""


class UnknownFilesystem(FileRestoreError):
    """No filesystem the appliance can read, or the one named holds another kind."""


class SizeLimitExceeded(FileRestoreError):
    """The files asked for are larger than max_size."""


def parse_size(value, name='max_size'):
    """Bytes from an int or a string like ``512M``, ``4G``, ``1TiB`` (powers of 1024)."""
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            raise ConfigError(f"{name} {value!r} is not a size; write bytes or a number with "
                              "K, M, G or T (powers of 1024), e.g. 4G")
        size = int(match.group(1)) << (10 * ' KMGT'.index((match.group(2) or ' ').upper()))
    if size <= 0:
        raise ConfigError(f"{name} must be larger than 0")
    return size


def normalize_path(path):
    """A path in the guest's filesystem, relative to its root ('' for the root itself)."""
    text = str(path)
    if not text:
        raise ConfigError("a path is empty; give each path from the filesystem's root, e.g. / "
                          "or /etc/hosts")
    if '\n' in text or '\0' in text:
        raise ConfigError(f"path {text!r} holds a newline or NUL, which file_restore cannot "
                          "ask for")
    parts = [part for part in text.split('/') if part not in ('', '.')]
    if '..' in parts:
        raise ConfigError(f"path {text!r} contains '..'; give the path from the filesystem's "
                          "root, e.g. /etc/hosts")
    return '/'.join(parts)


def restore_files(request, storage, fmt, record, paths, max_bytes, result, log):
    """List or extract ``paths`` (checked, relative to the filesystem's root) of ``record`` as
    ``request`` says, into ``result``; under the guest's shared lock, which the caller holds."""
    if request.extracting and already_extracted(request, paths, result):
        return result
    workdir = tempfile.mkdtemp(prefix=f"file-restore-{record.manifest.vmid}-", dir=work_dir())
    try:
        disks = record.manifest.disks
        server = ThreadServer(os.path.join(workdir, 'nbd.sock'), idle_timeout=3600.0,
                              until_clients_gone=False)
        with fmt.open_block_exports(storage, record, [d.id for d in disks],
                                    server) as exports:
            # the appliance's view of each backup disk
            sources = [appliance.Source(d.id, exports[d.id].uri, exports[d.id].format,
                                        int(d.virtual_size)) for d in disks]
            built = appliance.image(log)
            if not request.extracting:
                return _list(request, result, built, workdir, sources, paths[0], log)
            if request.check_mode:
                return _measure(request, result, built, workdir, sources, paths, max_bytes, log)
            return _extract(request, result, built, workdir, sources, paths, max_bytes, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _boot(request, built, workdir, sources, payload, payload_bytes, op, paths, max_bytes, log):
    log(f"starting the file-restore appliance ({op} {', '.join('/' + p for p in paths)})")
    outcome = appliance.Appliance(built, workdir, sources, payload, payload_bytes,
                                  timeout=request.timeout, log=log).run(
        op, paths, filesystem=request.filesystem, max_bytes=max_bytes)
    _raise_for(outcome, request, max_bytes)
    return outcome


def _raise_for(outcome, request, max_bytes):
    if outcome.error is None:
        return
    kind, message = outcome.error
    found = ', '.join(f"{fs['name']} ({fs['type'] or 'unknown'})" for fs in outcome.filesystems) \
        or 'no block devices with data'
    if kind == 'not-found':
        fs = outcome.chosen['name'] if outcome.chosen else '?'
        raise PathNotFound(f"{message} is not in filesystem {fs} of the backup; list its "
                           "parent directory to see what is there")
    if kind == 'ambiguous':
        raise UnknownFilesystem(f"the backup holds {message}: {found}; set filesystem to the "
                                "one you mean")
    if kind == 'no-filesystem':
        raise UnknownFilesystem(f"the backup has no filesystem {message}; it has: {found}")
    if kind == 'unknown-filesystem':
        raise UnknownFilesystem(f"{message}; found: {found}")
    if kind == 'size-limit':
        raise SizeLimitExceeded(f"the paths asked for hold {message}, more than max_size "
                                f"({max_bytes} bytes); raise max_size or ask for less")
    if kind == 'mount':
        raise UnknownFilesystem(f"the appliance could not mount {message}")
    if kind == 'write':
        raise StorageError(f"writing the listing failed ({message}); is the file system of "
                           f"{work_dir()} full?")
    if kind == 'tar':
        # tar's words alone; an I/O error is a read of the backup or a write of the output
        hint = '' if 'I/O error' not in message else (
            "; an I/O error there is a failed read of the backup (run verify) or a failed "
            f"write beside {request.archive or request.dest} (is its file system full?)")
        raise FileRestoreError(f"tar in the file-restore appliance failed, so nothing was "
                               f"extracted: {message}{hint}")
    raise FileRestoreError(f"the file-restore appliance refused the request: {kind} {message}")


def _described(outcome, result):
    result.update(filesystems=outcome.filesystems,
                  filesystem=outcome.chosen['name'] if outcome.chosen else None,
                  filesystem_type=outcome.chosen['type'] if outcome.chosen else None,
                  warnings=result['warnings'] + list(outcome.warnings),
                  appliance_seconds=outcome.seconds,
                  appliance_accel=outcome.accel)
    return result


def _list(request, result, built, workdir, sources, path, log):
    payload = os.path.join(workdir, 'listing.raw')
    outcome = _boot(request, built, workdir, sources, payload, LIST_OUTPUT_BYTES, 'list', [path],
                    0, log)
    names_bytes, meta_bytes, links_bytes = (int(v) for v in outcome.result[1:4])
    with open(payload, 'rb') as handle:
        names = handle.read(names_bytes).split(b'\0')[:-1]
        meta = handle.read(meta_bytes).decode().splitlines()
        links = handle.read(links_bytes).split(b'\0')[:-1]
    if len(names) != len(meta):
        raise FileRestoreError(f"the appliance's listing is inconsistent ({len(names)} names, "
                               f"{len(meta)} entries)")
    targets = {links[i]: links[i + 1] for i in range(0, len(links) - 1, 2)}
    entries = []
    for raw_name, line in zip(names, meta):
        mode_hex, size, mtime, uid, gid = line.split()
        mode = int(mode_hex, 16)
        name = _text(raw_name[2:] if raw_name.startswith(b'./') else raw_name)
        entry = {'name': name, 'type': _kind(mode), 'size': int(size),
                 'mode': f"{stat.S_IMODE(mode):04o}", 'uid': int(uid), 'gid': int(gid),
                 'mtime': datetime.fromtimestamp(int(mtime), timezone.utc).isoformat()}
        if raw_name in targets:
            entry['target'] = _text(targets[raw_name])
        entries.append(entry)
    entries.sort(key=lambda e: e['name'])
    result.update(changed=False, entries=entries, path='/' + path)
    return _described(outcome, result)


def _text(raw):
    """A guest name as text: undecodable bytes are kept as surrogate escapes, shown as \\xNN."""
    return raw.decode('utf-8', 'backslashreplace')


def _kind(mode):
    for test, name in ((stat.S_ISDIR, 'directory'), (stat.S_ISREG, 'file'),
                       (stat.S_ISLNK, 'symlink'), (stat.S_ISBLK, 'block device'),
                       (stat.S_ISCHR, 'character device'), (stat.S_ISFIFO, 'fifo'),
                       (stat.S_ISSOCK, 'socket')):
        if test(mode):
            return name
    return 'unknown'


def already_extracted(request, paths, result):
    """Whether the extraction is done already (``result`` then says so): the archive exists,
    or every path is in dest. Only some of them in dest is refused, in check mode too.
    Decided before anything boots; ``overwrite`` makes every extraction run."""
    if request.overwrite:
        return False
    if request.archive:
        if not os.path.exists(request.archive):
            return False
        result.update(changed=False, archive=request.archive, exists=True,
                      msg=f"{request.archive} exists; set overwrite to extract it again")
        return True
    existing = [os.path.join(request.dest, p) for p in paths
                if p and os.path.lexists(os.path.join(request.dest, p))]
    if not existing:
        return False
    if len(existing) < len(paths):
        raise StorageError(f"{', '.join(existing)} exist(s) already; set overwrite to replace "
                           "them, or choose another dest (nothing was extracted)")
    result.update(changed=False, dest=request.dest, exists=existing,
                  msg="every path is in dest already; set overwrite to extract again")
    return True


def _measure(request, result, built, workdir, sources, paths, max_bytes, log):
    """Check mode: what would be extracted (the appliance runs; nothing is written)."""
    payload = os.path.join(workdir, 'measure.raw')
    outcome = _boot(request, built, workdir, sources, payload, 1 << 20, 'measure', paths,
                    max_bytes, log)
    files, size, entries = (int(v) for v in outcome.result[1:4])
    result.update(changed=True, files=files, bytes=size, entries_extracted=entries,
                  dest=request.dest, archive=request.archive)
    result['diff'] = extraction_diff(request, paths)
    return _described(outcome, result)


def _extract(request, result, built, workdir, sources, paths, max_bytes, log):
    started = time.monotonic()
    target_dir = os.path.dirname(request.archive) if request.archive else request.dest
    hidden = os.path.join(target_dir, f".guestvault-file-restore-{uuid.uuid4().hex[:12]}")
    payload = hidden + '.tar'
    try:
        with new_directory(target_dir):     # a failed extraction leaves no new directory
            outcome = _boot(request, built, workdir, sources, payload, max_bytes + TAR_SLACK,
                            'extract', paths, max_bytes, log)
            files, size, entries = (int(v) for v in outcome.result[1:4])
            tar_bytes = untrusted_tar.stream_length(payload)
            if request.archive:
                _keep_archive(payload, tar_bytes, request.archive)
                result.update(archive=request.archive, archive_bytes=tar_bytes)
            else:
                os.mkdir(hidden, 0o700)
                with open(payload, 'rb') as raw:
                    counts = untrusted_tar.extract(untrusted_tar.Bounded(raw, tar_bytes),
                                                   hidden, max_bytes=max_bytes)
                os.unlink(payload)
                warning = merge_extracted(hidden, request, counts, result)
                if warning:
                    outcome.warnings.append(warning)
            result.update(changed=True, files=files, bytes=size, entries_extracted=entries,
                          seconds=round(time.monotonic() - started, 2))
            result['diff'] = extraction_diff(request, paths)
            log(f"extracted {files} file(s), {size} bytes, from {result['backup']}")
            return _described(outcome, result)
    finally:
        for path in (payload, hidden):
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)


def merge_extracted(hidden, request, counts, result):
    """Move the extraction staged in ``hidden`` (untrusted_tar's ``counts``) into dest, refused
    where it would replace a file unless overwrite; ``result`` says what was written. Returns
    the warning for the members that were not extracted, or None."""
    clashes = untrusted_tar.conflicts(hidden, request.dest)
    if clashes and not request.overwrite:
        raise StorageError(f"{', '.join(clashes[:5])} exist(s) already; set overwrite to "
                           "replace them (nothing was extracted)")
    written = untrusted_tar.merge(hidden, request.dest)
    # not 'skipped': Ansible would report the whole task as skipped
    result.update(dest=request.dest, written=written, not_extracted=counts['not_extracted'],
                  replaced=clashes)
    if not counts['not_extracted']:
        return None
    return (f"{len(counts['not_extracted'])} device node(s) or FIFO(s) were not extracted: "
            + ', '.join(counts['not_extracted'][:5]))


def extraction_diff(request, paths):
    """--diff: the paths an extraction writes (or would)."""
    if request.archive:
        return {'before': '', 'after': ''.join(f"/{p}\n" for p in paths),
                'after_header': request.archive}
    return {'before': '', 'after': ''.join(os.path.join(request.dest, p) + '\n' for p in paths),
            'after_header': request.dest}


def _keep_archive(payload, length, archive):
    """The output disk becomes the tar file: cut to the stream, fsync'd, renamed."""
    with open(payload, 'r+b') as handle:
        handle.truncate(length)
        handle.flush()
        os.fsync(handle.fileno())
    os.rename(payload, archive)
    fd = os.open(os.path.dirname(archive) or '.', os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
