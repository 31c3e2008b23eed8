"""Pull capture (issue 11) on real QEMU: the point in time over NBD, its extents, an
incremental's frozen bitmap, the clean-up, and what a killed pull run leaves.

The guest's disks are written through its block device (qemu-io over human-monitor-command),
as a guest's own writes arrive; what NBD serves is compared with the disk as it was at the
point in time (``qemu-img compare``).
"""
import json
import os
import random
import subprocess

import pytest

from guestvault_engine.errors import BackupFailed
from guestvault_engine.guest.capture import DiskJob
from guestvault_engine.guest.disks import discover_disks
from guestvault_engine.guest.pull import PullCapture
from guestvault_engine.guest.qmp import QmpSession
from guestvault_engine.run import guest_runs, leftovers

MiB = 1 << 20
KiB = 1 << 10
VMID = 9301
CHAIN = 'guestvault.t.20260101T000000Z'
NEXT = 'guestvault.t.20260102T000000Z'


def fleece_image(path, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'qcow2', path, str(size)], check=True)
    return path


def read_to_raw(source, path):
    """The source's whole content into a sparse raw file (zero extents stay holes)."""
    with open(path, 'wb') as out, source.reader() as reader:
        out.truncate(source.size)
        for offset, length, zero in source.extents():
            if zero:
                continue
            for start in range(offset, offset + length, 4 * MiB):
                out.seek(start)
                out.write(reader.pread(min(4 * MiB, offset + length - start), start))
    return path


def same_image(raw, reference):
    done = subprocess.run(['qemu-img', 'compare', '-q', '-f', 'raw', '-F', 'qcow2', raw,
                           reference], check=False)
    return done.returncode == 0


def named_nodes(qmp):
    return [n['node-name'] for n in qmp.execute('query-named-block-nodes', {'flat': True})]


def bitmaps(qmp):
    return sorted({b['name'] for n in qmp.execute('query-named-block-nodes', {'flat': True})
                   for b in n.get('dirty-bitmaps', []) if b.get('name')})


def assert_nothing_left(qmp, capture):
    assert qmp.execute('query-block-exports') == []
    assert qmp.execute('query-block-jobs') == []
    assert not set(capture.targets.values()) & set(named_nodes(qmp))
    assert not [b for b in bitmaps(qmp) if b.startswith('gvfrozen-')]
    assert not os.path.exists(capture.socket_path)


def capture_of(qmp, guest, tmp_path, new_bitmap=None, since_bitmap=None, name='f'):
    disk = discover_disks(qmp)[0]
    fleece = fleece_image(str(tmp_path / f'fleecing/{VMID}-2026-01-01T00:00:00Z/{name}.qcow2'),
                          disk.virtual_size)
    job = DiskJob(disk, fleece, new_bitmap=new_bitmap, since_bitmap=since_bitmap)
    return PullCapture(qmp, guest.vmid, [job], lambda m: None,
                       os.path.join(guest_runs.run_dir(), f'{guest.vmid}.nbd'))


