"""The floors of a datastore backup (issue 24, goals 1 and 2): the same work without the engine.

Both read a raw image (the same bytes a backup reads), only the chunks that intersect data (as the
backup: holes are skipped by ``SEEK_DATA``), on ``THREADS`` threads, each with its own descriptor
and reused 4 MiB buffer, chunks handed out in order:

- ``with_writes``: skip all-zero chunks (a memcmp), sha256, dedupe (a set), zstd level 1 kept when
  smaller, crc32, write the blob (a 12-byte header and the payload) to a new file in a store-like
  directory (256 prefix directories, made beforehand) on the same file system with ``O_DIRECT``
  (as the engine: cheaper than the page cache here), then one ``syncfs``. What a backup into an
  empty datastore has to do, and nothing else: no NBD, no hidden name and rename, no index.
- ``read_sha256``: read, skip all-zero chunks, sha256. What an unchanged second full has to do.
- ``read_sha256_qemu``: the same, but each chunk read over NBD from the running guest's QEMU (an
  export of its disk node) by a plain libnbd reader in the engine's 2 MiB pieces: what reading a
  point in time that lives inside QEMU costs, with QEMU's serving on the same cores. A reference
  rather than a floor: the engine's one reader connection has come out faster than it.

Used by ``datastore_bench.py`` (on a raw copy of the guest's disk) and ``pipeline_bench.py`` (on
its raw image), each timing these in the same run as the engine's backups.
"""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import shutil
import subprocess
import threading
import time
import zlib

CHUNK = 4 << 20
THREADS = 2
_MAGIC = bytes(8)  # the floor's files are no real blobs; the header has a blob's size
HEADER = 12
PAGE = mmap.PAGESIZE


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


def _run(path, work, threads=THREADS, chunk=CHUNK, offset_in_buffer=0):
    """``work(view, length, buffer)`` for every data chunk of ``path`` on ``threads``; the chunk
    is read into a page-aligned buffer (an mmap) at ``offset_in_buffer``."""
    positions, size = data_chunks(path, chunk)
    items = iter(positions)
    lock = threading.Lock()
    errors = []

    def main():
        fd = os.open(path, os.O_RDONLY)
        buffer = mmap.mmap(-1, chunk + 2 * PAGE)
        try:
            while not errors:
                with lock:
                    position = next(items, None)
                if position is None:
                    return
                length = min(chunk, size - position * chunk)
                view = memoryview(buffer)[offset_in_buffer:offset_in_buffer + length]
                if os.preadv(fd, [view], position * chunk) != length:
                    raise OSError(f"short read of {path} at chunk {position}")
                work(view, length, buffer)
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
    """Seconds of the floor with writes (see the module); ``store_dir`` is made and removed.

    Blobs are written with ``O_DIRECT`` as the engine writes chunks (on this kind of VM far
    cheaper than filling the page cache), with as few copies as can be: the chunk is read right
    after room for the header, so a chunk that does not compress is written from where it was
    read; a compressed one is copied once, after its header, into a second aligned buffer."""
    import zstandard
    for number in range(256):
        os.makedirs(os.path.join(store_dir, f"{number:02x}"))
    seen = set()
    lock = threading.Lock()
    zeros = bytes(CHUNK)
    local = threading.local()

    def work(data, length, buffer):
        if data == (zeros if length == CHUNK else bytes(length)):
            return
        digest = hashlib.sha256(data).digest()
        with lock:
            if digest in seen:
                return
            seen.add(digest)
        if not hasattr(local, 'compressor'):
            local.compressor = zstandard.ZstdCompressor(level=1)
            local.packed = mmap.mmap(-1, CHUNK + 2 * PAGE)
        packed = local.compressor.compress(data)
        if len(packed) < length:
            buffer = local.packed
            buffer[HEADER:HEADER + len(packed)] = packed
            length = len(packed)
        buffer[:HEADER] = _MAGIC + zlib.crc32(memoryview(buffer)[HEADER:HEADER + length]) \
            .to_bytes(4, 'little')
        name = digest.hex()
        _write_direct(os.path.join(store_dir, name[:2], name), buffer, HEADER + length)

    started = time.monotonic()
    _run(path, work, threads, offset_in_buffer=HEADER)
    _syncfs(store_dir)
    seconds = time.monotonic() - started
    shutil.rmtree(store_dir)
    return seconds


