"""Magic numbers and fixed layouts of Proxmox Backup Server's files (file_formats.rs).

Every PBS file starts with an 8-byte magic number: the first 8 bytes of the SHA-256 of a sentence
naming the format (the test derives each one). The values here are the literal bytes; PBS warns
never to change them, and neither may we. All integers in these files are little-endian.

DataBlob (a chunk in ``.chunks/``, or a small file such as ``index.json.blob``)::

    plain      magic[8] crc32[4] payload                    header 12 bytes
    encrypted  magic[8] crc32[4] iv[16] tag[16] payload     header 44 bytes

The CRC32 covers the payload only (everything after the header: neither magic, IV nor tag).

Fixed index (``.fidx``): one 4096-byte header, then one 32-byte digest per chunk::

    0 magic[8]  8 uuid[16]  24 ctime i64  32 index_csum[32]  64 size u64  72 chunk_size u64
    80 reserved[4016] (zero)

Dynamic index (``.didx``, file archives; ``dynamic_index``): one 4096-byte header, then one
40-byte entry per chunk (the chunk's end offset in the archive, u64, then its digest[32])::

    0 magic[8]  8 uuid[16]  24 ctime i64  32 index_csum[32]  64 reserved[4032] (zero)
"""
from __future__ import annotations

import struct

from ..errors import CorruptData

UNCOMPRESSED_BLOB_MAGIC = bytes((66, 171, 56, 7, 190, 131, 112, 161))
COMPRESSED_BLOB_MAGIC = bytes((49, 185, 88, 66, 111, 182, 163, 127))
ENCRYPTED_BLOB_MAGIC = bytes((123, 103, 133, 190, 34, 45, 76, 240))
ENCRYPTED_COMPRESSED_BLOB_MAGIC = bytes((230, 89, 27, 191, 11, 191, 216, 11))
FIXED_INDEX_MAGIC = bytes((47, 127, 65, 237, 145, 253, 15, 205))
DYNAMIC_INDEX_MAGIC = bytes((28, 145, 78, 165, 25, 186, 179, 205))
CATALOG_MAGIC = bytes((145, 253, 96, 249, 196, 103, 88, 213))

MAGIC_SIZE = 8
DIGEST_SIZE = 32

# DataBlob headers
BLOB_CRC_OFFSET = 8
BLOB_HEADER_SIZE = 12
BLOB_IV_OFFSET = 12
BLOB_TAG_OFFSET = 28
IV_SIZE = 16
TAG_SIZE = 16
ENCRYPTED_BLOB_HEADER_SIZE = 44
MAX_BLOB_SIZE = 128 * 1024 * 1024      # PBS refuses to encode more than this into one blob

# magic -> (encrypted, compressed)
BLOB_KINDS = {
    UNCOMPRESSED_BLOB_MAGIC: (False, False),
    COMPRESSED_BLOB_MAGIC: (False, True),
    ENCRYPTED_BLOB_MAGIC: (True, False),
    ENCRYPTED_COMPRESSED_BLOB_MAGIC: (True, True),
}

# Index files
INDEX_HEADER_SIZE = 4096
FIXED_INDEX_HEADER = struct.Struct('<8s16sq32sQQ4016x')
FIXED_INDEX_CSUM_OFFSET = 32
DYNAMIC_INDEX_HEADER = struct.Struct('<8s16sq32s4032x')
DYNAMIC_INDEX_ENTRY_SIZE = 40

# The chunk sizes PBS accepts (chunk_store.rs, verify_chunk_size); 4 MiB is what QEMU backups use.
CHUNK_SIZES = tuple(64 * 1024 << shift for shift in range(7))
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024

if not FIXED_INDEX_HEADER.size == INDEX_HEADER_SIZE == DYNAMIC_INDEX_HEADER.size:
    raise AssertionError("an index header is not the 4096 bytes PBS's readers expect")


def blob_header_size(magic, name='blob'):
    """The header length a blob magic announces; ``CorruptData`` for a magic that is no blob's."""
    kind = BLOB_KINDS.get(bytes(magic))
    if kind is None:
        raise CorruptData(f"{name}: unknown blob magic {bytes(magic).hex()}; "
                          "not a Proxmox Backup Server data blob")
    return ENCRYPTED_BLOB_HEADER_SIZE if kind[0] else BLOB_HEADER_SIZE


def describe_magic(magic):
    """A short name for a known magic (for error messages), or None."""
    return {
        UNCOMPRESSED_BLOB_MAGIC: 'uncompressed blob',
        COMPRESSED_BLOB_MAGIC: 'compressed blob',
        ENCRYPTED_BLOB_MAGIC: 'encrypted blob',
        ENCRYPTED_COMPRESSED_BLOB_MAGIC: 'encrypted compressed blob',
        FIXED_INDEX_MAGIC: 'fixed index',
        DYNAMIC_INDEX_MAGIC: 'dynamic index',
        CATALOG_MAGIC: 'catalog',
    }.get(bytes(magic))
