"""What a restore would write, where and how big: the request, checked, and the plan.

Plain and live restore (restore.py, restore/live.py) both plan here, and neither imports the
other's planning: restore.py chooses between them.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from ..errors import ConfigError, StorageError
from ..format import qemu_img
from ..guest.registry import guest_path, validate_vmid
from ..paths import CONFIG_DIR
from ..vocabulary import RESTORE_FORMATS
from .locate import format_of
from .request import Request


@dataclass
class RestoreRequest(Request):
    vmid: int
    target_dir: str = None       # a VM's images; a container goes to lxcpath
    backup: str = None           # None or 'latest': the newest
    until: object = None
    storage: str = None
    dumpdir: str = None
    config_dir: str = CONFIG_DIR
    disks: list = None
    format: str = 'qcow2'
    snapshots: bool = False
    bwlimit: int = 0             # KiB/s read from the storage, 0 = unlimited
    force: bool = False
    new_vmid: int = None
    new_qmp_socket: str = None
    lockwait: float = 180        # minutes to wait while a backup or prune of the guest runs
    check_mode: bool = False
    live: bool = False           # start the guest at once, copy its disks in the background
    lxc_name: str = None         # a container archive: the new container's name
    lxcpath: str = None          # a container archive: the directory of the new container
    start: bool = False          # a container archive: start the new container


@dataclass
class PlannedDisk:
    """One disk a restore writes: where, in which format, how big."""
    id: str
    target: str
    format: str
    virtual_size: int
    data_bytes: int          # the guest data the restore writes, at most

    def as_result(self, *keys):
        """The disk as the modules return it: ``keys`` of it (default all)."""
        values = asdict(self)
        return {k: values[k] for k in keys or values}


@dataclass
class RestorePlan:
    """What a restore would write, where and how big (``plan_restore``)."""
    storage: object          # the Storage
    format: object           # its Format
    record: object           # the BackupRecord restored
    chain: list              # the backups its restore reads, oldest first
    disks: list              # of PlannedDisk
    target_dir: str          # resolved
    new_vmid: int            # None: no new registry entry
    warnings: list


def _check_target_dir(request, storage):
    target = request.target_dir
    if target is None:
        raise ConfigError("target_dir is required to restore a VM's backup: give the "
                          "directory for its images")
    if not os.path.isabs(target):
        raise ConfigError(f"target_dir {target!r} must be an absolute path")
    real = os.path.realpath(target)
    if os.path.exists(real) and not os.path.isdir(real):
        raise ConfigError(f"target_dir {target} exists and is not a directory; give a directory")
    for forbidden, what in ((storage.path, 'the backup storage'),
                            (request.config_dir, 'the guestvault configuration')):
        root = os.path.realpath(forbidden)
        if os.path.commonpath([real, root]) == root:
            raise ConfigError(f"target_dir {target} lies inside {what} ({forbidden}); restore "
                              "to a directory outside it")
    return real


def check_request(request):
    """Every option that needs no storage, checked before anything is locked, started or made."""
    validate_vmid(request.vmid)
    if request.new_vmid is not None:
        validate_vmid(request.new_vmid)
    if request.format not in RESTORE_FORMATS:
        raise ConfigError(f"format {request.format!r} is not one of "
                          f"{', '.join(RESTORE_FORMATS)}")
    if request.snapshots and request.format != 'qcow2':
        raise ConfigError("snapshots needs format qcow2: only qcow2 holds internal snapshots")
    for key, unit in (('bwlimit', 'KiB/s, 0 for no limit'), ('lockwait', 'minutes')):
        value = getattr(request, key)
        if value is not None and float(value) < 0:
            raise ConfigError(f"{key} {value} is negative; give {unit}")
    if request.disks is not None and (not request.disks or not all(request.disks)):
        raise ConfigError(f"disks {request.disks!r} names no disk (or an empty one); leave "
                          "disks out to restore every disk, or name each disk by its id")
    if request.new_qmp_socket is not None and not os.path.isabs(request.new_qmp_socket):
        raise ConfigError(f"new_qmp_socket {request.new_qmp_socket!r} must be an absolute path")


def plan_restore(request, opened):
    """What a restore would write, where and how big; changes nothing. ``opened`` is the
    request's backups as run/verb.open_backups opened them (request checked, guest locked)."""
    storage = opened.storage
    target_dir = _check_target_dir(request, storage)
    fmt = format_of(storage)
    record = opened.record or opened.resolve()
    chain = fmt.dependencies(storage, record)
    by_id = {d.id: d for d in record.manifest.disks}
    wanted = list(request.disks) if request.disks else list(by_id)
    twice = sorted({d for d in wanted if wanted.count(d) > 1})
    if twice:
        raise ConfigError(f"disks names {', '.join(twice)} more than once; name each disk once")
    unknown = [d for d in wanted if d not in by_id]
    if unknown:
        raise ConfigError(f"backup {record.id} has no disk(s) {', '.join(unknown)}; it has "
                          f"{', '.join(by_id)}")
    new_vmid = validate_vmid(request.new_vmid) if request.new_vmid is not None else None
    if new_vmid is not None and os.path.exists(guest_path(request.config_dir, new_vmid)) \
            and not request.force:
        raise ConfigError(f"guest {new_vmid} is already registered "
                          f"({guest_path(request.config_dir, new_vmid)}); choose another "
                          "new_vmid or set force")
    disks, problems = [], []
    for disk_id in wanted:
        disk = by_id[disk_id]
        target = os.path.join(target_dir, f"{disk_id}.{request.format}")
        if os.path.exists(target):
            if qemu_img.in_use(target):
                problems.append(f"{target} is in use by a running QEMU; stop that guest first "
                                "(force does not override this)")
            elif not request.force:
                problems.append(f"{target} exists; set force to overwrite it")
        disks.append(PlannedDisk(disk_id, target, request.format, disk.virtual_size,
                                 fmt.restored_bytes(chain, disk_id)))
    if problems:
        raise StorageError('; '.join(problems))
    return RestorePlan(storage, fmt, record, chain, disks, target_dir, new_vmid,
                       opened.warnings)
