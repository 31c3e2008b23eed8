"""One disk's point in time, read over NBD: the chunk source a pull capture hands the format.

QEMU exports each disk's fleece node read-only on a unix socket (``guest/pull.py``). An
``NbdSource`` is a libnbd client of one such export: its size, its extents (``base:allocation``:
where it reads as zeros), for an incremental the dirty extents of the frozen bitmap the export
carries (``qemu:dirty-bitmap:<name>``), and ``reader()``, an independent connection per worker
thread. The format reads chunks through it by duck typing; ``datastore/sources.py`` has
the same interface over a raw file.

libnbd is not on PyPI: Debian ships it as ``python3-libnbd``.
"""
from __future__ import annotations

import contextlib

from ..errors import BackupFailed, MissingLibrary

try:
    import nbd
    HAS_LIBNBD = True
    LIBNBD_IMPORT_ERROR = None
except ImportError as exc:  # reported when a source is opened, naming the package
    HAS_LIBNBD = False
    LIBNBD_IMPORT_ERROR = exc

ALLOCATION = 'base:allocation'
DIRTY_BITMAP = 'qemu:dirty-bitmap:'
# NBD's block status request carries a 32-bit length; ask for at most this much at once (QEMU
# answers with less when it likes, and each answer is followed on from where it ended).
STATUS_REQUEST = 1 << 31
# QEMU's NBD server takes reads up to 32 MiB, but serves 2 MiB requests for about a third of the
# CPU of 4 MiB ones (bench/pull_read_bench.py): reads are split into pieces of this size.
READ_PIECE = 2 << 20
STATE_ZERO = 2     # base:allocation: the range reads as zeros (holes included)
STATE_DIRTY = 1    # qemu:dirty-bitmap: the range is dirty


def require_libnbd(feature='pull capture over NBD'):
    if not HAS_LIBNBD:
        raise MissingLibrary('libnbd', feature, 'python3-libnbd', LIBNBD_IMPORT_ERROR,
                             on_pypi=False)


def _connect(socket_path, export_name, contexts=()):
    require_libnbd()
    handle = nbd.NBD()
    handle.set_export_name(export_name)
    for context in contexts:
        handle.add_meta_context(context)
    try:
        handle.connect_unix(socket_path)
    except nbd.Error as exc:
        raise BackupFailed(f"cannot read export {export_name} over NBD at {socket_path}: "
                           f"{exc}") from exc
    return handle


def _close(handle):
    try:
        handle.shutdown()
    except nbd.Error:
        pass  # the server is gone already: the handle is closed when dropped


def merge_extents(pieces, size):
    """Adjacent (offset, length, flag) pieces with the same flag joined, clipped to ``size``;
    the pieces must follow each other from 0 (as block status answers do)."""
    merged = []
    for offset, length, flag in pieces:
        length = min(length, size - offset)
        if length <= 0:
            continue
        if merged and merged[-1][2] == flag and merged[-1][0] + merged[-1][1] == offset:
            merged[-1] = (merged[-1][0], merged[-1][1] + length, flag)
        else:
            merged.append((offset, length, flag))
    return merged


def _collector(context, answer):
    """A block status callback keeping ``context``'s answers: (offset, [length, flags, ...])."""
    def collect(metacontext, start, entries, error):
        del error  # an earlier error of the same request; libnbd raises it after the callbacks
        if metacontext == context:
            answer.append((start, list(entries)))
        return 0
    return collect


def block_status_walk(query, size, context, what):
    """Walk a whole export's block status for ``context``: [(offset, length, flags)] covering
    [0, size) in order.

    ``query(count, offset, callback)`` is one block status request (``handle.block_status``); a
    server may answer for less than was asked (or, for the last extent, more), so requests go on
    from where each answer ended until the export is covered.
    """
    pieces = []
    offset = 0
    while offset < size:
        answer = []
        query(min(size - offset, STATUS_REQUEST), offset, _collector(context, answer))
        position = offset
        for start, entries in answer:
            position = start
            for index in range(0, len(entries) - 1, 2):
                length, flags = entries[index], entries[index + 1]
                pieces.append((position, length, flags))
                position += length
        if position <= offset:
            raise BackupFailed(f"the NBD server gave no {context} status for {what} at offset "
                               f"{offset}")
        offset = position
    return pieces


