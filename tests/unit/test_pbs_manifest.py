"""index.json.blob as PBS's BackupManifest (pbs-datastore/src/manifest.rs): PBS's signature test
vector, canonical JSON as proxmox-serde writes it, the unprotected part, and key checks."""
import hashlib
import hmac
import json

import pytest

from guestvault_engine.errors import CorruptData, EncryptionKeyError
from guestvault_engine.datastore import blob, file_formats as ff, manifest as mf
from guestvault_engine.datastore.crypt import CryptConfig
from guestvault_engine.datastore.key_file import derive_passphrase_key

KEY = bytes(range(32))


@pytest.fixture(scope='module')
def pbs_test_key():
    # manifest.rs's test: scrypt(b"test", empty salt, N=65536, r=8, p=1)
    key = derive_passphrase_key('scrypt', {'n': 65536, 'r': 8, 'p': 1, 'salt': b''}, b'test')
    return CryptConfig(key)


def pbs_test_manifest():
    made = mf.BackupManifest('host', 'elsa', 1593179765)      # host/elsa/2020-06-26T13:56:05Z
    made.add_file('test1.img.fidx', 200, bytes([1]) * 32, 'encrypt')
    made.add_file('abc.blob', 200, bytes([2]) * 32, 'none')
    made.unprotected['note'] = 'This is not protected by the signature.'
    return made


def test_signature_matches_pbs_test_vector(pbs_test_key):
    made = pbs_test_manifest()
    assert made.relpath() == 'host/elsa/2020-06-26T13:56:05Z'
    text = made.to_json(pbs_test_key)
    value = json.loads(text)
    assert value['signature'] == 'd7b446fb7db081662081d4b40fedd858a1d6307a5aff4ecff7d5bf4fd35679e9'
    assert value['unprotected']['key-fingerprint'] == pbs_test_key.fingerprint_text
    assert mf.BackupManifest.from_json(text, pbs_test_key).signature == value['signature']


def test_signature_independently_hmac_of_hand_written_canonical_json():
    config = CryptConfig(KEY)
    made = mf.BackupManifest('vm', 100, 1700000000)
    made.add_file('drive-scsi0.img.fidx', 4194304, bytes([0xab]) * 32, 'encrypt')
    made.notes = 'not signed'
    canonical = ('{"backup-id":"100","backup-time":1700000000,"backup-type":"vm","files":'
                 '[{"crypt-mode":"encrypt","csum":"' + 'ab' * 32 + '","filename":'
                 '"drive-scsi0.img.fidx","size":4194304}]}').encode()
    id_key = hashlib.pbkdf2_hmac('sha256', KEY, b'_id_key', 10, 32)
    expected = hmac.new(id_key, canonical, 'sha256').hexdigest()
    assert json.loads(made.to_json(config))['signature'] == expected


def test_canonical_json_as_proxmox_serde_writes_it():
    value = {'b': [1, True, 'x'], 'a': {'z': 'é/"\n\u0001', 'y': -3}, 'A': 'upper first'}
    assert mf.canonical_json(value) == (
        '{"A":"upper first","a":{"y":-3,"z":"é/\\"\\n\\u0001"},"b":[1,true,"x"]}'.encode())
    with pytest.raises(ValueError, match='null'):
        mf.canonical_json({'a': [None]})


def test_file_is_pretty_json_with_sorted_keys_in_a_plain_blob(pbs_test_key):
    made = pbs_test_manifest()
    raw = made.encode(pbs_test_key)
    assert raw[:8] in (ff.UNCOMPRESSED_BLOB_MAGIC, ff.COMPRESSED_BLOB_MAGIC)   # never encrypted
    text = blob.decode_blob(raw).decode()
    value = json.loads(text)
    assert text == json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    assert list(value) == ['backup-id', 'backup-time', 'backup-type', 'files', 'signature',
                           'unprotected']
    assert value['files'][0] == {'crypt-mode': 'encrypt', 'csum': '01' * 32,
                                 'filename': 'test1.img.fidx', 'size': 200}
    unsigned = json.loads(pbs_test_manifest().to_json())
    assert unsigned['signature'] is None and 'key-fingerprint' not in unsigned['unprotected']
    back = mf.BackupManifest.decode(raw, pbs_test_key)
    assert [(f.filename, f.size, f.csum, f.crypt_mode) for f in back.files] == [
        ('test1.img.fidx', 200, bytes([1]) * 32, 'encrypt'),
        ('abc.blob', 200, bytes([2]) * 32, 'none')]
    assert back.fingerprint == pbs_test_key.fingerprint


