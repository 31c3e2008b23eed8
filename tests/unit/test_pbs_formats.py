"""Proxmox Backup Server's byte layouts: magic numbers, the key's derived values, DataBlobs and the
fixed index, checked against hand-built bytes (from the Rust struct definitions in
pbs-datastore/src/file_formats.rs, data_blob.rs, fixed_index.rs and docs/file-formats.rst), PBS's
own test vectors, and independent computations with hashlib, hmac, zlib and cryptography."""
import hashlib
import hmac
import os
import zlib

import pytest
import zstandard
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guestvault_engine.errors import CorruptData, EncryptionKeyError, MissingLibrary, StorageError
from guestvault_engine.datastore import blob, crypt, file_formats as ff, fixed_index

MiB = 1024 * 1024

# PBS's tests (tests/blob_writer.rs): 100000 bytes i % 255, the key [1; 32], and both digests.
PBS_TEST_DATA = bytes(i % 255 for i in range(100_000))
PBS_TEST_KEY = bytes([1]) * 32
PBS_TEST_DIGEST_PLAIN = bytes([
    83, 154, 96, 195, 167, 204, 38, 142, 204, 224, 130, 201, 24, 71, 2, 188, 130, 155, 177, 6,
    162, 100, 61, 238, 38, 219, 63, 240, 191, 132, 87, 238])
PBS_TEST_DIGEST_ENC = bytes([
    50, 162, 191, 93, 255, 132, 9, 14, 127, 23, 92, 39, 246, 102, 245, 204, 130, 104, 4, 106,
    182, 239, 218, 14, 80, 17, 150, 188, 239, 253, 198, 117])
# pbs-key-config's tests: the key 0, 1, ..., 31 has this fingerprint.
PBS_KEY_0_31 = bytes(range(32))
PBS_FINGERPRINT_0_31 = bytes([
    14, 171, 212, 70, 11, 110, 185, 202, 52, 80, 35, 222, 226, 183, 120, 199, 144, 229, 74, 22,
    131, 185, 101, 156, 10, 87, 174, 25, 144, 144, 21, 155])


def le32(value):
    return value.to_bytes(4, 'little')


def le64(value, signed=False):
    return value.to_bytes(8, 'little', signed=signed)


# -- magic numbers ----------------------------------------------------------------------------

MAGIC_SENTENCES = [
    (ff.UNCOMPRESSED_BLOB_MAGIC, b"Proxmox Backup uncompressed blob v1.0",
     [66, 171, 56, 7, 190, 131, 112, 161]),
    (ff.COMPRESSED_BLOB_MAGIC, b"Proxmox Backup zstd compressed blob v1.0",
     [49, 185, 88, 66, 111, 182, 163, 127]),
    (ff.ENCRYPTED_BLOB_MAGIC, b"Proxmox Backup encrypted blob v1.0",
     [123, 103, 133, 190, 34, 45, 76, 240]),
    (ff.ENCRYPTED_COMPRESSED_BLOB_MAGIC, b"Proxmox Backup zstd compressed encrypted blob v1.0",
     [230, 89, 27, 191, 11, 191, 216, 11]),
    (ff.FIXED_INDEX_MAGIC, b"Proxmox Backup fixed sized chunk index v1.0",
     [47, 127, 65, 237, 145, 253, 15, 205]),
    (ff.DYNAMIC_INDEX_MAGIC, b"Proxmox Backup dynamic sized chunk index v1.0",
     [28, 145, 78, 165, 25, 186, 179, 205]),
    (ff.CATALOG_MAGIC, b"Proxmox Backup Catalog file v1.0",
     [145, 253, 96, 249, 196, 103, 88, 213]),
]


@pytest.mark.parametrize('magic, sentence, literal', MAGIC_SENTENCES,
                         ids=[sentence.decode() for _magic, sentence, _bytes in MAGIC_SENTENCES])
def test_magic_is_the_first_8_bytes_of_the_sha256_of_its_sentence(magic, sentence, literal):
    assert magic == hashlib.sha256(sentence).digest()[:8]
    assert magic == bytes(literal)
    assert len(magic) == ff.MAGIC_SIZE


