"""Issue 11: backups into a Proxmox Backup Server datastore, on real QEMU guests.

Every backup is pulled over NBD from a fleecing image and stored as chunks; every restore is
compared (qemu-img compare) with what the guest's disk held at the backup's point in time.
"""
import json
import os
import subprocess
import sys

import pytest

from guestvault_engine.errors import (BackupDamaged, BackupFailed, CorruptData,
                                      EncryptionKeyError, GuestvaultError)
from guestvault_engine.datastore.chunk_store import FileChunkStore
from guestvault_engine.datastore.file_formats import (ENCRYPTED_BLOB_MAGIC,
                                                      ENCRYPTED_COMPRESSED_BLOB_MAGIC)
from guestvault_engine.datastore.fixed_index import read_fixed_index
from guestvault_engine.datastore.manifest import BackupManifest
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.run.garbage_collect import GarbageCollectRequest, run_garbage_collect
from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
from guestvault_engine.run.guest_info import GuestInfoRequest, run_guest_info
from guestvault_engine.run.encryption_key import create_key
from guestvault_engine.run.prune import PruneRequest, run_prune
from guestvault_engine.run.restore import RestoreRequest, run_restore
from guestvault_engine.run.verify import VerifyRequest, run_verify
from lab_checks import backups_in as listed_in, hidden_in, same_content, small_tmpfs

MiB = 1 << 20
CHUNK = 4 * MiB


@pytest.fixture(autouse=True)
def fleecing_dir(tmp_path, monkeypatch):
    path = tmp_path / 'fleecing'
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(path))
    return path


def write_storage_cfg(config_dir, path, storage_id='ds1', **options):
    lines = [f"datastore: {storage_id}", f"\tpath {path}"]
    lines += [f"\t{key.replace('_', '-')} {value}" for key, value in options.items()]
    with open(os.path.join(config_dir, 'storage.cfg'), 'a') as handle:
        handle.write('\n'.join(lines) + '\n\n')


@pytest.fixture
def datastore(datastore_path, config_dir):
    write_storage_cfg(config_dir, datastore_path)
    return datastore_path


def backup(guest, config_dir, storage='ds1', **options):
    return run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                               storage=storage, config_dir=config_dir, **options))


def restore(guest, config_dir, target, storage='ds1', **options):
    return run_restore(RestoreRequest(vmid=guest.vmid, storage=storage, config_dir=config_dir,
                                      target_dir=str(target), **options))


def backups_in(datastore, vmid):
    """Snapshot directories of a guest (its group's ``owner`` file aside)."""
    return [name for name in listed_in(datastore, vmid) if name != 'owner']


def chunk_files(datastore):
    return sorted(path for path, _name, bad in FileChunkStore(datastore).chunk_files() if not bad)


