"""Restore one disk of a datastore snapshot into an image file: raw (sparse) or qcow2.

Every chunk the index names is read from the store, its CRC checked, decrypted, decompressed and
its digest compared before a byte of it reaches the target; a chunk whose digest is the zero
chunk's (of its length, keyed when encrypted) is not read at all and stays a hole.

- raw: the target is created (replacing what is there, as ``qemu-img convert`` does),
  ``ftruncate``d to the image size, filled with ``pwrite`` of the non-zero chunks on ``workers``
  threads, then fsynced: a thin raw image.
- qcow2: the raw restore above into a hidden sparse file beside the target, then ``qemu-img
  convert -W`` of it into the new qcow2 (holes stay unallocated), which is fsynced; the raw file
  is removed. Writing the qcow2 through ``qemu-nbd`` and libnbd instead is not offered yet:
  ``python3-libnbd`` is not importable here, and a file system copy of already checked data costs
  less than the decode in front of it.

An error is ``CorruptData`` (or ``EncryptionKeyError``) naming ``what`` (the snapshot and disk),
the chunk's offset and its digest; a failed restore removes its partial target.
"""
from __future__ import annotations

import os
import threading
import time

from ..errors import CorruptData, StorageError
from ..storage.files import DirectFiles
from ..format import qemu_img
from .blob import decode_blob
from .crypt import chunk_digest
from .workers import RateLimiter, run_parallel

TARGET_FORMATS = ('raw', 'qcow2')


def zero_digests(index, crypt):
    """``{digest: length}`` of the zero chunks an index can name (full and short last chunk)."""
    lengths = {end - start for start, end in (index.chunk_range(0),
                                              index.chunk_range(index.count - 1))}
    return {chunk_digest(bytes(length), crypt): length for length in lengths}


def chunk_name(what, offset, digest):
    return f"{what}: the chunk at offset {offset} ({bytes(digest).hex()})"


def load_chunk(chunks, digest, crypt, name, size):
    """The checked data of one chunk; ``CorruptData`` naming ``name`` when it is missing or
    damaged, ``EncryptionKeyError`` when it cannot be decrypted."""
    try:
        raw = chunks.read_view(digest)
    except CorruptData:
        raise CorruptData(f"{name} is missing from {chunks.where}") from None
    except OSError as exc:
        raise StorageError(f"{name} cannot be read: {exc.strerror or exc}") from None
    return decode_blob(raw, crypt, digest, name=name, size=size)


SPARSE_BLOCK = 4096
_ZERO_BLOCK = bytes(SPARSE_BLOCK)


def write_sparse(fd, data, offset, write):
    """``write(fd, run, offset)`` the runs of ``data`` (bytes) that are not all-zero 4 KiB
    blocks, so a restored image stays thin inside a chunk too (as ``qemu-img convert -S 4k``);
    the target must read as zeroes where nothing is written. Runs start on a 4 KiB boundary of
    ``offset``."""
    length = len(data)
    view = memoryview(data)
    start = None
    for block in range(0, length, SPARSE_BLOCK):
        zero = (data.startswith(_ZERO_BLOCK, block) if block + SPARSE_BLOCK <= length
                else not data[block:].strip(b'\0'))
        if zero:
            if start is not None:
                write(fd, view[start:block], offset + start)
                start = None
        elif start is None:
            start = block
    if start is not None:
        write(fd, view[start:], offset + start)


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def restore_raw(index, chunks, target_path, *, crypt=None, workers=2, bwlimit=0, progress=None,
                what='drive-virtio0', staging=False):
    """Write the image of ``index`` into a new sparse raw file; the counts of what was done.

    ``staging``: the file is only read once by ``qemu-img convert`` (which finds zero blocks
    itself) and then removed, so whole chunks are written and nothing is fsynced."""
    zeros = zero_digests(index, crypt)
    stats = {'read_chunks': 0, 'read_bytes': 0, 'zero_chunks': 0}
    lock = threading.Lock()
    done = [0]
    limiter = RateLimiter(bwlimit)
    todo = []
    for position, offset, length, digest in index:
        if zeros.get(digest) == length:
            stats['zero_chunks'] += 1
            done[0] += length
        else:
            todo.append((position, offset, length, digest))
    # A restored image (or the staging file qemu-img convert reads once) is written past the page
    # cache: filling it would cost CPU and push out what the host caches
    files = DirectFiles()
    fd, direct = files.open_for_writing(target_path, os.O_CREAT | os.O_TRUNC)

    def write(fd, data, offset):
        files.pwrite(fd, data, offset, direct)

    try:
        os.ftruncate(fd, index.size)
        if progress is not None:
            progress(done[0], index.size)

        def work(_state, item):
            _position, offset, length, digest = item
            data = load_chunk(chunks, digest, crypt, chunk_name(what, offset, digest), length)
            limiter.take(length)
            if staging:
                write(fd, data, offset)
            else:
                write_sparse(fd, data, offset, write)
            with lock:
                stats['read_chunks'] += 1
                stats['read_bytes'] += length
                done[0] += length
                if progress is not None:
                    progress(done[0], index.size)

        run_parallel(todo, workers, work)
        if direct:
            os.ftruncate(fd, index.size)     # the last chunk's padding
        if not staging:
            os.fsync(fd)
    finally:
        os.close(fd)
    if staging:
        stats['direct'] = direct
    return stats


def restore_disk_image(index, chunks, target_path, target_format='raw', *, crypt=None, workers=2,
                       bwlimit=0, progress=None, what='drive-virtio0'):
    """Restore the disk of ``index`` (an ``Index``: a ``FixedIndex`` in practice) from the store ``chunks`` into
    ``target_path`` as ``target_format`` ('raw' or 'qcow2').

    ``bwlimit`` is in KiB/s of chunk data restored; ``progress(done_bytes, total_bytes)`` is
    called from the worker threads. Returns ``{size, chunks, read_chunks, read_bytes, zero_chunks,
    target_format, method, duration}``; ``method`` is 'sparse-raw' or 'raw+convert'.
    """
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"target_format {target_format!r}: one of {', '.join(TARGET_FORMATS)}")
    started = time.monotonic()
    options = {'crypt': crypt, 'workers': workers, 'bwlimit': bwlimit, 'progress': progress,
               'what': what}
    target_path = os.fspath(target_path)
    folder, name = os.path.split(target_path)
    staging = (os.path.join(folder, f".{name}.{os.getpid()}.raw.tmp")
               if target_format == 'qcow2' else None)
    try:
        if staging is None:
            stats = restore_raw(index, chunks, target_path, **options)
            method = 'sparse-raw'
        else:
            stats = restore_raw(index, chunks, staging, staging=True, **options)
            _remove(target_path)
            qemu_img.convert_raw(staging, target_path, 'qcow2', direct=stats.pop('direct'))
            fd = os.open(target_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            method = 'raw+convert'
    except BaseException as exc:
        _remove(target_path)
        if staging is not None:
            _remove(staging)
        if isinstance(exc, OSError):
            raise StorageError(f"{what}: cannot restore into {target_path}: "
                               f"{exc.strerror or exc}") from None
        raise
    if staging is not None:
        _remove(staging)
    return dict(stats, size=index.size, chunks=index.count, target_format=target_format,
                method=method, duration=round(time.monotonic() - started, 3))
