"""Garbage collection of a chunk store, in PBS's two phases (datastore.rs, chunk_store.rs): the
one collector of every datastore. It reads every index (fixed or dynamic, through the Index protocol) and asks the chunk
store to mark and sweep; a store in a directory does it as below, one in a bucket marks in memory
and sweeps by upload time (object_chunks.py).

- **mark**: set the access time of every chunk any index names (``utimensat``, mtime left
  alone). A chunk that is missing has its ``.bad`` copies touched instead, so they stay while
  something still needs them.
- **sweep**: scan ``.chunks/XXXX`` one prefix directory at a time (``os.scandir``, one ``lstat``
  per entry) and remove every chunk, and every ``.bad`` copy, whose atime is older than the
  cutoff ``min(mark start, oldest_writer_start) - grace``. A backup refers to a chunk only after
  it has written or touched it (``FileChunkStore.touch_if_present``), so a backup that started before
  the mark is covered by ``oldest_writer_start`` and one that starts later touches what it reuses
  after the mark started: neither loses a chunk. Hidden temporary files of crashed writers older
  than the cutoff go too.

Check mode touches and removes nothing, and reports what a real run would: a chunk an index names
counts as kept (the mark would have touched it), its ``.bad`` copies as kept when it is missing.
"""
from __future__ import annotations

import os
import time

from ..errors import CorruptData, StorageError
from .index import read_index


def referenced_digests(index_paths):
    """``(digests as hex, index files read, logical bytes)`` of every index in ``index_paths``.

    An index that vanished (a prune ran meanwhile) is skipped. One that cannot be parsed stops
    the collection with ``CorruptData`` naming the file: its chunks cannot be known, and a sweep
    that guessed could remove the only copy of a backup's data."""
    digests = set()
    files = 0
    logical = 0
    for path in index_paths:
        try:
            index = read_index(path, check_csum=False)
        except StorageError as exc:
            if not isinstance(exc, CorruptData):
                continue                         # gone: nothing to keep for it
            raise CorruptData(f"garbage collection stopped before removing anything: {exc}. "
                              "Its chunks cannot be told from garbage; restore the file from a "
                              "copy, or move its snapshot out of the datastore if it is lost, "
                              "then run garbage collection again") from None
        files += 1
        logical += index.size
        digests.update(digest.hex() for digest in index.distinct_digests())
    return digests, files, logical


def missing_warning(missing, index_paths, shown=5):
    """The warning for the chunks (hex digests) that indexes name but the store lacks, naming the
    first snapshots that need them (None when nothing is missing). The indexes are read again only
    in this case, so a healthy store pays nothing for the names."""
    if not missing:
        return None
    snapshots = []
    for path in index_paths:
        try:
            index = read_index(path, check_csum=False)
        except StorageError:
            continue
        if any(digest.hex() in missing for digest in index.distinct_digests()):
            name = '/'.join(os.path.normpath(str(path)).split(os.sep)[-4:-1])
            if name not in snapshots:
                snapshots.append(name)
    named = ', '.join(snapshots[:shown]) + (f" and {len(snapshots) - shown} more"
                                            if len(snapshots) > shown else '')
    count = len(missing)
    return (f"{count} chunk{'s are' if count > 1 else ' is'} missing from the chunk store, "
            f"named by {named or 'the indexes'}: those snapshots cannot be restored whole. Run "
            "verify on them to see each damaged disk; a new backup of the guest stores the "
            "chunks again if the guest still holds that data")


def collect_garbage(chunks, index_paths, *, grace_seconds, oldest_writer_start=None,
                    check_mode=False, now=None, progress=None):
    """Mark the chunks ``index_paths`` (fixed and dynamic index files) name, then sweep the
    store ``chunks``. Every index is read before anything is touched: one that cannot be parsed
    stops the run (``CorruptData`` naming it), in check mode too.

    The store does what differs between a directory and a bucket: ``gc_check()`` before
    anything is read, ``gc_mark(referenced)`` (touch each chunk; the missing ones, or None when
    the mark is kept in memory) and ``gc_sweep(...)`` (remove what is unreferenced and older than
    the cutoff, counting into ``result``; the chunk names present).

    ``now`` is the mark's start (epoch seconds; default the clock); ``oldest_writer_start`` the
    start of the oldest backup still running, if any. ``progress(phase, done, total)`` is called
    with phase 'mark' (index files) and 'sweep' (prefix directories, or one bucket listing).
    Returns ``{index_files, referenced_chunks, missing_chunks, removed_chunks, removed_bytes,
    kept_chunks, kept_bytes, bad_chunks_removed, bad_chunks_kept, pending_chunks,
    removed_temporaries, referenced_bytes, logical_bytes, dedup_factor, cutoff, check_mode,
    warnings, duration}``.

    ``kept_*`` count the chunks (not ``.bad`` copies) left in the store, ``pending_chunks`` those
    of them no index names that a later run removes; ``removed_bytes`` includes ``.bad`` copies;
    ``dedup_factor`` is ``logical_bytes`` (the image bytes all the indexes describe) over
    ``referenced_bytes`` (what their chunks take on disk).
    """
    started = time.monotonic()
    chunks.gc_check()
    mark_start = time.time() if now is None else float(now)
    cutoff = mark_start
    if oldest_writer_start is not None:
        cutoff = min(cutoff, float(oldest_writer_start))
    cutoff -= float(grace_seconds)
    protect_from = min(mark_start, float(oldest_writer_start)) \
        if oldest_writer_start is not None else mark_start
    warnings = []
    paths = list(index_paths)
    if progress is not None:
        progress('mark', 0, len(paths))
    referenced, index_files, logical = referenced_digests(paths)
    missing = None if check_mode else chunks.gc_mark(referenced)
    if progress is not None:
        progress('mark', len(paths), len(paths))
    result = {'removed_chunks': 0, 'removed_bytes': 0, 'kept_chunks': 0, 'kept_bytes': 0,
              'bad_chunks_removed': 0, 'bad_chunks_kept': 0, 'pending_chunks': 0,
              'removed_temporaries': 0, 'referenced_bytes': 0}
    present = chunks.gc_sweep(referenced, cutoff, protect_from, check_mode, result, progress)
    if missing is None:
        missing = referenced - present
    warning = missing_warning(missing, paths)
    if warning:
        warnings.append(warning)
    kept = result['referenced_bytes']
    result.update(
        index_files=index_files, referenced_chunks=len(referenced), missing_chunks=len(missing),
        logical_bytes=logical, dedup_factor=round(logical / kept, 3) if kept else 0.0,
        cutoff=cutoff, check_mode=bool(check_mode), warnings=warnings,
        duration=round(time.monotonic() - started, 3))
    return result
