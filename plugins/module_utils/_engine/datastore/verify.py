"""Verify one disk of a datastore snapshot chunk by chunk (as PBS's verify, src/backup/verify.rs).

Every chunk the fixed index names is read and decoded: its CRC32, then (with the key, or when it
is not encrypted) decryption, decompression, its length and its digest. Without the key an
encrypted chunk gets the CRC only, as on a PBS server, which never holds keys.

A verify run over many snapshots passes the same two sets to every call: ``verified`` (digests
found good) and ``corrupt`` (digests found damaged or missing). A chunk is decoded once per run,
and every snapshot that references a corrupt chunk has it named among its problems. A damaged
chunk is renamed ``<digest>.<n>.bad`` (``FileChunkStore.mark_bad``), so the next backup writes a
fresh copy; a chunk that cannot be decrypted with the key given is reported, not renamed (the key
may be the wrong one).

Every problem names ``what`` (the snapshot and disk), the index file, the chunk's offset and its
digest.
"""
from __future__ import annotations

import threading

from ..errors import CorruptData, EncryptionKeyError, StorageError
from .blob import blob_kind, decode_blob, verify_crc
from .index import read_index
from .workers import run_parallel


def _check_chunk(chunks, digest, crypt, name, size):
    """None when the chunk is good, else ``(reason, damaged)``; damaged chunks get renamed."""
    try:
        raw = chunks.read_view(digest)
    except CorruptData:
        return 'is missing from the chunk store', False
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})", False
    try:
        encrypted, _compressed = blob_kind(raw, name)
        if encrypted and crypt is None:
            verify_crc(raw, name)
        else:
            decode_blob(raw, crypt, digest, name=name, size=size)
    except EncryptionKeyError as exc:
        return str(exc), False
    except CorruptData as exc:
        return str(exc), True
    return None


def verify_disk_index(index_path, chunks, *, crypt=None, verified, corrupt, workers=2,
                      what='drive-virtio0', mark_bad=True):
    """The problems (strings; empty when all is well) of the disk whose fixed index is
    ``index_path``, every chunk decoded and checked. ``verified`` and ``corrupt`` are sets of
    digests shared by the calls of one verify run; they are updated. ``mark_bad`` false (check
    mode) leaves a damaged chunk where it is."""
    index_path = str(index_path)
    try:
        index = read_index(index_path)
    except (CorruptData, StorageError) as exc:
        return [f"{what}: {exc}"]
    # the first offset of every digest, and how many more positions name it
    first = {}
    repeats = {}
    for _position, offset, length, digest in index:
        if digest in first:
            repeats[digest] = repeats.get(digest, 0) + 1
        else:
            first[digest] = (offset, length)
    problems = []
    lock = threading.Lock()

    def problem(digest, reason):
        offset, _length = first[digest]
        more = repeats.get(digest, 0)
        also = f" (and {more} more offset{'s' if more > 1 else ''})" if more else ""
        return (f"{what}: {index_path}: the chunk {digest.hex()} at offset {offset}{also} "
                f"{reason}")

    todo = []
    for digest in first:
        if digest in corrupt:
            reason = "is corrupt or missing (found earlier in this run)"
            problems.append((first[digest][0], reason, problem(digest, reason)))
        elif digest not in verified:
            todo.append(digest)

    def work(_state, digest):
        offset, length = first[digest]
        name = f"chunk {digest.hex()}"
        found = _check_chunk(chunks, digest, crypt, name, length)
        if found is None:
            with lock:
                verified.add(digest)
            return
        reason, damaged = found
        renamed = None
        if damaged and mark_bad:
            renamed = chunks.mark_bad(digest)
        text = reason if reason.startswith('is ') else f"is bad: {reason}"
        kind = text.replace(digest.hex(), '<digest>')    # what summarise groups by
        if renamed:
            text += f"; renamed to {renamed}"
        with lock:
            if damaged or 'missing' in reason:
                corrupt.add(digest)
            problems.append((offset, kind, problem(digest, text)))

    run_parallel(todo, workers, work)
    return summarise(problems, what, index_path)


def summarise(problems, what, index_path, shown=3):
    """``(offset, kind, text)`` problems (``kind``: "is ..." with no chunk's name in it), one
    line each while a kind has at most ``shown``; a kind with more (a wrong key, a lost chunk
    directory: thousands of chunks) becomes one line with the count and the first ``shown``
    offsets, so the report stays readable."""
    kinds = {}
    for offset, kind, text in sorted(problems):
        kinds.setdefault(kind, []).append((offset, text))
    lines = []
    for kind, found in kinds.items():
        if len(found) <= shown:
            lines += found
            continue
        examples = ', '.join(str(offset) for offset, _text in found[:shown])
        lines.append((found[0][0], f"{what}: {index_path}: {len(found)} chunks are "
                                   f"{kind[len('is '):]} (the first at offsets {examples})"))
    return [text for _offset, text in sorted(lines)]
