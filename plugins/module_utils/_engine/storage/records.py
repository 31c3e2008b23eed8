"""The typed records of a backup: ``Manifest`` (with one ``DiskEntry`` per disk) and
``BackupRecord``, as a storage lists them, and ``DamagedBackup`` for one it cannot read.

A manifest is JSON that users and other tools read (``index.json`` of a qcow2 chain, PBS's
``unprotected.guestvault``), so a record must not change it by one byte: ``from_dict`` keeps the
keys it was read with, in their order, and every key it does not know (a newer version's, a
test's marker); ``to_dict`` gives back the same dict, with the fields as they are now. Keys the
record does not have are left out rather than written as ``null``, so a manifest read and written
again is the manifest that was read.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

from ..times import format_time, parse_time


class _JsonRecord:
    """A dataclass read from, and written back to, one JSON object without changing it."""

    @classmethod
    def _known(cls):
        """The field names, in order; computed once per class (listing thousands of backups
        reads every manifest through here)."""
        known = cls.__dict__.get('_known_names')
        if known is None:
            known = tuple(f.name for f in fields(cls) if not f.name.startswith('_'))
            cls._known_names = known
            cls._known_set = frozenset(known)
        return known

    _parsed = ()        # the keys whose JSON value ``_parse`` turns into something else

    @classmethod
    def from_dict(cls, data):
        cls._known()
        known = cls._known_set
        if known.issuperset(data):  # the usual case, with no per-key work
            record = cls(**data)
            record._unknown = {}
        else:
            record = cls(**{k: v for k, v in data.items() if k in known})
            record._unknown = {k: v for k, v in data.items() if k not in known}
        for key in cls._parsed:
            if key in data:
                setattr(record, key, cls._parse(key, data[key]))
        record._order = tuple(data)
        return record

    @classmethod
    def _parse(cls, key, value):
        return value

    def _dump(self, key, value):
        return value

    def to_dict(self):
        """The JSON object: the keys read, in their order, then fields set since (not None)."""
        known = self._known()
        keys = list(self._order) + [k for k in known
                                    if k not in self._order and getattr(self, k) is not None]
        return {k: self._dump(k, getattr(self, k)) if k in known else self._unknown[k]
                for k in keys}

    def update(self, changes):
        """Set keys of the JSON object, known fields or not."""
        known = self._known()
        for key, value in changes.items():
            if key in known:
                setattr(self, key, value)
            else:
                self._unknown[key] = value
                if key not in self._order:
                    self._order += (key,)

    def get(self, key, default=None):
        """A key of the JSON object, known or not (a field a newer version added, a marker)."""
        return self.to_dict().get(key, default)


@dataclass
class DiskEntry(_JsonRecord):
    """One disk of a backup's manifest. Both formats write the fields below; each keeps its own
    too (the chain's ``segment_sha256``, older backups' ``sha256``; the datastore's ``csum``,
    ``data_bytes`` and chunk counts)."""

    id: str = None
    node: str = None             # QEMU's node name at the backup (informational)
    format: str = None           # the guest's image format
    virtual_size: int = None
    file: str = None             # the image (qcow2) or index file (datastore) in the backup
    level: str = None            # 'full' or 'inc'
    backing: str = None          # qcow2 inc: ../<parent time>/<disk>.qcow2
    bytes_written: int = None    # guest data this backup stored
    bytes_processed: int = None
    size: int = None             # the file's size
    bitmap: str = None           # the chain's bitmap the next incremental counts from
    sha256: str = None           # qcow2, older backups: the whole image's digest
    segment_size: int = None     # qcow2: the image's digest per segment of this many bytes
    segment_sha256: list = None  # qcow2: sha256 of each segment, in file order
    csum: str = None             # datastore: the index's checksum
    data_bytes: int = None       # datastore: the guest data a restore writes
    _order: tuple = field(default=(), repr=False, compare=False)
    _unknown: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class Manifest(_JsonRecord):
    """What a backup's manifest holds: the qcow2 chain's ``index.json``, a datastore's
    ``unprotected.guestvault`` (plus ``notes``, ``verify`` and ``key_fingerprint``, which the
    datastore keeps where PBS does and adds when it reads the record)."""

    vmid: int = None
    time: str = None             # the backup's name, YYYY-MM-DDTHH:MM:SSZ
    level: str = None            # 'full', 'inc' or 'copy'
    level_reason: str = None
    parent: str = None           # inc: the time of the backup it builds on
    chain: str = None
    chain_start: str = None
    mode: str = None
    compress: str = None
    disks: list = field(default_factory=list)        # of DiskEntry
    guest_name: str = None
    node: str = None
    duration: float = None
    frozen_filesystems: list = None
    warnings: list = None
    format: int = None           # the manifest's version
    tool: str = None
    encrypted: bool = None       # datastore
    notes: str = None            # datastore (a qcow2 chain keeps a file of its own)
    verify: dict = None          # datastore (a qcow2 chain keeps verify.json)
    key_fingerprint: str = None  # datastore: the key the snapshot was made with
    _order: tuple = field(default=(), repr=False, compare=False)
    _unknown: dict = field(default_factory=dict, repr=False, compare=False)

    _parsed = ('disks',)

    @classmethod
    def _parse(cls, key, value):
        return [d if isinstance(d, DiskEntry) else DiskEntry.from_dict(d) for d in value]

    def _dump(self, key, value):
        return [d.to_dict() for d in value] if key == 'disks' else value

    def disk(self, disk_id):
        """The entry of one disk, or None."""
        return next((d for d in self.disks if d.id == disk_id), None)

    def copy(self):
        """A deep copy to change (``BackupRecord.update_manifest``) without touching this one."""
        return copy.deepcopy(self)


def as_manifest(manifest):
    """A Manifest from a Manifest or its dict (records built by hand, in tests)."""
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


class BackupRecord:
    """A complete backup as found on a storage: its location, manifest and protection, and the
    storage it lives on (for its notes, verify state and manifest updates)."""

    archive = None      # a vzdump archive's parsed name (ArchiveRecord); None: a backup directory

    def __init__(self, path, manifest, protected, storage=None):
        self.path = path
        self.manifest = as_manifest(manifest)
        self.protected = protected
        self.storage = storage

    @property
    def index(self):
        """The manifest as the JSON object on disk (what tests and other tools compare)."""
        return self.manifest.to_dict()

    @property
    def time(self):
        return parse_time(self.manifest.time)

    @property
    def id(self):
        return f"vm/{self.manifest.vmid}/{self.manifest.time}"

    @property
    def notes(self):
        return self.storage.read_notes(self)

    @property
    def verify_state(self):
        """The last verify's state (``{'state': 'ok'|'failed', 'time': ...}``), or None."""
        return self.storage.read_verify_state(self)

    def update_manifest(self, fn):
        """Change the manifest through its storage: ``fn`` changes a copy; the keys it changed
        are written, in the one way the storage changes a committed backup's manifest."""
        changed = self.manifest.copy()
        fn(changed)
        before, after = self.manifest.to_dict(), changed.to_dict()
        changes = {k: v for k, v in after.items() if before.get(k) != v or k not in before}
        if changes:
            self.storage.update_manifest(self, **changes)

    def as_result(self):
        """The backup as modules return it (shaped for json_query)."""
        m, verify = self.manifest, self.verify_state
        return {
            'id': self.id, 'vmid': m.vmid, 'time': m.time,
            'epoch': int(self.time.timestamp()), 'guest_name': m.guest_name,
            'level': m.level, 'chain': m.chain, 'parent': m.parent,
            'mode': m.mode, 'size': self.storage.backup_size(self), 'protected': self.protected,
            'notes': self.notes, 'path': self.path,
            'verify_state': verify['state'] if verify else 'none',
            'verified_at': verify.get('time') if verify else None,
            'disks': [{'id': d.id, 'virtual_size': d.virtual_size, 'level': d.level,
                       'size': d.size, 'bytes_written': d.bytes_written}
                      for d in m.disks],
        }

    def __repr__(self):
        return f"BackupRecord({self.id!r}, level={self.manifest.level!r})"


