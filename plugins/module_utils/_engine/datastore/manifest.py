"""A snapshot's manifest, ``index.json.blob``, as Proxmox Backup Server keeps it (manifest.rs).

A JSON object in an unencrypted DataBlob (compressed when smaller; manifests are never
encrypted, only signed)::

    backup-type   "vm", "ct" or "host"
    backup-id     the guest's id, e.g. "100"
    backup-time   the snapshot's time, epoch seconds (the directory name is the same in UTC)
    files         [{filename, crypt-mode ("none" | "encrypt" | "sign-only"), size, csum (hex)}]
                  an index's size is the image size and csum its index checksum; a blob's size
                  is its encoded length and csum the SHA-256 of the encoded bytes
    unprotected   not signed, changed in place later: "notes", "verify_state"
                  ({"state": "ok" | "failed", "upid": <the verify task's UPID>}),
                  "key-fingerprint" (all 32 bytes, colon hex) when a key was used, ...
    signature     null, or hex HMAC-SHA256 under the key's id key over the canonical JSON of
                  every field except ``unprotected`` and ``signature``

Canonical JSON (proxmox-serde's json.rs): object keys sorted by bytes, no whitespace, strings
and numbers as serde_json writes them; null is not allowed. The file itself is written as
serde_json's pretty form of the whole object, whose keys are sorted too.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import socket
import time

from ..errors import CorruptData, EncryptionKeyError
from .blob import decode_blob, encode_blob
from .crypt import format_fingerprint, parse_fingerprint

MANIFEST_BLOB_NAME = 'index.json.blob'
MANIFEST_LOCK_NAME = '.index.json.lck'
CLIENT_LOG_BLOB_NAME = 'client.log.blob'
QEMU_CONFIG_BLOB_NAME = 'qemu-server.conf.blob'
PROTECTED_MARKER = '.protected'

BACKUP_TYPES = ('vm', 'ct', 'host')
CRYPT_MODES = ('none', 'encrypt', 'sign-only')
ARCHIVE_SUFFIXES = ('.fidx', '.didx', '.blob')
VERIFY_STATES = ('ok', 'failed')

UPID_RE = re.compile(
    r'UPID:[a-zA-Z0-9]([a-zA-Z0-9-]*[a-zA-Z0-9])?:[0-9A-Fa-f]{8}:[0-9A-Fa-f]{8,9}:'
    r'[0-9A-Fa-f]{8,16}:[0-9A-Fa-f]{8}:[^:\s]+:[^:\s]*:[^:\s]+:\Z')
_UNIT_NAME_CHAR = re.compile(r'[A-Za-z0-9_.]\Z')


def snapshot_time_text(backup_time):
    """The snapshot directory's name for an epoch: ``YYYY-MM-DDTHH:MM:SSZ``, UTC."""
    return time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(backup_time))


def snapshot_relpath(backup_type, backup_id, backup_time):
    """``<type>/<id>/<time>`` below the datastore's base."""
    return os.path.join(backup_type, str(backup_id), snapshot_time_text(backup_time))


def canonical_json(value):
    """The bytes PBS signs: sorted keys, no whitespace, UTF-8; ``ValueError`` on null."""
    _refuse_null(value)
    return json.dumps(value, sort_keys=True, separators=(',', ':'),
                      ensure_ascii=False).encode('utf-8')


def _refuse_null(value):
    if value is None:
        raise ValueError("null has no canonical JSON form")
    if isinstance(value, dict):
        for item in value.values():
            _refuse_null(item)
    elif isinstance(value, list):
        for item in value:
            _refuse_null(item)


def escape_worker_id(text):
    """A UPID's worker id, escaped as systemd unit names are (``/`` -> ``-``, others ``\\xNN``)."""
    out = []
    for position, byte in enumerate(text.encode('utf-8')):
        char = chr(byte)
        if char == '/':
            out.append('-')
        elif (position == 0 and char == '.') or not _UNIT_NAME_CHAR.match(char):
            out.append(f"\\x{byte:02x}")
        else:
            out.append(char)
    return ''.join(out)


def make_upid(worker_type, worker_id='', auth_id='root@pam', node=None, pid=None, pstart=0,
              task_id=0, starttime=None):
    """A task id in PBS's form, for a verify state PBS can parse (``UPID:node:pid:...:``)."""
    node = (node or socket.gethostname()).split('.')[0]
    pid = os.getpid() if pid is None else pid
    starttime = int(time.time()) if starttime is None else starttime
    upid = (f"UPID:{node}:{pid:08X}:{pstart:08X}:{task_id:08X}:{starttime:08X}:{worker_type}:"
            f"{escape_worker_id(worker_id)}:{auth_id}:")
    if not UPID_RE.match(upid):
        raise ValueError(f"cannot form a task id from node {node!r}, type {worker_type!r}, "
                         f"user {auth_id!r}")
    return upid


