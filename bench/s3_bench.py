#!/usr/bin/env python
"""A full backup into S3 against the same objects uploaded by plain uploaders, in one run (issue
12, issue 24 goal 5).

A lab guest (prelaunch QEMU, no guest OS) gets ``--data`` of mixed data on a ``--disk-size``
disk (bench/backup_bench.fill_disk). Then, ``--repeat`` rounds, the order of the steps reversed
every other round so that no step always runs on a colder machine:
- a full backup into a fresh local datastore, and into a fresh bucket on a real SeaweedFS cluster
  over loopback (tests/integration/seaweed.py: a master, two volume servers with replication 001,
  a filer and the S3 gateway, all on this machine); each restored raw (timed too) and compared
  with the guest's disk (qemu-img compare, untimed);
- the plain uploaders, each into a fresh bucket, of the same objects: the chunk files of the
  first local full (the same blobs the S3 full stores, checked: same keys, same sizes), under the
  same keys ``.chunks/XXXX/<digest>``: boto3 ``put_object`` on 8 threads, and ``rclone copy``
  (Debian's, ``--transfers 8``, its S3 remote configured by environment variables, no config
  file written).

It prints the medians, the goal's ratio (S3 full / the faster plain uploader, limit 1.3: MET or
MISSED), S3 / local for the full and the restore, the load averages, and where the time goes:
CPU seconds of guestvault's process, QEMU, SeaweedFS and the uploader per step, and the requests
the full made (count, summed seconds and the calling threads' CPU seconds, per kind). Nothing is asserted about speed: loopback S3 measures guestvault's
request handling and SeaweedFS's own cost (its replication writes every chunk twice, on the same
2 cores), not a network.

    .venv/bin/python bench/s3_bench.py [--disk-size 2G] [--data 1G] [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))
sys.path.insert(0, os.path.join(ROOT, 'tests', 'integration'))

from backup_bench import MiB, fill_disk, fmt_bytes, machine_info, parse_size, say  # noqa: E402
from datastore_bench import load_engine, verdict, wait_next_second  # noqa: E402

VMID = 9931
LIMIT = 1.3                 # issue 24, goal 5: S3 full <= 1.3x the plain uploader
UPLOAD_THREADS = 8
RCLONE = '/usr/bin/rclone'
STEPS = ('local', 's3', 'boto3', 'rclone')


def cpu_seconds(pid):
    """utime + stime of a process (its threads included), or 0 when it is gone."""
    try:
        with open(f'/proc/{pid}/stat') as handle:
            fields = handle.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


class CpuMeter:
    """CPU seconds spent during a step by this process, QEMU, SeaweedFS and child processes."""

    def __init__(self, guest, cluster):
        self.pids = {'qemu': [guest.pid()],
                     'seaweed': [proc.pid for proc in cluster._procs.values()]}

    def sample(self):
        own = os.times()
        figures = {'this': own.user + own.system,
                   'child': own.children_user + own.children_system}
        for name, pids in self.pids.items():
            figures[name] = sum(cpu_seconds(pid) for pid in pids)
        return figures

    def timed(self, function):
        """(seconds, CPU seconds per party, result) of ``function()``."""
        before = self.sample()
        started = time.monotonic()
        result = function()
        seconds = time.monotonic() - started
        after = self.sample()
        return seconds, {k: after[k] - before[k] for k in after}, result


class RequestMeter:
    """Counts every S3Bucket request, summing its time and the CPU time of the thread that made
    it (wrapped methods, no engine change)."""

    METHODS = ('__init__', 'put_new', 'put', 'get', 'head', 'objects', 'delete', 'check')

    def __init__(self):
        from guestvault_engine.datastore.backends.s3 import S3Bucket
        self.lock = threading.Lock()
        self.figures = {}
        for name in self.METHODS:
            setattr(S3Bucket, name, self._wrap(name, getattr(S3Bucket, name)))

    def _wrap(self, name, method):
        meter = self

        def timed(self, *args, **kwargs):
            started, cpu = time.monotonic(), time.thread_time()
            try:
                return method(self, *args, **kwargs)
            finally:
                cpu = time.thread_time() - cpu
                with meter.lock:
                    count, seconds, cpu_before = meter.figures.get(name, (0, 0.0, 0.0))
                    meter.figures[name] = (count + 1, seconds + time.monotonic() - started,
                                           cpu_before + cpu)
        return timed

    def take(self):
        with self.lock:
            figures, self.figures = self.figures, {}
        return figures


def full_backup(run, guest, cluster, storage_id, number, meter, requests):
    """A full backup into a fresh store and a raw restore of it (each timed), compared."""
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
    bucket = cluster.create_bucket(f"bench-{uuid.uuid4().hex[:10]}")
    cluster.configure(config_dir, cache, bucket,
                      extra=f"datastore: local\n\tpath {local_path}\n\n")
    os.sync()
    seconds, cpu, result = meter.timed(lambda: run_guest_backup(GuestBackupRequest(
        vmid=guest.vmid, qmp_socket=guest.qmp_socket, storage=storage_id,
        config_dir=config_dir, level='full')))
    made = requests.take()
    disk = result['disks'][0]
    target = os.path.join(run, f'restore-{storage_id}-{number}')
    started = time.monotonic()
    out = run_restore(RestoreRequest(vmid=guest.vmid, storage=storage_id, backup=result['time'],
                                     config_dir=config_dir, target_dir=target, format='raw'))
    restore_seconds = time.monotonic() - started
    requests.take()                     # the restore's GETs are not the full's requests
    guest.qemu_io('vd0', 'flush')
    proc = subprocess.run(['qemu-img', 'compare', '-U', '-f', 'qcow2', '-F', 'raw',
                           guest.disk_path(0), out['disks'][0]['target']],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"the restore from {storage_id} differs from the disk: {proc.stdout}")
    shutil.rmtree(target)
    shutil.rmtree(cache, ignore_errors=True)
    wait_next_second(local_path, guest.vmid)
    return {'seconds': seconds, 'restore': restore_seconds, 'cpu': cpu,
            'read_chunks': disk['read_chunks'], 'bucket': bucket, 'datastore': local_path,
            'requests': made}


def object_tree(datastore, into):
    """Hard links to the datastore's chunk files under ``into/.chunks/XXXX/<digest>`` (only the
    directories that hold one): the objects an S3 full stores, without PBS's 65536 empty
    directories for the uploaders to walk. Returns {key: size}."""
    objects = {}
    chunks = os.path.join(datastore, '.chunks')
    for prefix in sorted(os.listdir(chunks)):
        names = os.listdir(os.path.join(chunks, prefix))
        if not names:
            continue
        os.makedirs(os.path.join(into, '.chunks', prefix))
        for name in names:
            source = os.path.join(chunks, prefix, name)
            os.link(source, os.path.join(into, '.chunks', prefix, name))
            objects[f'.chunks/{prefix}/{name}'] = os.path.getsize(source)
    return objects


def boto3_upload(cluster, tree, objects):
    """put_object of every file on UPLOAD_THREADS threads, one client (what a plain script does)."""
    bucket = cluster.create_bucket(f"plain-{uuid.uuid4().hex[:10]}")
    client = cluster.client()

    def put(key):
        with open(os.path.join(tree, key), 'rb') as handle:
            client.put_object(Bucket=bucket, Key=key, Body=handle.read())
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(put, sorted(objects)))
    return bucket


def rclone_upload(cluster, tree, run):
    """``rclone copy`` of the tree into a fresh bucket; its remote from the environment only."""
    bucket = cluster.create_bucket(f"rclone-{uuid.uuid4().hex[:10]}")
    env = dict(os.environ, RCLONE_CONFIG_GVBENCH_TYPE='s3',
               RCLONE_CONFIG_GVBENCH_PROVIDER='SeaweedFS',
               RCLONE_CONFIG_GVBENCH_ACCESS_KEY_ID=cluster.access_key,
               RCLONE_CONFIG_GVBENCH_SECRET_ACCESS_KEY=cluster.secret_key,
               RCLONE_CONFIG_GVBENCH_ENDPOINT=cluster.endpoint,
               RCLONE_CONFIG_GVBENCH_REGION=cluster.region)
    # loopback http: no proxy, and no CA bundle (rclone's AWS SDK refuses one for its transport)
    for name in ('HTTP_PROXY', 'HTTPS_PROXY', 'http_proxy', 'https_proxy', 'AWS_CA_BUNDLE'):
        env.pop(name, None)
    proc = subprocess.run([RCLONE, '--config', os.path.join(run, 'rclone.conf'), 'copy',
                           '--transfers', str(UPLOAD_THREADS), '--s3-no-check-bucket', tree,
                           f'gvbench:{bucket}'], env=env, check=False, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"rclone copy failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return bucket


def same_objects(cluster, bucket, objects, who):
    """SystemExit unless ``bucket`` holds exactly ``objects`` (key: size) under .chunks/."""
    found = {}
    for page in cluster.client().get_paginator('list_objects_v2').paginate(
            Bucket=bucket, Prefix='.chunks/'):
        found.update((item['Key'], item['Size']) for item in page.get('Contents', ()))
    if found != objects:
        extra = sorted(set(found) ^ set(objects))[:3]
        raise SystemExit(f"{who} stored other objects than the S3 full ({len(found)} against "
                         f"{len(objects)}; first differences {extra})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--disk-size', type=parse_size, default=parse_size('2G'))
    parser.add_argument('--data', type=parse_size, default=parse_size('1G'))
    parser.add_argument('--repeat', type=int, default=3)
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
        meter = CpuMeter(guest, cluster)
        requests = RequestMeter()
        rounds = {step: [] for step in STEPS}
        tree = os.path.join(run, 'objects')
        objects = None
        for number in range(args.repeat):
            order = STEPS if number % 2 == 0 else tuple(reversed(STEPS))
            if objects is None:
                order = STEPS       # the uploaders need the first local full's chunk files
            for step in order:
                if step in ('local', 's3'):
                    figures = full_backup(run, guest, cluster, step, number, meter, requests)
                    if step == 'local' and objects is None:
                        objects = object_tree(figures['datastore'], tree)
                    shutil.rmtree(figures['datastore'], ignore_errors=True)
                    if step == 's3':
                        same_objects(cluster, figures['bucket'], objects, 'the S3 full')
                elif step == 'boto3':
                    seconds, cpu, bucket = meter.timed(
                        lambda: boto3_upload(cluster, tree, objects))
                    same_objects(cluster, bucket, objects, 'boto3')
                    figures = {'seconds': seconds, 'cpu': cpu}
                else:
                    seconds, cpu, bucket = meter.timed(lambda: rclone_upload(cluster, tree, run))
                    same_objects(cluster, bucket, objects, 'rclone')
                    figures = {'seconds': seconds, 'cpu': cpu}
                rounds[step].append(figures)
                say(f"round {number + 1} {step:6}: {figures['seconds']:.2f} s "
                    f"(load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")
        report(rounds, objects)
    finally:
        guest.stop()
        cluster.stop()
        shutil.rmtree(run, ignore_errors=True)


def report(rounds, objects):
    def median(step, key='seconds'):
        return statistics.median(r[key] for r in rounds[step])
    count = len(rounds['s3'])
    stored = sum(objects.values())
    say(f"\nthe objects: {len(objects)} chunks, {fmt_bytes(stored)} "
        f"({median('s3', 'read_chunks'):.0f} chunks read from the disk)")
    say(f"\n| step (median of {count}) | seconds | MiB/s stored | objects/s | CPU s: "
        "guestvault/uploader, QEMU, SeaweedFS |")
    say("| --- | --- | --- | --- | --- |")
    for step in STEPS:
        seconds = median(step)
        cpu = {k: statistics.median(r['cpu'][k] for r in rounds[step])
               for k in rounds[step][0]['cpu']}
        say(f"| {step} | {seconds:.2f} | {stored / MiB / seconds:.0f} | "
            f"{len(objects) / seconds:.0f} | {cpu['this'] + cpu['child']:.2f}, "
            f"{cpu['qemu']:.2f}, {cpu['seaweed']:.2f} |")
    plain = min(median('boto3'), median('rclone'))
    ratio = median('s3') / plain
    say(f"\nS3 full / plain uploader (the faster of boto3 {median('boto3'):.2f} s and rclone "
        f"{median('rclone'):.2f} s): {ratio:.2f}x (limit {LIMIT}) {verdict(ratio, LIMIT)}")
    say(f"S3 full / boto3 on {UPLOAD_THREADS} threads: {median('s3') / median('boto3'):.2f}x; "
        f"S3 full / local full: {median('s3') / median('local'):.2f}x; raw restore: S3 "
        f"{median('s3', 'restore'):.2f} s, local {median('local', 'restore'):.2f} s, "
        f"{median('s3', 'restore') / median('local', 'restore'):.2f}x")
    totals = {}
    for figures in rounds['s3']:
        for name, values in figures['requests'].items():
            totals[name] = [a + b for a, b in zip(totals.get(name, (0, 0.0, 0.0)), values)]
    say("the S3 full's requests per round (count; seconds, and CPU seconds of the calling "
        "threads, summed over threads): " + ', '.join(
            f"{name} {calls / count:.0f} ({seconds / count:.2f} s, {cpu / count:.2f} CPU s)"
            for name, (calls, seconds, cpu) in sorted(totals.items())))
    say(f"load averages: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == '__main__':
    main()