def test_full_point_in_time_and_holes(make_guest, tmp_path):
    guest = make_guest(disks=[('qcow2', '64M')], vmid=VMID)
    guest.write('vd0', 0x11, 0, 4 * MiB)
    guest.write('vd0', 0x22, 20 * MiB, 3 * MiB + 512 * KiB)
    guest.qemu_io('vd0', f'write -z {40 * MiB} {4 * MiB}')
    guest.write('vd0', 0x33, 60 * MiB, 4 * MiB)
    reference = guest.snapshot_disk(0, str(tmp_path / 'reference.qcow2'))
    with QmpSession(guest.qmp_socket) as qmp:
        capture = capture_of(qmp, guest, tmp_path, new_bitmap=CHAIN)
        capture.open_targets()
        capture.start(speed_per_disk=1024, max_workers=4)
        assert capture.transaction_seconds < 2
        # Written after the point in time: neither in the data nor in the extents.
        guest.write('vd0', 0x44, 0, 1 * MiB)
        guest.write('vd0', 0x55, 30 * MiB, 2 * MiB)
        source = capture.sources()['vd0']
        assert source.size == 64 * MiB and not source.incremental
        extents = source.extents()
        assert extents[0][0] == 0 and sum(extent[1] for extent in extents) == source.size
        assert all(a[0] + a[1] == b[0] for a, b in zip(extents, extents[1:]))
        data = [(o, n) for o, n, zero in extents if not zero]
        assert data == [(0, 4 * MiB), (20 * MiB, 3 * MiB + 512 * KiB), (60 * MiB, 4 * MiB)]
        raw = read_to_raw(source, str(tmp_path / 'pulled.raw'))
        assert same_image(raw, reference)
        with source.reader() as reader:
            assert reader.pread(4096, 30 * MiB) == bytes(4096)
            assert reader.pread(4096, 0) == b'\x11' * 4096
        capture.close_targets()
        # The writes after the point in time did land on the disk.
        assert not same_image(raw, guest.snapshot_disk(0, str(tmp_path / 'after.qcow2')))
        assert_nothing_left(qmp, capture)
        assert CHAIN in bitmaps(qmp)  # the chain's bitmap is the caller's to retire
        assert [d.in_job for d in discover_disks(qmp)] == [False]


def test_incremental_frozen_bitmap(make_guest, tmp_path):
    guest = make_guest(disks=[('qcow2', '64M')], vmid=VMID)
    guest.write('vd0', 0x11, 0, 64 * MiB)
    with QmpSession(guest.qmp_socket) as qmp:
        first = capture_of(qmp, guest, tmp_path, new_bitmap=CHAIN, name='first')
        first.open_targets()
        first.start()
        first.close_targets()
        written = [(1 * MiB, 64 * KiB), (8 * MiB, 3 * MiB), (63 * MiB, 1 * MiB)]
        for offset, length in written:
            guest.write('vd0', 0x66, offset, length)
        reference = guest.snapshot_disk(0, str(tmp_path / 'reference.qcow2'))
        second = capture_of(qmp, guest, tmp_path, new_bitmap=NEXT, since_bitmap=CHAIN,
                            name='second')
        second.open_targets()
        second.start()
        guest.write('vd0', 0x77, 30 * MiB, 1 * MiB)   # after the point in time
        source = second.sources()['vd0']
        assert source.incremental
        assert source.dirty_extents() == written
        pulled = read_to_raw(source, str(tmp_path / 'pulled.raw'))
        assert same_image(pulled, reference)
        assert not same_image(pulled, guest.snapshot_disk(0, str(tmp_path / 'after.qcow2')))
        # The previous bitmap went on counting; the new one counts from the point in time.
        counts = {b['name']: b['count'] for b in discover_disks(qmp)[0].bitmaps}
        assert counts[NEXT] == 1 * MiB
        assert counts[CHAIN] == sum(w[1] for w in written) + 1 * MiB
        entries = second.journal_entries()
        assert entries['frozen_bitmaps'] == [[source_node(qmp), second.frozen['vd0']]]
        second.close_targets()
        assert_nothing_left(qmp, second)
        assert {CHAIN, NEXT} <= set(bitmaps(qmp))


def source_node(qmp):
    return discover_disks(qmp)[0].node


def test_abort_removes_the_new_bitmap(make_guest, tmp_path):
    guest = make_guest(disks=[('qcow2', '64M')], vmid=VMID)
    with QmpSession(guest.qmp_socket) as qmp:
        first = capture_of(qmp, guest, tmp_path, new_bitmap=CHAIN, name='first')
        first.open_targets()
        first.start()
        first.close_targets()
        capture = capture_of(qmp, guest, tmp_path, new_bitmap=NEXT, since_bitmap=CHAIN,
                             name='second')
        capture.open_targets()
        capture.start()
        capture.sources()['vd0'].dirty_extents()
        capture.check_jobs()
        qmp.cancel_job(capture.jobs['vd0'])   # the job ends behind the capture's back
        qmp.wait_for_jobs([capture.jobs['vd0']], timeout=300)
        with pytest.raises(BackupFailed, match='vd0: its job .* has ended'):
            capture.check_jobs()
        capture.abort()
        assert_nothing_left(qmp, capture)
        assert bitmaps(qmp) == [CHAIN]
        capture.abort()  # twice, or after QEMU let go: never raises


