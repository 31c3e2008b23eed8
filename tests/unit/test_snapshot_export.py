"""A datastore snapshot's export (datastore/snapshot_export.py) read as QEMU's stream and a
guest read it: byte for byte the image at and across chunk boundaries, each chunk decoded once
however many readers want it, the next chunks decoded ahead of a sequential reader (and not of
a random one), a chunk that fails while decoded ahead failing only the read that needs it, and
the decoded chunks in memory bounded.

The snapshot is a real one in a real local datastore; the chunk store is watched (each read of
a chunk recorded, and held on request) around the real one."""
import os
import threading
import time

import pytest

from guestvault_engine.datastore import snapshot_export
from guestvault_engine.datastore.index import read_index
from guestvault_engine.datastore.snapshot_export import SnapshotExport
from guestvault_engine.errors import CorruptData

from test_block_exports import CHUNK, store_snapshot

PIECE = 512 << 10                   # what QEMU's block-stream asks for at a time
ZERO = 2                            # chunk 2 is all zeroes
COUNT = 7                           # chunks: 0 1 (zero) 3 4 5, then a short last one
SIZE = (COUNT - 1) * CHUNK + 12288
WAIT = 120                          # seconds for what must happen (never a measured time)


@pytest.fixture(scope='module')
def stored(tmp_path_factory):
    """(image bytes, index path, chunk store, {position: chunk file})."""
    folder = str(tmp_path_factory.mktemp('snapshot-export'))
    image = os.path.join(folder, 'disk.raw')
    data = bytearray(os.urandom(SIZE))
    data[ZERO * CHUNK:(ZERO + 1) * CHUNK] = bytes(CHUNK)
    with open(image, 'wb') as handle:
        handle.write(data)
    with pytest.MonkeyPatch.context() as monkeypatch:
        storage, fmt, record = store_snapshot(folder, monkeypatch, image)
    path = storage.file(record, record.manifest.disks[0].file)
    index = read_index(path)
    files = {position: fmt.chunks.chunk_path(bytes(index.digest(position)))
             for position in range(COUNT) if position != ZERO}
    return bytes(data), path, fmt.chunks, files


class Watched:
    """The real chunk store; each chunk read recorded by position, and held while its
    position's gate is closed."""

    def __init__(self, real, index):
        self.real = real
        self.where = real.where
        self.positions = {bytes(index.digest(p)): p for p in range(index.count)}
        self.reads = []
        self.gates = {}
        self.seen = {p: threading.Event() for p in range(index.count)}
        self.on_read = None
        self.threads = set()        # the kernel's ids of the threads that read chunks

    def read_view(self, digest):
        position = self.positions[bytes(digest)]
        self.reads.append(position)
        self.threads.add(threading.get_native_id())
        self.seen[position].set()
        if self.on_read is not None:
            self.on_read()
        gate = self.gates.get(position)
        if gate is not None:
            assert gate.wait(WAIT)
        return self.real.read_view(digest)


def export_of(stored, name='e'):
    _data, path, chunks, _files = stored
    index = read_index(path)
    watched = Watched(chunks, index)
    return SnapshotExport(name, index, watched, None, 'vm/100/t virtio0'), watched


def test_reads_at_and_across_chunk_boundaries_are_the_image(stored):
    data = stored[0]
    export, _watched = export_of(stored)
    spans = [(0, SIZE), (SIZE - 100, 100), (CHUNK - 10, 2 * CHUNK + 20)]
    for boundary in range(CHUNK, SIZE, CHUNK):
        spans += [(boundary - 1, 2), (boundary - 4096, 8192), (boundary, CHUNK),
                  (boundary - PIECE, PIECE)]
    for offset, length in spans:
        length = min(length, SIZE - offset)
        assert bytes(export.read(offset, length)) == data[offset:offset + length], (offset,
                                                                                    length)


def test_a_sequential_reader_finds_the_next_chunks_decoded_ahead(stored):
    data = stored[0]
    export, watched = export_of(stored)
    export.read(0, PIECE)
    for offset in range(CHUNK, SIZE, PIECE):    # on from chunk 1 (after chunk 0: sequential)
        length = min(PIECE, SIZE - offset)
        assert bytes(export.read(offset, length)) == data[offset:offset + length]
        # the next data chunk (chunk 2 is a zero chunk: never read) is already being decoded,
        # before this reader asks for it
        position = offset // CHUNK
        following = position + 2 if position + 1 == ZERO else position + 1
        if following < COUNT:
            assert watched.seen[following].wait(WAIT), (offset, following)
    assert sorted(watched.reads) == [0, 1, 3, 4, 5, 6]      # each once


def test_a_random_reader_decodes_nothing_ahead(stored):
    data = stored[0]
    export, watched = export_of(stored)
    assert bytes(export.read(4 * CHUNK + 100, 1000)) == data[4 * CHUNK + 100:4 * CHUNK + 1100]
    assert watched.reads == [4]
    assert not export._loading          # nothing started either


