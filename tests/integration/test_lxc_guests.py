"""Containers in the verbs other than backup and restore, on real busybox containers
(tests/integration/lxc_lab.py): guest_info of a running, a stopped and an unknown container;
a suspend capture killed with SIGKILL while the container is frozen, shown by guest_info and
cleared by the node command's --cleanup; guest_registry removing a container's entry; and the
VM-only requests (live restore, file_restore's filesystem) refused for a container's archive
before anything is done. The archives are made as the lead's container backup makes them until
it lands: LxcKind's capture, then write_archive into the dumpdir."""
import os
import pathlib
import sys
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest

from guestvault_engine.errors import ConfigError, GuestNotFound
from guestvault_engine.format.vzdump_archive.writer import write_archive
from guestvault_engine.guest.kind import LxcKind
from guestvault_engine.guest.lxc import leftovers as lxc_leftovers
from guestvault_engine.guest.lxc.container import FROZEN, RUNNING, STOPPED
from guestvault_engine.guest.registry import guest_path, load_guest
from guestvault_engine.run import node_command
from guestvault_engine.run.backup_info import BackupInfoRequest, run_backup_info
from guestvault_engine.run.file_restore import FileRestoreRequest, run_file_restore
from guestvault_engine.run.guest_info import GuestInfoRequest, run_guest_info
from guestvault_engine.run.guest_registry import GuestRegistryRequest, run_guest_registry
from guestvault_engine.run.restore import RestoreRequest, run_restore
from guestvault_engine.storage import vzdump_names
from lxc_lab import create, ensure_running, lxc_directory, needs_lxc, rootfs
from procs import run_bounded

WARM, COLD, UNKNOWN = 811, 812, 813
TOOLS = str(pathlib.Path(__file__).resolve().parents[2] / 'tools')
NO_LEFTOVERS = {'interrupted_run': None, 'frozen': False, 'stopped': False, 'temp_dir': None,
                'snapshots': [], 'partial_backups': []}
# A suspend capture of guest 811 that is killed (SIGKILL, as by the OOM killer or a stop
# timeout) right after it froze the container: it leaves the container frozen, its temporary
# copy and its journal, exactly as a killed backup would.
KILLED_CAPTURE = '''
import os, signal, sys
sys.path.insert(0, {tools!r})
from engine_loader import load_engine
load_engine()
from guestvault_engine.guest.kind import LxcKind
from guestvault_engine.guest.lxc.container import Container
from guestvault_engine.guest.registry import load_guest
freeze = Container.freeze
def freeze_and_die(self):
    freeze(self)
    os.kill(os.getpid(), signal.SIGKILL)
Container.freeze = freeze_and_die
entry, kind = load_guest({config_dir!r}, {vmid}), LxcKind()
with kind.connect(entry) as guest:
    with kind.tree_capture(entry, guest, 'suspend', {{'temp_dir': {temp!r}}}, lambda p: None,
                           print):
        pass
'''


def register(config_dir, vmid, *lines):
    with open(guest_path(config_dir, vmid), 'w') as handle:
        handle.write('\n'.join(lines) + '\n')


def archive_of(config_dir, vmid, dumpdir):
    """An archive of the stopped container of ``vmid`` in ``dumpdir``, named as vzdump names
    it; its path."""
    entry, kind = load_guest(config_dir, vmid), LxcKind()
    path = os.path.join(dumpdir, vzdump_names.archive_name('lxc', vmid,
                                                           datetime.now(timezone.utc)))
    with kind.connect(entry) as guest, kind.tree_capture(
            entry, guest, 'stop', {}, lambda phase: None, lambda line: None) as (tree, _report):
        text, _warnings = kind.pct_conf_text(entry, guest, tree)
        write_archive(tree, path, pct_conf=text, lxc_config=kind.lxc_config_text(guest))
    return path


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    """A running and a stopped container, registered (with an unknown one) in a config dir,
    and a dumpdir holding one archive of the stopped one."""
    needs_lxc()
    work = tmp_path_factory.mktemp('lxc-guests')
    config_dir, dumpdir, data = work / 'config', work / 'dump', work / 'data'
    for path in (config_dir / 'guests.d', dumpdir, data):
        path.mkdir(parents=True)
    (data / 'kept').write_text('a volume backed up with the rootfs\n')
    with lxc_directory() as lxcpath:
        warm, cold = create(lxcpath, 'gvwarm'), create(lxcpath, 'gvcold', start=False)
        register(config_dir, WARM, 'type: lxc', 'lxc: gvwarm', f'lxcpath: {lxcpath}',
                 f'mp0: {data},mp=/data,backup=1', 'mp1: /srv/cache,mp=/cache')
        register(config_dir, COLD, 'name: cold', 'type: lxc', 'lxc: gvcold',
                 f'lxcpath: {lxcpath}')
        register(config_dir, UNKNOWN, 'type: lxc', 'lxc: nosuch', f'lxcpath: {lxcpath}')
        archive = archive_of(str(config_dir), COLD, str(dumpdir))
        yield SimpleNamespace(lxcpath=lxcpath, warm=warm, cold=cold, data=str(data),
                              config_dir=str(config_dir), dumpdir=str(dumpdir),
                              archive=archive)


