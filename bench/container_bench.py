#!/usr/bin/env python
"""Container benchmark (issue 22, "Numbers"): suspend mode's frozen time and the vzdump archive's
cost against plain ``tar --zstd``, on real busybox LXC containers, in one run.

A benchmark, not a test: it prints figures, ratios and MET/MISSED against the issue's goals and
never asserts a time. It exits non-zero only when something fails (a tool, a capture, an archive
that does not read through, a suspend copy that lacks the container's last writes).

What one run does (see bench/README.md, "Container benchmark"):

1. one privileged busybox container per ``--trees`` entry (tests/integration/lxc_lab.py), each
   with SIZE of mixed data in COUNT files under /data of its rootfs (default 256M:5000,
   1G:5000 and 1G:20000: the first two differ only in bytes, the last two only in files);
2. suspend mode (``LxcKind().tree_capture``), ``--repeat`` rounds alternating over the trees:
   the engine's ``TreeReport.frozen_seconds`` next to the frozen time seen from outside (a
   thread polling the container's freezer cgroup), and the final rsync's own seconds; then, on
   the largest tree, rounds where a writer inside the container keeps writing checksummed files
   and, between the two rsyncs (the pre-stop hook), another rewrites ``--changed`` files: the
   copy must hold every journalled file and every rewrite;
3. stop mode: per tree, with the container stopped, ``--repeat`` rounds alternating
   ``write_archive`` (zstd, one thread, as vzdump's default ``zstd: 1``) with GNU tar given
   PVE's flags and the same zstd (``-I 'zstd -q --threads=1'``), and plain ``tar --zstd``;
   each timed with the fsync of its output, CPU seconds of its processes beside it. Each
   archive of the engine is read through (``verify_archive``) after the rounds.

Everything lives in one run directory under ``--workdir``; where that file system has online
``discard`` (every unlink waits for one: removing a 20k-file copy would take minutes) and this
runs as root, on an ext4 loop file system without discard made there (datastore_bench.LoopFs).
Containers, mounts and the loop device are removed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))

from backup_bench import (MiB, Warmer, fmt_bytes, fsync_file, loadavg,  # noqa: E402
                          machine_info, parse_size, say)
from datastore_bench import LoopFs, load_engine, mount_options  # noqa: E402

VMIDS = 9960                 # the trees' containers are 9960, 9961, ...
FROZEN_LIMIT = 1.0           # goal 1: frozen <= 1 s ...
GROWTH_LIMIT = 1.5           # ... and about the same for 4x the data (same file count)
ARCHIVE_LIMIT = 1.2          # goal 2: write_archive <= 1.2x tar with the same zstd
PVE_TAR_FLAGS = ('--one-file-system', '-p', '--sparse', '--numeric-owner', '--acls', '--xattrs',
                 '--xattrs-include=user.*', '--xattrs-include=security.capability')
WRITER_DIR = '/data/writer'
RESULTS = []


def record(section, what, value, limit=None, unit='x'):
    shown = f"{value:.2f}x" if unit == 'x' else f"{value:.3f} {unit}"
    verdict = '' if limit is None else ('MET' if value <= limit else 'MISSED')
    target = '' if limit is None else f"<= {limit:g}" + (unit if unit == 'x' else f" {unit}")
    RESULTS.append({'section': section, 'what': what, 'value': value, 'shown': shown,
                    'target': target, 'verdict': verdict})


def med(values):
    return statistics.median(values)


def span(values):
    return f" [{min(values):.3f}-{max(values):.3f}]" if len(values) > 1 else ''


# ------------------------------------------------------------------------------------ the trees
class Tree:
    """One container and the data in its rootfs."""

    def __init__(self, spec, index):
        size, _sep, count = spec.partition(':')
        self.size, self.count = parse_size(size), int(count or 5000)
        self.vmid = VMIDS + index
        self.name = f"gvbench{index}"
        self.label = f"{fmt_bytes(self.size)}, {self.count} files"
        self.container = self.entry = None

    def create(self, lxcpath):
        from guestvault_engine.guest.registry import GuestEntry
        from lxc_lab import create, rootfs
        self.container = create(lxcpath, self.name)
        self.entry = GuestEntry(vmid=self.vmid, type='lxc', lxc=self.name, lxcpath=lxcpath)
        self.root = rootfs(self.container)
        return fill_tree(os.path.join(self.root, 'data'), self.size, self.count, self.vmid)


def fill_tree(directory, size, count, seed):
    """``count`` files of ``size`` bytes in all (sizes uniform around the mean), 500 a
    directory, a quarter each random, pseudo-text, constant and repeated 4 KiB blocks (as
    backup_bench.fill_disk's extents), written from the host into the rootfs."""
    rng = random.Random(seed)
    mean = size // count
    sizes = [rng.randint(mean // 8, 2 * mean - mean // 8) for _number in range(count)]
    sizes[-1] = max(0, sizes[-1] + size - sum(sizes))
    words = ('the container of a backup writes files journal kernel inode extent archive tar '
             'rsync freeze thaw snapshot log entry error warning info debug request').split()
    text = ' '.join(rng.choices(words, k=(8 * MiB) // 6)).encode()[:8 * MiB]
    block = rng.randbytes(4096)
    for number, length in enumerate(sizes):
        folder = os.path.join(directory, f"d{number // 500:03d}")
        if number % 500 == 0:
            os.makedirs(folder)
        kind = number % 4
        if kind == 0:
            data = rng.randbytes(length)
        elif kind == 1:
            start = rng.randrange(len(text) - length) if length < len(text) else 0
            data = (text * (length // len(text) + 1))[start:start + length]
        elif kind == 2:
            data = bytes([number % 251]) * length
        else:
            data = (block * (length // 4096 + 1))[:length]
        with open(os.path.join(folder, f"f{number:06d}"), 'wb') as handle:
            handle.write(data)
    return sum(sizes)


# --------------------------------------------------------------------------------- suspend mode
class FreezeWatch:
    """The container's freezer state seen from outside, polled every ``interval`` s in a thread:
    ``window()`` is the time from the first poll that saw it freezing or frozen to the first
    that saw it thawed again. Reads the freezer cgroup of its init (cgroup v1 freezer.state,
    or v2 cgroup.events' ``frozen``); where neither is found, ``lxc-info -s``."""

    def __init__(self, container, interval=0.002):
        self.container, self.interval = container, interval
        self.path = self._state_file(container.init_pid())
        self.frozen_at = self.thawed_at = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _state_file(pid):
        with open(f"/proc/{pid}/cgroup") as handle:
            for line in handle:
                _hierarchy, controllers, path = line.rstrip('\n').split(':', 2)
                if 'freezer' in controllers.split(','):
                    candidate = f"/sys/fs/cgroup/freezer{path}/freezer.state"
                elif controllers == '':
                    candidate = f"/sys/fs/cgroup/unified{path}/cgroup.events"
                    if not os.path.exists(candidate):
                        candidate = f"/sys/fs/cgroup{path}/cgroup.events"
                else:
                    continue
                if os.path.exists(candidate) and (candidate.endswith('freezer.state') or
                                                  'frozen' in open(candidate).read()):
                    return candidate
        return None

    def _frozen(self):
        if self.path is None:
            return self.container.state() != 'RUNNING'
        with open(self.path) as handle:
            text = handle.read()
        if self.path.endswith('freezer.state'):
            return text.strip() != 'THAWED'
        return 'frozen 1' in text

    def _poll(self):
        while not self.stopping.is_set():
            frozen = self._frozen()
            now = time.monotonic()
            if frozen and self.frozen_at is None:
                self.frozen_at = now
            elif not frozen and self.frozen_at is not None and self.thawed_at is None:
                self.thawed_at = now
            time.sleep(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.thread.join()

    def window(self):
        if self.frozen_at is None or self.thawed_at is None:
            raise RuntimeError("the freezer poll never saw the container frozen and thawed")
        return self.thawed_at - self.frozen_at

    def source(self):
        return self.path or 'lxc-info -s'


def sync_seconds(lines, which):
    """``(seconds, bytes moved)`` of the ``which`` ('first', 'final') rsync: from the time the
    engine's log said it started to the time it said it finished (``lines``: (time, line))."""
    started = next((at for at, line in lines if line.startswith(f"starting {which} sync")), None)
    for at, line in lines:
        found = re.match(rf"{which} sync finished - transferred (.+) in [0-9.]+s$", line)
        if found and started is not None:
            return at - started, found.group(1)
    raise RuntimeError(f"no '{which} sync' lines in the engine's log: {lines}")


def suspend_once(tree, temp_dir, hook=None, check=None):
    """One suspend-mode capture; ``check(copy_root)`` runs inside it. Returns the figures."""
    from guestvault_engine.guest.kind import LxcKind
    kind, lines = LxcKind(), []
    started = time.monotonic()
    with kind.connect(tree.entry) as guest, FreezeWatch(tree.container) as watch:
        with kind.tree_capture(tree.entry, guest, 'suspend', {'temp_dir': temp_dir},
                               hook or (lambda phase: None),
                               lambda line: lines.append((time.monotonic(), line))) as (
                                   capture, report):
            captured = time.monotonic() - started
            checked = check(capture.root) if check else None
    if os.path.exists(temp_dir):
        raise RuntimeError(f"suspend mode left its copy {temp_dir}")
    first, _bytes = sync_seconds(lines, 'first')
    final, moved = sync_seconds(lines, 'final')
    return {'frozen': report.frozen_seconds, 'outside': watch.window(), 'final_rsync': final,
            'final_moved': moved, 'first_rsync': first, 'capture': captured,
            'watch': watch.source(), 'checked': checked}


def suspend_rounds(trees, args, run):
    samples = {tree.label: [] for tree in trees}
    for number in range(args.repeat):
        for tree in (trees if number % 2 == 0 else trees[::-1]):
            figures = suspend_once(tree, os.path.join(run, 'suspend-copy'))
            samples[tree.label].append(figures)
            say(f"  suspend {tree.label}: frozen {figures['frozen']:.3f} s (outside "
                f"{figures['outside']:.3f} s, final rsync {figures['final_rsync']:.3f} s), first "
                f"rsync {figures['first_rsync']:.1f} s")
    return samples


def writer_rounds(tree, args, run):
    """Suspend captures while the lxc_lab writer runs in the container and, between the two
    rsyncs, ``--changed`` files of /data are rewritten from inside it; the copy must hold the
    journal's files and the rewrites."""
    from lxc_lab import attach, check_journal, start_writer, stop_writer, wait_for_journal
    rng = random.Random(7)
    samples = []
    for number in range(args.repeat):
        directory = f"{WRITER_DIR}{number}"
        picked = sorted(rng.sample(range(tree.count), args.changed))
        names = [f"/data/d{n // 500:03d}/f{n:06d}" for n in picked]
        script = ' '.join(names)
        rewrite = (f"for f in {script}; do dd if=/dev/urandom of=$f bs=4096 count=4 "
                   "conv=notrunc 2>/dev/null; done")

        def hook(phase):
            if phase == 'pre-stop':
                attach(tree.container, rewrite, timeout=300)

        def check(copy):
            journalled = check_journal(copy, directory)
            for name in names:
                mine, theirs = (hashlib.sha256(open(os.path.join(base, name.lstrip('/')),
                                                    'rb').read()).hexdigest()
                                for base in (copy, tree.root))
                if mine != theirs:
                    raise RuntimeError(f"suspend copy of {name} is not the file as rewritten "
                                       "before the freeze")
            return journalled

        start_writer(tree.container, directory)
        try:
            wait_for_journal(tree.container, directory, 10)
            figures = suspend_once(tree, os.path.join(run, 'suspend-copy'), hook, check)
        finally:
            stop_writer(tree.container, directory)
        samples.append(figures)
        say(f"  suspend {tree.label} + writer: frozen {figures['frozen']:.3f} s (outside "
            f"{figures['outside']:.3f} s, final rsync {figures['final_rsync']:.3f} s moved "
            f"{figures['final_moved']}), {figures['checked']} journalled files whole, "
            f"{args.changed} rewrites in the copy")
    return samples


# ---------------------------------------------------------------------------------- stop mode
def cpu_children():
    times = os.times()
    return times.children_user + times.children_system, times.user + times.system


def timed(step, out, warm, size):
    """Run ``step()`` writing ``out``, fsync it (write_archive fsyncs itself); seconds, CPU
    seconds of its processes and of this one, and the output's size; ``out`` is removed."""
    warm(size)
    children, own = cpu_children()
    started = time.monotonic()
    step()
    fsync_file(out)
    seconds = time.monotonic() - started
    children_after, own_after = cpu_children()
    size = os.path.getsize(out)
    return {'seconds': seconds, 'cpu_tools': children_after - children,
            'cpu_python': own_after - own, 'size': size}


def archive_rounds(tree, args, run, warm):
    """With the container stopped (stop mode), write_archive against tar with PVE's flags."""
    from guestvault_engine.format.vzdump_archive.reader import verify_archive
    from guestvault_engine.format.vzdump_archive.writer import write_archive
    from guestvault_engine.guest.kind import LxcKind
    out_dir = os.path.join(run, 'out')
    os.makedirs(out_dir, exist_ok=True)
    archive = os.path.join(out_dir, f"vzdump-lxc-{tree.vmid}-2026_01_01-00_00_00.tar.zst")
    plain = os.path.join(out_dir, 'plain.tar.zst')
    kind = LxcKind()
    samples = {'write_archive': [], 'tar -I zstd --threads=1': [], 'tar --zstd': []}
    with kind.connect(tree.entry) as guest, kind.tree_capture(
            tree.entry, guest, 'stop', {'stopwait': 2}, lambda phase: None,
            lambda line: None) as (capture, _report):
        started = time.monotonic()
        pct_conf, _warnings = kind.pct_conf_text(tree.entry, guest, capture)
        conf_seconds = time.monotonic() - started
        lxc_config = kind.lxc_config_text(guest)
        tar = ['tar', '-cf', plain, *PVE_TAR_FLAGS]
        steps = {
            'write_archive': (archive, lambda: write_archive(
                capture, archive, pct_conf=pct_conf, lxc_config=lxc_config, compress='zstd',
                zstd_threads=1)),
            'tar -I zstd --threads=1': (plain, lambda: subprocess.run(
                tar + ['-I', 'zstd -q --threads=1', '-C', capture.root, '.'], check=True)),
            'tar --zstd': (plain, lambda: subprocess.run(
                tar + ['--zstd', '-C', capture.root, '.'], check=True)),
        }
        names = list(steps)
        for number in range(args.repeat):
            order = names[number % len(names):] + names[:number % len(names)]
            for name in order:
                out, step = steps[name]
                # the warm-up's size: the archive's (about a third of this mixed data)
                samples[name].append(timed(step, out, warm, tree.size // 3))
                if name == 'write_archive' and number == args.repeat - 1:
                    problems = verify_archive(out)
                    if problems:
                        raise RuntimeError(f"the engine's archive does not read through: "
                                           f"{problems}")
                os.unlink(out)
            say(f"  archive {tree.label} round {number + 1}: " + ', '.join(
                f"{name} {samples[name][-1]['seconds']:.2f} s" for name in names))
    return samples, conf_seconds


# ----------------------------------------------------------------------------------- reporting
def report(trees, suspend, writer, writer_tree, archives, info, args):
    say('\n' + '=' * 100)
    say(f"guestvault container benchmark — medians of {args.repeat} rounds [min-max]")
    say('=' * 100)
    for key, value in info.items():
        say(f"  {key:12s} {value}")
    say('\nSuspend mode: frozen time (engine = TreeReport.frozen_seconds; outside = freezer '
        'cgroup polled every 2 ms; final rsync = its own seconds inside the window)')
    say("| tree | frozen (engine) | frozen (outside) | final rsync | first rsync |")
    say("| --- | --- | --- | --- | --- |")
    rows = [(tree.label, suspend[tree.label]) for tree in trees]
    rows.append((f"{writer_tree.label} + writer, {args.changed} files rewritten", writer))
    for label, samples in rows:
        keys = ('frozen', 'outside', 'final_rsync', 'first_rsync')
        values = {k: [s[k] for s in samples] for k in keys}
        say(f"| {label} | {med(values['frozen']):.3f} s{span(values['frozen'])} | "
            f"{med(values['outside']):.3f} s{span(values['outside'])} | "
            f"{med(values['final_rsync']):.3f} s | {med(values['first_rsync']):.2f} s |")
        record('suspend', f"frozen, {label}", med(values['frozen']), FROZEN_LIMIT, 's')
    same_count = [(a, b) for a in trees for b in trees
                  if a.count == b.count and b.size >= 2 * a.size]
    for small, large in same_count:
        growth = med([s['frozen'] for s in suspend[large.label]]) / \
            med([s['frozen'] for s in suspend[small.label]])
        record('suspend', f"frozen {large.label} / {small.label} ({large.size / small.size:.0f}x "
               "the data, same files)", growth, GROWTH_LIMIT)
    same_size = [(a, b) for a in trees for b in trees
                 if a.size == b.size and b.count >= 2 * a.count]
    for few, many in same_size:
        growth = med([s['frozen'] for s in suspend[many.label]]) / \
            med([s['frozen'] for s in suspend[few.label]])
        record('suspend', f"frozen {many.label} / {few.label} ({many.count / few.count:.0f}x "
               "the files, same data)", growth)

    say('\nStop mode: a full archive, zstd with one thread (vzdump\'s default), fsynced; CPU '
        's of the tools (tar, zstd) and of this Python process')
    say("| tree | step | time | CPU tools | CPU python | archive | / tar -I zstd (medians) |")
    say("| --- | --- | --- | --- | --- | --- | --- |")
    for tree in trees:
        samples, conf_seconds = archives[tree.label]
        base = med([s['seconds'] for s in samples['tar -I zstd --threads=1']])
        for name, values in samples.items():
            seconds = [s['seconds'] for s in values]
            say(f"| {tree.label} | {name} | {med(seconds):.2f} s{span(seconds)} | "
                f"{med([s['cpu_tools'] for s in values]):.2f} s | "
                f"{med([s['cpu_python'] for s in values]):.2f} s | "
                f"{fmt_bytes(med([s['size'] for s in values]))} | {med(seconds) / base:.2f}x |")
        say(f"| {tree.label} | pct.conf (tree_bytes of the rootfs, untimed above) | "
            f"{conf_seconds:.2f} s | | | | |")
        ratios = [w['seconds'] / t['seconds'] for w, t in
                  zip(samples['write_archive'], samples['tar -I zstd --threads=1'])]
        record('archive', f"write_archive / tar -I 'zstd --threads=1' (median of the rounds' "
               f"ratios), {tree.label}",
               med(ratios), ARCHIVE_LIMIT)
        plain = [w['seconds'] / t['seconds'] for w, t in
                 zip(samples['write_archive'], samples['tar --zstd'])]
        record('archive', f"write_archive / tar --zstd, {tree.label}", med(plain))

    say('\n| section | what | value | goal | verdict |')
    say('| --- | --- | --- | --- | --- |')
    for row in RESULTS:
        say(f"| {row['section']} | {row['what']} | {row['shown']} | {row['target']} | "
            f"{row['verdict']} |")


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--trees', default='256M:5000,1G:5000,1G:20000',
                        help='SIZE:FILES of each container\'s data')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--changed', type=int, default=200,
                        help='files rewritten (16 KiB each) between the two rsyncs')
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench')
    parser.add_argument('--loop-fs', choices=('auto', 'on', 'off'), default='auto',
                        help='run on an ext4 loop file system without discard (auto: when the '
                        'workdir is mounted with discard and this is root)')
    parser.add_argument('--loop-fs-size', default='24G')
    parser.add_argument('--no-warm-up', action='store_true')
    parser.add_argument('--json', help='also write the raw figures to this file')
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or not shutil.which('lxc-create') or not shutil.which('rsync'):
        raise SystemExit("the container benchmark needs root, lxc and rsync (make deps)")
    os.makedirs(args.workdir, exist_ok=True)
    discard = 'discard' in mount_options(args.workdir)
    loop = None
    if args.loop_fs == 'on' or (args.loop_fs == 'auto' and discard):
        loop = LoopFs(args.workdir, parse_size(args.loop_fs_size))
        os.chmod(loop.mountpoint, 0o755)
    try:
        return bench(args, loop, discard)
    finally:
        if loop is not None:
            loop.close()
        try:
            os.rmdir(args.workdir)   # only if nothing else is in it
        except OSError:
            pass


def bench(args, loop, discard):
    from lxc_lab import lxc_directory
    run = tempfile.mkdtemp(prefix='ct-run-', dir=loop.mountpoint if loop else args.workdir)
    os.chmod(run, 0o755)
    load_engine(run)
    started, load_start = time.monotonic(), loadavg()
    info = machine_info(run, shutil.which('zstd'))
    for key in ('qemu', 'qemu-img'):
        del info[key]
    info['tar'] = subprocess.run(['tar', '--version'], capture_output=True, text=True,
                                 check=False).stdout.splitlines()[0]
    info['rsync'] = subprocess.run(['rsync', '--version'], capture_output=True, text=True,
                                   check=False).stdout.splitlines()[0]
    info['file system'] = (f"ext4 on a loop device (direct I/O, nodiscard) in {args.workdir}"
                           + (', whose file system has online discard' if discard else '')
                           if loop else args.workdir)
    warm = Warmer(run, enabled=not args.no_warm_up)
    trees = [Tree(spec, index) for index, spec in enumerate(args.trees.split(','))]
    try:
        with lxc_directory(run) as lxcpath:
            for tree in trees:
                t0 = time.monotonic()
                written = tree.create(lxcpath)
                say(f"[{time.monotonic() - started:.0f} s] container {tree.name}: "
                    f"{fmt_bytes(written)} in {tree.count} files in {time.monotonic() - t0:.1f} s")
            os.sync()
            say("suspend mode")
            suspend = suspend_rounds(trees, args, run)
            writer_tree = max(trees, key=lambda t: (t.count, t.size))
            writer = writer_rounds(writer_tree, args, run)
            say(f"[{time.monotonic() - started:.0f} s] stop mode archives")
            archives = {tree.label: archive_rounds(tree, args, run, warm) for tree in trees}
        info['bench time'] = f"{time.monotonic() - started:.0f} s"
        info['load'] = f"{load_start} at start, {loadavg()} at end (1/5/15 min)"
        info['warm-ups'] = (f"{len(warm.seconds)} untimed, {sum(warm.seconds):.1f} s"
                            if warm.enabled else 'off')
        report(trees, suspend, writer, writer_tree, archives, info, args)
        if args.json:
            with open(args.json, 'w') as handle:
                json.dump({'info': info, 'suspend': suspend, 'writer': writer,
                           'archives': archives, 'results': RESULTS}, handle, indent=2)
        return 0
    finally:
        shutil.rmtree(run, ignore_errors=True)


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
