#!/usr/bin/env python
"""Single-file restore against a plain restore of the whole disk (issue 13).

A lab guest (prelaunch QEMU, no OS) gets an ext4 disk made on the host (``mkfs.ext4 -d``)
holding ``--data`` of incompressible data in one large file plus a hundred small files, and one
full backup into a dumpdir (a qcow2 chain) and into a datastore. Then, ``--repeat`` times each:

- ``file_restore`` listing ``/`` (one appliance boot: its fixed cost);
- ``file_restore`` extracting one small file into a directory;
- ``file_restore`` extracting the large file into a tar archive (throughput, against ``cp`` of
  the same file on the host, fsync'd);
- a plain ``restore`` of the whole disk (raw, verified), which is what an admin without file
  restore does: restore, loop-mount, copy.

It prints medians and the ratios small-file/plain-restore and large-file/cp; it asserts nothing.

    .venv/bin/python bench/file_restore_bench.py [--data 1G] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))

from backup_bench import fmt_bytes, parse_size, say  # noqa: E402
from datastore_bench import load_engine  # noqa: E402

VMID = 9951
BLOCK = 4 << 20


def make_disk(workdir, data_bytes):
    """A qcow2 holding ext4 with big.bin (data_bytes of incompressible data) and small/NNN."""
    tree = os.path.join(workdir, 'tree')
    os.makedirs(os.path.join(tree, 'small'))
    with open(os.path.join(tree, 'big.bin'), 'wb') as handle:
        block = os.urandom(BLOCK)
        for index in range(data_bytes // BLOCK):
            # every block different (no dedup can cheat), at the cost of one copy per block
            handle.write(index.to_bytes(8, 'little') + block[8:])
    for index in range(100):
        with open(os.path.join(tree, 'small', f'{index:03d}'), 'wb') as handle:
            handle.write(os.urandom(4096 + index))
    size = data_bytes + data_bytes // 4 + (64 << 20)
    raw, disk = os.path.join(workdir, 'disk.raw'), os.path.join(workdir, 'disk.qcow2')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', raw, str(size)], check=True)
    subprocess.run(['mkfs.ext4', '-q', '-F', '-d', tree, raw], check=True, capture_output=True)
    subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', raw, disk], check=True)
    os.unlink(raw)
    return disk, tree


def timed(call):
    started = time.monotonic()
    result = call()
    return time.monotonic() - started, result


def cp_seconds(source, target):
    def copy():
        shutil.copyfile(source, target)
        with open(target, 'rb+') as handle:
            os.fsync(handle.fileno())
    seconds, _result = timed(copy)
    os.unlink(target)
    return seconds


def one_kind(run, kind, disk, tree, repeat):
    from disk_layouts import LayoutGuest  # noqa: E402  (tests/integration, for the guest)
    from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
    from guestvault_engine.run.file_restore import FileRestoreRequest, run_file_restore
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    base = os.path.join(run, kind)
    config_dir = os.path.join(base, 'etc')
    os.makedirs(os.path.join(config_dir, 'guests.d'))
    if kind == 'datastore':
        os.makedirs(os.path.join(base, 'ds'))
        with open(os.path.join(config_dir, 'storage.cfg'), 'w', encoding='utf-8') as handle:
            handle.write(f"datastore: ds\n\tpath {os.path.join(base, 'ds')}\n")
        where = {'storage': 'ds'}
    else:
        os.makedirs(os.path.join(base, 'dump'))
        where = {'dumpdir': os.path.join(base, 'dump')}
    guest = LayoutGuest(os.path.join(base, 'guest'), disk, VMID).start()
    try:
        run_guest_backup(GuestBackupRequest(vmid=VMID, qmp_socket=guest.qmp_socket, config_dir=config_dir,
                                            **where))
    finally:
        guest.stop()
    samples = {'list': [], 'small': [], 'large': [], 'restore': [], 'cp': []}
    accel = None
    for index in range(repeat):
        out = os.path.join(base, f'out{index}')
        seconds, listing = timed(lambda: run_file_restore(FileRestoreRequest(
            vmid=VMID, config_dir=config_dir, paths=['/'], **where)))
        samples['list'].append(seconds)
        accel = listing['appliance_accel']
        seconds, _result = timed(lambda: run_file_restore(FileRestoreRequest(
            vmid=VMID, config_dir=config_dir, paths=['/small/042'], dest=out, **where)))
        samples['small'].append(seconds)
        seconds, _result = timed(lambda: run_file_restore(FileRestoreRequest(
            vmid=VMID, config_dir=config_dir, paths=['/big.bin'], archive=out + '.tar',
            max_size='64G', **where)))
        samples['large'].append(seconds)
        seconds, _result = timed(lambda: run_restore(RestoreRequest(
            vmid=VMID, config_dir=config_dir, target_dir=out + '-disk', format='raw', **where)))
        samples['restore'].append(seconds)
        samples['cp'].append(cp_seconds(os.path.join(tree, 'big.bin'), out + '.cp'))
        for path in (out, out + '-disk'):
            shutil.rmtree(path, ignore_errors=True)
        os.unlink(out + '.tar')
    return samples, accel


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--data', default='1G', help='size of the large file (default 1G)')
    parser.add_argument('--repeat', type=int, default=3)
    parser.add_argument('--kinds', default='qcow2-chain,datastore')
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench')
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    run = tempfile.mkdtemp(prefix='file-restore-', dir=args.workdir)
    load_engine(run)
    sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))
    os.environ.setdefault('GUESTVAULT_APPLIANCE_CACHE', os.path.join(ROOT, '.build', 'appliance'))
    os.environ['GUESTVAULT_WORK_DIR'] = os.path.join(run, 'work')
    data = parse_size(args.data)
    try:
        say(f"making an ext4 disk with a {fmt_bytes(data)} file and 100 small files")
        disk, tree = make_disk(run, data)
        print(f"\nfile restore, {fmt_bytes(data)} large file, medians of {args.repeat}")
        print(f"{'storage':12} {'list /':>8} {'1 small':>8} {'large':>8} {'restore':>8} "
              f"{'cp':>6} {'small/restore':>14} {'large/cp':>9} {'large MiB/s':>12}")
        for kind in args.kinds.split(','):
            samples, accel = one_kind(run, kind, disk, tree, args.repeat)
            m = {key: statistics.median(values) for key, values in samples.items()}
            print(f"{kind:12} {m['list']:8.2f} {m['small']:8.2f} {m['large']:8.2f} "
                  f"{m['restore']:8.2f} {m['cp']:6.2f} {m['small'] / m['restore']:14.2f} "
                  f"{m['large'] / m['cp']:9.1f} {data / m['large'] / (1 << 20):12.0f}"
                  f"   (appliance on {accel})")
    finally:
        shutil.rmtree(run, ignore_errors=True)


if __name__ == '__main__':
    main()
