"""file_restore: list a directory of a backup, or extract files from it, without restoring the
disk and without mounting the guest's filesystem on the host.

This is the verb: its request, the checks of every input before anything is read, locked or
booted, and the guest's backups opened (shared lock: a prune waits). restore/file_restore.py
does the rest: the appliance VM reads the backup's block exports (``Format.open_block_exports``)
and lists, measures or extracts.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from ..errors import ConfigError
from ..paths import CONFIG_DIR
from ..restore.archive_files import restore_archive_files
from ..restore.file_restore import DEFAULT_MAX_BYTES, normalize_path, parse_size, restore_files
from .locate import format_of
from .opener import open_backups
from .request import Request


@dataclass
class FileRestoreRequest(Request):
    vmid: int
    config_dir: str = CONFIG_DIR
    storage: str = None
    dumpdir: str = None
    backup: str = 'latest'
    filesystem: str = None
    paths: list = field(default_factory=lambda: ['/'])
    dest: str = None
    archive: str = None
    overwrite: bool = False
    max_size: object = DEFAULT_MAX_BYTES
    timeout: float = 1800.0
    lockwait: float = 180.0          # minutes, as for every verb
    check_mode: bool = False

    @property
    def extracting(self):
        return bool(self.dest or self.archive)


# An empty value must not stand for the default: 'dest=' is not 'list', 'backup=' not 'latest'.
_EMPTY = {'backup': "give 'latest', a time or an id, or leave backup out",
          'filesystem': "name one of the result's filesystems, or leave filesystem out when "
                        "the backup holds only one",
          'dest': "give the absolute directory to extract into, or leave dest out to list",
          'archive': "give the absolute path of the tar file to write, or leave archive out"}


def _check_request(request):
    """Every input, before anything is read, locked or booted."""
    for name, advice in _EMPTY.items():
        if getattr(request, name) == '':
            raise ConfigError(f"{name} is empty; {advice}")
    if not 0 < float(request.timeout) < math.inf:
        raise ConfigError(f"timeout {request.timeout} is not a number of seconds larger than 0; "
                          "give the seconds the appliance may take, e.g. 1800")
    if not 0 <= float(request.lockwait) < math.inf:
        raise ConfigError(f"lockwait {request.lockwait} is not a number of minutes of 0 or "
                          "more; give the minutes to wait for a backup's lock, e.g. 180")
    if request.dest and request.archive:
        raise ConfigError("dest and archive are mutually exclusive; give one")
    for name in ('dest', 'archive'):
        value = getattr(request, name)
        if value and not os.path.isabs(value):
            raise ConfigError(f"{name} {value!r} is a relative path; give an absolute path")
    if not request.paths:
        raise ConfigError("path names nothing; give the path to list or extract")
    paths = [normalize_path(p) for p in request.paths]
    if not request.extracting and len(paths) != 1:
        raise ConfigError(f"listing takes one path, not {len(paths)}; to extract several, "
                          "set dest or archive")
    if request.archive and os.path.isdir(request.archive):
        raise ConfigError(f"archive {request.archive} is a directory; name the tar file to write")
    if request.dest and os.path.lexists(request.dest) and not os.path.isdir(request.dest):
        raise ConfigError(f"dest {request.dest} exists and is not a directory")
    parent = os.path.dirname(request.archive) if request.archive else None
    if parent and not os.path.isdir(parent):
        raise ConfigError(f"archive's directory {parent} does not exist; create it first")
    return paths


def run_file_restore(request, log=None):
    log = log or (lambda message: None)
    paths = _check_request(request)
    max_bytes = parse_size(request.max_size)
    # latest passing over a damaged backup says so (in the result's warnings)
    with open_backups(request, 'file_restore', shared=True) as opened:
        storage, record = opened.storage, opened.record
        result = {'backup': record.id, 'time': record.manifest.time,
                  'level': record.manifest.level, 'paths': ['/' + p for p in paths],
                  'warnings': opened.warnings}
        if record.archive is not None:  # a container's tar: read directly, no appliance
            if request.filesystem:
                raise ConfigError(f"filesystem {request.filesystem!r} names a file system on a "
                                  f"VM's disk, and backup {record.id} is a container's archive: "
                                  "one file tree, with no file systems to choose from; leave "
                                  "filesystem out")
            return restore_archive_files(request, storage, record, paths, max_bytes, result,
                                         log)
        return restore_files(request, storage, format_of(storage), record, paths, max_bytes,
                             result, log)
