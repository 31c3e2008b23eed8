"""PBS key files (pbs-key-config/src/lib.rs): files built by hand the way PBS serializes its
KeyConfig (serde: externally tagged KDF enum, base64 bytes, RFC 3339 times, colon-hex fingerprint),
their protected key computed independently with hashlib and cryptography."""
import base64
import hashlib
import json
import os
import re
import stat

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from guestvault_engine.errors import ConfigError, EncryptionKeyError
from guestvault_engine.datastore import key_file
from guestvault_engine.datastore.crypt import CryptConfig

KEY = bytes(range(32))
FINGERPRINT = ('0e:ab:d4:46:0b:6e:b9:ca:34:50:23:de:e2:b7:78:c7:'
               '90:e5:4a:16:83:b9:65:9c:0a:57:ae:19:90:90:15:9b')
SALT = bytes(range(100, 132))
IV = bytes(range(200, 216))
PASSPHRASE = 'correct horse'
RFC3339 = re.compile(r'\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d\Z')


def b64(raw):
    return base64.b64encode(raw).decode()


def protected_data(derived):
    sealed = AESGCM(derived).encrypt(IV, KEY, None)
    return IV + sealed[-16:] + sealed[:-16]            # iv || tag || encrypted key


def test_plain_key_file_as_pbs_writes_it():
    text = ('{"kdf":null,"created":"2020-06-26T13:56:05+02:00","modified":"2020-06-26T13:56:05Z",'
            f'"data":"{b64(KEY)}","fingerprint":"{FINGERPRINT}"}}')
    parsed = key_file.KeyFile.from_json(text)
    assert parsed.kdf == 'none' and parsed.data == KEY
    assert parsed.created == 1593172565 and parsed.modified == 1593179765
    config = parsed.unlock()
    assert config.fingerprint_text == FINGERPRINT
    assert parsed.short_fingerprint == '0e:ab:d4:46:0b:6e:b9:ca'


def test_created_plain_key_file_serializes_like_pbs():
    config, created = key_file.KeyFile.create(kdf='none', key=KEY, now=1593179765)
    text = created.to_json()
    document = json.loads(text)
    assert list(document) == ['kdf', 'created', 'modified', 'data', 'fingerprint']
    assert ' ' not in text
    assert document['kdf'] is None and document['data'] == b64(KEY)
    assert document['fingerprint'] == FINGERPRINT == config.fingerprint_text
    assert RFC3339.match(document['created'])
    assert key_file.parse_key_time(document['created']) == 1593179765
    with pytest.raises(EncryptionKeyError, match='takes no passphrase'):
        key_file.KeyFile.create('a passphrase', kdf='none')


def test_scrypt_key_file_built_by_hand_unlocks():
    derived = hashlib.scrypt(PASSPHRASE.encode(), salt=SALT, n=65536, r=8, p=1,
                             maxmem=1025 * 1024 * 1024, dklen=32)
    text = json.dumps({
        'kdf': {'Scrypt': {'n': 65536, 'r': 8, 'p': 1, 'salt': b64(SALT)}},
        'created': '2024-01-01T00:00:00+00:00', 'modified': '2024-01-01T00:00:00+00:00',
        'data': b64(protected_data(derived)), 'fingerprint': FINGERPRINT, 'hint': 'the horse'})
    parsed = key_file.KeyFile.from_json(text, source='the key file k.json')
    assert parsed.kdf == 'scrypt' and parsed.kdf_params['salt'] == SALT
    assert parsed.unlock(PASSPHRASE).fingerprint_text == FINGERPRINT
    with pytest.raises(EncryptionKeyError) as caught:
        parsed.unlock('wrong horse')
    message = str(caught.value)
    assert 'wrong passphrase' in message and 'k.json' in message and 'the horse' in message
    assert '0e:ab:d4:46:0b:6e:b9:ca' in message
    for secret in (KEY.hex(), b64(KEY), 'wrong horse', PASSPHRASE, derived.hex()):
        assert secret not in message
    assert isinstance(caught.value, ConfigError)


def test_pbkdf2_key_file_built_by_hand_unlocks():
    derived = hashlib.pbkdf2_hmac('sha256', PASSPHRASE.encode(), SALT, 65535, 32)
    text = json.dumps({
        'kdf': {'PBKDF2': {'iter': 65535, 'salt': b64(SALT)}},
        'created': '2024-01-01T00:00:00Z', 'modified': '2024-01-01T00:00:00Z',
        'data': b64(protected_data(derived))})
    parsed = key_file.KeyFile.from_json(text)
    assert parsed.fingerprint is None
    assert parsed.unlock(PASSPHRASE.encode()).fingerprint_text == FINGERPRINT
    with pytest.raises(EncryptionKeyError, match='wrong passphrase'):
        parsed.unlock('another one')


def test_passphrase_rules():
    config, created = key_file.KeyFile.create(PASSPHRASE, kdf='pbkdf2', key=KEY)
    with pytest.raises(EncryptionKeyError, match='protected by a passphrase'):
        created.unlock()
    with pytest.raises(EncryptionKeyError, match='too short'):
        created.unlock('four')
    with pytest.raises(EncryptionKeyError, match='too short'):
        key_file.KeyFile.create('four', kdf='scrypt')
    with pytest.raises(EncryptionKeyError, match='unknown key derivation'):
        key_file.KeyFile.create(PASSPHRASE, kdf='argon2')
    assert created.unlock(PASSPHRASE).fingerprint == config.fingerprint


