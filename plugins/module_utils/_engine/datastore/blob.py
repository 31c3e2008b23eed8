"""DataBlob: how Proxmox Backup Server stores every chunk and every small file (data_blob.rs).

Layout (``file_formats``): magic, CRC32 (little-endian, over the payload after the header), then
for encrypted blobs the IV and the GCM tag, then the payload. Encoding follows PBS's choices:

- compression is zstd level 1, kept only when it is strictly shorter than the data;
- an encrypted blob is compressed first, then encrypted (the magic says which of the two happened);
- a chunk's digest is taken over the original data: plain SHA-256, or the keyed digest of the
  encryption key (``crypt.chunk_digest``), never over the blob.

Decoding checks, in order, the length, the magic, the CRC (which proves the bytes on disk are the
bytes written), then decrypts (a bad tag with a good CRC means the wrong key), decompresses and,
when the caller names the digest, checks it. Each failure is an engine error naming ``name``
(a chunk's digest, a file's path) and what is wrong.
"""
from __future__ import annotations

import struct
import zlib

from ..errors import CorruptData, EncryptionKeyError, MissingLibrary
from .crypt import chunk_digest
from .file_formats import (BLOB_CRC_OFFSET, BLOB_HEADER_SIZE, BLOB_IV_OFFSET, BLOB_KINDS,
                           BLOB_TAG_OFFSET, COMPRESSED_BLOB_MAGIC, ENCRYPTED_BLOB_HEADER_SIZE,
                           ENCRYPTED_BLOB_MAGIC, ENCRYPTED_COMPRESSED_BLOB_MAGIC, IV_SIZE,
                           MAX_BLOB_SIZE, TAG_SIZE, UNCOMPRESSED_BLOB_MAGIC, describe_magic)

try:
    import zstandard
    HAS_ZSTANDARD = True
    ZSTANDARD_IMPORT_ERROR = None
except ImportError as exc:  # reported when a blob is compressed or decompressed
    HAS_ZSTANDARD = False
    ZSTANDARD_IMPORT_ERROR = exc

ZSTD_LEVEL = 1
_CRC = struct.Struct('<I')


def _zstd():
    if not HAS_ZSTANDARD:
        raise MissingLibrary('zstandard', 'the datastore format (zstd-compressed blobs)',
                             'python3-zstandard', ZSTANDARD_IMPORT_ERROR)
    return zstandard


def compute_crc(raw):
    """The CRC32 a blob's header must hold: over the payload, after the (encrypted) header."""
    start = ENCRYPTED_BLOB_HEADER_SIZE if blob_kind(raw)[0] else BLOB_HEADER_SIZE
    return zlib.crc32(memoryview(raw)[start:])


def blob_kind(raw, name='blob'):
    """``(encrypted, compressed)`` from a blob's magic; ``CorruptData`` if it is no blob."""
    if len(raw) < BLOB_HEADER_SIZE:
        raise CorruptData(f"{name}: {len(raw)} bytes is too small for a data blob "
                          f"(the header alone has {BLOB_HEADER_SIZE})")
    magic = bytes(raw[:8])
    kind = BLOB_KINDS.get(magic)
    if kind is None:
        known = describe_magic(magic)
        what = f"the magic of a {known}, not of a blob" if known else "an unknown magic"
        raise CorruptData(f"{name}: {what} ({magic.hex()}); not a Proxmox Backup Server "
                          "data blob")
    if kind[0] and len(raw) < ENCRYPTED_BLOB_HEADER_SIZE:
        raise CorruptData(f"{name}: {len(raw)} bytes is too small for an encrypted blob "
                          f"(the header alone has {ENCRYPTED_BLOB_HEADER_SIZE})")
    return kind


def crypt_mode(raw, name='blob'):
    """``'encrypt'`` or ``'none'``: the manifest's crypt-mode of a blob (or of a chunk's index)."""
    return 'encrypt' if blob_kind(raw, name)[0] else 'none'


def verify_crc(raw, name='blob'):
    """``CorruptData`` unless the stored CRC32 matches the payload."""
    blob_kind(raw, name)
    stored, = _CRC.unpack_from(raw, BLOB_CRC_OFFSET)
    computed = compute_crc(raw)
    if stored != computed:
        raise CorruptData(f"{name}: CRC32 mismatch (stored {stored:08x}, computed "
                          f"{computed:08x}); the file is damaged")


def encode_blob(data, crypt=None, compress=True, compressor=None):
    """The blob of ``data``: compressed when that is smaller, encrypted when ``crypt`` is given.

    ``compressor`` is a ``zstandard.ZstdCompressor`` at ``ZSTD_LEVEL`` to reuse (one per thread:
    they are not thread-safe); by default one is made for the call."""
    payload, compressed = _payload(data, compress, compressor)
    if crypt is None:
        magic = COMPRESSED_BLOB_MAGIC if compressed else UNCOMPRESSED_BLOB_MAGIC
        return b''.join((magic, _CRC.pack(zlib.crc32(payload)), payload))
    magic = ENCRYPTED_COMPRESSED_BLOB_MAGIC if compressed else ENCRYPTED_BLOB_MAGIC
    iv, tag, ciphertext = crypt.encrypt(payload)
    return b''.join((magic, _CRC.pack(zlib.crc32(ciphertext)), iv, tag, ciphertext))


