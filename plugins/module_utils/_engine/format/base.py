"""The Format protocol: how one backup's disks are encoded on a storage.

The run layer drives every verb through these members and never looks at file names, image
formats or qemu-img arguments; so another format is one more implementation, not a fork of the
run layer. Implementations: ``Qcow2Chain`` (format/qcow2.py) and ``Datastore``
(datastore/format.py). The members are the ones run/ calls (tests/unit/test_storage_contract.py
checks both implementations have each, with a compatible signature); docs/architecture.md has
the same table. A format names the shapes of capture it stores (``captures``, format/capture.py:
``'block'``, the disks of a VM; ``'tree'``, the file tree of a container), and
``accept_capture`` refuses any other before anything changes. Live restore and file restore
read a backup only through ``open_block_exports``: a format that can export its disks gets both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..errors import ConfigError


class TargetImage:
    """Where one disk of a backup is written, and at which level."""

    def __init__(self, disk_id, path, level, backing=None):
        self.disk_id = disk_id
        self.path = path
        self.level = level          # 'full' or 'inc'
        self.backing = backing      # inc: what the image reads through
        self.digests = None         # manifest digest fields the copy already took, if any

    def __repr__(self):
        return f"TargetImage({self.disk_id!r}, {self.level})"


@dataclass(frozen=True)
class BlockExport:
    """One disk of a backup as QEMU and qemu-img open it read-only: ``uri`` (an image file, or
    an ``nbd+unix://`` export) of ``format`` (``'qcow2'``, ``'raw'``)."""
    disk_id: str
    uri: str
    format: str


@runtime_checkable
class Format(Protocol):
    """How a backup's disks are encoded; each member's contract is in its docstring."""

    name: str                   # 'qcow2' or 'datastore'
    captures: tuple             # the capture shapes it stores: (BLOCK,) for both formats today
    capture: str                # 'push': QEMU writes the targets; 'pull': the engine reads NBD
    key_fingerprint: str        # the key new backups are encrypted with (colon hex), or None

    # -- backup -----------------------------------------------------------------------------
    def create_targets(self, staged, disks, decision, compression):
        """Before the point in time: ``{disk id: TargetImage}`` QEMU writes into (push) or the
        local fleecing images (pull)."""

    def copy(self, staged, capture, targets, progress, bwlimit_kib=0, max_workers=None,
             log=None):
        """From the point in time to the storage: ``{disk id: what was processed}``."""

    def discard_targets(self, targets):
        """Remove what ``create_targets`` made outside the staged backup."""

    def finish_disks(self, staged, disks, targets, processed, bitmaps):
        """After the copy: the images durable; one ``DiskEntry`` per disk."""

    def manifest(self, fields):
        """The backup's ``Manifest`` from what the run decided, with the format's version."""

    # -- reading ----------------------------------------------------------------------------
    def dependencies(self, storage, record):
        """The backups a restore of ``record`` reads, oldest first; StorageError if one is
        gone."""

    def restored_bytes(self, chain, disk_id):
        """At most the guest data a restore of one disk writes."""

    def verify_files(self, storage, records, disk_ids=None, workers=None):
        """The files a restore would read, checked against their manifests: problems, as
        lines."""

    def verify(self, storage, record, check_mode=False):
        """``(the backups read, problems)``: everything verify checks of one backup."""

    def start_restore(self, storage, record, disk_id, target, target_format, bwlimit_kib):
        """A running copy of one disk into ``target``; ``.communicate()`` ends it, ``.kill()``
        stops it, ``.returncode`` tells."""

    def restore_with_snapshots(self, storage, chain, disk_id, target, log):
        """One qcow2 holding every backup of the chain as an internal snapshot; ConfigError
        where the format has no chain."""

    def leftovers(self, target):
        """The files a failed restore into ``target`` may leave."""

    def open_block_exports(self, storage, record, disk_ids, server):
        """A context manager: ``{disk id: BlockExport}`` of ``disk_ids`` of ``record``, readable
        while it is open. ``server.serve(make_exports)`` (a context manager yielding a unix
        socket's path) serves ``make_exports()``, ``{export name: export}``, over NBD: in this
        process (restore/nbd_server.ThreadServer) or in a process that outlives the call
        (restore/live_server.LiveServer, which asks the format again there). A format whose
        disks are files QEMU opens yields them and never uses the server."""

    # -- pruning and garbage ----------------------------------------------------------------
    def plan_removal(self, backups, removed):
        """What kept backups need before the ``removed`` times go: ``[(kept record, new
        parent)]``."""

    def apply_removal_plan(self, storage, plan, log):
        """Carry out ``plan_removal``'s plan."""

    def recover(self, storage, vmid):
        """Finish or drop what a crash interrupted (under the guest's lock):
        ``[(backup id, completed)]``."""

    def collect_garbage(self, grace_seconds, check_mode=False, progress=None):
        """Remove the data no backup names any more: the GC's statistics; ConfigError for a
        format without shared data."""


def accept_capture(fmt, kind, storage_label):
    """Refuse (ConfigError) a capture of a shape ``fmt`` cannot store: a ``kind`` of
    format/capture.py, the storage named in the message."""
    if kind not in fmt.captures:
        held = ' or '.join({'block': "disk images (a VM's block devices)",
                            'tree': "file trees (a container's files)"}[k]
                           for k in fmt.captures)
        raise ConfigError(f"{storage_label} holds {fmt.name} backups, which store {held}; "
                          f"a guest whose backup is a {kind} capture cannot be backed up "
                          "to it: choose a storage whose format takes it")
