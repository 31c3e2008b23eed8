"""Chunk sources: where a backup into a datastore reads a disk's point in time from.

``guest/nbd.py`` provides the real one (an NBD export of a running guest's frozen disk). This
module holds ``RawFileSource``, the same interface over a raw image file: tests and the bench back
up real files through it, and restores to raw produce files it can read back. The interface, by
duck typing (see /work/spec and ``backup_writer``):

- ``size`` (bytes), ``incremental`` (bool);
- ``extents()``: ``(offset, length, zero)`` covering ``[0, size)`` in order, ``zero`` where the
  source reads as zeroes (here: the holes of a sparse file);
- ``dirty_extents()``: ``(offset, length)`` of what changed since the previous backup, only for
  an incremental source;
- ``reader()``: a context manager giving an independent reader with ``pread(length, offset)``
  (and, optionally, ``pread_into(buffer, offset)`` filling a writable buffer); one per thread;
- ``close()``.
"""
from __future__ import annotations

import errno
import os
from contextlib import contextmanager

from ..errors import BackupFailed, StorageError


def _fill(fd, view, offset, path):
    """Read ``len(view)`` bytes at ``offset`` into ``view``; ``StorageError`` if the file ends."""
    done = 0
    while done < len(view):
        count = os.preadv(fd, [view[done:]], offset + done)
        if count == 0:
            raise StorageError(f"{path} ends at {offset + done}, before the {len(view)} bytes "
                               f"read at {offset}; it shrank while it was read")
        done += count


class RawFileReader:
    """One open descriptor of a raw file; ``pread`` and ``pread_into`` are thread-safe."""

    def __init__(self, path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))

    def pread(self, length, offset):
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        buffer = bytearray(length)
        _fill(self.fd, memoryview(buffer), offset, self.path)
        return bytes(buffer)

    def pread_into(self, buffer, offset):
        """Fill ``buffer`` (a writable buffer) from ``offset``: no allocation per chunk."""
        with memoryview(buffer) as view:
            _fill(self.fd, view.cast('B'), offset, self.path)

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class RawFileSource:
    """A raw image file as a chunk source. ``dirty`` (a list of ``(offset, length)``) makes it an
    incremental source whose ``dirty_extents`` are those ranges."""

    def __init__(self, path, dirty=None):
        self.path = os.fspath(path)
        try:
            self.size = os.stat(self.path).st_size
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        self.incremental = dirty is not None
        self._dirty = [(int(offset), int(length)) for offset, length in (dirty or ())]

    def __repr__(self):
        return f"RawFileSource({self.path!r}, size={self.size}, incremental={self.incremental})"

    def extents(self):
        """Data and holes, found with ``SEEK_DATA``/``SEEK_HOLE`` (one extent of data where the
        file system cannot tell)."""
        if self.size == 0:
            return []
        found = []
        fd = os.open(self.path, os.O_RDONLY | getattr(os, 'O_CLOEXEC', 0))
        try:
            offset = 0
            while offset < self.size:
                try:
                    data = os.lseek(fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:
                        raise
                    data = self.size        # nothing but a hole up to the end
                data = min(data, self.size)
                if data > offset:
                    found.append((offset, data - offset, True))
                if data >= self.size:
                    break
                hole = min(os.lseek(fd, data, os.SEEK_HOLE), self.size)
                found.append((data, hole - data, False))
                offset = hole
        except OSError:                     # no SEEK_DATA here: all of it is data
            found = [(0, self.size, False)]
        finally:
            os.close(fd)
        return found

    def dirty_extents(self):
        if not self.incremental:
            raise BackupFailed(f"{self.path} is no incremental source: it has no dirty ranges")
        return list(self._dirty)

    @contextmanager
    def reader(self):
        reader = RawFileReader(self.path)
        try:
            yield reader
        finally:
            reader.close()

    def close(self):
        """Nothing to release: every reader closes its own descriptor."""
