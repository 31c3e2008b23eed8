"""guest_backup of LXC containers (issue 22), on real busybox containers
(tests/integration/lxc_lab.py): vzdump's archive in a dumpdir and in a dir: storage's dump/,
in stop, suspend and snapshot (falling back to suspend on a directory) mode, with a writer
inside the container; the archive is read back with plain GNU tar and pct restore's flags, and
every file the journal lists before the freeze is whole in it. Also --stdout, exclusions, notes,
protection, the log beside the archive, and the bad inputs of the issue."""
import os
import subprocess
import tarfile

import pytest

from guestvault_engine.errors import ConfigError, GuestNotFound, GuestvaultError
from guestvault_engine.guest.lxc.container import RUNNING
from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.run.prune import PruneRequest, run_prune
from guestvault_engine.storage import vzdump_names
from lxc_lab import (attach, check_journal, create, host_library_file, lxc_directory,
                     needs_lxc, start_writer, stop_writer, wait_for_journal)
from procs import run_bounded

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VMID = 777
PCT_FLAGS = ['--one-file-system', '-p', '--sparse', '--numeric-owner', '--acls', '--xattrs',
             '--xattrs-include=user.*', '--xattrs-include=security.capability']


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    """A running busybox container with data and a writer, registered as guest 777."""
    needs_lxc()
    base = tmp_path_factory.mktemp('ctbackup')
    with lxc_directory() as lxcpath:
        container = create(lxcpath, 'gvct')
        attach(container, 'mkdir -p /data/keep /var/cache/big /tmp/scratch && '
                          'echo hello > /data/keep/a && ln -s a /data/keep/link && '
                          'echo cache > /var/cache/big/c && echo t > /tmp/scratch/t && '
                          'echo pid > /var/run/x.pid')
        config_dir = base / 'etc'
        (config_dir / 'guests.d').mkdir(parents=True)
        (config_dir / 'guests.d' / f'{VMID}.conf').write_text(
            f"type: lxc\nlxc: gvct\nlxcpath: {lxcpath}\nname: web\n")
        start_writer(container, '/data/w')
        wait_for_journal(container, '/data/w', 5)
        yield container, str(config_dir), base
        stop_writer(container, '/data/w')


def backup(lab, dumpdir, **options):
    _container, config_dir, _base = lab
    os.makedirs(dumpdir, exist_ok=True)
    return run_guest_backup(GuestBackupRequest(vmid=VMID, dumpdir=str(dumpdir),
                                               config_dir=config_dir, **options))


