"""The guest-kind seam (guest/kind.py): the QEMU kind satisfies the GuestKind protocol, the kind
comes from the registry entry's ``type``, and a format refuses a capture it cannot store."""
import inspect
from typing import Protocol

import pytest

from guestvault_engine.datastore.build import build_datastore
from guestvault_engine.errors import ConfigError
from guestvault_engine.format.base import accept_capture
from guestvault_engine.format.capture import BLOCK, TREE, BlockCapture, TreeCapture
from guestvault_engine.format.qcow2 import Qcow2Chain
from guestvault_engine.guest.capture import PushCapture
from guestvault_engine.guest.kind import (KINDS, BlockKind, GuestKind, LxcKind, QemuKind, TreeKind,
                                          guest_kind)
from guestvault_engine.guest.pull import PullCapture
from guestvault_engine.guest.registry import GuestEntry, load_guest, parse_guest, render_guest
from guestvault_engine.vocabulary import GUEST_TYPES


def protocol_methods(protocol):
    return {name for klass in protocol.__mro__ if klass not in (object, Protocol)
            for name, value in vars(klass).items()
            if callable(value) and not name.startswith('_')}


@pytest.mark.parametrize('kind', [KINDS[name]() for name in GUEST_TYPES], ids=GUEST_TYPES)
def test_every_kind_satisfies_the_protocol_of_its_shape_with_its_signatures(kind):
    protocol = {BLOCK: BlockKind, TREE: TreeKind}[kind.yields]
    assert isinstance(kind, GuestKind) and isinstance(kind, protocol)
    assert kind.name in GUEST_TYPES
    assert 'connect' in protocol_methods(protocol)
    for name in protocol_methods(protocol):
        declared = inspect.signature(getattr(protocol, name))
        actual = inspect.signature(getattr(type(kind), name))
        assert list(actual.parameters) == list(declared.parameters), name


def test_every_guest_type_has_a_kind():
    assert set(KINDS) == set(GUEST_TYPES)


def test_the_qemu_kind_captures_blocks_by_push_or_pull(tmp_path):
    kind = QemuKind()
    push = kind.capture(None, 100, [], 'push', print, socket_path=str(tmp_path / '100.nbd'))
    pull = kind.capture(None, 100, [], 'pull', print, socket_path=str(tmp_path / '100.nbd'))
    assert isinstance(push, PushCapture) and isinstance(pull, PullCapture)
    for capture in (push, pull):
        assert isinstance(capture, BlockCapture) and capture.kind == BLOCK


def test_the_kind_comes_from_the_registry_entry(tmp_path):
    assert isinstance(guest_kind(GuestEntry(vmid=100, qmp_socket='/run/q.qmp')), QemuKind)
    entry = parse_guest("qmp: /run/q.qmp\ntype: qemu\n", 100, str(tmp_path / '100.conf'))
    assert entry.type == 'qemu' and isinstance(guest_kind(entry), QemuKind)
    # the default is not written, so files without a type read back the same
    assert render_guest(entry) == "qmp: /run/q.qmp\n"


def test_an_unknown_type_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"100.conf line 2: type: 'lxd' is not a guest type "
                       r"guestvault knows; known types: qemu"):
        parse_guest("qmp: /run/q.qmp\ntype: lxd\n", 100, str(tmp_path / '100.conf'))
    with pytest.raises(ConfigError, match=r"guest 100 has type 'lxd'.*known types: qemu"):
        guest_kind(GuestEntry(vmid=100, qmp_socket='/run/q.qmp', type='lxd'))
    (tmp_path / 'guests.d').mkdir()
    (tmp_path / 'guests.d' / '100.conf').write_text("qmp: /run/q.qmp\ntype: lxd\n")
    with pytest.raises(ConfigError, match='lxd'):
        load_guest(str(tmp_path), 100)


def test_a_format_refuses_a_file_tree_before_anything_changes(tmp_path):
    tree = TreeCapture(root='/var/lib/lxc/200/rootfs', id_map=[('u', 0, 100000, 65536)])
    assert tree.kind == TREE
    datastore = build_datastore(str(tmp_path), 'ds').format
    for fmt in (Qcow2Chain(), datastore):
        accept_capture(fmt, BLOCK, 'storage x')                 # a VM's disks: taken
        with pytest.raises(ConfigError, match=r"storage x holds \w+ backups, which store disk "
                           r"images.*a tree capture cannot be backed up to it"):
            accept_capture(fmt, tree.kind, 'storage x')
    assert list(tmp_path.iterdir()) == []                     # nothing was written


def test_a_container_entry_has_the_lxc_kind_and_its_pct_conf_names_its_volumes(tmp_path):
    from guestvault_engine.guest.kind import LxcGuest
    from guestvault_engine.guest.lxc.config import parse_lxc_config
    from guestvault_engine.guest.lxc.container import Container
    from guestvault_engine.guest.registry import MountPoint
    entry = parse_guest("type: lxc\nlxc: web\nmp3: /srv/d,mp=/data,backup=1\n", 300,
                        str(tmp_path / '300.conf'))
    kind = guest_kind(entry)
    assert isinstance(kind, LxcKind) and kind.yields == TREE and kind.name == 'lxc'
    (tmp_path / 'root').mkdir()
    (tmp_path / 'vol').mkdir()
    text = "lxc.rootfs.path = dir:/x\nlxc.uts.name = web\n"
    guest = LxcGuest(Container('web', '/var/lib/lxc'), parse_lxc_config(text, 'config'), text)
    tree = TreeCapture(root=str(tmp_path / 'root'), volumes=[('/data', str(tmp_path / 'vol'))])
    pct, warnings = kind.pct_conf_text(entry, guest, tree)
    # no lxc.arch: the host's (LXC's rule); no os-release: unmanaged, which pct restore takes
    assert pct == ("arch: amd64\nhostname: web\n"
                   "mp3: local:300/vm-300-disk-1.raw,mp=/data,backup=1,size=1G\n"
                   "ostype: unmanaged\n"
                   "rootfs: local:300/vm-300-disk-0.raw,size=1G\n")
    assert warnings == [] and kind.lxc_config_text(guest) == text
    assert entry.mountpoints == (MountPoint('mp3', '/srv/d', '/data', True),)


def test_the_ostype_comes_from_the_trees_os_release_and_never_through_a_link(tmp_path):
    from guestvault_engine.guest.lxc.pct_conf import detect_ostype
    root = tmp_path / 'root'
    (root / 'etc').mkdir(parents=True)
    assert detect_ostype(str(root)) == 'unmanaged'
    (root / 'etc' / 'os-release').write_text('NAME="Debian GNU/Linux"\nID=debian\n')
    assert detect_ostype(str(root)) == 'debian'
    (root / 'etc' / 'os-release').write_text('ID="rocky"\n')
    assert detect_ostype(str(root)) == 'centos'
    (root / 'etc' / 'os-release').unlink()
    host = tmp_path / 'host-os-release'
    host.write_text('ID=ubuntu\n')
    (root / 'etc' / 'os-release').symlink_to(host)     # a guest's link to a host file
    assert detect_ostype(str(root)) == 'unmanaged'