class FileInfo:
    """One entry of ``files``."""

    __slots__ = ('filename', 'crypt_mode', 'size', 'csum')

    def __init__(self, filename, size, csum, crypt_mode='none'):
        self.filename = filename
        self.size = size
        self.csum = bytes(csum)
        self.crypt_mode = crypt_mode

    def __repr__(self):
        return f"FileInfo({self.filename!r}, {self.size}, {self.crypt_mode})"

    def to_value(self):
        return {'filename': self.filename, 'crypt-mode': self.crypt_mode, 'size': self.size,
                'csum': self.csum.hex()}

    @property
    def chunk_crypt_mode(self):
        """What the chunks of this index must be: encrypted, or plain (also when only signed)."""
        return 'encrypt' if self.crypt_mode == 'encrypt' else 'none'


class BackupManifest:
    """The manifest of one snapshot."""

    def __init__(self, backup_type, backup_id, backup_time, files=(), unprotected=None,
                 signature=None, extra=None):
        if backup_type not in BACKUP_TYPES:
            raise ValueError(f"backup type {backup_type!r} is not one of {', '.join(BACKUP_TYPES)}")
        self.backup_type = backup_type
        self.backup_id = str(backup_id)
        self.backup_time = int(backup_time)
        self.files = list(files)
        self.unprotected = {} if unprotected is None else unprotected
        self.signature = signature
        self.extra = extra or {}        # fields of a newer PBS, kept (and signed) as found

    def __repr__(self):
        return (f"BackupManifest({self.backup_type}/{self.backup_id}/"
                f"{snapshot_time_text(self.backup_time)}, {len(self.files)} files)")

    # -- files ---------------------------------------------------------------------------------

    def add_file(self, filename, size, csum, crypt_mode='none'):
        if not filename.endswith(ARCHIVE_SUFFIXES):
            raise ValueError(f"{filename}: a manifest lists .fidx, .didx and .blob files only")
        if crypt_mode not in CRYPT_MODES:
            raise ValueError(f"crypt mode {crypt_mode!r} is not one of {', '.join(CRYPT_MODES)}")
        if len(csum) != 32:
            raise ValueError(f"{filename}: a csum has 32 bytes, not {len(csum)}")
        self.files.append(FileInfo(filename, size, csum, crypt_mode))

    def file_info(self, filename):
        for info in self.files:
            if info.filename == filename:
                return info
        raise CorruptData(f"the manifest of {self.relpath()} does not list {filename}")

    def verify_file(self, filename, csum, size):
        """``CorruptData`` unless ``filename`` has this csum and size in the manifest."""
        info = self.file_info(filename)
        if size != info.size:
            raise CorruptData(f"{self.relpath()}/{filename}: {size} bytes, the manifest says "
                              f"{info.size}")
        if bytes(csum) != info.csum:
            raise CorruptData(f"{self.relpath()}/{filename}: checksum differs from the manifest")

    def relpath(self):
        return snapshot_relpath(self.backup_type, self.backup_id, self.backup_time)

    # -- the unprotected part ------------------------------------------------------------------

    @property
    def notes(self):
        notes = self.unprotected.get('notes')
        return notes if isinstance(notes, str) else None

    @notes.setter
    def notes(self, text):
        if text is None:
            self.unprotected.pop('notes', None)
        else:
            self.unprotected['notes'] = text

    @property
    def verify_state(self):
        """``{'state': 'ok'|'failed', 'upid': ...}`` of the last verify, or None."""
        state = self.unprotected.get('verify_state')
        return state if isinstance(state, dict) else None

    def set_verify_state(self, state, upid):
        if state not in VERIFY_STATES:
            raise ValueError(f"verify state {state!r} is not one of {', '.join(VERIFY_STATES)}")
        if not UPID_RE.match(upid):
            raise ValueError(f"{upid!r} is not a task id PBS can read")
        self.unprotected['verify_state'] = {'state': state, 'upid': upid}

    @property
    def fingerprint(self):
        """The recorded key fingerprint (32 bytes), or None for a backup made without a key."""
        recorded = self.unprotected.get('key-fingerprint')
        if recorded is None:
            return None
        try:
            return parse_fingerprint(recorded)
        except EncryptionKeyError:
            raise CorruptData(f"the manifest of {self.relpath()} records a malformed key "
                              "fingerprint") from None

    def check_fingerprint(self, crypt):
        """``EncryptionKeyError`` unless ``crypt`` is the key this backup was made with (any key,
        or none, will do for a backup made without one)."""
        recorded = self.fingerprint
        if recorded is None:
            return
        if crypt is None:
            raise EncryptionKeyError(f"{self.relpath()} was made with the encryption key "
                                     f"{format_fingerprint(recorded, short=True)}; give that key")
        if crypt.fingerprint != recorded:
            raise EncryptionKeyError(
                f"wrong key for {self.relpath()}: it was made with the key "
                f"{format_fingerprint(recorded, short=True)}, the key given is "
                f"{crypt.short_fingerprint}")

    # -- JSON ----------------------------------------------------------------------------------

    def to_value(self):
        """The object as PBS serializes it (before it signs)."""
        value = dict(self.extra)
        value.update({'backup-type': self.backup_type, 'backup-id': self.backup_id,
                      'backup-time': self.backup_time,
                      'files': [info.to_value() for info in self.files],
                      'unprotected': self.unprotected, 'signature': self.signature})
        return value

    def compute_signature(self, crypt):
        return signature_of(self.to_value(), crypt)

    def to_json(self, crypt=None):
        """The manifest's text. With a key, it is signed and records the key's fingerprint."""
        value = self.to_value()
        if crypt is not None:
            self.signature = value['signature'] = signature_of(value, crypt).hex()
            self.unprotected['key-fingerprint'] = crypt.fingerprint_text
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text, crypt=None, name=MANIFEST_BLOB_NAME):
        """Parse a manifest; with a key, its fingerprint and signature are checked (an unsigned
        manifest is accepted, as PBS does)."""
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise CorruptData(f"{name}: not JSON ({exc})") from None
        if not isinstance(value, dict):
            raise CorruptData(f"{name}: not a JSON object")
        signature = value.get('signature')
        if crypt is not None and isinstance(signature, str):
            unprotected = value.get('unprotected')
            recorded = unprotected.get('key-fingerprint') if isinstance(unprotected, dict) else None
            if recorded is not None:
                try:
                    recorded = parse_fingerprint(recorded)
                except EncryptionKeyError:
                    raise CorruptData(f"{name}: a malformed key fingerprint") from None
                if recorded != crypt.fingerprint:
                    raise EncryptionKeyError(
                        f"wrong key for {name}: it was signed with the key "
                        f"{format_fingerprint(recorded, short=True)}, the key given is "
                        f"{crypt.short_fingerprint}")
            try:
                expected = signature_of(value, crypt).hex()
            except ValueError as exc:
                raise CorruptData(f"{name}: cannot be signed ({exc})") from None
            if not hmac.compare_digest(expected, signature):
                raise CorruptData(f"{name}: the signature does not match; the manifest was "
                                  "changed after it was signed")
        return cls._from_value(value, name)

    @classmethod
    def _from_value(cls, value, name):
        known = ('backup-type', 'backup-id', 'backup-time', 'files', 'unprotected', 'signature')
        try:
            files = []
            for item in value['files']:
                crypt_mode = item.get('crypt-mode', 'none')      # absent before PBS 0.8
                if crypt_mode not in CRYPT_MODES:
                    raise ValueError(f"unknown crypt-mode {crypt_mode!r}")
                csum = bytes.fromhex(item['csum'])
                if len(csum) != 32:
                    raise ValueError(f"csum of {item['filename']} is not 32 bytes")
                size = item['size']
                if not isinstance(size, int) or size < 0:
                    raise ValueError(f"size of {item['filename']} is not a byte count")
                files.append(FileInfo(item['filename'], size, csum, crypt_mode))
            backup_time = value['backup-time']
            if not isinstance(backup_time, int):
                raise ValueError("backup-time is not an integer")
            unprotected = value.get('unprotected', {})
            if unprotected is None:
                unprotected = {}
            signature = value.get('signature')
            return cls(value['backup-type'], value['backup-id'], backup_time, files,
                       unprotected, signature,
                       {key: item for key, item in value.items() if key not in known})
        except KeyError as exc:
            raise CorruptData(f"{name}: not a backup manifest ({exc.args[0]} is missing)") \
                from None
        except (AttributeError, TypeError, ValueError) as exc:
            raise CorruptData(f"{name}: not a backup manifest ({exc})") from None

    # -- the blob ------------------------------------------------------------------------------

    def encode(self, crypt=None):
        """``index.json.blob``'s bytes: the JSON in an unencrypted blob, compressed if smaller."""
        return encode_blob(self.to_json(crypt).encode('utf-8'))

    @classmethod
    def decode(cls, raw, crypt=None, name=MANIFEST_BLOB_NAME):
        try:
            text = decode_blob(raw, name=name).decode('utf-8')
        except UnicodeDecodeError:
            raise CorruptData(f"{name}: the manifest is not UTF-8 text") from None
        return cls.from_json(text, crypt, name)


def signature_of(value, crypt):
    """The signature PBS computes over a manifest object: HMAC-SHA256 under the id key of the
    canonical JSON without ``unprotected`` and ``signature``."""
    signed = {key: item for key, item in value.items() if key not in ('unprotected', 'signature')}
    return crypt.compute_auth_tag(canonical_json(signed))


def blob_file_info(filename, raw, crypt_mode='none'):
    """The manifest entry of a blob file: its encoded size and the SHA-256 of its bytes."""
    return FileInfo(filename, len(raw), hashlib.sha256(raw).digest(), crypt_mode)
