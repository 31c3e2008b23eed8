"""The block-export seam (Format.open_block_exports): what live restore and file restore read.

A datastore snapshot's disks come back through the generic NBD server (restore/nbd_server.py)
byte for byte as they were backed up, read by real qemu-img and libnbd; their zero chunks are
holes in ``base:allocation`` (so QEMU's copy skips them); a damaged chunk is refused and
reported once; a qcow2 chain's export is its own image, with no server."""
import json
import os
import subprocess
import shutil
import tempfile
from datetime import datetime, timezone

import pytest

from guestvault_engine.datastore import chunk_store
from guestvault_engine.datastore.backup_writer import write_disk_index
from guestvault_engine.datastore.format import Datastore
from guestvault_engine.datastore.snapshot import SnapshotCodec, index_name
from guestvault_engine.datastore.sources import RawFileSource
from guestvault_engine.datastore.storage import DatastoreStorage
from guestvault_engine.format import qemu_img
from guestvault_engine.format.qcow2 import Qcow2Chain
from guestvault_engine.restore.nbd_server import ThreadServer
from guestvault_engine.storage.base import BackupRecord
from guestvault_engine.storage.directory import DirStorage

try:
    import nbd
except ImportError:         # python3-libnbd (Debian), linked into the venv
    nbd = None

pytestmark = pytest.mark.skipif(shutil.which('qemu-img') is None, reason='needs qemu-img')
WHEN = '2026-12-01T10:00:00Z'
CHUNK = 4 << 20
SIZE = 3 * CHUNK + 12288          # data, a hole, data, a short last chunk (whole sectors)


def make_image(path):
    with open(path, 'wb') as handle:
        handle.truncate(SIZE)
        handle.write(os.urandom(CHUNK))
        handle.seek(2 * CHUNK + 1000)
        handle.write(os.urandom(5000))
        handle.seek(SIZE - 1000)
        handle.write(os.urandom(1000))
    return path


@pytest.fixture
def socket_dir():
    # a unix socket's path must stay short; pytest's tmp_path may not
    path = tempfile.mkdtemp(prefix='gv-exports-')
    yield path
    shutil.rmtree(path, ignore_errors=True)


def store_snapshot(folder, monkeypatch, image):
    """A local datastore in ``folder`` holding one snapshot of the raw ``image``:
    (storage, format, record)."""
    size = os.path.getsize(image)
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 0)
    chunks = chunk_store.FileChunkStore(os.path.join(folder, 'ds'))
    chunks.create()
    monkeypatch.undo()
    storage = DatastoreStorage(os.path.join(folder, 'ds'), 'ds', SnapshotCodec(None))
    staged = storage.stage(100, datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc))
    stats = write_disk_index(RawFileSource(image), staged.file(index_name('virtio0')), chunks)
    staged.write_guest_config({'vmid': 100, 'name': 'g'})
    staged.write_manifest({'vmid': 100, 'time': WHEN, 'level': 'full', 'parent': None,
                           'chain': 'c', 'guest_name': 'g', 'mode': 'snapshot',
                           'disks': [{'id': 'virtio0', 'file': index_name('virtio0'),
                                      'virtual_size': size, 'size': size, 'level': 'full',
                                      'csum': stats['csum'], 'bitmap': None}]})
    staged.commit()
    record, = storage.backups(100)
    return storage, Datastore(storage, chunks=chunks), record


@pytest.fixture
def snapshot(tmp_path, monkeypatch):
    """A local datastore holding one snapshot of a raw image: (storage, format, record, image)."""
    image = make_image(str(tmp_path / 'disk.raw'))
    return store_snapshot(str(tmp_path), monkeypatch, image) + (image,)


