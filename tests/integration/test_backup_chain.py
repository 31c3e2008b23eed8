"""Live full and incremental backups on real QEMU: every backup is one point in time, and no
guest write is ever lost, also when a backup fails or is killed."""
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
from guestvault_engine.errors import BackupFailed, ChainError, GuestUnreachable, HookFailed
from guestvault_engine.format import overlap, qcow2
from guestvault_engine.guest import capture
from guestvault_engine.times import parse_time
from lab_checks import backups_in, hidden_in, same_content, small_tmpfs
from labguest import LabGuest

MiB = 1 << 20


def backup(guest, store, config_dir, log=None, **options):
    request = GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=store,
                                 config_dir=config_dir, **options)
    return run_guest_backup(request, log=log)


def segment_digests(path, size):
    """hashlib's sha256 of each ``size``-byte segment of a file, as a manifest records them."""
    digests = []
    with open(path, 'rb') as handle:
        while True:
            data = handle.read(size)
            if not data:
                return digests
            digests.append(hashlib.sha256(data).hexdigest())


def raw_content(image, workdir):
    """The guest-visible bytes of an image, read through its backing chain by qemu-img."""
    out = os.path.join(workdir, 'content.raw')
    subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw', image, out], check=True)
    with open(out, 'rb') as handle:
        data = handle.read()
    os.unlink(out)
    return data


def bitmap_names(guest):
    return sorted({b['name'] for dev in guest.execute('query-block')
                   for b in dev['inserted'].get('dirty-bitmaps', [])})