class NbdReader:
    """One connection of one worker thread."""

    def __init__(self, handle, export_name):
        self._handle = handle
        self._export_name = export_name
        # the buffers given to pread_into are filled whole or the read fails: libnbd need not
        # clear them first
        handle.set_pread_initialize(False)

    def pread(self, length, offset):
        buffer = bytearray(length)
        self.pread_into(buffer, offset)
        return bytes(buffer)

    def pread_into(self, buffer, offset):
        """Fill ``buffer`` (writable, e.g. a worker's reused chunk buffer) from ``offset``: its
        pieces are requested at once, so QEMU serves one while the next is on its way."""
        self.finish_read(self.start_read(buffer, offset))

    def start_read(self, buffer, offset):
        """Request ``buffer``'s bytes from ``offset`` and return at once: a token for
        ``finish_read``. A backup's reader keeps the next chunk in flight on the same connection
        while it waits for one, so QEMU never waits for the next request. ``buffer`` must stay
        alive and untouched until ``finish_read``."""
        view = memoryview(buffer).cast('B')
        handle = self._handle
        try:
            cookies = [handle.aio_pread(nbd.Buffer.from_buffer(view[start:start + READ_PIECE]),
                                        offset + start)
                       for start in range(0, len(view), READ_PIECE)]
        except nbd.Error as exc:
            raise self._failed(len(view), offset, exc) from exc
        return len(view), offset, cookies

    def finish_read(self, token):
        """Wait until the read ``start_read`` gave ``token`` for is complete (or raise)."""
        length, offset, cookies = token
        handle = self._handle
        try:
            for cookie in cookies:
                while not handle.aio_command_completed(cookie):
                    handle.poll(-1)
        except nbd.Error as exc:
            raise self._failed(length, offset, exc) from exc

    def _failed(self, length, offset, exc):
        return BackupFailed(f"reading {length} bytes at offset {offset} of NBD export "
                            f"{self._export_name} failed: {exc}")


class NbdSource:
    """One disk's point in time, exported read-only over NBD."""

    def __init__(self, socket_path, export_name, incremental=False, bitmap_name=None):
        self.socket_path = socket_path
        self.export_name = export_name
        self.incremental = bool(incremental)
        self.bitmap_name = bitmap_name
        if self.incremental and not bitmap_name:
            raise BackupFailed(f"an incremental NBD source ({export_name}) needs the name of its "
                               "frozen bitmap")
        contexts = [ALLOCATION] + ([DIRTY_BITMAP + bitmap_name] if bitmap_name else [])
        self._handle = _connect(socket_path, export_name, contexts)
        for context in contexts:
            if not self._handle.can_meta_context(context):
                _close(self._handle)
                raise BackupFailed(f"the NBD export {export_name} does not offer {context}")
        self.size = self._handle.get_size()

    def _walk(self, context):
        if self._handle is None:
            raise BackupFailed(f"the NBD source {self.export_name} is closed")
        return block_status_walk(self._handle.block_status, self.size, context,
                                 f"export {self.export_name}")

    def extents(self):
        """[(offset, length, zero)] covering [0, size): zero where the export reads as zeros."""
        return merge_extents(((o, n, bool(f & STATE_ZERO)) for o, n, f in self._walk(ALLOCATION)),
                             self.size)

    def dirty_extents(self):
        """[(offset, length)] the frozen bitmap marks dirty: what changed since the previous
        backup of the chain."""
        if not self.incremental:
            raise BackupFailed(f"the NBD source {self.export_name} is a full one: it has no "
                               "dirty bitmap")
        pieces = self._walk(DIRTY_BITMAP + self.bitmap_name)
        return [(offset, length) for offset, length, dirty in merge_extents(
            ((o, n, bool(f & STATE_DIRTY)) for o, n, f in pieces), self.size) if dirty]

    @contextlib.contextmanager
    def reader(self):
        """An independent connection: ``with source.reader() as r: r.pread(length, offset)``."""
        handle = _connect(self.socket_path, self.export_name)
        try:
            yield NbdReader(handle, self.export_name)
        finally:
            _close(handle)

    def close(self):
        if self._handle is not None:
            _close(self._handle)
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bitmap_dirty_extents(socket_path, export_name, bitmap_names):
    """{bitmap name: [(offset, length)] it marks dirty} of an export carrying those bitmaps
    (guest/capture.py: which parts of a backup's image QEMU wrote after each bitmap was added)."""
    contexts = [DIRTY_BITMAP + name for name in bitmap_names]
    handle = _connect(socket_path, export_name, contexts)
    try:
        size = handle.get_size()
        result = {}
        for name, context in zip(bitmap_names, contexts):
            if not handle.can_meta_context(context):
                raise BackupFailed(f"the NBD export {export_name} does not offer {context}")
            pieces = block_status_walk(handle.block_status, size, context,
                                       f"export {export_name}")
            result[name] = [(offset, length) for offset, length, dirty in merge_extents(
                ((o, n, bool(f & STATE_DIRTY)) for o, n, f in pieces), size) if dirty]
        return result
    finally:
        _close(handle)