def test_header_sizes_follow_the_rust_structs():
    # DataBlobHeader { magic: [u8; 8], crc: [u8; 4] } and EncryptedDataBlobHeader { head,
    # iv: [u8; 16], tag: [u8; 16] }, both repr(C, packed)
    assert ff.BLOB_HEADER_SIZE == 8 + 4
    assert ff.ENCRYPTED_BLOB_HEADER_SIZE == 8 + 4 + 16 + 16
    assert (ff.BLOB_CRC_OFFSET, ff.BLOB_IV_OFFSET, ff.BLOB_TAG_OFFSET) == (8, 12, 28)
    # FixedIndexHeader: magic 8, uuid 16, ctime i64, index_csum 32, size u64, chunk_size u64,
    # reserved 4016: one page, no padding (every field is at a multiple of its alignment)
    assert ff.FIXED_INDEX_HEADER.size == 8 + 16 + 8 + 32 + 8 + 8 + 4016 == 4096
    assert ff.FIXED_INDEX_CSUM_OFFSET == 32
    # DynamicIndexHeader: magic, uuid, ctime, index_csum, reserved 4032
    assert ff.DYNAMIC_INDEX_HEADER.size == 8 + 16 + 8 + 32 + 4032 == 4096
    assert ff.DYNAMIC_INDEX_ENTRY_SIZE == 8 + 32
    assert ff.CHUNK_SIZES == tuple(k * 1024 for k in (64, 128, 256, 512, 1024, 2048, 4096))
    assert ff.DEFAULT_CHUNK_SIZE == 4 * MiB
    assert ff.MAX_BLOB_SIZE == 128 * MiB
    for magic in ff.BLOB_KINDS:
        assert ff.blob_header_size(magic) == (44 if ff.BLOB_KINDS[magic][0] else 12)
    with pytest.raises(CorruptData, match='unknown blob magic'):
        ff.blob_header_size(ff.FIXED_INDEX_MAGIC)


# -- the key --------------------------------------------------------------------------------

def test_fingerprint_matches_pbs_test_vector_and_an_independent_computation():
    config = crypt.CryptConfig(PBS_KEY_0_31)
    assert config.fingerprint == PBS_FINGERPRINT_0_31
    # independently: id_key = PBKDF2-HMAC-SHA256(key, "_id_key", 10), then sha256(input || id_key)
    id_key = hashlib.pbkdf2_hmac('sha256', PBS_KEY_0_31, b"_id_key", 10, 32)
    fingerprint_input = hashlib.sha256(b"Proxmox Backup Encryption Key Fingerprint").digest()
    assert crypt.FINGERPRINT_INPUT == fingerprint_input
    assert hashlib.sha256(fingerprint_input + id_key).digest() == PBS_FINGERPRINT_0_31
    assert crypt.derive_id_key(PBS_KEY_0_31) == id_key


def test_fingerprint_text_short_and_full_as_pbs_prints_them():
    config = crypt.CryptConfig(PBS_KEY_0_31)
    assert config.short_fingerprint == '0e:ab:d4:46:0b:6e:b9:ca'
    assert config.fingerprint_text == ':'.join(f"{b:02x}" for b in PBS_FINGERPRINT_0_31)
    assert len(config.fingerprint_text) == 32 * 3 - 1
    assert crypt.parse_fingerprint(config.fingerprint_text) == PBS_FINGERPRINT_0_31
    assert crypt.parse_fingerprint(PBS_FINGERPRINT_0_31.hex()) == PBS_FINGERPRINT_0_31
    with pytest.raises(EncryptionKeyError, match='not a key fingerprint'):
        crypt.parse_fingerprint('0e:ab:d4:46:0b:6e:b9:ca')


def test_keyed_digest_is_sha256_of_data_then_id_key():
    config = crypt.CryptConfig(PBS_TEST_KEY)
    assert config.compute_digest(PBS_TEST_DATA) == PBS_TEST_DIGEST_ENC
    id_key = hashlib.pbkdf2_hmac('sha256', PBS_TEST_KEY, b"_id_key", 10, 32)
    assert config.compute_digest(b'abc') == hashlib.sha256(b'abc' + id_key).digest()
    assert config.compute_digest(b'abc') != hashlib.sha256(id_key + b'abc').digest()
    assert crypt.chunk_digest(PBS_TEST_DATA) == PBS_TEST_DIGEST_PLAIN
    assert crypt.chunk_digest(PBS_TEST_DATA, config) == PBS_TEST_DIGEST_ENC


