"""Encryption keys as users handle them (run/keys.py): a key file created once and then left
alone, its fingerprint shown without the passphrase, and a key loaded for a datastore with errors
that say which file is wrong and what to do."""
import json
import os
import re
import stat

import pytest

from guestvault_engine.errors import EncryptionKeyError, MissingLibrary
from guestvault_engine.datastore import crypt as crypt_module
from guestvault_engine.datastore.key_file import KeyFile, load_key
from guestvault_engine.run.encryption_key import check_crypt_matches, create_key, key_info, load_crypt

PASSPHRASE = 'correct horse'
FINGERPRINT_RE = r'^([0-9a-f]{2}:){31}[0-9a-f]{2}$'


@pytest.fixture
def pass_file(tmp_path):
    path = tmp_path / 'pbs.pass'
    path.write_text(PASSPHRASE + '\nsecond line is not part of it\n')
    return str(path)


def test_a_new_scrypt_key_is_a_private_pbs_key_file_with_its_fingerprint(tmp_path, pass_file):
    path = str(tmp_path / 'pbs.json')
    result = create_key(path, passphrase_file=pass_file, hint='the horse')
    assert result['changed'] and result['created_file'] and result['kdf'] == 'scrypt'
    assert result['path'] == path and result['hint'] == 'the horse'
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    document = json.loads(open(path).read())
    assert document['fingerprint'] == result['fingerprint']
    assert result['short_fingerprint'] == result['fingerprint'][:23]
    assert load_key(path, PASSPHRASE).fingerprint_text == result['fingerprint']
    assert PASSPHRASE not in open(path).read() and PASSPHRASE not in repr(result)
    assert sorted(os.listdir(tmp_path)) == ['pbs.json', 'pbs.pass']   # no temporary left


def test_an_existing_key_is_left_alone_and_described(tmp_path):
    path = str(tmp_path / 'pbs.json')
    first = create_key(path, passphrase=PASSPHRASE)
    before = open(path).read()
    again = create_key(path, passphrase=PASSPHRASE)
    assert not again['changed'] and not again['created_file']
    assert again['fingerprint'] == first['fingerprint'] and again['created'] == first['created']
    assert open(path).read() == before


def test_an_existing_key_without_a_passphrase_given_is_described_too(tmp_path):
    path = str(tmp_path / 'pbs.json')
    first = create_key(path, passphrase=PASSPHRASE)
    again = create_key(path, kdf='none')
    assert not again['changed'] and again['kdf'] == 'scrypt'
    assert again['fingerprint'] == first['fingerprint']
    assert 'exists with kdf scrypt, not none' in again['warnings'][0]


def test_a_passphrase_that_does_not_unlock_the_existing_key_fails(tmp_path):
    path = str(tmp_path / 'pbs.json')
    create_key(path, passphrase=PASSPHRASE)
    with pytest.raises(EncryptionKeyError) as caught:
        create_key(path, passphrase='wrong horse')
    message = str(caught.value)
    assert 'wrong passphrase' in message and path in message and 'force' in message
    assert 'wrong horse' not in message


def test_force_replaces_the_key(tmp_path):
    path = str(tmp_path / 'pbs.json')
    first = create_key(path, kdf='none')
    second = create_key(path, kdf='none', force=True)
    assert second['changed'] and second['fingerprint'] != first['fingerprint']
    assert key_info(path)['fingerprint'] == second['fingerprint']
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_check_mode_writes_nothing_and_knows_no_fingerprint_yet(tmp_path):
    path = str(tmp_path / 'pbs.json')
    result = create_key(path, passphrase=PASSPHRASE, check_mode=True)
    assert result['changed'] and result['fingerprint'] is None
    assert not os.path.exists(path)
    real = create_key(path, kdf='none')
    checked = create_key(path, kdf='none', check_mode=True)
    assert not checked['changed'] and checked['fingerprint'] == real['fingerprint']
    forced = create_key(path, kdf='none', force=True, check_mode=True)
    assert forced['changed'] and key_info(path)['fingerprint'] == real['fingerprint']


@pytest.mark.parametrize('kwargs, words', [
    ({'passphrase': 'abcd'}, 'too short: a key file\'s passphrase has at least 5 bytes'),
    ({}, 'kdf scrypt protects the key with a passphrase; give passphrase or passphrase_file'),
    ({'kdf': 'none', 'passphrase': PASSPHRASE}, 'kdf none stores the key unprotected'),
    ({'kdf': 'pbkdf2', 'passphrase': PASSPHRASE}, "kdf 'pbkdf2' is not supported for a new key"),
    ({'passphrase': PASSPHRASE, 'passphrase_file': '/x'}, 'not both'),
    ({'passphrase_file': 'relative.pass'}, "'relative.pass' is a relative path"),
    ({'passphrase_file': '/nonexistent/pbs.pass'}, '/nonexistent/pbs.pass does not exist'),
])
def test_a_bad_request_is_refused_before_anything_is_written(tmp_path, kwargs, words):
    path = str(tmp_path / 'pbs.json')
    with pytest.raises(EncryptionKeyError, match=words.replace('(', r'\(')):
        create_key(path, **kwargs)
    with pytest.raises(EncryptionKeyError, match=words.replace('(', r'\(')):
        create_key(path, check_mode=True, **kwargs)
    assert not os.path.exists(path)


def test_an_empty_passphrase_file_is_too_short(tmp_path):
    empty = tmp_path / 'empty.pass'
    empty.write_text('\n')
    with pytest.raises(EncryptionKeyError, match=f'passphrase in {empty} is too short'):
        create_key(str(tmp_path / 'k.json'), passphrase_file=str(empty))


