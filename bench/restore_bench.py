#!/usr/bin/env python
"""Restores against ``qemu-img convert`` of the same data, same run (issue 24, goal 4).

A benchmark, not a test: it prints figures, ratios and MET/MISSED, it never asserts a time; it
exits non-zero only when something fails (a tool, a backup, a restore that ``qemu-img compare``
finds different from the guest's disk).

1. A lab guest (prelaunch QEMU, no OS) with a ``--disk-size`` qcow2 disk, ``--data`` of mixed
   data (bench/backup_bench.fill_disk). Into a dumpdir one full and
   ``--incs`` incrementals, each after ``--change`` of scattered 256 KiB writes
   (backup_bench.scatter_changes); then one full into a datastore.
2. ``--repeat`` rounds, the order alternating, each step after backup_bench's page-cache
   warm-up and timed with the fsync of its output:
   - ``qemu-img convert -U -O qcow2`` of the guest's disk (the datastore's baseline) and the
     raw restore of the datastore's full (``run_restore``, format raw): goal <= 1.1x;
   - ``qemu-img convert -U -O qcow2`` of the newest incremental (read through its backing
     chain) and the engine's restore of it (``run_restore`` from the dumpdir: the convert,
     every image of the chain checked against its manifest's sha256): goal <= 1.2x.
   Beside the seconds, the CPU seconds of each step (this process and its children): on a
   machine loaded by others, a restore that must check every byte (sha256) is bound by them.
   For the chain row, a breakdown: the convert's fsync apart, and (untimed by the ratio) the
   engine's verify of the chain alone (``Qcow2Chain.verify_files``: every image's segments
   against its manifest, one hash thread per core), after the same warm-up.
3. Each restore of the last round is compared with the guest's disk (``qemu-img compare``).
4. The raw row's breakdown: the CPU seconds of its pipeline threads by kind (readers, decoders,
   writers: each thread's own CPU time as it ends) and the rest (planning, checks, fsync); and
   what it must hash, the chunks that are not the zero chunk, with the CPU seconds of sha256
   alone over that many bytes at this machine's rate; and, timed in every round, the measured
   floor: those chunks read, decompressed and checked on 2 threads, nothing written.

Everything is on one file system: an ext4 loop file system without discard when the workdir's
has online discard and this runs as root (datastore_bench.LoopFs), else the workdir itself.

    .venv/bin/python bench/restore_bench.py [--disk-size 4G] [--data 2G] [--repeat 3]
"""
from __future__ import annotations

import argparse
import collections
import glob
import hashlib
import os
import shutil
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))

from backup_bench import (Warmer, allocated, fill_disk, fmt_bytes, loadavg,  # noqa: E402
                          machine_info, parse_size, say, scatter_changes, settle, timed_tool)
from datastore_bench import (LoopFs, compare_with_disk, load_engine, med,  # noqa: E402
                             mount_options, rng_text, verdict, wait_next_second)

VMID = 9961
GOALS = {'raw': 1.1, 'chain': 1.2}


def backups(guest, config_dir, dumpdir, incs, change, disk_size, scratch):
    """A full and ``incs`` incrementals into ``dumpdir``, then a full into the datastore ``ds``;
    the path of the newest incremental's image."""
    from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup

    def backup(level, **where):
        result = run_guest_backup(GuestBackupRequest(vmid=VMID, qmp_socket=guest.qmp_socket,
                                                     config_dir=config_dir, level=level,
                                                     **where))
        if result['level'] != level:
            raise RuntimeError(f"asked for {level}, got {result['level']}")
        return result
    backup('full', dumpdir=dumpdir)
    for number in range(incs):
        scatter_changes(guest, 'vd0', disk_size, change, scratch, seed=700 + number)
        wait_next_second(dumpdir, VMID)
        newest = backup('inc', dumpdir=dumpdir)
    backup('full', storage='ds')      # the same disk as the newest incremental
    guest.qemu_io('vd0', 'flush')
    return os.path.join(newest['backup_dir'], newest['disks'][0]['file'])