def test_concurrent_readers_decode_each_chunk_once(stored):
    data = stored[0]
    export, watched = export_of(stored)
    watched.gates[0] = threading.Event()    # the readers pile up on chunk 0
    results, errors = {}, []

    def reader(number):
        try:
            pieces = [bytes(export.read(offset, min(PIECE, SIZE - offset)))
                      for offset in range(0, SIZE, PIECE)]
            results[number] = b''.join(pieces)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
    threads = [threading.Thread(target=reader, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    assert watched.seen[0].wait(WAIT)
    time.sleep(0.2)     # (only makes the pile-up likely; the assertions hold either way)
    watched.gates[0].set()
    for thread in threads:
        thread.join(WAIT)
    assert not errors
    assert all(result == data for result in results.values()) and len(results) == 6
    # the cache holds all of them (8 chunks), so each was read from the store exactly once
    assert sorted(watched.reads) == [0, 1, 3, 4, 5, 6]


def test_a_chunk_that_fails_ahead_fails_only_the_read_that_needs_it(stored):
    data, _path, _chunks, files = stored
    with open(files[3], 'rb') as handle:
        good = handle.read()
    with open(files[3], 'r+b') as handle:
        handle.seek(len(good) // 2)
        handle.write(b'\xff' * 64)
    try:
        export, watched = export_of(stored)
        done = threading.Event()
        watched.gates[1] = threading.Event()
        export.read(0, PIECE)
        reader = threading.Thread(target=lambda: (export.read(CHUNK, PIECE), done.set()))
        reader.start()                  # sequential into chunk 1: chunk 3 is decoded ahead...
        assert watched.seen[3].wait(WAIT)
        watched.gates[1].set()
        reader.join(WAIT)
        assert done.is_set()            # ...and its failure is not the read of chunk 1's
        assert bytes(export.read(4 * CHUNK, PIECE)) == data[4 * CHUNK:4 * CHUNK + PIECE]
        with pytest.raises(CorruptData) as failed:
            export.read(3 * CHUNK + 1000, PIECE)
        assert f"the chunk at offset {3 * CHUNK}" in str(failed.value)
        assert 'vm/100/t virtio0' in str(failed.value)
    finally:
        with open(files[3], 'wb') as handle:
            handle.write(good)
    # repaired: the failed decoding was not kept, the chunk reads again
    assert bytes(export.read(3 * CHUNK, PIECE)) == data[3 * CHUNK:3 * CHUNK + PIECE]


def test_decoded_chunks_in_memory_stay_bounded(stored, monkeypatch):
    data = stored[0]
    monkeypatch.setattr(snapshot_export, 'CACHED_CHUNKS', 1)
    monkeypatch.setattr(snapshot_export, 'READ_AHEAD', 1)
    readers = 2
    export, watched = export_of(stored)
    held = []

    def count():
        with export._lock:
            held.append(len(export._cache) + len(export._loading))
    watched.on_read = count
    results = []

    def reader():
        results.append(b''.join(bytes(export.read(offset, min(PIECE, SIZE - offset)))
                                for offset in range(0, SIZE, PIECE)))
    threads = [threading.Thread(target=reader) for _number in range(readers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)
    assert results == [data] * readers
    # the cache, plus one decoding per reader, plus the decodings ahead
    assert max(held) <= 1 + readers + 1
    assert len(export._cache) <= 1


HOLE_FIRST, HOLE_END = 1, 5         # a long hole: chunks 1-4 are zero chunks, more than READ_AHEAD


@pytest.fixture(scope='module')
def holed(tmp_path_factory):
    """As ``stored``, of an image with data, a hole of zero chunks, then data again."""
    folder = str(tmp_path_factory.mktemp('snapshot-export-hole'))
    image = os.path.join(folder, 'disk.raw')
    with open(image, 'wb') as handle:
        handle.write(os.urandom(CHUNK))
        handle.seek(HOLE_END * CHUNK)
        handle.write(os.urandom(2 * CHUNK))
    with pytest.MonkeyPatch.context() as monkeypatch:
        storage, fmt, record = store_snapshot(folder, monkeypatch, image)
    path = storage.file(record, record.manifest.disks[0].file)
    with open(image, 'rb') as handle:
        return handle.read(), path, fmt.chunks, {}


def test_a_copy_that_skips_a_long_hole_finds_the_data_after_it_decoded_ahead(holed):
    """QEMU's stream asks where the data is (extents, as NBD block status) piece by piece and
    reads nothing of a hole: the chunks after the hole start decoding while it skips it, not
    when its first read comes."""
    assert snapshot_export.READ_AHEAD < HOLE_END - HOLE_FIRST
    data = holed[0]
    export, watched = export_of(holed)
    assert export.first_data_offset() == 0
    assert bytes(export.read(0, PIECE)) == data[:PIECE]
    for offset in range(HOLE_FIRST * CHUNK, HOLE_END * CHUNK, PIECE):
        assert export.extents(offset, PIECE) == [(PIECE, True)]
    assert watched.seen[HOLE_END].wait(WAIT)
    assert watched.seen[HOLE_END + 1].wait(WAIT)
    assert bytes(export.read(HOLE_END * CHUNK, 2 * CHUNK)) == data[HOLE_END * CHUNK:]
    assert sorted(watched.reads) == [0, HOLE_END, HOLE_END + 1]      # each once, no zero chunk


def test_the_read_ahead_runs_on_threads_that_stay_until_the_export_is_closed(stored):
    """Each read-ahead thread reuses its read buffer: a new thread per chunk allocated and
    faulted in 4 MiB each time (0.5 of 1.3 CPU seconds of the server per 512 MiB)."""
    data = stored[0]
    export, watched = export_of(stored, 'closed')
    got = b''.join(bytes(export.read(offset, min(PIECE, SIZE - offset)))
                   for offset in range(0, SIZE, PIECE))
    assert got == data
    assert sorted(watched.reads) == [0, 1, 3, 4, 5, 6]
    # this thread, and the same READ_AHEAD threads for every chunk decoded ahead
    assert len(watched.threads - {threading.get_native_id()}) <= snapshot_export.READ_AHEAD
    export.close()
    for thread in threading.enumerate():
        if thread.name.startswith('read-ahead-closed'):
            thread.join(WAIT)
            assert not thread.is_alive()
    assert bytes(export.read(CHUNK, PIECE)) == data[CHUNK:CHUNK + PIECE]    # decoded by the read
