"""encryption_key as users run it: ``ansible localhost -m guestvault.backup.encryption_key``
against the installed collection. A key is created once (a PBS key file, 0600) and then left
alone with the same fingerprint; check mode writes nothing; a passphrase that does not unlock
the existing key fails naming the file; the passphrase never reaches a result."""
import json
import os
import stat

from ansible_runner import assert_failed_with, documented_return
from guestvault_engine.datastore.key_file import load_key

KEY = 'guestvault.backup.encryption_key'
PASSPHRASE = 'correct horse battery'


def write_pass(path, text):
    path.write_text(text + '\n')
    path.chmod(0o600)
    return str(path)


def test_a_key_is_created_once_then_reported_unchanged(ansible, tmp_path):
    key = str(tmp_path / 'pbs.json')
    pass_file = write_pass(tmp_path / 'pbs.pass', PASSPHRASE)
    args = {'path': key, 'passphrase_file': pass_file, 'hint': 'the horse'}

    checked = ansible.module(KEY, args, check=True)
    assert checked['_status'] == 'ok' and checked['changed'], checked
    assert checked['fingerprint'] is None and not os.path.exists(key)

    first = ansible.module(KEY, args)
    assert first['_status'] == 'ok' and first['changed'] and first['created_file'], first
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert json.loads(open(key).read())['fingerprint'] == first['fingerprint']
    assert load_key(key, PASSPHRASE).fingerprint_text == first['fingerprint']
    assert (first['kdf'], first['hint']) == ('scrypt', 'the horse')
    assert set(first) >= set(documented_return('encryption_key'))

    again = ansible.module(KEY, args)
    assert again['_status'] == 'ok' and not again['changed'], again
    assert again['fingerprint'] == first['fingerprint']
    checked_again = ansible.module(KEY, args, check=True)
    assert not checked_again['changed']
    assert checked_again['fingerprint'] == first['fingerprint']
    described = ansible.module(KEY, {'path': key})
    assert not described['changed'] and described['fingerprint'] == first['fingerprint']


def test_a_wrong_passphrase_file_fails_naming_the_key_file(ansible, tmp_path):
    key = str(tmp_path / 'pbs.json')
    ansible.module(KEY, {'path': key, 'passphrase_file': write_pass(tmp_path / 'a', PASSPHRASE)})
    before = open(key).read()
    wrong = write_pass(tmp_path / 'wrong.pass', 'not the passphrase')
    result = ansible.module(KEY, {'path': key, 'passphrase_file': wrong})
    assert_failed_with(result, 'wrong passphrase', key, 'force')
    assert 'not the passphrase' not in json.dumps(result)
    assert open(key).read() == before


def test_an_inline_passphrase_is_never_shown(ansible, tmp_path):
    key = str(tmp_path / 'pbs.json')
    result = ansible.module(KEY, {'path': key, 'passphrase': PASSPHRASE})
    assert result['_status'] == 'ok' and result['changed'], result
    assert PASSPHRASE not in json.dumps(result) and PASSPHRASE not in result['_stderr']
    short = ansible.module(KEY, {'path': str(tmp_path / 'b.json'), 'passphrase': 'abc'})
    assert_failed_with(short, 'too short', 'at least 5 bytes')
    assert not os.path.exists(tmp_path / 'b.json')


def test_an_unprotected_key_and_force(ansible, tmp_path):
    key = str(tmp_path / 'plain.json')
    first = ansible.module(KEY, {'path': key, 'kdf': 'none'})
    assert first['changed'] and first['kdf'] == 'none', first
    forced = ansible.module(KEY, {'path': key, 'kdf': 'none', 'force': True})
    assert forced['changed'] and forced['fingerprint'] != first['fingerprint'], forced
    both = ansible.module(KEY, {'path': key, 'passphrase': PASSPHRASE, 'passphrase_file': '/x'})
    assert both['_status'] == 'failed' and 'mutually exclusive' in both['msg'], both