class Writer(threading.Thread):
    """Keeps writing through the guest's block layer and records every write, in order."""

    def __init__(self, guest, disk_size, pause=0.02, seed=7):
        super().__init__(daemon=True)
        self.guest = guest
        self.disk_size = disk_size
        self.pause = pause
        self.rng = random.Random(seed)
        self.writes = []        # (disk index, offset, length, pattern), appended before issuing
        self.completed = 0
        self.stop_flag = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.stop_flag.is_set():
                disk = self.rng.randrange(len(self.guest.disk_ids))
                length = self.rng.choice((4096, 65536, 3 * 65536))
                offset = self.rng.randrange(0, (self.disk_size - length) // 4096) * 4096
                pattern = len(self.writes) % 255 + 1
                self.writes.append((disk, offset, length, pattern))
                self.guest.write(self.guest.disk_ids[disk], pattern, offset, length)
                self.completed += 1
                time.sleep(self.pause)
        except Exception as exc:  # surfaced by the test
            self.error = exc

    def finish(self):
        self.stop_flag.set()
        self.join(30)
        assert self.error is None, self.error


class Model:
    """What each disk holds after the first k writes; advanced monotonically."""

    def __init__(self, sizes):
        self.disks = [bytearray(size) for size in sizes]
        self.applied = 0

    def apply(self, write):
        disk, offset, length, pattern = write
        self.disks[disk][offset:offset + length] = bytes([pattern]) * length
        self.applied += 1

    def find_point_in_time(self, contents, writes, lowest, highest):
        """The k (lowest <= k <= highest) for which every disk equals the model, or None."""
        while self.applied < lowest:
            self.apply(writes[self.applied])
        while True:
            if all(model == data for model, data in zip(self.disks, contents)):
                return self.applied
            if self.applied >= min(highest, len(writes)):
                return None
            self.apply(writes[self.applied])


def test_every_backup_is_one_point_in_time_for_all_disks_while_the_guest_writes(
        make_guest, store, config_dir, tmp_path, monkeypatch):
    # Small segments and watch batches, so the images are hashed while QEMU writes them (its
    # copy-before-write of the racing writes lands out of order), under many dirty bitmaps.
    monkeypatch.setattr(qcow2, 'SEGMENT_SIZE', 1 * MiB)
    monkeypatch.setattr(capture, 'WATCH_BATCH', 2 * MiB)
    monkeypatch.setattr(overlap, 'IN_FLIGHT', 2 * MiB)   # hash close behind QEMU's writes
    size = 32 * MiB
    guest = make_guest(disks=[('qcow2', size), ('qcow2', size)])
    model = Model([size, size])
    writer = Writer(guest, size)
    # Fill both disks first, so the full backup has data to copy while writes race it.
    for disk in guest.disk_ids:
        guest.write(disk, 0xEE, 0, size)
    for d in model.disks:
        d[:] = b'\xee' * size
    writer.start()
    found = []
    # bwlimit makes each copy span many guest writes, which must land in this backup or the next.
    plan = [dict(level='full', bwlimit=32 * 1024)] + [dict(level='auto', bwlimit=8 * 1024)] * 3
    results = []
    lines = []
    for options in plan:
        lowest = writer.completed
        result = backup(guest, store, config_dir, log=lines.append, **options)
        highest = len(writer.writes)
        results.append(result)
        # The manifest's digests are those of the final files, though hashed during the copy.
        with open(os.path.join(result['backup_dir'], 'index.json')) as handle:
            for disk in json.load(handle)['disks']:
                assert disk['segment_size'] == 1 * MiB
                assert disk['segment_sha256'] == segment_digests(
                    os.path.join(result['backup_dir'], disk['file']), 1 * MiB), disk['file']
        contents = [raw_content(os.path.join(result['backup_dir'], f"{d}.qcow2"), str(tmp_path))
                    for d in guest.disk_ids]
        k = model.find_point_in_time(contents, writer.writes, lowest, highest)
        assert k is not None, f"{result['backup']} is no single point in time of the guest"
        found.append((result['level'], k, lowest, highest))
    # Writes really raced the copies (otherwise this test proves nothing), and the full's
    # segments were hashed while QEMU wrote them, some of them again after its job.
    assert sum(high - low for _level, _k, low, high in found) > 50, found
    overlapped = [re.match(r'hashed (\d+) of (\d+) segments while QEMU wrote, (\d+) again', line)
                  for line in lines]
    early, _total, again = (int(n) for n in next(m for m in overlapped if m).groups())
    assert early > 0 and again > 0, lines
    writer.finish()
    guest.pause()
    last = backup(guest, store, config_dir, level='inc')
    contents = [raw_content(os.path.join(last['backup_dir'], f"{d}.qcow2"), str(tmp_path))
                for d in guest.disk_ids]
    assert model.find_point_in_time(contents, writer.writes, len(writer.writes),
                                    len(writer.writes)) == len(writer.writes)
    assert [r['level'] for r in results] == ['full', 'inc', 'inc', 'inc']
    assert last['level'] == 'inc'
    # ... and the live disk equals the restored chain.
    for index, disk in enumerate(guest.disk_ids):
        ref = guest.snapshot_disk(index, str(tmp_path / f'live{index}.qcow2'))
        ok, out = same_content(ref, os.path.join(last['backup_dir'], f'{disk}.qcow2'))
        assert ok, out


def test_each_backup_of_a_chain_restores_the_content_it_had(make_guest, store, config_dir,
                                                            tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    refs, results = [], []
    for step, (pattern, offset) in enumerate([(0x11, 0), (0x22, 4 * MiB), (0x33, 1 * MiB),
                                              (0x44, 15 * MiB)]):
        guest.write('vd0', pattern, offset, MiB)
        if step == 3:
            guest.discard('vd0', 0, 2 * MiB)  # zeroes must win over older data in the chain
        results.append(backup(guest, store, config_dir))
        refs.append(guest.snapshot_disk(0, str(tmp_path / f'ref{step}.qcow2')))
    assert [r['level'] for r in results] == ['full', 'inc', 'inc', 'inc']
    for result, ref in zip(results, refs):
        ok, out = same_content(ref, os.path.join(result['backup_dir'], 'vd0.qcow2'))
        assert ok, f"{result['backup']}: {out}"
    # Incrementals go through only what changed, and zeroes take no space.
    assert [r['disks'][0]['bytes_processed'] for r in results[1:]] == [MiB, MiB, 3 * MiB]
    assert [r['disks'][0]['bytes_written'] for r in results] == [MiB, MiB, MiB, MiB]
    # The manifest ties the chain together and records what restore will verify.
    index = json.load(open(os.path.join(results[2]['backup_dir'], 'index.json')))
    assert index['parent'] == results[1]['time']
    assert index['chain'] == results[0]['chain']
    assert index['disks'][0]['backing'] == f"../{results[1]['time']}/vd0.qcow2"
    info = json.loads(subprocess.run(
        ['qemu-img', 'info', '--output=json', os.path.join(results[2]['backup_dir'], 'vd0.qcow2')],
        capture_output=True, text=True, check=True).stdout)
    assert info['backing-filename'] == f"../{results[1]['time']}/vd0.qcow2"
    import hashlib
    with open(os.path.join(results[2]['backup_dir'], 'vd0.qcow2'), 'rb') as handle:
        data = handle.read()
    size = index['disks'][0]['segment_size']
    assert index['disks'][0]['segment_sha256'] == [
        hashlib.sha256(data[at:at + size]).hexdigest() for at in range(0, len(data), size)]
    for name in ('guest.json', 'client.log'):
        assert os.path.exists(os.path.join(results[2]['backup_dir'], name))
    # Only the newest backup's bitmap is left on the guest.
    assert bitmap_names(guest) == [f"guestvault.{results[0]['chain']}."
                                   f"{results[3]['time'].replace('-', '').replace(':', '')}"]


def test_bitmaps_survive_a_qemu_restart_and_a_crash_makes_auto_fall_back(
        make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x10, 0, MiB)
    full = backup(guest, store, config_dir, level='full')
    guest.stop()                       # a clean quit stores the persistent bitmap in the image
    guest.start()
    guest.write('vd0', 0x20, 2 * MiB, MiB)
    inc = backup(guest, store, config_dir, level='inc')
    assert inc['parent'] == full['time'] and inc['disks'][0]['bytes_written'] == MiB
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'a.qcow2')),
                           os.path.join(inc['backup_dir'], 'vd0.qcow2'))
    assert ok, out
    guest.stop()
    guest.start()                      # bitmap loaded from the image, marked in use...
    # QEMU listens on its sockets before it has opened the images: an answer over QMP means
    # initialisation is over, so the in-use flag is on disk (a loaded machine once killed
    # QEMU in between, and the bitmap stayed consistent)
    guest.execute('query-block')
    guest.kill()                       # ... and QEMU dies without storing it
    guest.start()
    with pytest.raises(ChainError, match='inconsistent'):
        backup(guest, store, config_dir, level='inc')
    fallback = backup(guest, store, config_dir, level='auto')
    assert fallback['level'] == 'full' and 'inconsistent' in fallback['level_reason']
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'b.qcow2')),
                           os.path.join(fallback['backup_dir'], 'vd0.qcow2'))
    assert ok, out
    # The new chain works: the inconsistent bitmap was retired with the old chain.
    assert all('.' + fallback['chain'] + '.' in name for name in bitmap_names(guest))
    assert backup(guest, store, config_dir)['level'] == 'inc'


