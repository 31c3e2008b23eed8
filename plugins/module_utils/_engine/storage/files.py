"""Durable file writes: what every writer in the engine uses so a crash never leaves half a file.

A file is written under a temporary name, fsynced and renamed; its directory is fsynced after the
rename so the new name survives a power cut too.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path):
    """sha256 of a file, as manifests record it."""
    with open(path, 'rb', buffering=0) as handle:
        if hasattr(hashlib, 'file_digest'):  # Python 3.11+: no copy through Python objects
            return hashlib.file_digest(handle, 'sha256').hexdigest()
        digest = hashlib.sha256()
        for block in iter(lambda: handle.read(8 << 20), b''):
            digest.update(block)
        return digest.hexdigest()


def write_file_hidden(path, data, durable=True, mode=0o666, exclusive=False):
    """Write bytes to ``path`` through a hidden temporary file beside it, then rename.

    The temporary name (``.<name>.<pid>.<random>.tmp``) is unique per call, so threads and
    processes writing the same path never share one, and listings that skip dot files (or, in a
    chunk store, names that are not a digest) never see a half-written file. ``durable`` fsyncs the
    file before the rename and the directory after it. ``exclusive`` never replaces: the file is
    linked into place and ``FileExistsError`` is raised when ``path`` already exists.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(6).hex()}.tmp")
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