def test_auth_tag_is_hmac_sha256_under_the_id_key():
    config = crypt.CryptConfig(PBS_TEST_KEY)
    id_key = hashlib.pbkdf2_hmac('sha256', PBS_TEST_KEY, b"_id_key", 10, 32)
    assert config.compute_auth_tag(b'{"a":1}') == hmac.new(id_key, b'{"a":1}', 'sha256').digest()


def test_encryption_is_aes_256_gcm_with_a_16_byte_iv_and_no_aad():
    config = crypt.CryptConfig(PBS_TEST_KEY)
    iv = bytes(range(16))
    got_iv, tag, ciphertext = config.encrypt(b'some data', iv)
    expected = AESGCM(PBS_TEST_KEY).encrypt(iv, b'some data', None)
    assert (got_iv, ciphertext + tag) == (iv, expected)
    assert config.decrypt(iv, tag, ciphertext) == b'some data'
    random_iv = config.encrypt(b'x')[0]
    assert len(random_iv) == 16 and random_iv != config.encrypt(b'x')[0]


def test_key_never_shows_in_repr_and_a_wrong_key_is_named_by_fingerprint():
    config = crypt.CryptConfig(PBS_TEST_KEY)
    assert PBS_TEST_KEY.hex() not in repr(config) and 'fingerprint' in repr(config)
    iv, tag, ciphertext = config.encrypt(b'data')
    other = crypt.CryptConfig(PBS_KEY_0_31)
    with pytest.raises(EncryptionKeyError) as caught:
        other.decrypt(iv, tag, ciphertext, name='chunk x')
    assert other.short_fingerprint in str(caught.value)
    assert PBS_KEY_0_31.hex() not in str(caught.value)
    with pytest.raises(EncryptionKeyError, match='32 bytes'):
        crypt.CryptConfig(b'short')


def test_missing_cryptography_names_the_package(monkeypatch):
    monkeypatch.setattr(crypt, 'HAS_CRYPTOGRAPHY', False)
    with pytest.raises(MissingLibrary, match='cryptography') as caught:
        crypt.CryptConfig(PBS_TEST_KEY).encrypt(b'x')
    assert 'python3-cryptography' in str(caught.value)


# -- DataBlob ---------------------------------------------------------------------------------

class FixedIv(crypt.CryptConfig):
    """A key whose IV is chosen by the test, so the encrypted blob's bytes are predictable."""
    IV = bytes(range(100, 116))

    def encrypt(self, data, iv=None):
        return super().encrypt(data, self.IV)


def test_uncompressed_blob_bytes():
    raw = blob.encode_blob(b'hello', compress=False)
    magic = bytes([66, 171, 56, 7, 190, 131, 112, 161])
    assert raw == magic + le32(zlib.crc32(b'hello')) + b'hello'
    assert blob.decode_blob(raw) == b'hello'
    # data that does not compress is stored plain even when compression is asked for
    assert blob.encode_blob(b'hello') == raw


def test_compressed_blob_bytes_and_compression_only_when_smaller():
    data = bytes(64 * 1024)
    raw = blob.encode_blob(data)
    payload = raw[12:]
    assert raw[:8] == ff.COMPRESSED_BLOB_MAGIC
    assert raw[8:12] == le32(zlib.crc32(payload))
    assert payload[:4] == b'\x28\xb5\x2f\xfd'      # a zstd frame
    assert zstandard.ZstdDecompressor().decompress(payload) == data
    assert len(payload) < len(data)
    assert blob.decode_blob(raw) == data
    assert blob.encode_blob(os.urandom(4096))[:8] == ff.UNCOMPRESSED_BLOB_MAGIC


@pytest.mark.parametrize('data', [os.urandom(4096), bytes(range(256)) * 64, b'x' * 100000],
                         ids=['incompressible', 'compressible', 'repeated'])
@pytest.mark.parametrize('compress', [True, False])
def test_a_blob_encoded_in_place_is_the_same_blob_and_a_plain_one_is_not_copied(data, compress):
    """The backup's chunk buffers hold the data after room for the header: a blob stored as it is
    is written from there (the bytes encode_blob makes, without copying 4 MiB twice)."""
    header = ff.BLOB_HEADER_SIZE
    buffer = bytearray(header) + bytearray(data) + bytearray(b'\xff' * 7)   # room after it too
    made, in_place = blob.encode_blob_in_place(buffer, len(data), compress=compress)
    assert bytes(made) == blob.encode_blob(data, compress=compress)
    assert blob.decode_blob(made) == data
    plain = made[:8] == ff.UNCOMPRESSED_BLOB_MAGIC
    assert in_place == plain
    if plain:
        assert isinstance(made, memoryview) and made.obj is buffer
    config = FixedIv(PBS_TEST_KEY)
    sealed, in_place = blob.encode_blob_in_place(buffer, len(data), config, compress=compress)
    assert not in_place and sealed == blob.encode_blob(data, config, compress=compress)


