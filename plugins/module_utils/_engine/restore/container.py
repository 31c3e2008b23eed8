"""Restoring a container from a vzdump container archive into a new LXC container, as
pve-container's ``pct restore`` does (``src/PVE/LXC/Create.pm``, ``src/PVE/API2/LXC.pm``).

The archive's configuration is read first: guestvault's own ``lxc.conf`` member is recreated as
it was, only ``lxc.rootfs.path`` pointing at the new rootfs (``dir:<lxcpath>/<name>/rootfs``);
an archive made by Proxmox VE has only its pct.conf, from which an LXC config is written
(guest/lxc/pct_conf.py), with a warning for each network and mount point it could not
recreate. The container keeps the archive's id map: an unprivileged container stays
unprivileged, its files owned by the mapped ids on the host.

Nothing half-written is ever visible: the rootfs is extracted into a hidden directory beside
its final place and renamed there when tar has finished, then the config and the registry
entry are written (hidden, fsync, rename). A failure removes what this restore made and leaves
an existing container as it was. An existing container (its directory) or registry entry is
replaced only with ``force``, and only once the new rootfs is complete: the old container is
stopped first, its rootfs and config are swapped for the new ones and then removed.

A source is a path or a binary stream (``-``: standard input); a stream is read once, so the
bytes the configuration was read from are kept and given again to the extraction.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass

from ..config.files import declare_file, read_text
from ..errors import (ArchiveError, ConfigError, ConsistencyError, ContainerError, GuestNotFound,
                      GuestvaultError)
from ..format.vzdump_archive.reader import extract_rootfs, read_config
from ..guest.lxc.config import DEFAULT_LXCPATH, config_path, parse_lxc_config
from ..guest.lxc.container import STOPPED, Container
from ..guest.lxc.pct_conf import host_uses_cgroup2, lxc_config_for_restore, read_pct_conf
from ..guest.registry import GuestEntry, guest_path, render_guest, validate_vmid
from ..storage.files import fsync_path, new_directory, write_file_hidden

# How long the container being replaced (force) may take to shut down cleanly.
STOP_TIMEOUT = 300.0
# A stream's bytes kept while its configuration is read: guestvault and PVE write the config
# first, so it is found in the first few MiB; more means there is none to find.
REWIND_LIMIT = 64 << 20
ROOTFS = 'rootfs'


@dataclass
class ContainerTarget:
    """Where and how a container is restored (restore's and guestvault-pct's options)."""
    new_vmid: int
    lxc_name: str = None         # None: the new vmid as text, as PVE names its containers
    lxcpath: str = None          # None: DEFAULT_LXCPATH
    start: bool = False
    force: bool = False
    bwlimit: int = 0             # KiB/s read from the archive, 0 = unlimited
    config_dir: str = None
    check_mode: bool = False


class _Rewound:
    """A stream whose first bytes are read twice: what ``read`` returned until ``rewind()``
    is returned again after it, then the rest of the stream."""

    def __init__(self, stream):
        self.stream = stream
        self.kept = bytearray()
        self.replaying = False
        self.overflowed = False

    def read(self, size=-1):
        if self.replaying:
            if self.kept:
                data = bytes(self.kept[:size] if size >= 0 else self.kept)
                del self.kept[:len(data)]
                return data
            return self.stream.read(size)
        if len(self.kept) >= REWIND_LIMIT:
            self.overflowed = True
            return b''
        data = self.stream.read(size)
        self.kept += data
        return data

    def rewind(self):
        self.replaying = True


@dataclass
class _Plan:
    """What a restore writes: paths, the config text, the id map, the registry entry."""
    name: str
    lxcpath: str
    directory: str           # <lxcpath>/<name>
    rootfs: str
    config: str
    config_text: str
    id_map: tuple
    entry_path: str
    entry_text: str
    warnings: list
    existing: bool           # the container's directory or the registry entry exists


def restore_container(source, target, *, backup_id, source_lxcpath=None, log=None):
    """Restore the archive ``source`` (a path or a binary stream) as ``target`` says, into a
    new container; ``source_lxcpath`` is the lxcpath of the backed-up guest (the default of
    ``target.lxcpath``). Returns the result (new_vmid, lxc_name, lxcpath, rootfs, config,
    started, unprivileged, bytes, replaced, warnings, changed, diff)."""
    log = log or (lambda message: None)
    if not isinstance(source, str):
        source = _Rewound(source)
    plan = _plan(source, target, backup_id, source_lxcpath)
    old_config = read_text(plan.config)
    result = {
        'changed': True, 'new_vmid': target.new_vmid, 'lxc_name': plan.name,
        'lxcpath': plan.lxcpath, 'rootfs': plan.rootfs, 'config': plan.config,
        'registry_entry': plan.entry_path, 'unprivileged': bool(plan.id_map),
        'started': False, 'replaced': plan.existing, 'bytes': 0, 'warnings': plan.warnings,
        'diff': {'before': old_config or '', 'after': plan.config_text,
                 'before_header': plan.config, 'after_header': plan.config},
    }
    if target.check_mode:
        return result
    if isinstance(source, _Rewound):
        source.rewind()
    made = _missing_directories(plan.directory)
    with new_directory(plan.directory):
        for path in made:
            # as lxc-create leaves them, whatever the umask: an unprivileged container's
            # mapped root must pass through them to its rootfs
            os.chmod(path, 0o755)
        staging = tempfile.mkdtemp(prefix=f'.{ROOTFS}.restoring-', dir=plan.directory)
        try:
            log(f"extracting {backup_id} into {staging}")
            result['bytes'] = extract_rootfs(source, staging, id_map=plan.id_map,
                                             bwlimit_kib=int(target.bwlimit or 0), log=log)
            fsync_path(staging)
            if plan.existing:
                result['warnings'] += _stop_replaced(plan, log)
            _commit(plan, staging, old_config, log)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    log(f"restored {backup_id} as container {plan.name} in {plan.lxcpath} (guest "
        f"{target.new_vmid})")
    if target.start:
        _start(plan)
        result['started'] = True
    return result


def _plan(source, target, backup_id, source_lxcpath):
    """Every check, before anything changes: the names, the archive's configuration, what
    exists already."""
    new_vmid = validate_vmid(target.new_vmid)
    name = target.lxc_name or str(new_vmid)
    lxcpath = target.lxcpath or source_lxcpath or DEFAULT_LXCPATH
    if not os.path.isabs(lxcpath):
        raise ConfigError(f"lxcpath {lxcpath!r} is not an absolute path; give the directory "
                          "that holds the containers, e.g. /var/lib/lxc")
    if int(target.bwlimit or 0) < 0:
        raise ConfigError(f"bwlimit {target.bwlimit} is negative; give KiB/s, 0 for no limit")
    entry = GuestEntry(vmid=new_vmid, type='lxc', lxc=name,
                       lxcpath=None if lxcpath == DEFAULT_LXCPATH else lxcpath,
                       description=f"restored from {backup_id}")
    entry_text = render_guest(entry)         # refuses a name LXC or the registry cannot take
    directory = os.path.join(lxcpath, name)
    rootfs, config = os.path.join(directory, ROOTFS), config_path(lxcpath, name)
    archived = read_config(source)
    if isinstance(source, _Rewound) and source.overflowed:
        raise ArchiveError(f"the stream's first {REWIND_LIMIT >> 20} MiB hold no pct.conf; it "
                           "is not a vzdump container archive")
    pct = read_pct_conf(archived.pct_conf, f"{backup_id}: pct.conf")
    if archived.lxc_config is not None:
        config_text, id_map, warnings = _recreated_config(archived.lxc_config, config, rootfs)
        warnings += [f"mount point {key} ({value}) was restored into the rootfs at its path; "
                     "the container's lxc.mount.entry lines are kept as they were, so a volume "
                     "mounted there hides those files" for key, value in pct.mountpoints]
    else:
        config_text, warnings = lxc_config_for_restore(pct, name, rootfs, host_uses_cgroup2())
        id_map = pct.idmap
    entry_path = guest_path(target.config_dir, new_vmid)
    existing = [path for path in (directory, entry_path) if os.path.lexists(path)]
    if existing and not target.force:
        raise ConfigError(
            f"{' and '.join(existing)} exist(s) already: guest {new_vmid} or container {name} "
            f"in {lxcpath} is taken, and nothing was changed. Choose another new_vmid or "
            "lxc_name, or set force to replace it (the container is stopped first)")
    warnings += _left_behind(config, rootfs) if existing else []
    if os.path.lexists(directory) and not os.path.isdir(directory):
        raise ConfigError(f"{directory} exists and is not a directory; remove it or choose "
                          "another lxc_name")
    return _Plan(name, lxcpath, directory, rootfs, config, config_text, tuple(id_map),
                 entry_path, entry_text, warnings, bool(existing))


def _left_behind(config, rootfs):
    """A warning when the container being replaced has its rootfs elsewhere (a restore
    replaces only ``<lxcpath>/<name>/rootfs``)."""
    text = read_text(config)
    try:
        old = parse_lxc_config(text, config).rootfs if text is not None else rootfs
    except GuestvaultError:
        old = rootfs
    if os.path.normpath(old) == rootfs:
        return []
    return [f"the replaced container's rootfs {old} is left where it is (the restored one is "
            f"{rootfs}); remove it when it is no longer needed"]


def _recreated_config(text, config, rootfs):
    """The archive's own LXC config with its rootfs at ``rootfs`` (a directory): ``(text,
    id map, warnings)``; every other line as it was, a warning for those that name the old
    container's directory."""
    original = parse_lxc_config(text, config)
    old_directory = os.path.dirname(original.rootfs.rstrip('/'))
    lines, warnings = [], []
    for line in text.splitlines():
        key, sep, value = line.partition('=')
        if sep and key.strip() == 'lxc.rootfs.path':
            lines.append(f"lxc.rootfs.path = dir:{rootfs}")
            continue
        if (sep and old_directory not in ('', '/', os.path.dirname(rootfs))
                and old_directory + '/' in value.strip() + '/'):
            warnings.append(f"'{line.strip()}' names the backed-up container's directory "
                            f"{old_directory}; it was kept as it was: change it in {config} "
                            "if the restored container needs its own")
        lines.append(line)
    return '\n'.join(lines) + '\n', original.idmap, warnings


