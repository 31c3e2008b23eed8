#!/usr/bin/env python
"""Garbage collection over a datastore of many chunks: datastore/gc.collect_garbage against
a plain listing of the same ``.chunks`` directory, in one run.

A benchmark, not a test: it prints times and ratios and asserts none. It builds a store (all
65536 prefix directories, as PBS and ``FileChunkStore.create`` make them) holding ``--chunks`` tiny
fake chunk files (a valid 12-byte-header blob each, random digest names, not the digests of their
data: GC never reads chunks), one fixed index naming ``--referenced`` of them, and every chunk's
atime set two days back. Then, timed:

- ``find .chunks -type f | wc -l`` (the listing a shell would do), and the same ``os.scandir`` +
  ``lstat`` walk GC's sweep does, without acting;
- a check-mode GC (reads the index, scans, removes nothing), then a real GC with the default
  grace of 24 h 5 min (touches the referenced chunks, removes the others).

Usage: ``.venv/bin/python bench/gc_bench.py [--chunks 100000] [--referenced 50000] [--workdir
DIR] [--keep]``
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE = 24 * 3600 + 300
TARGET_SECONDS = 10.0


def load_engine():
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    from engine_loader import load_engine as load
    load()


def build_store(base, count, referenced):
    from guestvault_engine.datastore import blob, chunk_store, fixed_index
    store = chunk_store.FileChunkStore(base)
    started = time.monotonic()
    store.create()
    created = time.monotonic() - started
    payload = blob.encode_blob(b'x' * 16, compress=False)
    old = time.time() - 2 * 86400
    digests = []
    for _number in range(count):
        digest = os.urandom(32)
        path = store.chunk_path(digest)
        with open(path, 'wb') as handle:
            handle.write(payload)
        os.utime(path, (old, old))
        digests.append(digest)
    index_path = os.path.join(base, 'drive-scsi0.img.fidx')
    kept = digests[:referenced]
    size = max(1, len(kept)) * 4 * 1024 * 1024
    raw = fixed_index.encode_fixed_index(size, b''.join(kept) or bytes(32))
    with open(index_path, 'wb') as handle:
        handle.write(raw)
    return store, index_path, created


def scan_like_sweep(chunk_dir):
    found = 0
    for name in sorted(os.listdir(chunk_dir)):
        with os.scandir(os.path.join(chunk_dir, name)) as entries:
            for entry in entries:
                entry.stat(follow_symlinks=False)
                found += 1
    return found


def timed(function, *args, **kwargs):
    started = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--chunks', type=int, default=100_000)
    parser.add_argument('--referenced', type=int, default=50_000)
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench')
    parser.add_argument('--keep', action='store_true')
    options = parser.parse_args()
    load_engine()
    from guestvault_engine.datastore import gc

    os.makedirs(options.workdir, exist_ok=True)
    base = tempfile.mkdtemp(prefix='gc-', dir=options.workdir)
    try:
        build_started = time.monotonic()
        store, index_path, created = build_store(base, options.chunks, options.referenced)
        print(f"store: {options.chunks} chunks, {options.referenced} referenced, built in "
              f"{time.monotonic() - build_started:.1f} s (65536 prefix dirs: {created:.1f} s)")
        find_time, listed = timed(subprocess.run,
                                  f"find {store.chunk_dir} -type f | wc -l", shell=True,
                                  capture_output=True, text=True, check=True)
        scan_time, scanned = timed(scan_like_sweep, store.chunk_dir)
        check_time, check = timed(gc.collect_garbage, store, [index_path], grace_seconds=GRACE,
                                  check_mode=True)
        real_time, real = timed(gc.collect_garbage, store, [index_path], grace_seconds=GRACE)
        print(f"find -type f | wc -l: {find_time:6.2f} s ({listed.stdout.strip()} files)")
        print(f"scandir + lstat walk: {scan_time:6.2f} s ({scanned} entries)")
        print(f"GC check mode:        {check_time:6.2f} s  = {check_time / find_time:4.1f}x find, "
              f"{check_time / scan_time:4.1f}x walk (would remove {check['removed_chunks']})")
        print(f"GC:                   {real_time:6.2f} s  = {real_time / find_time:4.1f}x find, "
              f"{real_time / scan_time:4.1f}x walk (removed {real['removed_chunks']}, kept "
              f"{real['kept_chunks']}, marked {real['referenced_chunks']})")
        verdict = 'MET' if real_time <= TARGET_SECONDS else 'MISSED'
        print(f"target: GC over {options.chunks} chunks <= {TARGET_SECONDS:.0f} s: {verdict}")
        if check['removed_chunks'] != real['removed_chunks']:
            print("check mode and the real run disagree", file=sys.stderr)
            return 1
    finally:
        if options.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
