"""Issue 13, single-file restore as users drive it: the module through Ansible (check mode,
--diff, idempotence, overwrite), and bad requests that fail clearly and leave nothing behind.
The backups are of a lab guest whose disk is an ext4 made on the host with known files."""
import hashlib
import os
import subprocess

import pytest

from guestvault_engine.errors import ConfigError, EncryptionKeyError
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.restore.file_restore import (
    FileRestoreError, PathNotFound, SizeLimitExceeded, UnknownFilesystem)
from guestvault_engine.run.file_restore import FileRestoreRequest, run_file_restore
from guestvault_engine.run.encryption_key import create_key
from ansible_runner import assert_failed_with, documented_return
from disk_layouts import LayoutGuest, ext4_image, gpt_ext4_disk, write_tree

MiB = 1 << 20
FILES = {'etc/hostname': b'db1\n', 'etc/app/app.conf': b'port=5432\n',
         'var/lib/app/data.bin': os.urandom(2 * MiB + 17), 'home/alice/notes': b'hello\n'}


def guest_with_files(tmp_path, config_dir, vmid=9411, where=None, files=None, partitioned=False,
                     prepare=None):
    """A lab guest whose disk is an ext4 (on a GPT partition if ``partitioned``) holding
    ``files`` (and what ``prepare(directory)`` adds to them), backed up once: (vmid, where)."""
    files = FILES if files is None else files
    disk = str(tmp_path / f'disk-{vmid}.qcow2')
    if partitioned:
        gpt_ext4_disk(str(tmp_path / f'make-{vmid}'), files, disk)
    else:
        source = tmp_path / f'files-{vmid}'
        write_tree(str(source), files)
        if prepare:
            prepare(str(source))
        raw = str(tmp_path / f'disk-{vmid}.raw')
        ext4_image(raw, str(source), 32 * MiB)
        subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', raw, disk], check=True)
        os.unlink(raw)
    if where is None:
        (tmp_path / 'dump').mkdir(exist_ok=True)
        where = {'dumpdir': str(tmp_path / 'dump')}
    guest = LayoutGuest(str(tmp_path / f'guest-{vmid}'), disk, vmid).start()
    try:
        run_guest_backup(GuestBackupRequest(vmid=vmid, qmp_socket=guest.qmp_socket, config_dir=config_dir,
                                            **where))
    finally:
        guest.stop()
    return vmid, where


def request(vmid, where, config_dir, **options):
    return FileRestoreRequest(vmid=vmid, config_dir=config_dir, **where, **options)


def digest(path):
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def test_bad_requests_fail_clearly_and_leave_nothing_behind(tmp_path, config_dir, monkeypatch):
    monkeypatch.setenv('GUESTVAULT_WORK_DIR', str(tmp_path / 'work'))
    vmid, where = guest_with_files(tmp_path, config_dir)
    dest = tmp_path / 'dest'
    with pytest.raises(PathNotFound, match='/etc/nope is not in filesystem vd0'):
        run_file_restore(request(vmid, where, config_dir, paths=['/etc/hostname', '/etc/nope'],
                                 dest=str(dest)))
    with pytest.raises(SizeLimitExceeded, match=r'1 files, 2097169 bytes, more than max_size'):
        run_file_restore(request(vmid, where, config_dir, paths=['/var'], dest=str(dest),
                                 max_size='1M'))
    assert not dest.exists()
    for options, words in (({'paths': ['/etc/../..']}, "contains '..'"),
                           ({'paths': ['/etc'], 'dest': 'relative/dir'}, 'relative path'),
                           ({'paths': ['/etc', '/home']}, 'listing takes one path'),
                           ({'paths': ['/'], 'max_size': 'lots'}, 'is not a size'),
                           ({'paths': [''], 'dest': str(dest)}, 'a path is empty'),
                           ({'paths': ['/etc'], 'dest': str(dest), 'timeout': -1},
                            'timeout -1 is not'),
                           ({'paths': ['/'], 'dest': str(dest), 'archive': str(tmp_path / 'a')},
                            'mutually exclusive')):
        with pytest.raises(ConfigError, match=words):
            run_file_restore(request(vmid, where, config_dir, **options))
    assert not dest.exists()
    assert os.listdir(tmp_path / 'work') == []       # the overlays and listings are gone too