def extract_as_pct_restore(archive, dest):
    """Plain GNU tar with pct restore's flags (FACTS.md): what Proxmox VE would do."""
    os.makedirs(dest)
    proc = subprocess.run(['tar', 'xpf', archive, '--totals', *PCT_FLAGS, '-C', str(dest),
                           '--skip-old-files', '--anchored', '--exclude', './dev/*'],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return str(dest)


def first_member(archive):
    proc = subprocess.run(f"tar tf {archive} | head -1", shell=True, capture_output=True,
                          text=True, timeout=600, check=False)
    return proc.stdout.strip()


def test_suspend_mode_archive_is_consistent_and_pct_restore_reads_it(lab):
    container, config_dir, base = lab
    dumpdir = base / 'dump-suspend'
    result = backup(lab, dumpdir, mode='suspend', bwlimit=4096, compress='zstd',
                    exclude_path=['/var/cache/*'], notes_template='{{guestname}} on {{node}}',
                    protected=True)
    name = os.path.basename(result['archive'])
    parsed = vzdump_names.parse(name)
    assert (parsed.type, parsed.vmid, parsed.compression) == ('lxc', VMID, 'zst')
    assert result['mode'] == 'suspend' and result['frozen_seconds'] is not None
    assert result['backup'] == name and result['type'] == 'lxc'
    # beside the archive, PVE's companions (vm/777/ holds the guest's storage lock only)
    assert sorted(os.listdir(dumpdir)) == sorted(
        [name, parsed.log_name, parsed.notes_name, parsed.protected_name, 'vm'])
    assert os.listdir(dumpdir / 'vm' / str(VMID)) == ['.lock']
    assert (dumpdir / parsed.notes_name).read_text().startswith('web on ')
    assert 'starting backup of CT 777' in (dumpdir / parsed.log_name).read_text()
    assert first_member(result['archive']) == './etc/vzdump/pct.conf'
    assert container.state() == RUNNING
    tree = extract_as_pct_restore(result['archive'], base / 'suspend-tree')
    assert check_journal(tree, '/data/w') >= 5
    assert open(os.path.join(tree, 'data/keep/a')).read() == 'hello\n'
    assert os.readlink(os.path.join(tree, 'data/keep/link')) == 'a'
    # exclude-path and stdexcludes: the directories stay, their contents do not
    assert os.path.isdir(os.path.join(tree, 'var/cache/big')) is False or \
        not os.listdir(os.path.join(tree, 'var/cache'))
    assert not os.listdir(os.path.join(tree, 'tmp'))
    assert not os.path.exists(os.path.join(tree, 'var/run/x.pid'))
    # the host's libraries, bind-mounted into the busybox container, are not in it
    assert not os.path.exists(os.path.join(tree, host_library_file().lstrip('/')))
    pct = open(os.path.join(tree, 'etc/vzdump/pct.conf')).read()
    assert 'arch: amd64' in pct and 'rootfs:' in pct and 'ostype: unmanaged' in pct  # busybox
    # backup_info and prune see the archive like any backup; protected is kept
    info = run_backup_info(BackupInfoRequest(VMID, dumpdir=str(dumpdir), config_dir=config_dir))
    [listed] = info['backups']
    assert listed['archive'] == name and listed['protected'] and listed['notes']
    pruned = run_prune(PruneRequest(vmid=VMID, dumpdir=str(dumpdir), config_dir=config_dir,
                                    prune_backups='keep-last=0'))
    assert pruned['removed'] == [] and os.path.exists(result['archive'])


def test_stop_mode_restarts_the_container_and_a_dir_storage_keeps_dump(lab):
    container, config_dir, base = lab
    store = base / 'store'
    store.mkdir()
    with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
        handle.write(f"dir: local\n\tpath {store}\n")
    result = run_guest_backup(GuestBackupRequest(vmid=VMID, storage='local',
                                                 config_dir=config_dir, mode='stop',
                                                 compress='gzip'))
    assert result['archive'].startswith(str(store / 'dump') + '/')
    assert result['archive'].endswith('.tar.gz') and result['downtime_seconds'] > 0
    assert container.state() == RUNNING
    tree = extract_as_pct_restore(result['archive'], base / 'stop-tree')
    assert open(os.path.join(tree, 'data/keep/a')).read() == 'hello\n'
    # stopped cleanly: every journaled file is whole
    assert check_journal(tree, '/data/w') >= 5
    # the writer was stopped with the container: start it again for the next tests
    start_writer(container, '/data/w2')


def test_snapshot_mode_on_a_directory_falls_back_to_suspend(lab):
    container, _config_dir, base = lab
    result = backup(lab, base / 'dump-snap', mode='snapshot', compress='0')
    assert result['mode'] == 'suspend' and result['archive'].endswith('.tar')
    assert any("mode failure" in w and "trying 'suspend' mode instead" in w
               for w in result['warnings'])
    assert container.state() == RUNNING
    with tarfile.open(result['archive']) as archive:
        assert archive.getnames()[0] == './etc/vzdump/pct.conf'


def test_check_mode_and_max_age_write_nothing(lab):
    _container, _config_dir, base = lab
    dumpdir = base / 'dump-check'
    planned = backup(lab, dumpdir, check_mode=True)
    assert planned['changed'] and planned['backup'].startswith('vzdump-lxc-777-')
    assert os.listdir(dumpdir) in ([], ['vm'])
    backup(lab, dumpdir, mode='suspend')
    again = backup(lab, dumpdir, mode='suspend', max_age='1h')
    assert not again['changed'] and 'younger than max_age' in again['skipped_reason']
    assert len([n for n in os.listdir(dumpdir) if vzdump_names.parse(n)]) == 1


def test_stdout_writes_the_archive_alone(lab):
    container, config_dir, base = lab
    out = base / 'stdout.tar.zst'
    with open(out, 'wb') as handle:
        proc = run_bounded([os.path.join(ROOT, 'bin', 'guestvault-dump'), str(VMID), '--stdout',
                            '--mode', 'suspend', '--compress', 'zstd', '--config-dir',
                            config_dir, '--dumpdir', str(base / 'unused')],
                           600, stdout=handle, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 0, proc.stderr
    assert 'bytes written to standard output' in proc.stderr
    assert first_member(out) == './etc/vzdump/pct.conf'
    assert not os.path.exists(base / 'unused')
    assert container.state() == RUNNING
    # two guests to one stdout: refused before anything runs
    proc = run_bounded([os.path.join(ROOT, 'bin', 'guestvault-dump'), str(VMID), '778',
                        '--stdout', '--config-dir', config_dir],
                       600, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2 and 'writes one guest' in proc.stderr and not proc.stdout


def test_bad_input_changes_nothing_and_leaves_the_container_running(lab, tmp_path):
    container, config_dir, base = lab
    dumpdir = base / 'dump-bad'
    with pytest.raises(ConfigError, match='matches every file'):
        backup(lab, dumpdir, exclude_path=['/*'])
    with pytest.raises(ConfigError, match='always full and in no chain'):
        backup(lab, dumpdir, level='inc')
    assert os.listdir(dumpdir) in ([], ['vm'])
    # tmpdir on a full file system: a clear error, no .dat, the container running
    from lab_checks import small_tmpfs
    with small_tmpfs(tmp_path / 'full', '1M') as full:
        with pytest.raises(GuestvaultError) as failed:
            backup(lab, dumpdir, mode='suspend', tmpdir=str(full))
    assert 'space' in str(failed.value).lower() or 'full' in str(failed.value).lower()
    assert os.listdir(dumpdir) in ([], ['vm']) and container.state() == RUNNING
    # an unknown container
    entry = os.path.join(config_dir, 'guests.d', '779.conf')
    with open(entry, 'w') as handle:
        handle.write(f"type: lxc\nlxc: nosuch\nlxcpath: {container.lxcpath}\n")
    try:
        with pytest.raises(GuestNotFound, match='nosuch'):
            run_guest_backup(GuestBackupRequest(vmid=779, dumpdir=str(dumpdir),
                                                config_dir=config_dir))
    finally:
        os.unlink(entry)
    assert os.listdir(dumpdir) in ([], ['vm'])


def test_file_restore_reads_a_container_archive_without_the_appliance(lab, tmp_path):
    from guestvault_engine.restore.file_restore import PathNotFound, SizeLimitExceeded
    from guestvault_engine.run.file_restore import FileRestoreRequest, run_file_restore
    container, config_dir, base = lab
    dumpdir = base / 'dump-files'
    attach(container, 'mkdir -p /data/sub && echo one > /data/sub/one && '
                      'echo two > /data/sub/two && chmod 4755 /data/sub/two')
    backup(lab, dumpdir, mode='suspend', compress='zstd')

    def files(**options):
        return run_file_restore(FileRestoreRequest(VMID, config_dir=config_dir,
                                                   dumpdir=str(dumpdir), **options))
    listing = files(paths=['/data/sub'])
    assert not listing['changed']
    assert {e['name']: e['type'] for e in listing['entries']} == {'one': 'file', 'two': 'file'}
    assert {e['name']: e['mode'] for e in listing['entries']}['two'] == '4755'
    planned = files(paths=['/data/sub'], dest=str(tmp_path / 'out'), check_mode=True)
    assert planned['changed'] and planned['files'] == 2 and not (tmp_path / 'out').exists()
    done = files(paths=['/data/sub', '/data/keep/a'], dest=str(tmp_path / 'out'))
    assert done['changed'] and done['files'] == 3
    assert (tmp_path / 'out' / 'data' / 'sub' / 'one').read_text() == 'one\n'
    assert (tmp_path / 'out' / 'data' / 'keep' / 'a').read_text() == 'hello\n'
    assert not os.stat(tmp_path / 'out' / 'data' / 'sub' / 'two').st_mode & 0o4000  # setuid gone
    again = files(paths=['/data/sub'], dest=str(tmp_path / 'out'))
    assert not again['changed']
    tar_out = tmp_path / 'sub.tar'
    written = files(paths=['/data/sub'], archive=str(tar_out))
    assert written['changed'] and written['archive_bytes'] == tar_out.stat().st_size
    with tarfile.open(tar_out) as archive:
        assert sorted(n for n in archive.getnames() if n.endswith(('one', 'two'))) == \
            ['./data/sub/one', './data/sub/two']
    with pytest.raises(PathNotFound):
        files(paths=['/no/such'], dest=str(tmp_path / 'none'))
    with pytest.raises(SizeLimitExceeded):
        files(paths=['/data'], dest=str(tmp_path / 'small'), max_size=1)
    assert not (tmp_path / 'none').exists() and not (tmp_path / 'small').exists()


def test_an_unprivileged_container_round_trips_through_guest_backup_and_restore(
        lab, tmp_path, ansible):
    """guest_backup (the Ansible module, stop mode, a hook script) -> an archive of container ids
    -> restore to a new vmid -> the new container starts and holds the files, host ids again."""
    from guestvault_engine.run.restore import RestoreRequest, run_restore
    container, config_dir, base = lab
    unpriv = create(container.lxcpath, 'gvctu', unprivileged=True)
    attach(unpriv, 'mkdir -p /srv/app && echo data > /srv/app/f && chown 1000:1000 /srv/app/f '
                   '&& ln /srv/app/f /srv/app/hard && ln -s f /srv/app/soft')
    (base / 'etc' / 'guests.d' / '780.conf').write_text(
        f"type: lxc\nlxc: gvctu\nlxcpath: {container.lxcpath}\n")
    hook = tmp_path / 'hook.sh'
    phases = tmp_path / 'phases'
    hook.write_text(f"#!/bin/sh\necho \"$1 $2 $3 $VMTYPE ${{TARFILE##*/}}\" >> {phases}\n")
    hook.chmod(0o755)
    dumpdir = base / 'dump-unpriv'
    dumpdir.mkdir()
    result = ansible.module('guestvault.backup.guest_backup', {
        'vmid': 780, 'dumpdir': str(dumpdir), 'config_dir': config_dir, 'mode': 'stop',
        'compress': 'zstd', 'script': str(hook)})
    assert result['changed'] and result['type'] == 'lxc', result
    assert result['downtime_seconds'] > 0 and unpriv.state() == RUNNING
    name = os.path.basename(result['archive'])
    lines = phases.read_text().splitlines()
    assert [line.split()[0] for line in lines] == ['backup-start', 'pre-stop', 'pre-restart',
                                                   'post-restart', 'backup-end', 'log-end']
    assert all(line.split()[1:4] == ['stop', '780', 'lxc'] for line in lines)
    assert lines[0].split()[4] == name
    plain = tmp_path / 'archive.tar'
    subprocess.run(['zstd', '-q', '-d', result['archive'], '-o', str(plain)], check=True,
                   timeout=600)
    with tarfile.open(plain) as archive:        # the container's own ids
        member = archive.getmember('./srv/app/f')
        assert (member.uid, member.gid) == (1000, 1000)
        assert archive.getmember('./etc/vzdump/pct.conf').uid == 0
        pct = archive.extractfile('./etc/vzdump/pct.conf').read().decode()
    assert 'unprivileged: 1' in pct and 'lxc.idmap: u 0 100000 65536' in pct
    restored = run_restore(RestoreRequest(vmid=780, dumpdir=str(dumpdir), config_dir=config_dir,
                                          new_vmid=781, lxcpath=container.lxcpath, start=True))
    assert restored['started'] and restored['unprivileged']
    root = restored['rootfs']
    assert open(os.path.join(root, 'srv/app/f')).read() == 'data\n'
    assert (os.stat(os.path.join(root, 'srv/app/f')).st_uid,
            os.stat(os.path.join(root, 'srv/app/f')).st_gid) == (101000, 101000)
    assert os.path.samefile(os.path.join(root, 'srv/app/f'), os.path.join(root, 'srv/app/hard'))
    assert os.readlink(os.path.join(root, 'srv/app/soft')) == 'f'
    from guestvault_engine.guest.lxc.container import Container
    copy = Container(restored['lxc_name'], container.lxcpath)
    assert copy.state() == RUNNING
    assert attach(copy, 'cat /srv/app/f') == 'data\n'
