"""vzdump's archive names, as pve-storage parses them (``PVE::Storage::archive_info``).

``vzdump-<type>-<vmid>-<YYYY_MM_DD-HH_MM_SS>.<ext>``: ``type`` is ``lxc``, ``qemu`` or
``openvz``, ``ext`` is ``tgz`` or ``tar``/``vma`` with an optional ``.gz``, ``.lzo``, ``.zst``
or ``.bz2``. The time is the node's **local** time, as vzdump writes it (``strftime(...,
localtime)``) and pve-storage reads it back (``timelocal``): a name is parsed in the local time
zone of the host that lists it (``TZ`` decides), as on Proxmox VE.

The companions, named as PVE names them: ``<stem>.log`` (the name up to ``.tar``/``.vma``),
``<archive>.notes``, ``<archive>.protected``. While being written the archive is
``<name without its last extension>.dat`` (vzdump's ``tmptar``: ``….tar.dat`` for a
compressed archive), renamed once complete; a ``.dat`` is never a backup.

This is below format/ (storage/ lists archives; format/vzdump_archive writes and reads them).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

TYPES = ('lxc', 'openvz', 'qemu')
COMPRESSIONS = ('gz', 'lzo', 'zst', 'bz2')       # pve-storage's KNOWN_COMPRESSION_FORMATS
# vzdump's ``compress`` values -> the archive's extension after ``.tar``
COMPRESS_EXT = {'0': None, '': None, None: None, 'zstd': 'zst', '1': 'lzo', 'lzo': 'lzo',
                'gzip': 'gz'}
TIME_FORMAT = '%Y_%m_%d-%H_%M_%S'
LOG_EXT, NOTES_EXT, PROTECTED_EXT, DAT_EXT = '.log', '.notes', '.protected', '.dat'

# $BACKUP_EXT_RE_2 and archive_info's standard-name pattern
_EXT = r'(tgz|(?:tar|vma)(?:\.(gz|lzo|zst|bz2))?)'
_ANY = re.compile(rf'^vzdump-(lxc|openvz|qemu)-.+\.{_EXT}$')
_STD = re.compile(r'^(vzdump-(lxc|openvz|qemu)-([1-9][0-9]{2,8})-'
                  r'(\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}))\.' + _EXT + '$')
_DAT = re.compile(r'^vzdump-(?:lxc|openvz|qemu)-([1-9][0-9]{2,8})-'
                  r'\d{4}_\d{2}_\d{2}-\d{2}_\d{2}_\d{2}(?:\.tar|\.vma)?\.dat$')


@dataclass(frozen=True)
class ArchiveName:
    """A standard vzdump archive name, parsed."""
    name: str            # the file name (PVE's volid without the storage)
    type: str            # 'lxc', 'qemu' or 'openvz'
    vmid: int
    time: datetime       # aware, UTC
    format: str          # 'tar' or 'vma'
    compression: str     # 'gz', 'lzo', 'zst', 'bz2' or None

    @property
    def stem(self):
        """``vzdump-<type>-<vmid>-<time>``: the log's name without ``.log``."""
        return _STD.match(self.name).group(1)

    @property
    def log_name(self):
        return self.stem + LOG_EXT

    @property
    def notes_name(self):
        return self.name + NOTES_EXT

    @property
    def protected_name(self):
        return self.name + PROTECTED_EXT

    @property
    def dat_name(self):
        return dat_name(self.name)


def parse(name):
    """The parsed standard name, or None for any other file (a ``.dat``, a companion, a
    non-standard name pve-storage lists without a vmid, anything else)."""
    match = _STD.match(name)
    if not match:
        return None
    _whole, kind, vmid, stamp, ext, comp = match.groups()
    try:
        local = datetime.strptime(stamp, TIME_FORMAT)
    except ValueError:
        return None         # 2024_13_45-...: pve-storage's timelocal dies on it too
    fmt, comp = ('tar', 'gz') if ext == 'tgz' else (ext.split('.')[0], comp)
    return ArchiveName(name, kind, int(vmid), local.astimezone().astimezone(timezone.utc),
                       fmt, comp)


def is_archive_name(name):
    """Whether pve-storage's ``archive_info`` accepts ``name`` at all (standard or not)."""
    return bool(_ANY.match(name))


def archive_name(kind, vmid, when, compress='zstd'):
    """The name vzdump gives a ``kind`` (``lxc``) backup of ``vmid`` taken at ``when`` (an aware
    datetime, named in local time) with vzdump's ``compress`` value."""
    if compress not in COMPRESS_EXT:
        raise ValueError(f"unknown compress value {compress!r}")
    ext = COMPRESS_EXT[compress]
    stamp = when.astimezone().strftime(TIME_FORMAT)
    fmt = 'vma' if kind == 'qemu' else 'tar'
    return f"vzdump-{kind}-{int(vmid)}-{stamp}.{fmt}" + (f".{ext}" if ext else '')


def dat_name(name):
    """vzdump's temporary name of an archive: its last extension replaced by ``.dat``."""
    return name.rsplit('.', 1)[0] + DAT_EXT


def is_dat_of(name, vmid):
    """Whether ``name`` is a temporary archive of guest ``vmid`` that a killed run left."""
    match = _DAT.match(name)
    return bool(match) and int(match.group(1)) == int(vmid)