def test_a_datastore_snapshot_reads_back_identical_through_the_nbd_server(snapshot, socket_dir):
    storage, fmt, record, image = snapshot
    server = ThreadServer(os.path.join(socket_dir, 'nbd.sock'), until_clients_gone=False)
    with fmt.open_block_exports(storage, record, ['virtio0'], server) as exports:
        export = exports['virtio0']
        assert export.format == 'raw'
        assert export.uri == (f"nbd+unix:///{index_name('virtio0')}"
                              f"?socket={os.path.join(socket_dir, 'nbd.sock')}")
        identical, message = qemu_img.compare(export.uri, image)
        assert identical, message
    assert not os.path.exists(os.path.join(socket_dir, 'nbd.sock'))   # the server is gone


needs_libnbd = pytest.mark.skipif(nbd is None, reason='needs python3-libnbd')
# a hole without NBD_STATE_ZERO: what QEMU's stream skips (restore/nbd_server.STATE_HOLE)
HOLE = nbd.STATE_HOLE if nbd else None


def connect(uri, structured=True):
    """A libnbd handle on ``uri``, strict (it checks every reply against the spec), asking for
    base:allocation; ``structured=False``: a client that negotiates no structured replies."""
    handle = nbd.NBD()
    handle.set_strict_mode(nbd.STRICT_MASK)
    handle.set_request_structured_replies(structured)
    handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    return handle


def block_status(handle, length, offset, flags=0):
    """``[(length, state)]`` that one NBD_CMD_BLOCK_STATUS answers for base:allocation."""
    found = []

    def seen(context, _offset, entries, _error):
        assert context == nbd.CONTEXT_BASE_ALLOCATION
        found.extend(zip(entries[::2], entries[1::2]))
    handle.block_status(length, offset, seen, flags)
    return found


@pytest.fixture
def served(snapshot, socket_dir):
    """The snapshot's export served: (its nbd+unix URI, the backed-up image's bytes)."""
    storage, fmt, record, image = snapshot
    server = ThreadServer(os.path.join(socket_dir, 'nbd.sock'), until_clients_gone=False)
    with fmt.open_block_exports(storage, record, ['virtio0'], server) as exports:
        with open(image, 'rb') as handle:
            yield exports['virtio0'].uri, handle.read()