def test_leftovers_of_a_killed_pull_run(make_guest, tmp_path, monkeypatch):
    fleecing = tmp_path / 'fleecing'
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(fleecing))
    guest = make_guest(disks=[('qcow2', '64M')], vmid=VMID)
    guest.write('vd0', 0x11, 0, 4 * MiB)
    with QmpSession(guest.qmp_socket) as qmp:
        first = capture_of(qmp, guest, tmp_path, new_bitmap=CHAIN, name='first')
        first.open_targets()
        first.start()
        first.close_targets()
    stray = fleecing / f'{VMID}-2026-01-01T00:00:00Z'
    assert stray.is_dir()
    # The killed run: journal written, point in time up, a reader connected; then the process
    # is gone without closing anything (its QMP and NBD connections drop with it).
    qmp = QmpSession(guest.qmp_socket).connect()
    capture = capture_of(qmp, guest, tmp_path, new_bitmap=NEXT, since_bitmap=CHAIN,
                         name='killed')
    guest_runs.record(VMID, storage_path=None, staged_dir=None, final_dir=None,
                      **capture.journal_entries())
    capture.open_targets()
    capture.start()
    # A client still connected (as a reader of a run that is not quite dead yet would be):
    # the clean-up drops it.
    connected = capture.sources()['vd0']
    connected.dirty_extents()
    qmp.close()
    del capture, qmp

    with QmpSession(guest.qmp_socket) as qmp:
        disks = discover_disks(qmp)
        found = leftovers.find(qmp, VMID, disks)
        assert len(found['exports']) == 1 and found['exports'][0].startswith(f'gvx-{VMID}-')
        assert len(found['jobs']) == 1 and len(found['targets']) == 1
        assert found['nbd_server'] == os.path.join(guest_runs.run_dir(), f'{VMID}.nbd')
        assert [f['name'][:len(f'gvfrozen-{VMID}-')] for f in found['frozen_bitmaps']] \
            == [f'gvfrozen-{VMID}-']
        assert found['fleecing'] == [str(stray)]
        assert [o['name'] for o in found['orphan_bitmaps']] == [NEXT]
        assert leftovers.anything(found)
        logged = []
        cleared = leftovers.clear(qmp, VMID, disks, None, logged.append)
        assert cleared['exports'] == found['exports']
        assert qmp.execute('query-block-exports') == []
        assert qmp.execute('query-block-jobs') == []
        assert not [n for n in named_nodes(qmp) if n.startswith(f'gvt-{VMID}-')]
        assert bitmaps(qmp) == [CHAIN]
        assert not stray.exists()
        assert guest_runs.leftover(VMID) is None
        assert not leftovers.anything(leftovers.find(qmp, VMID, discover_disks(qmp)))
        connected.close()
        # The NBD server is gone too: a new pull capture can start its own.
        again = capture_of(qmp, guest, tmp_path, new_bitmap=None, name='again')
        again.open_targets()
        again.start()
        assert again.sources()['vd0'].extents()[0] == (0, 4 * MiB, False)
        again.close_targets()
        assert_nothing_left(qmp, again)


