"""format/overlap.py: which segments hashed while QEMU wrote are hashed again, and the digests
of the final file that come out (whatever was written where, after which bitmap)."""
import hashlib
import os
import threading

import pytest

from guestvault_engine.errors import BackupFailed, QmpCommandFailed
from guestvault_engine.format import overlap
from guestvault_engine.format.overlap import OverlappedDigests, to_hash_again
from guestvault_engine.guest import capture
from guestvault_engine.guest.capture import DiskJob, PushCapture
from guestvault_engine.guest.qmp import JobOutcome

SEG = 1024
FINAL = [(0, SEG), (SEG, SEG), (2 * SEG, SEG), (3 * SEG, 100)]


def test_a_segment_never_hashed_is_hashed_at_the_end():
    assert to_hash_again({0: (SEG, 0)}, {0: []}, FINAL) == FINAL[1:]


def test_a_write_after_the_batch_bitmap_rehashes_only_the_segments_it_touches():
    hashed = {0: (SEG, 0), SEG: (SEG, 0), 2 * SEG: (SEG, 0)}
    # one byte at each edge: the last byte of segment 0, the first of segment 2
    dirty = {0: [(SEG - 1, 1), (2 * SEG, 1)]}
    assert to_hash_again(hashed, dirty, FINAL[:3]) == [(0, SEG), (2 * SEG, SEG)]


def test_ranges_ending_or_starting_at_a_segment_edge_leave_it_alone():
    hashed = {SEG: (SEG, 0)}
    dirty = {0: [(0, SEG), (2 * SEG, SEG)]}     # segments 0 and 2 only
    assert to_hash_again(hashed, dirty, [(SEG, SEG)]) == []


def test_a_write_seen_only_by_an_earlier_bitmap_was_read_by_a_later_batch():
    # written after bitmap 0 was added, before bitmap 1: the batch-1 read saw it
    hashed = {0: (SEG, 1), SEG: (SEG, 0)}
    dirty = {0: [(0, 2 * SEG)], 1: []}
    assert to_hash_again(hashed, dirty, FINAL[:2]) == [(SEG, SEG)]


def test_unknown_dirty_ranges_or_a_missing_batch_rehash_everything_they_cover():
    hashed = {0: (SEG, 0), SEG: (SEG, 1)}
    assert to_hash_again(hashed, None, FINAL[:2]) == FINAL[:2]
    assert to_hash_again(hashed, {0: []}, FINAL[:2]) == [(SEG, SEG)]


def test_a_segment_hashed_shorter_than_the_final_one_is_hashed_again():
    assert to_hash_again({3 * SEG: (50, 0)}, {0: []}, FINAL[3:]) == FINAL[3:]


def test_segments_hashed_once_the_image_was_closed_are_never_hashed_again():
    hashed = {0: (SEG, 0), SEG: (SEG, overlap.CLOSED), 3 * SEG: (100, overlap.CLOSED)}
    everything = {0: [(0, 4 * SEG)]}
    assert to_hash_again(hashed, everything, FINAL) == [(0, SEG), (2 * SEG, SEG)]
    assert to_hash_again(hashed, None, FINAL) == [(0, SEG), (2 * SEG, SEG)]


def sha_segments(data):
    return [hashlib.sha256(data[o:o + SEG]).hexdigest() for o in range(0, len(data), SEG)]


def write(path, data, offset, new):
    """Write ``new`` at ``offset`` in place, as QEMU does (no truncation), and into ``data``."""
    data[offset:offset + len(new)] = new
    with open(path, 'r+b') as handle:
        handle.seek(offset)
        handle.write(new)


def image(tmp_path, size):
    """A file of ``size`` bytes of b'a' as QEMU's target image: (its path, its bytes)."""
    path, data = str(tmp_path / 'image'), bytearray(b'a' * size)
    with open(path, 'wb') as handle:
        handle.write(data)
    return path, data


