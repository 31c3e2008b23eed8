#!/usr/bin/env python
"""The datastore pipeline on a raw file, against ``qemu-img convert`` of the same file, one run.

A benchmark, not a test: it prints times, MiB/s and ratios and asserts none. No guest: the source
is a raw file read through ``RawFileSource`` (the NBD source of a real backup reads a guest's
point in time instead, so this measures the pipeline alone). The file (``--size``, default
2 GiB) holds ``--data`` (default 1 GiB) in 4 MiB extents at seeded random places, a quarter each
random, pseudo-text, constant bytes and repeated 4 KiB blocks; the rest are holes.

Timed, in this order: ``qemu-img convert -O qcow2`` + fsync; full backups into fresh stores with
1 and 2 workers; the unchanged second full; an encrypted full; restores to raw and to qcow2
(each compared with ``qemu-img compare``).

Usage: ``.venv/bin/python bench/pipeline_bench.py [--size 2G] [--data 1G] [--workdir DIR]``
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
EXTENT = 4 * MiB


def load_engine():
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
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


def timed(function, *args, **kwargs):
    started = time.monotonic()
    result = function(*args, **kwargs)
    return time.monotonic() - started, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--size', default='2G')
    parser.add_argument('--data', default='1G')
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench')
    options = parser.parse_args()
    load_engine()
    from guestvault_engine.format import qemu_img
    from guestvault_engine.datastore import chunk_store, fixed_index, key_file
    from guestvault_engine.datastore.backup_writer import write_disk_index
    from guestvault_engine.datastore.image_restore import restore_disk_image
    from guestvault_engine.datastore.sources import RawFileSource

    size, data = parse_size(options.size), parse_size(options.data)
    os.makedirs(options.workdir, exist_ok=True)
    work = tempfile.mkdtemp(prefix='pipeline-', dir=options.workdir)
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

        results = {}
        for workers in (1, 2):
            store = fresh_store(f'store{workers}')
            seconds, result = timed(write_disk_index, RawFileSource(image),
                                    os.path.join(work, f'full{workers}.fidx'), store,
                                    workers=workers)
            results[workers] = (store, result)
            row(f'full backup, {workers} worker(s)', seconds,
                f"{seconds / convert_time:.2f}x convert, {result['new_bytes'] / MiB:.0f} MiB "
                "stored")
            if workers == 1:
                shutil.rmtree(store.base)
        store, first = results[2]
        seconds, second = timed(write_disk_index, RawFileSource(image),
                                os.path.join(work, 'second.fidx'), store, workers=2)
        row('unchanged second full, 2 workers', seconds,
            f"{seconds / convert_time:.2f}x convert, {second['new_bytes']} new bytes")
        config, _created = key_file.KeyFile.create(kdf='none')
        crypt_store = fresh_store('crypt')
        seconds, _result = timed(write_disk_index, RawFileSource(image),
                                 os.path.join(work, 'crypt.fidx'), crypt_store, workers=2,
                                 crypt=config)
        row('encrypted full, 2 workers', seconds, f"{seconds / convert_time:.2f}x convert, "
            f"{seconds / first['duration']:.2f}x the unencrypted full")
        shutil.rmtree(crypt_store.base)
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
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
