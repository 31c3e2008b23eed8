#!/usr/bin/env python
"""Datastore benchmark (issue 11): backups into a PBS-format datastore against qemu-img convert,
borg and zstd on the same data, in one run, printed as ratios.

A benchmark, not a test: it prints figures, ratios and MET/MISSED against the issue's targets,
and never asserts a time. It exits non-zero only when something fails (a tool, a backup, a
restore that does not compare equal, GC check mode and the real run disagreeing).

What one run does (see bench/README.md, "Datastore benchmark"):

1. a lab guest with a 4 GiB qcow2 disk and 2 GiB of mixed data (as bench/backup_bench.py);
2. per --repeat round: ``qemu-img convert -O qcow2`` + fsync; a full into an empty datastore; an
   unchanged second full into it; restores of it as qcow2 and raw (each compared with
   ``qemu-img compare``); an encrypted full, unchanged full and raw restore; and borg (lz4,
   zstd,1, encrypted) and restic on the same disk (bench/peers.py), in one table;
3. incrementals with 256 MiB changed: scattered 256 KiB random writes (as backup_bench), and the
   same amount as 4 MiB chunk-aligned extents, against 0.3 s + reading 256 MiB with ``dd``;
4. dedup: two guests cloned from the first guest's image, each with 5 % of the data rewritten,
   backed up into one datastore, next to ``borg create --chunker-params fixed,4194304`` and
   ``zstd -1 -T0`` of their raw images;
5. scale: garbage_collect over a store of 100k chunks; backup_info and prune over 10k snapshots.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, 'tools'))

import floor  # noqa: E402
from backup_bench import (MiB, Warmer, allocated, fill_disk, fmt_bytes, fsync_file,  # noqa: E402
                          loadavg, machine_info, parse_size, say, scatter_changes, settle,
                          timed_tool)
import peers  # noqa: E402

VMID = 9911
CLONES = (9912, 9913)
SNAP_VMID = 9950
CHUNK = 4 * MiB
POLICY = 'keep-last=3,keep-hourly=24,keep-daily=7,keep-weekly=4,keep-monthly=12,keep-yearly=5'
RESULTS = []     # (section, what, value text, ratio, target, verdict)


def load_engine(run):
    """The engine as ``guestvault_engine``, its locks and fleecing images under ``run``."""
    os.environ['GUESTVAULT_RUN_DIR'] = os.path.join(run, 'run')
    os.environ['GUESTVAULT_FLEECING_DIR'] = os.path.join(run, 'fleecing')
    for name in ('run', 'fleecing'):
        os.makedirs(os.path.join(run, name), exist_ok=True)
    from engine_loader import load_engine as load
    load()


def verdict(value, limit):
    return 'MET' if value <= limit else 'MISSED'


def record(section, what, text, value=None, target=None, limit=None, unit='x'):
    """One line of the results table: ``value`` shown in ``unit`` ('x' a ratio, 's', 'MiB');
    ``limit`` makes it a target (MET/MISSED)."""
    shown = None
    if value is not None:
        shown = f"{value:.2f}x" if unit == 'x' else f"{value:.2f} {unit}"
    RESULTS.append({'section': section, 'what': what, 'value': text, 'figure': value,
                    'shown': shown, 'target': target,
                    'verdict': verdict(value, limit) if limit is not None else ''})


def med(values):
    return statistics.median(values)


def rng_text(values, unit='s'):
    if len(values) < 2:
        return ''
    return f" [{min(values):.2f}-{max(values):.2f} {unit}]"


# --------------------------------------------------------------------------------- datastores
class Lab:
    """The run directory, storage.cfg, and the datastores declared in it."""

    def __init__(self, run):
        self.run = run
        self.config_dir = os.path.join(run, 'etc')
        os.makedirs(os.path.join(self.config_dir, 'guests.d'))
        self.paths = {}

    def datastore(self, storage_id, create_chunks=True, **options):
        """A fresh datastore section; returns (path, seconds to create its chunk store)."""
        from guestvault_engine.datastore.chunk_store import FileChunkStore
        path = os.path.join(self.run, 'ds', storage_id)
        os.makedirs(path)
        lines = [f"datastore: {storage_id}", f"\tpath {path}"]
        lines += [f"\t{key} {value}" for key, value in options.items()]
        with open(os.path.join(self.config_dir, 'storage.cfg'), 'a') as handle:
            handle.write('\n'.join(lines) + '\n\n')
        self.paths[storage_id] = path
        seconds = 0.0
        if create_chunks:   # an empty datastore, as `proxmox-backup-manager datastore create`
            started = time.monotonic()
            FileChunkStore(path).create()
            seconds = time.monotonic() - started
        return path, seconds

    def drop(self, storage_id):
        shutil.rmtree(self.paths[storage_id], ignore_errors=True)


def wait_next_second(path, vmid):
    """Snapshots are named by the second; start after the previous one's second."""
    gdir = os.path.join(path, 'vm', str(vmid))
    names = sorted(n for n in os.listdir(gdir) if n[:1].isdigit()) if os.path.isdir(gdir) else []
    if names:
        last = datetime.strptime(names[-1], '%Y-%m-%dT%H:%M:%SZ').replace(tzinfo=timezone.utc)
        while datetime.now(timezone.utc).replace(microsecond=0) <= last:
            time.sleep(0.05)


