"""The real Linux test guest itself (tools/linuxguest.py): it boots, its agent answers, its
workload writes, a freeze gives a consistent copy, and the image check catches an unfrozen one."""
import shutil
import time

import pytest

from linuxguest import agent_call, inspect_ext4, parse_journal

pytestmark = pytest.mark.skipif(shutil.which('qemu-system-x86_64') is None,
                                reason='needs qemu-system-x86_64 (make deps)')


def wait_for_entries(guest, count, timeout=300):
    deadline = time.monotonic() + timeout
    while True:
        journal = guest.journal()
        if len(journal.entries) >= count or time.monotonic() > deadline:
            return journal
        time.sleep(0.5)


def test_guest_boots_its_agent_answers_and_its_workload_writes_complete_files(linux_guest):
    guest = linux_guest()
    assert agent_call(guest.agent_socket, 'guest-ping') == {}
    assert agent_call(guest.agent_socket, 'guest-info')['version'].startswith('7.')
    assert agent_call(guest.agent_socket, 'guest-fsfreeze-status') == 'thawed'
    code, out, _err = guest.guest_exec(['/bin/sh', '-c', 'grep " /data " /proc/mounts'])
    assert code == 0 and out.startswith(b'/dev/vda /data ext4 rw'), out
    assert guest.status() == 'running'
    assert 'GUESTVAULT-ERROR' not in guest.console()
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
    # one: the ext4 data disk at /data (proc, sysfs, devtmpfs, tmpfs, the initramfs root: none)
    assert agent_call(guest.agent_socket, 'guest-fsfreeze-freeze') == 1
    try:
        assert agent_call(guest.agent_socket, 'guest-fsfreeze-status') == 'frozen'
        # Spread the copy over time: writes that slipped past the freeze would show up as tearing.
        guest.snapshot_data(str(tmp_path / 'frozen.qcow2'))
        time.sleep(1)
        guest.snapshot_data(str(tmp_path / 'frozen-later.qcow2'))
    finally:
        assert agent_call(guest.agent_socket, 'guest-fsfreeze-thaw') == 1
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


# Shutdown through the power button, the agent, and a guest ignoring both: the stop-mode tests
# of test_consistency_modes.py.


def test_parse_journal_drops_removed_and_flags_a_torn_tail():
    journal = parse_journal(b'1 aa 4096\n2 bb 8192\nrm 1\n3 cc 4')
    assert journal.entries == {2: ('bb', 8192)}
    assert journal.removed == {1}
    assert journal.torn_tail