@needs_libnbd
def test_the_zero_chunks_are_holes_in_base_allocation(served):
    uri, expected = served
    handle = connect(uri)
    assert handle.get_structured_replies_negotiated()
    assert handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    # chunk 1 is the zero chunk; chunks 0, 2 and 3 hold data (2 and 3 as one extent)
    assert block_status(handle, SIZE, 0) == [(CHUNK, 0), (CHUNK, HOLE), (SIZE - 2 * CHUNK, 0)]
    assert block_status(handle, SIZE, 0, nbd.CMD_FLAG_REQ_ONE) == [(CHUNK, 0)]
    assert block_status(handle, 100, CHUNK + 10) == [(100, HOLE)]
    assert block_status(handle, CHUNK, CHUNK // 2) == [(CHUNK // 2, 0), (CHUNK // 2, HOLE)]
    # reads: the hole comes as a hole, the data bit-exact
    kinds = []

    def chunk(data, offset, status, _error):
        kinds.append((offset, len(data), status))
        return 0
    handle.pread_structured(SIZE, 0, chunk)
    assert (CHUNK, CHUNK, nbd.READ_HOLE) in kinds
    assert sum(length for _o, length, _s in kinds) == SIZE
    got = handle.pread(SIZE, 0)
    assert got == expected
    assert handle.pread(5000, CHUNK - 2500) == expected[CHUNK - 2500:CHUNK + 2500]
    handle.shutdown()


@pytest.mark.skipif(shutil.which('qemu-img') is None, reason='needs qemu-img')
def test_qemu_img_map_of_the_export_shows_the_holes(served):
    uri, _expected = served
    result = subprocess.run(['qemu-img', 'map', '--output=json', '-f', 'raw', uri],
                            capture_output=True, text=True, timeout=300, check=True)
    extents = [(entry['start'], entry['length'], entry['present'], entry['data'])
               for entry in json.loads(result.stdout)]
    # the zero chunk is a hole QEMU counts unallocated (not present): a stream skips it
    assert extents == [(0, CHUNK, True, True), (CHUNK, CHUNK, False, False),
                       (2 * CHUNK, SIZE - 2 * CHUNK, True, True)]


@needs_libnbd
def test_a_client_without_structured_replies_still_reads(served):
    uri, expected = served
    handle = connect(uri, structured=False)
    assert not handle.get_structured_replies_negotiated()
    assert not handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    assert handle.pread(SIZE, 0) == expected
    handle.shutdown()


@needs_libnbd
def test_meta_contexts_are_listed_and_refused_without_structured_replies(served):
    uri, _expected = served
    for structured, listed in ((True, [nbd.CONTEXT_BASE_ALLOCATION]), (False, [])):
        handle = nbd.NBD()
        handle.set_opt_mode(True)
        handle.set_request_structured_replies(structured)
        handle.connect_uri(uri)
        names = []
        if structured:
            handle.opt_list_meta_context(names.append)
        else:
            with pytest.raises(nbd.Error):
                handle.opt_list_meta_context(names.append)
        assert names == listed
        handle.opt_abort()


@needs_libnbd
def test_an_export_without_extents_is_all_data(socket_dir):
    class Plain:
        name, size = 'plain', 1 << 20

        def read(self, offset, length):
            return bytes((offset + i) % 251 for i in range(length))

    server = ThreadServer(os.path.join(socket_dir, 'nbd.sock'), until_clients_gone=False)
    with server.serve(lambda: {'plain': Plain()}) as path:
        handle = connect(f'nbd+unix:///plain?socket={path}')
        assert block_status(handle, Plain.size, 0) == [(Plain.size, 0)]
        assert handle.pread(4096, 1000) == Plain().read(1000, 4096)
        handle.shutdown()


def test_damaged_chunks_are_refused_and_reported_once(snapshot, socket_dir):
    storage, fmt, record, image = snapshot
    # every chunk (the zero chunk is never read, so one damaged chunk might not be met)
    for folder, _dirs, names in os.walk(fmt.chunks.chunk_dir):
        for name in names:
            with open(os.path.join(folder, name), 'r+b') as handle:
                handle.seek(100)
                handle.write(b'\xff' * 64)
    reported = []
    server = ThreadServer(os.path.join(socket_dir, 'nbd.sock'), until_clients_gone=False,
                          on_error=lambda exc, export, offset: reported.append(export.name))
    with fmt.open_block_exports(storage, record, ['virtio0'], server) as exports:
        identical, message = qemu_img.compare(exports['virtio0'].uri, image)
        if nbd is not None:     # and, structured, as an error chunk saying what was wrong
            handle = connect(exports['virtio0'].uri)
            with pytest.raises(nbd.Error) as failed:
                handle.pread(4096, 0)
            assert failed.value.errno == 'EIO'    # libnbd names it
            assert handle.pread(4096, CHUNK) == bytes(4096)     # the zero chunk is never read
            handle.shutdown()
    assert not identical
    assert 'error' in message.lower(), message
    assert reported == [index_name('virtio0')]


def test_a_qcow2_chain_exports_its_own_image_and_starts_no_server(tmp_path):
    storage = DirStorage(str(tmp_path))
    backup = tmp_path / 'vm' / '100' / WHEN
    backup.mkdir(parents=True)
    qemu_img.create_qcow2(str(backup / 'virtio0.qcow2'), 1 << 20)
    record = BackupRecord(str(backup), {'vmid': 100, 'time': WHEN, 'disks': [
        {'id': 'virtio0', 'file': 'virtio0.qcow2'}]}, False)
    with Qcow2Chain().open_block_exports(storage, record, ['virtio0'], server=None) as exports:
        assert exports['virtio0'].uri == str(backup / 'virtio0.qcow2')
        assert exports['virtio0'].format == 'qcow2'
        assert qemu_img.info(exports['virtio0'].uri, fmt='qcow2')['virtual-size'] == 1 << 20