def backup(lab, guest, storage_id, level, warm, size):
    from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
    wait_next_second(lab.paths[storage_id], guest.vmid)
    warm(size)
    started = time.monotonic()
    result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                 storage=storage_id, config_dir=lab.config_dir,
                                                 level=level))
    wall = time.monotonic() - started
    if result['level'] != level:
        raise RuntimeError(f"asked for a {level} backup, got {result['level']}: "
                           f"{result.get('level_reason')}")
    disks = result['disks']
    return {'wall': wall, 'duration': result['duration'], 'time': result['time'],
            'copy_seconds': result['copy_seconds'],
            'new_bytes': sum(d['bytes_written'] for d in disks),
            'new_chunks': sum(d['new_chunks'] for d in disks),
            'read_chunks': sum(d['read_chunks'] for d in disks),
            'read_bytes': sum(d['bytes_processed'] for d in disks),
            'reused_chunks': sum(d['reused_chunks'] for d in disks),
            'zero_chunks': sum(d['zero_chunks'] for d in disks)}


def restore_and_compare(lab, guest, storage_id, when, fmt, outdir, warm, size):
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    target = os.path.join(outdir, f'restore-{fmt}')
    warm(size)
    started = time.monotonic()
    result = run_restore(RestoreRequest(vmid=guest.vmid, storage=storage_id, backup=when,
                                        config_dir=lab.config_dir, target_dir=target,
                                        format=fmt))
    seconds = time.monotonic() - started
    path = result['disks'][0]['target']
    guest.qemu_io('vd0', 'flush')
    compared = compare_with_disk(guest, path, fmt, f"the {fmt} restore of {storage_id} {when}")
    shutil.rmtree(target)
    return {'seconds': seconds, 'compare': compared}


def compare_with_disk(guest, path, fmt, what):
    """``qemu-img compare`` of a restored image with the guest's disk; its message, or
    RuntimeError naming ``what`` when they differ."""
    proc = subprocess.run(['qemu-img', 'compare', '-U', '-f', 'qcow2', '-F', fmt,
                           guest.disk_path(0), path], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} differs from the disk: "
                           f"{proc.stdout.strip()} {proc.stderr.strip()}")
    return proc.stdout.strip()


def chunk_bytes(path):
    """Bytes of every chunk file in a datastore (their sizes, as ``du --apparent-size``)."""
    total = count = 0
    chunk_dir = os.path.join(path, '.chunks')
    for name in os.listdir(chunk_dir):
        with os.scandir(os.path.join(chunk_dir, name)) as entries:
            for entry in entries:
                if not entry.name.startswith('.'):
                    total += entry.stat(follow_symlinks=False).st_size
                    count += 1
    return total, count


def dir_bytes(path):
    total = 0
    for folder, _dirs, files in os.walk(path):
        for name in files:
            total += os.lstat(os.path.join(folder, name)).st_size
    return total


