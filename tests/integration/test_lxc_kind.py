"""The lxc guest kind on real busybox containers (tests/integration/lxc_lab.py): vzdump's stop,
suspend and snapshot modes yield the container's tree at one point in time and leave the
container running; a writer inside keeps writing checksummed files and a journal, and every
file the captured journal lists is whole in the captured tree. The host's libraries, which the
busybox template bind-mounts into the container, are never in a tree."""
import os
import subprocess
from contextlib import contextmanager

import pytest

from guestvault_engine.errors import ContainerError, GuestNotFound, StorageError
from guestvault_engine.guest.kind import LxcKind, guest_kind
from guestvault_engine.guest.lxc import leftovers
from guestvault_engine.guest.lxc.container import FROZEN, RUNNING, STOPPED
from guestvault_engine.guest.registry import GuestEntry, MountPoint
from lab_checks import small_tmpfs
from lxc_lab import (attach, btrfs_mount, check_journal, create, ensure_running, host_ids,
                     host_library_file, lxc_directory, needs_lxc, rootfs, start_writer,
                     stop_writer, wait_for_journal)

BWLIMIT = 512        # KiB/s: the first copy spans a few seconds of the writer's writes


@pytest.fixture(scope='module')
def lxcpath():
    needs_lxc()
    with lxc_directory() as path:
        yield path


@pytest.fixture(scope='module')
def privileged(lxcpath):
    return create(lxcpath, 'gvpriv')


@pytest.fixture(scope='module')
def unprivileged(lxcpath):
    return create(lxcpath, 'gvunpriv', unprivileged=True)


@pytest.fixture(scope='module')
def on_btrfs():
    needs_lxc()
    with btrfs_mount() as mount, lxc_directory(mount) as path:
        yield create(path, 'gvbtrfs', backing='btrfs')


def entry_for(container, vmid=801, **fields):
    return GuestEntry(vmid=vmid, type='lxc', lxc=container.name, lxcpath=container.lxcpath,
                      **fields)


@contextmanager
def capture(entry, mode, options, hooks=None, lines=None, hook=None):
    """kind.tree_capture of ``entry``, hooks and log lines recorded into the lists."""
    kind = guest_kind(entry)
    hook = hook or (hooks if hooks is not None else []).append
    with kind.connect(entry) as guest, kind.tree_capture(
            entry, guest, mode, options, hook,
            (lines if lines is not None else []).append) as result:
        yield result


def assert_no_host_libraries(tree):
    assert not os.path.exists(os.path.join(tree, host_library_file()))
    assert os.listdir(os.path.join(tree, 'usr/lib')) == []


def test_stop_mode_stops_archives_the_rootfs_and_starts_again(privileged):
    entry, hooks, phases_seen = entry_for(privileged), [], []
    with capture(entry, 'stop', {'stopwait': 2}, hooks) as (tree, report):
        phases_seen = list(hooks)
        assert privileged.state() == STOPPED
        assert tree.root == rootfs(privileged) and tree.volumes == [] and tree.id_map == []
        assert_no_host_libraries(tree.root)
    assert phases_seen == ['pre-stop']
    assert hooks == ['pre-stop', 'pre-restart', 'post-restart']
    assert privileged.state() == RUNNING
    assert report.mode == 'stop' and report.downtime_seconds > 0
    assert leftovers.leftovers(801) is None


def test_suspend_mode_copies_a_consistent_tree_and_thaws(privileged, tmp_path):
    start_writer(privileged, '/data/suspend')
    try:
        wait_for_journal(privileged, '/data/suspend', 20)
        temp = str(tmp_path / 'copy')
        hooks, lines = [], []
        with capture(entry_for(privileged), 'suspend', {'temp_dir': temp, 'bwlimit': BWLIMIT},
                     hooks, lines) as (tree, report):
            assert privileged.state() == RUNNING
            assert tree.root == os.path.join(temp, 'rootfs')
            assert check_journal(tree.root, '/data/suspend') >= 20
            assert_no_host_libraries(tree.root)
        assert not os.path.exists(temp)
        assert report.mode == 'suspend' and report.frozen_seconds is not None
        assert hooks == ['pre-stop', 'pre-restart', 'post-restart']
        assert any(line.startswith('starting final sync') for line in lines)
        assert privileged.state() == RUNNING
    finally:
        stop_writer(privileged, '/data/suspend')