def test_a_relative_key_path_or_a_missing_directory_is_refused(tmp_path):
    with pytest.raises(EncryptionKeyError, match="'k.json' is a relative path"):
        create_key('k.json', kdf='none')
    with pytest.raises(EncryptionKeyError, match=r'the directory .*/missing does not exist; '
                                                 r'create it first'):
        create_key(str(tmp_path / 'missing' / 'k.json'), kdf='none')
    with pytest.raises(EncryptionKeyError, match='is a directory'):
        create_key(str(tmp_path), kdf='none')


def test_a_file_that_is_not_a_key_is_not_replaced_without_force(tmp_path):
    path = tmp_path / 'pbs.json'
    path.write_text('{"some": "thing"}')
    with pytest.raises(EncryptionKeyError, match='not a Proxmox Backup Server key file.*force'):
        create_key(str(path), kdf='none')
    assert path.read_text() == '{"some": "thing"}'
    assert create_key(str(path), kdf='none', force=True)['changed']


def test_key_info_shows_the_fingerprint_without_the_passphrase(tmp_path):
    path = str(tmp_path / 'pbs.json')
    made = create_key(path, passphrase=PASSPHRASE, hint='horse')
    info = key_info(path)
    assert info['fingerprint'] == made['fingerprint']
    assert (info['kdf'], info['hint'], info['created']) == ('scrypt', 'horse', made['created'])
    assert re.match(FINGERPRINT_RE, info['fingerprint'])


def test_key_info_computes_the_fingerprint_of_a_plain_key_that_records_none(tmp_path):
    crypt, key_file = KeyFile.create(kdf='none')
    key_file.fingerprint = None
    path = tmp_path / 'old.json'
    path.write_text(key_file.to_json())
    assert key_info(str(path))['fingerprint'] == crypt.fingerprint_text


def test_key_info_of_a_missing_file_says_how_to_create_one(tmp_path):
    with pytest.raises(EncryptionKeyError, match='does not exist; create one with the '
                                                 'guestvault.backup.encryption_key module'):
        key_info(str(tmp_path / 'nope.json'))


def test_load_crypt_unlocks_with_the_passphrase_file(tmp_path, pass_file):
    path = str(tmp_path / 'pbs.json')
    made = create_key(path, passphrase_file=pass_file)
    assert load_crypt(path, passphrase_file=pass_file).fingerprint_text == made['fingerprint']
    assert load_crypt(path, passphrase=PASSPHRASE).fingerprint_text == made['fingerprint']


def test_load_crypt_of_a_plain_key_ignores_passphrases(tmp_path):
    path = str(tmp_path / 'pbs.json')
    made = create_key(path, kdf='none')
    assert load_crypt(path).fingerprint_text == made['fingerprint']
    assert load_crypt(path, passphrase_file='/nonexistent').fingerprint_text == \
        made['fingerprint']


def test_load_crypt_names_the_file_and_the_fix(tmp_path):
    path = str(tmp_path / 'pbs.json')
    create_key(path, passphrase=PASSPHRASE)
    wrong = tmp_path / 'wrong.pass'
    wrong.write_text('wrong horse\n')
    with pytest.raises(EncryptionKeyError) as caught:
        load_crypt(path, passphrase_file=str(wrong))
    message = str(caught.value)
    assert 'wrong passphrase' in message and path in message and str(wrong) in message
    assert 'encryption-passphrase-file' in message and 'wrong horse' not in message
    with pytest.raises(EncryptionKeyError, match='protected by a passphrase.*give its '
                                                 'passphrase file'):
        load_crypt(path)
    with pytest.raises(EncryptionKeyError, match='nope.json does not exist; create one'):
        load_crypt(str(tmp_path / 'nope.json'))


def test_load_crypt_without_cryptography_names_the_package(tmp_path, monkeypatch):
    path = str(tmp_path / 'pbs.json')
    create_key(path, kdf='none')
    monkeypatch.setattr(crypt_module, 'HAS_CRYPTOGRAPHY', False)
    with pytest.raises(MissingLibrary) as caught:
        load_crypt(path)
    message = str(caught.value)
    assert path in message and 'python3-cryptography' in message
    assert 'pip install cryptography' in message


def test_a_key_that_is_not_the_one_data_was_encrypted_with_names_both(tmp_path):
    one = load_crypt(create_key(str(tmp_path / 'a.json'), kdf='none')['path'])
    other = load_crypt(create_key(str(tmp_path / 'b.json'), kdf='none')['path'])
    check_crypt_matches(one, one.fingerprint_text, 'vm/100/2024-01-01T00:00:00Z')
    check_crypt_matches(one, None, 'unencrypted')
    with pytest.raises(EncryptionKeyError) as caught:
        check_crypt_matches(one, other.fingerprint, 'vm/100/2024-01-01T00:00:00Z')
    assert other.short_fingerprint in str(caught.value)
    assert one.short_fingerprint in str(caught.value)


def test_an_existing_scrypt_key_is_described_without_its_passphrase(tmp_path):
    path = str(tmp_path / 'pbs.json')
    made = create_key(path, passphrase=PASSPHRASE)
    again = create_key(path)
    assert not again['changed'] and again['fingerprint'] == made['fingerprint']
    with pytest.raises(EncryptionKeyError, match='kdf scrypt protects the key'):
        create_key(path, force=True)