def info(lab, vmid, **options):
    return run_guest_info(GuestInfoRequest(vmid, config_dir=lab.config_dir, **options))


def test_guest_info_shows_a_running_container_its_trees_and_what_a_backup_leaves_out(lab):
    result = info(lab, WARM, dumpdir=lab.dumpdir)
    assert (result['type'], result['name'], result['status']) == ('lxc', 'gvwarm', RUNNING)
    view = result['container']
    assert (view['name'], view['lxcpath'], view['unprivileged']) == ('gvwarm', lab.lxcpath, False)
    assert view['config'] == os.path.join(lab.lxcpath, 'gvwarm', 'config')
    assert (view['rootfs'], view['rootfs_kind']) == (rootfs(lab.warm), 'dir')
    assert "is not on btrfs" in view['snapshot_problem']
    assert view['volumes'] == [{'key': 'mp0', 'volume': lab.data, 'path': '/data'}]
    # the busybox template's bind mounts of the host's libraries, and mp1 (no backup=1)
    assert {'path': '/usr/lib', 'source': '/usr/lib', 'by': 'lxc.mount.entry'} \
        in view['excluded_mounts']
    assert view['excluded_mounts'][-1] == {'path': '/cache', 'source': '/srv/cache', 'by': 'mp1'}
    assert result['leftovers'] == NO_LEFTOVERS and 'warnings' not in result
    assert result['backups'] == [] and result['storage_path'] == lab.dumpdir
    assert 'disks' not in result and 'qmp_socket' not in result


def test_guest_info_shows_a_stopped_container_and_its_archive(lab):
    result = info(lab, COLD, dumpdir=lab.dumpdir)
    assert (result['name'], result['status']) == ('cold', STOPPED)
    assert lab.cold.state() == STOPPED          # looked at, not started
    (backup,) = result['backups']
    assert (backup['archive'], backup['format'], backup['level']) == (
        os.path.basename(lab.archive), 'vzdump', 'full')
    assert result['container']['volumes'] == [] and result['leftovers'] == NO_LEFTOVERS


def test_guest_info_of_an_unknown_container_says_how_to_list_them(lab):
    with pytest.raises(GuestNotFound) as error:
        info(lab, UNKNOWN)
    assert f"no LXC container 'nosuch' in {lab.lxcpath}" in str(error.value)
    assert f"lxc-ls -f -P {lab.lxcpath}" in str(error.value)


def test_a_killed_suspend_capture_is_shown_by_guest_info_and_cleared_by_cleanup(
        lab, tmp_path, capsys):
    temp = str(tmp_path / 'copy')
    # the archive the killed run was writing, as vzdump names it while it is written
    partial = os.path.join(lab.dumpdir, vzdump_names.dat_name(vzdump_names.archive_name(
        'lxc', WARM, datetime.now(timezone.utc))))
    script = KILLED_CAPTURE.format(tools=TOOLS, config_dir=lab.config_dir, vmid=WARM, temp=temp)
    try:
        proc = run_bounded([sys.executable, '-c', script], 300, capture_output=True, text=True)
        assert proc.returncode == -9, proc.stderr
        with open(partial, 'wb') as handle:
            handle.write(b'\0' * 4096)
        assert lab.warm.state() == FROZEN and os.path.isdir(os.path.join(temp, 'rootfs'))

        result = info(lab, WARM, dumpdir=lab.dumpdir)
        left = result['leftovers']
        assert result['status'] == FROZEN
        assert left['interrupted_run']['mode'] == 'suspend'
        assert left['interrupted_run']['container'] == 'gvwarm'
        assert (left['frozen'], left['stopped'], left['temp_dir']) == (True, False, temp)
        assert left['partial_backups'] == [partial]
        (warning,) = result['warnings']
        assert warning.startswith(f"a killed backup of guest {WARM} left container gvwarm "
                                  f"frozen, the temporary copy {temp}, the partial archive(s) "
                                  f"{partial}")
        assert warning.endswith(f"clear it with 'guestvault-dump --cleanup {WARM}' on this node")

        capsys.readouterr()
        assert node_command.main(['--cleanup', str(WARM), '--dumpdir', lab.dumpdir,
                                  '--config-dir', lab.config_dir]) == 0
        said = capsys.readouterr().out
        assert f"{WARM}: container gvwarm was left frozen by a killed backup; thawing it" in said
        assert f"removing the temporary copy {temp}" in said
        assert lab.warm.state() == RUNNING
        assert not os.path.exists(temp) and not os.path.exists(partial)
        assert lxc_leftovers.leftovers(WARM) is None
        after = info(lab, WARM, dumpdir=lab.dumpdir)
        assert after['leftovers'] == NO_LEFTOVERS and 'warnings' not in after
        # a second clean-up finds nothing
        assert node_command.main(['--cleanup', str(WARM), '--config-dir', lab.config_dir]) == 0
        assert f"{WARM}: nothing left over" in capsys.readouterr().out
    finally:
        ensure_running(lab.warm)
        lxc_leftovers.forget(WARM)
        if os.path.exists(partial):
            os.unlink(partial)