def test_full_and_incrementals_restore_bit_exact_and_are_pbs_snapshots(
        make_guest, datastore, config_dir, tmp_path, fleecing_dir):
    guest = make_guest(disks=[('qcow2', 48 * MiB), ('qcow2', 10 * MiB)])  # 10 MiB: a short chunk
    guest.write('vd0', 0x11, 0, 9 * MiB)
    guest.write('vd1', 0x12, 8 * MiB, 2 * MiB)
    points = []
    for step, (offset, pattern) in enumerate([(None, None), (20 * MiB, 0x22), (1 * MiB, 0x33)]):
        if offset is not None:
            guest.write('vd0', pattern, offset, MiB)
        result = backup(guest, config_dir)
        refs = [guest.snapshot_disk(i, str(tmp_path / f'ref{step}-{i}.qcow2')) for i in (0, 1)]
        points.append((result, refs))
    assert [p[0]['level'] for p in points] == ['full', 'inc', 'inc']
    full, inc1, inc2 = (p[0] for p in points)
    # An incremental reads only the chunks its bitmap marks: one MiB written, one chunk read.
    assert [d['read_chunks'] for d in inc1['disks']] == [1, 0]
    assert [d['read_chunks'] for d in inc2['disks']] == [1, 0]
    assert inc1['disks'][1]['reused_chunks'] + inc1['disks'][1]['zero_chunks'] == 3
    assert os.listdir(fleecing_dir) == []         # the backups removed their fleecing images
    for step, (result, refs) in enumerate(points):
        for fmt in ('qcow2', 'raw'):
            target = tmp_path / f'restore{step}-{fmt}'
            out = restore(guest, config_dir, target, backup=result['time'], format=fmt)
            assert out['verified'] is True
            for index, disk in enumerate(('vd0', 'vd1')):
                ok, text = same_content(refs[index], str(target / f'{disk}.{fmt}'))
                assert ok, (step, fmt, disk, text)
    # On disk: PBS's layout. Every digest an index names is a chunk file.
    snap = os.path.join(datastore, 'vm', str(guest.vmid), full['time'])
    assert sorted(os.listdir(snap)) == ['client.log.blob', 'drive-vd0.img.fidx',
                                        'drive-vd1.img.fidx', 'guest.json.blob',
                                        'index.json.blob']
    with open(os.path.join(datastore, 'vm', str(guest.vmid), 'owner')) as handle:
        assert handle.read() == 'root@pam\n'
    with open(os.path.join(snap, 'index.json.blob'), 'rb') as handle:
        manifest = BackupManifest.decode(handle.read())
    assert manifest.backup_type == 'vm' and manifest.backup_id == str(guest.vmid)
    store = FileChunkStore(datastore)
    for info in manifest.files:
        if info.filename.endswith('.fidx'):
            index = read_fixed_index(os.path.join(snap, info.filename))
            assert index.index_csum == info.csum and index.size == info.size
            assert index.chunk_size == CHUNK
            for position in range(index.count):
                assert store.contains(index.digest(position))
    assert len(os.listdir(os.path.join(datastore, '.chunks'))) == 65536


def test_an_unchanged_second_full_stores_no_new_chunks_and_prune_then_gc_free_space(
        make_guest, datastore, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 32 * MiB)])
    guest.write('vd0', 0x44, 0, 16 * MiB)
    first = backup(guest, config_dir, level='full')
    before = chunk_files(datastore)
    second = backup(guest, config_dir, level='full')
    assert second['disks'][0]['new_chunks'] == 0 and second['bytes_written'] == 0
    assert chunk_files(datastore) == before
    # New data, a third backup; then keep only the newest.
    guest.write('vd0', 0x55, 0, 16 * MiB)
    third = backup(guest, config_dir, level='full')
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    all_chunks = chunk_files(datastore)
    assert len(all_chunks) > len(before)
    pruned = run_prune(PruneRequest(vmid=guest.vmid, storage='ds1', config_dir=config_dir,
                                    prune_backups='keep-last=1'))
    assert sorted(pruned['removed']) == sorted([first['backup'], second['backup']])
    assert backups_in(datastore, guest.vmid) == [third['time']]
    assert chunk_files(datastore) == all_chunks              # prune never touches chunks
    check = run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s', config_dir=config_dir, check_mode=True))
    # The first data's one chunk (four equal 4 MiB pieces) is garbage; the zero chunk is not.
    assert check['removed_chunks'] == 1 and chunk_files(datastore) == all_chunks
    done = run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s', config_dir=config_dir))
    assert done['removed_chunks'] == check['removed_chunks'] == 1
    assert done['removed_bytes'] == check['removed_bytes'] > 0
    gone = set(all_chunks) - set(chunk_files(datastore))
    assert len(gone) == 1 and gone < set(before)
    # With the default grace nothing recent goes.
    assert run_garbage_collect(GarbageCollectRequest(storage='ds1', config_dir=config_dir))['removed_chunks'] == 0
    out = restore(guest, config_dir, tmp_path / 'r')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text


