"""The directory storage: opening it, staying inside it, staging, stale leftovers, locks, names."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.errors import LockTimeout, StorageError
from guestvault_engine.storage.directory import DirStorage, file_lock, lock_waits
from guestvault_engine.storage.files import write_file_atomic
from guestvault_engine.times import format_time, parse_time

UTC = timezone.utc
T = datetime(2026, 3, 10, 1, 0, 0, tzinfo=UTC)
NOBODY = 65534


@pytest.fixture
def store(tmp_path):
    path = tmp_path / 'store'
    path.mkdir()
    return DirStorage(str(path), 'local')


def stage(store, vmid, when):
    """Stage as a run does: with the guest's lock held, which also creates vm/<vmid>/."""
    with store.guest_lock(vmid, 0):
        return store.stage(vmid, when)


def commit_backup(store, vmid, when, level='full'):
    staged = stage(store, vmid, when)
    staged.write_json('index.json', {'vmid': vmid, 'time': format_time(when), 'level': level})
    staged.commit()
    return staged


# ----------------------------------------------------------------------------- opening

def test_a_missing_directory_is_refused_saying_what_to_fix(tmp_path):
    with pytest.raises(StorageError) as err:
        DirStorage(str(tmp_path / 'nope'), 'nfs')
    message = str(err.value)
    assert f"storage nfs ({tmp_path / 'nope'})" in message
    assert 'does not exist' in message and 'create it or fix the path' in message


def test_a_dumpdir_is_named_as_such_in_errors(tmp_path):
    with pytest.raises(StorageError) as err:
        DirStorage(str(tmp_path / 'nope'))
    assert str(err.value).startswith(f"dumpdir {tmp_path / 'nope'} does not exist")


def test_a_regular_file_is_not_a_storage(tmp_path):
    path = tmp_path / 'file'
    path.write_text('')
    with pytest.raises(StorageError) as err:
        DirStorage(str(path))
    assert 'is not a directory' in str(err.value)


def test_a_relative_path_is_made_absolute(tmp_path, monkeypatch):
    (tmp_path / 'store').mkdir()
    monkeypatch.chdir(tmp_path)
    assert DirStorage('store').path == str(tmp_path / 'store')


