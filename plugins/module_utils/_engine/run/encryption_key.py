"""Encryption keys for datastores: create a Proxmox Backup Server key file, describe one, load one.

A key file is PBS's own JSON (``datastore/key_file.py``), so a key created here works with
``proxmox-backup-client --keyfile`` and the other way round. Its fingerprint is recorded in the
file, so :func:`key_info` needs no passphrase. A passphrase comes from a no_log option or from the
first line of a file (as PBS reads ``PBS_ENCRYPTION_PASSWORD_FILE``); it never appears in a
result or a message.

Creating is idempotent: an existing key file is left alone and described (losing a key loses
every backup encrypted with it), unless ``force`` replaces it.

Example::

    create_key('/etc/guestvault/keys/pbs.json', passphrase_file='/root/pbs.pass')
    # {'changed': True, 'path': ..., 'fingerprint': '0e:ab:...', 'kdf': 'scrypt', ...}
    crypt = load_crypt('/etc/guestvault/keys/pbs.json', passphrase_file='/root/pbs.pass')
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from ..errors import EncryptionKeyError
from ..datastore.crypt import (CryptConfig, format_fingerprint, parse_fingerprint,
                               require_cryptography)
from ..datastore.key_file import (KDF_NONE, KDF_SCRYPT, MIN_PASSPHRASE_LENGTH, KeyFile,
                                  format_key_time, load_key_file, save_key_file)
from .request import Request

# The derivations a new key may use: PBS creates scrypt or none (pbkdf2 is only read).
CREATE_KDFS = (KDF_SCRYPT, KDF_NONE)
_CREATE_HINT = ("create one with the guestvault.backup.encryption_key module, or give the path "
                "of an existing Proxmox Backup Server key file")


def read_passphrase_file(path):
    """The passphrase in ``path``: its first line, without the line break (as PBS reads it)."""
    if not str(path).startswith('/'):
        raise EncryptionKeyError(f"the passphrase file {path!r} is a relative path; give an "
                                 "absolute path")
    try:
        with open(path, 'rb') as handle:
            data = handle.read()
    except FileNotFoundError:
        raise EncryptionKeyError(f"the passphrase file {path} does not exist; write the key's "
                                 "passphrase on its first line (mode 0600)") from None
    except OSError as exc:
        raise EncryptionKeyError(f"cannot read the passphrase file {path}: {exc.strerror}") \
            from None
    lines = data.splitlines()
    first = lines[0] if lines else b''
    try:
        return first.decode('utf-8')
    except UnicodeDecodeError:
        raise EncryptionKeyError(f"the passphrase file {path} is not UTF-8 text") from None


def _passphrase(passphrase, passphrase_file):
    """The passphrase given inline or in a file (never both), or None."""
    if passphrase is not None and passphrase_file is not None:
        raise EncryptionKeyError("give the passphrase or a passphrase file, not both")
    if passphrase_file is not None:
        return read_passphrase_file(passphrase_file), f"in {passphrase_file}"
    return passphrase, "given"


def _check_path(path):
    path = str(path)
    if not path.startswith('/'):
        raise EncryptionKeyError(f"the key file {path!r} is a relative path; give an absolute "
                                 "path")
    if path.endswith('/') or os.path.isdir(path):
        raise EncryptionKeyError(f"{path} is a directory; give the path of the key file")
    return path


def _describe(path, key_file, crypt=None):
    fingerprint = key_file.fingerprint or (crypt.fingerprint if crypt is not None else None)
    return {
        'path': path,
        'fingerprint': format_fingerprint(fingerprint) if fingerprint else None,
        'short_fingerprint': format_fingerprint(fingerprint, short=True) if fingerprint else None,
        'kdf': key_file.kdf,
        'created': format_key_time(key_file.created),
        'modified': format_key_time(key_file.modified),
        'hint': key_file.hint,
    }


def key_info(path):
    """What a key file says about its key, without the passphrase: ``{path, fingerprint,
    short_fingerprint, kdf, created, modified, hint}`` (fingerprints as PBS prints them).

    A file written without a recorded fingerprint gives ``None`` unless its key is stored in the
    clear (kdf ``none``), whose fingerprint is computed.
    """
    path = _check_path(path)
    if not os.path.lexists(path):
        raise EncryptionKeyError(f"the key file {path} does not exist; {_CREATE_HINT}")
    key_file = load_key_file(path)
    crypt = None
    if key_file.fingerprint is None and key_file.kdf == KDF_NONE:
        crypt = key_file.unlock()
    return _describe(path, key_file, crypt)


def create_key(path, kdf=KDF_SCRYPT, passphrase=None, passphrase_file=None, hint=None,
               force=False, check_mode=False):
    """Create a PBS key file at ``path`` (0600, written whole or not at all) unless one exists.

    Returns :func:`key_info`'s fields plus ``changed`` and ``created_file`` (whether this call
    wrote the file). An existing key file is described and left alone (``changed`` false; no
    passphrase is needed for that); when a passphrase is given it must unlock that key, so a
    playbook learns of a mismatch now rather than at the first backup. ``force`` replaces the file with a new key. In check mode
    nothing is written and a new key's fingerprint is ``None`` (it does not exist yet).
    """
    path = _check_path(path)
    if kdf not in CREATE_KDFS:
        raise EncryptionKeyError(f"kdf {kdf!r} is not supported for a new key; use one of "
                                 f"{', '.join(CREATE_KDFS)}")
    secret, where = _passphrase(passphrase, passphrase_file)
    if kdf == KDF_NONE and secret is not None:
        raise EncryptionKeyError("kdf none stores the key unprotected and takes no passphrase; "
                                 "use kdf scrypt to protect the key with one, or drop the "
                                 "passphrase")
    if secret is not None and len(secret.encode('utf-8')) < MIN_PASSPHRASE_LENGTH:
        raise EncryptionKeyError(f"the passphrase {where} is too short: a key file's "
                                 f"passphrase has at least {MIN_PASSPHRASE_LENGTH} bytes, "
                                 "as Proxmox Backup Server asks")
    exists = os.path.lexists(path)
    if kdf == KDF_SCRYPT and secret is None and (force or not exists):
        raise EncryptionKeyError("kdf scrypt protects the key with a passphrase; give "
                                 "passphrase or passphrase_file (or use kdf none for a key "
                                 "stored unprotected)")
    folder = os.path.dirname(path) or '/'
    if not os.path.isdir(folder):
        raise EncryptionKeyError(f"cannot create the key file {path}: the directory {folder} "
                                 "does not exist; create it first (mode 0700)")

    warnings = []
    if exists and not force:
        try:
            existing = load_key_file(path)
        except EncryptionKeyError as exc:
            raise EncryptionKeyError(f"{exc}; it is left alone: move it away, or set force to "
                                     "replace it with a new key") from None
        crypt = None
        if secret is not None and existing.kdf != KDF_NONE:
            require_cryptography(f"checking the passphrase of {path}")
            try:
                crypt = existing.unlock(secret)
            except EncryptionKeyError as exc:
                raise EncryptionKeyError(
                    f"{exc}. The key file exists and is left alone: give the passphrase it was "
                    "created with, or set force to replace it with a new key (backups "
                    "encrypted with the old key then need the old file)") from None
        elif existing.fingerprint is None and existing.kdf == KDF_NONE:
            crypt = existing.unlock()
        if existing.kdf != kdf:
            warnings.append(f"the key file {path} exists with kdf {existing.kdf}, not {kdf}; it "
                            "is left as it is (set force to replace it with a new key)")
        result = dict(_describe(path, existing, crypt), changed=False, created_file=False)
        if warnings:
            result['warnings'] = warnings
        return result

    if check_mode:
        return {'path': path, 'fingerprint': None, 'short_fingerprint': None, 'kdf': kdf,
                'created': None, 'modified': None, 'hint': hint, 'changed': True,
                'created_file': True}
    if kdf == KDF_SCRYPT:
        require_cryptography(f"a key file protected by a passphrase ({path})")
    crypt, key_file = KeyFile.create(passphrase=secret, kdf=kdf, hint=hint)
    save_key_file(path, key_file, replace=force)
    return dict(_describe(path, key_file, crypt), changed=True, created_file=True)


@dataclass
class EncryptionKeyRequest(Request):
    path: str
    kdf: str = KDF_SCRYPT
    passphrase: str = field(default=None, repr=False)   # secret: never shown
    passphrase_file: str = None
    hint: str = None
    force: bool = False
    check_mode: bool = False


def run_encryption_key(request):
    """The encryption_key module's verb: :func:`create_key` as the request says."""
    return create_key(**asdict(request))


