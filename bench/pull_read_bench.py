#!/usr/bin/env python
"""Pull capture read benchmark: one lab guest, a 1 GiB disk full of random data, a pull capture
(guest/pull.py), and the export read over NBD (guest/nbd.py) by 1 and by 2 threads, each
reading 4 MiB at a time and hashing it (sha256), as the datastore's pipeline does.

A benchmark, not a test: it prints the transaction's time and MiB/s for each thread count
(median of --repeat rounds). Whether libnbd's Python binding releases the GIL shows in the
ratio: two threads faster than one only if it does (hashlib releases it too).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))

from engine_loader import load_engine  # noqa: E402
from labguest import LabGuest  # noqa: E402

load_engine()
from guestvault_engine.guest.capture import DiskJob  # noqa: E402
from guestvault_engine.guest.disks import discover_disks  # noqa: E402
from guestvault_engine.guest.pull import PullCapture  # noqa: E402
from guestvault_engine.guest.qmp import QmpSession  # noqa: E402

MiB = 1 << 20
CHUNK = 4 * MiB


def read_all(source, threads, digest=True):
    offsets = list(range(0, source.size, CHUNK))
    parts = [offsets[i::threads] for i in range(threads)]

    def work(mine):
        with source.reader() as reader:
            for offset in mine:
                data = reader.pread(min(CHUNK, source.size - offset), offset)
                if digest:
                    hashlib.sha256(data).digest()

    started = time.monotonic()
    workers = [threading.Thread(target=work, args=(p,)) for p in parts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return source.size / MiB / (time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=1024, help='disk size in MiB')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--no-hash', action='store_true', help='read only, no sha256')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='gv-pull-bench-') as work:
        guest = LabGuest(os.path.join(work, 'guest'), disks=[('qcow2', f'{args.size}M')],
                         vmid=9901).start()
        try:
            data = os.path.join(work, 'random.bin')
            with open(data, 'wb') as handle:
                handle.write(random.Random(1).randbytes(64 * MiB))
            for offset in range(0, args.size * MiB, 64 * MiB):
                guest.write_file('vd0', data, offset, 64 * MiB)
            fleece = os.path.join(work, 'fleece.qcow2')
            subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', fleece,
                            str(args.size * MiB)], check=True)
            with QmpSession(guest.qmp_socket) as qmp:
                job = DiskJob(discover_disks(qmp)[0], fleece, new_bitmap='guestvault.b.x')
                capture = PullCapture(qmp, 9901, [job], print, os.path.join(work, 'nbd.sock'))
                capture.open_targets()
                capture.start()
                source = capture.sources()['vd0']
                rates = {1: [], 2: []}
                for _round in range(args.repeat):
                    for threads in (1, 2):
                        rates[threads].append(read_all(source, threads, not args.no_hash))
                capture.abort()
            one, two = (statistics.median(rates[t]) for t in (1, 2))
            print(f"transaction (1 disk): {capture.transaction_seconds * 1000:.1f} ms")
            what = 'NBD read' if args.no_hash else 'NBD read + sha256'
            print(f"{what} of {args.size} MiB: 1 thread {one:.0f} MiB/s, 2 threads "
                  f"{two:.0f} MiB/s (x{two / one:.2f}); rounds: {rates}")
        finally:
            guest.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
