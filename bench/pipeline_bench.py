#!/usr/bin/env python
"""The datastore pipeline on a raw file, against ``qemu-img convert`` of the same file, one run.

A benchmark, not a test: it prints times, MiB/s and ratios and asserts none. No guest: the source
is a raw file read through ``RawFileSource`` (the NBD source of a real backup reads a guest's
point in time instead, so this measures the pipeline alone). The file (``--size``, default
2 GiB) holds ``--data`` (default 1 GiB) in 4 MiB extents at seeded random places, a quarter each
random, pseudo-text, constant bytes and repeated 4 KiB blocks; the rest are holes.

Timed, in this order: ``qemu-img convert -O qcow2`` + fsync; then ``--repeat`` rounds of: the
floor with writes and a full backup into a fresh store (``bench/floor.py``), the read + sha256
floor and the unchanged second full (each pair alternating which goes first), an encrypted full;
the ratios of the medians, with issue 24's goals as MET/MISSED; then restores to raw and to qcow2
(each compared with ``qemu-img compare``).

Usage: ``.venv/bin/python bench/pipeline_bench.py [--size 2G] [--data 1G] [--repeat 3]
[--workers 2] [--workdir DIR]``
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
EXTENT = 4 * MiB


def load_engine():
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    sys.path.insert(0, os.path.join(ROOT, 'bench'))
    from engine_loader import load_engine as load
    load()


def parse_size(text):
    units = {'K': 1 << 10, 'M': MiB, 'G': 1 << 30}
    text = str(text).upper().rstrip('B')
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def make_image(path, size, data, seed=11):
    rng = random.Random(seed)
    slots = rng.sample(range(size // EXTENT), data // EXTENT)
    words = b' '.join(rng.choice([b'backup', b'chunk', b'guest', b'disk', b'the', b'zstd'])
                      for _word in range(2000))
    with open(path, 'wb') as handle:
        handle.truncate(size)
        for number, slot in enumerate(slots):
            kind = number % 4
            if kind == 0:
                block = os.urandom(EXTENT)
            elif kind == 1:
                block = (words * (EXTENT // len(words) + 1))[:EXTENT]
            elif kind == 2:
                block = bytes([number % 251 + 1]) * EXTENT
            else:
                block = os.urandom(4096) * (EXTENT // 4096)
            handle.seek(slot * EXTENT)
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def loadavg():
    return ' '.join(f"{value:.2f}" for value in os.getloadavg())


def timed(function, *args, **kwargs):
    started = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--size', default='2G')
    parser.add_argument('--data', default='1G')
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench')
    parser.add_argument('--repeat', type=int, default=3,
                        help='rounds; each alternates the engine and its floor')
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument('--loop-fs', choices=('auto', 'on', 'off'), default='auto',
                        help="as datastore_bench.py: an ext4 loop file system without discard "
                        "(auto: when the workdir has discard and this is root)")
    parser.add_argument('--loop-fs-size', default='16G')
    options = parser.parse_args()
    load_engine()
    import floor
    load_start = loadavg()
    from guestvault_engine.format import qemu_img
    from guestvault_engine.datastore import chunk_store, fixed_index, key_file
    from guestvault_engine.datastore.backup_writer import write_disk_index
    from guestvault_engine.datastore.image_restore import restore_disk_image
    from guestvault_engine.datastore.sources import RawFileSource

    size, data = parse_size(options.size), parse_size(options.data)
    os.makedirs(options.workdir, exist_ok=True)
    from datastore_bench import LoopFs, mount_options
    loop = None
    if options.loop_fs == 'on' or (options.loop_fs == 'auto' and os.geteuid() == 0
                                   and 'discard' in mount_options(options.workdir)):
        loop = LoopFs(options.workdir, parse_size(options.loop_fs_size))
    work = tempfile.mkdtemp(prefix='pipeline-', dir=loop.mountpoint if loop else options.workdir)
    rows = []

    def row(name, seconds, note=''):
        rows.append((name, seconds, note))
        print(f"{name:34s} {seconds:7.2f} s  {data / MiB / seconds:7.0f} MiB/s of data  {note}",
              flush=True)

    try:
        image = os.path.join(work, 'disk.raw')
        make_image(image, size, data)
        print(f"image: {size / MiB:.0f} MiB, {data / MiB:.0f} MiB of data; cores: "
              f"{os.cpu_count()}", flush=True)

        def convert():
            target = os.path.join(work, 'convert.qcow2')
            subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', image, target],
                           check=True)
            fsync_file(target)
            os.unlink(target)

        convert_time, _none = timed(convert)
        row('qemu-img convert -O qcow2 + fsync', convert_time)

        def fresh_store(name):
            store = chunk_store.FileChunkStore(os.path.join(work, name))
            store.create()
            return store

        rounds = {name: [] for name in ('floor', 'full', 'read_floor', 'full2', 'encrypted')}
        cpu = {name: [] for name in rounds}

        def run_timed(name, run):
            # CPU seconds of this process (every thread) beside the wall time: on a loaded
            # machine the engine's 5 threads get a larger share of the cores than the floor's 2
            begun = time.process_time()
            rounds[name].append(run())
            cpu[name].append(time.process_time() - begun)

        config, _created = key_file.KeyFile.create(kdf='none')
        store = None
        for number in range(options.repeat):
            # each pair runs back to back, alternating which goes first (the load varies)
            if store is not None:
                shutil.rmtree(store.base)
            store = fresh_store(f'store{number}')
            pair = [('floor', lambda: floor.with_writes(image, os.path.join(work, 'floor'))),
                    ('full', lambda: timed(write_disk_index, RawFileSource(image),
                                           os.path.join(work, 'full2.fidx'), store,
                                           workers=options.workers)[0])]
            for name, run in pair[::-1] if number % 2 else pair:
                run_timed(name, run)
            pair = [('read_floor', lambda: floor.read_sha256(image)),
                    ('full2', lambda: timed(write_disk_index, RawFileSource(image),
                                            os.path.join(work, 'second.fidx'), store,
                                            workers=options.workers)[0])]
            for name, run in pair[::-1] if number % 2 else pair:
                run_timed(name, run)
            crypt_store = fresh_store('crypt')
            run_timed('encrypted', lambda: timed(
                write_disk_index, RawFileSource(image), os.path.join(work, 'crypt.fidx'),
                crypt_store, workers=options.workers, crypt=config)[0])
            shutil.rmtree(crypt_store.base)
            line = ', '.join(f"{name} {times[-1]:.2f} s" for name, times in rounds.items())
            print(f"round {number + 1}: {line}", flush=True)
        median = {name: statistics.median(times) for name, times in rounds.items()}
        for name, what in (('floor', 'floor with writes, 2 threads'),
                           ('full', f'full backup, {options.workers} workers'),
                           ('read_floor', 'read + sha256 floor, 2 threads'),
                           ('full2', f'unchanged second full, {options.workers} workers'),
                           ('encrypted', f'encrypted full, {options.workers} workers')):
            row(what, median[name], f"[{min(rounds[name]):.2f}-{max(rounds[name]):.2f} s], "
                f"CPU {statistics.median(cpu[name]):.2f} s")
        for what, one, other, limit in (('full / floor with writes', 'full', 'floor', 1.15),
                                        ('unchanged full / read+sha256 floor', 'full2',
                                         'read_floor', 1.3),
                                        ('encrypted full / full', 'encrypted', 'full', 1.1)):
            ratio = floor.paired_ratio(rounds[one], rounds[other])
            print(f"{what:34s} {ratio:7.2f}x  (goal <= {limit}x, median of the rounds' ratios) "
                  f"{'MET' if ratio <= limit else 'MISSED'}; CPU "
                  f"{floor.paired_ratio(cpu[one], cpu[other]):.2f}x", flush=True)
        print(f"load average: {load_start} at start, {loadavg()} at end", flush=True)
        index = fixed_index.read_fixed_index(os.path.join(work, 'full2.fidx'))
        for fmt in ('raw', 'qcow2'):
            target = os.path.join(work, f'restored.{fmt}')
            seconds, _result = timed(restore_disk_image, index, store, target, fmt, workers=2)
            same, message = qemu_img.compare(image, target)
            row(f'restore to {fmt}, 2 workers', seconds,
                f"{seconds / convert_time:.2f}x convert; "
                f"{'identical' if same else 'DIFFERS: ' + message}")
            os.unlink(target)
    finally:
        if loop is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            loop.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
