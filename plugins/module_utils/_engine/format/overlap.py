"""The segment digests of qcow2 images hashed while QEMU still writes them, behind its write front.

Why it is sound. QEMU writes each target through a file node of its own (guest/capture.py), and
at the capture's request adds dirty bitmaps to that node as the job goes on: bitmap ``k`` is added
before ``schedule(k)`` is called, so every write that lands after it (data, and the L2 tables and
refcount blocks qcow2 rewrites in place, and its cache flushed at close) is counted in bitmap
``k``. QEMU marks a write dirty when it has completed: a write not counted in bitmap ``k`` had
reached the file (the page cache this process reads) before bitmap ``k`` existed, so before
``schedule(k)`` read anything. A segment hashed in batch ``k`` therefore describes the final file
unless bitmap ``k`` marks a byte of it dirty; after the job, once QEMU has closed the qcow2 node,
``written`` gets each bitmap's dirty ranges and ``digests`` hashes again every segment that is
dirty in its batch's bitmap, never hashed, or no longer of the final file's layout. No write is
missed, some segments are hashed twice: the cost of soundness is only time.

The segments hashed early are those that lay ``behind`` (64 MiB) below the file's end just
before their batch's bitmap was added (``ends``: QEMU's reply to the bitmap may come hundreds of
MiB of writes later on a busy machine): QEMU's writes in flight land in clusters it allocated
last, near the end (a backup job has up to 64 workers of up to 1 MiB each; on a busy machine one
can wait long), so a batch's segments are rarely written again. What qcow2 rewrites in place
(L2 tables, refcount blocks) is hashed again after the job. Once QEMU has closed the qcow2 node
(``closed``), the segments never hashed are final: they are hashed at once, while the capture
reads the bitmaps, and never again. The margin is only a guess about where QEMU writes next;
soundness rests on the bitmaps alone.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

from ..storage.files import sha256_range


def overlaps(ranges, offset, length):
    """Whether any (offset, length) of ``ranges`` shares a byte with [offset, offset+length)."""
    return any(start < offset + length and offset < start + size for start, size in ranges)


# A backup job has up to 64 workers writing up to 1 MiB each: what lies further below the
# file's end than that is rarely written again (qcow2 allocates clusters in the order of writes)
IN_FLIGHT = 64 << 20
CLOSED = 'closed'   # the batch of segments hashed once QEMU had closed the image: final


def to_hash_again(hashed, dirty, final):
    """The segments of ``final`` (the final file's [(offset, length)]) whose early digest cannot
    be used: never hashed (``hashed``: {offset: (length, batch)}), hashed with another length,
    or written after their batch's bitmap was added (``dirty``: {batch: [(offset, length)]}; a
    batch missing from it, or ``dirty`` None, is unknown: its segments are hashed again). A
    segment of batch ``CLOSED`` was hashed from the final file."""
    again = []
    for offset, length in final:
        early = hashed.get(offset)
        if early is None or early[0] != length:
            again.append((offset, length))
        elif early[1] != CLOSED and (dirty is None or early[1] not in dirty
                                     or overlaps(dirty[early[1]], offset, length)):
            again.append((offset, length))
    return again


class OverlappedDigests:
    """The segment digests of the images ``sizes`` names ({path: its segment size}), hashed on
    ``workers`` threads while QEMU writes them. Use as a context manager (it ends its threads);
    the capture takes ``ends()``, adds bitmap ``batch`` to every image's file node, then calls
    ``schedule(batch, ends)``; ``closed()`` once QEMU has closed the images, then
    ``written({path: {batch: dirty ranges}})``; then ``digests()``. ``behind``: how far below
    a file's end a batch stops (default ``IN_FLIGHT``)."""

    def __init__(self, sizes, workers=None, behind=None):
        self.sizes = dict(sizes)
        self.paths = list(self.sizes)
        self.behind = IN_FLIGHT if behind is None else behind
        self._pool = ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1)
        self._hashed = {path: {} for path in self.paths}    # offset -> (length, batch, future)
        self._dirty = None
        self.hashed_again = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def ends(self):
        """{path: the file's size now}, for ``schedule``."""
        return {path: os.path.getsize(path) for path in self.paths}

    def schedule(self, batch, ends):
        """Start hashing, as batch ``batch``, each whole segment not started yet that lies
        ``behind`` bytes below its file's end in ``ends``: taken before bitmap ``batch`` was
        added, since QEMU may write much more before a busy machine lets this thread go on."""
        for path in self.paths:
            self._submit(path, batch, ends[path] - self.behind)

    def closed(self):
        """QEMU has closed the images: every segment not started yet, also one still queued in
        a batch (behind on a busy machine), is hashed as final, whatever the bitmaps say."""
        for path in self.paths:
            hashed = self._hashed[path]
            for offset, (length, _batch, future) in list(hashed.items()):
                if future.cancel():
                    hashed[offset] = (length, CLOSED,
                                      self._pool.submit(sha256_range, path, offset, length))
            self._submit(path, CLOSED, os.path.getsize(path), whole=False)

    def _submit(self, path, batch, end, whole=True):
        hashed, size = self._hashed[path], self.sizes[path]
        start = max(hashed, default=-size) + size
        for offset in range(start, end - size + 1 if whole else end, size):
            length = min(size, end - offset)
            hashed[offset] = (length, batch, self._pool.submit(sha256_range, path, offset, length))

    def written(self, dirty):
        """{path: {batch: [(offset, length)]}}: what each batch's bitmap saw written; None when
        it is not known (every segment is then hashed again)."""
        self._dirty = dirty

    def hashed_early(self):
        """How many segments were hashed while QEMU wrote (for the log)."""
        return sum(batch != CLOSED for hashed in self._hashed.values()
                   for _length, batch, _future in hashed.values())

    def digests(self):
        """{path: (segment size, [sha256 of each segment of the final file])}."""
        result = {}
        for path in self.paths:
            file_size, size = os.path.getsize(path), self.sizes[path]
            final = [(offset, min(size, file_size - offset))
                     for offset in range(0, file_size, size)]
            hashed = self._hashed[path]
            dirty = None if self._dirty is None else self._dirty.get(path)
            again = {offset: self._pool.submit(sha256_range, path, offset, length)
                     for offset, length in to_hash_again(
                         {o: (n, b) for o, (n, b, _f) in hashed.items()}, dirty, final)}
            self.hashed_again += len(again)
            result[path] = (size, [(again.get(offset) or hashed[offset][2]).result()
                                   for offset, _length in final])
        return result
