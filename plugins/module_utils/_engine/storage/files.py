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
        return hashlib.file_digest(handle, 'sha256').hexdigest()


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
