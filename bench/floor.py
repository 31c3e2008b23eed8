"""The floors of a datastore backup (issue 24, goals 1 and 2): the same work without the engine.

Both read a raw image (the same bytes a backup reads), only the chunks that intersect data (as the
backup: holes are skipped by ``SEEK_DATA``), on ``THREADS`` threads, each with its own descriptor
and reused 4 MiB buffer, chunks handed out in order:

- ``with_writes``: skip all-zero chunks (a memcmp), sha256, dedupe (a set), zstd level 1 kept when
  smaller, crc32, write the blob (a 12-byte header and the payload) to a new file in a store-like
  directory (256 prefix directories, made beforehand) on the same file system, then one
  ``syncfs``. What a backup into an empty datastore has to do, and nothing else: no NBD, no
  hidden name and rename, no index.
- ``read_sha256``: read, skip all-zero chunks, sha256. What an unchanged second full has to do.

Used by ``datastore_bench.py`` (on a raw copy of the guest's disk) and ``pipeline_bench.py`` (on
its raw image), each timing these in the same run as the engine's backups.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
import time
import zlib

CHUNK = 4 << 20
THREADS = 2
_MAGIC = bytes(8)  # the floor's files are no real blobs; the header has a blob's size


def data_chunks(path, chunk=CHUNK):
    """Positions of the chunks of ``path`` that intersect data (not wholly a hole)."""
    size = os.path.getsize(path)
    positions = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break                               # ENXIO: only a hole up to the end
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            positions.update(range(start // chunk, (end - 1) // chunk + 1))
            offset = end
    finally:
        os.close(fd)
    return sorted(positions), size


def _syncfs(path):
    libc = ctypes.CDLL('libc.so.6', use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs of {path}")
    finally:
        os.close(fd)


def _run(path, work, threads=THREADS, chunk=CHUNK):
    """``work(fd, buffer view, position)`` for every data chunk of ``path`` on ``threads``."""
    positions, size = data_chunks(path, chunk)
    items = iter(positions)
    lock = threading.Lock()
    errors = []

    def main():
        fd = os.open(path, os.O_RDONLY)
        buffer = bytearray(chunk)
        try:
            while not errors:
                with lock:
                    position = next(items, None)
                if position is None:
                    return
                length = min(chunk, size - position * chunk)
                view = memoryview(buffer)[:length] if length != chunk else buffer
                if os.preadv(fd, [view], position * chunk) != length:
                    raise OSError(f"short read of {path} at chunk {position}")
                work(view, length)
        except BaseException as exc:  # pylint: disable=broad-except
            errors.append(exc)
        finally:
            os.close(fd)

    workers = [threading.Thread(target=main) for _number in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    return len(positions)


def with_writes(path, store_dir, threads=THREADS):
    """Seconds of the floor with writes (see the module); ``store_dir`` is made and removed."""
    import zstandard
    for number in range(256):
        os.makedirs(os.path.join(store_dir, f"{number:02x}"))
    seen = set()
    lock = threading.Lock()
    zeros = bytes(CHUNK)
    local = threading.local()

    def work(data, length):
        if data == (zeros if length == CHUNK else bytes(length)):
            return
        digest = hashlib.sha256(data).digest()
        with lock:
            if digest in seen:
                return
            seen.add(digest)
        compressor = getattr(local, 'compressor', None)
        if compressor is None:
            compressor = local.compressor = zstandard.ZstdCompressor(level=1)
        packed = compressor.compress(data)
        payload = packed if len(packed) < length else data
        header = _MAGIC + zlib.crc32(payload).to_bytes(4, 'little')
        name = digest.hex()
        fd = os.open(os.path.join(store_dir, name[:2], name),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.writev(fd, [header, payload])
        finally:
            os.close(fd)

    started = time.monotonic()
    _run(path, work, threads)
    _syncfs(store_dir)
    seconds = time.monotonic() - started
    shutil.rmtree(store_dir)
    return seconds


def read_sha256(path, threads=THREADS):
    """Seconds of the read + sha256 floor (see the module)."""
    zeros = bytes(CHUNK)

    def work(data, length):
        if data != (zeros if length == CHUNK else bytes(length)):
            hashlib.sha256(data).digest()

    started = time.monotonic()
    _run(path, work, threads)
    return time.monotonic() - started


def raw_copy(image, target):
    """A sparse raw copy of a (qcow2) disk image, made once, untimed: the floors' input."""
    subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw', image, target], check=True)
    return target
