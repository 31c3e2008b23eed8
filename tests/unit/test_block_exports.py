"""The block-export seam (Format.open_block_exports): what live restore and file restore read.

A datastore snapshot's disks come back through the generic NBD server (restore/nbd_server.py)
byte for byte as they were backed up, read by real qemu-img; a damaged chunk is refused and
reported once; a qcow2 chain's export is its own image, with no server."""
import os
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


@pytest.fixture
def snapshot(tmp_path, monkeypatch):
    """A local datastore holding one snapshot of a raw image: (storage, format, record, image)."""
    image = make_image(str(tmp_path / 'disk.raw'))
    monkeypatch.setattr(chunk_store, 'SUBDIR_COUNT', 0)
    chunks = chunk_store.FileChunkStore(str(tmp_path / 'ds'))
    chunks.create()
    monkeypatch.undo()
    storage = DatastoreStorage(str(tmp_path / 'ds'), 'ds', SnapshotCodec(None))
    staged = storage.stage(100, datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc))
    stats = write_disk_index(RawFileSource(image), staged.file(index_name('virtio0')), chunks)
    staged.write_guest_config({'vmid': 100, 'name': 'g'})
    staged.write_manifest({'vmid': 100, 'time': WHEN, 'level': 'full', 'parent': None,
                           'chain': 'c', 'guest_name': 'g', 'mode': 'snapshot',
                           'disks': [{'id': 'virtio0', 'file': index_name('virtio0'),
                                      'virtual_size': SIZE, 'size': SIZE, 'level': 'full',
                                      'csum': stats['csum'], 'bitmap': None}]})
    staged.commit()
    record, = storage.backups(100)
    return storage, Datastore(storage, chunks=chunks), record, image


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
