"""One snapshot's small files as the datastore storage keeps them: the manifest and blobs.

The storage lists, stages and removes snapshot directories; it hands their files to this codec,
which alone knows the encoding:

- ``index.json.blob`` is PBS's manifest. guestvault's own record of the backup (the same fields
  a qcow2 chain's ``index.json`` has: level, parent, chain, disks, mode, ...) is kept under
  ``unprotected.guestvault``, which PBS carries along untouched; notes and the verify state are
  where PBS keeps them (``unprotected.notes``, ``unprotected.verify_state``), with the problems a
  verify found beside them (``unprotected.guestvault-verify``).
- A snapshot written by a PBS client has no ``unprotected.guestvault``: its record is derived
  from the manifest's files (each ``drive-<disk>.img.fidx`` a full disk), so it lists and
  restores too.
- The guest configuration and the log are DataBlobs, encrypted when the datastore has a key.
"""
from __future__ import annotations

import calendar
import os
import time

from ..errors import CorruptData
from ..storage.files import write_file_atomic
from ..storage.records import Manifest, as_manifest
from .blob import crypt_mode, decode_blob, encode_blob
from .manifest import (MANIFEST_BLOB_NAME, BackupManifest, blob_file_info, make_upid,
                       snapshot_time_text)

RECORD_KEY = 'guestvault'
VERIFY_KEY = 'guestvault-verify'
INDEX_PREFIX = 'drive-'
INDEX_SUFFIX = '.img.fidx'


def index_name(disk_id):
    """The fixed index of one disk, named as Proxmox VE names a VM's drives."""
    return f"{INDEX_PREFIX}{disk_id}{INDEX_SUFFIX}"


def disk_of(filename):
    """The disk id of an index file name, or None."""
    if filename.startswith(INDEX_PREFIX) and filename.endswith(INDEX_SUFFIX):
        return filename[len(INDEX_PREFIX):-len(INDEX_SUFFIX)]
    return None


def epoch_of(time_text):
    return calendar.timegm(time.strptime(time_text, '%Y-%m-%dT%H:%M:%SZ'))


class SnapshotCodec:
    """Encodes and decodes a datastore snapshot's manifest and blobs (with the key, if any)."""

    def __init__(self, crypt=None):
        self.crypt = crypt

    # -- the manifest ----------------------------------------------------------------------------
    def read_manifest(self, backup_dir, check_signature=False):
        path = os.path.join(backup_dir, MANIFEST_BLOB_NAME)
        with open(path, 'rb') as handle:
            raw = handle.read()
        return BackupManifest.decode(raw, self.crypt if check_signature else None,
                                     name=path)

    def read_index(self, backup_dir):
        """The backup's Manifest (as a qcow2 chain's index.json), with ``notes`` and ``verify``."""
        manifest = self.read_manifest(backup_dir)
        record = manifest.unprotected.get(RECORD_KEY)
        if isinstance(record, dict):
            index = dict(record)
        else:
            index = self._foreign_index(manifest)
        if str(index.get('vmid')) != manifest.backup_id \
                or index.get('time') != snapshot_time_text(manifest.backup_time):
            raise CorruptData(f"{backup_dir}: the manifest names {manifest.relpath()}, its "
                              "guestvault record another snapshot")
        index['notes'] = manifest.notes
        state = manifest.verify_state
        index['verify'] = dict(manifest.unprotected.get(VERIFY_KEY) or {},
                               state=state['state']) if state else None
        index['key_fingerprint'] = manifest.unprotected.get('key-fingerprint')
        return Manifest.from_dict(index)

    @staticmethod
    def _foreign_index(manifest):
        """The record of a snapshot a PBS client wrote: every drive image a full disk."""
        disks = []
        for info in manifest.files:
            disk_id = disk_of(info.filename)
            if disk_id is None:
                continue
            disks.append({'id': disk_id, 'file': info.filename, 'virtual_size': info.size,
                          'size': info.size, 'level': 'full', 'csum': info.csum.hex(),
                          'bytes_written': None, 'bitmap': None})
        if not manifest.backup_id.isdigit():
            raise CorruptData(f"{manifest.relpath()}: not a guest's snapshot")
        return {'vmid': int(manifest.backup_id), 'time': snapshot_time_text(manifest.backup_time),
                'level': 'full', 'parent': None, 'chain': None, 'guest_name': None,
                'mode': None, 'disks': disks, 'written_by': 'another client'}

    def write_manifest(self, backup_dir, index, notes=None, blobs=None):
        """``index.json.blob`` for a snapshot whose index files and ``blobs`` are written;
        ``index`` is a Manifest (or its dict)."""
        index = as_manifest(index).to_dict()
        derived = ('notes', 'verify', 'key_fingerprint')
        record = {k: v for k, v in index.items() if k not in derived}
        manifest = BackupManifest('vm', index['vmid'], epoch_of(index['time']))
        mode = 'encrypt' if self.crypt is not None else 'none'
        for disk in index['disks']:
            manifest.add_file(disk['file'], disk['virtual_size'], bytes.fromhex(disk['csum']),
                              mode)
        for name, raw in sorted((blobs or {}).items()):
            manifest.files.append(blob_file_info(name, raw, crypt_mode(raw, name)))
        manifest.unprotected[RECORD_KEY] = record
        manifest.notes = notes or None
        write_file_atomic(os.path.join(backup_dir, MANIFEST_BLOB_NAME),
                          manifest.encode(self.crypt))

    def update_unprotected(self, backup_dir, **changes):
        """Change notes (``notes``) or the verify state (``verify``) in place, as PBS does: the
        unprotected part is outside the signature, so no key is needed."""
        manifest = self.read_manifest(backup_dir)
        if 'notes' in changes:
            manifest.notes = changes['notes']
        if 'verify' in changes:
            state = changes['verify']
            manifest.set_verify_state(state['state'], make_upid('verify'))
            manifest.unprotected[VERIFY_KEY] = {k: v for k, v in state.items() if k != 'state'}
        write_file_atomic(os.path.join(backup_dir, MANIFEST_BLOB_NAME), manifest.encode())

    # -- other blobs -----------------------------------------------------------------------------
    def encode_file(self, data):
        return encode_blob(data, self.crypt)

    def decode_file(self, raw, name):
        return decode_blob(raw, self.crypt, name=name)
