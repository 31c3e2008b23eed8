"""The segment digests of qcow2 images hashed while QEMU still writes them, behind its write front.

Why it is sound. QEMU writes each target through a file node of its own (guest/capture.py), and
at the capture's request adds dirty bitmaps to that node as the job goes on: bitmap ``k`` is added
before ``schedule(k)`` is called, so every write that lands after it (data, and the L2 tables and
refcount blocks qcow2 rewrites in place, and its cache flushed at close) is counted in bitmap
``k``. QEMU marks a write dirty when it has completed: a write not counted in bitmap ``k`` had
reached the file (the page cache this process reads) before bitmap ``k`` existed, so before any
read that started after ``schedule(k)``. A segment whose read started when bitmap ``k`` was the
newest (its label) therefore describes the final file unless bitmap ``k`` marks a byte of it
dirty; after the job, once QEMU has closed the qcow2 node, ``written`` gets each bitmap's dirty
ranges and ``digests`` hashes again every segment that is dirty in its label's bitmap, never
hashed, or no longer of the final file's layout. No write is missed, some segments are hashed
twice: the cost of soundness is only time.

The label is the newest bitmap when the read *started* (``_latest``, set once QEMU has answered
for every image), not the batch that queued the segment: a read that waited in the queue while
QEMU wrote on is judged by a later bitmap, so fewer segments are hashed again for writes that
landed before the read.

The segments hashed early are those that lay ``behind`` (128 MiB) below the file's end just
before their batch's bitmap was added (``ends``): QEMU's writes in flight land in clusters it
allocated last, near the end (a backup job has up to 64 workers of up to 1 MiB each), so a
batch's segments are rarely written again. What qcow2 rewrites in place (L2 tables, refcount
blocks) is hashed again after the job. Once QEMU has closed the qcow2 node (``closed``), the
segments never hashed are final: they are hashed at once, while the capture reads the bitmaps,
and never again. The margin is only a guess about where QEMU writes next; soundness rests on the
bitmaps alone.

Why the early hash runs at idle priority (``SCHED_IDLE``). QEMU's copy comes in bursts that
keep both cores busy, with pauses between them; a hash at normal priority took CPU from those
bursts and made the job itself slower. At idle priority it runs in the pauses and never slows
QEMU (nor the guest's vCPUs). What it has not reached when the job ends is hashed then, on every
core at normal priority; on a machine with no idle CPU that is all of it, as before the overlap.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from ..storage.files import sha256_range


def overlaps(ranges, offset, length):
    """Whether any (offset, length) of ``ranges`` shares a byte with [offset, offset+length)."""
    return any(start < offset + length and offset < start + size for start, size in ranges)


# A backup job has up to 64 workers writing up to 1 MiB each, some of them late: with 64 MiB,
# runs of 32-40 MiB below it were seen written again after they were hashed. What lies further
# below the file's end is rarely written again (qcow2 allocates clusters in the order of writes)
IN_FLIGHT = 128 << 20
EARLY_WORKERS = None    # threads hashing while QEMU writes (None: one per core)
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


def _idle_priority(native_ids):
    """A thread pool's initializer: run this thread at idle priority, and note its id."""
    native_ids.append(threading.get_native_id())
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        pass    # not Linux: the hash competes with QEMU, as it did before


def _normal_priority(native_ids):
    """Back to normal priority once QEMU is done (best effort: raising a thread's priority
    again needs CAP_SYS_NICE, which the engine has as root)."""
    for native_id in native_ids:
        try:
            os.sched_setscheduler(native_id, os.SCHED_OTHER, os.sched_param(0))
        except (AttributeError, OSError):
            pass


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
        workers = workers or os.cpu_count() or 1
        self._early_threads = []
        self._early = ThreadPoolExecutor(max_workers=EARLY_WORKERS or workers,
                                         initializer=_idle_priority,
                                         initargs=(self._early_threads,))
        self._pool = ThreadPoolExecutor(max_workers=workers)
        self._latest = None     # the newest bitmap QEMU has added to every image
        self._hashed = {path: {} for path in self.paths}    # offset -> (length, future)
        self._dirty = None
        self.hashed_again = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for pool in (self._early, self._pool):
            pool.shutdown(wait=True, cancel_futures=True)

    def ends(self):
        """{path: the file's size now}, for ``schedule``."""
        return {path: os.path.getsize(path) for path in self.paths}

    def schedule(self, batch, ends):
        """Bitmap ``batch`` is on every image: start hashing each whole segment not started
        yet that lies ``behind`` bytes below its file's end in ``ends``, taken before the
        bitmap was added (what lies below was written before it)."""
        self._latest = batch
        for path in self.paths:
            self._submit(self._early, path, ends[path] - self.behind)

    def closed(self):
        """QEMU has closed the images: every segment not started yet, also one still queued in
        a batch, is hashed as final, on every core, whatever the bitmaps say."""
        self._latest = CLOSED
        _normal_priority(self._early_threads)
        for path in self.paths:
            hashed = self._hashed[path]
            for offset, (length, future) in list(hashed.items()):
                if future.cancel():
                    hashed[offset] = (length, self._pool.submit(self._hash, path, offset,
                                                                length))
            self._submit(self._pool, path, os.path.getsize(path), whole=False)

    def _submit(self, pool, path, end, whole=True):
        hashed, size = self._hashed[path], self.sizes[path]
        start = max(hashed, default=-size) + size
        for offset in range(start, end - size + 1 if whole else end, size):
            length = min(size, end - offset)
            hashed[offset] = (length, pool.submit(self._hash, path, offset, length))

    def _hash(self, path, offset, length):
        """(the newest bitmap when the read started, the segment's sha256)."""
        label = self._latest
        return label, sha256_range(path, offset, length)

    def written(self, dirty):
        """{path: {batch: [(offset, length)]}}: what each batch's bitmap saw written; None when
        it is not known (every segment is then hashed again)."""
        self._dirty = dirty

    def hashed_early(self):
        """How many segments were hashed while QEMU wrote (for the log): waits for them."""
        return sum(future.result()[0] != CLOSED for hashed in self._hashed.values()
                   for _length, future in hashed.values())

    def digests(self):
        """{path: (segment size, [sha256 of each segment of the final file])}."""
        result = {}
        for path in self.paths:
            file_size, size = os.path.getsize(path), self.sizes[path]
            final = [(offset, min(size, file_size - offset))
                     for offset in range(0, file_size, size)]
            early = {offset: (length, future.result())
                     for offset, (length, future) in self._hashed[path].items()}
            dirty = None if self._dirty is None else self._dirty.get(path)
            again = {offset: self._pool.submit(sha256_range, path, offset, length)
                     for offset, length in to_hash_again(
                         {o: (n, label) for o, (n, (label, _d)) in early.items()}, dirty, final)}
            self.hashed_again += len(again)
            result[path] = (size, [again[offset].result() if offset in again
                                   else early[offset][1][1] for offset, _length in final])
        return result