class ThreadCpu:
    """The CPU seconds of the engine's pipeline threads (``Stages``: restore-reader,
    restore-decoder, restore-writer), by kind: each thread's ``thread_time`` as it ends."""

    def __init__(self):
        from guestvault_engine.datastore import workers
        self.seconds = collections.Counter()
        lock = threading.Lock()
        real = workers.Stages.start

        def start(stages, name, function):
            def timed():
                try:
                    function()
                finally:
                    with lock:
                        self.seconds[name.rsplit('-', 1)[0]] += time.thread_time()
            real(stages, name, timed)
        workers.Stages.start = start

    def take(self):
        taken = dict(self.seconds)
        self.seconds.clear()
        return taken


def hashed_bytes(datastore):
    """The bytes a restore of the datastore's (one) snapshot decodes and hashes: its chunks that
    are not the zero chunk."""
    from guestvault_engine.datastore.image_restore import zero_digests
    from guestvault_engine.datastore.index import read_index
    total = 0
    for path in glob.glob(os.path.join(datastore, 'vm', str(VMID), '*', '*.fidx')):
        index = read_index(path)
        zeros = zero_digests(index, None)
        total += sum(length for _position, _offset, length, digest in index
                     if zeros.get(digest) != length)
    return total


def sha256_seconds(size):
    """CPU seconds of sha256 over ``size`` bytes on one thread, at the rate measured here."""
    data = os.urandom(64 << 20)
    started = time.thread_time()
    for _round in range(4):
        hashlib.sha256(data).digest()
    return (time.thread_time() - started) / (4 * len(data)) * size


def decode_floor(datastore, threads=2):
    """Seconds of the raw restore's floor: every chunk of the snapshot that is not the zero chunk
    read from its file, decompressed and its sha256 checked (the engine's ``load_chunk``: the
    work every checked restore has to do, whatever writes it), on ``threads`` threads, with
    nothing written. Beside convert, which checks nothing, it shows whether <= 1.1x is in
    reach at all."""
    from concurrent.futures import ThreadPoolExecutor
    from guestvault_engine.datastore.chunk_store import FileChunkStore
    from guestvault_engine.datastore.image_restore import load_chunk, zero_digests
    from guestvault_engine.datastore.index import read_index
    chunks = FileChunkStore(datastore)
    todo = []
    for path in glob.glob(os.path.join(datastore, 'vm', str(VMID), '*', '*.fidx')):
        index = read_index(path)
        zeros = zero_digests(index, None)
        todo += [(digest, length) for _position, _offset, length, digest in index
                 if zeros.get(digest) != length]
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        for _data in pool.map(lambda item: load_chunk(chunks, item[0], None, 'floor', item[1]),
                              todo):
            pass
    return time.monotonic() - started


def timed_restore(config_dir, target, fmt, **where):
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    started = time.monotonic()
    result = run_restore(RestoreRequest(vmid=VMID, config_dir=config_dir, target_dir=target,
                                        format=fmt, **where))
    return time.monotonic() - started, result


def verify_chain(dumpdir):
    """The engine's verify of the newest backup's chain alone, as the restore runs it."""
    from guestvault_engine.format.qcow2 import Qcow2Chain
    from guestvault_engine.storage.directory import DirStorage
    storage, fmt = DirStorage(dumpdir), Qcow2Chain()
    problems = fmt.verify_files(storage, fmt.dependencies(storage, storage.backups(VMID)[-1]))
    if problems:
        raise RuntimeError(f"the chain does not verify: {problems}")


