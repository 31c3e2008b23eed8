"""Issue 13, single-file restore: files come back out of a backup through the appliance VM,
from qcow2 chains and datastores, full and incremental, on real QEMU.

The files are the real Linux test guest's: its workload writes w/<seq> on its data disk (mounted
at /data in the guest; paths here are from the filesystem's root) and journals each
file's sha256 only after the file is durable, so the journal inside a backup says exactly which
files that point in time holds and what they must contain. Other layouts (an MBR partition
table, LVM, xfs) are made by disk_layouts and must be found without being named.
"""
import hashlib
import os
import tarfile
import time

import pytest

from guestvault_engine.errors import StorageError
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.restore.file_restore import UnknownFilesystem
from guestvault_engine.run.file_restore import FileRestoreRequest, run_file_restore
from disk_layouts import LayoutGuest, partitioned_lvm_disk
from lab_checks import backup_location
from linuxguest import parse_journal

MiB = 1 << 20


def wait_for_files(guest, count, timeout=300):
    deadline = time.monotonic() + timeout
    while len(guest.journal().entries) < count:
        assert time.monotonic() < deadline, 'the workload wrote too few files'
        time.sleep(0.5)
    return guest.journal()


def sha256_of(path):
    with open(path, 'rb') as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def files(config_dir, vmid, where, **options):
    return run_file_restore(FileRestoreRequest(vmid=vmid, config_dir=config_dir, **where,
                                               **options))


@pytest.mark.parametrize('kind', ['qcow2-chain', 'datastore'])
def test_files_the_linux_guest_wrote_come_back_from_a_full_and_an_incremental_backup(
        kind, linux_guest, config_dir, tmp_path, request, monkeypatch):
    where = backup_location(kind, request, config_dir, tmp_path, monkeypatch)
    guest = linux_guest(vmid=9401)
    wait_for_files(guest, 3)

    def backup():
        return run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                   agent_socket=guest.agent_socket, config_dir=config_dir,
                                                   mode='snapshot', **where))

    full = backup()
    assert full['frozen_filesystems'] == 1          # the ext4 data disk
    after_full = guest.journal()          # the live journal, a superset of the backed-up one
    wait_for_files(guest, max(after_full.entries) + 3)
    inc = backup()
    assert inc['level'] == 'inc'
    after_inc = guest.journal()

    # The full backup: /data/w listed, then the journal and every file extracted into a dir.
    listing = files(config_dir, guest.vmid, where, backup=full['time'], paths=['/w'])
    assert listing['filesystem'] == 'vd0' and listing['filesystem_type'] == 'ext4'
    assert not listing['changed']
    names = {e['name'] for e in listing['entries']}
    assert all(e['type'] == 'file' for e in listing['entries'])
    out = tmp_path / 'full'
    extracted = files(config_dir, guest.vmid, where, backup=full['time'],
                      paths=['/journal', '/w'], dest=str(out))
    assert extracted['changed'] and extracted['files'] == len(names) + 1
    journal = parse_journal((out / 'journal').read_bytes())
    assert journal.entries and not journal.torn_tail          # frozen: no half-written line
    journaled = {str(seq) for seq in journal.entries}
    # every journaled file is there; at most the one being written when frozen is not journaled
    assert journaled <= names <= journaled | {str(max(journal.entries) + 1)}
    for seq, (digest, size) in journal.entries.items():
        path = out / 'w' / str(seq)
        assert path.stat().st_size == size and sha256_of(path) == digest, seq
        # ... and the guest's own journal says the same of that file
        assert seq in after_full.removed or after_full.entries[seq] == (digest, size)
    sizes = {e['name']: e['size'] for e in listing['entries']}
    assert all(sizes[str(seq)] == size for seq, (_d, size) in journal.entries.items())

    # The incremental: the files written since the full are in it, as a tar archive.
    archive = tmp_path / 'inc.tar'
    result = files(config_dir, guest.vmid, where, backup=inc['time'], paths=['/'],
                   archive=str(archive))
    assert result['changed'] and archive.stat().st_size == result['archive_bytes']
    assert not [p for p in os.listdir(tmp_path) if p.startswith('.guestvault')]
    with tarfile.open(archive) as tar:
        members = {m.name.lstrip('./'): m for m in tar.getmembers()}
        inc_journal = parse_journal(tar.extractfile(members['journal']).read())
        assert max(inc_journal.entries) > max(journal.entries)
        for seq, (digest, size) in inc_journal.entries.items():
            data = tar.extractfile(members[f'w/{seq}']).read()
            assert len(data) == size and hashlib.sha256(data).hexdigest() == digest, seq
            assert seq in after_inc.removed or after_inc.entries[seq] == (digest, size)
    newer = [seq for seq in inc_journal.entries if seq > max(journal.entries) + 1]
    assert newer and not {str(seq) for seq in newer} & names   # the full is its own point in time


