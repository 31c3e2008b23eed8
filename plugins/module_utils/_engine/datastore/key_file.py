"""Proxmox Backup Server key files (pbs-key-config): the JSON that holds an encryption key.

One JSON object, compact, its fields in this order (the order PBS writes them)::

    {"kdf": null | {"Scrypt": {"n": 65536, "r": 8, "p": 1, "salt": "<base64>"}}
                 | {"PBKDF2": {"iter": 65535, "salt": "<base64>"}},
     "created": "<RFC 3339, local time with offset>", "modified": "<same>",
     "data": "<base64>", "fingerprint": "<32 bytes, colon hex>", "hint": "<optional>"}

Without a KDF ``data`` is the 32-byte key itself (what Proxmox VE keeps for a PBS storage). With
one, a 32-byte key is derived from the passphrase (scrypt or PBKDF2-HMAC-SHA256, salt 32 random
bytes) and ``data`` is ``iv[16] || tag[16] || AES-256-GCM(derived key, key)``. The fingerprint is
recorded so a key can be matched to a manifest without the passphrase; after decryption it is
checked against the key. PBS creates scrypt files with N=65536, r=8, p=1 and PBKDF2 files with
65535 iterations, and refuses passphrases shorter than 5 bytes.

Neither a passphrase nor a key appears in a message or a repr; errors name the file and the
fingerprint.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import time
from datetime import datetime, timedelta, timezone

from ..errors import EncryptionKeyError
from ..storage.files import write_file_hidden
from .crypt import (KEY_SIZE, CryptConfig, format_fingerprint, gcm_decrypt, gcm_encrypt,
                    parse_fingerprint)
from .file_formats import IV_SIZE, TAG_SIZE

KDF_NONE = 'none'
KDF_SCRYPT = 'scrypt'
KDF_PBKDF2 = 'pbkdf2'
KDFS = (KDF_NONE, KDF_SCRYPT, KDF_PBKDF2)
# how the KDF is tagged in the file (serde's names of the Rust enum variants)
_KDF_TAGS = {KDF_SCRYPT: 'Scrypt', KDF_PBKDF2: 'PBKDF2'}

SCRYPT_N = 65536
SCRYPT_R = 8
SCRYPT_P = 1
PBKDF2_ITERATIONS = 65535
SALT_SIZE = 32
MIN_PASSPHRASE_LENGTH = 5
# PBS lets scrypt use up to 1025 MiB, which bounds what a key file can ask for
SCRYPT_MAXMEM = 1025 * 1024 * 1024


def derive_passphrase_key(kdf, params, passphrase):
    """The 32-byte key a passphrase gives under ``kdf`` and its parameters."""
    if kdf == KDF_SCRYPT:
        return hashlib.scrypt(passphrase, salt=params['salt'], n=params['n'], r=params['r'],
                              p=params['p'], maxmem=SCRYPT_MAXMEM, dklen=KEY_SIZE)
    if kdf == KDF_PBKDF2:
        return hashlib.pbkdf2_hmac('sha256', passphrase, params['salt'], params['iter'], KEY_SIZE)
    raise ValueError(f"no key derivation for kdf {kdf!r}")


def format_key_time(epoch):
    """RFC 3339 in local time with a numeric offset, to the second (as PBS writes key files)."""
    local = datetime.fromtimestamp(int(epoch), tz=timezone.utc).astimezone()
    minutes = int(local.utcoffset().total_seconds()) // 60
    sign = '-' if minutes < 0 else '+'
    hours, minutes = divmod(abs(minutes), 60)
    return f"{local.strftime('%Y-%m-%dT%H:%M:%S')}{sign}{hours:02d}:{minutes:02d}"


def parse_key_time(text):
    """Epoch seconds from an RFC 3339 time: ``Z`` or a numeric offset, whole seconds."""
    if not isinstance(text, str) or not 20 <= len(text) <= 25 or text[10:11] not in ('T', 't'):
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    stamp = text[:-1] + '+00:00' if text[-1:] in ('Z', 'z') else text
    moment = datetime.strptime(stamp[:19], '%Y-%m-%dT%H:%M:%S')
    zone = stamp[19:]
    if len(zone) != 6 or zone[0] not in '+-' or zone[3] != ':':
        raise ValueError(f"not an RFC 3339 time: {text!r}")
    offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    if zone[0] == '-':
        offset = -offset
    return int(moment.replace(tzinfo=timezone(offset)).timestamp())


def _passphrase_bytes(passphrase):
    if passphrase is None:
        return None
    return passphrase.encode('utf-8') if isinstance(passphrase, str) else bytes(passphrase)


def _b64encode(raw):
    return base64.b64encode(raw).decode('ascii')


def _b64decode(text, what):
    if not isinstance(text, str):
        raise ValueError(f"{what} is not a base64 string")
    try:
        return base64.b64decode(text + '=' * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None


class KeyFile:
    """One key file's contents: the (possibly passphrase-protected) key and what describes it."""

    __slots__ = ('kdf', 'kdf_params', 'created', 'modified', 'data', 'fingerprint', 'hint',
                 'source')

    def __init__(self, kdf, kdf_params, created, modified, data, fingerprint=None, hint=None,
                 source='key file'):
        self.kdf = kdf                  # 'none', 'scrypt' or 'pbkdf2'
        self.kdf_params = kdf_params    # scrypt: n, r, p, salt; pbkdf2: iter, salt; none: {}
        self.created = created
        self.modified = modified
        self.data = data
        self.fingerprint = fingerprint  # 32 bytes, or None in files written without one
        self.hint = hint
        self.source = source            # for messages: the path it came from

    def __repr__(self):
        shown = format_fingerprint(self.fingerprint, short=True) if self.fingerprint else None
        return f"KeyFile(kdf={self.kdf!r}, fingerprint={shown!r})"

    @property
    def fingerprint_text(self):
        return format_fingerprint(self.fingerprint) if self.fingerprint else None

    @property
    def short_fingerprint(self):
        return format_fingerprint(self.fingerprint, short=True) if self.fingerprint else None

    # -- creating ------------------------------------------------------------------------------

    @classmethod
    def create(cls, passphrase=None, kdf=KDF_SCRYPT, key=None, hint=None, now=None):
        """A new key file (and its key, ready for use) for a random key, or for ``key``.

        ``kdf='none'`` stores the key in the clear and takes no passphrase; ``scrypt`` (PBS's
        default) and ``pbkdf2`` need a passphrase of at least 5 bytes.
        """
        if kdf not in KDFS:
            raise EncryptionKeyError(f"unknown key derivation {kdf!r}; use one of "
                                     f"{', '.join(KDFS)}")
        key = os.urandom(KEY_SIZE) if key is None else bytes(key)
        crypt = CryptConfig(key)
        created = int(time.time() if now is None else now)
        passphrase = _passphrase_bytes(passphrase)
        if kdf == KDF_NONE:
            if passphrase is not None:
                raise EncryptionKeyError("a key file without key derivation (kdf none) takes no "
                                         "passphrase; use kdf scrypt to protect it with one")
            params, data = {}, key
        else:
            _check_passphrase(passphrase, 'a new key file')
            salt = os.urandom(SALT_SIZE)
            params = ({'n': SCRYPT_N, 'r': SCRYPT_R, 'p': SCRYPT_P, 'salt': salt}
                      if kdf == KDF_SCRYPT else {'iter': PBKDF2_ITERATIONS, 'salt': salt})
            iv, tag, wrapped = gcm_encrypt(derive_passphrase_key(kdf, params, passphrase), key)
            data = iv + tag + wrapped
        return crypt, cls(kdf, params, created, created, data, crypt.fingerprint, hint)

    # -- the JSON ------------------------------------------------------------------------------

    def to_json(self):
        """The file's text, byte for byte as PBS writes it (compact, fields in PBS's order)."""
        if self.kdf == KDF_NONE:
            kdf = None
        elif self.kdf == KDF_SCRYPT:
            p = self.kdf_params
            kdf = {'Scrypt': {'n': p['n'], 'r': p['r'], 'p': p['p'],
                              'salt': _b64encode(p['salt'])}}
        else:
            kdf = {'PBKDF2': {'iter': self.kdf_params['iter'],
                              'salt': _b64encode(self.kdf_params['salt'])}}
        document = {'kdf': kdf, 'created': format_key_time(self.created),
                    'modified': format_key_time(self.modified), 'data': _b64encode(self.data)}
        if self.fingerprint is not None:
            document['fingerprint'] = format_fingerprint(self.fingerprint)
        if self.hint is not None:
            document['hint'] = self.hint
        return json.dumps(document, separators=(',', ':'), ensure_ascii=False)

    @classmethod
    def from_json(cls, text, source='key file'):
        """Parse a key file's text; ``EncryptionKeyError`` naming ``source`` when malformed."""
        try:
            document = json.loads(text)
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            kdf, params = _parse_kdf(document.get('kdf'))
            created = parse_key_time(document['created'])
            modified = parse_key_time(document['modified'])
            data = _b64decode(document['data'], 'data')
            fingerprint = document.get('fingerprint')
            if fingerprint is not None:
                fingerprint = parse_fingerprint(fingerprint)
            hint = document.get('hint')
            if hint is not None and not isinstance(hint, str):
                raise ValueError("hint is not a string")
        except KeyError as exc:
            raise EncryptionKeyError(f"{source} is not a Proxmox Backup Server key file: "
                                     f"{exc.args[0]} is missing") from None
        except (ValueError, TypeError, EncryptionKeyError) as exc:
            raise EncryptionKeyError(f"{source} is not a Proxmox Backup Server key file: "
                                     f"{exc}") from None
        return cls(kdf, params, created, modified, data, fingerprint, hint, source)

    # -- using ---------------------------------------------------------------------------------

    def unlock(self, passphrase=None):
        """The key as a ``CryptConfig``; checks the passphrase and the recorded fingerprint."""
        passphrase = _passphrase_bytes(passphrase)
        if self.kdf == KDF_NONE:
            key = self.data
            if len(key) != KEY_SIZE:
                raise EncryptionKeyError(f"{self.source}: the key has {len(key)} bytes, "
                                         f"not {KEY_SIZE}")
        else:
            if passphrase is None:
                raise EncryptionKeyError(
                    f"{self.source} is protected by a passphrase ({self.kdf}); give the "
                    f"passphrase of the key {self.short_fingerprint or '(no fingerprint)'}")
            _check_passphrase(passphrase, self.source)
            if len(self.data) < IV_SIZE + TAG_SIZE:
                raise EncryptionKeyError(f"{self.source}: the protected key is truncated")
            try:
                derived = derive_passphrase_key(self.kdf, self.kdf_params, passphrase)
            except (ValueError, MemoryError) as exc:
                raise EncryptionKeyError(f"{self.source}: cannot derive the key from the "
                                         f"passphrase with its {self.kdf} parameters ({exc})") \
                    from None
            iv, tag = self.data[:IV_SIZE], self.data[IV_SIZE:IV_SIZE + TAG_SIZE]
            key = gcm_decrypt(derived, iv, tag, self.data[IV_SIZE + TAG_SIZE:], self.source)
            if key is None:
                hint = f" (passphrase hint: {self.hint})" if self.hint else ""
                raise EncryptionKeyError(
                    f"wrong passphrase for {self.source}: it does not unlock the key "
                    f"{self.short_fingerprint or '(no fingerprint)'}{hint}")
            if len(key) != KEY_SIZE:
                raise EncryptionKeyError(f"{self.source}: the key has {len(key)} bytes, "
                                         f"not {KEY_SIZE}")
        crypt = CryptConfig(key)
        if self.fingerprint is not None and crypt.fingerprint != self.fingerprint:
            raise EncryptionKeyError(
                f"{self.source} records the fingerprint {self.short_fingerprint}, but the key it "
                f"holds has the fingerprint {crypt.short_fingerprint}; the file was changed")
        return crypt


