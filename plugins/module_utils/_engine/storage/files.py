"""Durable file writes: what every writer in the engine uses so a crash never leaves half a file.

A file is written under a temporary name, fsynced and renamed; its directory is fsynced after the
rename so the new name survives a power cut too.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def new_directory(path):
    """``os.makedirs(path)``; when the block fails, the directories this made are removed with
    what the block put in them, never a directory that existed before (a failed restore leaves
    the file system as it found it)."""
    top, probe = None, os.path.abspath(path)
    while not os.path.isdir(probe):
        top, probe = probe, os.path.dirname(probe)
    os.makedirs(path, exist_ok=True)
    try:
        yield
    except BaseException:
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise


def sha256_file(path):
    """sha256 of a file, as manifests record it."""
    with open(path, 'rb', buffering=0) as handle:
        if hasattr(hashlib, 'file_digest'):  # Python 3.11+: no copy through Python objects
            return hashlib.file_digest(handle, 'sha256').hexdigest()
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(8 << 20), b''):
            digest.update(block)
        return digest.hexdigest()


def sha256_range(path, offset, length):
    """sha256 of ``length`` bytes of a file from ``offset`` (fewer where the file ends first).

    Reading and hashing both release the GIL, so threads hashing ranges of one file at once use
    as many cores."""
    digest = hashlib.sha256()
    # a 1 MiB buffer stays in the core's cache, where the hash reads it back (with 8 MiB the
    # overlapped hash of a qcow2 full took about 7 % more CPU)
    buffer = bytearray(min(length, 1 << 20) or 1)
    view = memoryview(buffer)
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
    try:
        while length > 0:
            got = os.preadv(fd, [view[:min(length, len(buffer))]], offset)
            if got <= 0:
                break
            digest.update(view[:got])
            offset += got
            length -= got
    finally:
        os.close(fd)
    return digest.hexdigest()


def write_file_hidden(path, data, durable=True, mode=0o666, exclusive=False):
    """Write bytes to ``path`` through a hidden temporary file beside it, then rename.

    The temporary name (``.<name>.<pid>.<random>.tmp``) is unique per call, so threads and
    processes writing the same path never share one, and listings that skip dot files (or, in a
    chunk store, names that are not a digest) never see a half-written file. ``durable`` fsyncs the
    file before the rename and the directory after it. ``exclusive`` never replaces: the file is
    linked into place and ``FileExistsError`` is raised when ``path`` already exists.
    """
    folder, tmp = _hidden_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_CLOEXEC', 0), mode)
    try:
        with os.fdopen(fd, 'wb') as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        if exclusive:
            _link_exclusive(tmp, path)
        else:
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        fsync_path(folder or '.')


def _hidden_name(path):
    folder, name = os.path.split(path)
    return folder, os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")


# O_DIRECT wants the memory, the length and the file offset aligned to the device's logical block
# (512 or 4096 bytes); the page size satisfies both.
DIRECT_ALIGNMENT = mmap.PAGESIZE


def _read_whole(fd, view, length, path):
    """``view[:length]`` filled from the start of ``fd`` (``view`` long enough for the aligned
    blocks an ``O_DIRECT`` read takes)."""
    done = 0
    while done < length:
        # O_DIRECT reads whole aligned blocks; the last one comes back short at the end
        got = os.preadv(fd, [view[done:]], done)
        if got <= 0:
            raise OSError(errno.EIO, f"{path} ended after {done} of {length} bytes")
        done += got
    return view[:length]


class DirectFiles:
    """Writes whole new files with ``O_DIRECT``, as ``write_file_hidden`` does otherwise, and
    reads whole files back the same way.

    The data goes to the disk without passing through the page cache. For a backup's chunks that
    costs far less CPU (on this kind of VM, filling page cache whose memory went back to the host
    costs ~2 s/GiB of kernel time), leaves the host's cache to its guests, and leaves a later
    ``sync_filesystem`` only metadata to flush. ``O_DIRECT`` needs aligned memory and lengths:
    each thread copies the data into a page-aligned scratch buffer of its own, the file is
    written padded to the alignment, then truncated to its length. A file read back is one
    request for the whole file, not the page cache's readahead-sized ones, which is what a cold
    chunk on a slow or remote disk needs. Where the file system refuses ``O_DIRECT`` (tmpfs on
    older kernels, some FUSE file systems) every later file goes through the page cache.
    """

    def __init__(self):
        self.direct = hasattr(os, 'O_DIRECT')
        self._local = threading.local()

    def _scratch(self, size):
        scratch = getattr(self._local, 'scratch', None)
        if scratch is None or len(scratch) < size:
            scratch = self._local.scratch = mmap.mmap(-1, size)
        return scratch

    def _open(self, path, flags, mode=0o600):
        """``(fd, direct)``: ``path`` opened with ``O_DIRECT`` while the file system takes it."""
        flags |= getattr(os, 'O_CLOEXEC', 0)
        if self.direct:
            try:
                return os.open(path, flags | os.O_DIRECT, mode), True
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self.direct = False
                # Linux refuses O_DIRECT only after an O_CREAT made the file: open it again
                flags &= ~os.O_EXCL
        return os.open(path, flags, mode), False

    def read_view(self, path):
        """The whole content of ``path`` as a view of this thread's scratch buffer, valid until
        the thread's next read (copy what must outlive it)."""
        fd, _direct = self._open(path, os.O_RDONLY)
        try:
            length = os.fstat(fd).st_size
            padded = -(-length // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
            view = memoryview(self._scratch(max(padded, DIRECT_ALIGNMENT)))[:padded]
            return _read_whole(fd, view, length, path)
        finally:
            os.close(fd)

    def read_into(self, path, buffer):
        """The whole content of ``path`` read into ``buffer`` (page-aligned and writable, such
        as an ``mmap``), as a view of it: for a reader whose buffers outlive the call, with no
        copy. ``OSError(EFBIG)`` when the file is longer than ``buffer``."""
        fd, _direct = self._open(path, os.O_RDONLY)
        try:
            length = os.fstat(fd).st_size
            view = memoryview(buffer)
            if length > len(view):
                raise OSError(errno.EFBIG, f"{length} bytes, more than the {len(view)} it is "
                                           "read into", path)
            return _read_whole(fd, view, length, path)
        finally:
            os.close(fd)

    def open_for_writing(self, path, flags, mode=0o600):
        """``os.open(path, O_WRONLY | flags)``, with ``O_DIRECT`` where the file system takes it;
        ``(fd, direct)``. Write a direct descriptor with ``pwrite`` only."""
        return self._open(path, flags | os.O_WRONLY, mode)

    def pwrite(self, fd, data, offset, direct=True):
        """Write all of ``data`` at ``offset`` (a multiple of the alignment when ``direct``).

        Direct, the data goes through this thread's aligned scratch buffer, zero-padded to the
        alignment: truncate the file to its size once everything is written."""
        view = memoryview(data)
        if direct:
            length = len(view)
            padded = -(-length // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT
            scratch = self._scratch(max(padded, DIRECT_ALIGNMENT))
            scratch[:length] = view
            scratch[length:padded] = bytes(padded - length)
            view = memoryview(scratch)[:padded]
        while view:
            written = os.pwrite(fd, view, offset)
            if written <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
            offset += written

    def write_hidden(self, path, data, durable=True, mode=0o666):
        folder, tmp = _hidden_name(path)
        fd, direct = self._open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            try:
                self.pwrite(fd, data, 0, direct)
                if direct:
                    os.ftruncate(fd, len(data))
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if not (direct and isinstance(exc, OSError) and exc.errno == errno.EINVAL):
                raise
            self.direct = False          # a block larger than the alignment, say
            write_file_hidden(path, data, durable=durable, mode=mode)
            return
        if durable:
            fsync_path(folder or '.')


def _link_exclusive(tmp, path):
    """Give ``tmp`` the name ``path`` unless that exists; ``tmp`` is gone afterwards."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        # a file system without hard links: check, then rename (not atomic against a rival)
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists") from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def write_file_atomic(path, data, mode=None):
    """Write bytes or text under a temporary name, fsync, rename: never a half-written file.
    ``mode`` sets the file's permissions (else the umask decides)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, 'wb' if isinstance(data, bytes) else 'w') as handle:
        if mode is not None:
            os.fchmod(handle.fileno(), mode)
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(path) or '.')


# Backups hold whole disks, so they are private whatever the caller's umask: directories 0700,
# files 0600. (vzdump leaves its archives to the umask, usually 0644 under a 0755 dump dir.)
PRIVATE_UMASK = 0o077


@contextmanager
def private_files():
    """Everything created inside (by the engine, qemu-img or a hook) is the owner's alone."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


_LIBC = None


def _libc():
    global _LIBC  # pylint: disable=global-statement
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6', use_errno=True)
        except OSError:
            _LIBC = False
    return _LIBC


def sync_filesystem(path):
    """Make everything written to the file system holding ``path`` durable: ``syncfs(2)`` on a
    descriptor of ``path`` (one flush instead of an fsync per file), else ``os.sync()``."""
    libc = _libc()
    syncfs = getattr(libc, 'syncfs', None) if libc else None
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs of {path}: {os.strerror(error)}")
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(path):
    """Start writing the dirty pages of ``path`` to its disk, without waiting for them
    (``sync_file_range(2)``, ``SYNC_FILE_RANGE_WRITE``), so that a later fsync finds little left
    to write. Only a hint: nothing is durable before that fsync. Does nothing where the call is
    missing or ``path`` does not exist (yet)."""
    libc = _libc()
    sync_file_range = getattr(libc, 'sync_file_range', None) if libc else None
    if sync_file_range is None:
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
    except OSError:
        return
    try:
        sync_file_range(fd, ctypes.c_int64(0), ctypes.c_int64(0),
                        ctypes.c_uint(_SYNC_FILE_RANGE_WRITE))
    finally:
        os.close(fd)


class _Timespec(ctypes.Structure):
    _fields_ = [('tv_sec', ctypes.c_long), ('tv_nsec', ctypes.c_long)]


_AT_FDCWD = -100
_AT_SYMLINK_NOFOLLOW = 0x100
_UTIME_NOW = (1 << 30) - 1
_UTIME_OMIT = (1 << 30) - 2
_TOUCH_TIMES = (_Timespec * 2)(_Timespec(0, _UTIME_NOW), _Timespec(0, _UTIME_OMIT))


def touch_atime(path):
    """Set the access time of ``path`` to now and leave its mtime, in one ``utimensat(2)`` (as
    garbage collection marks a chunk); False when the file does not exist."""
    libc = _libc()
    utimensat = getattr(libc, 'utimensat', None) if libc else None
    if utimensat is None or not sys.platform.startswith('linux'):
        try:
            mtime_ns = os.stat(path, follow_symlinks=False).st_mtime_ns
            os.utime(path, ns=(time.time_ns(), mtime_ns), follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True
    if utimensat(_AT_FDCWD, os.fsencode(path), _TOUCH_TIMES, _AT_SYMLINK_NOFOLLOW) == 0:
        return True
    error = ctypes.get_errno()
    if error == errno.ENOENT:
        return False
    raise OSError(error, os.strerror(error), path)
