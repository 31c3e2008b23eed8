"""The qcow2 chain format: each backup's disks as qcow2 images, incrementals reading through
their parent's image, so that plain ``qemu-img convert`` restores any backup.

On disk (``docs/architecture.md``, "On-disk formats")::

    vm/<vmid>/<time>/<disk>.qcow2   full: standalone; inc: backing file ../<parent>/<disk>.qcow2
    vm/<vmid>/<time>/index.json     manifest; per disk: file, level, backing, size, sha256, ...

Removing a backup that a kept one reads through would break the kept one, so first its data is
folded into it: ``qemu-img rebase`` (safe mode) of a copy of the kept image onto its nearest kept
ancestor (or onto nothing, making it a full) writes in exactly the clusters that differ. The
kept backup's manifest is swapped in through a pending file that ``recover`` completes or drops
after a crash, depending on whether the images already match it.

Each image is protected by a sha256 per segment of the file as written (``segment_sha256``, the
segments ``segment_size`` bytes long: 8 MiB, doubled until there are at most 1024 in the disk's
size at a backup, in the image's size when a fold rewrites it; a verify takes any), so any
changed byte, guest data or qcow2 metadata, fails a verify, which names the damaged segment.
Older backups record one sha256 of the whole file (``sha256``); it is still verified, as is every
digest an entry records. Why segments: one sha256 is one core's work (1.4 s of a 3.3 s full on
the bench's 2 GiB image), segments hash on every core, at the backup and at every verify. At
the backup they are hashed while QEMU's job writes the image, behind its write front, and those
QEMU wrote again after they were read (dirty bitmaps on the image's file node say which) are
hashed again after the job: format/overlap.py says why no write is missed. The images stay plain
qcow2 (the bitmaps are QEMU's, in memory, never in the file), so ``qemu-img convert`` alone still
restores any backup.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from ..errors import ConfigError, StorageError
from ..storage.files import fsync_path, sha256_file, sha256_range, start_writeback
from ..storage.records import DiskEntry, Manifest
from ..times import format_time
from ..version import TOOL_VERSION
from . import qemu_img
from .base import BlockExport, TargetImage
from .capture import BLOCK
from .overlap import OverlappedDigests

MANIFEST_FORMAT = 1
# The smallest segment: small, because a segment hashed during the copy whose bytes QEMU writes
# again (qcow2 rewrites its L2 tables and refcount blocks in place, among the data) is hashed
# again whole after the job (format/overlap.py: each L2 table and refcount block, written at
# close, and runs of late data writes; 4 MiB left about a third less to hash after the job than
# 8 MiB); many, so every core hashes at a verify.
SEGMENT_SIZE = 4 << 20
MAX_SEGMENTS = 1024         # ... and a manifest of at most ~70 KiB of digests per disk
# How often a restore's running convert has what it wrote so far handed to writeback.
WRITEBACK_INTERVAL = 0.25


def image_name(disk_id):
    return f"{disk_id}.qcow2"


def backing_path(parent_time, disk_id):
    """How an incremental image names its parent's image: relative, so a storage can move."""
    return f"../{parent_time}/{image_name(disk_id)}"


