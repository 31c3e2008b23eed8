"""pct.conf, Proxmox VE's container config (pve-container ``src/PVE/LXC/Config.pm``), which a
vzdump archive carries as ``./etc/vzdump/pct.conf``:

- ``pct_conf``: the pct.conf of an LXC container, for an archive that ``pct restore`` takes;
- ``read_pct_conf``: what a restore needs from a pct.conf (ours, or one PVE wrote);
- ``lxc_config_for_restore``: the LXC config of a new container made from that.

The rootfs is written as a volume of PVE's ``local`` directory storage,
``local:<vmid>/vm-<vmid>-disk-0.raw,size=<n>G``: ``pct restore`` without ``--rootfs`` allocates
a new volume of that size on its target storage for a ``volume`` mount point, and refuses a
rootfs given as a plain path ("restoring rootfs to bind mount is only possible by specifying
-rootfs manually"). The size is the data's size rounded up to whole GiB with one GiB to spare.
Included volumes become ``mpN`` the same way (``disk-1``, ``disk-2``...) with ``backup=1``.
"""
from __future__ import annotations

import os
import platform
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from ...errors import ConfigError
from .config import LxcConfig, Network

GIB = 1024 ** 3
MIB = 1024 ** 2
# PVE's arch values and LXC's names for them (lxc.container.conf(5) accepts both spellings).
_ARCH_FROM_LXC = {'x86_64': 'amd64', 'amd64': 'amd64', 'i686': 'i386', 'i386': 'i386',
                  'x86': 'i386', 'aarch64': 'arm64', 'arm64': 'arm64', 'armhf': 'armhf',
                  'armv7l': 'armhf', 'armel': 'armhf', 'riscv64': 'riscv64',
                  'riscv32': 'riscv32'}
# os-release IDs and PVE's ostype for them (pve-container's LXC::Config ostype enum)
_OSTYPES = {'debian': 'debian', 'devuan': 'devuan', 'ubuntu': 'ubuntu', 'centos': 'centos',
            'rocky': 'centos', 'almalinux': 'centos', 'fedora': 'fedora',
            'opensuse-leap': 'opensuse', 'opensuse-tumbleweed': 'opensuse',
            'arch': 'archlinux', 'alpine': 'alpine', 'gentoo': 'gentoo', 'nixos': 'nixos',
            'openeuler': 'openeuler'}
# lxc.net.N.* keys and the netN property each becomes (pve-container's netconf_desc).
_NET_KEYS = (('name', 'name'), ('link', 'bridge'), ('hwaddr', 'hwaddr'), ('mtu', 'mtu'),
             ('ipv4.address', 'ip'), ('ipv4.gateway', 'gw'), ('ipv6.address', 'ip6'),
             ('ipv6.gateway', 'gw6'))
_PROPERTY_VALUE = re.compile(r'^[^,=\s]+$')
# pve-common's dns-name format, which pct.conf's hostname has
_DNS_NAME = re.compile(r'^(?:[a-zA-Z0-9](?:[a-zA-Z0-9\-]*[a-zA-Z0-9])?\.)*'
                       r'[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?$')
_KEY_LINE = re.compile(r'^([a-z][a-z_]*\d*):\s*(.+?)\s*$')
_LXC_LINE = re.compile(r'^(lxc\.[a-z0-9_\-.]+)(?::|\s*=)\s*(.*?)\s*$')
# lxc-create's shared defaults (Debian's lxc package): capabilities, seccomp, /dev, cgroup
# and proc mounts a container needs to boot; userns.conf adds what an unprivileged one needs.
COMMON_INCLUDE = '/usr/share/lxc/config/common.conf'
USERNS_INCLUDE = '/usr/share/lxc/config/userns.conf'


def tree_bytes(root: str) -> int:
    """The bytes a tree's files take on disk, on ``root``'s file system only (as
    ``--one-file-system`` copies it), each hardlinked file once: what a volume must hold."""
    device = os.lstat(root).st_dev
    seen, total = set(), 0
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(directory, d)).st_dev == device]
        for name in files + dirs:
            stat = os.lstat(os.path.join(directory, name))
            if (stat.st_ino, stat.st_dev) not in seen:
                seen.add((stat.st_ino, stat.st_dev))
                total += stat.st_blocks * 512
    return total


def volume_size(data_bytes: int) -> str:
    """A pct.conf ``size=``: the data rounded up to whole GiB, plus one GiB of room."""
    return f"{-(-max(data_bytes, 0) // GIB) + 1}G"