class ArchiveRecord(BackupRecord):
    """A vzdump archive (``vzdump-lxc-<vmid>-<time>.tar.zst``) on a directory storage: one file,
    always a full backup, with PVE's companions (``.notes``, ``.protected``, ``.log``) beside it.
    Its manifest is made from its name (vmid, time, level ``full``, compression): there is no
    manifest file to update. Its id is its file name, as PVE's volume ids name it."""

    def __init__(self, path, archive, protected, storage=None):
        super().__init__(path, Manifest.from_dict({
            'vmid': archive.vmid, 'time': format_time(archive.time), 'level': 'full',
            'compress': archive.compression, 'type': archive.type,
            'archive_format': archive.format}), protected, storage)
        self.archive = archive

    @property
    def id(self):
        return self.archive.name

    def as_result(self):
        result = super().as_result()
        result.update(type=self.archive.type, format='vzdump', archive=self.archive.name,
                      compression=self.archive.compression)
        return result

    def __repr__(self):
        return f"ArchiveRecord({self.id!r})"


class DamagedBackup:
    """A backup directory whose manifest cannot be read: it is no ``BackupRecord`` (nothing can
    be restored, pruned or built on from it), but it is listed, with the reason, so it is never
    passed over in silence and can be repaired (the manifest restored) or removed by hand."""

    def __init__(self, path, vmid, name, reason):
        self.path = path
        self.vmid = int(vmid)
        self.name = name        # the directory's name: the backup's time
        self.reason = reason

    @property
    def time(self):
        return parse_time(self.name)

    @property
    def id(self):
        return f"vm/{self.vmid}/{self.name}"

    def __repr__(self):
        return f"DamagedBackup({self.id!r}, {self.reason!r})"