def test_a_backup_running_during_gc_never_loses_a_chunk(make_guest, datastore, config_dir,
                                                        tmp_path):
    """The backup starts after GC's mark and before its sweep (grace 0): the backup's chunks,
    new and reused, all survive, and it restores bit-exact."""
    guest = make_guest(disks=[('qcow2', 24 * MiB)])
    guest.write('vd0', 0x61, 0, 12 * MiB)
    old = backup(guest, config_dir, level='full')
    guest.write('vd0', 0x62, 0, 4 * MiB)
    state = {}

    def between_mark_and_sweep(phase, *_args):
        if phase == 'sweep' and 'backup' not in state:
            # The old snapshot goes after the mark touched its chunks; then a backup that reuses
            # most of them (an incremental) and writes one new one runs to completion.
            state['backup'] = backup(guest, config_dir)
            state['ref'] = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
            run_prune(PruneRequest(vmid=guest.vmid, storage='ds1', config_dir=config_dir,
                                   prune_backups='keep-last=1'))

    run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s', config_dir=config_dir),
                        progress=between_mark_and_sweep)
    assert state['backup']['level'] == 'inc' and backups_in(datastore, guest.vmid) == [
        state['backup']['time']] != [old['time']]
    out = restore(guest, config_dir, tmp_path / 'r')
    ok, text = same_content(state['ref'], out['disks'][0]['target'])
    assert ok, text
    assert run_verify(VerifyRequest(guest.vmid, storage='ds1', config_dir=config_dir))['verify_state'] == 'ok'


def test_verify_finds_a_corrupt_chunk_renames_it_and_the_next_backup_heals_it(
        make_guest, datastore, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    for position in range(4):                      # four different chunks
        guest.write('vd0', 0x71 + position, position * CHUNK, CHUNK)
    first = backup(guest, config_dir, level='full')
    second = backup(guest, config_dir, level='full')   # the same chunks, a second snapshot
    index = read_fixed_index(os.path.join(datastore, 'vm', str(guest.vmid), first['time'],
                                          'drive-vd0.img.fidx'))
    store = FileChunkStore(datastore)
    victim = store.chunk_path(index.digest(2))
    with open(victim, 'r+b') as handle:
        handle.seek(40)
        byte = handle.read(1)
        handle.seek(40)
        handle.write(bytes([byte[0] ^ 0xFF]))
    result = run_verify(VerifyRequest(guest.vmid, backup=first['time'], storage='ds1',
                                      config_dir=config_dir))
    assert result['verify_state'] == 'failed'
    problem = ' '.join(result['problems'])
    assert first['backup'] in problem and 'vd0' in problem and str(2 * CHUNK) in problem
    assert not os.path.exists(victim) and os.path.exists(victim + '.0.bad')
    listed = {b['id']: b for b in run_backup_info(BackupInfoRequest(guest.vmid, storage='ds1',
                                                                    config_dir=config_dir))['backups']}
    assert listed[first['backup']]['verify_state'] == 'failed'
    # A restore of the other snapshot (same chunk) fails naming it, and leaves nothing behind:
    # not even the target directory, which the call created.
    with pytest.raises(GuestvaultError, match=str(2 * CHUNK)):
        restore(guest, config_dir, tmp_path / 'bad', backup=second['time'])
    assert not os.path.exists(tmp_path / 'bad')
    # The next backup stores a fresh copy of the chunk; then both old snapshots verify again.
    healed = backup(guest, config_dir, level='full')
    assert healed['disks'][0]['new_chunks'] == 1 and os.path.exists(victim)
    for snap in (first, second, healed):
        assert run_verify(VerifyRequest(guest.vmid, backup=snap['time'], storage='ds1',
                                        config_dir=config_dir))['verify_state'] == 'ok'


def test_an_encrypted_datastore_round_trips_and_a_wrong_key_is_named(
        make_guest, tmp_path, config_dir, datastore_path):
    (tmp_path / 'keys').mkdir(mode=0o700)
    key = create_key(str(tmp_path / 'keys' / 'ds.key'), kdf='none')
    other = create_key(str(tmp_path / 'keys' / 'other.key'), kdf='none')
    path = datastore_path
    write_storage_cfg(config_dir, path, 'enc', encryption_key=key['path'])
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x81, 0, 8 * MiB)
    result = backup(guest, config_dir, storage='enc')
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    for chunk in chunk_files(str(path)):
        with open(chunk, 'rb') as handle:
            magic = handle.read(8)
        assert magic in (ENCRYPTED_BLOB_MAGIC, ENCRYPTED_COMPRESSED_BLOB_MAGIC)
    snap = os.path.join(str(path), 'vm', str(guest.vmid), result['time'])
    with open(os.path.join(snap, 'index.json.blob'), 'rb') as handle:
        manifest = BackupManifest.decode(handle.read())
    assert manifest.unprotected['key-fingerprint'] == key['fingerprint']
    assert {f.crypt_mode for f in manifest.files} == {'encrypt'}
    out = restore(guest, config_dir, tmp_path / 'r', storage='enc')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    # The same datastore opened with another key: restore names the fingerprint it needs.
    write_storage_cfg(config_dir, path, 'wrong', encryption_key=other['path'])
    # verify names the key once, not once per chunk (the chunks get their CRC checked)
    wrong = run_verify(VerifyRequest(guest.vmid, storage='wrong', config_dir=config_dir, check_mode=True))
    assert wrong['verify_state'] == 'failed' and len(wrong['problems']) == 1, wrong['problems']
    assert key['fingerprint'][:23] in wrong['problems'][0]
    with pytest.raises(EncryptionKeyError, match=key['fingerprint'][:23]):
        restore(guest, config_dir, tmp_path / 'w', storage='wrong')
    write_storage_cfg(config_dir, path, 'nokey')
    with pytest.raises(EncryptionKeyError, match=key['fingerprint'][:23]):
        restore(guest, config_dir, tmp_path / 'n', storage='nokey')


