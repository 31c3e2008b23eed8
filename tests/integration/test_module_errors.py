"""The modules as users run them: ``ansible localhost -m guestvault.backup.<module> -a ...``.

Every bad input must fail with a message that says what to fix, and leave the storage (and the
guest's bitmaps) exactly as they were. The happy paths check what the modules document: check
mode predicts without touching anything, a backup returns its RETURN keys, guest_info shows the
chains, guest_bitmaps retires one chain idempotently.

The modules run from the installed collection (``make collection``), in a real ``ansible``
process, against lab guests. Results are read through a small stdout callback that writes each
task result as one JSON line (ansible-core 2.19 no longer ships a ``json`` callback); see
ansible_runner.py and the ``ansible`` fixture in conftest.py.
"""
import fcntl
import hashlib
import os
import re
import socket

import pytest

from ansible_runner import Unsafe, assert_failed_with, documented_return, tree

VMID = 9001
BACKUP = 'guestvault.backup.guest_backup'
INFO = 'guestvault.backup.guest_info'
BITMAPS = 'guestvault.backup.guest_bitmaps'


# ----------------------------------------------------------------------------- what must not change

def storage_contents(store):
    """What a storage holds besides lock files (and the vm/<vmid>/ directories they live in)."""
    return [(path, kind) for path, kind in tree(store) or []
            if os.path.basename(path) != '.lock'
            and not (kind == 'dir' and re.fullmatch(r'vm(/[0-9]+)?', path))]


def guest_bitmaps(guest):
    """{device id: sorted bitmap names}, read over the lab's own monitor."""
    found = {}
    for entry in guest.execute('query-block'):
        inserted = entry.get('inserted')
        if inserted:
            disk = entry['qdev'].split('/')[3] if entry.get('qdev') else entry['device']
            found[disk] = sorted(b['name'] for b in inserted.get('dirty-bitmaps', []))
    return found


def backup_dirs(store, vmid=VMID):
    gdir = os.path.join(store, 'vm', str(vmid))
    return sorted(os.listdir(gdir)) if os.path.isdir(gdir) else []


def write_storage_cfg(config_dir, store, storage_id='local'):
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"dir: {storage_id}\n\tpath {store}\n\tcontent backup\n")


def register(config_dir, vmid, qmp_socket, name=None):
    with open(os.path.join(config_dir, 'guests.d', f'{vmid}.conf'), 'w') as handle:
        handle.write((f"name: {name}\n" if name else '') + f"qmp: {qmp_socket}\n")


@pytest.fixture
def dead_socket(tmp_path):
    """A unix socket file that nobody listens on (its QEMU died)."""
    path = str(tmp_path / 'dead.qmp')
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(path)
    sock.close()
    return path


# ----------------------------------------------------------------------------- bad inputs

def test_unknown_vmid_says_how_to_register_the_guest(ansible, config_dir, store, make_guest):
    register(config_dir, 9002, make_guest().qmp_socket)
    before = tree(store)
    result = ansible.module(BACKUP, {'vmid': VMID, 'config_dir': config_dir, 'dumpdir': store})
    assert_failed_with(result, f'guest {VMID} is not registered', 'registered guests: 9002',
                       os.path.join(config_dir, 'guests.d', f'{VMID}.conf'), "'qmp: ")
    assert tree(store) == before


def test_a_dead_qmp_socket_says_no_qemu_serves_it(ansible, store, dead_socket):
    before = tree(store)
    result = ansible.module(BACKUP, {'vmid': VMID, 'qmp_socket': dead_socket, 'dumpdir': store})
    assert_failed_with(result, f'cannot connect to the QMP socket {dead_socket}', 'refused',
                       'A QEMU process must serve it')
    assert tree(store) == before


def test_a_missing_qmp_socket_asks_whether_the_guest_runs(ansible, config_dir, store, tmp_path):
    missing = str(tmp_path / 'gone.qmp')
    register(config_dir, VMID, missing)
    before = tree(store)
    result = ansible.module(BACKUP, {'vmid': VMID, 'config_dir': config_dir, 'dumpdir': store})
    assert_failed_with(result, f'QMP socket {missing} does not exist', 'is the guest running',
                       'registry entry (qmp:)')
    assert tree(store) == before