def test_cleanup_clears_the_files_of_a_killed_capture_whose_container_is_gone(
        lab, tmp_path, capsys):
    temp = tmp_path / 'copy'
    (temp / 'rootfs').mkdir(parents=True)
    lxc_leftovers.record(UNKNOWN, container='nosuch', lxcpath=lab.lxcpath, mode='suspend',
                         temp_dir=str(temp))
    assert node_command.main(['--cleanup', str(UNKNOWN), '--config-dir', lab.config_dir]) == 0
    assert not temp.exists() and lxc_leftovers.leftovers(UNKNOWN) is None


def test_guest_registry_absent_forgets_a_container_and_leaves_it_and_its_archives(lab, tmp_path):
    config_dir = tmp_path / 'config'
    (config_dir / 'guests.d').mkdir(parents=True)
    entry = open(guest_path(lab.config_dir, COLD)).read()
    register(str(config_dir), COLD, entry.strip())
    request = GuestRegistryRequest(vmid=COLD, state='absent', config_dir=str(config_dir))
    checked = run_guest_registry(GuestRegistryRequest(**dict(vars(request), check_mode=True)))
    assert checked['changed'] and os.path.exists(guest_path(str(config_dir), COLD))
    result = run_guest_registry(request)
    assert result['changed'] and result['diff']['before'] == entry and result['diff']['after'] == ''
    assert not os.path.exists(guest_path(str(config_dir), COLD))
    assert not run_guest_registry(request)['changed']
    # the container and its archive stay: the registry only said how to reach it
    assert lab.cold.state() == STOPPED
    assert os.path.isfile(os.path.join(rootfs(lab.cold), 'bin', 'busybox'))
    listed = run_backup_info(BackupInfoRequest(vmid=COLD, dumpdir=lab.dumpdir))['backups']
    assert [b['archive'] for b in listed] == [os.path.basename(lab.archive)]
    with pytest.raises(GuestNotFound, match=f"guest {COLD} is not registered"):
        run_guest_info(GuestInfoRequest(COLD, config_dir=str(config_dir)))


def test_live_restore_of_a_containers_archive_is_refused_before_anything_is_made(lab, tmp_path):
    target = tmp_path / 'target'
    # refused as the archive is resolved (run/restore.py), before the live machinery
    with pytest.raises(ConfigError, match=rf"live cannot be used with vzdump-lxc-{COLD}-.*this "
                       r"is a container's archive, restored into a new LXC container"):
        run_restore(RestoreRequest(vmid=COLD, target_dir=str(target), dumpdir=lab.dumpdir,
                                   config_dir=lab.config_dir, live=True))
    assert not target.exists()


def test_file_restore_of_a_containers_archive_refuses_a_filesystem(lab, tmp_path):
    dest = tmp_path / 'dest'
    with pytest.raises(ConfigError, match=r"filesystem 'sda1' names a file system on a VM's "
                       r"disk, and backup vzdump-lxc-812-.* is a container's archive.*leave "
                       r"filesystem out"):
        run_file_restore(FileRestoreRequest(vmid=COLD, dumpdir=lab.dumpdir,
                                            config_dir=lab.config_dir, filesystem='sda1',
                                            paths=['/etc'], dest=str(dest)))
    assert not dest.exists()
    listed = run_file_restore(FileRestoreRequest(vmid=COLD, dumpdir=lab.dumpdir,
                                                 config_dir=lab.config_dir, paths=['/bin']))
    assert any(entry['name'] == 'busybox' for entry in listed['entries'])


def test_the_guest_info_module_shows_a_container(lab, ansible):
    result = ansible.module('guestvault.backup.guest_info', {
        'vmid': COLD, 'config_dir': lab.config_dir, 'dumpdir': lab.dumpdir})
    assert not result.get('failed'), result.get('msg')
    assert (result['type'], result['status'], result['changed']) == ('lxc', STOPPED, False)
    assert result['container']['rootfs'] == rootfs(lab.cold)
    assert [b['archive'] for b in result['backups']] == [os.path.basename(lab.archive)]