def batches_done(watcher):
    """Wait until the batches' segments are hashed (the job's end may come first, then
    ``closed`` takes over what is still queued: tests that count want it to come after)."""
    for hashed in watcher._hashed.values():
        for _length, future in hashed.values():
            future.result()


@pytest.mark.parametrize('report_dirty', [True, False])
def test_digests_are_the_final_files_also_when_hashed_segments_are_rewritten(tmp_path,
                                                                             report_dirty):
    path, data = image(tmp_path, 3 * SEG + 10)
    with OverlappedDigests({path: SEG}, workers=2, behind=SEG) as watcher:
        watcher.schedule(0, watcher.ends())  # segments 0-1: 2 is not ``behind`` below the end
        assert watcher.hashed_early() == 2
        write(path, data, len(data), b'b' * SEG)     # the copy goes on
        write(path, data, 5, b'xyz')                 # qcow2 rewriting its metadata, after bitmap 0
        watcher.schedule(1, watcher.ends())  # segment 2; 3 is not whole below the margin
        assert watcher.hashed_early() == 3
        write(path, data, len(data), b'c' * SEG)
        batches_done(watcher)
        watcher.closed()            # segments 3-5 (5, the tail, not whole), final
        assert watcher.hashed_early() == 3
        watcher.written({path: {0: [(0, 512)], 1: [(0, 512)]}} if report_dirty else None)
        size, digests = watcher.digests()[path]
    assert size == SEG and digests == sha_segments(bytes(data))
    # reported: segment 0 (dirty); unknown: the three hashed while QEMU wrote
    assert watcher.hashed_again == (1 if report_dirty else 3)


def test_a_batch_hashes_up_to_the_margin_below_the_files_end_as_it_is_now(tmp_path,
                                                                          monkeypatch):
    # (not up to the end at the batch before: that left the last batches' worth for after
    # the job, hashed while nothing else ran)
    monkeypatch.setattr(overlap, 'IN_FLIGHT', SEG, raising=False)
    path, _data = image(tmp_path, 4 * SEG)
    with OverlappedDigests({path: SEG}, workers=2) as watcher:
        watcher.schedule(0, watcher.ends())
        assert watcher.hashed_early() == 3
        watcher.schedule(1, watcher.ends())     # nothing new below the margin
        assert watcher.hashed_early() == 3


def test_a_batch_hashes_below_the_ends_taken_before_its_bitmap_not_where_the_file_is_now(
        tmp_path):
    # QEMU writes on while the bitmap is added: what it wrote after ``ends`` is dirty in the
    # batch's bitmap, so a segment of it hashed now would be hashed again after the job
    path, _data = image(tmp_path, 2 * SEG)
    with OverlappedDigests({path: SEG}, workers=2, behind=SEG) as watcher:
        ends = watcher.ends()
        with open(path, 'ab') as handle:        # written after ends, before the bitmap's reply
            handle.write(b'b' * (2 * SEG))
        watcher.schedule(0, ends)
        assert watcher.hashed_early() == 1


def test_segments_never_hashed_are_hashed_once_the_image_is_closed_and_not_again(tmp_path):
    path, data = image(tmp_path, 2 * SEG + 10)
    with OverlappedDigests({path: SEG}, workers=2, behind=SEG) as watcher:
        watcher.schedule(0, watcher.ends())         # segment 0
        write(path, data, SEG, b'z' * (SEG + 10))   # the end of the job
        batches_done(watcher)
        watcher.closed()                            # segments 1 and the tail: final
        # bitmap 0 saw every write after it: only segment 0 is hashed again
        watcher.written({path: {0: [(0, len(data))]}})
        size, digests = watcher.digests()[path]
    assert digests == sha_segments(bytes(data)) and watcher.hashed_again == 1


def hold_segment_zero(monkeypatch):
    """(started, release): the hash of segment 0 sets ``started``, then waits for ``release``."""
    started, release = threading.Event(), threading.Event()
    hash_range = overlap.sha256_range

    def held(path, offset, length):
        if offset == 0:
            started.set()
            assert release.wait(60)
        return hash_range(path, offset, length)
    monkeypatch.setattr(overlap, 'sha256_range', held)
    return started, release


