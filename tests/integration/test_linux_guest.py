"""The real Linux test guest itself (tools/linuxguest.py): it boots, its agent answers, its
workload writes, a freeze gives a consistent copy, and it shuts down cleanly (or not at all)."""
import shutil
import time

import pytest

from linuxguest import agent_call, inspect_ext4, parse_journal

pytestmark = pytest.mark.skipif(shutil.which('qemu-system-x86_64') is None,
                                reason='needs qemu-system-x86_64 (make deps)')


def wait_for_entries(guest, count, timeout=60):
    deadline = time.monotonic() + timeout
    while True:
        journal = guest.journal()
        if len(journal.entries) >= count or time.monotonic() > deadline:
            return journal
        time.sleep(0.5)


def test_guest_boots_and_agent_answers(linux_guest):
    guest = linux_guest(workload=False)
    assert agent_call(guest.agent_socket, 'guest-ping') == {}
    assert agent_call(guest.agent_socket, 'guest-info')['version'].startswith('7.')
    assert agent_call(guest.agent_socket, 'guest-fsfreeze-status') == 'thawed'
    code, out, _err = guest.guest_exec(['/bin/sh', '-c', 'grep " /data " /proc/mounts'])
    assert code == 0 and out.startswith(b'/dev/vda /data ext4 rw'), out
    assert guest.status() == 'running'
    assert 'GUESTVAULT-ERROR' not in guest.console()


def test_workload_journal_grows_with_complete_files(linux_guest):
    guest = linux_guest()
    first = wait_for_entries(guest, 3)
    assert len(first.entries) >= 3, first
    second = wait_for_entries(guest, max(first.entries) + 3)
    assert max(second.entries) > max(first.entries)
    assert not second.torn_tail
    # The newest journal line names a file that is complete in the guest right now.
    seq = max(second.entries)
    code, out, _err = guest.guest_exec(['/bin/sh', '-c', f'sha256sum /data/w/{seq}; stat -c %s /data/w/{seq}'])
    assert code == 0, out
    digest, size = second.entries[seq]
    assert out.split()[0].decode() == digest
    assert int(out.split()[2]) == size


def test_copy_while_frozen_is_consistent(linux_guest, tmp_path):
    guest = linux_guest()
    wait_for_entries(guest, 5)
    assert agent_call(guest.agent_socket, 'guest-fsfreeze-freeze') >= 1
    try:
        assert agent_call(guest.agent_socket, 'guest-fsfreeze-status') == 'frozen'
        # Spread the copy over time: writes that slipped past the freeze would show up as tearing.
        guest.snapshot_data(str(tmp_path / 'frozen.qcow2'))
        time.sleep(1)
        guest.snapshot_data(str(tmp_path / 'frozen-later.qcow2'))
    finally:
        assert agent_call(guest.agent_socket, 'guest-fsfreeze-thaw') >= 1
    assert agent_call(guest.agent_socket, 'guest-fsfreeze-status') == 'thawed'
    frozen = inspect_ext4(str(tmp_path / 'frozen.qcow2'), str(tmp_path / 'inspect'))
    assert not frozen.needs_recovery
    assert frozen.fsck_exit == 0, frozen.fsck_output
    assert frozen.entries >= 5 and frozen.bad_files == [] and frozen.clean
    later = inspect_ext4(str(tmp_path / 'frozen-later.qcow2'), str(tmp_path / 'inspect'))
    assert later.clean and later.entries == frozen.entries, 'the guest wrote while frozen'
    # The workload goes on after the thaw.
    assert max(wait_for_entries(guest, frozen.entries + 2).entries) > frozen.entries
    # Control: the same copy without a freeze is what the check must catch (needs_recovery).
    # Nothing more is asserted on it: a live copy may be torn in any way.
    live = inspect_ext4(guest.snapshot_data(str(tmp_path / 'live.qcow2')), str(tmp_path / 'inspect'))
    assert live.needs_recovery and not live.clean
    assert live.after_replay is not None


def test_power_button_shuts_down_cleanly(linux_guest, tmp_path):
    guest = linux_guest()
    wait_for_entries(guest, 3)
    guest.powerdown()
    guest.wait_status('shutdown', 60)
    assert 'GUESTVAULT-DATA-UNMOUNTED' in guest.console()
    report = inspect_ext4(guest.data_disk, str(tmp_path / 'inspect'))
    assert not report.needs_recovery and report.clean, report
    assert report.entries >= 3


def test_agent_shutdown_powers_off_cleanly(linux_guest, tmp_path):
    guest = linux_guest()
    wait_for_entries(guest, 3)
    # qemu-ga 7.2 never answers guest-shutdown: QEMU's status is the answer.
    assert agent_call(guest.agent_socket, 'guest-shutdown', reply=False) is None
    guest.wait_status('shutdown', 60)
    assert 'GUESTVAULT-SHUTDOWN -h -P +0' in guest.console()
    report = inspect_ext4(guest.data_disk, str(tmp_path / 'inspect'))
    assert not report.needs_recovery and report.clean, report


def test_ignore_shutdown_keeps_running(linux_guest):
    guest = linux_guest(ignore_shutdown=True)
    guest.powerdown()
    agent_call(guest.agent_socket, 'guest-shutdown', reply=False)
    guest.wait_console('GUESTVAULT-SHUTDOWN-IGNORED', 30)
    time.sleep(5)
    assert guest.status() == 'running'
    assert agent_call(guest.agent_socket, 'guest-ping') == {}
    assert 'GUESTVAULT-POWEROFF' not in guest.console()


def test_parse_journal_drops_removed_and_flags_a_torn_tail():
    journal = parse_journal(b'1 aa 4096\n2 bb 8192\nrm 1\n3 cc 4')
    assert journal.entries == {2: ('bb', 8192)}
    assert journal.removed == {1}
    assert journal.torn_tail
