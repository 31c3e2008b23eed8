#!/usr/bin/env python
"""A datastore on S3 against the same datastore on local disk, in one run (issue 12).

A lab guest (prelaunch QEMU, no guest OS) gets ``--data`` of mixed data on a ``--disk-size``
disk (bench/backup_bench.fill_disk). Then, ``--repeat`` times each, alternating so that neither
side always runs on a colder machine:
- a full backup into a fresh local datastore, and into a fresh bucket on a real SeaweedFS cluster
  over loopback (tests/integration/seaweed.py: a master, two volume servers with replication 001,
  a filer and the S3 gateway, all on this machine);
- a raw restore of each, compared with the guest's disk (qemu-img compare).

It prints MiB/s (disk bytes processed per second of the whole run), objects/s (new chunks
stored per second) and the ratio S3 / local for each. Nothing is asserted about speed: loopback S3
measures guestvault's request handling and SeaweedFS's own cost (its replication writes every
chunk twice), not a network.

    .venv/bin/python bench/s3_bench.py [--disk-size 2G] [--data 1G] [--repeat 2]
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
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))

from backup_bench import MiB, fill_disk, fmt_bytes, machine_info, parse_size, say  # noqa: E402
from datastore_bench import load_engine, wait_next_second  # noqa: E402

VMID = 9931


def one_round(run, guest, cluster, storage_id, number):
    """A full backup into a fresh store and a compared raw restore: the figures."""
    from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    config_dir = os.path.join(run, f'etc-{storage_id}-{number}')
    os.makedirs(os.path.join(config_dir, 'guests.d'))
    local_path = os.path.join(run, f'ds-{number}')
    cache = os.path.join(run, f'cache-{number}')
    os.makedirs(local_path, exist_ok=True)
    # an empty datastore, as PBS creates one: its 65536 directories are not the backup's work
    from guestvault_engine.datastore.chunk_store import FileChunkStore
    FileChunkStore(local_path).create()
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    cluster.create_bucket(bucket)
    cluster.configure(config_dir, cache, bucket,
                      extra=f"datastore: local\n\tpath {local_path}\n\n")
    os.sync()
    started = time.monotonic()
    result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                 storage=storage_id, config_dir=config_dir, level='full'))
    backup_seconds = time.monotonic() - started
    disk = result['disks'][0]
    target = os.path.join(run, f'restore-{storage_id}-{number}')
    started = time.monotonic()
    out = run_restore(RestoreRequest(vmid=guest.vmid, storage=storage_id, backup=result['time'],
                                     config_dir=config_dir, target_dir=target, format='raw'))
    restore_seconds = time.monotonic() - started
    guest.qemu_io('vd0', 'flush')
    proc = subprocess.run(['qemu-img', 'compare', '-U', '-f', 'qcow2', '-F', 'raw',
                           guest.disk_path(0), out['disks'][0]['target']],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the restore from {storage_id} differs from the disk: {proc.stdout}")
    shutil.rmtree(target)
    shutil.rmtree(local_path, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    wait_next_second(local_path, guest.vmid)
    return {'backup': backup_seconds, 'restore': restore_seconds,
            'bytes': disk['bytes_processed'], 'chunks': disk['new_chunks'],
            'read_chunks': disk['read_chunks'], 'stored': disk['bytes_written']}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--disk-size', type=parse_size, default=parse_size('2G'))
    parser.add_argument('--data', type=parse_size, default=parse_size('1G'))
    parser.add_argument('--repeat', type=int, default=2)
    parser.add_argument('--workdir', default=None, help='default: a directory under /var/tmp')
    args = parser.parse_args(argv)
    run = tempfile.mkdtemp(prefix='s3-bench-', dir=args.workdir or '/var/tmp')
    load_engine(run)
    from labguest import LabGuest
    from seaweed import SeaweedCluster
    say(machine_info(run, 'zstd'))
    cluster = SeaweedCluster(os.path.join(run, 'seaweed'))
    started = time.monotonic()
    cluster.start()
    say(f"SeaweedFS cluster up in {time.monotonic() - started:.1f} s ({cluster.endpoint})")
    guest = LabGuest(os.path.join(run, 'guest'), disks=[('qcow2', str(args.disk_size))],
                     vmid=VMID).start()
    try:
        fill_disk(guest, 'vd0', args.disk_size, args.data, run)
        say(f"guest disk: {fmt_bytes(args.disk_size)} with {fmt_bytes(args.data)} of data")
        rounds = {'local': [], 's3': []}
        for number in range(args.repeat):
            order = ('local', 's3') if number % 2 == 0 else ('s3', 'local')
            for storage_id in order:
                figures = one_round(run, guest, cluster, storage_id, number)
                rounds[storage_id].append(figures)
                say(f"round {number + 1} {storage_id:5}: backup {figures['backup']:.2f} s, "
                    f"restore {figures['restore']:.2f} s, {figures['chunks']} new chunks")
        report(rounds)
    finally:
        guest.stop()
        cluster.stop()
        shutil.rmtree(run, ignore_errors=True)


def report(rounds):
    def median(side, key):
        return statistics.median(r[key] for r in rounds[side])
    say("\n| step | local datastore | S3 (SeaweedFS, loopback) | S3 / local time |")
    say("| --- | --- | --- | --- |")
    for step in ('backup', 'restore'):
        cells = []
        for side in ('local', 's3'):
            seconds = median(side, step)
            data = median(side, 'bytes') / MiB
            objects = median(side, 'chunks')
            cells.append(f"{seconds:.2f} s, {data / seconds:.0f} MiB/s, "
                         f"{objects / seconds:.0f} objects/s")
        ratio = median('s3', step) / median('local', step)
        say(f"| {step} (full, median of {len(rounds['s3'])}) | {cells[0]} | {cells[1]} | "
            f"{ratio:.2f}x |")
    say(f"\nstored: {fmt_bytes(median('s3', 'stored'))} in {median('s3', 'chunks'):.0f} chunks "
        f"of {median('s3', 'read_chunks'):.0f} read")


if __name__ == '__main__':
    main()