def test_a_disk_without_a_filesystem_is_named_as_such(tmp_path, config_dir, make_guest):
    (tmp_path / 'dump').mkdir()
    where = {'dumpdir': str(tmp_path / 'dump')}
    guest = make_guest(disks=[('qcow2', 16 * MiB)], vmid=9412)
    guest.write('vd0', 0x5a, 0, 1 * MiB)
    run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket, config_dir=config_dir,
                                        **where))
    with pytest.raises(UnknownFilesystem, match=r'no ext2/3/4, xfs or vfat filesystem found; '
                                                r'found: vd0 \(unknown\)'):
        run_file_restore(request(guest.vmid, where, config_dir, paths=['/']))


def test_an_encrypted_datastore_without_its_key_names_the_key_it_needs_and_gpt_is_found(
        tmp_path, config_dir, datastore_path):
    (tmp_path / 'keys').mkdir(mode=0o700)
    key = create_key(str(tmp_path / 'keys' / 'ds.key'), kdf='none')
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"datastore: enc\n\tpath {datastore_path}\n\tencryption-key {key['path']}\n\n"
                     f"datastore: nokey\n\tpath {datastore_path}\n")
    vmid, _where = guest_with_files(tmp_path, config_dir, vmid=9413, where={'storage': 'enc'},
                                    files={'etc/hostname': b'secret host\n'}, partitioned=True)
    with pytest.raises(EncryptionKeyError, match=key['fingerprint'][:23]):
        run_file_restore(request(vmid, {'storage': 'nokey'}, config_dir, paths=['/etc']))
    # with its key it reads; the one filesystem, on a GPT partition, is found unnamed
    listing = run_file_restore(request(vmid, {'storage': 'enc'}, config_dir, paths=['/etc']))
    assert [e['name'] for e in listing['entries']] == ['hostname']
    assert listing['filesystem'] == 'vd0/part1' and listing['filesystem_type'] == 'ext4'
    assert [fs['name'] for fs in listing['filesystems']] == ['vd0/part1']


def test_the_module_lists_checks_extracts_and_is_idempotent(ansible, tmp_path, config_dir):
    vmid, where = guest_with_files(tmp_path, config_dir)
    base = dict(where, vmid=vmid, config_dir=config_dir)
    listing = ansible.module('guestvault.backup.file_restore', dict(base, path='/etc'))
    assert listing['_status'] == 'ok' and not listing['changed'], listing
    assert {e['name']: e['type'] for e in listing['entries']} == {'app': 'directory',
                                                                  'hostname': 'file'}
    assert set(listing) >= set(documented_return('file_restore')) - {
        'files', 'bytes', 'entries_extracted', 'dest', 'written', 'not_extracted', 'replaced',
        'archive', 'archive_bytes'}
    dest = tmp_path / 'restored'
    args = dict(base, paths=['/etc', '/var/lib/app/data.bin'], dest=str(dest))
    checked = ansible.module('guestvault.backup.file_restore', args, check=True, diff=True)
    assert checked['changed'] and checked['files'] == 3, checked
    assert checked['bytes'] == sum(len(FILES[p]) for p in FILES if not p.startswith('home'))
    assert f"{dest}/etc\n" in checked['diff']['after'] and not dest.exists()
    done = ansible.module('guestvault.backup.file_restore', args)
    assert done['changed'] and done['files'] == 3, done
    for path in ('etc/hostname', 'etc/app/app.conf', 'var/lib/app/data.bin'):
        assert digest(dest / path) == hashlib.sha256(FILES[path]).hexdigest(), path
    assert not [n for n in os.listdir(dest) if n.startswith('.')]
    again = ansible.module('guestvault.backup.file_restore', args)
    assert again['_status'] == 'ok' and not again['changed'], again
    (dest / 'etc' / 'hostname').write_bytes(b'broken\n')
    # one path there, one not: refused without overwrite, nothing changed
    (dest / 'var' / 'lib' / 'app' / 'data.bin').unlink()
    refused = ansible.module('guestvault.backup.file_restore', args)
    assert_failed_with(refused, 'exist(s) already', 'set overwrite')
    assert (dest / 'etc' / 'hostname').read_bytes() == b'broken\n'
    replaced = ansible.module('guestvault.backup.file_restore', dict(args, overwrite=True))
    assert replaced['changed'] and str(dest / 'etc') in replaced['replaced'][0], replaced
    assert (dest / 'etc' / 'hostname').read_bytes() == FILES['etc/hostname']
    assert digest(dest / 'var/lib/app/data.bin') == hashlib.sha256(
        FILES['var/lib/app/data.bin']).hexdigest()
    missing = ansible.module('guestvault.backup.file_restore', dict(base, path='/srv'))
    assert_failed_with(missing, '/srv is not in filesystem vd0')
    # issue 20: ad hoc 'paths=' was taken for /, and timeout=-1 was taken
    for adhoc, words in ((f"paths= dest={dest}-new", 'a path is empty'),
                         (f"path=/etc dest={dest}-new timeout=-1", 'timeout -1.0 is not')):
        refused = ansible.module('guestvault.backup.file_restore',
                                 f"vmid={vmid} dumpdir={where['dumpdir']} "
                                 f"config_dir={config_dir} {adhoc}")
        assert_failed_with(refused, words)
    assert not os.path.exists(f'{dest}-new')


