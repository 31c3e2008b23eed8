"""Which block devices of a guest are its disks, and which of them a backup takes.

A disk is named by its device id (``-device ...,id=virtio0`` or a legacy ``-drive id=``), the name
an admin wrote on the QEMU command line, never by an internal node name that changes per start.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import DiskSelectionError

# Formats whose images can carry a persistent dirty bitmap (qcow2 v3, "compat 1.1").
BITMAP_FORMATS = ('qcow2',)
# Filters a running backup job puts on top of a disk while it copies.
JOB_FILTERS = ('copy-before-write', 'backup-top')
# UEFI variable stores are small raw images that must come back with the guest, or it will not
# boot the same way; the firmware code image (pflash0) is read-only and comes from the package.
PFLASH_VARS_IDS = ('pflash1',)


@dataclass
class Disk:
    id: str
    node: str
    format: str
    virtual_size: int
    filename: str
    read_only: bool = False
    supports_bitmaps: bool = False
    is_pflash: bool = False
    in_job: bool = False
    bitmaps: list = field(default_factory=list)
    allocated: int = 0           # bytes the image takes on the host (about what a full copies)

    def as_dict(self):
        return {'id': self.id, 'node': self.node, 'format': self.format,
                'virtual_size': self.virtual_size, 'filename': self.filename,
                'bitmaps': [b['name'] for b in self.bitmaps]}


def _device_id(entry):
    if entry.get('device'):
        return entry['device']
    qdev = entry.get('qdev') or ''
    match = re.match(r'^/machine/peripheral/([^/]+)/', qdev)
    if match:
        return match.group(1)
    match = re.match(r'^/machine/system\.flash(\d)$', qdev)
    if match:
        return 'pflash' + match.group(1)
    return entry['inserted']['node-name']


def _bitmap_capable(image):
    if image.get('format') != 'qcow2':
        return False
    data = (image.get('format-specific') or {}).get('data') or {}
    return data.get('compat', '1.1') != '0.10'


def discover_disks(qmp):
    """All block devices with a medium, in QEMU's order, with their bitmaps.

    While a block job copies a disk, QEMU shows its filter on top: the disk's own node, format
    and bitmaps are then read from the node under the filter, so a disk looks the same during
    a job as outside one (only ``in_job`` says otherwise).
    """
    disks = []
    nodes = None
    for entry in qmp.execute('query-block'):
        inserted = entry.get('inserted')
        if not inserted or entry.get('removable'):
            continue  # empty drives and CD-ROMs hold no guest data worth a backup
        image = inserted['image']
        node, bitmaps = inserted['node-name'], inserted.get('dirty-bitmaps') or []
        in_job = inserted['drv'] in JOB_FILTERS
        if in_job and image.get('backing-image'):
            image = image['backing-image']
            if nodes is None:
                nodes = qmp.execute('query-named-block-nodes', {'flat': True})
            below = next((n for n in nodes if n.get('file') == image.get('filename')
                          and n['drv'] == image.get('format')), None)
            if below is not None:
                node, bitmaps = below['node-name'], below.get('dirty-bitmaps') or []
        disk_id = _device_id(entry)
        disks.append(Disk(
            id=disk_id,
            node=node,
            format=image['format'],
            virtual_size=image['virtual-size'],
            filename=image.get('filename', inserted.get('file', '')),
            read_only=bool(inserted.get('ro')),
            supports_bitmaps=_bitmap_capable(image),
            is_pflash=disk_id.startswith('pflash'),
            in_job=in_job,
            allocated=image.get('actual-size') or 0,
            # A running block job's own bitmaps have no name: they are the job's, not the disk's.
            bitmaps=[b for b in bitmaps if b.get('name')],
        ))
    return disks


def select_disks(disks, include=None, exclude=None, include_raw=False):
    """Pick the disks one backup takes; returns (selected, warnings).

    Raw disks cannot carry a dirty bitmap, so they are always copied whole; that can be large,
    which is why they are taken only when asked for (``include_raw``), as qmpbackup does. The UEFI
    variable store is the exception: tiny, and the guest does not boot the same without it.
    """
    known = {d.id for d in disks}
    for option, names in (('include', include), ('exclude', exclude)):
        unknown = sorted(set(names or ()) - known)
        if unknown:
            raise DiskSelectionError(
                f"{option} names disk(s) {', '.join(unknown)} that the guest does not have; "
                f"its disks are: {', '.join(sorted(known)) or 'none'}")
    if include and exclude and set(include) & set(exclude):
        raise DiskSelectionError(
            f"disk(s) {', '.join(sorted(set(include) & set(exclude)))} are both included and "
            "excluded; name each disk in one list only")
    selected, warnings = [], []
    for disk in disks:
        if include and disk.id not in include:
            continue
        if exclude and disk.id in exclude:
            continue
        if disk.is_pflash and disk.id not in PFLASH_VARS_IDS:
            continue
        if disk.in_job:
            # Its format is hidden under the job's filter; require_idle() decides later.
            selected.append(disk)
            continue
        if not disk.supports_bitmaps and not disk.is_pflash and not include_raw:
            if include:
                raise DiskSelectionError(
                    f"disk {disk.id} is {disk.format}: it cannot hold a dirty bitmap, so it is "
                    "copied whole every time and only with include_raw set; set include_raw")
            warnings.append(
                f"disk {disk.id} ({disk.format}) skipped: it cannot hold a dirty bitmap and would "
                "be copied whole every time; set include_raw to back it up")
            continue
        selected.append(disk)
    if not selected:
        raise DiskSelectionError(
            "no disk left to back up after include/exclude and the raw-disk rule; disks: "
            + ', '.join(f"{d.id} ({d.format})" for d in disks))
    return selected, warnings


def require_idle(disks):
    """A disk under another block job cannot join this backup's transaction."""
    for disk in disks:
        if disk.in_job:
            raise DiskSelectionError(
                f"disk {disk.id} is being copied by a running block job of another tool; wait "
                "until it ends")
