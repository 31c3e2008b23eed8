"""node_config and the vzdump_config role as users run them: the node's vzdump.conf and
storage.cfg declared from Ansible, checked by the engine's parsers, idempotent, honest in check
mode and --diff, and then used by a real backup of a lab guest."""
import os
import stat

import pytest

from ansible_runner import BIN, PYTHON, Unsafe, assert_failed_with, documented_return, tree
from guestvault_engine.policy.config import parse_storage_cfg, parse_vzdump_conf
from guestvault_engine.policy.notifications_cfg import decode_base64, load_notifications

MiB = 1 << 20
NODE_CONFIG = 'guestvault.backup.node_config'
BACKUP = 'guestvault.backup.guest_backup'
ROLE_TASK = 'Write vzdump.conf and storage.cfg'


@pytest.fixture
def etc(tmp_path):
    return str(tmp_path / 'etc')          # missing on purpose: node_config creates it


def declared(tmp_path):
    return {
        'vzdump': {'mode': 'suspend', 'bwlimit': 0, 'prune_backups': {'keep_last': 2},
                   'protected': False},
        'storages': {
            'local': {'path': str(tmp_path / 'vz'), 'content': ['iso']},
            'backups': {'type': 'dir', 'path': str(tmp_path / 'store'), 'content': ['backup'],
                        'prune_backups': 'keep-last=3,keep-daily=7',
                        'max_protected_backups': 2},
        },
    }


def read(path):
    with open(path) as handle:
        return handle.read()


def test_module_writes_both_files_then_a_second_run_changes_nothing(ansible, etc, tmp_path):
    args = dict(declared(tmp_path), config_dir=etc)
    first = ansible.module(NODE_CONFIG, args)
    assert first['_status'] == 'ok' and first['changed'], first
    assert first['storages'] == ['local', 'backups']
    assert first['created_dirs'] == [etc, str(tmp_path / 'vz'), str(tmp_path / 'store')]
    assert stat.S_IMODE(os.stat(tmp_path / 'store').st_mode) == 0o750
    assert read(os.path.join(etc, 'vzdump.conf')) == (
        "bwlimit: 0\nmode: suspend\nprotected: 0\n"
        "prune-backups: keep-last=2\n")
    storages = parse_storage_cfg(read(os.path.join(etc, 'storage.cfg')), 'storage.cfg')
    assert storages['backups'].prune_backups == {'keep-last': 3, 'keep-daily': 7}
    assert storages['backups'].max_protected_backups == 2
    assert 'diff' not in first
    assert set(first) >= set(documented_return('node_config'))

    second = ansible.module(NODE_CONFIG, args)
    assert second['_status'] == 'ok' and not second['changed'], second
    assert second['created_dirs'] == []
    assert second['files'] == {
        'vzdump.conf': {'path': os.path.join(etc, 'vzdump.conf'), 'changed': False},
        'storage.cfg': {'path': os.path.join(etc, 'storage.cfg'), 'changed': False}}


def test_check_mode_writes_nothing_and_diff_shows_the_change(ansible, etc, tmp_path):
    args = dict(declared(tmp_path), config_dir=etc)
    checked = ansible.module(NODE_CONFIG, args, check=True, diff=True)
    assert checked['_status'] == 'ok' and checked['changed'], checked
    assert not os.path.exists(etc) and not os.path.exists(tmp_path / 'store')
    assert [d['after_header'] for d in checked['diff']] == [
        os.path.join(etc, 'vzdump.conf'), os.path.join(etc, 'storage.cfg'),
        str(tmp_path / 'vz'), str(tmp_path / 'store')]

    ansible.module(NODE_CONFIG, args)
    args['vzdump'] = dict(args['vzdump'], mode='snapshot')
    changed = ansible.module(NODE_CONFIG, args, diff=True)
    assert changed['changed'] and changed['files']['vzdump.conf']['changed']
    assert not changed['files']['storage.cfg']['changed']
    (diff,) = changed['diff']
    assert 'mode: suspend' in diff['before'] and 'mode: snapshot' in diff['after']
    assert 'mode: snapshot' in read(os.path.join(etc, 'vzdump.conf'))