def test_suspend_mode_thaws_and_cleans_up_when_the_archiving_fails(privileged, tmp_path):
    temp = str(tmp_path / 'copy')
    with pytest.raises(RuntimeError, match='archiving failed'):
        with capture(entry_for(privileged), 'suspend', {'temp_dir': temp}):
            raise RuntimeError('archiving failed')
    assert privileged.state() == RUNNING
    assert not os.path.exists(temp) and leftovers.leftovers(801) is None


def test_snapshot_mode_on_btrfs_yields_a_read_only_snapshot_removed_after(on_btrfs):
    start_writer(on_btrfs, '/data/snap')
    try:
        wait_for_journal(on_btrfs, '/data/snap', 20)
        hooks = []
        with capture(entry_for(on_btrfs), 'snapshot', {}, hooks) as (tree, report):
            snapshot = tree.root
            assert snapshot != rootfs(on_btrfs) and on_btrfs.state() == RUNNING
            read_only = subprocess.run(['btrfs', 'property', 'get', '-ts', snapshot, 'ro'],
                                       capture_output=True, text=True, check=True).stdout
            assert read_only.strip() == 'ro=true'
            with pytest.raises(OSError):
                open(os.path.join(snapshot, 'probe'), 'w')
            assert check_journal(snapshot, '/data/snap') >= 20
            assert_no_host_libraries(snapshot)
        assert not os.path.exists(snapshot)
        assert report.mode == 'snapshot' and report.frozen_seconds is not None
        assert report.warnings == [] and hooks == ['pre-stop', 'pre-restart', 'post-restart']
        assert on_btrfs.state() == RUNNING
    finally:
        stop_writer(on_btrfs, '/data/snap')


def test_snapshot_mode_on_a_directory_falls_back_to_suspend(privileged, tmp_path):
    lines = []
    with capture(entry_for(privileged), 'snapshot', {'temp_dir': str(tmp_path / 'c')},
                 lines=lines) as (tree, report):
        assert tree.root == str(tmp_path / 'c' / 'rootfs')
    assert report.mode == 'suspend'
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith(f"mode failure - '{rootfs(privileged)}' is not on "
                                         "btrfs")
    assert report.warnings[0].endswith("trying 'suspend' mode instead")
    assert "trying 'suspend' mode instead" in lines


def test_included_volumes_are_captured_and_mount_entries_are_not(lxcpath, tmp_path):
    volume = tmp_path / 'volume'
    volume.mkdir()
    (volume / 'kept').write_text('in the volume')
    skipped = tmp_path / 'skipped'
    skipped.mkdir()
    container = create(lxcpath, 'gvvolumes', extra=[
        f"lxc.mount.entry = {volume} srv/data none bind,create=dir 0 0",
        f"lxc.mount.entry = {skipped} srv/skipped none bind,create=dir 0 0"])
    entry = entry_for(container, mountpoints=(
        MountPoint('mp0', str(volume), '/srv/data', backup=True),
        MountPoint('mp1', str(skipped), '/srv/skipped', backup=False)))
    assert attach(container, 'cat /srv/data/kept') == 'in the volume'
    with capture(entry, 'suspend', {'temp_dir': str(tmp_path / 'c')}) as (tree, report):
        copy = tree.volumes[0][1]
        assert tree.volumes == [('/srv/data', str(tmp_path / 'c' / 'volume0'))]
        assert open(os.path.join(copy, 'kept')).read() == 'in the volume'
        assert os.listdir(os.path.join(tree.root, 'srv/data')) == []
        assert report.mode == 'suspend'
    with capture(entry, 'stop', {'stopwait': 2}) as (tree, report):
        assert tree.volumes == [('/srv/data', str(volume))] and report.mode == 'stop'


