"""The datastore format: every snapshot a set of fixed indexes into one shared chunk store.

A backup is pulled (``capture = 'pull'``): QEMU exports the point in time over NBD from a local
fleecing image, and the engine reads it chunk by chunk, storing each 4 MiB chunk once across all
guests and backups. An incremental reads only the chunks the frozen dirty bitmap marks and takes
every other digest from the previous snapshot's index, so every snapshot is complete on its own:
restore reads one snapshot, prune removes directories and never rewrites a kept one, and garbage
collection frees the chunks no index names any more.
"""
from __future__ import annotations

import os
import shutil
import threading
from contextlib import contextmanager

from ..errors import (BackupFailed, ConfigError, CorruptData, EncryptionKeyError, GuestvaultError,
                      StorageError)
from ..paths import fleecing_dir   # local disk, so a slow datastore never slows guest writes
from ..times import format_time
from ..version import TOOL_VERSION
from ..format.qemu_img import create_qcow2
from ..format.base import BlockExport, TargetImage
from ..format.capture import BLOCK
from ..storage.records import DiskEntry, Manifest
from .backup_writer import write_disk_index
from .chunk_store import FileChunkStore
from .index import read_index
from .gc import collect_garbage
from .image_restore import restore_disk_image
from .snapshot_export import SnapshotExport
from .snapshot import index_name
from .verify import verify_disk_index

MANIFEST_FORMAT = 'pbs-datastore-1'


def default_workers():
    return max(2, os.cpu_count() or 2)


def reading_workers():
    """Restore and verify threads: each waits on an O_DIRECT chunk read (and a restore on an
    O_DIRECT write) as long as it computes, so twice the cores keep them busy (a 2 GiB raw
    restore here: median 3.4 s on 2 threads, 2.85 s on 4)."""
    return 2 * default_workers()


class _RestoreJob:
    """A restore of one disk running on a thread, shaped like the qcow2 chain's qemu-img
    process (``communicate``, ``returncode``, ``kill``), so the restore run does not branch."""

    def __init__(self, function):
        self.returncode = None
        self.error = None
        self.cancelled = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self.thread.start()

    def _run(self, function):
        try:
            function(self.cancelled)
            self.returncode = 0
        except BaseException as exc:  # reported through communicate()
            self.error = exc
            self.returncode = 1

    def kill(self):
        self.cancelled.set()

    def communicate(self):
        self.thread.join()
        if self.error is not None and not self.cancelled.is_set() \
                and isinstance(self.error, GuestvaultError):
            raise self.error
        return '', str(self.error or '')