def _kill_mid_backup(guest, store, config_dir, tmp_path, sig):
    """Start a slow backup in a separate process and send it ``sig`` while its job runs."""
    script = f"""
import sys
sys.path.insert(0, {os.path.join(os.path.dirname(__file__), '..')!r})
import conftest
from guestvault_engine.run.guest_backup import GuestBackupRequest, run_guest_backup
run_guest_backup(GuestBackupRequest(vmid={guest.vmid}, qmp_socket={guest.qmp_socket!r}, dumpdir={store!r},
                                    config_dir={config_dir!r}, level='inc', bwlimit=512))
"""
    env = dict(os.environ, GUESTVAULT_RUN_DIR=str(tmp_path / 'run'))
    proc = subprocess.Popen([sys.executable, '-c', script], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        jobs = guest.execute('query-block-jobs')
        if jobs and jobs[0]['offset'] > 0:
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"backup job never started: {proc.communicate()}")
    assert jobs[0]['speed'] == 512 * 1024   # bwlimit (KiB/s) reached QEMU's job
    assert hidden_in(store, guest.vmid)       # it is writing into a hidden .tmp directory
    os.kill(proc.pid, sig)
    proc.communicate(timeout=300)
    return jobs


def test_a_killed_backup_leaves_nothing_that_looks_complete_and_loses_no_write(
        make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x31, 0, 8 * MiB)
    full = backup(guest, store, config_dir, level='full')
    guest.write('vd0', 0x32, 0, 8 * MiB)
    _kill_mid_backup(guest, store, config_dir, tmp_path, signal.SIGKILL)
    assert backups_in(store, guest.vmid) == [full['time']]
    guest.write('vd0', 0x33, 12 * MiB, MiB)
    # The next run clears the leftovers (job, target node, .tmp) and continues the chain.
    nxt = backup(guest, store, config_dir, level='auto')
    assert nxt['level'] == 'inc' and nxt['parent'] == full['time']
    assert hidden_in(store, guest.vmid) == []
    assert guest.execute('query-block-jobs') == []
    assert not [n for n in guest.execute('query-named-block-nodes', flat=True)
                if n['node-name'].startswith('gvt-')]
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(nxt['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_a_terminated_backup_cleans_up_after_itself(make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x41, 0, 8 * MiB)
    full = backup(guest, store, config_dir, level='full')
    guest.write('vd0', 0x42, 0, 8 * MiB)
    _kill_mid_backup(guest, store, config_dir, tmp_path, signal.SIGTERM)
    assert backups_in(store, guest.vmid) == [full['time']]
    assert hidden_in(store, guest.vmid) == []
    assert guest.execute('query-block-jobs') == []
    assert len(bitmap_names(guest)) == 1   # the parent's bitmap, still counting every write


def test_qemu_dying_mid_backup_fails_the_backup_cleanly(make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x51, 0, 8 * MiB)
    full = backup(guest, store, config_dir, level='full')
    guest.write('vd0', 0x52, 0, 8 * MiB)
    killer = threading.Timer(1.0, guest.kill)
    killer.start()
    with pytest.raises((GuestUnreachable, BackupFailed)) as err:
        backup(guest, store, config_dir, level='inc', bwlimit=512)
    killer.join()
    # Said in our words, not the QMP library's ("Call disconnect() to return to IDLE state").
    assert 'disconnect()' not in str(err.value) and 'IDLE' not in str(err.value)
    if isinstance(err.value, GuestUnreachable):
        assert 'QEMU went away' in str(err.value), err.value
    assert backups_in(store, guest.vmid) == [full['time']]
    assert hidden_in(store, guest.vmid) == []
    guest.start()
    nxt = backup(guest, store, config_dir, level='auto')
    # QEMU never stored the bitmap it created at the full backup: the chain must restart.
    assert nxt['level'] == 'full' and 'no bitmap' in nxt['level_reason']
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(nxt['backup_dir'], 'vd0.qcow2'))
    assert ok, out


@pytest.fixture
def small_store(tmp_path):
    with small_tmpfs(tmp_path / 'small', '12M') as path:
        yield path


def test_a_full_target_disk_fails_the_backup_and_the_chain_goes_on(
        make_guest, small_store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 32 * MiB)])
    guest.write('vd0', 0x61, 0, 4 * MiB)
    full = backup(guest, small_store, config_dir, level='full')
    random_data = tmp_path / 'random.bin'
    random_data.write_bytes(os.urandom(16 * MiB))
    guest.write_file('vd0', str(random_data), 8 * MiB, 16 * MiB)
    warned = backup(guest, small_store, config_dir, level='inc', check_mode=True)
    assert any('may run out of space' in w for w in warned['warnings']), warned['warnings']
    with pytest.raises(BackupFailed) as err:
        backup(guest, small_store, config_dir, level='inc')
    # The path, the free and the needed bytes, and what to do.
    message = str(err.value)
    assert f'dumpdir {small_store} is full: ' in message and ' bytes free, ' in message
    assert re.search(r'needed about [1-9][0-9]{6,} bytes', message), message
    assert 'prune older backups' in message
    assert backups_in(small_store, guest.vmid) == [full['time']]
    assert hidden_in(small_store, guest.vmid) == []
    subprocess.run(['mount', '-o', 'remount,size=64M', small_store], check=True)
    nxt = backup(guest, small_store, config_dir, level='inc')
    assert nxt['parent'] == full['time']
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(nxt['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_hook_script_sees_vzdump_phases_and_can_abort(make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    record = tmp_path / 'phases.txt'
    fail_phase = tmp_path / 'fail-phase'   # a file: the hook sees no variable of ours
    script = tmp_path / 'hook.sh'
    script.write_text(f"""#!/bin/sh
echo "$1 $2 $3 storeid=$STOREID dumpdir=$DUMPDIR vmtype=$VMTYPE target=$TARGET" >> {record}
[ "$1" = log-end ] && cp "$LOGFILE" {tmp_path / 'log-end.txt'}
[ "$1" = "$(cat {fail_phase} 2>/dev/null)" ] && exit 3
exit 0
""")
    script.chmod(0o755)
    full = backup(guest, store, config_dir, script=str(script))
    phases = [line.split()[0] for line in record.read_text().splitlines()]
    assert phases == ['backup-start', 'backup-end', 'log-end']
    # as vzdump: at log-end the log is complete, in the backup, where LOGFILE says
    kept = (tmp_path / 'log-end.txt').read_text()
    assert f"starting backup of VM {guest.vmid}" in kept
    assert kept == open(os.path.join(full['backup_dir'], 'client.log')).read()
    assert f"snapshot {guest.vmid} storeid= dumpdir={store} vmtype=qemu " \
           f"target={full['backup_dir']}" in record.read_text().splitlines()[1]
    for phase in ('backup-start', 'backup-end'):
        record.write_text('')
        fail_phase.write_text(phase)
        with pytest.raises(HookFailed, match=phase):
            backup(guest, store, config_dir, script=str(script))
        assert record.read_text().splitlines()[-1].startswith('backup-abort')
        assert backups_in(store, guest.vmid) == [full['time']]
        assert hidden_in(store, guest.vmid) == []
    # The failed runs kept the chain: the next backup is incremental on the full.
    guest.write('vd0', 0x71, 0, MiB)
    nxt = backup(guest, store, config_dir)
    assert nxt['level'] == 'inc' and nxt['parent'] == full['time']
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(nxt['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_raw_disks_are_copied_whole_and_only_when_asked(make_guest, store, config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB), ('raw', 8 * MiB)])
    guest.write('vd1', 0x7A, 0, MiB)
    plain = backup(guest, store, config_dir)
    assert [d['id'] for d in plain['disks']] == ['vd0']
    assert any('vd1' in w and 'include_raw' in w for w in plain['warnings'])
    full = backup(guest, store, config_dir, include_raw=True, level='full')
    guest.write('vd1', 0x7B, 4 * MiB, MiB)
    guest.write('vd0', 0x7C, 0, MiB)
    inc = backup(guest, store, config_dir, include_raw=True)
    levels = {d['id']: d['level'] for d in inc['disks']}
    assert inc['level'] == 'inc' and levels == {'vd0': 'inc', 'vd1': 'full'}
    assert full['disks'][1]['bitmap'] is None
    for index, disk in enumerate(guest.disk_ids):
        ok, out = same_content(guest.snapshot_disk(index, str(tmp_path / f'r{index}.qcow2')),
                               os.path.join(inc['backup_dir'], f'{disk}.qcow2'))
        assert ok, out


def test_uefi_variables_come_along_and_firmware_code_does_not(make_guest, store, config_dir,
                                                              tmp_path):
    code = '/usr/share/OVMF/OVMF_CODE.fd'
    if not os.path.exists(code):
        pytest.skip('ovmf not installed')
    variables = tmp_path / 'vars.fd'
    variables.write_bytes(open('/usr/share/OVMF/OVMF_VARS.fd', 'rb').read())
    guest = make_guest(disks=[('qcow2', 16 * MiB)], extra_args=[
        '-drive', f'if=pflash,format=raw,readonly=on,file={code}',
        '-drive', f'if=pflash,format=raw,file={variables}'])
    result = backup(guest, store, config_dir)
    assert sorted(d['id'] for d in result['disks']) == ['pflash1', 'vd0']
    ok, out = same_content(str(variables), os.path.join(result['backup_dir'], 'pflash1.qcow2'))
    assert ok, out


def test_named_chains_coexist_and_an_unnamed_full_leaves_them_alone(make_guest, store,
                                                                    config_dir, tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    daily = backup(guest, store, config_dir, level='full', chain='daily')
    weekly = backup(guest, store, config_dir, level='full', chain='weekly')
    unnamed1 = backup(guest, store, config_dir, level='full')
    unnamed2 = backup(guest, store, config_dir, level='full')
    chains = {name.split('.')[1] for name in bitmap_names(guest)}
    assert chains == {'daily', 'weekly', unnamed2['chain']}
    assert unnamed1['chain'] != unnamed2['chain']
    guest.write('vd0', 0x5A, 0, MiB)
    inc = backup(guest, store, config_dir, level='inc', chain='daily')
    assert inc['parent'] == daily['time'] and inc['disks'][0]['bytes_written'] == MiB
    inc = backup(guest, store, config_dir, level='inc', chain='weekly')
    assert inc['parent'] == weekly['time'] and inc['disks'][0]['bytes_written'] == MiB
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(inc['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_monthly_chain_period_starts_a_new_chain_in_a_new_month(make_guest, store, config_dir):
    from datetime import datetime, timedelta, timezone
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    first = backup(guest, store, config_dir, level='auto', chain_period='monthly')
    same_month = backup(guest, store, config_dir, level='auto', chain_period='monthly')
    assert same_month['level'] == 'inc'
    next_month = datetime.now(timezone.utc) + timedelta(days=32)
    later = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket, dumpdir=store,
                                                config_dir=config_dir, chain_period='monthly'),
                             now=next_month)
    assert later['level'] == 'full' and 'monthly' in later['level_reason']
    assert later['chain'] != first['chain']


def test_compressed_backup_uses_zstd_and_restores_the_same(make_guest, store, config_dir,
                                                           tmp_path):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x00, 0, 16 * MiB)
    guest.write('vd0', 0x61, 0, 8 * MiB)
    result = backup(guest, store, config_dir, compress='zstd')
    image = os.path.join(result['backup_dir'], 'vd0.qcow2')
    info = json.loads(subprocess.run(['qemu-img', 'info', '--output=json', image],
                                     capture_output=True, text=True, check=True).stdout)
    assert info['format-specific']['data']['compression-type'] == 'zstd'
    assert result['disks'][0]['size'] < 2 * MiB   # 8 MiB of one byte compresses to little
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')), image)
    assert ok, out


def test_notes_and_protection_are_written_with_the_backup(make_guest, store, config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)], name='web01')
    result = backup(guest, store, config_dir, protected=True, cluster='lab',
                    notes_template='{{guestname}} ({{vmid}}) on {{node}}\\nof {{cluster}}',
                    node='node1')
    assert open(os.path.join(result['backup_dir'], 'notes')).read() == \
        f'web01 ({guest.vmid}) on node1\nof lab'
    assert os.path.exists(os.path.join(result['backup_dir'], '.protected'))
    assert result['protected'] is True


def test_check_mode_decides_and_changes_nothing(make_guest, store, config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    plan = backup(guest, store, config_dir, check_mode=True)
    assert plan['level'] == 'full' and 'no earlier backup' in plan['level_reason']
    assert [d['id'] for d in plan['disks']] == ['vd0']
    assert not os.path.exists(os.path.join(store, 'vm'))
    assert bitmap_names(guest) == []
    backup(guest, store, config_dir)
    before = sorted(os.listdir(os.path.join(store, 'vm', str(guest.vmid))))
    plan = backup(guest, store, config_dir, check_mode=True)
    assert plan['level'] == 'inc'
    assert sorted(os.listdir(os.path.join(store, 'vm', str(guest.vmid)))) == before


def test_suspend_pauses_a_running_guest_only_around_the_point_in_time(make_guest, store,
                                                                      config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.execute('cont')
    result = backup(guest, store, config_dir, mode='suspend')
    assert 0 < result['pause_seconds'] < result['duration'], result
    assert guest.execute('query-status')['status'] == 'running'


def test_snapshot_without_agent_warns_that_it_is_only_crash_consistent(make_guest, store,
                                                                       config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.execute('cont')
    result = backup(guest, store, config_dir, mode='snapshot')
    assert any('not frozen' in w and 'crash-consistent' in w for w in result['warnings'])


def test_stop_mode_gives_up_after_stopwait_and_leaves_the_guest_running(make_guest, store,
                                                                        config_dir):
    from guestvault_engine.errors import ConsistencyError
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.execute('cont')   # no OS: nothing answers the ACPI power button
    with pytest.raises(ConsistencyError, match='stopwait'):
        backup(guest, store, config_dir, mode='stop', stopwait=0.03)
    assert guest.execute('query-status')['status'] == 'running'
    assert backups_in(store, guest.vmid) == [] and hidden_in(store, guest.vmid) == []
    assert bitmap_names(guest) == []


def test_stop_mode_on_a_guest_that_is_not_running_backs_up_directly(make_guest, store,
                                                                    config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    result = backup(guest, store, config_dir, mode='stop', stopwait=0.01)
    assert result['level'] == 'full' and result['downtime_seconds'] is None


def test_guest_already_being_backed_up_is_refused_after_lockwait(make_guest, store, config_dir):
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    from guestvault_engine.errors import LockTimeout
    from guestvault_engine.storage.directory import file_lock
    lock = os.path.join(os.environ['GUESTVAULT_RUN_DIR'], f'{guest.vmid}.lock')
    with file_lock(lock, 0, 'test'):
        with pytest.raises(LockTimeout, match='locked by another run'):
            backup(guest, store, config_dir, lockwait=0.01)
    assert backups_in(store, guest.vmid) == []


def test_guest_restarted_as_a_new_labguest_keeps_its_bitmaps(tmp_path, store, config_dir):
    """A guest started again from the same images (as after a host reboot) continues its chain."""
    guest = LabGuest(str(tmp_path / 'g'), disks=[('qcow2', 16 * MiB)], vmid=9050).start()
    try:
        full = backup(guest, store, config_dir)
        guest.stop()
        guest = LabGuest(str(tmp_path / 'g'), disks=[('qcow2', 16 * MiB)], vmid=9050).start()
        guest.write('vd0', 0x66, 0, MiB)
        inc = backup(guest, store, config_dir)
        assert inc['level'] == 'inc' and inc['parent'] == full['time']
    finally:
        guest.stop()


def test_stop_mode_brings_back_a_guest_whose_qemu_exits_on_shutdown(make_guest, store,
                                                                    config_dir, tmp_path):
    """The guest "powers off" (QEMU quits on the ACPI request, as without -no-shutdown); the
    registry's start command starts it again paused, the point in time is fixed while it is
    off, and it runs again right after, with the stop-mode hook phases in vzdump's order."""
    from qemu.qmp.legacy import QEMUMonitorProtocol
    guest = make_guest(disks=[('qcow2', 16 * MiB)], vmid=777)
    guest.write('vd0', 0x3C, 0, 2 * MiB)
    guest.execute('cont')
    tools = os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'labguest.py')
    start = f"{sys.executable} {tools} start {guest.workdir} --disks 1 --size 16M --vmid 777"
    with open(os.path.join(config_dir, 'guests.d', '777.conf'), 'w') as handle:
        handle.write(f"name: stopper\nqmp: {guest.qmp_socket}\nstart: {start}\n")
    record = tmp_path / 'phases.txt'
    hook = tmp_path / 'hook.sh'
    hook.write_text(f'#!/bin/sh\necho "$1" >> {record}\n')
    hook.chmod(0o755)

    def power_off_on_request():
        monitor = QEMUMonitorProtocol(guest.control_socket)
        monitor.connect()
        while True:
            event = monitor.pull_event(wait=True)
            if event and event['event'] == 'POWERDOWN':
                monitor.cmd('quit')
                break
        try:
            monitor.close()
        except EOFError:  # QEMU is gone, as intended
            pass
    guest._close_qmp()  # the thread uses its own control connection; QEMU serves one at a time
    watcher = threading.Thread(target=power_off_on_request, daemon=True)
    watcher.start()
    result = run_guest_backup(GuestBackupRequest(vmid=777, dumpdir=store, config_dir=config_dir,
                                                 mode='stop', stopwait=0.5, script=str(hook)))
    watcher.join(10)
    assert result['downtime_seconds'] is not None and result['level'] == 'full'
    assert record.read_text().split() == ['backup-start', 'pre-stop', 'pre-restart',
                                          'post-restart', 'backup-end', 'log-end']
    assert guest.execute('query-status')['status'] == 'running'
    guest.pause()
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(result['backup_dir'], 'vd0.qcow2'))
    assert ok, out


def test_max_age_makes_a_second_run_change_nothing(make_guest, store, config_dir):
    from guestvault_engine.errors import ConfigError
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    first = backup(guest, store, config_dir, max_age='1h')
    again = backup(guest, store, config_dir, max_age='1h')
    assert first['changed'] is True and again['changed'] is False
    assert again['backup'] == first['backup'] and 'max_age' in again['skipped_reason']
    assert backups_in(store, guest.vmid) == [first['time']]
    # Another chain has no recent backup yet, and an expired age takes a new one.
    assert backup(guest, store, config_dir, max_age='1h', chain='weekly')['changed'] is True
    # Two backups within one second are named a second apart, so the newest name may lie up
    # to a second ahead of the clock: wait past that before an age of 1 s has passed.
    time.sleep(2.1)
    assert backup(guest, store, config_dir, max_age='1s')['changed'] is True
    with pytest.raises(ConfigError, match='max_age'):
        backup(guest, store, config_dir, max_age='soon')


def test_performance_max_workers_reaches_qemu_and_the_backup_is_exact(make_guest, store,
                                                                      config_dir, tmp_path,
                                                                      monkeypatch):
    from guestvault_engine.guest import qmp as engine_qmp
    sent = []
    original = engine_qmp.QmpSession.execute

    def recording(self, command, arguments=None, timeout=None):
        sent.append((command, arguments))
        return original(self, command, arguments, timeout)
    monkeypatch.setattr(engine_qmp.QmpSession, 'execute', recording)
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    guest.write('vd0', 0x6D, 0, 4 * MiB)
    result = backup(guest, store, config_dir, max_workers=4)
    # The job QEMU accepted (QEMU validates x-perf) is the one that carried the setting.
    (transaction,) = [args for command, args in sent if command == 'transaction'
                      and any(a['type'] == 'blockdev-backup' for a in args['actions'])]
    jobs = [a['data'] for a in transaction['actions'] if a['type'] == 'blockdev-backup']
    assert [job['x-perf'] for job in jobs] == [{'max-workers': 4}]
    assert result['disks'][0]['bytes_processed'] == 16 * MiB
    ok, out = same_content(guest.snapshot_disk(0, str(tmp_path / 'ref.qcow2')),
                           os.path.join(result['backup_dir'], 'vd0.qcow2'))
    assert ok, out
    from guestvault_engine.errors import ConfigError
    with pytest.raises(ConfigError, match='max_workers'):
        backup(guest, store, config_dir, max_workers=0)
    assert hidden_in(store, guest.vmid) == []


def test_fulls_into_two_storages_within_one_second_are_named_a_second_apart(
        make_guest, store, config_dir, tmp_path):
    # Each storage names its backups apart, but a bitmap's name (its chain, a new generated
    # chain being the full's time) is the disk's: QEMU refused the second full's bitmap.
    guest = make_guest(disks=[('qcow2', 16 * MiB)])
    other = str(tmp_path / 'other-store')
    os.makedirs(other)
    now = datetime.now(timezone.utc)
    first = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                dumpdir=store, config_dir=config_dir,
                                                level='full'), now=now)
    second = run_guest_backup(GuestBackupRequest(vmid=guest.vmid, qmp_socket=guest.qmp_socket,
                                                 dumpdir=other, config_dir=config_dir,
                                                 level='full'), now=now)
    assert parse_time(second['time']) - parse_time(first['time']) == timedelta(seconds=1)
    assert first['chain'] != second['chain']
    assert {name.split('.')[1] for name in bitmap_names(guest)} == {second['chain']}