def test_extents_of_a_fragmented_disk_match_qemu_img_map(make_guest, tmp_path):
    """Many extents over a large export: every block status answer is followed on to the end."""
    size = 4 << 30
    guest = make_guest(disks=[('qcow2', str(size))], vmid=VMID)
    rng = random.Random(7)
    for offset in sorted(rng.sample(range(0, size // MiB), 300)):
        guest.write('vd0', 0x5a, offset * MiB, 64 * KiB * rng.randint(1, 4))
    reference = guest.snapshot_disk(0, str(tmp_path / 'reference.qcow2'))
    mapped = json.loads(subprocess.run(['qemu-img', 'map', '--output=json', reference],
                                       check=True, capture_output=True, text=True).stdout)
    expected = []
    for entry in mapped:
        if entry['data'] and not entry['zero']:
            if expected and expected[-1][0] + expected[-1][1] == entry['start']:
                expected[-1] = (expected[-1][0], expected[-1][1] + entry['length'])
            else:
                expected.append((entry['start'], entry['length']))
    with QmpSession(guest.qmp_socket) as qmp:
        capture = capture_of(qmp, guest, tmp_path)
        capture.open_targets()
        capture.start()
        extents = capture.sources()['vd0'].extents()
        capture.close_targets()
    assert [(o, n) for o, n, zero in extents if not zero] == expected
    assert sum(extent[1] for extent in extents) == size and len(expected) > 200


def test_two_disks_share_one_point_in_time(make_guest, tmp_path):
    """A full of one disk and an incremental of another in one transaction."""
    guest = make_guest(disks=[('qcow2', '64M'), ('qcow2', '32M')], vmid=VMID)
    guest.write('vd0', 0x11, 0, 8 * MiB)
    guest.write('vd1', 0x12, 4 * MiB, 8 * MiB)
    with QmpSession(guest.qmp_socket) as qmp:
        disks = discover_disks(qmp)
        qmp.execute('block-dirty-bitmap-add', {'node': disks[1].node, 'name': CHAIN,
                                               'persistent': True})
        guest.write('vd1', 0x13, 16 * MiB, 2 * MiB)
        references = [guest.snapshot_disk(i, str(tmp_path / f'reference{i}.qcow2'))
                      for i in (0, 1)]
        jobs = [DiskJob(disks[0], fleece_image(str(tmp_path / 'f0.qcow2'), disks[0].virtual_size),
                        new_bitmap=NEXT),
                DiskJob(disks[1], fleece_image(str(tmp_path / 'f1.qcow2'), disks[1].virtual_size),
                        new_bitmap=NEXT, since_bitmap=CHAIN)]
        capture = PullCapture(qmp, VMID, jobs, lambda m: None,
                              os.path.join(guest_runs.run_dir(), f'{VMID}.nbd'))
        capture.open_targets()
        capture.start()
        guest.write('vd0', 0x21, 0, 1 * MiB)
        guest.write('vd1', 0x22, 16 * MiB, 1 * MiB)
        sources = capture.sources()
        assert not sources['vd0'].incremental and sources['vd1'].incremental
        assert sources['vd1'].dirty_extents() == [(16 * MiB, 2 * MiB)]
        for index, disk_id in enumerate(('vd0', 'vd1')):
            pulled = read_to_raw(sources[disk_id], str(tmp_path / f'pulled{index}.raw'))
            assert same_image(pulled, references[index]), disk_id
        capture.close_targets()
        assert_nothing_left(qmp, capture)


def test_leftovers_of_a_pull_run_killed_before_its_point_in_time(make_guest, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(tmp_path / 'fleecing'))
    guest = make_guest(disks=[('qcow2', '64M')], vmid=VMID)
    qmp = QmpSession(guest.qmp_socket).connect()
    capture = capture_of(qmp, guest, tmp_path, new_bitmap=NEXT, name='killed')
    guest_runs.record(VMID, storage_path=None, staged_dir=None, final_dir=None,
                      **capture.journal_entries())
    capture.open_targets()
    qmp.close()
    with QmpSession(guest.qmp_socket) as qmp:
        found = leftovers.find(qmp, VMID, discover_disks(qmp))
        assert found['nbd_server'] is None and found['exports'] == [] and found['jobs'] == []
        assert found['targets'] == list(capture.targets.values())
        assert len(found['fleecing']) == 1
        leftovers.clear(qmp, VMID, discover_disks(qmp), None, lambda m: None)
        assert not leftovers.anything(leftovers.find(qmp, VMID, discover_disks(qmp)))
        assert not os.listdir(tmp_path / 'fleecing')