def test_an_unprivileged_tree_keeps_the_host_ids(unprivileged, tmp_path):
    with capture(entry_for(unprivileged), 'suspend',
                 {'temp_dir': str(tmp_path / 'c')}) as (tree, report):
        assert host_ids(tree.root, 'bin/busybox') == (100000, 100000)
        assert host_ids(tree.root, '.') == (100000, 100000)
        assert tree.id_map == [('u', 0, 100000, 65536), ('g', 0, 100000, 65536)]
    assert unprivileged.state() == RUNNING and report.mode == 'suspend'


def test_a_stopped_container_is_backed_up_in_stop_mode_without_being_started(lxcpath):
    cold = create(lxcpath, 'gvcold', start=False)
    hooks = []
    with capture(entry_for(cold), 'suspend', {'temp_dir': '/nonexistent/x'},
                 hooks) as (tree, report):
        assert tree.root == rootfs(cold)
    assert report.mode == 'stop' and report.downtime_seconds is None
    assert report.warnings == ["container gvcold is STOPPED, not running: backed up in stop "
                               "mode instead of suspend, as vzdump does"]
    assert hooks == [] and cold.state() == STOPPED


def test_an_unknown_container_names_the_lxcpath_and_how_to_list(lxcpath):
    entry = GuestEntry(vmid=801, type='lxc', lxc='nosuch', lxcpath=lxcpath)
    with pytest.raises(GuestNotFound) as error:
        with LxcKind().connect(entry):
            pytest.fail('an unknown container must not connect')
    assert f"no LXC container 'nosuch' in {lxcpath}" in str(error.value)
    assert f"lxc-ls -f -P {lxcpath}" in str(error.value)


def test_a_container_stopped_while_being_frozen_fails_with_no_half_state(privileged, tmp_path):
    temp = str(tmp_path / 'copy')

    def hook(phase):
        if phase == 'pre-stop':          # right before the freeze
            subprocess.run(['lxc-stop', '-k', '-P', privileged.lxcpath, '-n', privileged.name],
                           check=True, timeout=600)
    try:
        with pytest.raises(ContainerError, match=r"container gvpriv could not be frozen: it is "
                           r"STOPPED .*no backup was taken"):
            with capture(entry_for(privileged), 'suspend', {'temp_dir': temp}, hook=hook):
                pytest.fail('the capture must not be yielded')
        assert privileged.state() == STOPPED
        assert not os.path.exists(temp) and leftovers.leftovers(801) is None
    finally:
        ensure_running(privileged)


def test_a_full_tmpdir_is_a_clear_error_and_leaves_nothing(privileged, tmp_path):
    with small_tmpfs(tmp_path / 'small', '1M') as small:
        temp = os.path.join(small, 'copy')
        with pytest.raises(StorageError, match=r"the temporary directory .*/copy is full.*set "
                           r"tmpdir to a directory with room"):
            with capture(entry_for(privileged), 'suspend', {'temp_dir': temp}):
                pytest.fail('the capture must not be yielded')
        assert os.listdir(small) == []
    assert privileged.state() == RUNNING and leftovers.leftovers(801) is None