def _open_as(uid, path):
    """Open ``path`` as a DirStorage in a child process running as ``uid``; return its error."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            try:
                DirStorage(path)
                message = ''
            except StorageError as exc:
                message = str(exc)
            os.write(write_end, message.encode() or b'-')
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, 'rb') as pipe:
        answer = pipe.read().decode()
    _pid, status = os.waitpid(pid, 0)
    assert status == 0, 'child failed'
    return '' if answer == '-' else answer


@pytest.fixture
def world_reachable_dir():
    """A directory any user can reach (pytest's tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip('needs root to act as another user')
    path = tempfile.mkdtemp(prefix='guestvault-test-')
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


def test_a_directory_the_user_cannot_write_is_refused(world_reachable_dir):
    writable = os.path.join(world_reachable_dir, 'writable')
    read_only = os.path.join(world_reachable_dir, 'read-only')
    os.mkdir(writable, 0o777)
    os.chmod(writable, 0o777)
    os.mkdir(read_only, 0o555)
    assert _open_as(NOBODY, writable) == ''  # the child can reach the directories at all
    message = _open_as(NOBODY, read_only)
    assert f"dumpdir {read_only} is not writable by this user" in message
    assert 'permissions' in message


# ----------------------------------------------------------------------------- inside()

def test_paths_inside_the_storage_are_returned_resolved(store):
    assert store.inside(os.path.join(store.path, 'vm', '100', 'x')) == os.path.join(
        store.path, 'vm', '100', 'x')
    assert store.inside(os.path.join(store.path, 'vm', '..', 'vm')) == os.path.join(
        store.path, 'vm')
    assert store.inside(store.path) == store.path


@pytest.mark.parametrize('escape', ['..', '../etc/passwd', 'vm/../../store2', 'vm/100/../../..'])
def test_dot_dot_cannot_leave_the_storage(store, escape):
    with pytest.raises(StorageError) as err:
        store.inside(os.path.join(store.path, escape))
    assert 'outside storage local' in str(err.value) and 'refusing' in str(err.value)


def test_a_sibling_directory_sharing_the_name_prefix_is_outside(store):
    with pytest.raises(StorageError):
        store.inside(store.path + '2/vm/100')


def test_a_symlink_pointing_out_of_the_storage_is_refused(store, tmp_path):
    outside = tmp_path / 'elsewhere'
    outside.mkdir()
    os.symlink(str(outside), os.path.join(store.path, 'vm'))
    with pytest.raises(StorageError):
        store.inside(os.path.join(store.path, 'vm', '100'))


def test_a_symlink_that_stays_inside_is_fine(store):
    os.makedirs(os.path.join(store.path, 'vm', '100'))
    os.symlink('vm/100', os.path.join(store.path, 'latest'))
    assert store.inside(os.path.join(store.path, 'latest')) == os.path.join(
        store.path, 'vm', '100')


def test_a_storage_reached_through_a_symlink_still_contains_its_paths(tmp_path):
    real = tmp_path / 'real'
    real.mkdir()
    os.symlink(str(real), str(tmp_path / 'link'))
    store = DirStorage(str(tmp_path / 'link'))
    assert store.inside(str(tmp_path / 'link' / 'vm')) == str(real / 'vm')


# ----------------------------------------------------------------------------- staging

def test_a_staged_backup_is_invisible_until_commit(store):
    staged = stage(store, 100, T)
    assert os.path.basename(staged.path) == '.2026-03-10T01:00:00Z.tmp'
    staged.write_json('index.json', {'vmid': 100, 'time': format_time(T), 'level': 'full'})
    staged.write('vd0.qcow2', b'\0' * 512)
    assert store.backups(100) == []
    staged.commit()
    backups = store.backups(100)
    assert [b.id for b in backups] == ['vm/100/2026-03-10T01:00:00Z']
    assert backups[0].path == staged.path == staged.final_path
    assert sorted(os.listdir(staged.path)) == ['index.json', 'vd0.qcow2']
    assert not backups[0].protected


def test_a_discarded_staged_backup_leaves_nothing(store):
    staged = stage(store, 100, T)
    staged.write('vd0.qcow2', b'data')
    staged.discard()
    assert os.listdir(store.guest_dir(100)) == ['.lock']
    assert store.backups(100) == []


def test_staging_over_an_existing_backup_is_refused(store):
    commit_backup(store, 100, T)
    with pytest.raises(StorageError) as err:
        store.stage(100, T)
    assert 'already exists' in str(err.value)


def test_backups_are_listed_oldest_first_and_only_complete_ones(store):
    for hours in (5, 1, 3):
        commit_backup(store, 100, T + timedelta(hours=hours))
    gdir = store.guest_dir(100)
    os.makedirs(os.path.join(gdir, '2026-03-10T09:00:00Z'))  # no index.json: not complete
    os.makedirs(os.path.join(gdir, 'lost+found'))
    stage(store, 100, T + timedelta(hours=7))                  # still being written
    assert [b.index['time'] for b in store.backups(100)] == [
        '2026-03-10T02:00:00Z', '2026-03-10T04:00:00Z', '2026-03-10T06:00:00Z']
    assert store.backups(101) == []


def test_a_protected_backup_is_reported_protected(store):
    staged = stage(store, 100, T)
    staged.write('.protected', '')
    staged.write_json('index.json', {'vmid': 100, 'time': format_time(T)})
    staged.commit()
    assert store.backups(100)[0].protected


# ----------------------------------------------------------------------------- stale leftovers

def test_remove_stale_removes_hidden_tmp_directories_only(store):
    commit_backup(store, 100, T)
    gdir = store.guest_dir(100)
    killed = os.path.join(gdir, '.2026-03-10T02:00:00Z.tmp')
    os.makedirs(os.path.join(killed, 'sub'))
    with open(os.path.join(killed, 'vd0.qcow2'), 'w') as handle:
        handle.write('partial')
    os.makedirs(os.path.join(gdir, '.2026-03-10T03:00:00Z.tmp'))
    open(os.path.join(gdir, '.lock'), 'w').close()
    os.makedirs(os.path.join(gdir, '.keep'))
    os.makedirs(os.path.join(gdir, 'not-hidden.tmp'))
    removed = store.remove_stale(100)
    assert sorted(removed) == ['.2026-03-10T02:00:00Z.tmp', '.2026-03-10T03:00:00Z.tmp']
    assert sorted(os.listdir(gdir)) == ['.keep', '.lock', '2026-03-10T01:00:00Z', 'not-hidden.tmp']
    assert len(store.backups(100)) == 1


def test_remove_stale_of_a_guest_without_backups_does_nothing(store):
    assert store.remove_stale(100) == []


def test_remove_stale_reports_only_what_it_removed(store):
    gdir = store.guest_dir(100)
    os.makedirs(gdir)
    open(os.path.join(gdir, '.notes.tmp'), 'w').close()
    removed = store.remove_stale(100)
    assert [n for n in removed if os.path.exists(os.path.join(gdir, n))] == []


# ----------------------------------------------------------------------------- locks

HOLDER = """
import fcntl, sys
handle = open(sys.argv[1], 'a+')
fcntl.flock(handle, fcntl.LOCK_EX)
print('locked', flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder():
    """Start a process that holds an flock on a path until its stdin closes."""
    started = []

    def start(path):
        proc = subprocess.Popen([sys.executable, '-c', HOLDER, path], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == 'locked'
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def _lockable_by_another_process(path):
    code = ("import fcntl, sys\nh = open(sys.argv[1], 'a+')\n"
            "try:\n    fcntl.flock(h, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "except OSError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, '-c', code, path], check=False).returncode == 0


def test_file_lock_creates_the_lock_file_and_holds_it_only_while_inside(tmp_path):
    path = str(tmp_path / '.lock')
    with file_lock(path, 0, 'guest 100'):
        assert os.path.exists(path)
        assert not _lockable_by_another_process(path)
    assert _lockable_by_another_process(path)


def test_file_lock_times_out_while_another_process_holds_it(tmp_path, holder):
    path = str(tmp_path / '.lock')
    holder(path)
    with pytest.raises(LockTimeout) as err:
        with file_lock(path, 0.3, 'guest 100 on storage local'):
            pytest.fail('got a lock another process holds')
    message = str(err.value)
    assert message.startswith('guest 100 on storage local is locked by another run')
    assert path in message and 'lockwait' in message


def test_file_lock_with_no_wait_fails_at_once(tmp_path, holder):
    path = str(tmp_path / '.lock')
    holder(path)
    with pytest.raises(LockTimeout):
        with file_lock(path, 0, 'guest 100'):
            pass


def test_file_lock_is_taken_once_the_holder_finishes(tmp_path, holder):
    path = str(tmp_path / '.lock')
    proc = holder(path)
    proc.stdin.close()
    proc.wait()
    with file_lock(path, 0, 'guest 100'):
        pass


def test_a_wait_for_a_lock_is_collected_with_its_holder_and_length(tmp_path, holder):
    path = str(tmp_path / '.lock')
    proc = holder(path)
    with open(path, 'w') as handle:
        handle.write('a restore of guest 100 is running (pid 4242, since 10:00:00 UTC)\n')

    def release(_message):              # told once that it waits: the holder lets go now
        proc.stdin.close()
        proc.wait()
    with lock_waits() as waits:
        with file_lock(path, 60, 'guest 100 on storage local', on_wait=release):
            pass
        with file_lock(path, 60, 'guest 100 on storage local'):
            pass                        # no wait: nothing collected
    assert len(waits) == 1, waits
    assert re.fullmatch(r"waited \d+\.\d s for guest 100 on storage local: a restore of guest "
                        r"100 is running \(pid 4242, since 10:00:00 UTC\)", waits[0]), waits


def test_a_killed_holder_does_not_leave_the_lock_behind(tmp_path, holder):
    path = str(tmp_path / '.lock')
    proc = holder(path)
    proc.kill()
    proc.wait()
    with file_lock(path, 0, 'guest 100'):
        pass


def test_the_guest_lock_is_vm_vmid_lock_on_the_storage(store, holder):
    holder_path = os.path.join(store.guest_dir(100), '.lock')
    os.makedirs(store.guest_dir(100))
    holder(holder_path)
    with pytest.raises(LockTimeout) as err:
        with store.guest_lock(100, 0):
            pass
    assert 'guest 100 on storage local' in str(err.value)
    with store.guest_lock(101, 0):  # other guests are not affected
        assert os.path.exists(os.path.join(store.guest_dir(101), '.lock'))


# ----------------------------------------------------------------------------- atomic writes

@pytest.mark.parametrize('data', ['text\n', b'\x00bytes\xff'])
def test_write_file_atomic_leaves_only_the_file(tmp_path, data):
    path = tmp_path / 'index.json'
    write_file_atomic(str(path), data)
    assert os.listdir(tmp_path) == ['index.json']
    assert (path.read_bytes() if isinstance(data, bytes) else path.read_text()) == data


def test_write_file_atomic_replaces_an_existing_file(tmp_path):
    path = tmp_path / 'notes'
    path.write_text('old')
    write_file_atomic(str(path), 'new')
    assert path.read_text() == 'new'
    assert os.listdir(tmp_path) == ['notes']


def test_a_failed_write_leaves_the_old_content(tmp_path):
    path = tmp_path / 'notes'
    path.write_text('old')
    with pytest.raises(UnicodeEncodeError):
        write_file_atomic(str(path), 'half \udc80 written')
    assert path.read_text() == 'old'


def test_staged_json_files_are_written_atomically_and_readable(store):
    staged = stage(store, 100, T)
    staged.write_json('index.json', {'b': 1, 'a': [1, 2]})
    assert os.listdir(staged.path) == ['index.json']
    with open(staged.file('index.json')) as handle:
        assert json.load(handle) == {'a': [1, 2], 'b': 1}


# ----------------------------------------------------------------------------- backup names

def test_next_backup_time_is_now_to_the_second_in_utc(store):
    now = datetime(2026, 3, 10, 3, 0, 0, 987654, tzinfo=timezone(timedelta(hours=2)))
    assert store.next_backup_time(100, now) == datetime(2026, 3, 10, 1, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize('now, expected', [
    (T, T + timedelta(seconds=1)),                                  # same second
    (T + timedelta(microseconds=700000), T + timedelta(seconds=1)),
    (T - timedelta(seconds=90), T + timedelta(seconds=1)),           # clock a little behind
    (T + timedelta(seconds=5), T + timedelta(seconds=5)),
])
def test_next_backup_time_is_later_than_the_newest_backup(store, now, expected):
    commit_backup(store, 100, T - timedelta(days=1))
    commit_backup(store, 100, T)
    assert store.next_backup_time(100, now) == expected


def test_a_clock_stepped_back_by_an_hour_is_refused_instead_of_misdating_the_backup(store):
    commit_backup(store, 100, T)
    with pytest.raises(StorageError, match=r"3600 s after this node's clock .*stepped back.*NTP"):
        store.next_backup_time(100, T - timedelta(hours=1))
    assert len(store.backups(100)) == 1


def test_backups_taken_in_the_same_second_never_collide(store):
    taken = []
    for _attempt in range(5):
        when = store.next_backup_time(100, T)
        commit_backup(store, 100, when)  # would raise StorageError on a collision
        taken.append(when)
    assert taken == [T + timedelta(seconds=n) for n in range(5)]
    assert len(store.backups(100)) == 5


def test_next_backup_time_of_one_guest_ignores_other_guests(store):
    commit_backup(store, 101, T)
    assert store.next_backup_time(100, T) == T


def test_time_format_round_trips():
    assert parse_time(format_time(T)) == T
    assert format_time(T) == '2026-03-10T01:00:00Z'


def test_a_described_reader_is_named_to_a_waiting_writer_and_a_dead_ones_description_goes(
        tmp_path):
    """Issue 20: a prune waiting for a live restore's server says which one it waits for."""
    lock = str(tmp_path / '.lock')
    with file_lock(lock, 0, 'guest 101', shared=True, holder='a live restore of vm/101/T'):
        with file_lock(lock, 0, 'guest 101', shared=True):      # readers share
            pass
        with pytest.raises(LockTimeout, match=r'locked by another run \(a live restore of '
                                              r'vm/101/T\)'):
            with file_lock(lock, 0, 'guest 101'):
                pass
    assert sorted(os.listdir(tmp_path)) == ['.lock']           # released: its description gone
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                          capture_output=True, text=True, check=True).stdout.strip()
    write_file_atomic(f"{lock}.reader-{dead}", 'a live restore that was killed\n')
    with file_lock(lock, 0, 'guest 101', shared=True):
        with pytest.raises(LockTimeout, match=rf'another run \(lock {lock}\)'):
            with file_lock(lock, 0, 'guest 101'):
                pass
    assert sorted(os.listdir(tmp_path)) == ['.lock']


def test_new_directory_removes_only_what_it_made_when_the_block_fails(tmp_path):
    from guestvault_engine.storage.files import new_directory
    (tmp_path / 'there').mkdir()
    (tmp_path / 'there' / 'kept').write_text('before')
    with pytest.raises(RuntimeError):
        with new_directory(str(tmp_path / 'there' / 'a' / 'b')):
            (tmp_path / 'there' / 'a' / 'b' / 'image').write_text('half')
            raise RuntimeError('the restore failed')
    assert sorted(os.listdir(tmp_path / 'there')) == ['kept']
    with pytest.raises(RuntimeError):
        with new_directory(str(tmp_path / 'there')):
            raise RuntimeError('the restore failed')
    assert sorted(os.listdir(tmp_path / 'there')) == ['kept']
    with new_directory(str(tmp_path / 'there' / 'c')):
        pass
    assert os.path.isdir(tmp_path / 'there' / 'c')