def test_another_key_than_the_previous_snapshots_starts_a_new_full_with_a_warning(
        make_guest, datastore_path, config_dir, tmp_path):
    """Issue 20: storage.cfg's encryption-key changed (or added, or removed) between two
    backups: the next one warns and is a full backup of a new chain, never an incremental that
    names chunks encrypted with the old key; each restores bit-exact with its own key."""
    (tmp_path / 'keys').mkdir(mode=0o700)
    keys = {name: create_key(str(tmp_path / 'keys' / f'{name}.json'), kdf='none')
            for name in ('a', 'b')}
    for name, key in keys.items():             # one datastore, as storage.cfg names it over time
        write_storage_cfg(config_dir, datastore_path, f'key-{name}', encryption_key=key['path'])
    write_storage_cfg(config_dir, datastore_path, 'no-key')
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x91, 0, 10 * MiB)
    taken = []
    for step, (storage, level) in enumerate([('key-a', 'auto'), ('key-b', 'inc'),
                                             ('key-b', 'auto'), ('no-key', 'auto'),
                                             ('key-a', 'inc')]):
        guest.write('vd0', 0xa0 + step, step * MiB, MiB // 2)
        result = backup(guest, config_dir, storage=storage, level=level)
        taken.append((storage, result, guest.snapshot_disk(0, str(tmp_path / f'ref{step}.qcow2'))))
    levels = [result['level'] for _storage, result, _ref in taken]
    assert levels == ['full', 'full', 'inc', 'full', 'full'], levels
    short = {name: key['fingerprint'][:23] for name, key in keys.items()}
    for step, (before, now) in ((1, (f"key {short['a']}", f"key {short['b']}")),
                                (3, (f"key {short['b']}", 'no key')),
                                (4, ('no key', f"key {short['a']}"))):
        result = taken[step][1]
        words = f"was made with {before}, this backup uses {now}"
        assert 'the encryption key changed' in result['level_reason'] and \
            words in result['level_reason'], result['level_reason']
        assert any(words in w for w in result['warnings']), result['warnings']
        assert result['chain'] != taken[step - 1][1]['chain']
    assert not taken[2][1]['warnings'] and taken[2][1]['chain'] == taken[1][1]['chain']
    # guest_info says the same of the newest chain, as the storage's key stands now.
    info = run_guest_info(GuestInfoRequest(guest.vmid, qmp_socket=guest.qmp_socket, config_dir=config_dir,
                                           storage='key-b'))
    newest = info['chains'][-1]
    assert newest['chain'] == taken[4][1]['chain'] and not newest['can_continue']
    assert f"made with key {short['a']}, this backup uses key {short['b']}" in newest['reason']
    for step, (storage, result, ref) in enumerate(taken):
        out = restore(guest, config_dir, tmp_path / f'r{step}', storage=storage,
                      backup=result['time'])
        ok, text = same_content(ref, out['disks'][0]['target'])
        assert ok, f"backup {step} ({storage}): {text}"


KILL_RUNNER = """
import json, sys
sys.path.insert(0, {tests!r})
import conftest
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
run_guest_backup(GuestBackupRequest(**json.loads(sys.argv[1])), log=lambda m: print(m, flush=True))
"""


def test_a_killed_backup_leaves_nothing_visible_and_the_next_one_clears_up(
        make_guest, datastore, config_dir, tmp_path, fleecing_dir):
    guest = make_guest(disks=[('qcow2', 40 * MiB)])
    guest.write('vd0', 0x91, 0, 40 * MiB)
    backup(guest, config_dir)
    guest.write('vd0', 0x92, 0, 40 * MiB)
    request = dict(vmid=guest.vmid, qmp_socket=guest.qmp_socket, storage='ds1',
                   config_dir=config_dir, bwlimit=2048, level='full')   # ~20 s at 2 MiB/s
    script = KILL_RUNNER.format(tests=os.path.join(os.path.dirname(__file__), '..'))
    proc = subprocess.Popen([sys.executable, '-c', script, json.dumps(request)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if line.startswith('point in time'):
            break
    proc.kill()
    proc.communicate(timeout=300)
    assert hidden_in(datastore, guest.vmid)                       # a hidden snapshot, nothing else
    assert len(backups_in(datastore, guest.vmid)) == 1
    exports = guest.execute('query-block-exports')
    assert exports                                                # the NBD export is still up
    log = []
    result = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                 storage='ds1', config_dir=config_dir),
                              log=log.append)
    assert result['level'] == 'inc', result['level_reason']
    assert not guest.execute('query-block-exports') and not guest.execute('query-block-jobs')
    assert hidden_in(datastore, guest.vmid) == []
    assert not any(os.scandir(fleecing_dir))
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    out = restore(guest, config_dir, tmp_path / 'r')
    ok, text = same_content(ref, out['disks'][0]['target'])
    assert ok, text
    # Whatever the killed run stored is 0x92 data, the one chunk the next backup names too: GC
    # after the grace finds no garbage and keeps both backups' chunks (0x91 and 0x92).
    gc = run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s',
                                                   config_dir=config_dir))
    assert run_verify(VerifyRequest(guest.vmid, storage='ds1',
                                    config_dir=config_dir))['verify_state'] == 'ok'
    assert gc['removed_chunks'] == 0 and len(chunk_files(datastore)) == 2, gc