# Bad inputs against a live guest: (extra module args, words the message must contain).
# '{store}', '{etc}' and '{tmp}' stand for the test's storage, config dir and tmp dir.
BAD_INPUTS = {
    'include names an unknown disk': (
        {'include': ['vd0', 'vd7']},
        ['include names disk(s) vd7', 'its disks are: vd0, vd1']),
    'dumpdir does not exist': (
        {'dumpdir': '{tmp}/no-such-dir'},
        ['dumpdir {tmp}/no-such-dir does not exist', 'create it']),
    'storage and dumpdir together': (
        {'storage': 'local'},
        ['mutually exclusive', 'storage', 'dumpdir']),
    'inc without a previous backup': (
        {'level': 'inc'},
        ['cannot take an incremental backup', 'no earlier backup', 'level: full',
         'level: auto']),
    'monthly chain_period with level full': (
        {'level': 'full', 'chain_period': 'monthly'},
        ['chain_period monthly', 'needs level auto']),
    'unknown storage id': (
        {'dumpdir': None, 'storage': 'nfs'},
        ["storage 'nfs' is not defined in {etc}/storage.cfg", 'defined storages: local']),
    'invalid chain name': (
        {'chain': 'nightly.2'},
        ["chain 'nightly.2' is not a valid chain name", 'starting with a letter']),
}