def test_unprotected_changes_keep_the_signature_and_others_break_it():
    config = CryptConfig(KEY)
    made = mf.BackupManifest('vm', 100, 1700000000)
    made.add_file('drive-scsi0.img.fidx', 4194304, bytes(32), 'encrypt')
    value = json.loads(made.to_json(config))
    value['unprotected']['notes'] = 'changed later, as PBS does'
    value['unprotected']['verify_state'] = {'state': 'ok', 'upid': mf.make_upid('verify')}
    assert mf.BackupManifest.from_json(json.dumps(value), config).notes.startswith('changed')
    value['files'][0]['size'] += 1
    with pytest.raises(CorruptData, match='signature does not match'):
        mf.BackupManifest.from_json(json.dumps(value), config)
    # without a key there is nothing to check it against (PBS reads it all the same)
    assert mf.BackupManifest.from_json(json.dumps(value)).files[0].size == 4194305


def test_key_checks_name_fingerprints():
    config, other = CryptConfig(KEY), CryptConfig(bytes([9]) * 32)
    made = mf.BackupManifest('vm', 100, 1700000000)
    made.add_file('drive-scsi0.img.fidx', 4194304, bytes(32), 'encrypt')
    text = made.to_json(config)
    with pytest.raises(EncryptionKeyError) as caught:
        mf.BackupManifest.from_json(text, other)
    assert config.short_fingerprint in str(caught.value)
    assert other.short_fingerprint in str(caught.value)
    parsed = mf.BackupManifest.from_json(text)
    expected = f"made with the encryption key {config.short_fingerprint}"
    with pytest.raises(EncryptionKeyError, match=expected):
        parsed.check_fingerprint(None)
    with pytest.raises(EncryptionKeyError, match='wrong key'):
        parsed.check_fingerprint(other)
    parsed.check_fingerprint(config)
    plain = mf.BackupManifest.from_json(mf.BackupManifest('vm', 100, 1).to_json())
    plain.check_fingerprint(None)
    plain.check_fingerprint(other)


def test_verify_state_notes_and_upid():
    made = mf.BackupManifest('vm', '100', 1700000000)
    assert made.notes is None and made.verify_state is None
    made.notes = 'first line\nsecond'
    upid = mf.make_upid('verify_snapshot', 'store:vm/100/6553F100', node='pve1.example.com',
                        pid=0x4F37, pstart=0x39E469, task_id=0, starttime=0x5CA78B83)
    assert upid == ('UPID:pve1:00004F37:0039E469:00000000:5CA78B83:verify_snapshot:'
                    'store\\x3avm-100-6553F100:root@pam:')
    made.set_verify_state('failed', upid)
    value = json.loads(made.to_json())
    assert value['unprotected'] == {'notes': 'first line\nsecond',
                                    'verify_state': {'state': 'failed', 'upid': upid}}
    with pytest.raises(ValueError):
        made.set_verify_state('good', upid)
    with pytest.raises(ValueError):
        made.set_verify_state('ok', 'not a upid')
    made.notes = None
    assert 'notes' not in made.unprotected


def test_reading_old_and_malformed_manifests():
    old = {'backup-type': 'vm', 'backup-id': '100', 'backup-time': 1,
           'files': [{'filename': 'a.blob', 'size': 3, 'csum': '00' * 32}]}
    parsed = mf.BackupManifest.from_json(json.dumps(old))      # before 0.8: no crypt-mode
    assert parsed.files[0].crypt_mode == 'none' and parsed.unprotected == {}
    with pytest.raises(CorruptData, match='files is missing'):
        mf.BackupManifest.from_json('{"backup-type": "vm", "backup-id": "1", "backup-time": 1}')
    with pytest.raises(CorruptData, match='not JSON'):
        mf.BackupManifest.from_json('{')
    broken = dict(old, files=[{'filename': 'a.blob', 'size': 3, 'csum': 'zz'}])
    with pytest.raises(CorruptData, match='not a backup manifest'):
        mf.BackupManifest.from_json(json.dumps(broken))
    with pytest.raises(CorruptData, match='does not list'):
        parsed.file_info('b.blob')
    parsed.verify_file('a.blob', bytes(32), 3)
    with pytest.raises(CorruptData, match='4 bytes, the manifest says 3'):
        parsed.verify_file('a.blob', bytes(32), 4)


def test_add_file_refuses_what_pbs_refuses():
    made = mf.BackupManifest('vm', 100, 1)
    with pytest.raises(ValueError, match='.fidx, .didx and .blob'):
        made.add_file('disk.qcow2', 1, bytes(32))
    with pytest.raises(ValueError, match='crypt mode'):
        made.add_file('a.blob', 1, bytes(32), 'aes')
    with pytest.raises(ValueError, match='backup type'):
        mf.BackupManifest('qemu', 100, 1)


def test_blob_file_info_and_snapshot_path():
    raw = blob.encode_blob(b'vmid: 100\n')
    info = mf.blob_file_info(mf.QEMU_CONFIG_BLOB_NAME, raw)
    assert (info.size, info.csum) == (len(raw), hashlib.sha256(raw).digest())
    assert mf.snapshot_relpath('vm', 100, 1700000000) == 'vm/100/2023-11-14T22:13:20Z'