def test_segments_still_queued_when_the_image_is_closed_are_hashed_as_final(
        tmp_path, monkeypatch):
    # the one hashing thread is held on segment 0 until the job's end: segments 1-2 wait in
    # their batch, then read the final file, and no bitmap can send them to be hashed again
    started, release = hold_segment_zero(monkeypatch)
    path, data = image(tmp_path, 4 * SEG)
    with OverlappedDigests({path: SEG}, workers=1, behind=SEG) as watcher:
        watcher.schedule(0, watcher.ends())         # segments 0-2
        write(path, data, 0, b'x' * (4 * SEG))      # QEMU writes them all again
        assert started.wait(60)
        watcher.closed()
        release.set()
        watcher.written({path: {0: [(0, len(data))]}})
        size, digests = watcher.digests()[path]
    assert digests == sha_segments(bytes(data))
    # segment 0 was (being) hashed while QEMU wrote, and is hashed again, the others once
    assert watcher.hashed_early() == 1 and watcher.hashed_again == 1


def test_a_segment_read_after_a_later_bitmap_is_judged_by_that_bitmap(tmp_path, monkeypatch):
    # one hashing thread, held on segment 0: segments 1-3 of batch 0 start their reads only
    # after bitmap 1 was added, so a write seen by bitmap 0 alone (it landed before bitmap 1,
    # so before those reads) does not send them to be hashed again
    started, release = hold_segment_zero(monkeypatch)
    path, data = image(tmp_path, 5 * SEG)
    with OverlappedDigests({path: SEG}, workers=1, behind=SEG) as watcher:
        watcher.schedule(0, watcher.ends())         # segments 0-3
        assert started.wait(60)
        write(path, data, SEG, b'q' * (3 * SEG))    # after bitmap 0, before bitmap 1
        watcher.schedule(1, watcher.ends())         # nothing new below the margin
        release.set()
        batches_done(watcher)
        watcher.closed()
        watcher.written({path: {0: [(0, 5 * SEG)], 1: []}})
        size, digests = watcher.digests()[path]
    assert digests == sha_segments(bytes(data))
    assert watcher.hashed_early() == 4 and watcher.hashed_again == 1   # segment 0 alone


@pytest.mark.skipif(os.geteuid() != 0, reason="raising a thread's priority again needs root")
def test_the_early_hash_runs_at_idle_priority_and_what_is_left_at_the_end_does_not(
        tmp_path, monkeypatch):
    policies = {}
    hash_range = overlap.sha256_range

    def noted(path, offset, length):
        policies[offset] = os.sched_getscheduler(0)
        return hash_range(path, offset, length)
    monkeypatch.setattr(overlap, 'sha256_range', noted)
    path, _data = image(tmp_path, 3 * SEG)
    with OverlappedDigests({path: SEG}, workers=2, behind=SEG) as watcher:
        watcher.schedule(0, watcher.ends())         # segments 0-1, while QEMU writes
        batches_done(watcher)
        watcher.closed()                            # segment 2, once QEMU is done
        watcher.written({path: {0: []}})
        watcher.digests()
        early_threads = list(watcher._early_threads)
    assert policies == {0: os.SCHED_IDLE, SEG: os.SCHED_IDLE, 2 * SEG: os.SCHED_OTHER}
    # and the early threads are back to normal priority for what they still had running
    assert early_threads and all(os.sched_getscheduler(t) == os.SCHED_OTHER
                                 for t in early_threads if os.path.exists(f'/proc/self/task/{t}'))


class Disk:
    def __init__(self, disk_id):
        self.id = disk_id
        self.node = f'drive-{disk_id}'


