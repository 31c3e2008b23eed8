#!/usr/bin/env python
"""Live restore: how soon the guest runs, for a small and a large disk (issue 13).

For each ``--sizes`` disk (default 256M and 4G) a lab guest (prelaunch QEMU, no OS) gets half of
its disk in mixed data (bench/backup_bench.fill_disk) and one full backup, for each of
``--formats``: into a dumpdir (a qcow2 chain) and into a datastore (read live through the NBD
server over the snapshot). Then,
``--repeat`` times each, alternating:
- a live restore (``restore live=true``) onto a new guest started by a real start command: the
  seconds until it runs (the call's return), and until QEMU's background copy is done;
- a normal restore of the same backup (qemu-img convert, verified): its seconds.

The targets: time until the guest runs <= 5 s, and about the same for both sizes (issue 13);
from a datastore, the background copy done <= 1.3x the plain restore of the same backup, same
run (issue 24; the ratio of the medians, the copy counted from the call's start). It prints the
figures, the CPU seconds QEMU and the NBD server spent until the copy was done, the load
averages and MET/MISSED; it asserts nothing.

    .venv/bin/python bench/live_restore_bench.py [--sizes 256M,4G] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))

from backup_bench import fill_disk, fmt_bytes, loadavg, machine_info, parse_size, say  # noqa: E402
from datastore_bench import load_engine  # noqa: E402

SOURCE_VMID, NEW_VMID = 9941, 9942
TARGET_SECONDS = 5.0
COPY_RATIO = 1.3        # a datastore's background copy / its plain restore
STARTER = """
import os, sys
sys.path.insert(0, {tools!r})
from labguest import LabGuest


class Restored(LabGuest):
    def disk_path(self, index):
        return os.environ['GUESTVAULT_DISK_VD0']


