"""LXC configs and pct.conf (guest/lxc/config.py, guest/lxc/pct_conf.py) on real-world texts: a
config as ``lxc-create -t busybox`` writes it, and a pct.conf as Proxmox VE writes it (a
description, a snapshot section, net0, a backed-up and a not backed-up mount point)."""
import pytest

from guestvault_engine.errors import ConfigError
from guestvault_engine.guest.lxc.config import Network, parse_lxc_config, parse_size
from guestvault_engine.guest.lxc.pct_conf import (lxc_config_for_restore, pct_conf,
                                                  read_pct_conf, tree_bytes, volume_size)

# As lxc-create -P /var/tmp/lab -n p1 -t busybox -f <net empty, apparmor unconfined> wrote it.
BUSYBOX = """\
# Template used to create this container: /usr/share/lxc/templates/lxc-busybox
# Parameters passed to the template:
# For additional config options, please look at lxc.container.conf(5)

# Uncomment the following line to support nesting containers:
#lxc.include = /usr/share/lxc/config/nesting.conf
# (Be aware this has security implications)

lxc.net.0.type = empty
lxc.apparmor.profile = unconfined
lxc.rootfs.path = dir:/var/tmp/lab/p1/rootfs
lxc.signal.halt = SIGUSR1
lxc.signal.reboot = SIGTERM
lxc.uts.name = "p1"
lxc.autodev = 1
lxc.tty.max = 5
lxc.pty.max = 1
lxc.cap.drop = sys_module mac_admin mac_override sys_time

# When using LXC with apparmor, uncomment the next line to run unconfined:
#lxc.apparmor.profile = unconfined

lxc.mount.auto = cgroup:mixed proc:mixed sys:ro
lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0
lxc.mount.entry = mqueue dev/mqueue mqueue defaults,optional,create=dir 0 0
lxc.mount.entry = /lib lib none ro,bind 0 0
lxc.mount.entry = /usr/lib usr/lib none ro,bind 0 0
lxc.mount.entry = /lib64 lib64 none ro,bind 0 0
lxc.mount.entry = /usr/lib64 usr/lib64 none ro,bind 0 0
lxc.mount.entry = /sys/kernel/security sys/kernel/security none ro,bind,optional 0 0
"""

UNPRIVILEGED = BUSYBOX + """\
lxc.idmap = u 0 100000 65536
lxc.idmap = g 0 100000 65536
lxc.arch = x86_64
lxc.cgroup.memory.limit_in_bytes = 512M
lxc.cgroup.memory.memsw.limit_in_bytes = 768M
lxc.net.1.type = veth
lxc.net.1.link = lxcbr0
lxc.net.1.hwaddr = 00:16:3e:aa:bb:cc
lxc.net.1.ipv4.address = 10.0.3.5/24
lxc.net.1.ipv4.gateway = 10.0.3.1
lxc.net.2.type = macvlan
lxc.net.2.link = eno1
"""

# As Proxmox VE 8 writes /etc/pve/lxc/101.conf (a custom id map, one snapshot).
PVE_CONF = """\
#Web server%3A production
#second line
arch: amd64
cores: 2
features: nesting=1
hostname: web01
memory: 1024
mp0: local-lvm:vm-101-disk-1,mp=/srv/data,backup=1,size=8G
mp1: /mnt/bindmount,mp=/mnt/shared
net0: name=eth0,bridge=vmbr0,firewall=1,gw=192.168.1.1,hwaddr=BC:24:11:2A:3B:4C,ip=192.168.1.50/24,type=veth
ostype: debian
parent: before-upgrade
rootfs: local-lvm:vm-101-disk-0,size=8G
swap: 512
unprivileged: 1
lxc.idmap: u 0 200000 65536
lxc.idmap: g 0 200000 65536

[before-upgrade]
#old description
arch: amd64
hostname: web01-old
memory: 512
rootfs: local-lvm:vm-101-disk-0,size=8G
snaptime: 1700000000
"""


def test_a_busybox_config_as_lxc_create_writes_it(tmp_path):
    config = parse_lxc_config(BUSYBOX, str(tmp_path / 'config'))
    assert (config.rootfs, config.rootfs_backend) == ('/var/tmp/lab/p1/rootfs', 'dir')
    assert config.hostname == 'p1' and config.arch is None and config.idmap == ()
    assert not config.unprivileged and config.memory_bytes is None
    assert config.networks == (Network(0, (('type', 'empty'),)),)
    assert config.mount_targets == ('/dev/shm', '/dev/mqueue', '/lib', '/usr/lib', '/lib64',
                                    '/usr/lib64', '/sys/kernel/security')
    assert config.includes == ()          # the commented lxc.include is a comment
    assert ('lxc.signal.halt', 'SIGUSR1') in config.entries


