"""An LXC container's config file (``<lxcpath>/<name>/config``, lxc.container.conf(5)), read into
what a backup needs: where the root file system is, the id map, what is mounted into the
container from elsewhere (never backed up), and what describes the guest (hostname, arch,
memory, networks).

The syntax is ``key = value`` lines and ``#`` comments; a value in matching quotes loses them, as
LXC's parser does. ``lxc.include`` is followed only when it names a file (or a directory of
``*.conf`` files) inside the container's own directory: Debian's shared files under
``/usr/share/lxc/config`` hold defaults (capabilities, seccomp) that describe the host, not the
guest, so they are noted in ``includes`` and left to whoever starts the container.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ...config.files import read_text
from ...errors import ConfigError, GuestNotFound

DEFAULT_LXCPATH = '/var/lib/lxc'
# lxc.rootfs.path prefixes (storage backends of LXC) and what a plain path means.
ROOTFS_BACKENDS = ('dir', 'btrfs', 'zfs', 'lvm', 'overlay', 'overlayfs', 'loop', 'nbd', 'rbd')
_SIZE = re.compile(r'^([0-9]+)\s*([KMGT]?)I?B?$', re.IGNORECASE)
_NET = re.compile(r'^lxc\.net\.([0-9]+)\.(.+)$')
_MAX_INCLUDE_DEPTH = 8


@dataclass(frozen=True)
class Network:
    """One ``lxc.net.<index>.*`` group: its keys without the prefix (``type``, ``link``,
    ``ipv4.address``...), in the order they were read."""

    index: int
    settings: Tuple[Tuple[str, str], ...]

    def get(self, key: str, default: Optional[str] = None) -> Optional[str]:
        return dict(self.settings).get(key, default)

    @property
    def type(self) -> Optional[str]:
        return self.get('type')


@dataclass(frozen=True)
class LxcConfig:
    """What a container's config says; ``entries`` keeps every (key, value) read, in order."""

    path: str                                    # the config file
    rootfs: str                                  # the host path (or device) of the rootfs
    rootfs_backend: str                          # 'dir', 'btrfs', 'zfs', 'lvm', 'block', ...
    idmap: Tuple[Tuple[str, int, int, int], ...] = ()   # ('u'|'g', container, host, count)
    mount_entries: Tuple[str, ...] = ()          # lxc.mount.entry values: never backed up
    hostname: Optional[str] = None               # lxc.uts.name
    arch: Optional[str] = None                   # lxc.arch
    memory_bytes: Optional[int] = None           # memory limit (cgroup v1 or v2), None: none
    swap_bytes: Optional[int] = None             # swap on top of memory, None: not limited
    networks: Tuple[Network, ...] = ()
    includes: Tuple[str, ...] = ()               # lxc.include values not followed
    entries: Tuple[Tuple[str, str], ...] = ()

    @property
    def unprivileged(self) -> bool:
        return bool(self.idmap)

    @property
    def mounts(self) -> Tuple[Tuple[str, str], ...]:
        """``lxc.mount.entry`` as (source, container path): ``('/usr/lib', '/usr/lib')`` for
        ``/usr/lib usr/lib none ro,bind 0 0``; what the container sees mounted from elsewhere."""
        found = []
        for entry in self.mount_entries:
            fields = entry.split()
            if len(fields) >= 2:
                found.append((fields[0], '/' + fields[1].strip('/')))
        return tuple(found)

    @property
    def mount_targets(self) -> Tuple[str, ...]:
        """The container paths of ``lxc.mount.entry`` (``mounts``' second items)."""
        return tuple(target for _source, target in self.mounts)

    def host_id(self, kind: str, container_id: int) -> Optional[int]:
        """The host id of ``container_id`` (``kind`` 'u' or 'g'); the id itself without an id
        map, None when the map leaves it out."""
        if not self.idmap:
            return container_id
        for which, first, host, count in self.idmap:
            if which == kind and first <= container_id < first + count:
                return host + container_id - first
        return None


def config_path(lxcpath: str, name: str) -> str:
    return os.path.join(lxcpath, name, 'config')


def read_lxc_config(lxcpath: str, name: str) -> LxcConfig:
    """The config of container ``name`` under ``lxcpath``; GuestNotFound when it has none."""
    path = config_path(lxcpath, name)
    text = read_text(path)
    if text is None:
        raise GuestNotFound(
            f"there is no LXC container '{name}' in {lxcpath} (no {path}); list the containers "
            f"there with 'lxc-ls -f -P {lxcpath}', and fix 'lxc:' or 'lxcpath:' in the guest's "
            "registry entry")
    return parse_lxc_config(text, path)


def parse_lxc_config(text: str, path: str) -> LxcConfig:
    """Parse the text of the config file ``path`` (its directory bounds the includes)."""
    entries: List[Tuple[str, str]] = []
    includes: List[str] = []
    _read_lines(text, path, os.path.dirname(os.path.realpath(path)), entries, includes, 0)
    return _config(entries, includes, path)