Restored({workdir!r}, disks=[('qcow2', 0)], vmid={vmid}).start()
"""


def one_size(run, size, repeat, kind):
    from labguest import LabGuest
    from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    base = os.path.join(run, f'{kind}-{size}')
    config_dir = os.path.join(base, 'etc')
    os.makedirs(os.path.join(config_dir, 'guests.d'))
    if kind == 'datastore':
        os.makedirs(os.path.join(base, 'ds'))
        with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
            handle.write(f"datastore: ds\n\tpath {os.path.join(base, 'ds')}\n")
        where = {'storage': 'ds'}
    else:
        os.makedirs(os.path.join(base, 'dump'))
        where = {'dumpdir': os.path.join(base, 'dump')}
    source = LabGuest(os.path.join(base, 'source'), disks=[('qcow2', str(size))],
                      vmid=SOURCE_VMID).start()
    try:
        fill_disk(source, 'vd0', size, size // 2, base)
        run_guest_backup(GuestBackupRequest(vmid=SOURCE_VMID, qmp_socket=source.qmp_socket,
                                            config_dir=config_dir, **where))
    finally:
        source.stop()
    figures = {'running': [], 'copied': [], 'restore': [], 'cpu_qemu': [], 'cpu_server': []}
    for number in range(repeat):
        order = ('live', 'plain') if number % 2 == 0 else ('plain', 'live')
        for kind in order:
            target = os.path.join(base, f'{kind}-{number}')
            if kind == 'plain':
                started = time.monotonic()
                run_restore(RestoreRequest(vmid=SOURCE_VMID, config_dir=config_dir,
                                           target_dir=target, **where))
                figures['restore'].append(time.monotonic() - started)
            else:
                running, copied, cpu = live_once(base, config_dir, where, target, number)
                figures['running'].append(running)
                figures['copied'].append(copied)
                figures['cpu_qemu'].append(cpu['qemu'])
                figures['cpu_server'].append(cpu['server'])
            shutil.rmtree(target, ignore_errors=True)
    return figures


def live_once(base, config_dir, where, target, number):
    from labguest import LabGuest
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    workdir = os.path.join(base, f'restored-{number}')
    os.makedirs(workdir)
    script = os.path.join(workdir, 'start.py')
    with open(script, 'w') as handle:
        handle.write(STARTER.format(tools=os.path.join(ROOT, 'tools'), workdir=workdir,
                                    vmid=NEW_VMID))
    with open(os.path.join(config_dir, 'guests.d', f'{NEW_VMID}.conf'), 'w') as handle:
        handle.write(f"qmp: {os.path.join(workdir, 'qmp.sock')}\n"
                     f"start: {sys.executable} {script}\n")
    started = time.monotonic()
    result = run_restore(RestoreRequest(vmid=SOURCE_VMID, config_dir=config_dir,
                                        target_dir=target, live=True, new_vmid=NEW_VMID,
                                        **where))
    running = time.monotonic() - started
    handle = LabGuest(workdir, disks=[('qcow2', 0)], vmid=NEW_VMID)
    cpu = {'qemu': 0.0, 'server': 0.0}
    try:
        while any(j['device'] in result['jobs'] for j in handle.execute('query-block-jobs')):
            # the last reading before each process ends (the server exits once QEMU let go)
            for name, pid in (('qemu', handle.pid()), ('server', result.get('server_pid'))):
                cpu[name] = cpu_seconds(pid, cpu[name]) if pid else 0.0
            time.sleep(0.02)
        copied = time.monotonic() - started
    finally:
        handle.execute('quit')
        handle.wait_exit(timeout=300)
    return running, copied, cpu


def cpu_seconds(pid, last):
    """User + system CPU seconds of process ``pid`` so far; ``last`` once it has ended."""
    try:
        with open(f'/proc/{pid}/stat') as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return last
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def rounded(values):
    return '[' + ', '.join(f'{value:.2f}' for value in values) + ']'


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--sizes', default='256M,4G')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--formats', default='qcow2-chain,datastore')
    parser.add_argument('--workdir', default=None, help='default: a directory under /var/tmp')
    args = parser.parse_args(argv)
    run = tempfile.mkdtemp(prefix='live-bench-', dir=args.workdir or '/var/tmp')
    load_start = loadavg()
    load_engine(run)
    say(machine_info(run, 'zstd'))
    rows = []
    try:
        for kind in args.formats.split(','):
            for text in args.sizes.split(','):
                size = parse_size(text)
                figures = one_size(run, size, args.repeat, kind)
                rows.append((kind, size, figures))
                say(f"{kind} {fmt_bytes(size)}: running after {rounded(figures['running'])}, "
                    f"copied after {rounded(figures['copied'])}, plain restore "
                    f"{rounded(figures['restore'])}; CPU seconds of the copy: QEMU "
                    f"{rounded(figures['cpu_qemu'])}, NBD server {rounded(figures['cpu_server'])}")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    say("\n| backups | disk (half full) | guest runs after | copy done after | plain restore | "
        "target |")
    say("| --- | --- | --- | --- | --- | --- |")
    for kind, size, figures in rows:
        running = statistics.median(figures['running'])
        verdict = 'MET' if running <= TARGET_SECONDS else 'MISSED'
        say(f"| {kind} | {fmt_bytes(size)} | {running:.2f} s | {statistics.median(figures['copied']):.2f} s"
            f" | {statistics.median(figures['restore']):.2f} s | <= {TARGET_SECONDS:.0f} s: "
            f"{verdict} |")
    for kind, size, figures in rows:
        if kind == 'datastore':
            ratio = statistics.median(figures['copied']) / statistics.median(figures['restore'])
            say(f"datastore {fmt_bytes(size)}: copy done / plain restore = {ratio:.2f}x "
                f"(<= {COPY_RATIO}x: {'MET' if ratio <= COPY_RATIO else 'MISSED'})")
    say(f"load (1/5/15 min): {load_start} at start, {loadavg()} at end")
    for kind in args.formats.split(','):
        mine = [f for k, _s, f in rows if k == kind]
        if len(mine) > 1:
            first, last = (statistics.median(f['running']) for f in (mine[0], mine[-1]))
            say(f"{kind}: guest runs after, largest / smallest disk = {last / first:.2f}x")


if __name__ == '__main__':
    main()