def _check_passphrase(passphrase, what):
    if passphrase is None or len(passphrase) < MIN_PASSPHRASE_LENGTH:
        raise EncryptionKeyError(f"the passphrase for {what} is too short (at least "
                                 f"{MIN_PASSPHRASE_LENGTH} bytes, as Proxmox Backup Server asks)")


def _parse_kdf(value):
    if value is None:
        return KDF_NONE, {}
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("kdf is neither null nor one of Scrypt, PBKDF2")
    (tag, params), = value.items()
    if not isinstance(params, dict):
        raise ValueError(f"kdf {tag} has no parameters")
    if tag == _KDF_TAGS[KDF_SCRYPT]:
        parsed = {name: params[name] for name in ('n', 'r', 'p')}
        if not all(isinstance(v, int) and v > 0 for v in parsed.values()):
            raise ValueError("scrypt parameters n, r, p must be positive integers")
        parsed['salt'] = _b64decode(params['salt'], 'the scrypt salt')
        return KDF_SCRYPT, parsed
    if tag == _KDF_TAGS[KDF_PBKDF2]:
        iterations = params['iter']
        if not isinstance(iterations, int) or iterations <= 0:
            raise ValueError("pbkdf2 iterations must be a positive integer")
        return KDF_PBKDF2, {'iter': iterations,
                            'salt': _b64decode(params['salt'], 'the pbkdf2 salt')}
    raise ValueError(f"unknown kdf {tag!r} (Proxmox Backup Server knows Scrypt and PBKDF2)")


