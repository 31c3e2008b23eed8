#!/usr/bin/env python
"""Pull capture read benchmark: one lab guest, a 1 GiB disk full of random data, a pull capture
(guest/pull.py), and the export read over NBD (guest/nbd.py) by 1 and by 2 threads, each
reading 4 MiB at a time into a reused buffer and hashing it (sha256), as the datastore's pipeline
does.

A benchmark, not a test: it prints the transaction's time and MiB/s for each thread count and
for each size of the NBD requests a 4 MiB chunk is split into (``nbd.READ_PIECE``; median of
--repeat rounds), with QEMU's CPU seconds per GiB served. Whether libnbd's Python binding
releases the GIL shows in the ratio of the thread counts: two threads faster than one only if it
does (hashlib releases it too).
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
from guestvault_engine.guest import nbd as engine_nbd  # noqa: E402
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
        buffer = bytearray(CHUNK)
        with source.reader() as reader:
            for offset in mine:
                view = memoryview(buffer)[:min(CHUNK, source.size - offset)]
                reader.pread_into(view, offset)
                if digest:
                    hashlib.sha256(view).digest()

    started = time.monotonic()
    workers = [threading.Thread(target=work, args=(p,)) for p in parts]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return source.size / MiB / (time.monotonic() - started)


def cpu_seconds(pid):
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f'/proc/{pid}/stat') as handle:
        fields = handle.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--size', type=int, default=1024, help='disk size in MiB')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--no-hash', action='store_true', help='read only, no sha256')
    parser.add_argument('--pieces', default='1,2,4',
                        help='NBD request sizes (MiB) to split each 4 MiB chunk into')
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
                pieces = [int(p) for p in args.pieces.split(',')]
                rates = {(p, t): [] for p in pieces for t in (1, 2)}
                qemu_cpu = {p: [] for p in pieces}
                qemu_pid = int(open(os.path.join(guest.workdir, 'qemu.pid')).read())
                for _round in range(args.repeat):
                    for piece in pieces:
                        engine_nbd.READ_PIECE = piece * MiB
                        for threads in (1, 2):
                            before = cpu_seconds(qemu_pid)
                            rates[piece, threads].append(
                                read_all(source, threads, not args.no_hash))
                            qemu_cpu[piece].append((cpu_seconds(qemu_pid) - before)
                                                   / (args.size / 1024))
                capture.abort()
            print(f"transaction (1 disk): {capture.transaction_seconds * 1000:.1f} ms")
            what = 'NBD read' if args.no_hash else 'NBD read + sha256'
            base = statistics.median(rates[pieces[0], 2])
            for piece in pieces:
                one, two = (statistics.median(rates[piece, t]) for t in (1, 2))
                print(f"{what} of {args.size} MiB in {piece} MiB requests: 1 thread "
                      f"{one:.0f} MiB/s, 2 threads {two:.0f} MiB/s (x{two / one:.2f} for the "
                      f"second thread; x{two / base:.2f} of {pieces[0]} MiB requests); QEMU "
                      f"{statistics.median(qemu_cpu[piece]):.2f} CPU s/GiB")
        finally:
            guest.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