def test_declared_storages_replace_storage_cfg_and_the_diff_names_what_goes(ansible, etc,
                                                                            tmp_path):
    os.makedirs(etc)
    with open(os.path.join(etc, 'storage.cfg'), 'w') as handle:
        handle.write(f"dir: by-hand\n\tpath {tmp_path / 'hand'}\n\tcontent backup\n")
    args = {'config_dir': etc, 'storages': {'local': {'path': str(tmp_path / 'vz')}}}
    checked = ansible.module(NODE_CONFIG, args, check=True, diff=True)
    assert checked['_status'] == 'ok' and checked['removed_storages'] == ['by-hand'], checked
    cfg = next(d for d in checked['diff'] if d['before_header'] == os.path.join(etc, 'storage.cfg'))
    assert cfg['after_header'] == (os.path.join(etc, 'storage.cfg')
                                   + ' (replaced as a whole: removes storage by-hand)')
    assert 'dir: by-hand' in cfg['before'] and 'by-hand' not in cfg['after']
    assert 'dir: by-hand' in read(os.path.join(etc, 'storage.cfg'))       # check mode
    written = ansible.module(NODE_CONFIG, args)
    assert written['changed'] and written['removed_storages'] == ['by-hand'], written
    assert list(parse_storage_cfg(read(os.path.join(etc, 'storage.cfg')), 'storage.cfg')) == \
        ['local']
    again = ansible.module(NODE_CONFIG, args)
    assert not again['changed'] and again['removed_storages'] == [], again


def test_leaving_out_vzdump_keeps_the_hand_written_file(ansible, etc, tmp_path):
    os.makedirs(etc)
    with open(os.path.join(etc, 'vzdump.conf'), 'w') as handle:
        handle.write('# by hand\nmode: stop\n')
    result = ansible.module(NODE_CONFIG, {'config_dir': etc,
                                          'storages': declared(tmp_path)['storages']})
    assert result['changed'] and list(result['files']) == ['storage.cfg']
    assert read(os.path.join(etc, 'vzdump.conf')) == '# by hand\nmode: stop\n'


# ----------------------------------------------------------------------------- notifications

PASSWORD, TOKEN, HOOK_KEY = 'smtp-pw-5150', 'gotify-tok-2112', 'hook-key-1984'


def notifications(port=587):
    return {
        'relay': {'type': 'smtp', 'server': 'mail.example.com', 'port': port, 'mode': 'starttls',
                  'username': 'backup', 'mailto': ['ops@example.com'],
                  'from_address': 'backup@example.com'},
        'phone': {'type': 'gotify', 'server': 'https://gotify.example.com'},
        'chat': {'type': 'webhook', 'method': 'post',
                 'url': Unsafe('https://chat.example.com/hook?key={{ secrets.key }}'),
                 'header': {'Content-Type': 'application/json'},
                 'body': Unsafe('{"title": "{{ escape title }}"}')},
        'failures': {'type': 'matcher', 'target': ['relay', 'phone'], 'match_severity': 'error'},
        'default-matcher': {'type': 'matcher', 'target': ['chat']},
    }


SECRETS = {'relay': {'password': PASSWORD}, 'phone': {'token': TOKEN},
           'chat': {'secret': {'key': HOOK_KEY}}}


def test_notifications_declared_idempotent_honest_in_check_and_diff_and_secrets_hidden(
        ansible, etc):
    task = {NODE_CONFIG: {'config_dir': etc, 'notifications': notifications(),
                          'notification_secrets': SECRETS}}
    priv = os.path.join(etc, 'priv', 'notifications.cfg')

    def run(check=False, diff=False, port=587):
        path = os.path.join(ansible.workdir, f'notify-{ansible.calls + 1}.yml')
        task[NODE_CONFIG]['notifications'] = notifications(port)
        import yaml
        from ansible_runner import _PlaybookDumper
        with open(path, 'w') as handle:
            yaml.dump([{'hosts': 'localhost', 'gather_facts': False, 'tasks': [task]}], handle,
                      Dumper=_PlaybookDumper, sort_keys=False)
        argv = [str(BIN / 'ansible-playbook'), '-i', 'localhost,', '-c', 'local',
                '-e', f'ansible_python_interpreter={PYTHON}', path]
        (result,) = ansible._run(argv + (['--check'] if check else [])
                                 + (['--diff'] if diff else []))
        text = str(result)
        assert not any(s in text for s in (PASSWORD, TOKEN, HOOK_KEY)), result
        return result

    checked = run(check=True, diff=True)
    assert checked['_status'] == 'ok' and checked['changed'], checked
    assert not os.path.exists(etc)                                       # check mode
    diffs = {d['after_header']: d for d in checked['diff']}
    assert 'smtp: relay' in diffs[os.path.join(etc, 'notifications.cfg')]['after']
    masked = diffs[priv + ' (secrets masked)']['after']
    assert '\tpassword ********' in masked and '\ttoken ********' in masked
    assert 'secret name=key,value=********' in masked

    first = run()
    assert first['_status'] == 'ok' and first['changed'], first
    assert first['notifications'] == ['relay', 'phone', 'chat', 'failures', 'default-matcher']
    assert set(first) >= set(documented_return('node_config'))
    config = load_notifications(etc)                    # what a backup run reads
    assert config.targets['relay'].secrets == {'password': PASSWORD}
    assert config.targets['phone'].secrets == {'token': TOKEN}
    chat = config.targets['chat']
    assert chat.get('url') == 'https://chat.example.com/hook?key={{ secrets.key }}'
    assert decode_base64(chat.get('body'), 'body') == '{"title": "{{ escape title }}"}'
    assert decode_base64(chat.secrets['secret'][0]['value'], 'secret') == HOOK_KEY
    assert config.matchers['failures'].get('target') == ['relay', 'phone']
    assert PASSWORD not in read(os.path.join(etc, 'notifications.cfg'))
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(priv)).st_mode) == 0o700

    second = run(diff=True)
    assert second['_status'] == 'ok' and not second['changed'] and not second['diff'], second

    third = run(diff=True, port=2525)
    assert third['changed'] and third['files']['notifications.cfg']['changed']
    assert not third['files']['priv/notifications.cfg']['changed']
    (diff,) = third['diff']
    assert '\tport 587' in diff['before'] and '\tport 2525' in diff['after']