def test_leftovers_of_a_killed_run_are_cleared(privileged, tmp_path):
    # what SIGKILL leaves in suspend mode: the container frozen, the copy, the journal
    temp = tmp_path / 'copy'
    (temp / 'rootfs').mkdir(parents=True)
    privileged.freeze()
    try:
        leftovers.record(801, container=privileged.name, lxcpath=privileged.lxcpath,
                         mode='suspend', temp_dir=str(temp))
        assert leftovers.leftovers(801)['temp_dir'] == str(temp)
        lines = []
        assert leftovers.clear_leftovers(801, lines.append)['mode'] == 'suspend'
        assert privileged.state() == RUNNING and not temp.exists()
        assert leftovers.leftovers(801) is None and len(lines) == 2
        # and in stop mode: the container stopped and not started again
        subprocess.run(['lxc-stop', '-P', privileged.lxcpath, '-n', privileged.name],
                       check=True, timeout=600)
        leftovers.record(801, container=privileged.name, lxcpath=privileged.lxcpath,
                         mode='stop', restart=True)
        leftovers.clear_leftovers(801, lines.append)
        assert privileged.state() == RUNNING
    finally:
        ensure_running(privileged)


def freezer_state(container):
    return subprocess.run(['lxc-cgroup', '-P', container.lxcpath, '-n', container.name,
                           'freezer.state'], capture_output=True, text=True, check=True,
                          timeout=300).stdout.strip()


def test_a_busy_container_is_frozen_whole_and_runs_on_after_the_thaw(privileged):
    # the writer keeps a task busy, so the freezer passes through FREEZING (where lxc-freeze
    # would sleep a second on a cgroup v1 freezer; freeze reads the state itself instead)
    start_writer(privileged, '/data/busy')
    try:
        wait_for_journal(privileged, '/data/busy', 5)
        privileged.freeze()
        try:
            assert privileged.state() == FROZEN and freezer_state(privileged) == FROZEN
            journal = os.path.join(rootfs(privileged), 'data/busy.journal')
            lines = len(open(journal).read().splitlines())
        finally:
            privileged.thaw()
        assert privileged.state() == RUNNING and freezer_state(privileged) == 'THAWED'
        wait_for_journal(privileged, '/data/busy', lines + 3)
    finally:
        stop_writer(privileged, '/data/busy')


def test_thaw_undoes_a_freeze_cut_short_before_lxc_recorded_it(privileged):
    # what a signal between freeze's lxc-cgroup and its lxc-freeze leaves: the freezer
    # FROZEN, LXC's record (lxc-info, lxc-unfreeze) RUNNING
    subprocess.run(['lxc-cgroup', '-P', privileged.lxcpath, '-n', privileged.name,
                    'freezer.state', FROZEN], check=True, timeout=300)
    try:
        assert privileged.state() == RUNNING and freezer_state(privileged) == FROZEN
        privileged.thaw()
        assert freezer_state(privileged) == 'THAWED'
        assert attach(privileged, 'echo runs') == 'runs\n'
    finally:
        subprocess.run(['lxc-cgroup', '-P', privileged.lxcpath, '-n', privileged.name,
                        'freezer.state', 'THAWED'], check=False, timeout=300)


def test_leftovers_of_a_run_killed_inside_the_freeze_are_cleared(privileged, tmp_path):
    # killed between freeze's lxc-cgroup and its lxc-freeze: frozen, LXC's record RUNNING
    subprocess.run(['lxc-cgroup', '-P', privileged.lxcpath, '-n', privileged.name,
                    'freezer.state', FROZEN], check=True, timeout=300)
    try:
        leftovers.record(801, container=privileged.name, lxcpath=privileged.lxcpath,
                         mode='suspend', temp_dir=str(tmp_path / 'copy'))
        lines = []
        assert leftovers.clear_leftovers(801, lines.append)['mode'] == 'suspend'
        assert freezer_state(privileged) == 'THAWED' and privileged.state() == RUNNING
        assert lines == ['container gvpriv was left frozen by a killed backup; thawing it']
        assert leftovers.leftovers(801) is None
    finally:
        subprocess.run(['lxc-cgroup', '-P', privileged.lxcpath, '-n', privileged.name,
                        'freezer.state', 'THAWED'], check=False, timeout=300)