def _parallel(function, items, workers=None):
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(len(items), workers or os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def segment_size(length):
    """The segment length of an image of (about) ``length`` bytes."""
    size = SEGMENT_SIZE
    while length > size * MAX_SEGMENTS:
        size *= 2
    return size


def _segments(path, size):
    """(path, offset, length) of each segment of the file (none for an empty file)."""
    file_size = os.path.getsize(path)
    return [(path, offset, min(size, file_size - offset))
            for offset in range(0, file_size, size)]


def _hash(job):
    path, offset, length = job
    return sha256_file(path) if length is None else sha256_range(path, offset, length)


def image_digests(paths, whole=(), workers=None):
    """{path: the digest fields of its manifest entry}: ``segment_size`` and ``segment_sha256``,
    or for the paths in ``whole`` (an older entry being rewritten) the one ``sha256``. The
    segments of every image share one pool of ``workers`` threads."""
    sizes = {path: segment_size(os.path.getsize(path)) for path in paths}
    jobs = {path: [(path, 0, None)] if path in whole else _segments(path, sizes[path])
            for path in paths}
    hashes = iter(_parallel(_hash, [job for path in paths for job in jobs[path]], workers))
    fields = {}
    for path in paths:
        digests = [next(hashes) for _job in jobs[path]]
        fields[path] = ({'sha256': digests[0]} if path in whole else
                        {'segment_size': sizes[path], 'segment_sha256': digests})
    return fields


def image_problems(images, workers=None):
    """Each (label, path, DiskEntry) checked against every digest its entry records, the
    segments of all of them hashed at once: the problems, as lines naming ``label``."""
    checks = []         # (label, expected digest, what it covers, job)
    problems = []
    for label, path, disk in images:
        if not os.path.exists(path):
            problems.append(f"{label} is missing")
            continue
        segmented = isinstance(disk.segment_size, int) and disk.segment_size > 0 \
            and isinstance(disk.segment_sha256, list)
        if disk.sha256 is None and not segmented:
            problems.append(f"{label}: its manifest records no usable digest of the file: "
                            "restore the backup's index.json from a copy, or remove the backup")
            continue
        if disk.sha256 is not None:
            checks.append((label, disk.sha256, 'the file', (path, 0, None)))
        if segmented:
            jobs = _segments(path, disk.segment_size)
            if len(jobs) != len(disk.segment_sha256):
                problems.append(f"{label} has {os.path.getsize(path)} bytes, its manifest "
                                f"says {disk.size}: the file changed or is damaged")
                continue
            checks += [(label, expected, f"bytes {offset}-{offset + length - 1}",
                        (path, offset, length))
                       for expected, (path, offset, length) in zip(disk.segment_sha256, jobs)]
    actual = _parallel(_hash, [check[3] for check in checks], workers)
    for (label, expected, what, _job), digest in zip(checks, actual):
        if digest != expected:
            problems.append(f"{label} has sha256 {digest[:16]}... in {what}, its manifest "
                            f"says {expected[:16]}...: the file changed or is damaged")
    return problems


def _write_back(proc, path):
    """Hand the pages ``proc`` wrote to ``path`` to writeback, until it exits."""
    while True:
        try:
            proc.wait(timeout=WRITEBACK_INTERVAL)
            return
        except subprocess.TimeoutExpired:
            start_writeback(path)


class Qcow2Chain:
    """The qcow2 chain: a Format (format/base.py)."""

    name = 'qcow2'
    captures = (BLOCK,)         # a VM's disks; a container's file tree is not stored as qcow2
    capture = 'push'
    key_fingerprint = None      # qcow2 backups are not encrypted
    hash_during_copy = True     # False: hash after QEMU's job (bench/backup_bench.py compares)

    # -- backup ---------------------------------------------------------------------------------
    def create_targets(self, staged, disks, decision, compression):
        """A new qcow2 per disk; an incremental's reads through the parent backup's image."""
        parent = format_time(decision.parent) if decision.parent else None
        targets = {}
        for disk in disks:
            chained = decision.level == 'inc' and disk.supports_bitmaps
            path = staged.file(image_name(disk.id))
            backing = backing_path(parent, disk.id) if chained else None
            qemu_img.create_qcow2(path, disk.virtual_size, backing=backing,
                                  compression=compression)
            targets[disk.id] = TargetImage(disk.id, path, 'inc' if chained else 'full', backing)
        return targets

    def copy(self, staged, capture, targets, progress, bwlimit_kib=0, max_workers=None,
             log=None):
        """QEMU writes the targets itself (push): wait for its jobs, hashing the images'
        segments behind QEMU's writes (format/overlap.py says why that is sound); bytes each
        processed. The segment size is chosen before the image exists, from the disk's size
        (an image is at most that, and its metadata, long)."""
        if not self.hash_during_copy:
            return capture.run_jobs(progress)
        sizes = {targets[job.disk.id].path: segment_size(int(job.disk.virtual_size))
                 for job in capture.disk_jobs}
        with OverlappedDigests(sizes) as watcher:
            processed = capture.run_jobs(progress, watcher)
            digests = watcher.digests()
        for target in targets.values():
            size, hashes = digests[target.path]
            target.digests = {'segment_size': size, 'segment_sha256': hashes}
        if log:
            log(f"hashed {watcher.hashed_early()} of {sum(len(h) for _s, h in digests.values())}"
                f" segments while QEMU wrote, {watcher.hashed_again} again after its job")
        return processed

    def discard_targets(self, targets):
        """Nothing outside the staged backup, which is discarded as a whole."""
        return None

    def finish_disks(self, staged, disks, targets, processed, bitmaps):
        """Each disk's manifest entry; its image fsynced, then hashed (segments on every core)."""
        paths = [targets[d.id].path for d in disks]
        _parallel(fsync_path, paths)
        digests = image_digests([targets[d.id].path for d in disks
                                 if targets[d.id].digests is None])
        entries = []
        for disk in disks:
            target = targets[disk.id]
            entries.append(DiskEntry.from_dict({
                'id': disk.id, 'node': disk.node, 'format': disk.format,
                'virtual_size': disk.virtual_size, 'file': os.path.basename(target.path),
                'level': target.level, 'bytes_written': qemu_img.allocated_bytes(target.path),
                'bytes_processed': processed[disk.id],
                'size': os.path.getsize(target.path),
                **(target.digests or digests[target.path]),
                'bitmap': bitmaps.get(disk.id), 'backing': target.backing,
            }))
        return entries

    def manifest(self, fields):
        """``index.json``: the run's fields plus the format's version and the tool's."""
        return Manifest.from_dict(dict(fields, format=MANIFEST_FORMAT,
                                       tool=f"guestvault {TOOL_VERSION}"))

    # -- reading --------------------------------------------------------------------------------
    def dependencies(self, storage, record):
        """The backups a restore of ``record`` reads, full first; StorageError if one is gone."""
        by_time = {b.manifest.time: b for b in storage.backups(record.manifest.vmid)}
        chain = [record]
        while chain[0].manifest.parent:
            parent = by_time.get(chain[0].manifest.parent)
            if parent is None:
                raise StorageError(f"backup {chain[0].id} builds on {chain[0].manifest.parent}, "
                                   "which is missing from the storage: it cannot be restored")
            chain.insert(0, parent)
        return chain

    def source(self, storage, record, disk_id):
        """The image a restore of one disk of ``record`` reads (through its backing chain)."""
        return storage.file(record, record.manifest.disk(disk_id).file)

    def restored_bytes(self, chain, disk_id):
        """Upper bound of the guest data a restore writes (sum over the chain's images)."""
        return sum(d.bytes_written or 0 for r in chain for d in r.manifest.disks
                   if d.id == disk_id)

    def verify_files(self, storage, records, disk_ids=None, workers=None):
        """The digests of every image of ``records`` against each backup's manifest; the
        problems.

        ``workers`` threads hash at once (default one per core); a restore that converts at the
        same time leaves a core to qemu-img.
        """
        return image_problems([(f"{record.id}: {disk.file}", storage.file(record, disk.file),
                                disk)
                               for record in records for disk in record.manifest.disks
                               if disk_ids is None or disk.id in disk_ids], workers)

    def verify(self, storage, record, check_mode=False):
        """(the chain's backups, problems): every image of the chain against its manifest,
        ``qemu-img check`` of the backup's own images, and each incremental's backing link."""
        problems = []
        try:
            chain = self.dependencies(storage, record)
        except StorageError as exc:
            chain = [record]
            problems.append(str(exc))
        problems += self.verify_files(storage, chain)
        for disk in record.manifest.disks:
            path = storage.file(record, disk.file)
            if not os.path.exists(path):
                continue  # already reported
            ok, message = qemu_img.check(path, fmt='qcow2')
            if not ok:
                problems.append(f"{record.id}: qemu-img check of {disk.file}: {message}")
            backing = qemu_img.info(path, fmt='qcow2').get('backing-filename')
            if backing != disk.backing:
                problems.append(f"{record.id}: {disk.file} reads through {backing!r}, its "
                                f"manifest says {disk.backing!r}")
        return chain, problems

    @contextmanager
    def open_block_exports(self, storage, record, disk_ids, server):
        """The backup's own image of each disk (it reads through its chain): no server."""
        yield {disk_id: BlockExport(disk_id,
                                    os.path.abspath(self.source(storage, record, disk_id)),
                                    'qcow2')
               for disk_id in disk_ids}

    def start_restore(self, storage, record, disk_id, target, target_format, bwlimit_kib):
        """A running copy of one disk into ``target``; ``.communicate()`` ends it.

        While it runs, what it wrote so far goes to writeback: the restore's fsync of the image
        then finds little left to write, where it would otherwise wait for the whole image (2
        GiB on the bench, 0.1-1 s) after the copy and the verify."""
        proc = qemu_img.start_convert(self.source(storage, record, disk_id), target,
                                      target_format, bwlimit_kib)
        threading.Thread(target=_write_back, args=(proc, target), daemon=True,
                         name=f"writeback of {os.path.basename(target)}").start()
        return proc

    def restore_with_snapshots(self, storage, chain, disk_id, target, log):
        """One qcow2 holding every backup of the chain as an internal snapshot, newest active.

        Each incremental's own clusters are committed into the growing image through a throwaway
        copy of it, so the backups stay untouched and each step costs only what changed.
        """
        first = True
        for record in chain:
            disk = record.manifest.disk(disk_id)
            if disk is None:
                continue
            source = storage.file(record, disk.file)
            if first or not disk.backing:
                qemu_img.convert(source, target)
                first = False
            else:
                layer = f"{target}.layer"
                shutil.copyfile(source, layer)
                qemu_img.rebase(layer, os.path.basename(target), safe=False)
                qemu_img.commit(layer)
                os.unlink(layer)
            qemu_img.create_snapshot(target, record.manifest.time)
            log(f"{disk_id}: snapshot {record.manifest.time} added")

    def leftovers(self, target):
        """Files a failed restore into ``target`` may leave."""
        return (target, f"{target}.layer")

    # -- pruning --------------------------------------------------------------------------------
    def plan_removal(self, backups, removed):
        """Kept backups whose parent goes: [(kept record, new parent time or None)], oldest
        first; ``removed`` is a set of backup times."""
        by_time = {b.manifest.time: b for b in backups}
        folds = []
        for record in backups:
            parent = record.manifest.parent
            if record.manifest.time in removed or parent is None or parent not in removed:
                continue
            while parent is not None and parent in removed:
                parent = by_time[parent].manifest.parent
            folds.append((record, parent))
        return folds

    def apply_removal_plan(self, storage, plan, log):
        for record, new_parent in plan:
            self.fold(storage, record, new_parent, log)

    def fold(self, storage, record, new_parent, log):
        """Make ``record`` read through ``new_parent`` (or stand alone) with the same content."""
        manifest = record.manifest.copy()
        temps = {}
        try:
            for disk in manifest.disks:
                if disk.backing:
                    image = storage.file(record, disk.file)
                    temp = storage.file(record, f".{disk.file}.folding")
                    temps[image] = temp
                    shutil.copyfile(image, temp)
                    backing = backing_path(new_parent, disk.id) if new_parent else ''
                    try:
                        qemu_img.rebase(temp, backing)
                    except StorageError as exc:
                        raise StorageError(f"folding {record.id} ({disk.id}) failed: "
                                           f"{exc}") from None
                    fsync_path(temp)
                    # an older entry keeps its kind of digest: its manifest changes no more
                    # than the fold needs
                    whole = (temp,) if disk.sha256 is not None else ()
                    disk.update(dict(backing=backing or None,
                                     **image_digests([temp], whole)[temp],
                                     size=os.path.getsize(temp),
                                     bytes_written=qemu_img.allocated_bytes(temp),
                                     level='inc' if backing else 'full'))
            manifest.update(dict(parent=new_parent, level='inc' if new_parent else 'full'))
            pending = storage.stage_manifest(record, manifest)
            for image, temp in temps.items():
                os.replace(temp, image)
            storage.commit_manifest(record, pending)
        except BaseException:
            for temp in temps.values():
                if os.path.exists(temp):
                    os.unlink(temp)
            raise
        log(f"folded the data {record.id} read from removed backups into it; it now "
            + (f"builds on {new_parent}" if new_parent else "stands alone (full)"))

    def collect_garbage(self, grace_seconds, check_mode=False, progress=None):
        raise ConfigError("a qcow2 chain shares no data between backups: prune removes a "
                          "backup's files, there is no garbage to collect")

    def recover(self, storage, vmid):
        """Finish or drop manifest updates a crashed fold left: [(backup id, completed)].

        A pending manifest whose image hashes match the files describes them and replaces the
        old manifest; otherwise the fold had not swapped the images yet and it is dropped.
        """
        done = []
        for record, manifest, pending in storage.pending_manifests(vmid):
            try:
                matches = manifest is not None and not image_problems(
                    [(d.file, storage.file(record, d.file), d) for d in manifest.disks])
            except (OSError, TypeError, ValueError):
                matches = False
            if matches:
                storage.commit_manifest(record, pending)
            else:
                storage.drop_pending_manifest(pending)
            done.append((record.id, matches))
        return done
