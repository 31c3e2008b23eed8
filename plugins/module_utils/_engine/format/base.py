"""The Format interface: how one backup's disks are encoded on a storage.

The run layer drives every verb through these methods and never looks at file names, image
formats or qemu-img arguments; so a second format (the deduplicating chunk store in Proxmox
Backup Server's datastore layout) is one more implementation, not a fork of the run layer.

Backup
    ``captures``           the shapes of capture it stores (format/capture.py: ``'block'``, the
                           disks of a VM; ``'tree'``, the file tree of a container), and
                           ``accept_capture`` refusing any other before anything changes
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
Pruning
    ``plan_removal``       what must happen to kept backups before others are removed (the
                           qcow2 chain folds a removed parent into its kept child; a datastore,
                           whose snapshots are independent, needs nothing)
    ``apply_removal_plan`` carry that out
    ``recover``            finish or undo what a crash interrupted (under the guest's lock)
"""
from __future__ import annotations

from ..errors import ConfigError
from .capture import BLOCK


class TargetImage:
    """Where one disk of a backup is written, and at which level."""

    def __init__(self, disk_id, path, level, backing=None):
        self.disk_id = disk_id
        self.path = path
        self.level = level          # 'full' or 'inc'
        self.backing = backing      # inc: what the image reads through

    def __repr__(self):
        return f"TargetImage({self.disk_id!r}, {self.level})"


class Format:
    """Base of the formats; see the module docstring for what each method promises."""

    name = None
    captures = (BLOCK,)         # what it can store: block devices; a file tree is not yet taken
    capture = None
    # The fingerprint (colon hex) of the key new backups are encrypted with; None without one.
    key_fingerprint = None

    def accept_capture(self, kind, storage_label):
        """Refuse (ConfigError) a capture of a shape this format cannot store: a ``kind`` of
        format/capture.py, the storage named in the message."""
        if kind not in self.captures:
            held = ' or '.join({'block': "disk images (a VM's block devices)",
                                'tree': "file trees (a container's files)"}[k]
                               for k in self.captures)
            raise ConfigError(f"{storage_label} holds {self.name} backups, which store {held}; "
                              f"a guest whose backup is a {kind} capture cannot be backed up "
                              "to it: choose a storage whose format takes it")

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

    live_needs_server = False     # True: live_backing names an NBD server the run starts

    def live_backing(self, storage, record, disk_id, nbd_socket=None):
        """``(backing file, its format)`` a live-restored image reads through until copied."""
        raise ConfigError(f"live restore from a {self.name} storage is not implemented yet; "
                          "restore without live")

    def plan_removal(self, backups, removed):
        raise NotImplementedError

    def apply_removal_plan(self, storage, plan, log):
        raise NotImplementedError

    def recover(self, storage, vmid):
        raise NotImplementedError