def test_created_scrypt_key_file_uses_pbs_parameters_and_round_trips(tmp_path):
    config, created = key_file.KeyFile.create(PASSPHRASE, hint='hint text')
    document = json.loads(created.to_json())
    assert list(document) == ['kdf', 'created', 'modified', 'data', 'fingerprint', 'hint']
    params = document['kdf']['Scrypt']
    assert (params['n'], params['r'], params['p']) == (65536, 8, 1)
    assert len(base64.b64decode(params['salt'])) == 32
    assert len(base64.b64decode(document['data'])) == 16 + 16 + 32
    assert document['fingerprint'] == config.fingerprint_text
    path = tmp_path / 'backup.key'
    key_file.save_key_file(str(path), created)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == created.to_json()
    assert os.listdir(tmp_path) == ['backup.key']
    assert key_file.load_key(str(path), PASSPHRASE).fingerprint == config.fingerprint
    # the key inside is the one the config uses
    iv, tag, sealed = config.encrypt(b'chunk')
    assert key_file.load_key(str(path), PASSPHRASE).decrypt(iv, tag, sealed) == b'chunk'


def test_save_never_replaces_unless_asked(tmp_path):
    path = str(tmp_path / 'backup.key')
    first = key_file.KeyFile.create(kdf='none')[1]
    second = key_file.KeyFile.create(kdf='none')[1]
    key_file.save_key_file(path, first)
    with pytest.raises(EncryptionKeyError, match='exists already'):
        key_file.save_key_file(path, second)
    assert key_file.load_key_file(path).data == first.data
    key_file.save_key_file(path, second, replace=True)
    assert key_file.load_key_file(path).data == second.data
    assert sorted(os.listdir(tmp_path)) == ['backup.key']


def test_recorded_fingerprint_must_match_the_key():
    # pbs-key-config's fingerprint_checks: a file recording another fingerprint is refused
    text = json.dumps({'kdf': None, 'created': '2024-01-01T00:00:00Z',
                       'modified': '2024-01-01T00:00:00Z', 'data': b64(KEY),
                       'fingerprint': ':'.join(['00'] * 32)})
    with pytest.raises(EncryptionKeyError, match='records the fingerprint 00:00') as caught:
        key_file.KeyFile.from_json(text).unlock()
    assert '0e:ab:d4:46:0b:6e:b9:ca' in str(caught.value)


@pytest.mark.parametrize('change, error', [
    (lambda d: d.pop('data'), 'data is missing'),
    (lambda d: d.update(kdf={'Argon2': {}}), 'unknown kdf'),
    (lambda d: d.update(kdf={'Scrypt': {'n': 1024, 'r': 8, 'salt': ''}}), 'p is missing'),
    (lambda d: d.update(data='***'), 'not valid base64'),
    (lambda d: d.update(created='yesterday'), 'RFC 3339'),
    (lambda d: d.update(fingerprint='12:34'), 'not a key fingerprint'),
])
def test_malformed_key_files_are_named(change, error):
    document = {'kdf': None, 'created': '2024-01-01T00:00:00Z',
                'modified': '2024-01-01T00:00:00Z', 'data': b64(KEY)}
    change(document)
    with pytest.raises(EncryptionKeyError, match=error) as caught:
        key_file.KeyFile.from_json(json.dumps(document), source='the key file /etc/k')
    assert 'the key file /etc/k is not a Proxmox Backup Server key file' in str(caught.value)
    with pytest.raises(EncryptionKeyError, match='not a Proxmox Backup Server key file'):
        key_file.KeyFile.from_json('[1, 2]')


def test_short_plain_key_and_unreadable_file(tmp_path):
    text = json.dumps({'kdf': None, 'created': '2024-01-01T00:00:00Z',
                       'modified': '2024-01-01T00:00:00Z', 'data': b64(KEY[:16])})
    with pytest.raises(EncryptionKeyError, match='16 bytes'):
        key_file.KeyFile.from_json(text).unlock()
    with pytest.raises(EncryptionKeyError, match='cannot read the key file'):
        key_file.load_key_file(str(tmp_path / 'absent.key'))


def test_times_as_pbs_writes_and_reads_them():
    assert key_file.parse_key_time('2020-06-26T13:56:05Z') == 1593179765
    assert key_file.parse_key_time('2020-06-26T15:56:05+02:00') == 1593179765
    assert key_file.parse_key_time('2020-06-26T10:26:05-03:30') == 1593179765
    for epoch in (0, 1593179765, 2_000_000_000):
        text = key_file.format_key_time(epoch)
        assert RFC3339.match(text) and key_file.parse_key_time(text) == epoch
    with pytest.raises(ValueError):
        key_file.parse_key_time('2020-06-26T13:56:05.123Z')


def test_repr_shows_no_key():
    config, created = key_file.KeyFile.create(kdf='none', key=KEY)
    assert KEY.hex() not in repr(created) and b64(KEY) not in repr(created)
    assert '0e:ab:d4:46:0b:6e:b9:ca' in repr(created)
    assert isinstance(config, CryptConfig)