def detect_ostype(root: str) -> str:
    """PVE's ``ostype`` of the tree at ``root`` from its os-release (``ID``), else
    ``unmanaged``: pct restore sets up a container of a known type, and refuses one whose
    distribution it cannot detect unless it is unmanaged (a busybox container is one). The file
    belongs to the guest: a link is not followed and at most 64 KiB are read."""
    for relative in ('etc/os-release', 'usr/lib/os-release'):
        try:
            fd = os.open(os.path.join(root, relative), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        with os.fdopen(fd, 'rb') as handle:
            text = handle.read(65536).decode('utf-8', 'replace')
        found = re.search(r'^ID="?([a-z0-9._-]+)"?\s*$', text, re.MULTILINE)
        if found:
            return _OSTYPES.get(found.group(1), 'unmanaged')
    return 'unmanaged'


def pct_conf(config: LxcConfig, vmid: int, rootfs_bytes: int,
             volumes: Sequence[Tuple[str, str, int]] = (),
             ostype: str = 'unmanaged') -> Tuple[str, List[str]]:
    """The pct.conf text of container ``config`` as guest ``vmid``, and warnings for what it
    cannot say. ``rootfs_bytes`` is the size of the rootfs's data; ``volumes`` are the included
    volumes as (registry key ``mpN``, path in the container, data bytes). Keys are in PVE's
    order (sorted, then the ``lxc.*`` lines)."""
    warnings: List[str] = []
    keys: Dict[str, str] = {}
    # LXC runs a container without lxc.arch on the host's architecture; pct.conf always names it
    lxc_arch = config.arch or platform.machine()
    arch = _ARCH_FROM_LXC.get(lxc_arch)
    if arch is None:
        warnings.append(f"lxc.arch '{lxc_arch}' has no pct.conf equivalent; the archive "
                        "says nothing about the architecture (PVE assumes amd64)")
    else:
        keys['arch'] = arch
    keys['ostype'] = ostype
    if config.hostname and _DNS_NAME.match(config.hostname):
        keys['hostname'] = config.hostname
    elif config.hostname:
        warnings.append(f"lxc.uts.name '{config.hostname}' is not a DNS name, which pct.conf's "
                        "hostname must be; left out (PVE names the container CT<vmid>)")
    if config.memory_bytes is not None:
        keys['memory'] = str(max(config.memory_bytes // MIB, 16))
    if config.swap_bytes is not None:
        keys['swap'] = str(config.swap_bytes // MIB)
    keys['rootfs'] = f"local:{vmid}/vm-{vmid}-disk-0.raw,size={volume_size(rootfs_bytes)}"
    for number, (key, path, data_bytes) in enumerate(volumes, start=1):
        keys[key] = (f"local:{vmid}/vm-{vmid}-disk-{number}.raw,mp={path},backup=1,"
                     f"size={volume_size(data_bytes)}")
    for network in config.networks:
        line = _net_line(network, warnings)
        if line:
            keys[f"net{network.index}"] = line
    if config.unprivileged:
        keys['unprivileged'] = '1'
    lines = [f"{key}: {keys[key]}" for key in sorted(keys)]
    lines += [f"lxc.idmap: {kind} {first} {host} {count}"
              for kind, first, host, count in config.idmap]
    return '\n'.join(lines) + '\n', warnings


def _net_line(network: Network, warnings: List[str]) -> Optional[str]:
    kind = network.type
    if kind in (None, 'empty', 'none'):
        return None          # no interface (empty), or the host's own: nothing to recreate
    if kind != 'veth':
        warnings.append(f"network {network.index} (lxc.net.{network.index}.type = {kind}) "
                        "cannot be written as a pct.conf netN, which is veth only; configure "
                        "it again after a restore on Proxmox VE")
        return None
    props = {'name': f"eth{network.index}"}
    for lxc_key, prop in _NET_KEYS:
        value = network.get(lxc_key)
        if value is None:
            continue
        if not _PROPERTY_VALUE.match(value):
            warnings.append(f"network {network.index}: lxc.net.{network.index}.{lxc_key} "
                            f"'{value}' cannot be written in a pct.conf property; left out")
            continue
        props[prop] = value
    props['type'] = 'veth'
    return ','.join(f"{key}={props[key]}" for key in sorted(props))


@dataclass(frozen=True)
class PctConf:
    """What a restore reads from a pct.conf (the current config; snapshot sections skipped)."""

    arch: str = 'amd64'
    hostname: Optional[str] = None
    memory_mib: Optional[int] = None
    swap_mib: Optional[int] = None
    rootfs: Optional[str] = None                  # the rootfs line's value, as written
    unprivileged: bool = False
    idmap: Tuple[Tuple[str, int, int, int], ...] = ()
    nets: Tuple[Tuple[str, str], ...] = ()        # ('net0', 'name=eth0,bridge=vmbr0,...')
    mountpoints: Tuple[Tuple[str, str], ...] = ()  # ('mp0', 'local:...,mp=/data,backup=1')
    description: Optional[str] = None
    keys: Tuple[Tuple[str, str], ...] = ()        # every key: value of the current config


def parse_property_string(value: str, default_key: str) -> Dict[str, str]:
    """PVE's property string (``local:1/x.raw,mp=/data,backup=1``): the item without ``=``
    is ``default_key``."""
    result: Dict[str, str] = {}
    for item in value.split(','):
        key, sep, val = item.partition('=')
        if sep:
            result[key.strip()] = val.strip()
        elif item.strip():
            result[default_key] = item.strip()
    return result


def read_pct_conf(text: str, what: str = 'pct.conf') -> PctConf:
    """Parse a pct.conf as PVE writes it: ``#`` lines are the description, ``[name]`` starts a
    snapshot section (``[pve:pending]`` pending changes), which a restore does not need."""
    keys: List[Tuple[str, str]] = []
    description: List[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if re.match(r'^\[[^\]]+\]\s*$', line):
            break                     # sections follow the current config
        if line.startswith('#'):
            description.append(_decode_text(line[1:]))
            continue
        match = _LXC_LINE.match(line) or _KEY_LINE.match(line)
        if not match:
            raise ConfigError(f"{what} line {lineno}: cannot parse '{line}'; expected "
                              "'key: value'")
        keys.append((match.group(1), match.group(2)))
    values = dict(keys)
    idmap = []
    for key, value in keys:
        if key in ('lxc.idmap', 'lxc.id_map'):
            fields = value.split()
            if (len(fields) != 4 or fields[0] not in ('u', 'g')
                    or not all(f.isdigit() for f in fields[1:])):
                raise ConfigError(f"{what}: lxc.idmap '{value}' is not 'u|g <container id> "
                                  "<host id> <count>'")
            idmap.append((fields[0], int(fields[1]), int(fields[2]), int(fields[3])))
    unprivileged = values.get('unprivileged', '0').strip() in ('1', 'yes', 'true', 'on')
    if unprivileged and not idmap:
        # PVE's default map for an unprivileged container (PVE::LXC::parse_id_maps)
        idmap = [('u', 0, 100000, 65536), ('g', 0, 100000, 65536)]
    return PctConf(
        arch=values.get('arch', 'amd64'), hostname=values.get('hostname'),
        memory_mib=_int(values, 'memory', what), swap_mib=_int(values, 'swap', what),
        rootfs=values.get('rootfs'), unprivileged=unprivileged, idmap=tuple(idmap),
        nets=tuple((k, v) for k, v in keys if re.match(r'^net\d+$', k)),
        mountpoints=tuple((k, v) for k, v in keys if re.match(r'^mp\d+$', k)),
        description='\n'.join(description) if description else values.get('description'),
        keys=tuple(keys))


def _decode_text(text: str) -> str:
    # PVE::Tools::encode_text percent-encodes a description's special characters
    return re.sub(r'%([0-9a-fA-F]{2})', lambda m: chr(int(m.group(1), 16)), text)


def _int(values: Dict[str, str], key: str, what: str) -> Optional[int]:
    if key not in values:
        return None
    if not values[key].isdigit():
        raise ConfigError(f"{what}: {key} '{values[key]}' is not a whole number of MiB")
    return int(values[key])


def host_uses_cgroup2() -> bool:
    """Whether this host's cgroups are unified (v2 only): then memory limits are cgroup2 keys."""
    return os.path.exists('/sys/fs/cgroup/cgroup.controllers')


def lxc_config_for_restore(pct: PctConf, name: str, rootfs_path: str,
                           cgroup2: bool) -> Tuple[str, List[str]]:
    """The LXC config of a new container ``name`` whose rootfs is the directory
    ``rootfs_path``, from a backup's pct.conf; and warnings naming what was not recreated."""
    warnings: List[str] = []
    lines = [
        f"# Written by guestvault from a backup's pct.conf (container {name})",
        f"lxc.include = {COMMON_INCLUDE}",
    ]
    if pct.idmap:
        lines.append(f"lxc.include = {USERNS_INCLUDE}")
    lines += [
        f"lxc.arch = {pct.arch}",
        f"lxc.uts.name = {pct.hostname or name}",
        f"lxc.rootfs.path = dir:{rootfs_path}",
        # LXC's default is an AppArmor profile it generates, which fails to load on a host
        # without AppArmor (as Debian hosts without it, and this project's test nodes):
        # the container would not start. Confine it again where the host has AppArmor.
        "lxc.apparmor.profile = unconfined",
    ]
    lines += [f"lxc.idmap = {kind} {first} {host} {count}"
              for kind, first, host, count in pct.idmap]
    if pct.memory_mib is not None:
        memory = pct.memory_mib * MIB
        if cgroup2:
            lines.append(f"lxc.cgroup2.memory.max = {memory}")
            if pct.swap_mib is not None:
                lines.append(f"lxc.cgroup2.memory.swap.max = {pct.swap_mib * MIB}")
        else:
            lines.append(f"lxc.cgroup.memory.limit_in_bytes = {memory}")
            if pct.swap_mib is not None:
                lines.append(f"lxc.cgroup.memory.memsw.limit_in_bytes = "
                             f"{memory + pct.swap_mib * MIB}")
    # A PVE network is a veth on one of PVE's bridges (vmbr0...), which a plain host seldom has;
    # the container gets none rather than one that fails its start.
    lines.append("lxc.net.0.type = empty")
    for key, value in pct.nets:
        warnings.append(f"network {key} ({value}) was not recreated: the container has no "
                        f"network; add lxc.net.* lines to its config for one")
    for key, value in pct.mountpoints:
        warnings.append(f"mount point {key} ({value}) was not recreated as a mount: its files "
                        "are in the rootfs at its path; add an lxc.mount.entry for a volume")
    return '\n'.join(lines) + '\n', warnings