def test_a_malformed_notification_is_refused_naming_the_entry_and_key(ansible, etc):
    os.makedirs(etc)
    before = tree(etc)
    result = ansible.module(NODE_CONFIG, {
        'config_dir': etc, 'notification_secrets': {'relay': {'password': PASSWORD}},
        'notifications': {'relay': notifications()['relay'], 'failures': {
            'type': 'matcher', 'target': ['relay'], 'match_field': 'regex:hostname=(node'}}})
    assert_failed_with(result, "notifications 'failures': match-field:",
                       'not a valid regular expression')
    assert PASSWORD not in str(result)
    assert tree(etc) == before


# Bad input: (vzdump, storages, words the message must contain).
BAD_INPUTS = {
    'unknown vzdump key': ({'mode': 'stop', 'colour': 'red'}, None,
                           ["vzdump: unknown option 'colour'", 'known options']),
    'negative bwlimit': ({'bwlimit': -5}, None, ['vzdump: bwlimit', '-5 is too small']),
    'bad prune string': ({'prune_backups': 'keep-daily=3,keep-weakly=2'}, None,
                         ["prune-backups: unknown key 'keep-weakly'", 'keep-weekly']),
    'prune count not a number': ({'prune_backups': {'keep_daily': 'many'}}, None,
                                 ['prune-backups: keep-daily', "'many' is not an integer"]),
    'storage without path': (None, {'backups': {'content': ['backup']}},
                             ["storage 'backups'", "needs 'path'"]),
    'unknown storage key': (None, {'backups': {'path': '/srv/b', 'colour': 'red'}},
                            ["storage 'backups': unknown option 'colour'"]),
    'bad storage prune': (None, {'backups': {'path': '/srv/b', 'prune_backups': 'keep-last'}},
                          ["storage 'backups': prune-backups", 'key=value']),
    's3 endpoint not http': (None, {'sw': {'type': 's3-endpoint', 'endpoint': 'ftp://s3.lan',
                                           'access_key': 'a', 'secret_key_file': '/etc/s'}},
                             ["storage 'sw': endpoint: 'ftp://s3.lan' is not an http or https "
                              "URL"]),
}


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_fails_with_a_clear_message_and_writes_nothing(ansible, etc, tmp_path, case):
    vzdump, storages, words = BAD_INPUTS[case]
    os.makedirs(etc)
    with open(os.path.join(etc, 'vzdump.conf'), 'w') as handle:
        handle.write('mode: stop\n')
    before = tree(str(tmp_path))
    args = {'config_dir': etc, 'vzdump': vzdump or {'mode': 'snapshot'}}
    if storages is not None:
        args['storages'] = storages
    result = ansible.module(NODE_CONFIG, args)
    assert_failed_with(result, *words)
    assert ' line ' not in result['msg']
    after = tree(str(tmp_path))
    assert [entry for entry in after if not entry[0].startswith('ansible')] == \
        [entry for entry in before if not entry[0].startswith('ansible')]
    assert read(os.path.join(etc, 'vzdump.conf')) == 'mode: stop\n'


# ----------------------------------------------------------------------------- the role

