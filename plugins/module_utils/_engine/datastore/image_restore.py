"""Restore one disk of a datastore snapshot into an image file: raw (sparse) or qcow2.

Every chunk the index names is read from the store, decrypted, decompressed and its digest
compared before a byte of it reaches the target (its CRC32 only when a check fails, to say whether
the file is damaged); a chunk whose digest is the zero chunk's (of its length, keyed when
encrypted) is not read at all and stays a hole.

- raw: the target is created (replacing what is there, as ``qemu-img convert`` does),
  ``ftruncate``d to the image size, filled with ``O_DIRECT`` ``pwrite`` of the non-zero 4 KiB
  blocks of the chunks by reader, decoder and writer threads (``_restore_chunks``), then
  fsynced: a thin raw image.
- qcow2: the raw restore above into a hidden sparse file beside the target, then ``qemu-img
  convert -W`` of it into the new qcow2 (holes stay unallocated), which is fsynced; the raw file
  is removed. Writing the qcow2 through ``qemu-nbd`` and libnbd instead is not offered yet:
  ``python3-libnbd`` is not importable here, and a file system copy of already checked data costs
  less than the decode in front of it.

An error is ``CorruptData`` (or ``EncryptionKeyError``) naming ``what`` (the snapshot and disk),
the chunk's offset and its digest; a failed restore removes its partial target.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
import time

from ..errors import CorruptData, EncryptionKeyError, StorageError
from ..storage.files import DIRECT_ALIGNMENT, DirectFiles
from ..format import qemu_img
from .blob import decode_blob, verify_crc
from .crypt import chunk_digest
from .file_formats import ENCRYPTED_BLOB_HEADER_SIZE
from .workers import RateLimiter, Stages

TARGET_FORMATS = ('raw', 'qcow2')


def zero_digests(index, crypt):
    """``{digest: length}`` of the zero chunks an index can name (full and short last chunk)."""
    lengths = {end - start for start, end in (index.chunk_range(0),
                                              index.chunk_range(index.count - 1))}
    return {chunk_digest(bytes(length), crypt): length for length in lengths}


def chunk_name(what, offset, digest):
    return f"{what}: the chunk at offset {offset} ({bytes(digest).hex()})"


def decode_chunk(raw, crypt, digest, name, size, into=None):
    """``decode_blob`` of a chunk with its digest checked but not its CRC32: the digest proves
    every byte, as in PBS's restore, which skips the CRC too. When a check fails, the CRC tells
    whether the file is damaged (``CorruptData`` saying so) or the data was wrong as written."""
    try:
        return decode_blob(raw, crypt, digest, name=name, size=size, check_crc=False, into=into)
    except (CorruptData, EncryptionKeyError):
        verify_crc(raw, name)
        raise


def read_blob(chunks, digest, name, buffer=None):
    """The raw blob of a chunk: a view of ``buffer`` where the store reads into one
    (``read_into``), else its own bytes (an object store's answer); ``CorruptData`` naming
    ``name`` when it is missing, ``StorageError`` when it cannot be read. Without ``buffer``, a
    ``read_view`` valid until this thread's next read."""
    try:
        if buffer is None:
            return chunks.read_view(digest)
        into = getattr(chunks, 'read_into', None)
        return into(digest, buffer) if into is not None else chunks.read(digest)
    except CorruptData as exc:
        if buffer is not None and chunks.contains(digest):     # there, but too large
            raise CorruptData(f"{name}: {exc}") from None
        raise CorruptData(f"{name} is missing from {chunks.where}") from None
    except OSError as exc:
        raise StorageError(f"{name} cannot be read: {exc.strerror or exc}") from None


def load_chunk(chunks, digest, crypt, name, size):
    """The checked data of one chunk; ``CorruptData`` naming ``name`` when it is missing or
    damaged, ``EncryptionKeyError`` when it cannot be decrypted."""
    return decode_chunk(read_blob(chunks, digest, name), crypt, digest, name, size)


SPARSE_BLOCK = DIRECT_ALIGNMENT
_ZERO_PROBE = bytes(64)
# the longest span of zeroes compared in one search (a multiple of SPARSE_BLOCK)
_ZERO_SPAN = memoryview(bytes(64 * SPARSE_BLOCK))


def _all_zero(data, start, end):
    """Whether ``data[start:end]`` (at most ``_ZERO_SPAN`` long) is all zero: one C-level
    compare, no copy."""
    return data.find(_ZERO_SPAN[:end - start], start, end) == start


def _zero_run_end(data, block, whole):
    """The end of the run of all-zero blocks from ``block`` on (``block`` itself when it holds
    data), ``whole`` at most. Spans of 1, 2, 4... blocks (up to ``_ZERO_SPAN``) are compared at
    once while they are zero, then the first span that is not is halved down to its first block
    with data: a few searches per run, where a Python step per block cost 0.5 ms on a 4 MiB
    chunk that is mostly zeroes (most chunks of a disk with scattered writes)."""
    end, step = block, SPARSE_BLOCK
    while end < whole:
        span = min(step, whole - end)
        if not _all_zero(data, end, end + span):
            break
        end += span
        step = min(2 * step, len(_ZERO_SPAN))
    else:
        return whole
    while span > SPARSE_BLOCK:          # data in [end, end + span): find its first block
        half = span // SPARSE_BLOCK // 2 * SPARSE_BLOCK
        if _all_zero(data, end, end + half):
            end += half
            span -= half
        else:
            span = half
    return end


def zero_runs(data, length):
    """``(start, end)`` of the runs of all-zero ``SPARSE_BLOCK``s of ``data[:length]`` (a short
    last block included). One C-level search for 64 zero bytes skips data without any (most
    chunks that are stored hold none); where it finds some, ``_zero_run_end`` measures the run
    from the next block boundary on."""
    whole = length - length % SPARSE_BLOCK
    position = 0
    while position < whole:
        found = data.find(_ZERO_PROBE, position, whole)
        if found < 0:
            break
        # an all-zero block at or after ``position`` starts at or after this boundary
        block = -(-found // SPARSE_BLOCK) * SPARSE_BLOCK
        end = _zero_run_end(data, block, whole)
        if end > block:
            yield block, end
        position = end + 1              # the block at ``end`` holds data (or is the end)
    if whole < length and not data[whole:length].strip(b'\0'):
        yield whole, length


def data_runs(data, length):
    """``(start, end)`` of the runs of ``data[:length]`` that are not all-zero 4 KiB blocks, so a
    restored image stays thin inside a chunk too (as ``qemu-img convert -S 4k``); the target must
    read as zeroes where nothing is written. Runs start on a 4 KiB boundary."""
    start = 0
    for zero_start, zero_end in zero_runs(data, length):
        if zero_start > start:
            yield start, zero_start
        start = zero_end
    if start < length:
        yield start, length


def _remove(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# Chunk files a restore reads at once (at least one per worker). Each O_DIRECT read waits on the
# disk, and most blobs of a used disk are small (a partly written chunk, compressed: a few
# hundred KiB), so reading them is bound by the disk's latency, not its bandwidth: the 0.9 GiB
# of chunks of restore_bench's 4 GiB disk took 2.5-3.7 s with 4 reads in flight, 1.25-1.5 s
# with 16. A reader thread waits without holding a core.
READS_IN_FLIGHT = 16


def reader_count(workers):
    return max(workers, READS_IN_FLIGHT)


def buffer_counts(workers):
    """``(blob buffers, data buffers)`` a restore on ``workers`` threads has: one per thread that
    holds one (readers and decoders; decoders and writers), and one queued. A blob buffer only
    takes memory for the pages a blob filled (an ``mmap`` is allocated as it is written)."""
    return reader_count(workers) + workers + 1, 2 * workers + 1


def _aligned(length):
    return -(-length // DIRECT_ALIGNMENT) * DIRECT_ALIGNMENT


def _restore_chunks(todo, chunks, crypt, what, workers, limiter, write, report):
    """Read, decode and write the chunks ``todo`` (``(position, offset, length, digest)``).

    Three kinds of threads, so no core waits on another's I/O (as the backup, issue 24):
    ``reader_count(workers)`` readers (reads in flight: a disk's latency, an object store's
    requests) read each blob into a buffer under the ``limiter``; ``workers`` decoders decrypt,
    decompress into a data buffer and check the digest; ``workers`` writers ``write(buffer,
    offset, length)`` it, then ``report(length)``. Before, each thread read, decoded and wrote in
    turn. Buffers are page-aligned ``mmap``s, ``buffer_counts(workers)``, reused: a chunk is read
    into one (no copy where the store reads into it) and decompressed into another that is
    written with ``O_DIRECT`` as it is. The first error stops all threads and is raised."""
    workers = max(1, int(workers or 1))
    largest = max(length for _position, _offset, length, _digest in todo)
    blobs, datas = queue.Queue(), queue.Queue()
    blob_count, data_count = buffer_counts(workers)
    for _number in range(blob_count):
        blobs.put(mmap.mmap(-1, _aligned(largest + ENCRYPTED_BLOB_HEADER_SIZE)))
    for _number in range(data_count):
        datas.put(mmap.mmap(-1, _aligned(largest)))
    decoding, writing = queue.Queue(), queue.Queue()    # bounded by the buffers
    items = iter(todo)
    lock = threading.Lock()
    stages = Stages()

    def read_all():
        while True:
            with lock:
                item = next(items, None)
            if item is None:
                return
            buffer = stages.get(blobs)
            _position, offset, length, digest = item
            limiter.take(length)
            raw = read_blob(chunks, digest, chunk_name(what, offset, digest), buffer)
            stages.put(decoding, (offset, length, digest, raw, buffer))

    def decode_all():
        while True:
            item = stages.get(decoding)
            if item is None:
                return
            offset, length, digest, raw, blob_buffer = item
            buffer = stages.get(datas)
            decode_chunk(raw, crypt, digest, chunk_name(what, offset, digest), length,
                         into=buffer)
            blobs.put(blob_buffer)
            stages.put(writing, (offset, length, buffer))

    def write_all():
        while True:
            item = stages.get(writing)
            if item is None:
                return
            offset, length, buffer = item
            write(buffer, offset, length)
            datas.put(buffer)
            report(length)

    stages.start_many('restore-reader', reader_count(workers), read_all,
                      then=(decoding, workers))
    stages.start_many('restore-decoder', workers, decode_all, then=(writing, workers))
    stages.start_many('restore-writer', workers, write_all)
    stages.join()


def restore_raw(index, chunks, target_path, *, crypt=None, workers=2, bwlimit=0, progress=None,
                what='drive-virtio0', staging=False):
    """Write the image of ``index`` into a new sparse raw file; the counts of what was done.

    ``staging``: the file is only read once by ``qemu-img convert`` (which finds zero blocks
    itself) and then removed, so whole chunks are written and nothing is fsynced."""
    zeros = zero_digests(index, crypt)
    stats = {'read_chunks': 0, 'read_bytes': 0, 'zero_chunks': 0}
    lock = threading.Lock()
    done = [0]
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

    def write(buffer, offset, length):
        view = memoryview(buffer)
        for start, end in ([(0, length)] if staging else data_runs(buffer, length)):
            if direct and end % DIRECT_ALIGNMENT:       # the last chunk's end: pad it
                padded = _aligned(end)
                view[end:padded] = bytes(padded - end)
                end = padded
            # the buffer is page-aligned and every run starts on a block: written as it is,
            # not through DirectFiles' scratch copy
            files.pwrite(fd, view[start:end], offset + start, direct=False)

    def report(length):
        with lock:
            stats['read_chunks'] += 1
            stats['read_bytes'] += length
            done[0] += length
            if progress is not None:
                progress(done[0], index.size)

    try:
        os.ftruncate(fd, index.size)
        if progress is not None:
            progress(done[0], index.size)
        if todo:
            _restore_chunks(todo, chunks, crypt, what, workers, RateLimiter(bwlimit), write,
                            report)
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