def _fill(value, places):
    if isinstance(value, dict):
        return {k: _fill(v, places) for k, v in value.items()}
    if isinstance(value, str):
        return value.format(**places)
    if isinstance(value, list):
        return [_fill(v, places) for v in value]
    return value


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_fails_with_what_to_fix_and_changes_nothing(
        case, ansible, make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', '16M'), ('qcow2', '16M')])
    write_storage_cfg(config_dir, store)
    places = {'store': store, 'etc': config_dir, 'tmp': str(tmp_path)}
    extra, words = BAD_INPUTS[case]
    args = {'vmid': VMID, 'qmp_socket': guest.qmp_socket, 'config_dir': config_dir,
            'dumpdir': store}
    args.update(_fill(extra, places))
    args = {k: v for k, v in args.items() if v is not None}
    before, bitmaps = storage_contents(store), guest_bitmaps(guest)
    result = ansible.module(BACKUP, args)
    assert_failed_with(result, *_fill(words, places))
    assert storage_contents(store) == before  # no backup, no .tmp directory
    assert guest_bitmaps(guest) == bitmaps
    assert not os.path.exists(tmp_path / 'no-such-dir')


def test_notes_template_with_an_unknown_variable_lists_the_known_ones(ansible, make_guest, store):
    guest = make_guest()
    results = ansible.playbook([{'name': 'backup with a typo in the notes', BACKUP: {
        'vmid': VMID, 'qmp_socket': guest.qmp_socket, 'dumpdir': store,
        'notes_template': Unsafe('{{guestname}} on {{hostname}}')}}])
    assert_failed_with(results[0], "unknown variable '{{hostname}}'", 'known variables',
                       '{{guestname}}', '{{node}}')
    assert tree(store) == []
    assert guest_bitmaps(guest) == {'vd0': []}


def test_a_guest_being_backed_up_fails_after_lockwait(ansible, make_guest, store):
    guest = make_guest()
    lock_path = os.path.join(store, 'vm', str(VMID), '.lock')
    os.makedirs(os.path.dirname(lock_path))
    with open(lock_path, 'a+') as lock:
        before = tree(store)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = ansible.module(BACKUP, {'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                         'dumpdir': store, 'lockwait': 0.01})
    assert_failed_with(result, f'guest {VMID} on dumpdir {store} is locked by another run',
                       lock_path, 'lockwait')
    assert tree(store) == before
    assert guest_bitmaps(guest) == {'vd0': []}


@pytest.mark.parametrize('case', ['include names an unknown disk',
                                  'monthly chain_period with level full'])
def test_a_bad_option_is_reported_without_waiting_for_the_guest_lock(
        case, ansible, make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', '16M'), ('qcow2', '16M')])
    extra, words = BAD_INPUTS[case]
    lock_path = os.path.join(store, 'vm', str(VMID), '.lock')
    os.makedirs(os.path.dirname(lock_path))
    with open(lock_path, 'a+') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = ansible.module(BACKUP, dict({'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                              'dumpdir': store, 'lockwait': 0.01}, **extra))
    assert_failed_with(result, *words)


# ----------------------------------------------------------------------------- happy paths

def test_check_mode_predicts_level_reason_and_disks_and_changes_nothing(
        ansible, make_guest, store):
    guest = make_guest(disks=[('qcow2', '16M'), ('raw', '4M')])
    result = ansible.module(BACKUP, {'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                     'dumpdir': store}, check=True)
    assert result['_status'] == 'ok' and result['changed'] is True
    assert result['level'] == 'full' and result['requested_level'] == 'auto'
    assert result['level_reason'] == 'auto: full because no earlier backup of this chain on ' \
                                     'this storage'
    assert [(d['id'], d['format'], d['level']) for d in result['disks']] == [
        ('vd0', 'qcow2', 'full')]
    assert any('vd1' in w and 'include_raw' in w for w in result['warnings'])
    assert 'backup' not in result and 'backup_dir' not in result
    assert tree(store) == []
    assert guest_bitmaps(guest) == {'vd0': [], 'vd1': []}


def test_a_backup_returns_what_the_module_documents(ansible, make_guest, store, config_dir,
                                                    private_run_dir):
    guest = make_guest(name='web01')
    register(config_dir, VMID, guest.qmp_socket, name='web01')
    write_storage_cfg(config_dir, store)
    (result,) = ansible.playbook([{'name': 'nightly backup', BACKUP: {
        'vmid': VMID, 'config_dir': config_dir, 'storage': 'local',
        'notes_template': Unsafe('{{guestname}} ({{vmid}})\\nnightly')}}])
    assert result['_status'] == 'ok' and result['changed'] is True, result
    documented = documented_return('guest_backup')
    expected = {key for key, doc in documented.items() if doc['returned'] in ('always', 'changed')}
    # Ansible itself owns 'warnings' since the module hands them to module.warn(): the key is
    # there only when there is a warning (see test_warnings_are_shown_once_...).
    expected.discard('warnings')
    assert expected - set(result) == set()
    disk_keys = set(documented['disks']['contains'])
    assert [sorted(disk_keys - set(d)) for d in result['disks']] == [[]]

    assert result['vmid'] == VMID and result['guest_name'] == 'web01'
    assert result['level'] == 'full' and result['storage'] == 'local'
    assert result['storage_path'] == store
    assert result['backup'] == f"vm/{VMID}/{result['time']}"
    assert result['backup_dir'] == os.path.join(store, result['backup'])
    assert result['notes'] == 'web01 (9001)\nnightly'
    assert result['protected'] is False
    disk = result['disks'][0]
    assert disk['id'] == 'vd0' and disk['level'] == 'full'
    # An empty disk: the job goes through all of it, but no guest data is stored.
    assert disk['bytes_processed'] == disk['virtual_size']
    assert disk['bytes_written'] == 0 == result['bytes_written']
    image = os.path.join(result['backup_dir'], 'vd0.qcow2')
    with open(image, 'rb') as handle:
        data = handle.read()
    step = disk['segment_size']
    assert disk['segment_sha256'] == [hashlib.sha256(data[offset:offset + step]).hexdigest()
                                      for offset in range(0, len(data), step)]
    assert disk['size'] == os.path.getsize(image)

    assert backup_dirs(store) == ['.lock', result['time']]
    assert sorted(os.listdir(result['backup_dir'])) == [
        'client.log', 'guest.json', 'index.json', 'notes', 'vd0.qcow2']
    with open(os.path.join(result['backup_dir'], 'notes')) as handle:
        assert handle.read() == 'web01 (9001)\nnightly'
    assert guest_bitmaps(guest) == {'vd0': [f"guestvault.{result['chain']}."
                                            f"{result['time'].replace('-', '').replace(':', '')}"]}
    # The node lock was taken where GUESTVAULT_RUN_DIR says, not in /run/lock.
    assert os.listdir(private_run_dir) == [f'{VMID}.lock']


def test_a_backups_mode_is_the_consistency_mode(ansible, make_guest, store):
    guest = make_guest()
    result = ansible.module(BACKUP, {'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                     'dumpdir': store, 'mode': 'suspend'})
    assert result['_status'] == 'ok'
    assert result['mode'] == 'suspend'


def test_warnings_are_shown_once_and_without_deprecations(ansible, make_guest, store):
    guest = make_guest(disks=[('qcow2', '16M'), ('raw', '4M')])
    result = ansible.module(BACKUP, {'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                     'dumpdir': store, 'include_raw': False}, check=True)
    assert result['_status'] == 'ok'
    assert len([w for w in result['warnings'] if 'vd1' in w]) == 1
    assert result['deprecations'] == []


def test_guest_info_lists_disks_bitmaps_and_chains(ansible, make_guest, store):
    guest = make_guest(disks=[('qcow2', '16M'), ('raw', '4M')])
    backup = ansible.module(BACKUP, {'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                     'dumpdir': store})
    assert backup['_status'] == 'ok', backup
    info = ansible.module(INFO, {'vmid': VMID, 'qmp_socket': guest.qmp_socket,
                                 'dumpdir': store})
    assert info['_status'] == 'ok' and info['changed'] is False
    assert info['name'] == f'lab{VMID}' and info['status'] == 'prelaunch'
    assert info['storage_path'] == store
    vd0, vd1 = info['disks']
    assert (vd0['id'], vd0['format'], vd0['supports_bitmaps']) == ('vd0', 'qcow2', True)
    assert (vd1['id'], vd1['format'], vd1['supports_bitmaps'], vd1['bitmaps']) == (
        'vd1', 'raw', False, [])
    stamp = backup['time'].replace('-', '').replace(':', '')
    (bitmap,) = vd0['bitmaps']
    assert bitmap['name'] == f"guestvault.{backup['chain']}.{stamp}"
    assert (bitmap['guestvault'], bitmap['chain'], bitmap['since']) == (
        True, backup['chain'], stamp)
    assert bitmap['persistent'] is True and bitmap['inconsistent'] is False
    assert bitmap['dirty_bytes'] == 0
    assert info['chains'] == [{
        'chain': backup['chain'], 'start': backup['time'], 'backups': [backup['time']],
        'latest': backup['time'], 'bitmap': bitmap['name'], 'can_continue': True,
        'reason': None}]


def test_guest_bitmaps_retires_one_chain_idempotently(ansible, make_guest, store):
    guest = make_guest()
    base = {'vmid': VMID, 'qmp_socket': guest.qmp_socket}
    nightly = ansible.module(BACKUP, dict(base, dumpdir=store, level='full', chain='nightly'))
    unnamed = ansible.module(BACKUP, dict(base, dumpdir=store, level='full'))
    assert nightly['_status'] == unnamed['_status'] == 'ok'
    nightly_bitmap = nightly['disks'][0]['bitmap']
    unnamed_bitmap = unnamed['disks'][0]['bitmap']
    both = sorted([nightly_bitmap, unnamed_bitmap])
    assert guest_bitmaps(guest) == {'vd0': both}  # an unnamed full leaves named chains alone

    predicted = ansible.module(BITMAPS, dict(base, chain='nightly'), check=True)
    assert predicted['changed'] is True
    assert [r['name'] for r in predicted['removed']] == [nightly_bitmap]
    assert guest_bitmaps(guest) == {'vd0': both}

    removed = ansible.module(BITMAPS, dict(base, chain='nightly'), diff=True)
    assert removed['_status'] == 'ok' and removed['changed'] is True
    assert removed['removed'] == [{'disk': 'vd0', 'node': 'disk0', 'name': nightly_bitmap}]
    assert sorted(removed['diff']['before']['vd0']) == both
    assert removed['diff']['after'] == {'vd0': [unnamed_bitmap]}
    assert guest_bitmaps(guest) == {'vd0': [unnamed_bitmap]}

    again = ansible.module(BITMAPS, dict(base, chain='nightly'), diff=True)
    assert again['_status'] == 'ok' and again['changed'] is False
    assert again['removed'] == []
    assert again['diff']['before'] == again['diff']['after'] == {'vd0': [unnamed_bitmap]}

    info = ansible.module(INFO, dict(base, dumpdir=store))
    assert {c['chain']: c['can_continue'] for c in info['chains']} == {
        'nightly': False, unnamed['chain']: True}

    fallback = ansible.module(BACKUP, dict(base, dumpdir=store, chain='nightly'))
    assert fallback['_status'] == 'ok', fallback
    assert fallback['level'] == 'full' and fallback['requested_level'] == 'auto'
    assert fallback['level_reason'].startswith(
        f'auto: full because disk vd0 has no bitmap {nightly_bitmap}')
    assert 'removed' in fallback['level_reason']
    assert backup_dirs(store) == sorted(['.lock', nightly['time'], unnamed['time'],
                                         fallback['time']])


def test_a_second_run_with_max_age_changes_nothing(ansible, make_guest, store):
    guest = make_guest()
    args = {'vmid': VMID, 'qmp_socket': guest.qmp_socket, 'dumpdir': store, 'max_age': '1d'}
    first = ansible.module(BACKUP, args)
    second = ansible.module(BACKUP, args)
    assert first['_status'] == 'ok' and first['changed'] is True
    assert second['_status'] == 'ok' and second['changed'] is False
    assert second['backup'] == first['backup'] and 'max_age' in second['skipped_reason']