def test_a_full_datastore_fails_cleanly_and_the_guest_runs_on(make_guest, tmp_path, config_dir,
                                                              fleecing_dir):
    guest = make_guest(disks=[('qcow2', 64 * MiB)])
    with open('/dev/urandom', 'rb') as rnd, open(tmp_path / 'rand.bin', 'wb') as out:
        out.write(rnd.read(40 * MiB))
    guest.write_file('vd0', str(tmp_path / 'rand.bin'), 0, 40 * MiB)
    with small_tmpfs(tmp_path / 'small', '24m') as small:
        write_storage_cfg(config_dir, small, 'small')
        with pytest.raises(BackupFailed, match='is full'):
            backup(guest, config_dir, storage='small')
        assert backups_in(small, guest.vmid) == [] and hidden_in(small, guest.vmid) == []
    assert guest.execute('query-status')['status'] == 'prelaunch' or guest.execute(
        'query-status')['running'] in (True, False)
    assert not guest.execute('query-block-jobs') and not guest.execute('query-block-exports')
    assert not any(os.scandir(fleecing_dir))


def test_modules_work_on_a_datastore(ansible, make_guest, datastore, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0xA1, 0, 8 * MiB)
    common = {'storage': 'ds1', 'config_dir': config_dir}
    taken = ansible.module('guestvault.backup.guest_backup',
                           dict(common, vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                notes_template='taken into ds1'))
    assert taken.get('changed') and taken['level'] == 'full', taken
    info = ansible.module('guestvault.backup.backup_info', dict(common, vmid=guest.vmid))
    assert [b['notes'] for b in info['backups']] == ['taken into ds1']
    assert ansible.module('guestvault.backup.protect',
                          dict(common, vmid=guest.vmid, backup='latest', protected=True))['changed']
    assert ansible.module('guestvault.backup.verify',
                          dict(common, vmid=guest.vmid))['verify_state'] == 'ok'
    pruned = ansible.module('guestvault.backup.prune',
                            dict(common, vmid=guest.vmid, prune_backups='keep-last=1'))
    assert pruned['removed'] == []
    gc = ansible.module('guestvault.backup.garbage_collect', dict(common, grace='0s'),
                        check=True)
    assert (gc['removed_chunks'], gc['changed']) == (0, False), gc
    restored = ansible.module('guestvault.backup.restore',
                              dict(common, vmid=guest.vmid, target_dir=str(tmp_path / 'r')))
    assert restored['changed'] and restored['verified']