def test_ids_memory_and_networks(tmp_path):
    config = parse_lxc_config(UNPRIVILEGED, str(tmp_path / 'config'))
    assert config.idmap == (('u', 0, 100000, 65536), ('g', 0, 100000, 65536))
    assert config.unprivileged and config.host_id('u', 0) == 100000
    assert config.host_id('g', 65535) == 165535 and config.host_id('u', 65536) is None
    assert config.memory_bytes == 512 * 2 ** 20 and config.swap_bytes == 256 * 2 ** 20
    assert config.arch == 'x86_64'
    assert [n.index for n in config.networks] == [0, 1, 2]
    assert config.networks[1].get('ipv4.address') == '10.0.3.5/24'
    cgroup2 = parse_lxc_config("lxc.rootfs.path = /srv/ct\nlxc.cgroup2.memory.max = 1G\n"
                               "lxc.cgroup2.memory.swap.max = max\nlxc.idmap = b 0 1000 10\n",
                               str(tmp_path / 'config'))
    assert (cgroup2.rootfs, cgroup2.rootfs_backend) == ('/srv/ct', 'dir')
    assert cgroup2.memory_bytes == 2 ** 30 and cgroup2.swap_bytes is None
    assert cgroup2.idmap == (('u', 0, 1000, 10), ('g', 0, 1000, 10))
    assert parse_size('536870912', 'x') == 512 * 2 ** 20 and parse_size('-1', 'x') is None


def test_includes_are_followed_only_inside_the_container_directory(tmp_path):
    container = tmp_path / 'web'
    (container / 'conf.d').mkdir(parents=True)
    (container / 'extra.conf').write_text("lxc.uts.name = from-extra\n")
    (container / 'conf.d' / 'a.conf').write_text("lxc.arch = amd64\n")
    (container / 'conf.d' / 'ignored.txt').write_text("lxc.arch = i386\n")
    text = ("lxc.rootfs.path = btrfs:/srv/web\n"
            "lxc.include = /usr/share/lxc/config/common.conf\n"
            f"lxc.include = {container / 'extra.conf'}\n"
            f"lxc.include = {container / 'conf.d'}\n")
    config = parse_lxc_config(text, str(container / 'config'))
    assert config.includes == ('/usr/share/lxc/config/common.conf',)
    assert config.hostname == 'from-extra' and config.arch == 'amd64'
    assert config.rootfs_backend == 'btrfs' and config.rootfs == '/srv/web'


@pytest.mark.parametrize('text, message', [
    ("lxc.uts.name = x\n", r"no lxc.rootfs.path"),
    ("lxc.rootfs.path /srv\n", r"line 1: cannot parse 'lxc.rootfs.path /srv'"),
    ("lxc.rootfs.path = relative/path\n", r"neither an absolute path"),
    ("lxc.rootfs.path = /srv\nlxc.idmap = u 0 100000\n", r"lxc.idmap 'u 0 100000' is not"),
    ("lxc.rootfs.path = /srv\nlxc.cgroup2.memory.max = lots\n", r"'lots' is not a size"),
])
def test_bad_configs_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        parse_lxc_config(text, str(tmp_path / 'config'))


def test_other_rootfs_backends_are_recognised(tmp_path):
    for value, backend in (('zfs:tank/ct/web', 'zfs'), ('lvm:/dev/vg/web', 'lvm'),
                           ('/dev/sdb1', 'block')):
        config = parse_lxc_config(f"lxc.rootfs.path = {value}\n", str(tmp_path / 'config'))
        assert config.rootfs_backend == backend


def test_the_pct_conf_of_a_busybox_container(tmp_path):
    config = parse_lxc_config(BUSYBOX, str(tmp_path / 'config'))
    text, warnings = pct_conf(config, 777, 3 * 2 ** 20)
    # no lxc.arch: the host's, as LXC runs it; no ostype given: unmanaged
    assert text == ("arch: amd64\nhostname: p1\nostype: unmanaged\n"
                    "rootfs: local:777/vm-777-disk-0.raw,size=2G\n")
    assert warnings == []


def test_the_pct_conf_of_an_unprivileged_container_with_networks_and_a_volume(tmp_path):
    config = parse_lxc_config(UNPRIVILEGED, str(tmp_path / 'config'))
    text, warnings = pct_conf(config, 300, 5 * 2 ** 30, [('mp0', '/srv/data', 2 ** 30 + 1)])
    assert text == (
        "arch: amd64\n"
        "hostname: p1\n"
        "memory: 512\n"
        "mp0: local:300/vm-300-disk-1.raw,mp=/srv/data,backup=1,size=3G\n"
        "net1: bridge=lxcbr0,gw=10.0.3.1,hwaddr=00:16:3e:aa:bb:cc,ip=10.0.3.5/24,name=eth1,"
        "type=veth\n"
        "ostype: unmanaged\n"
        "rootfs: local:300/vm-300-disk-0.raw,size=6G\n"
        "swap: 256\n"
        "unprivileged: 1\n"
        "lxc.idmap: u 0 100000 65536\n"
        "lxc.idmap: g 0 100000 65536\n")
    assert len(warnings) == 1 and warnings[0].startswith(
        "network 2 (lxc.net.2.type = macvlan) cannot be written as a pct.conf netN")
    assert volume_size(0) == '1G' and volume_size(2 ** 30) == '2G'
    odd = parse_lxc_config("lxc.rootfs.path = /srv\nlxc.uts.name = my_box\n", 'config')
    text, warnings = pct_conf(odd, 300, 0)
    assert 'hostname' not in text and warnings == [
        "lxc.uts.name 'my_box' is not a DNS name, which pct.conf's hostname must be; left out "
        "(PVE names the container CT<vmid>)"]