def load_key_file(path):
    """Read and parse a key file; ``EncryptionKeyError`` naming the path when it cannot be."""
    try:
        with open(path, 'rb') as handle:
            text = handle.read()
    except OSError as exc:
        raise EncryptionKeyError(f"cannot read the key file {path}: {exc.strerror}") from None
    try:
        text = text.decode('utf-8')
    except UnicodeDecodeError:
        raise EncryptionKeyError(f"{path} is not a Proxmox Backup Server key file: not UTF-8 "
                                 "text") from None
    return KeyFile.from_json(text, source=f"the key file {path}")


def save_key_file(path, key_file, replace=False):
    """Write a key file readable by its owner only (0600), durably; never over an existing file
    unless ``replace``."""
    data = key_file.to_json().encode('utf-8')
    try:
        write_file_hidden(path, data, mode=0o600, exclusive=not replace)
    except FileExistsError:
        raise EncryptionKeyError(f"the key file {path} exists already; it is not replaced "
                                 "(losing a key loses every backup made with it)") from None
    except OSError as exc:
        raise EncryptionKeyError(f"cannot write the key file {path}: {exc.strerror}") from None


def load_key(path, passphrase=None):
    """The key in the file at ``path``, ready for use."""
    return load_key_file(path).unlock(passphrase)