def load_crypt(path, passphrase=None, passphrase_file=None):
    """The key in the key file at ``path`` as a ``CryptConfig``, ready to encrypt and decrypt.

    Errors name the file and what to do: a missing file, a file that is not a key file, a
    missing or wrong passphrase, and ``MissingLibrary`` (naming python3-cryptography) when the
    cryptography package is not installed.
    """
    path = _check_path(path)
    if not os.path.lexists(path):
        raise EncryptionKeyError(f"the encryption key file {path} does not exist; "
                                 f"{_CREATE_HINT}")
    key_file = load_key_file(path)
    require_cryptography(f"encryption with the key file {path}")
    if key_file.kdf == KDF_NONE:
        return key_file.unlock()
    secret, where = _passphrase(passphrase, passphrase_file)
    if secret is None:
        raise EncryptionKeyError(
            f"the key file {path} is protected by a passphrase ({key_file.kdf}, key "
            f"{key_file.short_fingerprint or 'without a recorded fingerprint'}); give its "
            "passphrase file (encryption-passphrase-file in storage.cfg)")
    try:
        return key_file.unlock(secret)
    except EncryptionKeyError as exc:
        if str(exc).startswith('wrong passphrase'):
            raise EncryptionKeyError(f"{exc}; the passphrase {where} is not this key's: check "
                                     "encryption-passphrase-file") from None
        raise


def check_crypt_matches(crypt: CryptConfig, fingerprint, what):
    """``EncryptionKeyError`` unless ``crypt`` is the key with ``fingerprint`` (bytes or text)."""
    if fingerprint is None:
        return
    expected = fingerprint if isinstance(fingerprint, bytes) else parse_fingerprint(fingerprint)
    if crypt.fingerprint != expected:
        raise EncryptionKeyError(
            f"{what} was encrypted with the key {format_fingerprint(expected, short=True)}, but "
            f"the key given is {crypt.short_fingerprint}; give the key file of "
            f"{format_fingerprint(expected, short=True)}")