def rounds(guest, config_dir, dumpdir, newest, outdir, repeat, warm, size):
    """Per round, alternating the order: each pair (baseline, restore) of both goals, then the
    chain's verify alone; ``fsyncs``: the chain convert's fsync of its output."""
    samples = {k: [] for k in ('convert', 'raw', 'convert_chain', 'chain', 'verify_chain',
                               'decode_floor')}
    cpu = {k: [] for k in samples}
    threads = ThreadCpu()
    breakdown = []                  # the raw row's: {thread kind: CPU s, 'rest': CPU s}
    checks, fsyncs = {}, []
    out = os.path.join(outdir, 'convert.qcow2')

    def convert_chain():
        timed = timed_tool(['qemu-img', 'convert', '-U', '-O', 'qcow2', newest, out], out)
        fsyncs.append(timed['seconds_sync'] - timed['seconds'])
        return timed['seconds_sync']

    def verify():
        started = time.monotonic()
        verify_chain(dumpdir)
        return time.monotonic() - started
    steps = {
        'convert': lambda: timed_tool(['qemu-img', 'convert', '-U', '-O', 'qcow2',
                                       guest.disk_path(0), out], out)['seconds_sync'],
        'convert_chain': convert_chain,
        'raw': lambda: restore('raw', storage='ds'),
        'chain': lambda: restore('qcow2', dumpdir=dumpdir),
        'verify_chain': verify,
        'decode_floor': lambda: decode_floor(os.path.join(os.path.dirname(outdir), 'ds')),
    }
    target = os.path.join(outdir, 'restored')
    restored = {}

    def restore(fmt, **where):
        seconds, result = timed_restore(config_dir, target, fmt, **where)
        restored[fmt] = result['disks'][0]['target']
        return seconds

    for number in range(repeat):
        order = ('convert', 'raw', 'decode_floor', 'convert_chain', 'chain', 'verify_chain')
        if number % 2:
            order = ('decode_floor', 'raw', 'convert', 'chain', 'convert_chain', 'verify_chain')
        for step in order:
            warm(size)
            before = os.times()
            samples[step].append(steps[step]())
            after = os.times()
            # this process's threads (the engine) and its children (qemu-img)
            cpu[step].append(sum(after[:4]) - sum(before[:4]))
            kinds = threads.take()
            if step == 'raw':
                breakdown.append(dict(kinds, rest=cpu[step][-1] - sum(kinds.values())))
            for fmt, path in restored.items():     # untimed
                checks[fmt] = compare_with_disk(guest, path, fmt, f"the restore {path}")
            restored.clear()
            shutil.rmtree(target, ignore_errors=True)
            if os.path.exists(out):
                os.unlink(out)
        say(f"round {number + 1}: " + ', '.join(f"{k} {v[-1]:.2f} s" for k, v in samples.items())
            + f" (load {loadavg()})")
    return samples, cpu, checks, fsyncs, breakdown


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench')
    parser.add_argument('--disk-size', default='4G')
    parser.add_argument('--data', default='2G')
    parser.add_argument('--incs', type=int, default=6)
    parser.add_argument('--change', default='64M', help='scattered writes before each inc')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--loop-fs', choices=('auto', 'on', 'off'), default='auto')
    parser.add_argument('--loop-fs-size', default='24G')
    parser.add_argument('--no-warm-up', action='store_true')
    args = parser.parse_args(argv)
    disk_size, data = parse_size(args.disk_size), parse_size(args.data)
    os.makedirs(args.workdir, exist_ok=True)
    discard = 'discard' in mount_options(args.workdir)
    loop = None
    if args.loop_fs == 'on' or (args.loop_fs == 'auto' and discard and os.geteuid() == 0):
        loop = LoopFs(args.workdir, parse_size(args.loop_fs_size))
    run = tempfile.mkdtemp(prefix='restore-run-', dir=loop.mountpoint if loop else args.workdir)
    guest = None
    try:
        load_engine(run)
        from labguest import LabGuest
        load_start = loadavg()
        info = machine_info(run, shutil.which('zstd'))
        config_dir, dumpdir, outdir = (os.path.join(run, n) for n in ('etc', 'dump', 'out'))
        for path in (os.path.join(config_dir, 'guests.d'), os.path.join(run, 'ds'), dumpdir,
                     outdir):
            os.makedirs(path)
        with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
            handle.write(f"datastore: ds\n\tpath {os.path.join(run, 'ds')}\n")
        guest = LabGuest(os.path.join(run, 'guest'), disks=[('qcow2', str(disk_size))],
                         vmid=VMID, name='restorebench').start()
        fill_disk(guest, 'vd0', disk_size, data, run)
        newest = backups(guest, config_dir, dumpdir, args.incs, parse_size(args.change),
                         disk_size, run)
        settle()
        size = allocated(guest.disk_path(0))
        say(f"run {run}; disk {fmt_bytes(disk_size)}, {fmt_bytes(size)} allocated; chain of 1 "
            f"full + {args.incs} incs ({fmt_bytes(parse_size(args.change))} each)")
        warm = Warmer(run, enabled=not args.no_warm_up)
        samples, cpu, checks, fsyncs, breakdown = rounds(guest, config_dir, dumpdir, newest,
                                                         outdir, args.repeat, warm, size)
        hashed = hashed_bytes(os.path.join(run, 'ds'))
        for key, value in info.items():
            say(f"{key}: {value}")
        say(f"load (1/5/15 min): {load_start} at start, {loadavg()} at end")
        say(f"file system: {'ext4 loop, nodiscard' if loop else args.workdir}")
        say("\n| restore | guestvault | qemu-img convert + fsync, same run | ratio | goal | "
            "CPU s: guestvault / convert |")
        say("| --- | --- | --- | --- | --- | --- |")
        for key, base, what in (('raw', 'convert', 'raw, from a datastore'),
                                ('chain', 'convert_chain',
                                 f'qcow2 chain (full + {args.incs} incs), from a dumpdir')):
            ratio = med(samples[key]) / med(samples[base])
            say(f"| {what} | {med(samples[key]):.2f} s{rng_text(samples[key])} | "
                f"{med(samples[base]):.2f} s{rng_text(samples[base])} | {ratio:.2f}x | "
                f"<= {GOALS[key]}x: {verdict(ratio, GOALS[key])} | {med(cpu[key]):.2f} / "
                f"{med(cpu[base]):.2f} |")
        say(f"chain breakdown (medians): the convert {med(samples['convert_chain']):.2f} s of "
            f"which its fsync {med(fsyncs):.2f} s{rng_text(fsyncs)}; the chain's verify alone "
            f"{med(samples['verify_chain']):.2f} s{rng_text(samples['verify_chain'])}, "
            f"{med(cpu['verify_chain']):.2f} CPU s on {os.cpu_count()} hash threads")
        say(f"qemu-img compare with the guest's disk: raw {checks['raw']!r}, chain "
            f"{checks['qcow2']!r}")
        say("\nraw restore, CPU s by thread kind (median): " + ', '.join(
            f"{kind} {med([b.get(kind, 0) for b in breakdown]):.2f}"
            for kind in sorted({k for b in breakdown for k in b})))
        sha = sha256_seconds(hashed)
        say(f"it checks {fmt_bytes(hashed)} of chunk data (the chunks that are not the zero "
            f"chunk); sha256 alone of that is {sha:.2f} CPU s here, {sha / 2:.2f} s on both "
            f"cores, against convert's {med(samples['convert']):.2f} s")
        say(f"raw restore floor, measured (every such chunk read, decompressed and checked on 2 "
            f"threads, nothing written): {med(samples['decode_floor']):.2f} s"
            f"{rng_text(samples['decode_floor'])} = "
            f"{med(samples['decode_floor']) / med(samples['convert']):.2f}x convert; the raw "
            f"restore is {med(samples['raw']) / med(samples['decode_floor']):.2f}x this floor")
        return 0
    finally:
        if guest is not None:
            guest.stop()
        shutil.rmtree(run, ignore_errors=True)
        if loop is not None:
            loop.close()


if __name__ == '__main__':
    sys.exit(main())