def deep_directories(root, count=18, length=250):
    """Directories nested ``count`` deep, each name ``length`` bytes, with a file at the
    bottom: a path longer than Linux's PATH_MAX (4096 bytes), which a filesystem holds but no
    single system call can name. Made one level at a time through directory descriptors."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for level in range(count):
        name = f'{level:02d}' + 'd' * (length - 2)
        os.mkdir(name, dir_fd=fd)
        child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    with os.fdopen(os.open('deepest', os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), 'wb') as out:
        out.write(b'at the bottom\n')
    os.close(fd)


def test_special_files_are_reported_without_ansible_skipping_the_task_and_tar_speaks_for_itself(
        ansible, tmp_path, config_dir, monkeypatch):
    def special_files(source):
        os.mkfifo(os.path.join(source, 'etc', 'initctl'))
        os.mkdir(os.path.join(source, 'srv'))
        deep_directories(os.path.join(source, 'srv'))
    vmid, where = guest_with_files(tmp_path, config_dir, vmid=9414, prepare=special_files)
    dest = tmp_path / 'restored'
    done = ansible.module('guestvault.backup.file_restore',
                          dict(where, vmid=vmid, config_dir=config_dir, paths=['/etc'],
                               dest=str(dest)))
    # issue 20: the FIFO's name under 'skipped' made Ansible report this task as skipped
    assert done['_status'] == 'ok' and done['changed'], done
    assert done['not_extracted'] == ['etc/initctl'] and 'skipped' not in done, done
    assert any('etc/initctl' in warning for warning in done['warnings']), done
    assert (dest / 'etc' / 'hostname').read_bytes() == FILES['etc/hostname']
    assert not (dest / 'etc' / 'initctl').exists()

    # issue 20: tar failing in the appliance said "is the file system full?"; now tar's words
    monkeypatch.setenv('GUESTVAULT_WORK_DIR', str(tmp_path / 'work'))
    out = tmp_path / 'deep'
    with pytest.raises(FileRestoreError) as failure:
        run_file_restore(request(vmid, where, config_dir, paths=['/srv'], dest=str(out)))
    message = str(failure.value)
    assert 'tar in the file-restore appliance failed' in message, message
    assert 'File name too long' in message and 'full' not in message, message
    assert len(message) < 2000, message
    assert not out.exists() and os.listdir(tmp_path / 'work') == []
