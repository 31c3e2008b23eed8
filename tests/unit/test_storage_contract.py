"""The storage contract (tests/storage_contract.py) over every storage the unit tier can make:
the directory storage, a local datastore plain and encrypted (a key made with the engine's key
functions, kdf none), and a datastore on the in-memory backend; and both formats against the
Format protocol."""
import pytest

from storage_contract import *  # noqa: F401,F403 pylint: disable=wildcard-import,unused-wildcard-import
from storage_contract import assert_conforms
from guestvault_engine.datastore.backends.memory import MemoryBackend
from guestvault_engine.datastore.build import build_datastore
from guestvault_engine.datastore.format import Datastore
from guestvault_engine.datastore.key_file import KeyFile
from guestvault_engine.datastore.storage import DatastoreStorage
from guestvault_engine.format.base import Format
from guestvault_engine.format.qcow2 import Qcow2Chain
from guestvault_engine.storage.base import Storage
from guestvault_engine.storage.directory import DirStorage


@pytest.fixture(params=['dir', 'datastore', 'datastore-encrypted', 'datastore-memory'])
def storage(request, tmp_path):
    if request.param == 'dir':
        return DirStorage(str(tmp_path))
    if request.param == 'datastore-memory':
        return build_datastore(str(tmp_path / 'cache'), 'mem', bucket=MemoryBackend())
    crypt = None
    if request.param == 'datastore-encrypted':
        crypt, _created = KeyFile.create(kdf='none')
    return build_datastore(str(tmp_path), 'local', crypt=crypt)


@pytest.mark.parametrize('implementation', [DirStorage, DatastoreStorage])
def test_each_storage_class_has_the_protocols_methods(implementation):
    assert_conforms(implementation, Storage)


@pytest.mark.parametrize('implementation', [Qcow2Chain, Datastore])
def test_each_format_has_the_protocols_members(implementation, tmp_path):
    instance = Qcow2Chain() if implementation is Qcow2Chain else \
        build_datastore(str(tmp_path), 'local').format
    assert_conforms(implementation, Format, instance)
    assert isinstance(instance, Format)
