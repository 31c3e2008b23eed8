"""format/overlap.py: which segments hashed while QEMU wrote are hashed again, and the digests
of the final file that come out (whatever was written where, after which bitmap)."""
import hashlib

import pytest

from guestvault_engine.format.overlap import OverlappedDigests, to_hash_again

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


def sha_segments(data):
    return [hashlib.sha256(data[o:o + SEG]).hexdigest() for o in range(0, len(data), SEG)]


def write(path, data, offset, new):
    """Write ``new`` at ``offset`` in place, as QEMU does (no truncation), and into ``data``."""
    data[offset:offset + len(new)] = new
    with open(path, 'r+b') as handle:
        handle.seek(offset)
        handle.write(new)


@pytest.mark.parametrize('report_dirty', [True, False])
def test_digests_are_the_final_files_also_when_hashed_segments_are_rewritten(tmp_path,
                                                                             report_dirty):
    path = str(tmp_path / 'image')
    data = bytearray(b'a' * (3 * SEG + 10))
    with open(path, 'wb') as handle:
        handle.write(data)
    with OverlappedDigests({path: SEG}, workers=2) as watcher:
        watcher.schedule(0)         # nothing yet: a batch reads what lay below the end before it
        assert watcher.hashed_early() == 0
        write(path, data, len(data), b'b' * SEG)     # the copy goes on
        watcher.schedule(1)         # segments 0-2 lay below the end at batch 0
        assert watcher.hashed_early() == 3
        write(path, data, 5, b'xyz')                 # qcow2 rewriting its metadata, after bitmap 1
        write(path, data, len(data), b'c' * SEG)
        watcher.schedule(2)         # segment 3 (the tail of batch 0's end is not whole)
        assert watcher.hashed_early() == 4
        watcher.written({path: {0: [(0, 512)], 1: [(0, 512)], 2: []}} if report_dirty
                        else None)
        size, digests = watcher.digests()[path]
    assert size == SEG and digests == sha_segments(bytes(data))
    # reported: segment 0 (dirty) and the two never hashed (4, the tail); unknown: all six
    assert watcher.hashed_again == (3 if report_dirty else 6)
