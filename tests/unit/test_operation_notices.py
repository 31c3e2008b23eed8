"""The notification of one module call (run/notices.py): guest_backup's vzdump event, and the
type=gc|verify|prune events with PBS's fields, sent as the call's ``notify`` says; a delivery
failure is a warning of the result, never its failure. Mails go through a sendmail that keeps
them (a real process reading the message on stdin, as an MTA does)."""
import email
import email.policy
import os
import stat
from dataclasses import dataclass

import pytest

from guestvault_engine.errors import BackupFailed, ConfigError, VerifyFailed
from guestvault_engine.run.notices import notified_backup, notified_operation, storage_fields

NO_DEFAULT = "\nmatcher: default-matcher\n\ttarget mail-to-root\n\tdisable 1\n"


@pytest.fixture
def mails(tmp_path, monkeypatch):
    """A sendmail that stores each message in a file; the parsed messages."""
    spool = tmp_path / 'spool'
    spool.mkdir()
    script = tmp_path / 'sendmail'
    script.write_text(f'#!/bin/sh\ncat > "$(mktemp -p {spool})"\n')
    script.chmod(stat.S_IRWXU)
    monkeypatch.setenv('GUESTVAULT_SENDMAIL', str(script))

    def read():
        return [email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
                for path in sorted(spool.iterdir(), key=os.path.getmtime)]
    return read


@pytest.fixture
def etc(tmp_path):
    path = tmp_path / 'etc'
    path.mkdir()
    (path / 'storage.cfg').write_text(f"datastore: ds1\n\tpath {tmp_path / 'ds'}\n\n"
                                      f"dir: plain\n\tpath {tmp_path / 'plain'}\n")
    (path / 'notifications.cfg').write_text(
        "sendmail: ops\n\tmailto ops@example.com\n\nmatcher: gc\n\ttarget ops\n"
        "\tmatch-field exact:type=gc,verify,prune,vzdump\n" + NO_DEFAULT)
    return str(path)


@dataclass
class Req:
    config_dir: str
    storage: str = 'ds1'
    notify: str = 'always'
    check_mode: bool = False


def test_a_successful_gc_mails_its_summary_with_pbs_fields_when_notify_is_always(etc, mails):
    result = notified_operation('gc', Req(etc), lambda: {'removed': 3, 'warnings': []},
                                lambda r: f"removed {r['removed']} chunks")
    [mail] = mails()
    assert mail['Subject'] == "Garbage Collect Datastore 'ds1' successful"
    assert 'removed 3 chunks' in mail.get_body(('plain',)).get_content()
    assert result['notifications'][0]['ok'] and result['warnings'] == []
    assert storage_fields(etc, 'ds1')['datastore'] == 'ds1'
    assert 'datastore' not in storage_fields(etc, 'plain') and \
        storage_fields(etc, 'plain')['storage'] == 'plain'


@pytest.mark.parametrize('notify,failed,sent', [
    ('error', False, 0), ('error', True, 1), ('never', True, 0), ('always', False, 1)])
def test_notify_decides_which_outcomes_are_sent(etc, mails, notify, failed, sent):
    notified_operation('prune', Req(etc, notify=notify), lambda: {'bad': failed},
                       lambda r: 'summary', lambda r: 'it broke' if r['bad'] else None)
    assert len(mails()) == sent
    if sent:
        assert mails()[0]['Subject'].endswith('failed' if failed else 'successful')


def test_a_failed_verify_is_an_error_event_and_still_raises(etc, mails):
    error = VerifyFailed('backup x failed verification: chunk 12 is bad',
                         {'backup': 'x', 'verify_state': 'failed', 'problems': ['chunk 12'],
                          'warnings': []})

    def fail():
        raise error
    with pytest.raises(VerifyFailed):
        notified_operation('verify', Req(etc, notify='error'), fail,
                           lambda r: f"Backup {r['backup']}: {r['verify_state']}")
    [mail] = mails()
    assert mail['Subject'] == "Verify Datastore 'ds1' failed"
    assert 'chunk 12 is bad' in mail.get_body(('plain',)).get_content()
    assert error.result['notifications'][0]['target'] == 'ops'


def test_bad_input_and_check_mode_notify_nobody(etc, mails):
    def refuse():
        raise ConfigError("storage 'nope' is not in storage.cfg")
    with pytest.raises(ConfigError):
        notified_operation('gc', Req(etc, storage='nope'), refuse, str)
    assert notified_operation('gc', Req(etc, check_mode=True), lambda: {'x': 1}, str) == {'x': 1}
    assert mails() == []


def test_a_target_that_fails_is_a_warning_and_the_result_stays(etc, monkeypatch):
    monkeypatch.setenv('GUESTVAULT_SENDMAIL', '/bin/false')
    result = notified_operation('gc', Req(etc), lambda: {'warnings': ['w1']}, lambda r: '')
    assert result['warnings'][0] == 'w1'
    assert result['warnings'][1].startswith("notification to target 'ops' failed: ")
    assert not result['notifications'][0]['ok']


@dataclass
class BackupReq:
    config_dir: str
    vmid: int = 101
    node: str = 'node1'
    notification_mode: str = None
    mailto: list = None
    mailnotification: str = None


def test_a_module_backup_sends_one_vzdump_event_with_its_guest_and_log(etc, mails):
    def backup(say):
        say('backup of disk vd0 done')
        return {'guest_name': 'web01', 'backup': 'vm/101/2024-01-01T02:00:00Z',
                'bytes_written': 2048, 'warnings': []}
    result = notified_backup(BackupReq(etc), backup)
    [mail] = mails()
    assert mail['Subject'].endswith('): backup successful')
    text = mail.get_body(('plain',)).get_content()
    assert ['101', 'web01', 'ok'] == text.split('\n')[[i for i, line in enumerate(
        text.split('\n')) if line.startswith('101')][0]].split()[:3]
    assert 'backup of disk vd0 done' in text and result['notifications'][0]['ok']


def test_a_module_backup_that_fails_mails_legacy_mailto_and_raises(etc, mails):
    def backup(say):
        raise BackupFailed('the storage is full')
    with pytest.raises(BackupFailed):
        notified_backup(BackupReq(etc, mailto=['a@example.com,b@example.com']), backup)
    [mail] = mails()
    assert mail['To'] == 'a@example.com, b@example.com'         # legacy mail, not ops
    assert mail['Subject'].endswith('): backup failed')
    assert 'the storage is full' in mail.get_body(('plain',)).get_content()