def run_role(ansible, role_vars, check=False, diff=False):
    """The vzdump_config role from the installed collection; its node_config task's result."""
    import yaml
    path = os.path.join(ansible.workdir, f'role-{ansible.calls + 1}.yml')
    play = [{'hosts': 'localhost', 'gather_facts': False,
             'roles': [{'role': 'guestvault.backup.vzdump_config', 'vars': role_vars}]}]
    with open(path, 'w') as handle:
        yaml.safe_dump(play, handle, sort_keys=False)
    argv = [str(BIN / 'ansible-playbook'), '-i', 'localhost,', '-c', 'local',
            '-e', f'ansible_python_interpreter={PYTHON}', path]
    argv += ['--check'] if check else []
    argv += ['--diff'] if diff else []
    results = ansible._run(argv)
    return next(r for r in results if r['_task'] == ROLE_TASK or r['_status'] == 'failed')


def test_role_converges_is_idempotent_and_honest_in_check_and_diff(ansible, etc, tmp_path):
    role_vars = {'guestvault_config_dir': etc,
                 'guestvault_storages': {'backups': {'path': str(tmp_path / 'store')}}}
    checked = run_role(ansible, role_vars, check=True, diff=True)
    assert checked['_status'] == 'ok' and checked['changed'] and checked['diff'], checked
    assert not os.path.exists(etc)

    first = run_role(ansible, role_vars)
    assert first['_status'] == 'ok' and first['changed'], first
    # The role's default policy.
    assert parse_vzdump_conf(read(os.path.join(etc, 'vzdump.conf')), 'x') == {
        'mode': 'snapshot',
        'prune-backups': {'keep-daily': 3, 'keep-weekly': 2, 'keep-monthly': 1}}
    assert list(parse_storage_cfg(read(os.path.join(etc, 'storage.cfg')), 'x')) == ['backups']

    second = run_role(ansible, role_vars, diff=True)
    assert second['_status'] == 'ok' and not second['changed'], second

    role_vars['guestvault_vzdump'] = {'mode': 'stop', 'stopwait': 5}
    third = run_role(ansible, role_vars, diff=True)
    assert third['changed'] and 'stopwait: 5' in third['diff'][0]['after']


def test_role_without_storages_leaves_storage_cfg_alone(ansible, etc):
    os.makedirs(etc)
    with open(os.path.join(etc, 'storage.cfg'), 'w') as handle:
        handle.write('dir: mine\n\tpath /srv/mine\n')
    result = run_role(ansible, {'guestvault_config_dir': etc})
    assert result['changed'] and list(result['files']) == ['vzdump.conf']
    assert read(os.path.join(etc, 'storage.cfg')) == 'dir: mine\n\tpath /srv/mine\n'


def test_role_refuses_bad_input_before_writing(ansible, etc):
    result = run_role(ansible, {'guestvault_config_dir': etc,
                                'guestvault_vzdump': {'bwlimit': -1}})
    assert result['_status'] == 'failed' and 'bwlimit: -1 is too small' in result['msg']
    assert not os.path.exists(etc)


# ----------------------------------------------------------------------------- used by a backup

def test_a_backup_uses_the_declared_storage_and_vzdump_defaults(ansible, make_guest, etc,
                                                                tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)], vmid=101)
    guest.execute('cont')
    args = dict(declared(tmp_path), config_dir=etc)
    # A notes template is not Jinja: playbooks mark it !unsafe.
    args['vzdump']['notes_template'] = Unsafe('{{guestname}} nightly')
    (written,) = ansible.playbook([{'name': 'node config', NODE_CONFIG: args}])
    assert written['_status'] == 'ok' and written['changed'], written
    assert 'notes-template: {{guestname}} nightly' in read(os.path.join(etc, 'vzdump.conf'))
    os.makedirs(os.path.join(etc, 'guests.d'))
    with open(os.path.join(etc, 'guests.d', '101.conf'), 'w') as handle:
        handle.write(f"name: web01\nqmp: {guest.qmp_socket}\n")

    result = ansible.module(BACKUP, {'vmid': 101, 'config_dir': etc, 'storage': 'backups'})
    assert result['_status'] == 'ok' and result['changed'], result
    assert result['storage'] == 'backups'
    assert result['backup_dir'].startswith(str(tmp_path / 'store') + os.sep)
    assert result['mode'] == 'suspend'                        # vzdump.conf, not the default
    assert read(os.path.join(result['backup_dir'], 'notes')).strip() == 'web01 nightly'
    assert os.path.isfile(os.path.join(result['backup_dir'], 'vd0.qcow2'))

    # vzdump.conf's storage default is used when the task names none.
    args['vzdump'] = dict(args['vzdump'], storage='backups')
    (written,) = ansible.playbook([{'name': 'node config', NODE_CONFIG: args}])
    assert written['changed'], written
    again = ansible.module(BACKUP, {'vmid': 101, 'config_dir': etc})
    assert again['_status'] == 'ok' and again['storage'] == 'backups', again
