#!/usr/bin/env python
"""Backup throughput benchmark: guestvault against qemu-img convert, cp and zstd, same data, one run.

A benchmark, not a test: it prints figures and ratios, it never asserts a time. It exits non-zero
only when something fails (a tool, a backup, the final restore check).

What one run does (see bench/README.md):

1. starts a lab guest (tools/labguest.py) with a 4 GiB qcow2 disk and writes 2 GiB of mixed data
   into it through the guest's block device (qemu-io): random, pseudo-text, constant bytes and
   repeated 4 KiB blocks, in 4 MiB extents scattered over the disk, holes for the rest;
2. in each of --repeat rounds: baselines on the disk image (``qemu-img convert -U -O qcow2``,
   ``cp``, ``zstd -1 -T2``), each timed without and with an fsync of its output, then, in
   alternating order, a bare QEMU copy (what qmpbackup's full is), a full guestvault backup and
   the same full with its hash after QEMU's job instead of during it (as before issue 24), then
   a full zstd-compressed one, each backup into a fresh store, with the CPU seconds of this
   process and of QEMU;
3. an incremental chain: a base full, then --repeat times (change 64 MiB, inc; change 256 MiB, inc),
   the changes being 256 KiB writes at distinct random places across the whole disk;
4. checks the newest incremental restores bit-exact (``qemu-img compare`` against the disk), then
   prints medians, ratios and a per-phase timeline of the engine's runs, and cleans up.

Everything (disk, baseline outputs, stores) lives under one directory, so all of it is on the
same filesystem. The guest runs in prelaunch mode and nothing writes to it while a step is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20
GiB = 1 << 30
EXTENT = 4 * MiB          # unit of the initial fill
CHANGE_WRITE = 256 << 10  # unit of the incremental changes (a multiple of the 64 KiB cluster)
VMID = 9901


# --------------------------------------------------------------------------------------- set-up
def load_engine(run_dir):
    """The engine as package ``guestvault_engine`` (tools/engine_loader.py, as the tests do)."""
    os.environ['GUESTVAULT_RUN_DIR'] = run_dir  # where the engine keeps its node locks
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    from engine_loader import load_engine as load
    load()
    from guestvault_engine.run import guest_backup as backup_run
    return backup_run


def set_constant(setting):
    """``--set MODULE.NAME=VALUE``: an engine constant (a number) changed for this run."""
    import importlib
    target, _sep, value = setting.partition('=')
    module_name, _dot, name = target.rpartition('.')
    module = importlib.import_module(f'guestvault_engine.{module_name}')
    if not hasattr(module, name):
        raise SystemExit(f"--set {setting}: guestvault_engine.{module_name} has no {name}")
    old, number = getattr(module, name), float(value)
    setattr(module, name, int(number) if number.is_integer() else number)
    say(f"set {target} = {getattr(module, name)} (was {old})")


def parse_size(text):
    units = {'K': 1 << 10, 'M': MiB, 'G': GiB}
    text = str(text).upper().rstrip('B')
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def say(message):
    print(message, flush=True)


def fmt_bytes(n):
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.1f} MiB"


def fill_disk(guest, disk, disk_size, data_size, scratch_dir, seed=1):
    """data_size bytes of mixed data in 4 MiB extents at seeded random places of the disk."""
    rng = random.Random(seed)
    slots = disk_size // EXTENT
    count = data_size // EXTENT
    if count > slots:
        raise SystemExit(f"--data {data_size} is larger than --disk-size {disk_size}")
    placed = sorted(rng.sample(range(slots), count))
    words = ('the guest of a qemu backup writes blocks bitmaps chain qcow2 image storage node '
             'restore snapshot point in time data journal kernel file system inode extent '
             'cluster network packet log entry error warning info debug request reply').split()
    text_pool = ' '.join(rng.choices(words, k=(12 * MiB) // 6)).encode()[:12 * MiB]
    scratch = os.path.join(scratch_dir, 'extent.bin')
    kinds = {'random': 0, 'text': 0, 'constant': 0, 'repeat4k': 0}
    for n, slot in enumerate(placed):
        offset = slot * EXTENT
        kind = ('random', 'text', 'constant', 'repeat4k')[n % 4]
        kinds[kind] += EXTENT
        if kind == 'constant':
            guest.write(disk, 0x11 + n % 200, offset, EXTENT)
            continue
        if kind == 'random':
            data = rng.randbytes(EXTENT)
        elif kind == 'text':
            start = rng.randrange(len(text_pool) - EXTENT)
            data = text_pool[start:start + EXTENT]
        else:
            data = rng.randbytes(4096) * (EXTENT // 4096)
        with open(scratch, 'wb') as handle:
            handle.write(data)
        guest.write_file(disk, scratch, offset, EXTENT)
    os.unlink(scratch)
    return kinds


def scatter_changes(guest, disk, disk_size, amount, scratch_dir, seed):
    """``amount`` bytes of new random data as 256 KiB writes at distinct places of the disk."""
    rng = random.Random(seed)
    places = rng.sample(range(disk_size // CHANGE_WRITE), amount // CHANGE_WRITE)
    scratch = os.path.join(scratch_dir, f'change-{seed}.bin')
    with open(scratch, 'wb') as handle:
        handle.write(rng.randbytes(CHANGE_WRITE))
    for place in places:
        guest.write_file(disk, scratch, place * CHANGE_WRITE, CHANGE_WRITE)
    os.unlink(scratch)


def settle():
    """Write back whatever an earlier step left dirty (and its deletions), untimed."""
    os.sync()


class Warmer:
    """Give every timed step the same warm memory to write its output's page cache into.

    On this kind of VM, RAM left free for a while goes back to the host (virtio-balloon free page
    reporting, DAMON pageout); the first write of ~2 GiB into page cache after that costs
    ~2.5 s/GiB of kernel time, the next one ~0.25 s/GiB. Without this, whichever step comes first
    after a pause pays it. So right before each timed step a scratch file of the step's output
    size (+256 MiB) is written into page cache and deleted unsynced (no disk I/O): its just-freed,
    host-backed pages are what the timed step then gets.
    """

    def __init__(self, directory, enabled=True):
        self.path = os.path.join(directory, 'warm-up.scratch')
        self.enabled = enabled
        self.seconds = []
        self.cpu = 0.0      # this process's CPU seconds in warm-ups, not the timed steps'

    def __call__(self, size):
        settle()
        if not self.enabled:
            return
        t0, cpu0 = time.monotonic(), sum(os.times()[:2])
        chunk = bytes(8 * MiB)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            written = 0
            while written < size + 256 * MiB:
                written += os.write(fd, chunk)
        finally:
            os.close(fd)
            os.unlink(self.path)
        self.seconds.append(time.monotonic() - t0)
        self.cpu += sum(os.times()[:2]) - cpu0


def fsync_file(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated(path):
    return os.stat(path).st_blocks * 512


# ------------------------------------------------------------------------------------ baselines
def timed_tool(argv, out):
    """Run a tool writing ``out``; seconds without and with the fsync of ``out``, and its size."""
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    t1 = time.monotonic()
    fsync_file(out)
    t2 = time.monotonic()
    size = allocated(out)
    os.unlink(out)
    return {'seconds': t1 - t0, 'seconds_sync': t2 - t0, 'size': size}


def baselines(image, outdir, zstd_cli, with_zstd_b8m, warm):
    size = allocated(image)
    steps = [('qemu-img convert', 'convert.qcow2',
              lambda out: ['qemu-img', 'convert', '-U', '-O', 'qcow2', image, out]),
             ('cp', 'copy.img', lambda out: ['cp', image, out])]
    if zstd_cli:
        steps.append(('zstd -1 -T2', 'image.zst',
                      lambda out: [zstd_cli, '-q', '-f', '-1', '-T2', image, '-o', out]))
        if with_zstd_b8m:
            steps.append(('zstd -1 -T2 -B8M', 'image.zst',
                          lambda out: [zstd_cli, '-q', '-f', '-1', '-T2', '-B8M', image, '-o',
                                       out]))
    results = {}
    for name, filename, argv in steps:
        out = os.path.join(outdir, filename)
        warm(size)
        results[name] = timed_tool(argv(out), out)
    warm(size)
    results['python zstandard l1 t2'] = python_zstd(image, os.path.join(outdir, 'image.pzst'))
    return results


def python_zstd(image, out):
    import zstandard
    t0 = time.monotonic()
    compressor = zstandard.ZstdCompressor(level=1, threads=2)
    with open(image, 'rb') as src, open(out, 'wb') as dst:
        compressor.copy_stream(src, dst, read_size=8 * MiB, write_size=8 * MiB)
        dst.flush()
        t1 = time.monotonic()
        os.fsync(dst.fileno())
    t2 = time.monotonic()
    size = allocated(out)
    os.unlink(out)
    return {'seconds': t1 - t0, 'seconds_sync': t2 - t0, 'size': size}


# --------------------------------------------------------------------------------- engine runs
class Instrument:
    """Time stamps for the engine's phases, without touching the engine's files.

    The log callback stamps each log line; wrappers around the qcow2 format's ``finish_disks``
    (fsync + hash of the images) and ``image_digests`` (a module global, looked up at call time)
    split the finishing step into fsync and hashing.
    """

    def __init__(self, qcow2):
        self.reset()
        original_finish = qcow2.Qcow2Chain.finish_disks
        original_sha = qcow2.image_digests

        def finish_disks(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return original_finish(*args, **kwargs)
            finally:
                self.marks['hash_and_sync'] = time.monotonic() - t0

        def sha256(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return original_sha(*args, **kwargs)
            finally:
                self.marks['sha256'] = self.marks.get('sha256', 0.0) + time.monotonic() - t0
        qcow2.Qcow2Chain.finish_disks = finish_disks
        qcow2.image_digests = sha256

    def reset(self):
        self.t0 = time.monotonic()
        self.lines = []
        self.marks = {}

    def log(self, message):
        self.lines.append((time.monotonic() - self.t0, message))

    def at(self, prefix):
        for t, message in self.lines:
            if message.startswith(prefix):
                return t
        return None


class OverlapProfile:
    """The overlapped hash's timeline (issue 24, goal 3), without touching the engine's files:
    wrappers time-stamp each watch batch (``OverlappedDigests.schedule``), each segment hashed
    (``sha256_range`` as format/overlap.py calls it: wall span and its thread's CPU), the
    bitmaps' read after the job (``PushCapture._written``) and ``digests``."""

    def __init__(self, overlap, capture):
        self.t0 = time.monotonic()
        self.events = []
        self.again = []     # offsets of the segments hashed again after the job
        original_hash = overlap.sha256_range
        profile = self

        def sha256_range(path, offset, length):
            t0, c0 = time.monotonic(), time.thread_time()
            try:
                return original_hash(path, offset, length)
            finally:
                profile.events.append(('hash', t0 - profile.t0, time.monotonic() - profile.t0,
                                       time.thread_time() - c0, length))
        overlap.sha256_range = sha256_range
        original_again = overlap.to_hash_again

        def to_hash_again(hashed, dirty, final):
            again = original_again(hashed, dirty, final)
            profile.again.extend(offset for offset, _length in again)
            return again
        overlap.to_hash_again = to_hash_again
        for cls, name in ((overlap.OverlappedDigests, 'schedule'),
                          (overlap.OverlappedDigests, 'digests'),
                          (capture.PushCapture, '_written')):
            setattr(cls, name, self._stamped(name, getattr(cls, name)))

    def _stamped(self, name, method):
        profile = self

        def wrapper(*args, **kwargs):
            t0 = time.monotonic()
            try:
                return method(*args, **kwargs)
            finally:
                # a batch: the images' sizes then (how far QEMU had written)
                grown = sum(os.path.getsize(p) for p in args[0].paths) \
                    if name == 'schedule' else 0
                profile.events.append((name, t0 - profile.t0, time.monotonic() - profile.t0,
                                       0.0, grown))
        return wrapper

    def reset(self, t0):
        self.t0 = t0
        self.timeline = ''
        self.again = []

        self.events = []

    def summary(self, copy_start, copy_end):
        """The figures of one backup: times relative to the copy's start (the point in time)."""
        hashes = [e for e in self.events if e[0] == 'hash']
        first = {name: next((e for e in self.events if e[0] == name), None)
                 for name in ('_written', 'digests')}
        batches = [e for e in self.events if e[0] == 'schedule']
        written = first['_written']
        job_end = written[1] if written else copy_end     # the bitmaps are read right after it
        after = [h for h in hashes if h[1] >= job_end]
        self.timeline = ' '.join(f"{b[1] - copy_start:.2f}s:{b[4] / MiB:.0f}M" for b in batches)
        return {
            'batches': len(batches),
            'segments hashed': len(hashes),
            'hashed after the job': len(after),
            'hash CPU s': sum(h[3] for h in hashes),
            'hash CPU s after job': sum(h[3] for h in after),
            'hash GiB': sum(h[4] for h in hashes) / GiB,
            'job end': job_end - copy_start,
            'bitmap read s': (written[2] - written[1]) if written else 0.0,
            'digests wait s': (first['digests'][2] - first['digests'][1])
            if first['digests'] else 0.0,
            'copy end': copy_end - copy_start,
            'first hash': (hashes[0][1] - copy_start) if hashes else 0.0,
            'last hash end': (max(h[2] for h in hashes) - copy_start) if hashes else 0.0,
        }


def thread_cpu(pid):
    """{thread id: (name, CPU seconds)} of a process's live threads (not the exited ones)."""
    result = {}
    tick = os.sysconf('SC_CLK_TCK')
    for tid in os.listdir(f'/proc/{pid}/task'):
        try:
            with open(f'/proc/{pid}/task/{tid}/stat') as handle:
                raw = handle.read()
        except FileNotFoundError:
            continue
        name = raw[raw.index('(') + 1:raw.rindex(')')]
        fields = raw.rsplit(')', 1)[1].split()
        result[tid] = (name, (int(fields[11]) + int(fields[12])) / tick)
    return result


def wait_next_second(store, vmid):
    """Backups are named by the second; the engine waits (inside ``duration``) when the previous
    backup has the same name. Start after that second, so only backup work is timed."""
    gdir = os.path.join(store, 'vm', str(vmid))
    names = sorted(n for n in os.listdir(gdir) if not n.startswith('.')) if os.path.isdir(gdir) \
        else []
    if not names:
        return
    last = datetime.strptime(names[-1], '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)
    while datetime.now(timezone.utc).replace(microsecond=0) <= last:
        time.sleep(0.05)


def engine_backup(backup_run, inst, guest, store, config_dir, level, compress, warm, size,
                  profile=None):
    wait_next_second(store, VMID)
    warm(size)
    request = backup_run.GuestBackupRequest(vmid=VMID, qmp_socket=guest.qmp_socket, dumpdir=store,
                                            config_dir=config_dir, level=level, compress=compress)
    inst.reset()
    if profile is not None:
        profile.reset(inst.t0)
    result = backup_run.run_guest_backup(request, log=inst.log)
    wall = time.monotonic() - inst.t0
    if result['level'] != ('inc' if level == 'inc' else 'full'):
        raise RuntimeError(f"asked for level {level}, got {result['level']}")
    disk = result['disks'][0]
    backup_dir = result['backup_dir']
    started = inst.at('starting backup') or 0.0
    pit = inst.at('point in time') or started
    finished = inst.at('backup finished') or pit
    hs = inst.marks.get('hash_and_sync', 0.0)
    overlap = [m for _t, m in inst.lines if m.startswith('hashed ')]
    sha = inst.marks.get('sha256', 0.0)
    return {
        'profile': profile.summary(pit, pit + result['copy_seconds']) if profile else {},
        'wall': wall, 'duration': result['duration'], 'copy_seconds': result['copy_seconds'],
        'bytes_written': result['bytes_written'], 'size': disk['size'],
        'allocated': allocated(os.path.join(backup_dir, disk['file'])),
        'path': backup_dir, 'overlap': overlap[0] if overlap else '',
        'phases': {
            'plan+locks': started,
            'targets+transaction': pit - started,
            'copy (job)': result['copy_seconds'],
            'fsync image': hs - sha,
            'sha256 image': sha,
            'other before "finished"': max(0.0, finished - pit - result['copy_seconds'] - hs),
            'metadata+commit+bitmaps': wall - finished,
        },
    }


def bare_copy(guest, outdir, disk_size, warm, size):
    """What qmpbackup's full is: QEMU's ``blockdev-backup sync=full`` of the same disk into a
    new qcow2 created as the engine creates its target, waited for, closed and fsynced; no hash.
    Timed from creating the target to the fsync (the engine's duration covers both too)."""
    from guestvault_engine.format import qemu_img
    target = os.path.join(outdir, 'bare.qcow2')
    warm(size)
    t0 = time.monotonic()
    qemu_img.create_qcow2(target, disk_size)
    guest.execute('blockdev-add', driver='qcow2', **{'node-name': 'bare-target'},
                  file={'driver': 'file', 'filename': target})
    guest.execute('blockdev-backup', **{'job-id': 'bare-copy', 'device': 'disk0',
                                        'target': 'bare-target', 'sync': 'full'})
    while True:     # the job's end, from QMP events as the engine waits for it
        event = guest.qmp().pull_event(wait=600)
        if event is None:
            raise RuntimeError("the bare copy's job did not end within 600 s")
        data = event.get('data', {})
        if event['event'] in ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED') \
                and data.get('device') == 'bare-copy':
            break
    guest.execute('blockdev-del', **{'node-name': 'bare-target'})
    if event['event'] != 'BLOCK_JOB_COMPLETED' or data.get('error'):
        raise RuntimeError(f"the bare copy failed: {event}")
    t1 = time.monotonic()
    fsync_file(target)
    result = {'seconds': t1 - t0, 'seconds_sync': time.monotonic() - t0,
              'size': allocated(target)}
    os.unlink(target)
    return result


# ------------------------------------------------------------------------------------- report
def restore_chain(store, config_dir, newest, outdir, repeat, warm, size):
    """The newest incremental restored by the engine (verify + one-pass convert + fsync) and by a
    plain ``qemu-img convert`` of the same chain + fsync, ``repeat`` times each."""
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    samples = {'qemu-img convert (chain)': [], 'guestvault restore': []}
    for rnd in range(repeat):
        out = os.path.join(outdir, 'chain.qcow2')
        warm(size)
        samples['qemu-img convert (chain)'].append(
            timed_tool(['qemu-img', 'convert', '-U', '-O', 'qcow2', newest, out], out))
        target = os.path.join(outdir, f'restore{rnd}')
        warm(size)
        t0 = time.monotonic()
        result = run_restore(RestoreRequest(vmid=VMID, dumpdir=store, config_dir=config_dir,
                                            target_dir=target))
        samples['guestvault restore'].append({'seconds_sync': time.monotonic() - t0,
                                              'size': result['disks'][0]['size'],
                                              'chain': result['chain_length']})
        shutil.rmtree(target)
    return samples


def print_restores(samples, incs):
    convert = statistics.median(s['seconds_sync'] for s in samples['qemu-img convert (chain)'])
    restore = statistics.median(s['seconds_sync'] for s in samples['guestvault restore'])
    say(f"restore of the newest incremental (chain of 1 full + {incs} incs), medians, with fsync")
    say(f"  qemu-img convert of the chain      {convert:8.2f} s")
    say(f"  guestvault restore (verify+convert) {restore:7.2f} s")
    verdict = 'MET' if restore <= 1.1 * convert else 'MISSED'
    say(f"  restore / convert                   {restore / convert:7.2f}x   (target <= 1.10x) "
        f"{verdict}")


def med(samples, key):
    return statistics.median(s[key] for s in samples)


def med_phases(samples):
    return {k: statistics.median(s['phases'][k] for s in samples) for k in samples[0]['phases']}


def spread(samples, key):
    values = sorted(s[key] for s in samples)
    return f"{values[0]:.2f}-{values[-1]:.2f}" if len(values) > 1 else ""


def cpu_seconds(qemu_pid):
    """(this process's CPU seconds, all threads; QEMU's), for the CPU profile of a step."""
    with open(f'/proc/{qemu_pid}/stat') as handle:
        fields = handle.read().rsplit(')', 1)[1].split()
    own = os.times()
    return own.user + own.system, (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def with_cpu(guest, step, *args, warm=None):
    """Run ``step(*args)``; its result with the CPU seconds it took here (without ``warm``'s
    page-cache warm-up, when given) and in QEMU, and QEMU's by thread name (the lab guest of
    --only full names its threads)."""
    warm_cpu0 = warm.cpu if warm else 0.0
    own0, qemu0 = cpu_seconds(guest.pid())
    threads0 = thread_cpu(guest.pid())
    result = step(*args)
    own1, qemu1 = cpu_seconds(guest.pid())
    threads1 = thread_cpu(guest.pid())
    by_thread = {}
    for tid, (name, cpu) in threads1.items():
        by_thread[name] = by_thread.get(name, 0.0) + cpu - threads0.get(tid, (name, 0.0))[1]
    by_thread['(threads that ended)'] = qemu1 - qemu0 - sum(by_thread.values())
    result.update(cpu_engine=own1 - own0 - ((warm.cpu - warm_cpu0) if warm else 0.0),
                  cpu_qemu=qemu1 - qemu0, qemu_threads=by_thread)
    return result


def loadavg():
    with open('/proc/loadavg') as handle:
        return ' '.join(handle.read().split()[:3])


def machine_info(workdir, zstd_cli):
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True,
                                  check=False).stdout.splitlines()[0]
        except (OSError, IndexError):
            return 'n/a'
    fs = subprocess.run(['df', '--output=fstype', workdir], capture_output=True,
                        text=True, check=False).stdout.split()[-1:]
    mem = 0
    with open('/proc/meminfo') as handle:
        for line in handle:
            if line.startswith('MemTotal:'):
                mem = int(line.split()[1]) * 1024
    return {
        'nproc': os.cpu_count(),
        'cpu': next((row.split(':', 1)[1].strip() for row in open('/proc/cpuinfo')
                     if row.startswith('model name')), 'n/a'),
        'memory': fmt_bytes(mem),
        'kernel': platform.release(),
        'qemu': first_line(['qemu-system-x86_64', '--version']),
        'qemu-img': first_line(['qemu-img', '--version']),
        'zstd': first_line([zstd_cli, '--version']) if zstd_cli else 'not installed',
        'python': platform.python_version(),
        'workdir': f"{workdir} ({fs[0] if fs else '?'})",
    }


def print_report(info, setup, base, fulls, fullz, fulla, base_full, incs, args, check):
    line = '-' * 100
    say('\n' + '=' * 100)
    say("guestvault backup benchmark — medians of %d runs (min-max in brackets)" % args.repeat)
    say('=' * 100)
    for key, value in info.items():
        say(f"  {key:10s} {value}")
    say(f"  disk      {fmt_bytes(setup['virtual'])} qcow2, {fmt_bytes(setup['data'])} guest data "
        f"({', '.join(f'{k} {fmt_bytes(v)}' for k, v in setup['kinds'].items())}); image file "
        f"{fmt_bytes(setup['image_allocated'])} allocated; filled through the guest in "
        f"{setup['fill_seconds']:.1f} s")
    say("  page cache: the image is cached (RAM >> image) for every step alike; outputs are "
        "written through the page cache, hence the fsync columns")

    say(line)
    say(f"{'step':34s} {'time':>8s} {'+fsync':>8s} {'range(+fsync)':>14s} {'output':>11s}"
        f" {'MiB/s data':>10s}")
    say(line)
    data = setup['data']
    for name, samples in base.items():
        t, ts = med(samples, 'seconds'), med(samples, 'seconds_sync')
        say(f"{name:34s} {t:8.2f} {ts:8.2f} {spread(samples, 'seconds_sync'):>14s} "
            f"{fmt_bytes(med(samples, 'size')):>11s} {data / MiB / ts:10.0f}")
    for name, samples in (('guestvault full', fulls), ('guestvault full zstd', fullz),
                          ('full, hashed after the job', fulla)):
        d = med(samples, 'duration')
        say(f"{name + ' (duration)':34s} {'':8s} {d:8.2f} {spread(samples, 'duration'):>14s} "
            f"{fmt_bytes(med(samples, 'allocated')):>11s} {data / MiB / d:10.0f}")
        say(f"{'  copy_seconds (QEMU job only)':34s} {med(samples, 'copy_seconds'):8.2f}")
        say(f"{'  wall (run_guest_backup call)':34s} {'':8s} {med(samples, 'wall'):8.2f} "
            f"{spread(samples, 'wall'):>14s}")
        say(f"{'  engine bytes_written':34s} {fmt_bytes(med(samples, 'bytes_written')):>17s}"
            "   (guest data stored in the backup image)")
    say(line)

    conv = med(base['qemu-img convert'], 'seconds_sync')
    conv_ns = med(base['qemu-img convert'], 'seconds')
    full_d, full_c, full_w = med(fulls, 'duration'), med(fulls, 'copy_seconds'), med(fulls, 'wall')
    fz_d, fz_w = med(fullz, 'duration'), med(fullz, 'wall')
    zname = 'zstd -1 -T2' if 'zstd -1 -T2' in base else 'python zstandard l1 t2'
    zs = med(base[zname], 'seconds_sync')
    zsize = med(base[zname], 'size')
    say("ratios (headline: against the fsynced baselines — a backup must be durable)")
    say(f"  full duration / qemu-img convert+fsync   {full_d / conv:5.2f}x   (target <= 1.10x) "
        f"{'MET' if full_d / conv <= 1.10 else 'MISSED'}")
    say(f"  full wall     / qemu-img convert+fsync   {full_w / conv:5.2f}x")
    say(f"  full copy_seconds / qemu-img convert+fsync {full_c / conv:5.2f}x   (the QEMU job "
        f"alone; it flushes its target before it ends; vs convert without fsync "
        f"{full_c / conv_ns:.2f}x)")
    bare = med(base['bare QEMU copy'], 'seconds_sync')
    say(f"  full duration / bare QEMU copy+fsync     {full_d / bare:5.2f}x   (target <= 1.15x) "
        f"{'MET' if full_d / bare <= 1.15 else 'MISSED'}   (issue 24, goal 3; load "
        f"{loadavg()})")
    fa_d = med(fulla, 'duration')
    say(f"  full hashed after the job / bare copy    {fa_d / bare:5.2f}x   (the hash not "
        f"overlapped with QEMU's copy, as before; full / it {full_d / fa_d:.2f}x)")
    say("  CPU seconds (medians; this process's threads + QEMU's; the warm-up's read is in "
        "this process's)")
    for name, samples in (('bare QEMU copy', base['bare QEMU copy']), ('full', fulls),
                          ('full, hashed after the job', fulla)):
        say(f"    {name:28s} {med(samples, 'cpu_engine'):5.2f} + {med(samples, 'cpu_qemu'):5.2f}"
            f" = {med(samples, 'cpu_engine') + med(samples, 'cpu_qemu'):5.2f}")
    say(f"  full wall     / bare QEMU copy+fsync     {full_w / bare:5.2f}x   (bare copy / "
        f"convert+fsync {bare / conv:.2f}x)")
    say(f"  full duration / cp+fsync                 {full_d / med(base['cp'], 'seconds_sync'):5.2f}x")
    say(f"  zstd full duration / full duration       {fz_d / full_d:5.2f}x   (target <= 2x) "
        f"{'MET' if fz_d / full_d <= 2 else 'MISSED'}")
    say(f"  zstd full duration / {zname}+fsync {'':{max(0, 13 - len(zname))}s}{fz_d / zs:5.2f}x")
    say(f"  zstd full size / {zname} size   {'':{max(0, 17 - len(zname))}s}"
        f"{med(fullz, 'allocated') / zsize:5.2f}x   ({fmt_bytes(med(fullz, 'allocated'))} vs "
        f"{fmt_bytes(zsize)}; uncompressed full {fmt_bytes(med(fulls, 'allocated'))})")
    say(line)

    say(f"incremental backups (chain base: a full of {base_full['duration']:.2f} s)")
    say(f"{'changed':>10s} {'duration':>9s} {'range':>11s} {'copy_s':>7s} {'wall':>6s} "
        f"{'bytes_written':>14s} {'image':>10s} {'s/changed GiB':>14s} {'vs full':>8s}")
    for amount in sorted(incs):
        samples = incs[amount]
        d = med(samples, 'duration')
        say(f"{fmt_bytes(amount):>10s} {d:9.2f} {spread(samples, 'duration'):>11s} "
            f"{med(samples, 'copy_seconds'):7.2f} {med(samples, 'wall'):6.2f} "
            f"{fmt_bytes(med(samples, 'bytes_written')):>14s} "
            f"{fmt_bytes(med(samples, 'allocated')):>10s} {d / (amount / GiB):14.2f} "
            f"{d / full_d:7.0%}")
    small, large = sorted(incs)[0], sorted(incs)[-1]
    d_small, d_large = med(incs[small], 'duration'), med(incs[large], 'duration')
    if large > small:   # a fit needs two change sizes
        slope = (d_large - d_small) / ((large - small) / GiB)
        fixed = d_small - slope * small / GiB
        say(f"  linear fit: {fixed:.2f} s fixed + {slope:.2f} s per changed GiB "
            f"(full: {full_d / (data / GiB):.2f} s per GiB of guest data, "
            f"{full_d / (setup['virtual'] / GiB):.2f} s per GiB of disk)")
    say(f"  a {fmt_bytes(large)} inc costs {d_large / full_d:.0%} of the full's time for "
        f"{large / data:.0%} of its data and {large / setup['virtual']:.0%} of the disk")
    say(line)

    say("where the engine's time goes (medians, seconds; from log-line time stamps and wrappers)")
    rows = [('full', med_phases(fulls)), ('full zstd', med_phases(fullz)),
            ('hash after', med_phases(fulla))]
    rows += [(f"inc {fmt_bytes(a)}", med_phases(incs[a])) for a in sorted(incs)]
    keys = list(rows[0][1])
    say(f"{'phase':28s}" + ''.join(f"{name:>14s}" for name, phases in rows))
    for key in keys:
        say(f"{key:28s}" + ''.join(f"{phases[key]:14.2f}" for name, phases in rows))
    say(f"{'= wall':28s}" + ''.join(f"{sum(phases.values()):14.2f}" for name, phases in rows))
    say("  (fsync image ~0: the job's target is already durable when the job ends; sha256 image is "
        "the engine's hash of the finished image's segments on every core, read back from page "
        "cache: in full and full zstd the segments are hashed during the copy, behind QEMU's "
        "writes, and those written again after the job: that time is in copy (job))")
    say(line)
    say(f"restore check: {check}")


def full_only(args, guest, backup_run, inst, profile, qcow2, outdir, disk_size, warm, setup,
              config_dir, fresh_store):
    """--only full: rounds of (bare copy, full, full hashed after the job), the order reversed
    every other round; then goal 3's ratio, the CPU by thread and the overlap's profile."""
    samples = {'bare QEMU copy': [], 'full': [], 'full, hashed after the job': []}
    size = setup['image_allocated']
    for rnd in range(args.repeat):
        steps = list(samples)
        if rnd % 2:
            steps.reverse()
        for name in steps:
            if name == 'bare QEMU copy':
                sample = with_cpu(guest, bare_copy, guest, outdir, disk_size, warm, size,
                                  warm=warm)
                sample['duration'] = sample['seconds_sync']
            else:
                store = fresh_store()
                qcow2.Qcow2Chain.hash_during_copy = name == 'full'
                try:
                    sample = with_cpu(guest, engine_backup, backup_run, inst, guest, store,
                                      config_dir, 'full', '0', warm, size, profile, warm=warm)
                finally:
                    qcow2.Qcow2Chain.hash_during_copy = True
                sample['timeline'] = profile.timeline
                sample['again'] = list(profile.again)
                shutil.rmtree(store)
            samples[name].append(sample)
        say(f"round {rnd + 1}: " + ', '.join(f"{name} {samples[name][-1]['duration']:.2f} s"
                                             for name in samples)
            + f" [load {loadavg()}]; full: {samples['full'][-1]['overlap']}")
        say("  full's batches (seconds from the point in time: the images' size then): "
            + samples['full'][-1]['timeline'])
        say("  full's segments hashed again (MiB from the image's start): "
            + ' '.join(str(offset >> 20) for offset in sorted(samples['full'][-1]['again'])))
    bare = med(samples['bare QEMU copy'], 'duration')
    full = med(samples['full'], 'duration')
    say('-' * 100)
    for name, bucket in samples.items():
        rounds = ', '.join(f"{sample['duration']:.2f}" for sample in bucket)
        say(f"{name:28s} {med(bucket, 'duration'):6.2f} s ({rounds})  CPU (no warm-up) "
            f"{med(bucket, 'cpu_engine'):5.2f} + QEMU {med(bucket, 'cpu_qemu'):5.2f}")
    say(f"full / bare QEMU copy+fsync {full / bare:5.2f}x   (target <= 1.15x) "
        f"{'MET' if full / bare <= 1.15 else 'MISSED'}   (issue 24, goal 3; per round "
        + ', '.join(f"{f['duration'] / b['duration']:.2f}"
                    for f, b in zip(samples['full'], samples['bare QEMU copy']))
        + f"; load {loadavg()})")
    say("QEMU's CPU seconds by thread (medians)")
    names = sorted({n for bucket in samples.values() for s in bucket for n in s['qemu_threads']})
    say(f"  {'thread':24s}" + ''.join(f"{name[:26]:>28s}" for name in samples))
    for thread in names:
        say(f"  {thread:24s}" + ''.join(
            f"{statistics.median(s['qemu_threads'].get(thread, 0.0) for s in bucket):28.2f}"
            for bucket in samples.values()))
    say("the engine's runs: phases and the overlapped hash (medians; times from the point in time)")
    rows = [(name, bucket) for name, bucket in samples.items() if name != 'bare QEMU copy']
    say(f"  {'':28s}" + ''.join(f"{name[:30]:>32s}" for name, _bucket in rows))
    for key in rows[0][1][0]['phases']:
        say(f"  {key:28s}" + ''.join(
            f"{statistics.median(s['phases'][key] for s in bucket):32.2f}" for _n, bucket in rows))
    for key in samples['full'][0]['profile']:
        say(f"  {key:28s}" + ''.join(
            f"{statistics.median(s['profile'][key] for s in bucket):32.2f}" if bucket[0]['profile']
            and 'after' not in name else f"{'':32s}" for name, bucket in rows))
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump(samples, handle, indent=2, default=str)


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench',
                        help='parent of the run directory; put it on the storage filesystem')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--disk-size', default='4G')
    parser.add_argument('--data', default='2G')
    parser.add_argument('--changes', default='64M,256M', help='incremental change sizes')
    parser.add_argument('--zstd-b8m', action='store_true',
                        help='also time zstd CLI with -B8M (FACTS.md: faster at -1)')
    parser.add_argument('--no-warm-up', action='store_true',
                        help='skip the page-cache warm-up before each timed step')
    parser.add_argument('--json', help='also write the raw figures to this file')
    parser.add_argument('--keep', action='store_true', help='keep the run directory')
    parser.add_argument('--only', choices=('full',),
                        help="full: only goal 3, the bare QEMU copy against the full (and the "
                             "full hashed after the job), alternating, with the overlapped "
                             "hash's profile; no baselines, incrementals or restores")
    parser.add_argument('--set', action='append', default=[], metavar='MODULE.NAME=VALUE',
                        help="set an engine constant for this run (an experiment), e.g. "
                             "format.qcow2.SEGMENT_SIZE=4194304; printed with the results")
    args = parser.parse_args(argv)

    disk_size, data_size = parse_size(args.disk_size), parse_size(args.data)
    changes = [parse_size(c) for c in args.changes.split(',')]
    os.makedirs(args.workdir, exist_ok=True)
    run = tempfile.mkdtemp(prefix='run-', dir=args.workdir)
    run_dir, config_dir, outdir = (os.path.join(run, n) for n in ('run', 'etc', 'out'))
    for path in (run_dir, config_dir, outdir):
        os.makedirs(path)
    backup_run = load_engine(run_dir)
    from labguest import LabGuest
    from guestvault_engine.format import overlap, qcow2
    from guestvault_engine.guest import capture
    for setting in args.set:
        set_constant(setting)
    inst = Instrument(qcow2)
    warm = Warmer(run, enabled=not args.no_warm_up)
    zstd_cli = shutil.which('zstd')
    started = time.monotonic()
    guest = None
    stores = iter(range(1000))

    def fresh_store():
        path = os.path.join(run, f'store{next(stores)}')
        os.makedirs(path)
        return path

    load_start = loadavg()
    try:
        info = machine_info(run, zstd_cli)
        say(f"run directory {run}")
        # (QEMU names its threads for --only full's CPU by thread: main, worker, CPU, ...)
        guest = LabGuest(os.path.join(run, 'guest'), disks=[('qcow2', str(disk_size))],
                         extra_args=['-name', 'debug-threads=on'] if args.only else [],
                         vmid=VMID, name='bench').start()
        image = guest.disk_path(0)
        if os.stat(image).st_dev != os.stat(outdir).st_dev:
            raise RuntimeError("disk and outputs are not on one filesystem")
        t0 = time.monotonic()
        kinds = fill_disk(guest, 'vd0', disk_size, data_size, run)
        guest.qemu_io('vd0', 'flush')  # QEMU's qcow2 metadata cache to the file, for the tools
        fill_seconds = time.monotonic() - t0
        settle()
        setup = {'virtual': disk_size, 'data': data_size, 'kinds': kinds,
                 'fill_seconds': fill_seconds, 'image_allocated': allocated(image)}
        say(f"filled {fmt_bytes(data_size)} in {fill_seconds:.1f} s; image "
            f"{fmt_bytes(setup['image_allocated'])}")

        if args.only == 'full':
            profile = OverlapProfile(overlap, capture)
            full_only(args, guest, backup_run, inst, profile, qcow2, outdir, disk_size, warm,
                      setup, config_dir, fresh_store)
            return 0
        base, fulls, fullz, fulla = {}, [], [], []
        for rnd in range(args.repeat):
            measured = baselines(image, outdir, zstd_cli, args.zstd_b8m, warm)
            for name, sample in measured.items():
                base.setdefault(name, []).append(sample)
            # the bare copy and the full alternate: first one, then the other, round by round
            # (and the full hashed after the job, as before the overlap, between them)
            steps = [('bare', None), ('0', fulls), ('after', fulla), ('zstd', fullz)]
            if rnd % 2:
                steps[:3] = steps[2::-1]
            for compress, bucket in steps:
                if compress == 'bare':
                    base.setdefault('bare QEMU copy', []).append(with_cpu(
                        guest, bare_copy, guest, outdir, disk_size, warm,
                        setup['image_allocated']))
                    continue
                store = fresh_store()
                qcow2.Qcow2Chain.hash_during_copy = compress != 'after'
                try:
                    sample = with_cpu(guest, engine_backup, backup_run, inst, guest, store,
                                      config_dir, 'full', '0' if compress == 'after' else compress,
                                      warm, setup['image_allocated'])
                finally:
                    qcow2.Qcow2Chain.hash_during_copy = True
                bucket.append(sample)
                shutil.rmtree(store)
            say(f"round {rnd + 1}: convert {base['qemu-img convert'][-1]['seconds_sync']:.2f} s, "
                f"cp {base['cp'][-1]['seconds_sync']:.2f} s, bare QEMU copy "
                f"{base['bare QEMU copy'][-1]['seconds_sync']:.2f} s, full "
                f"{fulls[-1]['duration']:.2f} s (copy {fulls[-1]['copy_seconds']:.2f}), hashed "
                f"after the job {fulla[-1]['duration']:.2f} s, zstd full "
                f"{fullz[-1]['duration']:.2f} s [{time.monotonic() - started:.0f} s elapsed, "
                f"load {loadavg()}]; full: {fulls[-1]['overlap']}")

        store = fresh_store()
        base_full = engine_backup(backup_run, inst, guest, store, config_dir, 'full', '0', warm,
                                  setup['image_allocated'])
        incs = {amount: [] for amount in changes}
        seed = 100
        for rnd in range(args.repeat):
            for amount in changes:
                seed += 1
                scatter_changes(guest, 'vd0', disk_size, amount, run, seed)
                sample = engine_backup(backup_run, inst, guest, store, config_dir, 'inc', '0',
                                       warm, amount)
                if sample['bytes_written'] != amount:
                    say(f"  note: inc after {fmt_bytes(amount)} of changes wrote "
                        f"{fmt_bytes(sample['bytes_written'])}")
                incs[amount].append(sample)
            say(f"round {rnd + 1}: " + ', '.join(
                f"inc {fmt_bytes(a)} {incs[a][-1]['duration']:.2f} s" for a in changes)
                + f" [{time.monotonic() - started:.0f} s elapsed]")

        newest = os.path.join(incs[changes[-1]][-1]['path'], 'vd0.qcow2')
        guest.qemu_io('vd0', 'flush')
        proc = subprocess.run(['qemu-img', 'compare', '-U', newest, image],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"newest incremental does not restore the disk: "
                               f"{proc.stdout.strip()} {proc.stderr.strip()}")
        check = (f"newest incremental (chain of 1 full + {args.repeat * len(changes)} incs) "
                 f"matches the disk: {proc.stdout.strip()}")
        restores = restore_chain(store, config_dir, newest, outdir, args.repeat, warm,
                                 allocated(image))
        info['bench time'] = f"{time.monotonic() - started:.0f} s"
        info['load'] = (f"{load_start} at start, {loadavg()} at end (1/5/15 min, "
                        "including other users' jobs)")
        if warm.seconds:
            info['warm-up'] = (f"{len(warm.seconds)} page-cache warm-ups, median "
                               f"{statistics.median(warm.seconds):.2f} s, max "
                               f"{max(warm.seconds):.2f} s (untimed; see Warmer)")
        else:
            info['warm-up'] = "off (--no-warm-up)"
        print_report(info, setup, base, fulls, fullz, fulla, base_full, incs, args, check)
        print_restores(restores, args.repeat * len(changes))
        if args.json:
            with open(args.json, 'w') as handle:
                json.dump({'info': info, 'setup': setup, 'baselines': base, 'full': fulls,
                           'full_zstd': fullz, 'base_full': base_full,
                           'incremental': {str(k): v for k, v in incs.items()}},
                          handle, indent=2, default=str)
        return 0
    finally:
        if guest is not None:
            guest.stop()
        if not args.keep:
            shutil.rmtree(run, ignore_errors=True)
            try:
                os.rmdir(args.workdir)  # only if nothing else is in it
            except OSError:
                pass


if __name__ == '__main__':
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # one line, non-zero: something failed
        import traceback
        traceback.print_exc()
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
