"""restore/container.py's pure parts: the archive's LXC config recreated for the new rootfs, a
stream read twice, and guestvault-pct's archive argument."""
import io

import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.restore import container
from guestvault_engine.run import pct_command

CONFIG = ('# made by lxc-create\n'
          'lxc.rootfs.path = btrfs:/srv/lxc/web/rootfs\n'
          'lxc.uts.name = "web"\n'
          'lxc.idmap = u 0 100000 65536\n'
          'lxc.idmap = g 0 100000 65536\n'
          'lxc.log.file = /srv/lxc/web/web.log\n'
          'lxc.mount.entry = /lib lib none ro,bind 0 0\n')


def test_the_archived_config_is_kept_but_for_the_rootfs(tmp_path):
    rootfs = str(tmp_path / 'new' / 'rootfs')
    text, id_map, warnings = container._recreated_config(
        CONFIG, str(tmp_path / 'new' / 'config'), rootfs)
    assert text == CONFIG.replace('btrfs:/srv/lxc/web/rootfs', f'dir:{rootfs}')
    assert id_map == (('u', 0, 100000, 65536), ('g', 0, 100000, 65536))
    assert len(warnings) == 1 and warnings[0].startswith(
        "'lxc.log.file = /srv/lxc/web/web.log' names the backed-up container's directory")


def test_a_stream_gives_its_first_bytes_again_after_rewind():
    data = bytes(range(256)) * 100
    stream = container._Rewound(io.BytesIO(data))
    assert stream.read(1000) + stream.read(10) == data[:1010]
    stream.rewind()
    read = b''.join(iter(lambda: stream.read(333), b''))
    assert read == data


def test_a_stream_without_a_config_early_is_not_kept_whole(monkeypatch):
    monkeypatch.setattr(container, 'REWIND_LIMIT', 100)
    stream = container._Rewound(io.BytesIO(b'x' * 1000))
    assert len(stream.read(150)) == 150 and stream.read(10) == b'' and stream.overflowed


@pytest.mark.parametrize('archive,storage,expected', [
    ('local:backup/vzdump-lxc-101-2024_07_01-12_30_05.tar.zst', None,
     ('local', 'vzdump-lxc-101-2024_07_01-12_30_05.tar.zst')),
    ('vzdump-lxc-101-2024_07_01-12_30_05.tar.zst', 'nfs',
     ('nfs', 'vzdump-lxc-101-2024_07_01-12_30_05.tar.zst')),
    ('/srv/dump/vzdump-lxc-101-2024_07_01-12_30_05.tar', None, None),
    ('-', None, None)])
def test_guestvault_pct_finds_an_archive_on_a_storage(archive, storage, expected):
    args = pct_command.build_parser().parse_args(
        ['restore', '300', archive] + (['--storage', storage] if storage else []))
    assert pct_command._on_storage(args) == expected


def test_guestvault_pct_refuses_two_storages():
    args = pct_command.build_parser().parse_args(
        ['restore', '300', 'local:backup/x.tar', '--storage', 'nfs'])
    with pytest.raises(ConfigError, match='names storage local, but --storage is nfs'):
        pct_command._on_storage(args)