def test_the_log_end_hook_reads_the_log_as_text(make_guest, tmp_path, config_dir,
                                                datastore_path):
    """A datastore keeps the log as a blob (encrypted here): log-end's LOGFILE is a text copy,
    gone after the hook."""
    (tmp_path / 'keys').mkdir(mode=0o700)
    key = create_key(str(tmp_path / 'keys' / 'ds.key'), kdf='none')
    write_storage_cfg(config_dir, datastore_path, 'enc', encryption_key=key['path'])
    script = tmp_path / 'hook.sh'
    script.write_text(f"""#!/bin/sh
[ "$1" = log-end ] && cp "$LOGFILE" {tmp_path / 'log.txt'} && echo "$LOGFILE" > {tmp_path / 'where'}
exit 0
""")
    script.chmod(0o755)
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    result = backup(guest, config_dir, storage='enc', script=str(script))
    text = (tmp_path / 'log.txt').read_text()
    assert f"starting backup of VM {guest.vmid}" in text and 'INFO:' in text
    assert not os.path.exists((tmp_path / 'where').read_text().strip())   # the copy is gone
    stored = os.path.join(datastore_path, 'vm', str(guest.vmid), result['time'], 'client.log.blob')
    with open(stored, 'rb') as handle:
        assert text.encode() not in handle.read()                         # the blob is encrypted


@pytest.mark.parametrize('damage', ['missing chunk', 'unknown magic', 'truncated index'])
def test_verify_and_restore_name_the_snapshot_the_disk_and_the_offset(
        make_guest, datastore, config_dir, tmp_path, damage):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    for position in range(4):
        guest.write('vd0', 0xB1 + position, position * CHUNK, CHUNK)
    taken = backup(guest, config_dir)
    snap = os.path.join(datastore, 'vm', str(guest.vmid), taken['time'])
    index_path = os.path.join(snap, 'drive-vd0.img.fidx')
    chunk = FileChunkStore(datastore).chunk_path(read_fixed_index(index_path).digest(3))
    if damage == 'missing chunk':
        os.unlink(chunk)
    elif damage == 'unknown magic':
        with open(chunk, 'r+b') as handle:
            handle.write(b'NOTABLOB')
    else:
        os.truncate(index_path, os.path.getsize(index_path) - 32)
    result = run_verify(VerifyRequest(guest.vmid, storage='ds1', config_dir=config_dir))
    text = ' '.join(result['problems'])
    assert result['verify_state'] == 'failed' and taken['backup'] in text and 'vd0' in text
    if damage != 'truncated index':
        assert str(3 * CHUNK) in text, text
        assert ('missing' if damage == 'missing chunk' else 'magic') in text, text
    else:
        assert len(result['problems']) == 1, result['problems']     # told once, not twice
    with pytest.raises(CorruptData) as err:   # a bad chunk verify renamed is missing now
        restore(guest, config_dir, tmp_path / 'r')
    assert taken['backup'] in str(err.value) and 'vd0' in str(err.value), err.value
    if damage != 'truncated index':
        assert str(3 * CHUNK) in str(err.value), err.value
    assert not os.path.exists(tmp_path / 'r' / 'vd0.qcow2')


