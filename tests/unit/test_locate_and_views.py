"""Finding storages (node restrictions, formats), the inert-option warning, and guest_info's
chain view, which must answer with the same rule as the backup's level decision."""
from datetime import datetime, timezone

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.format.qcow2 import Qcow2Chain
from guestvault_engine.guest.disks import Disk
from guestvault_engine.guest.registry import GuestEntry
from guestvault_engine.policy.chain import bitmap_name
from guestvault_engine.policy.config import inert_option_warning, parse_vzdump_conf
from guestvault_engine.run.guest_info import _chains_on_storage
from guestvault_engine.run.locate import format_of, open_storage
from guestvault_engine.storage.directory import DirStorage
from guestvault_engine.times import format_time

UTC = timezone.utc
T = datetime(2026, 3, 10, 1, 0, 0, tzinfo=UTC)


@pytest.fixture
def config_dir(tmp_path):
    (tmp_path / 'store').mkdir()
    (tmp_path / 'storage.cfg').write_text(
        f"dir: here\n\tpath {tmp_path / 'store'}\n\tnodes node1,node2\n\n"
        f"dir: anywhere\n\tpath {tmp_path / 'store'}\n")
    return str(tmp_path)


def test_a_storage_restricted_to_some_nodes_is_refused_on_another(config_dir):
    assert open_storage(config_dir, 'here', node='node2').id == 'here'
    with pytest.raises(ConfigError, match="not available on node 'node3'.*node1, node2"):
        open_storage(config_dir, 'here', node='node3')
    assert open_storage(config_dir, 'anywhere', node='node3').id == 'anywhere'


def test_a_relative_dumpdir_is_refused_and_directories_hold_qcow2_chains(config_dir):
    with pytest.raises(ConfigError, match="relative path"):
        open_storage(config_dir, dumpdir='store')
    assert isinstance(format_of(open_storage(config_dir, 'anywhere', node='x')), Qcow2Chain)


def test_options_that_do_nothing_yet_are_named_in_one_warning():
    options = parse_vzdump_conf("mailto: root\nmode: stop\nionice: 5\n"
                                "performance: max-workers=4,pbs-entries-max=10\n", 'vzdump.conf')
    warning = inert_option_warning(options, 'vzdump.conf')
    assert warning.startswith('vzdump.conf sets ionice, performance pbs-entries-max,')
    assert 'no effect' in warning and 'mode' not in warning and 'max-workers' not in warning
    # notifications act now (issue 23): mail options are not named
    assert 'mailto' not in warning
    assert inert_option_warning(parse_vzdump_conf(
        "mailto: root\nmailnotification: failure\nnotification-mode: auto\n", 'vzdump.conf'),
        'vzdump.conf') is None
    assert inert_option_warning({'mode': 'stop', 'bwlimit': 10}, 'vzdump.conf') is None


def qcow2_disk(disk_id, *bitmaps):
    return Disk(id=disk_id, node=f'n-{disk_id}', format='qcow2', virtual_size=1 << 20,
                filename=f'/i/{disk_id}', supports_bitmaps=True,
                bitmaps=[{'name': b} for b in bitmaps])


def test_guest_info_says_a_chain_cannot_continue_when_the_registry_leaves_out_a_disk(tmp_path):
    store = DirStorage(str(tmp_path))
    with store.guest_lock(100, 0):
        staged = store.stage(100, T)
    staged.write_manifest({'vmid': 100, 'time': format_time(T), 'level': 'full',
                           'chain': 'nightly', 'chain_start': format_time(T),
                           'disks': [{'id': 'vd0', 'bitmap': 'x'}, {'id': 'vd1', 'bitmap': 'y'}]})
    staged.commit()
    wanted = bitmap_name('nightly', T)
    disks = [qcow2_disk('vd0', wanted), qcow2_disk('vd1', wanted)]
    (view,) = _chains_on_storage(store, GuestEntry(vmid=100, qmp_socket='/q'), disks, 'none', T)
    assert view['can_continue'] is True and view['reason'] is None
    (view,) = _chains_on_storage(store, GuestEntry(vmid=100, qmp_socket='/q', exclude=('vd1',)),
                                 disks, 'none', T)
    assert view['can_continue'] is False and 'differ' in view['reason']
    (view,) = _chains_on_storage(store, GuestEntry(vmid=100, qmp_socket='/q'), disks, 'monthly',
                                 datetime(2026, 4, 2, tzinfo=UTC))
    assert view['can_continue'] is False and 'month' in view['reason']
