"""The dynamic index codec (``.didx``) against the layout PBS writes (dynamic_index.rs)."""
import hashlib
import struct

import pytest

from guestvault_engine.errors import CorruptData, StorageError
from guestvault_engine.datastore.dynamic_index import (
    DynamicIndexWriter, parse_dynamic_index, read_dynamic_index)
from guestvault_engine.datastore.file_formats import (
    DYNAMIC_INDEX_MAGIC, FIXED_INDEX_MAGIC, INDEX_HEADER_SIZE)

DIGESTS = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
ENDS = (1000, 70000, 70001)


def write(path, ends=ENDS, digests=tuple(DIGESTS)):
    writer = DynamicIndexWriter(path, uuid=bytes(range(16)), ctime=1_700_000_000)
    for end, digest in zip(ends, digests):
        writer.add_chunk(end, digest)
    return writer.close(durable=False)


def test_the_file_is_laid_out_as_pbs_writes_it(tmp_path):
    path = tmp_path / 'catalog.pcat1.didx'
    csum = write(path)
    raw = path.read_bytes()
    assert len(raw) == INDEX_HEADER_SIZE + 3 * 40
    # header: magic, uuid, ctime (i64 LE), index checksum, then zeroes up to 4096
    assert raw[:8] == DYNAMIC_INDEX_MAGIC == bytes([28, 145, 78, 165, 25, 186, 179, 205])
    assert raw[8:24] == bytes(range(16))
    assert struct.unpack('<q', raw[24:32])[0] == 1_700_000_000
    assert raw[32:64] == csum
    assert raw[64:INDEX_HEADER_SIZE] == bytes(INDEX_HEADER_SIZE - 64)
    # entries: end offset u64 LE, then the digest; the checksum is SHA-256 over them
    entries = b''.join(struct.pack('<Q', end) + digest for end, digest in zip(ENDS, DIGESTS))
    assert raw[INDEX_HEADER_SIZE:] == entries
    assert csum == hashlib.sha256(entries).digest()


def test_round_trip(tmp_path):
    path = tmp_path / 'a.didx'
    write(path)
    index = read_dynamic_index(path)
    assert index.count == 3 and index.size == 70001 and index.ctime == 1_700_000_000
    assert list(index) == [(0, 0, 1000, DIGESTS[0]), (1, 1000, 69000, DIGESTS[1]),
                           (2, 70000, 1, DIGESTS[2])]
    assert index.distinct_digests() == set(DIGESTS)
    assert index.encode() == path.read_bytes()


def test_an_empty_archive_is_a_valid_index(tmp_path):
    path = tmp_path / 'empty.didx'
    csum = write(path, [], [])
    index = read_dynamic_index(path)
    assert index.count == 0 and index.size == 0 and csum == hashlib.sha256(b'').digest()


def test_the_checksum_is_checked(tmp_path):
    path = tmp_path / 'a.didx'
    write(path)
    raw = bytearray(path.read_bytes())
    raw[INDEX_HEADER_SIZE + 8] ^= 1                     # one bit of the first digest
    with pytest.raises(CorruptData, match='checksum in the header does not match'):
        parse_dynamic_index(bytes(raw), 'a.didx')
    assert parse_dynamic_index(bytes(raw), 'a.didx', check_csum=False).count == 3


@pytest.mark.parametrize('damage, message', [
    (lambda raw: raw[:100], 'less than the 4096-byte header'),
    (lambda raw: raw[:-1], 'not whole 40-byte entries'),
    (lambda raw: raw + b'x', 'not whole 40-byte entries'),
    (lambda raw: FIXED_INDEX_MAGIC + raw[8:], 'the magic of a fixed index'),
    (lambda raw: b'NOTMAGIC' + raw[8:], 'an unknown magic'),
    (lambda raw: raw[:INDEX_HEADER_SIZE + 40] + struct.pack('<Q', 10)
     + raw[INDEX_HEADER_SIZE + 48:], 'not after the previous end'),
])
def test_a_damaged_file_is_refused_naming_it(tmp_path, damage, message):
    path = tmp_path / 'a.didx'
    write(path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptData, match=message) as caught:
        read_dynamic_index(path, check_csum=False)
    assert str(path) in str(caught.value)


def test_a_missing_file_and_a_writer_misuse(tmp_path):
    with pytest.raises(StorageError, match='is missing'):
        read_dynamic_index(tmp_path / 'gone.didx')
    writer = DynamicIndexWriter(tmp_path / 'w.didx')
    writer.add_chunk(10, DIGESTS[0])
    with pytest.raises(ValueError, match='not after the previous end'):
        writer.add_chunk(10, DIGESTS[1])
    with pytest.raises(ValueError, match='32 bytes'):
        writer.add_chunk(20, b'short')
    assert writer.size == 10 and not (tmp_path / 'w.didx').exists()