def test_a_scrypt_key_with_a_passphrase_file_and_the_key_never_in_the_store(
        make_guest, tmp_path, config_dir, datastore_path):
    keys = tmp_path / 'keys'
    keys.mkdir(mode=0o700)
    (keys / 'pass').write_text('correct horse battery\n')
    key = create_key(str(keys / 'ds.key'), passphrase_file=str(keys / 'pass'))
    path = datastore_path
    write_storage_cfg(config_dir, path, 'enc', encryption_key=key['path'],
                      encryption_passphrase_file=str(keys / 'pass'))
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    guest.write('vd0', 0xC1, 0, 4 * MiB)
    backup(guest, config_dir, storage='enc')
    ref = guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2'))
    out = restore(guest, config_dir, tmp_path / 'r', storage='enc')
    assert same_content(ref, out['disks'][0]['target'])[0]
    from guestvault_engine.datastore.key_file import load_key
    secret = load_key(key['path'], 'correct horse battery')._key   # the 32 key bytes
    for folder, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(folder, name), 'rb') as handle:
                assert secret not in handle.read(), name
    (keys / 'pass').write_text('wrong horse\n')
    with pytest.raises(EncryptionKeyError, match='passphrase'):
        restore(guest, config_dir, tmp_path / 'w', storage='enc')


MISSING_LIBRARY = """
import json, sys
sys.path.insert(0, {tests!r})
sys.modules[{module!r}] = None      # as on a node without the package
import conftest
from guestvault_engine.errors import GuestvaultError
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
try:
    run_guest_backup(GuestBackupRequest(**json.loads(sys.argv[1])))
except GuestvaultError as exc:
    print('ERROR', exc)
"""


@pytest.mark.parametrize('module, package', [('nbd', 'python3-libnbd'),
                                             ('cryptography', 'cryptography')])