class GrowingJobQmp:
    """QEMU as the capture sees it: each look at the jobs finds the target grown to the next
    of ``sizes``; then the jobs end. Records the commands."""

    def __init__(self, target, sizes, refuse_to_close=()):
        self.target, self.sizes, self.commands = target, sizes, []
        self.nodes, self.refuse_to_close = set(), set(refuse_to_close)

    def execute(self, command, arguments=None, timeout=None):
        self.commands.append(command)
        if command == 'blockdev-add':
            self.nodes.add(arguments['node-name'])
        if command == 'blockdev-del':
            if arguments['node-name'] in self.refuse_to_close:
                raise QmpCommandFailed(command, 'GenericError', 'Node is in use')
            self.nodes.discard(arguments['node-name'])
        if command == 'query-named-block-nodes':
            return [{'node-name': name} for name in sorted(self.nodes)]
        return {}

    def transaction(self, actions):
        self.commands.append('transaction')

    def wait_for_jobs(self, job_ids, progress=None, interval=1.0):
        total = 16 * SEG
        for number, size in enumerate(self.sizes):
            with open(self.target, 'ab') as handle:
                handle.truncate(size)
            if progress is not None:
                progress(number + 1, total)
        return {job: JobOutcome(job, True, None, total, total) for job in job_ids}

    def start_nbd_server(self, socket_path):
        raise QmpCommandFailed('nbd-server-start', 'GenericError', 'taken by another tool')


def test_watch_bitmaps_follow_the_images_growth_and_are_added_without_a_transaction(
        tmp_path, monkeypatch):
    monkeypatch.setattr(capture, 'WATCH_BATCH', 4 * SEG)
    monkeypatch.setattr(capture, 'WATCH_BATCHES', 4)    # 1/4 of the jobs' 16 segments: no more
    monkeypatch.setattr(capture, 'HAS_LIBNBD', True)
    target = str(tmp_path / 'vd0.qcow2')
    open(target, 'wb').close()
    # looks at the jobs find 1, 3, 5, 5, 9 and 13 segments written: bitmaps at 5, 9 and 13
    qmp = GrowingJobQmp(target, [n * SEG for n in (1, 3, 5, 5, 9, 13)])
    push = PushCapture(qmp, 101, [DiskJob(Disk('vd0'), target)], log=lambda _m: None,
                       socket_path=str(tmp_path / 'nbd.sock'))
    scheduled = []
    with OverlappedDigests({target: SEG}, workers=2, behind=SEG) as watcher:
        monkeypatch.setattr(watcher, 'schedule', lambda batch, ends: scheduled.append(
            (batch, ends[target] // SEG)))
        push.run_jobs(watcher=watcher)
    assert scheduled == [(0, 5), (1, 9), (2, 13)]
    # one command per image: a QMP transaction would first drain every node's I/O, holding
    # QEMU's backup jobs on each batch
    assert qmp.commands.count('block-dirty-bitmap-add') == 3
    assert 'transaction' not in qmp.commands


@pytest.mark.parametrize('hash_during_copy', [True, False])
def test_a_target_qemu_keeps_open_fails_the_backup_before_its_image_is_hashed(
        tmp_path, monkeypatch, hash_during_copy):
    # QEMU could still flush a node it kept open into the image: no digest of it is final
    monkeypatch.setattr(capture, 'HAS_LIBNBD', True)
    target = str(tmp_path / 'vd0.qcow2')
    open(target, 'wb').close()
    qmp = GrowingJobQmp(target, [SEG])
    push = PushCapture(qmp, 101, [DiskJob(Disk('vd0'), target)], log=lambda _m: None,
                       socket_path=str(tmp_path / 'nbd.sock'))
    push.open_targets()
    qmp.refuse_to_close = {push.targets['vd0']}
    with OverlappedDigests({target: SEG}, workers=2, behind=SEG) as watcher:
        closed = []
        monkeypatch.setattr(watcher, 'closed', lambda: closed.append(True))
        with pytest.raises(BackupFailed, match='did not close'):
            if hash_during_copy:
                push.run_jobs(watcher=watcher)
            else:
                push.run_jobs()
                push.close_targets()
    assert not closed
    # the same capture whose QEMU let go of its targets goes on
    qmp.refuse_to_close = set()
    push.close_targets()
    assert qmp.nodes == set()