# ------------------------------------------------------------------------------ file system
def mount_options(path):
    proc = subprocess.run(['findmnt', '-n', '-o', 'OPTIONS', '--target', path],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip().split(',')


class LoopFs:
    """An ext4 file system in a sparse file of ``workdir``, on a loop device with direct I/O
    (no second page cache), mounted without ``discard``.

    Used when the workdir's file system is mounted with online ``discard``: there every unlink
    and rmdir waits for a discard (~150 per second on the 2-core VM), so removing one datastore's
    65536 prefix directories takes ~7 minutes and a GC removing 50k chunks ~5 minutes, whatever
    the engine does. Everything of the run (guest disks, baseline outputs, datastores) is on
    it, so all of it is on one file system as before."""

    def __init__(self, workdir, size):
        self.image = os.path.join(workdir, f'loopfs-{os.getpid()}.img')
        self.mountpoint = os.path.join(workdir, f'loopfs-{os.getpid()}')
        self.device = None
        with open(self.image, 'wb') as handle:
            handle.truncate(size)
        try:
            subprocess.run(['mkfs.ext4', '-q', '-F', '-E', 'nodiscard', self.image],
                           check=True)
            self.device = subprocess.run(['losetup', '--find', '--show', '--direct-io=on',
                                          self.image], check=True, capture_output=True,
                                         text=True).stdout.strip()
            os.makedirs(self.mountpoint)
            subprocess.run(['mount', '-o', 'nodiscard', self.device, self.mountpoint],
                           check=True)
        except BaseException:
            self.close()
            raise

    def close(self):
        if os.path.ismount(self.mountpoint):
            subprocess.run(['umount', self.mountpoint], check=False)
        if self.device:
            subprocess.run(['losetup', '-d', self.device], check=False)
        for remove in (os.rmdir, os.unlink):
            path = self.mountpoint if remove is os.rmdir else self.image
            try:
                remove(path)
            except OSError:
                pass


# ----------------------------------------------------------------------------------- sections
def full_rounds(lab, guest, args, warm, outdir, image_size, samples):
    """Per round: convert, a full into an empty datastore, an unchanged second full, restores,
    an encrypted full, unchanged full and raw restore in an empty encrypted datastore; and the
    peers (bench/peers.py) on the same disk, before guestvault in odd rounds, after in even."""
    from guestvault_engine.run.encryption_key import create_key
    keydir = os.path.join(lab.run, 'keys')
    os.makedirs(keydir, mode=0o700)
    key = create_key(os.path.join(keydir, 'bench.key'), kdf='none')
    image = guest.disk_path(0)
    peer_run = None if 'peers' in args.skip.split(',') else peers.PeerRun(lab.run, image, warm)
    raw = floor.raw_copy(image, os.path.join(lab.run, 'floor.raw'))   # untimed, the floors' input
    positions, disk_size = floor.data_chunks(raw)

    def read_floors():
        samples['read_floor'].append(floor.read_sha256(raw))
        samples['read_floor_qemu'].append(floor.read_sha256_qemu(
            guest.execute, 'disk0', positions, disk_size, os.path.join(lab.run, 'floor.sock')))
    for rnd in range(args.repeat):
        if peer_run and rnd % 2:
            peer_run.round(rnd)
        out = os.path.join(outdir, 'convert.qcow2')
        warm(image_size)
        samples['convert'].append(timed_tool(['qemu-img', 'convert', '-U', '-O', 'qcow2', image,
                                              out], out))
        plain = f'plain{rnd}'
        _path, created = lab.datastore(plain)
        samples['create_chunk_store'].append(created)

        def floor_with_writes():
            warm(image_size)
            samples['floor'].append(floor.with_writes(raw, os.path.join(lab.run, 'floor')))

        first, _none = floor.in_turn(
            rnd, lambda: backup(lab, guest, plain, 'full', warm, image_size), floor_with_writes)
        samples['full'].append(first)
        floor.in_turn(rnd, lambda: samples['full2'].append(backup(lab, guest, plain, 'full',
                                                                  warm, 0)),
                      read_floors)
        for fmt in ('qcow2', 'raw'):
            samples[f'restore_{fmt}'].append(
                restore_and_compare(lab, guest, plain, first['time'], fmt, outdir, warm,
                                    image_size))
        lab.drop(plain)
        enc = f'enc{rnd}'
        lab.datastore(enc, **{'encryption-key': key['path']})
        enc_full = backup(lab, guest, enc, 'full', warm, image_size)
        samples['full_enc'].append(enc_full)
        samples['full2_enc'].append(backup(lab, guest, enc, 'full', warm, 0))
        samples['restore_raw_enc'].append(
            restore_and_compare(lab, guest, enc, enc_full['time'], 'raw', outdir, warm,
                                image_size))
        lab.drop(enc)
        # a loop file system without discard keeps every freed block in its sparse file: give
        # them back, or the rounds fill the host's disk
        subprocess.run(['fstrim', lab.run], check=False, stderr=subprocess.DEVNULL)
        say(f"round {rnd + 1}: convert {samples['convert'][-1]['seconds_sync']:.2f} s, full "
            f"{first['wall']:.2f} s (floor {samples['floor'][-1]:.2f} s), unchanged full "
            f"{samples['full2'][-1]['wall']:.2f} s "
            f"({samples['full2'][-1]['new_bytes']} new bytes; floor "
            f"{samples['read_floor'][-1]:.2f} s, through QEMU "
            f"{samples['read_floor_qemu'][-1]:.2f} s), restore qcow2 "
            f"{samples['restore_qcow2'][-1]['seconds']:.2f} s / raw "
            f"{samples['restore_raw'][-1]['seconds']:.2f} s, encrypted full "
            f"{samples['full_enc'][-1]['wall']:.2f} s")
        if peer_run and not rnd % 2:
            peer_run.round(rnd)
    if peer_run:
        samples['peers'] = peer_run.result()
        peer_run.close()


def read_changed(image, offset, repeat, amount):
    """Seconds to read ``amount`` bytes of the image from page cache with dd (4 MiB blocks)."""
    times = []
    for _round in range(max(3, repeat)):
        started = time.monotonic()
        subprocess.run(['dd', f'if={image}', 'of=/dev/null', 'bs=4M', f'count={amount // CHUNK}',
                        f'skip={offset // CHUNK}', 'status=none'], check=True)
        times.append(time.monotonic() - started)
    return med(times)


def aligned_changes(guest, disk_size, amount, scratch_dir, seed):
    """``amount`` bytes of random data as whole 4 MiB chunk-aligned extents at random places."""
    rng = random.Random(seed)
    slots = rng.sample(range(disk_size // CHUNK), amount // CHUNK)
    scratch = os.path.join(scratch_dir, f'aligned-{seed}.bin')
    for slot in slots:
        with open(scratch, 'wb') as handle:
            handle.write(rng.randbytes(CHUNK))
        guest.write_file('vd0', scratch, slot * CHUNK, CHUNK)
    os.unlink(scratch)


def incrementals(lab, guest, args, warm, outdir, samples):
    """A base full, then per round: 256 MiB scattered -> inc, 256 MiB chunk-aligned -> inc;
    the newest one restored and compared."""
    lab.datastore('incs')
    backup(lab, guest, 'incs', 'full', warm, 0)
    seed = 500
    last = None
    for rnd in range(args.repeat):
        for kind in ('scattered', 'aligned'):
            seed += 1
            if kind == 'scattered':
                scatter_changes(guest, 'vd0', args.disk_size, args.change, lab.run, seed)
            else:
                aligned_changes(guest, args.disk_size, args.change, lab.run, seed)
            last = backup(lab, guest, 'incs', 'inc', warm, 0)
            samples[f'inc_{kind}'].append(last)
        say(f"round {rnd + 1}: inc {fmt_bytes(args.change)} scattered "
            f"{samples['inc_scattered'][-1]['wall']:.2f} s "
            f"({samples['inc_scattered'][-1]['read_chunks']} chunks read), aligned "
            f"{samples['inc_aligned'][-1]['wall']:.2f} s "
            f"({samples['inc_aligned'][-1]['read_chunks']} chunks read)")
    samples['inc_restore'] = restore_and_compare(lab, guest, 'incs', last['time'], 'raw', outdir,
                                                 warm, 0)
    lab.drop('incs')


def dedup(lab, base, args, warm, outdir, samples):
    """Two guests cloned from ``base``, 5 % of the data each rewritten: one datastore, borg, zstd."""
    from labguest import LabGuest
    guests = []
    try:
        for number, vmid in enumerate(CLONES):
            workdir = os.path.join(lab.run, f'clone{number}')
            os.makedirs(workdir)
            subprocess.run(['cp', '--sparse=always', base, os.path.join(workdir, 'disk0.qcow2')],
                           check=True)
            guest = LabGuest(workdir, disks=[('qcow2', str(args.disk_size))], vmid=vmid,
                             name=f'clone{number}').start()
            guests.append(guest)
            amount = (int(args.data_size * args.dedup_change) // args.dedup_unit) \
                * args.dedup_unit
            rng = random.Random(900 + number)
            places = rng.sample(range(args.disk_size // args.dedup_unit),
                                amount // args.dedup_unit)
            scratch = os.path.join(workdir, 'w.bin')
            for place in places:
                with open(scratch, 'wb') as handle:
                    handle.write(rng.randbytes(args.dedup_unit))
                guest.write_file('vd0', scratch, place * args.dedup_unit, args.dedup_unit)
            os.unlink(scratch)
            guest.qemu_io('vd0', 'flush')
        samples['dedup_written'] = amount
        path, _created = lab.datastore('dedup')
        one = backup(lab, guests[0], 'dedup', 'full', warm, args.data_size)
        one_bytes, one_count = chunk_bytes(path)
        two = backup(lab, guests[1], 'dedup', 'full', warm, args.data_size)
        both_bytes, both_count = chunk_bytes(path)
        samples['dedup'] = {'one': one, 'two': two, 'one_bytes': one_bytes,
                            'one_chunks': one_count, 'both_bytes': both_bytes,
                            'both_chunks': both_count}
        raws = []
        for number, guest in enumerate(guests):
            raw = os.path.join(outdir, f'clone{number}.raw')
            subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw', guest.disk_path(0), raw],
                           check=True)
            raws.append(raw)
        lab.drop('dedup')
    finally:
        for guest in guests:
            guest.stop()
    samples['borg'] = run_borg(lab.run, raws, warm, args.data_size)
    samples['zstd'] = run_zstd(raws, warm, args.data_size)
    for raw in raws:
        os.unlink(raw)


def run_borg(run, raws, warm, size):
    borg = shutil.which('borg')
    if borg is None:
        return None
    repo = os.path.join(run, 'borg-repo')
    env = peers.borg_env(run)
    subprocess.run([borg, 'init', '-e', 'none', repo], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    warm(size)
    started = time.monotonic()
    subprocess.run([borg, 'create', '--chunker-params', 'fixed,4194304', f'{repo}::both'] + raws,
                   env=env, check=True, cwd=os.path.dirname(raws[0]))
    os.sync()   # borg fsyncs its segments itself; this only makes sure (sync, as the others)
    seconds = time.monotonic() - started
    version = subprocess.run([borg, '--version'], capture_output=True, text=True,
                             check=False).stdout.strip()
    result = {'seconds': seconds, 'size': dir_bytes(os.path.join(repo, 'data')),
              'version': version}
    shutil.rmtree(repo)
    return result


def run_zstd(raws, warm, size):
    zstd = shutil.which('zstd')
    if zstd is None:
        return None
    warm(size)
    started = time.monotonic()
    subprocess.run([zstd, '-q', '-f', '-1', '-T0'] + raws, check=True)
    outs = [raw + '.zst' for raw in raws]
    for out in outs:
        fsync_file(out)
    seconds = time.monotonic() - started
    result = {'seconds': seconds, 'size': sum(os.path.getsize(out) for out in outs)}
    for out in outs:
        os.unlink(out)
    return result


# ------------------------------------------------------------------------------------- scale
@contextlib.contextmanager
def no_fsync():
    """Set-up only (untimed): the engine's own stage/commit without an fsync per file; one
    ``sync`` at the end makes it all durable before anything is timed."""
    real = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = real
        os.sync()


def synth_snapshot(store, vmid, when, template, fidx_source=None, fidx_raw=None):
    """A snapshot through the engine's DatastoreStorage.stage/commit and SnapshotCodec."""
    from guestvault_engine.times import format_time
    staged = store.stage(vmid, when)
    fidx = staged.file(template['disks'][0]['file'])
    if fidx_source is not None:
        os.link(fidx_source, fidx)
    else:
        with open(fidx, 'wb') as handle:
            handle.write(fidx_raw)
    staged.write_manifest(dict(template, vmid=vmid, time=format_time(when)))
    staged.commit()


def template_index(disk):
    return {'vmid': SNAP_VMID, 'time': None, 'guest_name': 'bench', 'node': 'bench',
            'level': 'full', 'level_reason': 'synthesized', 'parent': None, 'chain': None,
            'chain_start': None, 'mode': 'snapshot', 'compress': None, 'disks': [disk],
            'duration': 1.0, 'frozen_filesystems': None, 'warnings': [],
            'format': 'pbs-datastore-1', 'tool': 'guestvault bench', 'encrypted': False}


def disk_entry(size, csum):
    return {'id': 'vd0', 'node': 'disk0', 'format': 'qcow2', 'virtual_size': size,
            'file': 'drive-vd0.img.fidx', 'level': 'full', 'bytes_written': 0,
            'bytes_processed': 0, 'size': size, 'csum': csum, 'bitmap': None, 'backing': None}


def gc_scale(lab, args, samples):
    """garbage_collect over --gc-chunks chunk files, half of them named by fixed indexes."""
    from guestvault_engine.datastore import blob, fixed_index
    from guestvault_engine.run.garbage_collect import GarbageCollectRequest, run_garbage_collect
    from guestvault_engine.run.locate import require_storage
    path, created = lab.datastore('gc')
    started = time.monotonic()
    payload = blob.encode_blob(b'x' * 16, compress=False)
    old = time.time() - 2 * 86400
    chunk_dir = os.path.join(path, '.chunks')
    digests = []
    rng = random.Random(7)
    for _round in range(args.gc_chunks):
        digest = rng.randbytes(32)
        name = digest.hex()
        file = os.path.join(chunk_dir, name[:4], name)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, payload)
        os.close(fd)
        os.utime(file, (old, old))
        digests.append(digest)
    referenced = digests[:args.gc_chunks // 2]
    per_index = 1000
    store = require_storage(lab.config_dir, 'gc')
    when = datetime(2024, 1, 1, tzinfo=timezone.utc)
    with no_fsync():
        for number in range(0, len(referenced), per_index):
            part = referenced[number:number + per_index]
            raw = fixed_index.encode_fixed_index(len(part) * CHUNK, b''.join(part))
            csum = fixed_index.parse_fixed_index(raw).index_csum.hex()
            template = template_index(disk_entry(len(part) * CHUNK, csum))
            synth_snapshot(store, SNAP_VMID, when + timedelta(hours=number // per_index),
                           template, fidx_raw=raw)
    build = time.monotonic() - started
    say(f"gc store: {args.gc_chunks} chunks, {len(referenced)} referenced by "
        f"{-(-len(referenced) // per_index)} snapshots; built in {build:.1f} s (+{created:.1f} s "
        "for the 65536 prefix directories)")
    settle()
    started = time.monotonic()
    subprocess.run(f"find {chunk_dir} -type f | wc -l", shell=True, check=True,
                   capture_output=True)
    find = time.monotonic() - started
    checks = []
    for _round in range(args.scale_repeat):
        started = time.monotonic()
        check = run_garbage_collect(GarbageCollectRequest(storage='gc', config_dir=lab.config_dir, check_mode=True))
        checks.append(time.monotonic() - started)
    started = time.monotonic()
    real = run_garbage_collect(GarbageCollectRequest(storage='gc', config_dir=lab.config_dir))
    real_seconds = time.monotonic() - started
    if check['removed_chunks'] != real['removed_chunks'] \
            or real['removed_chunks'] != args.gc_chunks - len(referenced):
        raise RuntimeError(f"GC: check mode would remove {check['removed_chunks']}, the real "
                           f"run removed {real['removed_chunks']}, expected "
                           f"{args.gc_chunks - len(referenced)}")
    samples['gc'] = {'find': find, 'check': checks, 'real': real_seconds,
                     'removed': real['removed_chunks'], 'kept': real['kept_chunks'],
                     'index_files': real['index_files']}
    if args.profile:
        profile_call('garbage_collect check mode', run_garbage_collect,
                     GarbageCollectRequest(storage='gc', config_dir=lab.config_dir, check_mode=True))
    lab.drop('gc')


def snapshot_scale(lab, args, samples, shared_fidx_from):
    """backup_info and prune over --snapshots snapshots sharing one fixed index."""
    from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
    from guestvault_engine.run.locate import require_storage
    from guestvault_engine.run.prune import PruneRequest, run_prune
    path, _created = lab.datastore('snaps', create_chunks=False)
    shared = os.path.join(path, 'shared-drive-vd0.img.fidx')
    shutil.copyfile(shared_fidx_from['fidx'], shared)
    template = dict(shared_fidx_from['index'])
    store = require_storage(lab.config_dir, 'snaps')
    started = time.monotonic()
    first = datetime(2024, 1, 1, tzinfo=timezone.utc)
    with no_fsync():
        for number in range(args.snapshots):
            synth_snapshot(store, SNAP_VMID, first + timedelta(minutes=15 * number), template,
                           fidx_source=shared)
    say(f"snapshot store: {args.snapshots} snapshots (every 15 min from {first:%Y-%m-%d}), "
        f"built in {time.monotonic() - started:.1f} s")
    settle()

    def timed(function, *call_args, **kwargs):
        begun = time.monotonic()
        out = function(*call_args, **kwargs)
        return time.monotonic() - begun, out

    infos, checks = [], []
    for _round in range(args.scale_repeat):
        seconds, listed = timed(run_backup_info, BackupInfoRequest(
            SNAP_VMID, storage='snaps', config_dir=lab.config_dir))
        infos.append(seconds)
    if len(listed['backups']) != args.snapshots:
        raise RuntimeError(f"backup_info lists {len(listed['backups'])} snapshots, not "
                           f"{args.snapshots}")
    request = {'vmid': SNAP_VMID, 'storage': 'snaps', 'config_dir': lab.config_dir}
    for _round in range(args.scale_repeat):
        seconds, check = timed(run_prune, PruneRequest(prune_backups=POLICY, check_mode=True,
                                                       **request))
        checks.append(seconds)
    if args.profile:
        profile_call('backup_info', run_backup_info, BackupInfoRequest(
            SNAP_VMID, storage='snaps', config_dir=lab.config_dir))
    routine_seconds, routine = timed(run_prune, PruneRequest(
        prune_backups=f'keep-last={args.snapshots - 10}', **request))
    mass_seconds, mass = timed(run_prune, PruneRequest(prune_backups=POLICY, **request))
    if sorted(mass['removed']) != sorted(r for r in check['removed'] if r not in
                                         routine['removed']):
        raise RuntimeError("prune removed other snapshots than its check mode named")
    samples['snapshots'] = {'info': infos, 'prune_check': checks,
                            'prune_check_removes': len(check['removed']),
                            'prune_routine': routine_seconds,
                            'prune_routine_removed': len(routine['removed']),
                            'prune_mass': mass_seconds,
                            'prune_mass_removed': len(mass['removed'])}
    lab.drop('snaps')


def profile_call(what, function, *call_args, **kwargs):
    """cProfile of one call (main thread only), its top functions by own time."""
    import cProfile
    import pstats
    profiler = cProfile.Profile()
    profiler.enable()
    function(*call_args, **kwargs)
    profiler.disable()
    say(f"--- profile: {what} (top 12 by own time) ---")
    stats = pstats.Stats(profiler, stream=sys.stdout)
    stats.sort_stats('tottime').print_stats(12)


# ------------------------------------------------------------------------------------- report
def report(args, setup, samples):
    conv = med([s['seconds_sync'] for s in samples['convert']])
    conv_ns = med([s['seconds'] for s in samples['convert']])
    walls = {k: [s['wall'] for s in samples[k]] for k in ('full', 'full2', 'full_enc')}
    full = med(walls['full'])
    full_d = med([s['duration'] for s in samples['full']])
    sec = 'backup'
    record(sec, 'qemu-img convert -O qcow2 + fsync', f"{conv:.2f} s{rng_text([s['seconds_sync'] for s in samples['convert']])} "
           f"(without fsync {conv_ns:.2f} s)")
    record(sec, 'chunk store creation (65536 dirs, not timed in the full)',
           f"{med(samples['create_chunk_store']):.2f} s")
    record(sec, 'full into an empty datastore (run_guest_backup wall)',
           f"{full:.2f} s{rng_text(walls['full'])}; engine duration {full_d:.2f} s; "
           f"{fmt_bytes(samples['full'][0]['new_bytes'])} in {samples['full'][0]['new_chunks']} "
           f"new chunks, {samples['full'][0]['read_chunks']} chunks read",
           full / conv, '<= 1.2x convert', 1.2)
    full2 = med(walls['full2'])
    new2 = max(s['new_bytes'] for s in samples['full2'])
    record(sec, 'unchanged second full', f"{full2:.2f} s{rng_text(walls['full2'])}",
           full2 / conv, '<= 0.5x convert', 0.5)
    floor.record_rows(record, walls['full'], walls['full2'], samples['floor'],
                      samples['read_floor'], sec, samples['read_floor_qemu'])
    record(sec, 'unchanged second full: new chunk bytes', f"{new2} B "
           f"({max(s['new_chunks'] for s in samples['full2'])} chunks)",
           new2 / MiB, '<= 1 MiB', 1.0, unit='MiB')
    read = samples.get('read_changed')
    changed = fmt_bytes(args.change)
    base = 0.3 + (read or 0)
    for kind in ('scattered', 'aligned') if read is not None else ():
        incs = samples[f'inc_{kind}']
        wall = med([s['wall'] for s in incs])
        what = (f'inc, {changed} changed as scattered 256 KiB writes' if kind == 'scattered'
                else f'inc, {changed} changed as 4 MiB chunk-aligned extents')
        record(sec, what, f"{wall:.2f} s{rng_text([s['wall'] for s in incs])}; read "
               f"{incs[-1]['read_chunks']} chunks ({fmt_bytes(incs[-1]['read_bytes'])}), "
               f"{fmt_bytes(incs[-1]['new_bytes'])} new",
               wall / base, f'<= 1x (0.3 s + dd of {changed} {read:.2f} s = {base:.2f} s)', 1.0)
    if read is not None:
        record(sec, 'restore of the newest inc (raw), qemu-img compare',
               samples['inc_restore']['compare'])
    for fmt in ('qcow2', 'raw'):
        times = [s['seconds'] for s in samples[f'restore_{fmt}']]
        record(sec, f'restore of the full, {fmt} target (run_restore wall)',
               f"{med(times):.2f} s{rng_text(times)}; qemu-img compare: "
               f"{samples[f'restore_{fmt}'][-1]['compare']}",
               med(times) / conv, '<= 1.2x convert', 1.2)
    enc = med(walls['full_enc'])
    record(sec, 'encrypted full (AES-256-GCM, key kdf none)', f"{enc:.2f} s{rng_text(walls['full_enc'])}",
           enc / full, '<= 1.1x unencrypted full', 1.1)

    if args.only != 'full':
        sec = 'dedup'
        ded = samples['dedup']
        if ded is None:
            record(sec, 'skipped (--skip dedup)', 'not measured')
        else:
            dedup_report(args, samples, sec, ded)
        scale_report(args, samples)
    if samples.get('peers'):
        record('peers', 'issue 24 goal 6: borg 1.2 (fixed 4 MiB: lz4, zstd,1, repokey-blake2) '
               'and restic 0.14 in the table below, same disk, restores compared',
               ', '.join(samples['peers']['versions'].values()),
               len(samples['peers']['missing']), 'every peer measured', 0, unit='tools missing')
    print_results(args, setup)
    if samples.get('peers'):
        print_peers(args, samples)


def print_peers(args, samples):
    """The peers' table (bench/peers.py) beside guestvault's figures of the same rounds."""
    guestvault = {name: {'full': [s['wall'] for s in samples[full]],
                         'full2': [s['wall'] for s in samples[full2]],
                         'restore': [s['seconds'] for s in samples[restore]]}
                  for name, (full, full2, restore) in (
                      ('guestvault datastore', ('full', 'full2', 'restore_raw')),
                      ('guestvault encrypted', ('full_enc', 'full2_enc', 'restore_raw_enc')))}
    say(f"[peers] full into an empty repository, unchanged full, raw restore of the same disk "
        f"(medians of {args.repeat} round(s), alternating with guestvault's)")
    for line in peers.table(guestvault, samples['peers']):
        say(f"  {line}")


def dedup_report(args, samples, sec, ded):
    record(sec, 'clones', f"2 guests from one base image, each {fmt_bytes(samples['dedup_written'])} "
           f"of random data written in {fmt_bytes(args.dedup_unit)} units "
           f"({args.dedup_change:.0%} of {fmt_bytes(args.data_size)})")
    record(sec, 'datastore: one guest\'s chunk bytes', f"{fmt_bytes(ded['one_bytes'])} "
           f"({ded['one_chunks']} chunks), full {ded['one']['wall']:.2f} s")
    both_time = ded['one']['wall'] + ded['two']['wall']
    record(sec, 'datastore: both guests in one datastore', f"{fmt_bytes(ded['both_bytes'])} "
           f"({ded['both_chunks']} chunks), {both_time:.2f} s for both fulls "
           f"(second {ded['two']['wall']:.2f} s)",
           ded['both_bytes'] / ded['one_bytes'], '<= 1.15x one guest', 1.15)
    if samples['borg']:
        borg = samples['borg']
        record(sec, 'borg create --chunker-params fixed,4194304 (both raw images, one repo, '
               'default lz4)', f"{fmt_bytes(borg['size'])}, {borg['seconds']:.2f} s ({borg['version']}); size vs "
               "the datastore's",
               borg['size'] / ded['both_bytes'])
    else:
        record(sec, 'borg', 'not installed (apt-get install borgbackup)')
    if samples['zstd']:
        zstd = samples['zstd']
        record(sec, 'zstd -1 -T0 of both raw images (+fsync)',
               f"{fmt_bytes(zstd['size'])}, {zstd['seconds']:.2f} s; size vs the datastore's",
               zstd['size'] / ded['both_bytes'])


def scale_report(args, samples):
    sec = 'scale'
    gc = samples['gc']
    record(sec, f"find .chunks -type f | wc -l ({args.gc_chunks} chunks)", f"{gc['find']:.2f} s")
    record(sec, 'garbage_collect check mode', f"{med(gc['check']):.2f} s{rng_text(gc['check'])}",
           med(gc['check']), '<= 10 s', 10, unit='s')
    record(sec, f"garbage_collect ({gc['index_files']} indexes, removed {gc['removed']}, kept "
           f"{gc['kept']})", f"{gc['real']:.2f} s", gc['real'], '<= 10 s', 10, unit='s')
    snaps = samples['snapshots']
    record(sec, f'backup_info over {args.snapshots} snapshots',
           f"{med(snaps['info']):.2f} s{rng_text(snaps['info'])}", med(snaps['info']), '<= 2 s', 2, unit='s')
    record(sec, f"prune check mode ({POLICY}: would remove {snaps['prune_check_removes']})",
           f"{med(snaps['prune_check']):.2f} s{rng_text(snaps['prune_check'])}",
           med(snaps['prune_check']), '<= 2 s', 2, unit='s')
    record(sec, f"prune, routine (keep-last={args.snapshots - 10}: removed "
           f"{snaps['prune_routine_removed']})", f"{snaps['prune_routine']:.2f} s",
           snaps['prune_routine'], '<= 2 s', 2, unit='s')
    record(sec, f"prune, mass ({POLICY}: removed {snaps['prune_mass_removed']})",
           f"{snaps['prune_mass']:.2f} s "
           f"({1000 * snaps['prune_mass'] / max(1, snaps['prune_mass_removed']):.2f} ms per "
           "removed snapshot)", snaps['prune_mass'], '<= 2 s', 2, unit='s')


def write_json(args, info, samples):
    if args.json:
        with open(args.json, 'w') as handle:
            json.dump({'info': info, 'samples': samples, 'results': RESULTS}, handle, indent=2,
                      default=str)


def print_results(args, setup):
    """The machine, then every recorded row by section, then the targets met and missed."""
    say('\n' + '=' * 110)
    say(f"guestvault datastore benchmark: medians of {args.repeat} round(s) "
        "(ratios from this run)")
    say('=' * 110)
    for key, value in setup['info'].items():
        say(f"  {key:10s} {value}")
    say(f"  disk       {fmt_bytes(args.disk_size)} qcow2, {fmt_bytes(args.data_size)} mixed data; "
        f"image {fmt_bytes(setup['image_allocated'])} allocated")
    section = None
    for row in RESULTS:
        if row['section'] != section:
            section = row['section']
            say('-' * 110)
            say(f"[{section}]")
        tail = ''
        if row['shown']:
            tail = f"   => {row['shown']}"
            if row['target']:
                tail += f" (target {row['target']}) {row['verdict']}"
        say(f"  {row['what']}")
        say(f"      {row['value']}{tail}")
    say('-' * 110)
    missed = [r['what'] for r in RESULTS if r['verdict'] == 'MISSED']
    say(f"targets: {sum(1 for r in RESULTS if r['verdict'] == 'MET')} met, {len(missed)} missed"
        + (': ' + '; '.join(missed) if missed else ''))


# ---------------------------------------------------------------------------------------- main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    parser.add_argument('--workdir', default='/var/tmp/guestvault-bench',
                        help='parent of the run directory (one file system for all of it)')
    parser.add_argument('--repeat', type=int, default=1,
                        help='rounds of the guest measurements (full, restore, inc)')
    parser.add_argument('--scale-repeat', type=int, default=3,
                        help='runs of the read-only scale measurements (GC check, info, prune '
                        'check)')
    parser.add_argument('--disk-size', default='4G')
    parser.add_argument('--data', default='2G')
    parser.add_argument('--change', default='256M', help='data changed before an incremental')
    parser.add_argument('--dedup-change', type=float, default=0.05,
                        help='share of the data each clone rewrites')
    parser.add_argument('--dedup-unit', default='4M', help='size of each of a clone\'s writes')
    parser.add_argument('--gc-chunks', type=int, default=100_000)
    parser.add_argument('--snapshots', type=int, default=10_000)
    parser.add_argument('--skip', default='',
                        help='comma-separated sections to skip: dedup, peers')
    parser.add_argument('--only', choices=('all', 'full'), default='all',
                        help='full: the full rounds alone (convert, full, unchanged full, '
                        'floors, restores, encrypted full)')
    parser.add_argument('--profile', action='store_true',
                        help='cProfile of GC check mode and backup_info (main thread)')
    parser.add_argument('--loop-fs', choices=('auto', 'on', 'off'), default='auto',
                        help='run on an ext4 loop file system without discard (auto: when the '
                        'workdir is mounted with discard and this is root; see LoopFs)')
    parser.add_argument('--loop-fs-size', default='48G')
    parser.add_argument('--no-warm-up', action='store_true')
    parser.add_argument('--json', help='also write the raw figures to this file')
    parser.add_argument('--keep', action='store_true', help='keep the run directory')
    args = parser.parse_args(argv)
    args.disk_size, args.data_size = parse_size(args.disk_size), parse_size(args.data)
    args.change, args.dedup_unit = parse_size(args.change), parse_size(args.dedup_unit)

    os.makedirs(args.workdir, exist_ok=True)
    loop = None
    discard = 'discard' in mount_options(args.workdir)
    if args.loop_fs == 'on' or (args.loop_fs == 'auto' and discard and os.geteuid() == 0):
        loop = LoopFs(args.workdir, parse_size(args.loop_fs_size))
    try:
        return bench(args, loop, discard)
    finally:
        if loop is not None:
            loop.close()
        try:
            os.rmdir(args.workdir)  # only if nothing else is in it
        except OSError:
            pass


def bench(args, loop, discard):
    run = tempfile.mkdtemp(prefix='ds-run-', dir=loop.mountpoint if loop else args.workdir)
    load_engine(run)
    from labguest import LabGuest
    lab = Lab(run)
    outdir = os.path.join(run, 'out')
    os.makedirs(outdir)
    warm = Warmer(run, enabled=not args.no_warm_up)
    started = time.monotonic()
    load_start = loadavg()
    samples = {k: [] for k in ('convert', 'create_chunk_store', 'full', 'full2', 'full_enc',
                               'restore_qcow2', 'restore_raw', 'inc_scattered', 'inc_aligned',
                               'full2_enc', 'restore_raw_enc', 'floor', 'read_floor',
                               'read_floor_qemu')}
    guest = None
    try:
        info = machine_info(run, shutil.which('zstd'))
        info['file system'] = (f"ext4 on a loop device (direct I/O, nodiscard) in {args.workdir}"
                               f"{', whose file system has online discard' if discard else ''}"
                               if loop else f"{args.workdir} as it is"
                               + (' (online discard: removals are slow)' if discard else ''))
        say(f"run directory {run}")
        guest = LabGuest(os.path.join(run, 'guest'), disks=[('qcow2', str(args.disk_size))],
                         vmid=VMID, name='dsbench').start()
        image = guest.disk_path(0)
        t0 = time.monotonic()
        fill_disk(guest, 'vd0', args.disk_size, args.data_size, run)
        guest.qemu_io('vd0', 'flush')
        base = os.path.join(run, 'base.qcow2')
        subprocess.run(['qemu-img', 'convert', '-U', '-O', 'qcow2', image, base], check=True)
        settle()
        image_size = allocated(image)
        say(f"filled {fmt_bytes(args.data_size)} in {time.monotonic() - t0:.1f} s; image "
            f"{fmt_bytes(image_size)}")

        full_rounds(lab, guest, args, warm, outdir, image_size, samples)
        if args.only == 'full':
            info['load'] = f"{load_start} at start, {loadavg()} at end (1/5/15 min)"
            report(args, {'info': info, 'image_allocated': image_size}, samples)
            write_json(args, info, samples)
            return 0
        # one snapshot's index and fixed index, for the 10k-snapshot store
        lab.datastore('tmpl')
        first = backup(lab, guest, 'tmpl', 'full', warm, 0)
        from guestvault_engine.run.locate import require_storage
        rec = require_storage(lab.config_dir, 'tmpl').backups(VMID)[-1]
        index = {k: v for k, v in rec.index.items() if k not in ('notes', 'verify',
                                                                 'key_fingerprint')}
        index['vmid'] = SNAP_VMID
        tmpl = {'index': index, 'fidx': os.path.join(run, 'tmpl.fidx')}
        shutil.copyfile(os.path.join(rec.path, index['disks'][0]['file']), tmpl['fidx'])
        lab.drop('tmpl')
        say(f"[{time.monotonic() - started:.0f} s] template snapshot {first['time']} taken")

        samples['read_changed'] = read_changed(image, 0, args.repeat, args.change)
        incrementals(lab, guest, args, warm, outdir, samples)
        say(f"[{time.monotonic() - started:.0f} s] incrementals done")
        guest.stop()
        guest = None
        if 'dedup' not in args.skip.split(','):
            dedup(lab, base, args, warm, outdir, samples)
        else:
            samples['dedup'] = None
        os.unlink(base)
        say(f"[{time.monotonic() - started:.0f} s] dedup done; scale measurements")
        gc_scale(lab, args, samples)
        snapshot_scale(lab, args, samples, tmpl)
        info['bench time'] = f"{time.monotonic() - started:.0f} s"
        info['load'] = f"{load_start} at start, {loadavg()} at end (1/5/15 min)"
        info['read changed'] = (f"{samples['read_changed']:.3f} s: dd bs=4M "
                                f"count={args.change // CHUNK} of the qcow2 image from page "
                                "cache (median of 3)")
        setup = {'info': info, 'image_allocated': image_size}
        report(args, setup, samples)
        write_json(args, info, samples)
        return 0
    finally:
        if guest is not None:
            guest.stop()
        if args.keep:
            say(f"kept {run}" + (" (on the loop file system, unmounted at the end: --keep "
                                 "keeps nothing there)" if loop else ''))
        elif loop is None:
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