def test_a_missing_library_is_named_and_nothing_is_left(make_guest, tmp_path, config_dir,
                                                        datastore_path, module, package):
    path = datastore_path
    options = {}
    if module == 'cryptography':
        (tmp_path / 'keys').mkdir(mode=0o700)
        options['encryption_key'] = create_key(str(tmp_path / 'keys' / 'k'), kdf='none')['path']
    write_storage_cfg(config_dir, path, 'ds', **options)
    guest = make_guest(disks=[('qcow2', 8 * MiB)])
    request = dict(vmid=guest.vmid, qmp_socket=guest.qmp_socket, storage='ds',
                   config_dir=config_dir)
    script = MISSING_LIBRARY.format(tests=os.path.join(os.path.dirname(__file__), '..'),
                                    module=module)
    proc = subprocess.run([sys.executable, '-c', script, json.dumps(request)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert 'ERROR' in proc.stdout and package in proc.stdout, (proc.stdout, proc.stderr)
    assert backups_in(str(path), guest.vmid) == [] and hidden_in(str(path), guest.vmid) == []
    assert not guest.execute('query-block-jobs') and not guest.execute('query-block-exports')
    bitmaps = [b for node in guest.execute('query-named-block-nodes', flat=True)
               for b in node.get('dirty-bitmaps', [])]
    assert bitmaps == []


def flip_a_bit(path, offset=40):
    """Flip one bit of ``path``; returns its original bytes (to repair it later)."""
    with open(path, 'rb') as handle:
        original = handle.read()
    damaged = bytearray(original)
    damaged[offset] ^= 0x10
    with open(path, 'wb') as handle:
        handle.write(damaged)
    return original


def test_a_damaged_manifest_stays_visible_keeps_its_chunks_and_restores_once_repaired(
        make_guest, datastore, config_dir, tmp_path):
    """Issue 20, findings 1 and 2: one flipped bit in the newest snapshot's index.json.blob."""
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0xC1, 0, 8 * MiB)
    good = backup(guest, config_dir, level='full')
    good_ref = guest.snapshot_disk(0, str(tmp_path / 'good.qcow2'))
    guest.write('vd0', 0xC2, 0, 8 * MiB)                # chunks only the newest names
    newest = backup(guest, config_dir, level='full')
    newest_ref = guest.snapshot_disk(0, str(tmp_path / 'newest.qcow2'))
    manifest = os.path.join(datastore, 'vm', str(guest.vmid), newest['time'], 'index.json.blob')
    original = flip_a_bit(manifest)
    chunks = chunk_files(datastore)
    # backup_info lists it as damaged, with the reason, beside the good one
    listed = run_backup_info(BackupInfoRequest(guest.vmid, storage='ds1', config_dir=config_dir))
    assert [b['id'] for b in listed['backups']] == [good['backup']]
    [damaged] = listed['damaged']
    assert damaged['id'] == newest['backup'] and damaged['path'] == os.path.dirname(manifest)
    assert manifest in damaged['reason'] and 'crc' in damaged['reason'].lower(), damaged
    assert newest['backup'] in listed['warnings'][0]
    # verify and restore of it say what is wrong
    verified = run_verify(VerifyRequest(guest.vmid, backup=newest['time'], storage='ds1',
                                        config_dir=config_dir))
    assert verified['verify_state'] == 'failed' and verified['backup'] == newest['backup']
    assert damaged['reason'] in verified['problems'][0]
    with pytest.raises(BackupDamaged, match=f"{newest['backup']} is damaged: .*{manifest}"):
        restore(guest, config_dir, tmp_path / 'nothing', backup=newest['time'])
    assert not os.path.exists(tmp_path / 'nothing' / 'vd0.qcow2')
    # latest, level auto and prune act on the good ones only, and say so
    out = restore(guest, config_dir, tmp_path / 'latest')
    assert out['backup'] == good['backup']
    assert f"newest backup is damaged: {newest['backup']}" in out['warnings'][0], out['warnings']
    ok, text = same_content(good_ref, out['disks'][0]['target'])
    assert ok, text
    planned = backup(guest, config_dir, level='auto', check_mode=True)
    assert any(newest['backup'] in w and 'damaged' in w for w in planned['warnings']), planned
    pruned = run_prune(PruneRequest(vmid=guest.vmid, storage='ds1', config_dir=config_dir,
                                    prune_backups='keep-last=1'))
    assert pruned['removed'] == [] and pruned['damaged'] == [newest['backup']]
    assert any('neither counts it' in w for w in pruned['warnings'])
    assert os.path.exists(manifest)
    # GC with grace 0 keeps every chunk the damaged snapshot names
    check = run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s', config_dir=config_dir, check_mode=True))
    done = run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s', config_dir=config_dir))
    assert check['removed_chunks'] == done['removed_chunks'] == 0, done
    assert done['index_files'] == 2 and chunk_files(datastore) == chunks
    # the manifest repaired: the snapshot verifies and restores bit-exact
    with open(manifest, 'wb') as handle:
        handle.write(original)
    assert run_verify(VerifyRequest(guest.vmid, storage='ds1',
                                    config_dir=config_dir))['verify_state'] == 'ok'
    out = restore(guest, config_dir, tmp_path / 'repaired')
    assert out['backup'] == newest['backup'] and out['warnings'] == []
    ok, text = same_content(newest_ref, out['disks'][0]['target'])
    assert ok, text


def test_gc_stops_on_an_index_it_cannot_parse_and_removes_nothing(make_guest, datastore,
                                                                  config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0xC3, 0, 8 * MiB)
    first = backup(guest, config_dir, level='full')
    guest.write('vd0', 0xC4, 0, 8 * MiB)
    second = backup(guest, config_dir, level='full')
    run_prune(PruneRequest(vmid=guest.vmid, storage='ds1', config_dir=config_dir,
                           prune_backups='keep-last=1'))   # the first's chunks are garbage now
    index = os.path.join(datastore, 'vm', str(guest.vmid), second['time'], 'drive-vd0.img.fidx')
    os.truncate(index, os.path.getsize(index) - 7)
    chunks = chunk_files(datastore)
    for check_mode in (True, False):
        with pytest.raises(CorruptData, match=f"stopped before removing anything: {index}"):
            run_garbage_collect(GarbageCollectRequest(storage='ds1', grace='0s', config_dir=config_dir,
                                                      check_mode=check_mode))
    assert chunk_files(datastore) == chunks and first['backup'] != second['backup']