class Datastore:
    """Proxmox Backup Server's datastore: a Format (format/base.py)."""

    name = 'datastore'
    captures = (BLOCK,)         # a VM's disks; a file tree (pxar, .didx) comes with containers
    capture = 'pull'

    def __init__(self, storage, crypt=None, workers=None, chunks=None):
        self.storage = storage
        self.crypt = crypt
        self.key_fingerprint = crypt.fingerprint_text if crypt is not None else None
        # chunks in files under the datastore, or objects in a bucket (object_chunks)
        self.chunks = chunks or FileChunkStore(storage.path)
        # a store in a bucket waits on requests more than it computes: more threads
        self.workers = workers or max(default_workers(),
                                      getattr(self.chunks, 'request_workers', 0))
        self.read_workers = workers or max(reading_workers(),
                                           getattr(self.chunks, 'request_workers', 0))

    # -- backup ---------------------------------------------------------------------------------
    def create_targets(self, staged, disks, decision, compression):
        """A thin local fleecing image per disk; an incremental names the parent's index."""
        self.chunks.prepare()
        folder = os.path.join(fleecing_dir(), '-'.join(staged.final_path.split(os.sep)[-2:]))
        os.makedirs(folder, mode=0o700, exist_ok=True)
        parent = self._parent(staged, decision)
        targets = {}
        for disk in disks:
            path = os.path.join(folder, f"{disk.id}.qcow2")
            create_qcow2(path, disk.virtual_size)
            previous = None
            if decision.level == 'inc' and disk.supports_bitmaps and parent is not None:
                entry = parent.manifest.disk(disk.id)
                if entry is not None and entry.virtual_size == disk.virtual_size:
                    previous = os.path.join(parent.path, entry.file)
            targets[disk.id] = TargetImage(disk.id, path, 'inc' if previous else 'full',
                                           previous)
        return targets

    def _parent(self, staged, decision):
        if decision.level != 'inc' or decision.parent is None:
            return None
        vmid = int(staged.final_path.split(os.sep)[-2])
        wanted = format_time(decision.parent)
        parent = next((b for b in self.storage.backups(vmid) if b.manifest.time == wanted), None)
        if parent is not None and parent.manifest.key_fingerprint != self.key_fingerprint:
            return None  # made with another key (or none): its digests mean other chunks
        return parent

    def copy(self, staged, capture, targets, progress, bwlimit_kib=0, max_workers=None,
             log=None):
        """Read each disk's point in time and store it; the per-disk statistics."""
        sources = capture.sources()
        stats = {}
        total = sum(s.size for s in sources.values())
        done_before = 0
        for disk_id, target in targets.items():
            previous = None
            if target.backing:
                try:
                    previous = read_index(target.backing)
                except (OSError, CorruptData) as exc:
                    if log:
                        log(f"{disk_id}: the previous index is unreadable ({exc}); reading "
                            "the whole disk")

            def disk_progress(done, _total, base=done_before):
                if progress:
                    progress(base + done, total)
            stats[disk_id] = write_disk_index(
                sources[disk_id], staged.file(index_name(disk_id)), self.chunks,
                crypt=self.crypt, previous=previous,
                workers=max_workers or self.workers, bwlimit=bwlimit_kib,
                progress=disk_progress, what=f"{os.path.basename(staged.final_path)} {disk_id}")
            done_before += sources[disk_id].size
            self._check_chunks_present(staged.file(index_name(disk_id)), disk_id)
        # A sync=none job that ended no longer holds the point in time: what was read may be
        # newer than it, so such a backup is not kept.
        capture.check_jobs()
        return stats

    def _check_chunks_present(self, index_path, disk_id):
        """Every chunk the new index names is in the store. A garbage collection in another
        process may sweep a chunk in the instant between this backup finding it stored and
        touching it (PBS closes that window with a lock inside one process); one stat (on S3
        one HEAD) per distinct chunk makes sure no snapshot is kept that names a chunk that is
        gone."""
        gone = self.chunks.missing(read_index(index_path).distinct_digests())
        if gone:
            raise BackupFailed(
                f"{disk_id}: {len(gone)} chunk(s) this backup found stored were removed by a "
                f"garbage collection running at the same time (first {gone[0].hex()}); nothing "
                "was kept: run the backup again")

    def finish_disks(self, staged, disks, targets, processed, bitmaps):
        entries = []
        for disk in disks:
            target, stats = targets[disk.id], processed[disk.id]
            entries.append(DiskEntry.from_dict({
                'id': disk.id, 'node': disk.node, 'format': disk.format,
                'virtual_size': disk.virtual_size, 'file': index_name(disk.id),
                'level': target.level, 'bytes_written': stats['new_bytes'],
                'bytes_processed': stats['read_bytes'], 'size': disk.virtual_size,
                'csum': stats['csum'], 'bitmap': bitmaps.get(disk.id), 'backing': None,
                'chunks': stats['chunks'], 'read_chunks': stats['read_chunks'],
                'new_chunks': stats['new_chunks'], 'reused_chunks': stats['reused_chunks'],
                'zero_chunks': stats['zero_chunks'],
                'data_bytes': stats.get('data_bytes'),
            }))
        self.discard_targets(targets)
        return entries

    def discard_targets(self, targets):
        """Remove the fleecing images (QEMU has closed them)."""
        folders = {os.path.dirname(t.path) for t in targets.values()}
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def manifest(self, fields):
        return Manifest.from_dict(dict(fields, format=MANIFEST_FORMAT,
                                       tool=f"guestvault {TOOL_VERSION}",
                                       encrypted=self.crypt is not None))

    # -- reading --------------------------------------------------------------------------------
    def dependencies(self, storage, record):
        return [record]  # a snapshot needs nothing but its chunks

    def restored_bytes(self, chain, disk_id):
        disk = chain[-1].manifest.disk(disk_id)
        return disk.data_bytes or disk.virtual_size

    def check_key(self, record):
        """EncryptionKeyError unless this datastore's key is the one the backup was made with."""
        manifest = self.storage.codec.read_manifest(record.path, check_signature=True)
        manifest.check_fingerprint(self.crypt)
        return manifest

    def verify_files(self, storage, records, disk_ids=None, workers=None):
        """Each index file against its manifest (size, checksum); the chunks are checked as a
        restore reads them."""
        return self._check_files(storage, records, disk_ids)[0]

    def _check_files(self, storage, records, disk_ids=None):
        """``(problems, index files that cannot be read, whether the key is the one the
        snapshots were made with)``."""
        problems, unreadable, key_ok = [], set(), True
        for record in records:
            try:
                manifest = self.check_key(record)
            except EncryptionKeyError as exc:
                key_ok = False
                problems.append(f"{record.id}: {exc}")
                continue
            except (OSError, GuestvaultError) as exc:
                problems.append(f"{record.id}: {exc}")
                continue
            for disk in record.manifest.disks:
                if disk_ids is not None and disk.id not in disk_ids:
                    continue
                path = storage.file(record, disk.file)
                try:
                    index = read_index(path)
                except (OSError, GuestvaultError) as exc:
                    unreadable.add(path)
                    problems.append(f"{record.id} {disk.id}: {exc}")
                    continue
                try:
                    manifest.verify_file(disk.file, index.index_csum, index.size)
                except GuestvaultError as exc:
                    problems.append(f"{record.id} {disk.id}: {exc}")
        return problems, unreadable, key_ok

    def verify(self, storage, record, check_mode=False):
        """([record], problems): the manifest and its signature, each index against it, and
        every chunk decoded with its CRC and digest checked. A corrupt chunk is renamed
        ``.bad`` (not in check mode), so the next backup stores a fresh copy; every snapshot
        that names it is listed. Each problem is told once: an index that cannot be read is not
        read again for its chunks, and with a key that is not the snapshot's the chunks get
        their CRC checked only (as a PBS server, which holds no key, checks them) instead of a
        decryption error per chunk."""
        problems, unreadable, key_ok = self._check_files(storage, [record])
        crypt = self.crypt if key_ok else None
        verified, corrupt = set(), set()
        for disk in record.manifest.disks:
            path = storage.file(record, disk.file)
            if path in unreadable or not os.path.exists(path):
                continue
            problems += verify_disk_index(path, self.chunks, crypt=crypt,
                                          verified=verified, corrupt=corrupt,
                                          workers=self.read_workers, mark_bad=not check_mode,
                                          what=f"{record.id} {disk.id}")
        if corrupt:
            users = self.referencing(corrupt)
            groups = {}
            for digest in sorted(corrupt):
                groups.setdefault(tuple(users.get(digest, [record.id])), []).append(digest.hex())
            for names, digests in groups.items():
                one = len(digests) == 1
                problems.append(f"{_count_chunks(digests)} {'is' if one else 'are'} damaged or "
                                f"missing; snapshots that name {'it' if one else 'them'}: "
                                + ', '.join(names))
        return [record], problems

    def referencing(self, digests):
        """{digest: [snapshot ids whose indexes name it]} over the whole datastore."""
        users = {}
        for vmid in self.storage.guest_ids():
            for record in self.storage.backups(vmid):
                for disk in record.manifest.disks:
                    try:
                        index = read_index(self.storage.file(record, disk.file),
                                           check_csum=False)
                    except (OSError, CorruptData):
                        continue
                    for digest in digests & index.distinct_digests():
                        users.setdefault(digest, [])
                        if record.id not in users[digest]:
                            users[digest].append(record.id)
        return users

    def start_restore(self, storage, record, disk_id, target, target_format, bwlimit_kib):
        disk = record.manifest.disk(disk_id)
        self.check_key(record)
        index = read_index(storage.file(record, disk.file))

        def run(cancelled):
            restore_disk_image(index, self.chunks, target, target_format, crypt=self.crypt,
                               workers=self.read_workers, bwlimit=bwlimit_kib,
                               what=f"{record.id} {disk_id}",
                               progress=lambda done, total: _stop_if(cancelled))
        return _RestoreJob(run)

    # -- block exports: QEMU reads a snapshot's disks through the server's NBD exports -------
    @contextmanager
    def open_block_exports(self, storage, record, disk_ids, server):
        """Each disk's fixed index as an export (``drive-<disk>.img.fidx``) of ``server``."""
        with server.serve(lambda: self._snapshot_exports(storage, record, disk_ids)) as socket:
            yield {disk_id: BlockExport(disk_id,
                                        f"nbd+unix:///{index_name(disk_id)}?socket={socket}",
                                        'raw')
                   for disk_id in disk_ids}

    def _snapshot_exports(self, storage, record, disk_ids):
        """``{export name: SnapshotExport}`` of the disks, after the key check."""
        self.check_key(record)
        exports = {}
        for disk in record.manifest.disks:
            if disk.id in disk_ids:
                name = index_name(disk.id)
                exports[name] = SnapshotExport(
                    name, read_index(storage.file(record, disk.file)), self.chunks,
                    self.crypt, f"{record.id} {disk.id}")
        return exports

    def restore_with_snapshots(self, storage, chain, disk_id, target, log):
        raise ConfigError("snapshots builds a qcow2 from a chain of qcow2 backups; datastore "
                          "snapshots stand alone: restore each one on its own instead")

    def leftovers(self, target):
        return (target,)

    # -- pruning and garbage ----------------------------------------------------------------
    def plan_removal(self, backups, removed):
        return []  # nothing depends on a snapshot: removing one rewrites nothing

    def apply_removal_plan(self, storage, plan, log):
        return None

    def recover(self, storage, vmid):
        return []

    def collect_garbage(self, grace_seconds, check_mode=False, progress=None):
        if not self.chunks.exists():
            raise StorageError(f"{self.storage.label} holds no chunk store yet (no backup was "
                               "taken into it); nothing to collect")
        with self.storage.collecting_garbage(check_mode) as (now, oldest_writer_start):
            return collect_garbage(
                self.chunks, self.storage.index_files(), grace_seconds=grace_seconds,
                oldest_writer_start=oldest_writer_start, check_mode=check_mode, now=now,
                progress=progress)


def _count_chunks(digests, shown=3):
    """"chunk <d>", or "N chunks (<d>, <d>, <d> and more)": a few examples, never thousands."""
    if len(digests) == 1:
        return f"chunk {digests[0]}"
    more = ' and more' if len(digests) > shown else ''
    return f"{len(digests)} chunks ({', '.join(digests[:shown])}{more})"


def _stop_if(cancelled):
    if cancelled.is_set():
        raise StorageError("restore cancelled")