def test_encrypted_blob_bytes_crc_covers_only_the_ciphertext():
    config = FixedIv(PBS_TEST_KEY)
    data = b'not compressible!'
    raw = blob.encode_blob(data, config)
    sealed = AESGCM(PBS_TEST_KEY).encrypt(FixedIv.IV, data, None)
    ciphertext, tag = sealed[:-16], sealed[-16:]
    expected = (bytes([123, 103, 133, 190, 34, 45, 76, 240]) + le32(zlib.crc32(ciphertext))
                + FixedIv.IV + tag + ciphertext)
    assert raw == expected
    assert blob.decode_blob(raw, config) == data
    assert blob.crypt_mode(raw) == 'encrypt'


def test_encrypted_compressed_blob_compresses_then_encrypts():
    config = FixedIv(PBS_TEST_KEY)
    data = bytes(100_000)
    raw = blob.encode_blob(data, config)
    assert raw[:8] == ff.ENCRYPTED_COMPRESSED_BLOB_MAGIC
    plain = AESGCM(PBS_TEST_KEY).decrypt(raw[12:28], raw[44:] + raw[28:44], None)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(plain) == data
    assert raw[8:12] == le32(zlib.crc32(raw[44:]))
    assert blob.decode_blob(raw, config) == data


@pytest.mark.parametrize('encrypted', [False, True])
@pytest.mark.parametrize('compress', [False, True])
def test_pbs_blob_test_vectors_round_trip(encrypted, compress):
    config = crypt.CryptConfig(PBS_TEST_KEY) if encrypted else None
    raw, digest = blob.encode_chunk(PBS_TEST_DATA, config, compress)
    assert digest == (PBS_TEST_DIGEST_ENC if encrypted else PBS_TEST_DIGEST_PLAIN)
    assert blob.blob_kind(raw) == (encrypted, compress)
    assert blob.decode_blob(raw, config, digest) == PBS_TEST_DATA


def test_stream_written_zstd_frames_without_size_and_several_frames_decode():
    # PBS writes plain compressed chunks through a zstd stream: the frame has no content size
    streaming = zstandard.ZstdCompressor(level=1, write_content_size=False)
    payload = streaming.compress(PBS_TEST_DATA) + streaming.compress(b'tail')
    raw = ff.COMPRESSED_BLOB_MAGIC + le32(zlib.crc32(payload)) + payload
    assert blob.decode_blob(raw) == PBS_TEST_DATA + b'tail'
    cut = payload[:-20]
    with pytest.raises(CorruptData, match='middle of a frame'):
        blob.decode_blob(ff.COMPRESSED_BLOB_MAGIC + le32(zlib.crc32(cut)) + cut)
    junk = b'not zstd at all'
    with pytest.raises(CorruptData, match='cannot be decompressed'):
        blob.decode_blob(ff.COMPRESSED_BLOB_MAGIC + le32(zlib.crc32(junk)) + junk)


def test_empty_blob():
    raw = blob.encode_blob(b'')
    assert raw == ff.UNCOMPRESSED_BLOB_MAGIC + le32(0)
    assert blob.decode_blob(raw) == b''


def test_decode_names_what_is_wrong():
    raw = bytearray(blob.encode_blob(b'payload bytes', compress=False))
    with pytest.raises(CorruptData, match=r'chunk ab: .*too small'):
        blob.decode_blob(raw[:11], name='chunk ab')
    with pytest.raises(CorruptData, match='unknown magic'):
        blob.decode_blob(b'\0' * 8 + raw[8:])
    with pytest.raises(CorruptData, match='magic of a fixed index'):
        blob.decode_blob(ff.FIXED_INDEX_MAGIC + raw[8:])
    damaged = bytearray(raw)
    damaged[-1] ^= 1
    with pytest.raises(CorruptData, match='CRC32 mismatch'):
        blob.decode_blob(bytes(damaged))
    with pytest.raises(CorruptData, match='does not match its digest'):
        blob.decode_blob(bytes(raw), digest=bytes(32))
    with pytest.raises(CorruptData, match='13 bytes of data where 4194304 are expected'):
        blob.decode_blob(bytes(raw), size=4 * MiB)
    assert blob.decode_blob(bytes(damaged), check_crc=False)[-1:] == b'r'