def _read_lines(text, path, container_dir, entries, includes, depth):
    for lineno, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith('#'):
            continue
        key, sep, value = stripped.partition('=')
        key, value = key.strip(), _unquote(value.strip())
        if not sep or not key:
            raise ConfigError(f"{path} line {lineno}: cannot parse '{stripped}'; LXC config "
                              "lines are 'key = value'")
        if key == 'lxc.include':
            _include(value, container_dir, entries, includes, depth)
        else:
            entries.append((key, value))


def _include(value, container_dir, entries, includes, depth):
    target = os.path.realpath(value)
    if not target.startswith(container_dir + os.sep) or depth >= _MAX_INCLUDE_DEPTH:
        includes.append(value)
        return
    names = ([os.path.join(target, n) for n in sorted(os.listdir(target)) if n.endswith('.conf')]
             if os.path.isdir(target) else [target])
    for name in names:
        text = read_text(name)
        if text is None:
            raise ConfigError(f"lxc.include {value}: {name} does not exist; create it or "
                              "remove the line")
        _read_lines(text, name, container_dir, entries, includes, depth + 1)


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in '"\'':
        return value[1:-1]
    return value


def parse_size(value: str, what: str) -> Optional[int]:
    """Bytes from a cgroup memory value (``536870912``, ``512M``, ``1G``); None for unlimited
    (``max``, ``-1``)."""
    value = value.strip()
    if value in ('max', '-1'):
        return None
    match = _SIZE.match(value)
    if not match:
        raise ConfigError(f"{what}: '{value}' is not a size; give bytes or a number with K, M "
                          "or G")
    return int(match.group(1)) * 1024 ** ' KMGT'.index(match.group(2).upper() or ' ')


def _rootfs(value: str, path: str) -> Tuple[str, str]:
    prefix, sep, rest = value.partition(':')
    if sep and prefix in ROOTFS_BACKENDS:
        return rest, prefix
    if value.startswith('/dev/'):
        return value, 'block'
    if value.startswith('/'):
        return value, 'dir'
    raise ConfigError(f"{path}: lxc.rootfs.path '{value}' is neither an absolute path nor "
                      f"'<backend>:<path>' with a backend LXC knows ({', '.join(ROOTFS_BACKENDS)})")


def _idmap(value: str, path: str) -> Tuple[str, int, int, int]:
    fields = value.split()
    if (len(fields) != 4 or fields[0] not in ('u', 'g', 'b')
            or not all(f.isdigit() for f in fields[1:])):
        raise ConfigError(f"{path}: lxc.idmap '{value}' is not 'u|g <container id> <host id> "
                          "<count>'")
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def _config(entries: List[Tuple[str, str]], includes: List[str], path: str) -> LxcConfig:
    values: Dict[str, str] = {}
    idmap: List[Tuple[str, int, int, int]] = []
    mounts: List[str] = []
    nets: Dict[int, List[Tuple[str, str]]] = {}
    for key, value in entries:
        net = _NET.match(key)
        if key == 'lxc.idmap':
            kind, first, host, count = _idmap(value, path)
            # 'b' maps both kinds at once (lxc.container.conf(5))
            idmap.extend((k, first, host, count) for k in (('u', 'g') if kind == 'b' else (kind,)))
        elif key == 'lxc.mount.entry':
            mounts.append(value)
        elif net:
            nets.setdefault(int(net.group(1)), []).append((net.group(2), value))
        else:
            values[key] = value       # a later line wins, as in LXC
    if not values.get('lxc.rootfs.path'):
        raise ConfigError(f"{path}: no lxc.rootfs.path; guestvault backs up the root file "
                          "system it names, so the container needs one")
    rootfs, backend = _rootfs(values['lxc.rootfs.path'], path)
    memory = values.get('lxc.cgroup2.memory.max', values.get('lxc.cgroup.memory.limit_in_bytes'))
    memory_bytes = parse_size(memory, f"{path}: memory limit") if memory else None
    swap_bytes = None
    if values.get('lxc.cgroup2.memory.swap.max'):
        swap_bytes = parse_size(values['lxc.cgroup2.memory.swap.max'], f"{path}: swap limit")
    elif values.get('lxc.cgroup.memory.memsw.limit_in_bytes') and memory_bytes is not None:
        # cgroup v1 limits memory + swap together
        total = parse_size(values['lxc.cgroup.memory.memsw.limit_in_bytes'],
                           f"{path}: memory+swap limit")
        swap_bytes = None if total is None else max(total - memory_bytes, 0)
    return LxcConfig(
        path=path, rootfs=rootfs, rootfs_backend=backend, idmap=tuple(idmap),
        mount_entries=tuple(mounts), hostname=values.get('lxc.uts.name'),
        arch=values.get('lxc.arch'), memory_bytes=memory_bytes, swap_bytes=swap_bytes,
        networks=tuple(Network(i, tuple(s)) for i, s in sorted(nets.items())),
        includes=tuple(includes), entries=tuple(entries))
