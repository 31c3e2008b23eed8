"""guest/nbd.py's pure parts: walking block status answers that cover less (or more) than was
asked, joining extents, and the missing-library message."""
import pytest

from guestvault_engine.errors import BackupFailed, MissingLibrary
from guestvault_engine.guest import nbd as gnbd

MiB = 1 << 20


class Server:
    """Answers block status like a server that returns at most ``limit`` bytes per request,
    the last extent possibly running past what was asked."""

    def __init__(self, extents, limit, context='base:allocation'):
        self.extents = extents   # [(length, flags)] covering the export
        self.limit = limit
        self.context = context
        self.requests = []

    def __call__(self, count, offset, callback):
        self.requests.append((count, offset))
        entries, position, given = [], 0, 0
        for length, flags in self.extents:
            end = position + length
            if end > offset and given < min(count, self.limit):
                start = max(position, offset)
                entries += [end - start, flags]
                given += end - start
            position = end
        callback('qemu:dirty-bitmap:other', offset, [count, 1], 0)  # another context: ignored
        callback(self.context, offset, entries, 0)


def test_walk_follows_partial_answers_to_the_end():
    extents = [(3 * MiB, 0), (5 * MiB, 3), (MiB, 0), (7 * MiB, 3)]
    server = Server(extents, limit=2 * MiB)
    pieces = gnbd.block_status_walk(server, 16 * MiB, 'base:allocation', 'test')
    assert len(server.requests) > 1
    merged = gnbd.merge_extents(((o, n, bool(f & gnbd.STATE_ZERO)) for o, n, f in pieces),
                                16 * MiB)
    assert merged == [(0, 3 * MiB, False), (3 * MiB, 5 * MiB, True), (8 * MiB, MiB, False),
                      (9 * MiB, 7 * MiB, True)]


def test_walk_asks_within_the_protocols_length():
    size = 10 << 30
    server = Server([(size, 3)], limit=size)
    pieces = gnbd.block_status_walk(server, size, 'base:allocation', 'test')
    assert all(request[0] <= gnbd.STATUS_REQUEST < 1 << 32 for request in server.requests)
    assert gnbd.merge_extents(pieces, size) == [(0, size, 3)]


def test_walk_refuses_a_server_that_answers_nothing():
    def silent(count, offset, callback):
        callback('base:allocation', offset, [], 0)
    with pytest.raises(BackupFailed, match='no base:allocation status'):
        gnbd.block_status_walk(silent, MiB, 'base:allocation', 'export x')


def test_merge_clips_the_last_extent_to_the_size():
    assert gnbd.merge_extents([(0, MiB, True), (MiB, 4 * MiB, True)], 2 * MiB) \
        == [(0, 2 * MiB, True)]


def test_missing_libnbd_names_the_debian_package(monkeypatch):
    monkeypatch.setattr(gnbd, 'HAS_LIBNBD', False)
    monkeypatch.setattr(gnbd, 'LIBNBD_IMPORT_ERROR', ImportError("No module named 'nbd'"))
    with pytest.raises(MissingLibrary) as info:
        gnbd.NbdSource('/nonexistent.sock', 'x')
    assert 'python3-libnbd' in str(info.value) and 'pip install' not in str(info.value)


def test_fleecing_space_warning_names_the_directory(tmp_path):
    from guestvault_engine.guest.capture import DiskJob
    from guestvault_engine.guest.disks import Disk
    from guestvault_engine.guest.pull import fleecing_space_warnings

    def job(size):
        return DiskJob(Disk('vd0', 'disk0', 'qcow2', size, '/x'), str(tmp_path / 'vd0.qcow2'))
    assert fleecing_space_warnings([job(MiB)]) == []
    [warning] = fleecing_space_warnings([job(1 << 60)])
    assert str(tmp_path) in warning and 'GUESTVAULT_FLEECING_DIR' in warning