def _write_direct(path, buffer, length):
    """A new file of ``buffer[:length]``, written with O_DIRECT (padded, then truncated)."""
    padded = -(-length // PAGE) * PAGE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    try:
        os.pwrite(fd, memoryview(buffer)[:padded], 0)
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def read_sha256(path, threads=THREADS):
    """Seconds of the read + sha256 floor (see the module)."""
    zeros = bytes(CHUNK)

    def work(data, length, _buffer):
        if data != (zeros if length == CHUNK else bytes(length)):
            hashlib.sha256(data).digest()

    started = time.monotonic()
    _run(path, work, threads)
    return time.monotonic() - started


def read_sha256_qemu(execute, node, positions, size, socket_path, threads=THREADS,
                     chunk=CHUNK):
    """Seconds of the read + sha256 floor over QEMU's NBD export of ``node`` (see the module):
    ``execute(command, **arguments)`` is a QMP command of the guest; ``positions`` and ``size``
    are ``data_chunks`` of a raw copy of the disk. The NBD server is started before the clock and
    stopped after it (a backup starts its own; QEMU runs one at a time)."""
    import nbd
    from guestvault_engine.guest.nbd import READ_PIECE as piece
    zeros = bytes(chunk)
    execute('nbd-server-start', addr={'type': 'unix', 'data': {'path': socket_path}})
    try:
        execute('block-export-add', type='nbd', id='floor', name='floor', **{'node-name': node})
        items = iter(positions)
        lock = threading.Lock()
        errors = []

        def main():
            # two chunks in flight per connection, as the engine's reader keeps them: QEMU
            # serves the next while this thread hashes the one before
            handle = nbd.NBD()
            handle.set_export_name('floor')
            handle.set_pread_initialize(False)
            handle.connect_unix(socket_path)
            buffers = [mmap.mmap(-1, chunk) for _number in range(2)]
            pending = []

            def start(buffer):
                with lock:
                    position = next(items, None)
                if position is None:
                    return
                length = min(chunk, size - position * chunk)
                view = memoryview(buffer)[:length]
                # in the engine's pieces: QEMU serves 2 MiB requests for a third of the CPU of
                # 4 MiB ones
                cookies = [handle.aio_pread(nbd.Buffer.from_buffer(view[start:start + piece]),
                                            position * chunk + start)
                           for start in range(0, length, piece)]
                pending.append((cookies, view, buffer))

            try:
                for buffer in buffers:
                    start(buffer)
                while pending and not errors:
                    cookies, view, buffer = pending.pop(0)
                    for cookie in cookies:
                        while not handle.aio_command_completed(cookie):
                            handle.poll(-1)
                    if view != (zeros if len(view) == chunk else bytes(len(view))):
                        hashlib.sha256(view).digest()
                    start(buffer)
            except BaseException as exc:  # pylint: disable=broad-except
                errors.append(exc)
            finally:
                handle.shutdown()

        started = time.monotonic()
        workers = [threading.Thread(target=main) for _number in range(threads)]
        for thread in workers:
            thread.start()
        for thread in workers:
            thread.join()
        seconds = time.monotonic() - started
        if errors:
            raise errors[0]
        execute('block-export-del', id='floor', mode='hard')
    finally:
        execute('nbd-server-stop')
    return seconds


def raw_copy(image, target):
    """A sparse raw copy of a (qcow2) disk image, made once, untimed: the floors' input."""
    subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw', image, target], check=True)
    return target


def in_turn(round_number, first, second):
    """``(first(), second())``, run back to back, the second first in odd rounds (the load
    changes; alternating spreads it over both)."""
    if round_number % 2:
        later = second()
        return first(), later
    earlier = first()
    return earlier, second()


def paired_ratio(times, floors):
    """The median of the rounds' ratios: each pair ran back to back, under the same load (on a
    shared machine the medians of the two series can come from rounds far apart)."""
    import statistics
    return statistics.median(time / floor for time, floor in zip(times, floors))


def record_rows(record, fulls, full2s, floors, read_floors, section='backup', qemu_floors=None):
    """The floors' rows and goals 1 and 2 of issue 24 in a bench's ``record`` table: the full's
    and the unchanged full's wall times (one per round) against the floors of the same rounds;
    with ``qemu_floors`` (``read_sha256_qemu``, same rounds) also the unchanged full against a
    plain reader of QEMU's NBD export (no goal: it shows what QEMU's serving adds)."""
    import statistics
    median = statistics.median

    def spread(values):
        return f" [{min(values):.2f}-{max(values):.2f} s]" if len(values) > 1 else ''

    record(section, 'floor with writes (bench/floor.py: the same chunks of a raw copy, 2 threads, '
           'zstd-1, crc32, one file each with O_DIRECT, one syncfs)',
           f"{median(floors):.2f} s{spread(floors)}")
    record(section, 'full into an empty datastore / floor with writes (median of the rounds\' '
           'ratios)', f"{median(fulls):.2f} s / {median(floors):.2f} s",
           paired_ratio(fulls, floors), '<= 1.15x the floor with writes', 1.15)
    record(section, 'read + sha256 floor (same chunks, 2 threads)',
           f"{median(read_floors):.2f} s{spread(read_floors)}")
    record(section, 'unchanged second full / read + sha256 floor (median of the rounds\' ratios)',
           f"{median(full2s):.2f} s / {median(read_floors):.2f} s",
           paired_ratio(full2s, read_floors), '<= 1.3x the read + sha256 floor', 1.3)
    if qemu_floors:
        record(section, 'read + sha256 over QEMU\'s NBD export of the disk, a plain libnbd '
               'reader (same chunks, 2 threads, 2 in flight each)',
               f"{median(qemu_floors):.2f} s{spread(qemu_floors)}")
        record(section, 'unchanged second full / that reader (median of the rounds\' ratios)',
               f"{median(full2s):.2f} s / {median(qemu_floors):.2f} s",
               paired_ratio(full2s, qemu_floors))
