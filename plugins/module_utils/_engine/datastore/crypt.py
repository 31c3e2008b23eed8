"""The encryption key as Proxmox Backup Server uses it (pbs-tools, crypt_config.rs).

One 32-byte secret key does three jobs:

- AES-256-GCM encrypts each chunk under that key, with a fresh random 16-byte IV (not GCM's usual
  12) and no associated data; the 16-byte tag goes into the blob header.
- An *id key* is derived from it: PBKDF2-HMAC-SHA256 of the key, salt ``b"_id_key"``, 10
  iterations, 32 bytes. Chunk digests of encrypted backups are ``SHA-256(data || id_key)`` (the key
  last, against length extension), so the digests of two keys never collide and reveal nothing
  about unencrypted stores. Manifests are signed with HMAC-SHA256 under the id key.
- The fingerprint is the keyed digest of a fixed 32-byte input (the SHA-256 of the sentence
  ``Proxmox Backup Encryption Key Fingerprint``). PBS prints it as colon-separated hex, the first 8
  bytes as the short key id (``0e:ab:d4:46:0b:6e:b9:ca``) and all 32 in key files and manifests.

The key itself never appears in a message, a repr or a log line; errors name the fingerprint.
"""
from __future__ import annotations

import hashlib
import hmac
import os

from ..errors import CorruptData, EncryptionKeyError, MissingLibrary
from .file_formats import IV_SIZE, TAG_SIZE

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    HAS_CRYPTOGRAPHY = True
    CRYPTOGRAPHY_IMPORT_ERROR = None
except ImportError as exc:  # reported when a key is used, naming the package
    HAS_CRYPTOGRAPHY = False
    CRYPTOGRAPHY_IMPORT_ERROR = exc

KEY_SIZE = 32
ID_KEY_SALT = b"_id_key"
ID_KEY_ITERATIONS = 10
# sha256(b"Proxmox Backup Encryption Key Fingerprint")
FINGERPRINT_INPUT = bytes.fromhex(
    '6ed0ef77471fff4d55c7a8fe4a9db62161407f134c725ddf30992d25ec45ed26')
SHORT_FINGERPRINT_BYTES = 8


def require_cryptography(feature='encryption'):
    if not HAS_CRYPTOGRAPHY:
        raise MissingLibrary('cryptography', feature, 'python3-cryptography',
                             CRYPTOGRAPHY_IMPORT_ERROR)


def derive_id_key(key):
    """The id key PBS derives from an encryption key (chunk digests, manifest signatures)."""
    return hashlib.pbkdf2_hmac('sha256', bytes(key), ID_KEY_SALT, ID_KEY_ITERATIONS, KEY_SIZE)


def format_fingerprint(fingerprint, short=False):
    """Colon-separated lower-case hex, as PBS prints it: all 32 bytes, or the 8-byte key id."""
    raw = bytes(fingerprint)[:SHORT_FINGERPRINT_BYTES] if short else bytes(fingerprint)
    return ':'.join(f"{byte:02x}" for byte in raw)


def parse_fingerprint(text):
    """32 bytes from a fingerprint written with or without colons; ``EncryptionKeyError`` else."""
    try:
        raw = bytes.fromhex(str(text).replace(':', ''))
    except ValueError:
        raw = b''
    if len(raw) != KEY_SIZE:
        raise EncryptionKeyError(f"not a key fingerprint: {text!r} (expected 32 bytes of hex)")
    return raw


class CryptConfig:
    """An encryption key ready for use: keyed digests, signatures, chunk encryption."""

    __slots__ = ('_key', '_id_key', 'fingerprint')

    def __init__(self, key):
        key = bytes(key)
        if len(key) != KEY_SIZE:
            raise EncryptionKeyError(f"an encryption key has {KEY_SIZE} bytes, not {len(key)}")
        self._key = key
        self._id_key = derive_id_key(key)
        self.fingerprint = self.compute_digest(FINGERPRINT_INPUT)

    def __repr__(self):
        return f"CryptConfig(fingerprint={self.short_fingerprint})"

    @property
    def fingerprint_text(self):
        """All 32 bytes, colon-separated: as key files and manifests record it."""
        return format_fingerprint(self.fingerprint)

    @property
    def short_fingerprint(self):
        """The 8-byte key id PBS shows users."""
        return format_fingerprint(self.fingerprint, short=True)

    def compute_digest(self, data):
        """The digest of a chunk of an encrypted backup: SHA-256 over the data, then the id key."""
        digest = hashlib.sha256(data)
        digest.update(self._id_key)
        return digest.digest()

    def compute_auth_tag(self, data):
        """HMAC-SHA256 under the id key (the manifest signature)."""
        return hmac.new(self._id_key, data, hashlib.sha256).digest()

    def encrypt(self, data, iv=None):
        """``(iv, tag, ciphertext)`` of AES-256-GCM with a random 16-byte IV (or the one given)."""
        return gcm_encrypt(self._key, data, iv)

    def decrypt(self, iv, tag, ciphertext, name='data'):
        """The plaintext; ``EncryptionKeyError`` when the tag does not match under this key."""
        plaintext = gcm_decrypt(self._key, iv, tag, ciphertext, name)
        if plaintext is None:
            raise EncryptionKeyError(
                f"{name} cannot be decrypted with the key {self.short_fingerprint}: it was "
                "encrypted with another key, or changed after it was written")
        return plaintext


def gcm_encrypt(key, data, iv=None):
    """AES-256-GCM as PBS uses it everywhere: 16-byte IV, no associated data, 16-byte tag."""
    require_cryptography()
    iv = os.urandom(IV_SIZE) if iv is None else bytes(iv)
    if len(iv) != IV_SIZE:
        raise ValueError(f"the IV has {IV_SIZE} bytes, not {len(iv)}")
    encryptor = Cipher(algorithms.AES(bytes(key)), modes.GCM(iv)).encryptor()
    ciphertext = encryptor.update(data)
    rest = encryptor.finalize()      # GCM is a stream mode: nothing is held back
    return iv, encryptor.tag, ciphertext + rest if rest else ciphertext


def gcm_decrypt(key, iv, tag, ciphertext, name='data'):
    """The plaintext, or None when the tag does not match (wrong key, or changed data)."""
    require_cryptography()
    if len(iv) != IV_SIZE or len(tag) != TAG_SIZE:
        raise CorruptData(f"{name}: IV or tag of the wrong length")
    decryptor = Cipher(algorithms.AES(bytes(key)), modes.GCM(bytes(iv), bytes(tag))).decryptor()
    plaintext = decryptor.update(ciphertext)
    try:
        rest = decryptor.finalize()
    except InvalidTag:
        return None
    return plaintext + rest if rest else plaintext


def chunk_digest(data, crypt=None):
    """A chunk's name in the store: plain SHA-256, or the keyed digest of an encrypted backup."""
    return crypt.compute_digest(data) if crypt is not None else hashlib.sha256(data).digest()
