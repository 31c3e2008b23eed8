"""Reading vzdump archives, ours and Proxmox VE's. Nothing in an archive is trusted: names are
never used as host paths here (``restore/archive_files.py`` extracts single files through
``restore/untrusted_tar``), the configuration read is size-limited, and a container restore
runs GNU tar with ``pct restore``'s own flags (under the id map for an unprivileged target).

A source is a path (its compression from its name, else from its first bytes) or a binary
stream, e.g. standard input for ``-`` (always told by its first bytes).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass

from ...errors import ArchiveError, CorruptData
from ...storage import vzdump_names
from .pipes import (COMMON_TAR_FLAGS, SNIFF_BYTES, Pipeline, decompressor, mapped_root, sniff,
                    totals, userns_command)
from .writer import CONF_DIR, LXC_CONF, PCT_CONF

CONFIG_LIMIT = 1 << 20          # a pct.conf or LXC config larger than this is refused
_TYPES = {tarfile.REGTYPE: 'file', tarfile.AREGTYPE: 'file', tarfile.CONTTYPE: 'file',
          tarfile.GNUTYPE_SPARSE: 'file', tarfile.DIRTYPE: 'dir', tarfile.SYMTYPE: 'symlink',
          tarfile.LNKTYPE: 'hardlink', tarfile.CHRTYPE: 'chardev', tarfile.BLKTYPE: 'blockdev',
          tarfile.FIFOTYPE: 'fifo'}


@dataclass
class ArchiveConfig:
    pct_conf: str           # ./etc/vzdump/pct.conf
    lxc_config: str         # ./etc/vzdump/lxc.conf (guestvault's), None in PVE's archives


def _compression_of_name(path):
    parsed = vzdump_names.parse(os.path.basename(path))
    return (True, parsed.compression) if parsed else (False, None)


@contextmanager
def tar_stream(source, bwlimit_kib=0, whole=True):
    """A binary file object of the plain tar in ``source`` (decompressed). ``whole``: the
    caller reads it to its end, so a decompressor's error is raised on leaving; otherwise a
    decompressor that ends early because the caller stopped is not an error."""
    pipeline = Pipeline()
    feed, head = _input(source, pipeline, bwlimit_kib)
    try:
        if isinstance(feed, int):       # a pipe the pump fills
            out = os.fdopen(feed, 'rb')
        else:
            out = feed
        compression = head
        command = decompressor(compression)
        if command:
            proc = pipeline.start(command[0], command, out, subprocess.PIPE)
            out.close()
            out = proc.stdout
        try:
            yield out
            if whole:   # a tar reader stops at its end marker; the rest is record padding
                for _block in iter(lambda: out.read(1 << 20), b''):
                    pass
        finally:
            out.close()
        pipeline.finish(ignore=() if whole else {'pump', command[0] if command else ''})
    except BaseException:
        pipeline.abort()
        raise


def _input(source, pipeline, bwlimit_kib):
    """``(what the first stage reads: an open file or a pipe's read end, compression)``."""
    if isinstance(source, str):
        named, compression = _compression_of_name(source)
        try:
            handle = open(source, 'rb')
        except OSError as exc:
            raise ArchiveError(f"cannot open the archive {source}: {exc.strerror}") from None
        if not named:
            compression = sniff(handle.read(SNIFF_BYTES))
            handle.seek(0)
        if not bwlimit_kib:
            return handle, compression
        read, head = handle.read, b''
    else:
        read = source.read
        head = _read_exactly(read, SNIFF_BYTES)
        compression = sniff(head)
        handle = None
    read_end, write_end = os.pipe()
    pipeline.pump(read, write_end, bwlimit_kib, head=head)
    return read_end, compression


def _read_exactly(read, count):
    data = b''
    while len(data) < count:
        more = read(count - len(data))
        if not more:
            break
        data += more
    return data


def read_config(source, limit=CONFIG_LIMIT):
    """The configuration in an archive: ``./etc/vzdump/pct.conf`` (the first one, as
    pve-storage's ``extract_vzdump_config_tar`` stops at the first match) and guestvault's
    ``./etc/vzdump/lxc.conf`` when it comes with it. CorruptData when there is no pct.conf,
    it is not a file, or either is larger than ``limit``."""
    found = {}
    with tar_stream(source, whole=False) as stream:
        try:
            with tarfile.open(fileobj=stream, mode='r|') as archive:
                for member in archive:
                    key = {PCT_CONF: 'pct', LXC_CONF: 'lxc'}.get(_dotted(member.name))
                    if key and key not in found:
                        found[key] = _config_text(archive, member, limit)
                    elif 'pct' in found and not _dotted(member.name).startswith(CONF_DIR + '/'):
                        break       # guestvault writes its config members first, together
        except tarfile.TarError as exc:
            if 'pct' not in found:
                raise CorruptData(f"the archive is not a readable tar ({exc}); it is damaged "
                                  "or not a vzdump archive") from None
    if 'pct' not in found:
        raise CorruptData("the archive holds no ./etc/vzdump/pct.conf: it is not a container "
                          "backup made by vzdump (or guestvault)")
    return ArchiveConfig(found['pct'], found.get('lxc'))


def _dotted(name):
    return name if name.startswith('./') else './' + name.lstrip('/')


def _config_text(archive, member, limit):
    if not member.isreg():
        raise CorruptData(f"the archive's {member.name} is not a regular file; the archive is "
                          "damaged or hostile")
    if member.size > limit:
        raise CorruptData(f"the archive's {member.name} claims {member.size} bytes, more than "
                          f"the {limit} a configuration may have; the archive is damaged or "
                          "hostile")
    return archive.extractfile(member).read(limit + 1).decode('utf-8', 'replace')


def describe(member):
    """One member as file_restore lists it: its path in the container (``/etc/hostname``)."""
    name = '/' + '/'.join(p for p in member.name.split('/') if p not in ('', '.'))
    return {'path': name, 'type': _TYPES.get(member.type, 'other'), 'size': member.size,
            'mode': member.mode & 0o7777, 'uid': member.uid, 'gid': member.gid,
            'mtime': member.mtime,
            'link': member.linkname if member.issym() or member.islnk() else None}


def list_members(source, path='/', recursive=False):
    """The members at and below ``path`` in the container (``/``: the root's children):
    ``path`` itself when it is not a directory, else its children (every member below it with
    ``recursive``). Names are shown as the archive has them; nothing is written."""
    wanted = '/' + path.strip('/') if path.strip('/') else '/'
    found = []
    with tar_stream(source) as stream:
        try:
            with tarfile.open(fileobj=stream, mode='r|') as archive:
                for member in archive:
                    entry = describe(member)
                    name = entry['path']
                    parent = name.rsplit('/', 1)[0] or '/'
                    below = name != wanted and name.startswith(wanted.rstrip('/') + '/')
                    if (name == wanted and entry['type'] != 'dir') or \
                            (below and (recursive or parent == wanted)):
                        found.append(entry)
        except tarfile.TarError as exc:
            raise CorruptData(f"the archive is damaged or truncated ({exc})") from None
    return found


def verify_archive(path):
    """Problems found reading the archive through (decompression and every tar header and
    data block), as lines; ``[]`` when it reads to its end."""
    name = os.path.basename(path)
    parsed = vzdump_names.parse(name)
    problems = []
    try:
        with tar_stream(path) as stream:
            try:
                if parsed and parsed.format == 'vma':
                    for _block in iter(lambda: stream.read(1 << 20), b''):
                        pass
                    return []
                with tarfile.open(fileobj=stream, mode='r|') as archive:
                    first = None
                    for member in archive:
                        first = first or _dotted(member.name)
                if first != PCT_CONF:
                    problems.append(f"{name}: its first member is {first!r}, not {PCT_CONF}: "
                                    "pct restore and pve-storage find no configuration in it")
            except tarfile.TarError as exc:
                problems.append(f"{name}: the tar stream is damaged or truncated ({exc})")
                for _block in iter(lambda: stream.read(1 << 20), b''):
                    pass     # to its end: the decompressor's own verdict comes first
    except (ArchiveError, CorruptData) as exc:
        problems.insert(0, f"{name}: {exc}")
    return problems


def extract_rootfs(source, dest, id_map=(), bwlimit_kib=0, log=None):
    """Extract a container archive into ``dest`` (its root directory) as ``pct restore``
    does: ``tar xpf - --totals <PVE's flags> -C dest --skip-old-files --anchored --exclude
    './dev/*'``, under ``lxc-usernsexec`` for an unprivileged target (``dest`` is chowned to
    the mapped root first), then ``etc/vzdump/`` is removed from it. Returns the bytes tar
    read."""
    log = log or (lambda line: None)
    uid, gid = mapped_root(id_map)
    if uid is not None:
        os.chown(dest, uid, gid if gid is not None else uid)
    argv = userns_command(id_map) + ['tar', 'xpf', '-', '--totals', *COMMON_TAR_FLAGS,
                                     '-C', dest, '--skip-old-files', '--anchored',
                                     '--exclude', './dev/*']
    with tar_stream(source, bwlimit_kib) as stream:
        pipeline = Pipeline()
        # The directories tar makes for members whose parents come later (./etc for the
        # archive's first member, ./etc/vzdump/pct.conf) keep the mode the umask gives them,
        # as --skip-old-files leaves an existing directory's mode: root's usual umask, under
        # which pct restore runs, not the caller's (a private 077 made /etc 0700).
        pipeline.start('tar', argv, stream, subprocess.DEVNULL, umask=0o022)
        pipeline.finish()
    _remove_conf_dir(dest, log)
    return totals(pipeline.tar_stderr) or 0


def _remove_conf_dir(dest, log):
    """``etc/vzdump`` goes, as pct restore deletes its files; never through a symbolic link
    the archive made (``etc`` or ``etc/vzdump`` as a link is left, with a line in the log)."""
    etc = os.path.join(dest, 'etc')
    conf = os.path.join(etc, 'vzdump')
    for path in (etc, conf):
        if os.path.islink(path):
            log(f"WARN: {path} is a symbolic link in the archive; etc/vzdump was not removed")
            return
    if os.path.isdir(conf):
        shutil.rmtree(conf)