def test_a_pct_conf_as_proxmox_writes_it():
    pct = read_pct_conf(PVE_CONF)
    assert pct.hostname == 'web01' and pct.arch == 'amd64'       # not the snapshot's
    assert (pct.memory_mib, pct.swap_mib) == (1024, 512)
    assert pct.rootfs == 'local-lvm:vm-101-disk-0,size=8G'
    assert pct.unprivileged and pct.idmap == (('u', 0, 200000, 65536), ('g', 0, 200000, 65536))
    assert pct.description == 'Web server: production\nsecond line'
    assert pct.nets == (('net0', 'name=eth0,bridge=vmbr0,firewall=1,gw=192.168.1.1,'
                                 'hwaddr=BC:24:11:2A:3B:4C,ip=192.168.1.50/24,type=veth'),)
    assert [point[0] for point in pct.mountpoints] == ['mp0', 'mp1']
    assert ('ostype', 'debian') in pct.keys and ('snaptime', '1700000000') not in pct.keys


def test_an_unprivileged_pct_conf_without_idmap_gets_proxmox_default_map():
    pct = read_pct_conf("arch: amd64\nrootfs: local:1/x.raw,size=1G\nunprivileged: 1\n")
    assert pct.idmap == (('u', 0, 100000, 65536), ('g', 0, 100000, 65536))
    assert read_pct_conf("rootfs: /srv/x\n").idmap == ()
    with pytest.raises(ConfigError, match="pct.conf line 1: cannot parse"):
        read_pct_conf("this is not a pct.conf\n")
    with pytest.raises(ConfigError, match="memory 'lots' is not a whole number"):
        read_pct_conf("memory: lots\n")


def test_the_lxc_config_of_a_restored_proxmox_container(tmp_path):
    text, warnings = lxc_config_for_restore(read_pct_conf(PVE_CONF), '600',
                                            '/var/lib/lxc/600/rootfs', cgroup2=False)
    config = parse_lxc_config(text, str(tmp_path / 'config'))
    assert (config.rootfs, config.rootfs_backend) == ('/var/lib/lxc/600/rootfs', 'dir')
    assert config.hostname == 'web01' and config.arch == 'amd64'
    assert config.idmap == (('u', 0, 200000, 65536), ('g', 0, 200000, 65536))
    assert config.memory_bytes == 1024 * 2 ** 20 and config.swap_bytes == 512 * 2 ** 20
    assert config.networks == (Network(0, (('type', 'empty'),)),)
    assert ('lxc.apparmor.profile', 'unconfined') in config.entries
    assert config.includes == ('/usr/share/lxc/config/common.conf',
                               '/usr/share/lxc/config/userns.conf')
    assert any(w.startswith("network net0 (name=eth0,bridge=vmbr0,") and "not recreated" in w
               for w in warnings)
    assert sum('mount point' in w for w in warnings) == 2
    text2 = lxc_config_for_restore(read_pct_conf(PVE_CONF), '600', '/x', cgroup2=True)[0]
    assert "lxc.cgroup2.memory.max = 1073741824\n" in text2


@pytest.mark.parametrize('text', [BUSYBOX, UNPRIVILEGED])
def test_lxc_config_to_pct_conf_and_back_keeps_what_a_restore_needs(tmp_path, text):
    original = parse_lxc_config(text, str(tmp_path / 'config'))
    pct = pct_conf(original, 300, 2 ** 20)[0]
    restored_text = lxc_config_for_restore(read_pct_conf(pct), 'copy', original.rootfs,
                                           cgroup2=False)[0]
    restored = parse_lxc_config(restored_text, str(tmp_path / 'config'))
    assert restored.rootfs == original.rootfs and restored.idmap == original.idmap
    assert restored.hostname == original.hostname
    assert restored.memory_bytes == original.memory_bytes
    assert restored.swap_bytes == original.swap_bytes
    # x86_64 and amd64 are LXC's two names of one architecture
    assert restored.arch == {'x86_64': 'amd64', None: 'amd64'}[original.arch]


def test_tree_bytes_counts_hardlinked_files_once(tmp_path):
    (tmp_path / 'a').write_bytes(b'x' * 8192)
    (tmp_path / 'b').hardlink_to(tmp_path / 'a')
    (tmp_path / 'd').mkdir()
    assert 8192 <= tree_bytes(str(tmp_path)) < 3 * 8192