def test_encrypted_blob_errors_wrong_key_missing_key_tampered_tag():
    config = crypt.CryptConfig(PBS_TEST_KEY)
    raw = blob.encode_blob(PBS_TEST_DATA, config)
    with pytest.raises(EncryptionKeyError, match='is encrypted'):
        blob.decode_blob(raw, name='chunk 1')
    other = crypt.CryptConfig(PBS_KEY_0_31)
    with pytest.raises(EncryptionKeyError, match=other.short_fingerprint):
        blob.decode_blob(raw, other)
    # the CRC does not cover IV and tag: a changed tag passes the CRC and fails authentication
    changed_tag = bytearray(raw)
    changed_tag[30] ^= 1
    blob.verify_crc(bytes(changed_tag))
    with pytest.raises(EncryptionKeyError):
        blob.decode_blob(bytes(changed_tag), config)
    with pytest.raises(CorruptData, match='too small for an encrypted blob'):
        blob.decode_blob(raw[:43], config)
    # an encrypted chunk's digest is keyed: the plain sha256 does not match
    with pytest.raises(CorruptData, match='digest'):
        blob.decode_blob(raw, config, PBS_TEST_DIGEST_PLAIN)


def test_blob_size_limit_and_missing_zstandard(monkeypatch):
    class Huge(bytes):
        def __len__(self):
            return ff.MAX_BLOB_SIZE + 1

    with pytest.raises(ValueError, match='at most'):
        blob.encode_blob(Huge())
    monkeypatch.setattr(blob, 'HAS_ZSTANDARD', False)
    with pytest.raises(MissingLibrary, match='zstandard'):
        blob.encode_blob(b'x' * 100)
    assert blob.encode_blob(b'x', compress=False)[:8] == ff.UNCOMPRESSED_BLOB_MAGIC


# -- fixed index ------------------------------------------------------------------------------

def hand_built_fidx(uuid, ctime, size, chunk_size, digests):
    digest_area = b''.join(digests)
    header = (bytes([47, 127, 65, 237, 145, 253, 15, 205]) + uuid + le64(ctime, signed=True)
              + hashlib.sha256(digest_area).digest() + le64(size) + le64(chunk_size)
              + bytes(4016))
    assert len(header) == 4096
    return header + digest_area


def test_fixed_index_bytes_match_the_layout():
    uuid = bytes(range(16))
    size = 10 * MiB + 1                                # three chunks, the last one 2 MiB + 1
    digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    raw = fixed_index.encode_fixed_index(size, digests, uuid=uuid, ctime=1_700_000_000)
    assert raw == hand_built_fidx(uuid, 1_700_000_000, size, 4 * MiB, digests)
    assert len(raw) == 4096 + 3 * 32
    assert raw[24:32] == le64(1_700_000_000) and raw[64:72] == le64(size)
    assert raw[72:80] == le64(4 * MiB) and raw[80:4096] == bytes(4016)


def test_fixed_index_round_trip_and_chunk_geometry():
    digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    raw = hand_built_fidx(b'u' * 16, -5, 10 * MiB + 1, 4 * MiB, digests)
    index = fixed_index.parse_fixed_index(raw)
    assert (index.size, index.chunk_size, index.count) == (10 * MiB + 1, 4 * MiB, 3)
    assert index.ctime == -5
    assert index.uuid == b'u' * 16
    assert index.index_csum == hashlib.sha256(b''.join(digests)).digest() == index.compute_csum()
    assert [index.digest(n) for n in range(3)] == digests
    assert [(p, start, length) for p, start, length, _digest in index] == [
        (0, 0, 4 * MiB), (1, 4 * MiB, 4 * MiB), (2, 8 * MiB, 2 * MiB + 1)]
    assert index.chunk_range(2) == (8 * MiB, 10 * MiB + 1)
    assert index.chunk_at(4 * MiB + 7) == (1, 7)
    assert index.encode() == raw