def test_partitions_lvm_xfs_and_vfat_are_found_without_being_named(config_dir, tmp_path):
    blob = os.urandom(3 * MiB + 123)
    disk = str(tmp_path / 'layout.qcow2')
    ext4_sums, xfs_sums, esp_sums = partitioned_lvm_disk(
        str(tmp_path / 'make'), {'etc/hostname': b'web1\n', 'etc/app/app.conf': b'port=80\n'},
        {'srv/data/blob.bin': blob, 'srv/data/notes.txt': b'on xfs\n'}, disk,
        esp_files={'EFI/debian/grub.cfg': b'set root=(hd0,gpt2)\n', 'EFI/BOOT/BOOTX64.EFI':
                   os.urandom(70000), 'EFI/Übersicht.txt': 'non-ASCII name'.encode()})
    guest = LayoutGuest(str(tmp_path / 'guest'), disk, 9402).start()
    try:
        (tmp_path / 'dump').mkdir()
        where = {'dumpdir': str(tmp_path / 'dump')}
        run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                            config_dir=config_dir, **where))
    finally:
        guest.stop()
    # Two filesystems: without a name the error lists them (nothing named them before).
    with pytest.raises(UnknownFilesystem) as failure:
        files(config_dir, guest.vmid, where, paths=['/'])
    assert 'vd0/part1 (ext4)' in str(failure.value) and 'vd0/part3 (vfat)' in str(failure.value)
    assert 'lvm/gvtest/data (xfs)' in str(failure.value) and 'set filesystem' in str(failure.value)

    listing = files(config_dir, guest.vmid, where, filesystem='lvm/gvtest/data',
                    paths=['/srv/data'])
    found = {fs['name']: fs['type'] for fs in listing['filesystems']}
    assert found == {'vd0/part1': 'ext4', 'vd0/part2': 'LVM2_member', 'vd0/part3': 'vfat',
                     'lvm/gvtest/data': 'xfs'}
    assert {fs['name']: fs['label'] for fs in listing['filesystems']}['vd0/part3'] == 'GVESP'
    assert {e['name']: e['size'] for e in listing['entries']} == {'blob.bin': len(blob),
                                                                  'notes.txt': 7}
    out = tmp_path / 'out'
    files(config_dir, guest.vmid, where, filesystem='lvm/gvtest/data', paths=['/srv'],
          dest=str(out))
    assert {p: sha256_of(out / p) for p in xfs_sums} == xfs_sums
    archive = tmp_path / 'part1.tar'
    files(config_dir, guest.vmid, where, filesystem='vd0/part1', paths=['/etc'],
          archive=str(archive))
    with tarfile.open(archive) as tar:
        got = {m.name.lstrip('./'): hashlib.sha256(tar.extractfile(m).read()).hexdigest()
               for m in tar.getmembers() if m.isfile()}
    assert got == ext4_sums
    esp = tmp_path / 'esp'
    files(config_dir, guest.vmid, where, filesystem='vd0/part3', paths=['/EFI'], dest=str(esp))
    assert {p: sha256_of(esp / p) for p in esp_sums} == esp_sums
    with pytest.raises(UnknownFilesystem, match='has no filesystem vd1'):
        files(config_dir, guest.vmid, where, filesystem='vd1', paths=['/'])
    with pytest.raises(StorageError, match='no backups'):
        files(config_dir, 9499, where, paths=['/'])