def _missing_directories(path):
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _stop_replaced(plan, log):
    """The container being replaced, stopped cleanly (never killed); warnings saying so."""
    container = Container(plan.name, plan.lxcpath)
    try:
        state = container.state()
    except GuestNotFound:
        return []
    if state == STOPPED:
        return [f"container {plan.name} was replaced by the restore"]
    log(f"stopping container {plan.name} ({state}), which the restore replaces")
    try:
        container.stop(STOP_TIMEOUT)
    except ConsistencyError:
        raise ContainerError(
            f"container {plan.name} did not shut down within {STOP_TIMEOUT:g} s, so it was "
            "left running and not replaced; the restored tree was discarded. Stop it with "
            f"'lxc-stop -P {plan.lxcpath} -n {plan.name}' and restore again") from None
    return [f"container {plan.name} was {state} and was stopped; it was replaced by the "
            "restore"]


def _commit(plan, staging, old_config, log):
    """The new rootfs, config and registry entry into place; on a failure, the old ones back."""
    replaced = os.path.join(plan.directory, f'.{ROOTFS}.replaced-{os.getpid()}')
    old_entry = read_text(plan.entry_path)
    moved = False
    try:
        if os.path.lexists(plan.rootfs):
            os.rename(plan.rootfs, replaced)
            moved = True
        os.rename(staging, plan.rootfs)
        write_file_hidden(plan.config, plan.config_text.encode())
        declare_file(plan.entry_path, plan.entry_text, dir_mode=0o755)
    except BaseException:
        if os.path.isdir(plan.rootfs) and not os.path.exists(staging):
            os.rename(plan.rootfs, staging)           # the caller removes it
        if moved:
            os.rename(replaced, plan.rootfs)
        declare_file(plan.config, old_config)
        declare_file(plan.entry_path, old_entry)
        raise
    fsync_path(plan.directory)
    if moved:
        log(f"removing the replaced rootfs of container {plan.name}")
        shutil.rmtree(replaced)


def _start(plan):
    container = Container(plan.name, plan.lxcpath)
    try:
        container.start()
    except ContainerError as exc:
        raise ContainerError(f"the restore is complete (container {plan.name} in "
                             f"{plan.lxcpath}, registered), but {exc}") from None