def encode_blob_in_place(buffer, length, crypt=None, compress=True, compressor=None):
    """``encode_blob`` of the ``length`` bytes of data at ``buffer[BLOB_HEADER_SIZE:]`` (a
    bytearray), as ``(blob, in_place)``.

    A blob stored as it is (not compressed: the data does not shrink; not encrypted) is not
    copied: its header is written into ``buffer[:BLOB_HEADER_SIZE]`` and the blob is a view of
    ``buffer`` (``in_place``), valid while the buffer is not reused. Every other blob is new
    bytes, as ``encode_blob`` makes them."""
    data = memoryview(buffer)[BLOB_HEADER_SIZE:BLOB_HEADER_SIZE + length]
    if crypt is not None:
        return encode_blob(data, crypt, compress, compressor), False
    payload, compressed = _payload(data, compress, compressor)
    if compressed:
        return b''.join((COMPRESSED_BLOB_MAGIC, _CRC.pack(zlib.crc32(payload)), payload)), False
    buffer[:BLOB_HEADER_SIZE] = UNCOMPRESSED_BLOB_MAGIC + _CRC.pack(zlib.crc32(data))
    return memoryview(buffer)[:BLOB_HEADER_SIZE + length], True


def _payload(data, compress, compressor):
    """``(payload, compressed)``: zstd's output when it is strictly shorter, else ``data``."""
    if len(data) > MAX_BLOB_SIZE:
        raise ValueError(f"a data blob holds at most {MAX_BLOB_SIZE} bytes, not {len(data)}")
    if compress:
        packed = (compressor or new_compressor()).compress(data)
        if len(packed) < len(data):
            return packed, True
    return data, False


def new_compressor():
    """A zstd compressor as PBS compresses blobs (level 1)."""
    return _zstd().ZstdCompressor(level=ZSTD_LEVEL)


def encode_chunk(data, crypt=None, compress=True, compressor=None):
    """``(blob, digest)`` of one chunk: the digest names it in the store and in indexes."""
    return encode_blob(data, crypt, compress, compressor), chunk_digest(data, crypt)


def decode_blob(raw, crypt=None, digest=None, name='blob', check_crc=True, size=None,
                into=None):
    """The data of a blob, checked; ``digest`` (32 bytes) and ``size`` (the chunk's length in its
    index), when given, are checked too.

    ``into`` (with ``size``): a writable buffer of at least ``size`` bytes, reused by the caller;
    the data is decompressed (or copied) into it and returned as a view of its first ``size``
    bytes, instead of as new bytes.

    Raises ``CorruptData`` (too small, unknown magic, CRC, zstd, digest) or
    ``EncryptionKeyError`` (encrypted and no key, or another key).
    """
    encrypted, compressed = blob_kind(raw, name)
    if check_crc:
        verify_crc(raw, name)
    view = memoryview(raw)
    if encrypted:
        if crypt is None:
            raise EncryptionKeyError(f"{name} is encrypted; it cannot be read without its "
                                     "encryption key")
        iv = view[BLOB_IV_OFFSET:BLOB_IV_OFFSET + IV_SIZE]
        tag = view[BLOB_TAG_OFFSET:BLOB_TAG_OFFSET + TAG_SIZE]
        payload = crypt.decrypt(iv, tag, view[ENCRYPTED_BLOB_HEADER_SIZE:], name)
    else:
        payload = view[BLOB_HEADER_SIZE:]
    if into is not None:
        data = memoryview(into)[:size]
        if compressed:
            length = _decompress_into(payload, data, name)
        else:
            length = len(payload)
            if length == size:
                data[:] = payload
    else:
        data = _decompress(payload, name) if compressed else bytes(payload)
        length = len(data)
    if size is not None and length != size:
        raise CorruptData(f"{name}: {length} bytes of data where {size} are expected")
    if digest is not None:
        # an encrypted chunk's digest is keyed; a plain one's is SHA-256 even with a key at hand
        actual = chunk_digest(data, crypt if encrypted else None)
        if actual != bytes(digest):
            raise CorruptData(f"{name}: the data does not match its digest (it hashes to "
                              f"{actual.hex()})")
    return data


def _decompress(payload, name):
    # PBS decodes every frame of the payload, and a frame written by a stream (as PBS writes plain
    # chunks) does not record its size: so decompress frame by frame, each to its end.
    decompressor = _zstd().ZstdDecompressor()
    parts, rest = [], payload
    try:
        while True:
            frame = decompressor.decompressobj()
            parts.append(frame.decompress(rest))
            if not frame.eof:
                raise CorruptData(f"{name}: the zstd data ends in the middle of a frame")
            rest = frame.unused_data
            if not rest:
                break
    except zstandard.ZstdError as exc:
        raise CorruptData(f"{name}: the zstd data cannot be decompressed ({exc})") from None
    return parts[0] if len(parts) == 1 else b''.join(parts)


def _decompress_into(payload, view, name):
    """The length of the data ``payload`` decompresses to, written into ``view`` (every frame, as
    ``_decompress``); ``len(view) + 1`` when there is more than ``view`` holds. A frame cut short
    yields only what it completes, so the caller's length check finds it."""
    reader = _zstd().ZstdDecompressor().stream_reader(payload, read_across_frames=True)
    done = 0
    try:
        while done < len(view):
            got = reader.readinto(view[done:])
            if not got:
                return done
            done += got
        return done + len(reader.read(1))
    except zstandard.ZstdError as exc:
        raise CorruptData(f"{name}: the zstd data cannot be decompressed ({exc})") from None
