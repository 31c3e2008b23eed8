"""The Format interface: how one backup's disks are encoded on a storage.

The run layer drives every verb through these methods and never looks at file names, image
formats or qemu-img arguments; so a second format (the deduplicating chunk store in Proxmox
Backup Server's datastore layout) is one more implementation, not a fork of the run layer.

Backup
    ``capture``            how the point in time reaches the format: ``'push'`` (QEMU writes
                           the target images itself; the qcow2 chain) or ``'pull'`` (the engine
                           reads an NBD export of the point in time; the datastore)
    ``create_targets``     before the point in time: the images QEMU writes into (push), or the
                           local fleecing images (pull), in the staged backup
    ``copy``               from the point in time to the storage: wait for QEMU's jobs (push) or
                           read the NBD exports and store them (pull)
    ``discard_targets``    remove what ``create_targets`` made outside the staged backup
    ``finish_disks``       after the copy: make the images durable and describe each disk for
                           the manifest (sizes, digests, level)
    ``manifest``           the backup's manifest (``index.json``) from what the run decided
Reading
    ``dependencies``       the backups a restore of one backup reads, oldest first
    ``verify_files``       check the files a restore would read against their manifests
    ``verify``             everything ``verify`` checks of one backup; a list of problems
    ``restore_disk``       write one disk of a backup to a new image, verified
Block exports (live restore and file restore use nothing else)
    ``open_block_exports`` a context manager: per disk, a ``BlockExport`` (a URI and its
                           format) that QEMU and qemu-img open read-only while it is open; a
                           format whose disks are not files QEMU can open hands readable exports
                           (``name``, ``size``, ``read``) to the ``server`` it is given
                           (restore/nbd_server.py), which serves them over NBD
Pruning
    ``plan_removal``       what must happen to kept backups before others are removed (the
                           qcow2 chain folds a removed parent into its kept child; a datastore,
                           whose snapshots are independent, needs nothing)
    ``apply_removal_plan`` carry that out
    ``recover``            finish or undo what a crash interrupted (under the guest's lock)
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


class TargetImage:
    """Where one disk of a backup is written, and at which level."""

    def __init__(self, disk_id, path, level, backing=None):
        self.disk_id = disk_id
        self.path = path
        self.level = level          # 'full' or 'inc'
        self.backing = backing      # inc: what the image reads through

    def __repr__(self):
        return f"TargetImage({self.disk_id!r}, {self.level})"


@dataclass(frozen=True)
class BlockExport:
    """One disk of a backup as QEMU and qemu-img open it read-only: ``uri`` (an image file, or
    an ``nbd+unix://`` export) of ``format`` (``'qcow2'``, ``'raw'``)."""
    disk_id: str
    uri: str
    format: str


class Format:
    """Base of the formats; see the module docstring for what each method promises."""

    name = None
    capture = None
    # The fingerprint (colon hex) of the key new backups are encrypted with; None without one.
    key_fingerprint = None

    def create_targets(self, staged, disks, decision, compression):
        raise NotImplementedError

    def copy(self, staged, capture, targets, progress, bwlimit_kib=0, max_workers=None,
             log=None):
        raise NotImplementedError

    def discard_targets(self, targets):
        raise NotImplementedError

    def finish_disks(self, staged, disks, targets, processed, bitmaps):
        raise NotImplementedError

    def dependencies(self, storage, record):
        raise NotImplementedError

    def verify_files(self, storage, records, disk_ids=None, workers=None):
        raise NotImplementedError

    def verify(self, storage, record, check_mode=False):
        raise NotImplementedError

    def open_block_exports(self, storage, record, disk_ids, server):
        """A context manager: ``{disk id: BlockExport}`` of ``disk_ids`` of ``record``, readable
        while it is open. ``server.serve(make_exports)`` (a context manager yielding a unix
        socket's path) serves ``make_exports()``, ``{export name: export}``, over NBD: in this
        process (restore/nbd_server.ThreadServer) or in a process that outlives the call
        (restore/live_server.LiveServer, which asks the format again there)."""
        raise ConfigError(f"live restore from a {self.name} storage is not implemented yet; "
                          "restore without live")

    def plan_removal(self, backups, removed):
        raise NotImplementedError

    def apply_removal_plan(self, storage, plan, log):
        raise NotImplementedError

    def recover(self, storage, vmid):
        raise NotImplementedError