def test_fixed_index_refuses_what_pbs_refuses():
    digests = [bytes(32)] * 2
    raw = hand_built_fidx(bytes(16), 0, 8 * MiB, 4 * MiB, digests)
    with pytest.raises(CorruptData, match='truncated'):
        fixed_index.parse_fixed_index(raw[:-1], name='drive-scsi0.img.fidx')
    with pytest.raises(CorruptData, match='longer than its header'):
        fixed_index.parse_fixed_index(raw + bytes(32))
    with pytest.raises(CorruptData, match='header of a fixed index'):
        fixed_index.parse_fixed_index(raw[:4000])
    with pytest.raises(CorruptData, match='magic of a dynamic index'):
        fixed_index.parse_fixed_index(ff.DYNAMIC_INDEX_MAGIC + raw[8:])
    with pytest.raises(CorruptData, match='unknown magic'):
        fixed_index.parse_fixed_index(b'12345678' + raw[8:])
    with pytest.raises(CorruptData, match='power of two'):
        fixed_index.parse_fixed_index(hand_built_fidx(bytes(16), 0, 3000, 1000, [bytes(32)] * 3))
    with pytest.raises(CorruptData, match='empty image'):
        fixed_index.parse_fixed_index(hand_built_fidx(bytes(16), 0, 0, 4 * MiB, []))
    damaged = bytearray(raw)
    damaged[-1] ^= 1
    with pytest.raises(CorruptData, match='index checksum'):
        fixed_index.parse_fixed_index(bytes(damaged))
    assert fixed_index.parse_fixed_index(bytes(damaged), check_csum=False).count == 2


def test_fixed_index_writer_any_order_complete_atomic(tmp_path):
    path = tmp_path / 'drive-scsi0.img.fidx'
    writer = fixed_index.FixedIndexWriter(path, 3 * 4 * MiB, uuid=bytes(16), ctime=7)
    digests = [hashlib.sha256(bytes([n])).digest() for n in range(3)]
    for position in (2, 0):
        writer.add_digest(position, digests[position])
    assert writer.missing() == [1]
    with pytest.raises(StorageError, match='1 of 3 chunks have no digest'):
        writer.close()
    assert not path.exists()
    assert writer.position_of(4 * MiB, 4 * MiB) == 1
    with pytest.raises(ValueError, match='not the start of a chunk'):
        writer.position_of(4 * MiB + 1, 4 * MiB)
    with pytest.raises(ValueError, match='has 4194304 bytes'):
        writer.position_of(8 * MiB, 1)
    writer.add_digest(1, digests[1])
    csum = writer.close()
    assert csum == hashlib.sha256(b''.join(digests)).digest()
    assert path.read_bytes() == hand_built_fidx(bytes(16), 7, 12 * MiB, 4 * MiB, digests)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['drive-scsi0.img.fidx']
    assert fixed_index.read_fixed_index(path).index_csum == csum
    with pytest.raises(StorageError, match='missing'):
        fixed_index.read_fixed_index(tmp_path / 'absent.fidx')


def test_decode_into_a_reused_buffer_checks_the_length():
    """A restore decompresses (or copies) each chunk into a buffer it reuses (issue 24)."""
    streaming = zstandard.ZstdCompressor(level=1, write_content_size=False)
    payload = streaming.compress(PBS_TEST_DATA) + streaming.compress(b'tail')
    raw = ff.COMPRESSED_BLOB_MAGIC + le32(zlib.crc32(payload)) + payload
    size = len(PBS_TEST_DATA) + 4
    buffer = bytearray(b'x' * (size + 10))
    data = blob.decode_blob(raw, into=buffer, size=size)
    assert bytes(data) == PBS_TEST_DATA + b'tail' and data.obj is buffer
    for wrong in (size - 1, size + 1):      # more data than the index says, and less
        with pytest.raises(CorruptData, match=f'chunk 1: {size} bytes of data where {wrong}'):
            blob.decode_blob(raw, into=buffer, size=wrong, name='chunk 1')
    cut = payload[:-20]
    with pytest.raises(CorruptData, match='bytes of data where'):
        blob.decode_blob(ff.COMPRESSED_BLOB_MAGIC + le32(zlib.crc32(cut)) + cut, into=buffer,
                         size=size)
    plain = blob.encode_blob(b'abc', compress=False)
    assert bytes(blob.decode_blob(plain, into=buffer, size=3)) == b'abc'
    assert buffer[:3] == b'abc'
