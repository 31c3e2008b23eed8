"""Restoring containers from vzdump archives on real parts: busybox containers (lxc_lab.py),
privileged and unprivileged, with every kind of file (test_vzdump_archive.make_tree) are
archived (the lxc kind's stop mode, write_archive) and restored into new containers that start
and hold the captured tree; an archive made as Proxmox VE makes one restores with a warning for
what it cannot recreate; the restore refuses to overwrite without force; guestvault-pct reads
an archive from a pipe."""
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest

from guestvault_engine.errors import ConfigError, GuestvaultError
from guestvault_engine.format.vzdump_archive.writer import write_archive
from guestvault_engine.format.capture import TreeCapture
from guestvault_engine.guest.kind import LxcKind
from guestvault_engine.guest.lxc.config import read_lxc_config
from guestvault_engine.guest.lxc.container import RUNNING, Container
from guestvault_engine.guest.registry import GuestEntry, guest_path, load_guest, render_guest
from guestvault_engine.run.restore import RestoreRequest, run_restore
from guestvault_engine.storage.vzdump_names import archive_name
from lxc_lab import attach, create, lxc_directory, needs_lxc, rootfs
from test_vzdump_archive import make_tree, pve_archive, snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PCT_COMMAND = os.path.join(ROOT, 'bin', 'guestvault-pct')
SHIFT = 100000
# What differs by right between a captured rootfs and the started restore: /dev's contents
# (pct restore leaves them out), the stdexcludes, what the container's syslogd writes, and
# /etc's mtime (etc/vzdump was removed from it).
CHANGING = ('dev/', 'tmp/', 'var/log', 'var/run', 'var/tmp/')
PVE_PCT = ('arch: amd64\nhostname: from-pve\nmemory: 256\nswap: 0\n'
           'net0: name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,type=veth\n'
           'ostype: unmanaged\nrootfs: local:600/vm-600-disk-0.raw,size=1G\nunprivileged: 1\n'
           'lxc.idmap: u 0 100000 65536\nlxc.idmap: g 0 100000 65536\n')


@dataclass
class Lab:
    lxcpath: str
    config_dir: str
    dumpdir: str


@dataclass
class Backup:
    vmid: int
    container: object
    archive: str
    tree: dict            # snapshot() of the captured rootfs, host ids


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
    needs_lxc()
    base = tmp_path_factory.mktemp('container-restore')
    for name in ('run', 'etc/guests.d', 'dump'):
        (base / name).mkdir(parents=True)
    with lxc_directory() as lxcpath, pytest.MonkeyPatch.context() as env:
        env.setenv('GUESTVAULT_RUN_DIR', str(base / 'run'))
        yield Lab(lxcpath, str(base / 'etc'), str(base / 'dump'))


def back_up(lab, name, vmid, unprivileged=False):
    """A started busybox container with make_tree's files under /data, registered as ``vmid``
    and archived in stop mode into the lab's dumpdir."""
    container = create(lab.lxcpath, name, unprivileged=unprivileged)
    shift = SHIFT if unprivileged else 0
    make_tree(os.path.join(rootfs(container), 'data'), shift, shift)
    entry = GuestEntry(vmid=vmid, type='lxc', lxc=name, lxcpath=lab.lxcpath)
    with open(guest_path(lab.config_dir, vmid), 'w') as handle:
        handle.write(render_guest(entry))
    kind = LxcKind()
    archive = os.path.join(lab.dumpdir,
                           archive_name('lxc', vmid, datetime.now(timezone.utc), 'zstd'))
    with kind.connect(entry) as guest, kind.tree_capture(
            entry, guest, 'stop', {'stopwait': 2}, lambda phase: None,
            lambda line: None) as (capture, _report):
        tree = snapshot(capture.root)
        pct = kind.pct_conf_text(entry, guest, capture)[0]
        write_archive(capture, archive, pct_conf=pct, lxc_config=kind.lxc_config_text(guest))
    return Backup(vmid, container, archive, tree)


@pytest.fixture(scope='module')
def privileged(lab):
    return back_up(lab, 'gvsrc', 811)


@pytest.fixture(scope='module')
def unprivileged(lab):
    return back_up(lab, 'gvsrcu', 812, unprivileged=True)


def restore(lab, backup, **options):
    return run_restore(RestoreRequest(vmid=backup.vmid, dumpdir=lab.dumpdir,
                                      config_dir=lab.config_dir, **options))


def comparable(tree, unprivileged):
    kept = {}
    for rel, entry in tree.items():
        if rel.startswith(CHANGING) or rel in ('dev', 'tmp', 'var/tmp'):
            continue
        entry = dict(entry, xattrs=dict(entry['xattrs']))
        if unprivileged:
            # the mapped root cannot set the host's security.* xattrs (PVE's flags go on)
            entry['xattrs'].pop('security.capability', None)
        if rel == 'etc':
            entry['mtime'] = None
        kept[rel] = entry
    return kept


def listing(lab):
    """The containers' directory and the registry, as names."""
    return (sorted(os.listdir(lab.lxcpath)),
            sorted(os.listdir(os.path.join(lab.config_dir, 'guests.d'))))


def check_restored(lab, backup, result, vmid, unprivileged):
    name = str(vmid)
    container = Container(name, lab.lxcpath)
    target = os.path.join(lab.lxcpath, name)
    assert (result['new_vmid'], result['lxc_name'], result['lxcpath']) == (vmid, name, lab.lxcpath)
    assert result['rootfs'] == os.path.join(target, 'rootfs') and result['started'] is True
    assert result['unprivileged'] is unprivileged and result['bytes'] > 0
    assert result['backup'] == os.path.basename(backup.archive) and result['changed'] is True
    assert container.state() == RUNNING
    assert attach(container, 'cat /data/home/u/notes.txt') == 'hello\n'
    assert attach(container, 'id -u; cat /proc/self/uid_map').split()[:3] == \
        (['0', '0', str(SHIFT)] if unprivileged else ['0', '0', '0'])
    restored = snapshot(result['rootfs'])
    assert comparable(restored, unprivileged) == comparable(backup.tree, unprivileged)
    assert restored['data/home/u/notes.txt']['uid'] == 1000 + (SHIFT if unprivileged else 0)
    assert restored['data/srv/sparse']['sparse'] and 'etc/vzdump' not in restored
    assert os.stat(result['rootfs']).st_uid == (SHIFT if unprivileged else 0)
    # the config is the backed-up container's, its rootfs the new one
    source = read_lxc_config(lab.lxcpath, backup.container.name)
    config = read_lxc_config(lab.lxcpath, name)
    assert config.rootfs == result['rootfs'] and config.rootfs_backend == 'dir'
    assert [e for e in config.entries if e[0] != 'lxc.rootfs.path'] == \
        [e for e in source.entries if e[0] != 'lxc.rootfs.path']
    assert config.hostname == backup.container.name and bool(config.idmap) is unprivileged
    assert result['diff']['after'] == open(result['config']).read()
    entry = load_guest(lab.config_dir, vmid)
    assert (entry.type, entry.lxc, entry.lxcpath) == ('lxc', name, lab.lxcpath)
    assert not [n for n in os.listdir(target) if n.startswith('.')]


def test_a_privileged_container_is_restored_and_starts(lab, privileged):
    result = restore(lab, privileged, new_vmid=901, start=True)
    check_restored(lab, privileged, result, 901, unprivileged=False)
    assert result['warnings'] == []


def test_an_unprivileged_container_stays_unprivileged(lab, unprivileged):
    result = restore(lab, unprivileged, new_vmid=902, start=True)
    check_restored(lab, unprivileged, result, 902, unprivileged=True)


def test_check_mode_and_bad_options_change_nothing(lab, privileged):
    before = listing(lab)
    result = restore(lab, privileged, new_vmid=903, check_mode=True)
    assert result['rootfs'] == os.path.join(lab.lxcpath, '903', 'rootfs')
    assert 'lxc.rootfs.path = dir:' + result['rootfs'] in result['diff']['after']
    assert result['diff']['before'] == '' and result['bytes'] == 0
    for options, message in (({}, 'new_vmid is required'),
                             ({'new_vmid': 903, 'target_dir': '/srv/x'}, 'target_dir'),
                             ({'new_vmid': 903, 'live': True}, 'live'),
                             ({'new_vmid': 903, 'lxcpath': 'relative'}, 'absolute'),
                             ({'new_vmid': 903, 'lxc_name': '../x'}, 'LXC container name')):
        with pytest.raises(ConfigError, match=message):
            restore(lab, privileged, **options)
    assert listing(lab) == before


def test_an_existing_container_is_replaced_only_with_force(lab, privileged):
    result = restore(lab, privileged, new_vmid=904, start=True)
    container = Container('904', lab.lxcpath)
    attach(container, 'echo mine > /root/marker')
    config = open(result['config']).read()
    before = listing(lab)
    with pytest.raises(ConfigError, match='force'):
        restore(lab, privileged, new_vmid=904)
    with pytest.raises(ConfigError, match='force'):      # the container, under another vmid
        restore(lab, privileged, new_vmid=905, lxc_name='904')
    assert listing(lab) == before and open(result['config']).read() == config
    assert container.state() == RUNNING and attach(container, 'cat /root/marker') == 'mine\n'
    replaced = restore(lab, privileged, new_vmid=904, force=True, start=True)
    assert replaced['replaced'] is True
    assert any('was RUNNING and was stopped' in w for w in replaced['warnings'])
    assert replaced['diff']['before'] == config
    assert container.state() == RUNNING
    assert not os.path.exists(os.path.join(replaced['rootfs'], 'root/marker'))
    assert listing(lab) == before


def test_a_damaged_archive_leaves_nothing(lab, privileged):
    name = os.path.basename(privileged.archive).replace('-811-', '-813-')
    damaged = os.path.join(lab.dumpdir, name)
    with open(privileged.archive, 'rb') as source, open(damaged, 'wb') as out:
        out.write(source.read(os.path.getsize(privileged.archive) // 2))
    before = listing(lab)
    with pytest.raises(GuestvaultError, match='Unexpected EOF|zstd'):
        run_restore(RestoreRequest(vmid=813, dumpdir=lab.dumpdir, config_dir=lab.config_dir,
                                   new_vmid=908, lxcpath=lab.lxcpath))
    assert listing(lab) == before
    os.unlink(damaged)


def test_an_archive_made_by_proxmox_restores_with_a_warning(lab, privileged, tmp_path):
    os.chmod(tmp_path, 0o755)
    # the privileged container's rootfs holds container ids, as PVE's mapped tar writes them
    archive = pve_archive(str(tmp_path), rootfs(privileged.container), vmid=600, pct=PVE_PCT)
    os.rename(archive, os.path.join(lab.dumpdir, os.path.basename(archive)))
    result = run_restore(RestoreRequest(vmid=600, dumpdir=lab.dumpdir, config_dir=lab.config_dir,
                                        new_vmid=906, lxc_name='frompve', lxcpath=lab.lxcpath,
                                        start=True))
    assert result['unprivileged'] is True and result['started'] is True
    assert [w for w in result['warnings'] if 'net0' in w] == [result['warnings'][0]]
    container = Container('frompve', lab.lxcpath)
    assert attach(container, 'cat /data/home/u/notes.txt') == 'hello\n'
    assert attach(container, 'hostname') == 'from-pve\n'
    config = read_lxc_config(lab.lxcpath, 'frompve')
    assert config.memory_bytes == 256 << 20 and config.idmap[0] == ('u', 0, SHIFT, 65536)
    assert os.stat(os.path.join(result['rootfs'], 'data/home/u/notes.txt')).st_uid == SHIFT + 1000
    assert load_guest(lab.config_dir, 906).lxc == 'frompve'


def test_guestvault_pct_restores_from_a_pipe(lab, privileged):
    argv = [sys.executable, PCT_COMMAND, 'restore', '907', '-', '--start', '1',
            '--lxcpath', lab.lxcpath, '--config-dir', lab.config_dir]
    source = read_lxc_config(lab.lxcpath, privileged.container.name)
    with open(source.path) as handle:
        lxc_config = handle.read()
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as proc:
        written = write_archive(TreeCapture(source.rootfs), proc.stdin, pct_conf='arch: amd64\n',
                                lxc_config=lxc_config, compress='zstd')
        out, err = proc.communicate(timeout=300)      # closes the pipe: the archive's end
    assert proc.returncode == 0, err
    assert written.path is None and b'is guest 907, started' in out
    container = Container('907', lab.lxcpath)
    assert container.state() == RUNNING
    assert attach(container, 'cat /data/home/u/notes.txt') == 'hello\n'
    assert load_guest(lab.config_dir, 907).lxc == '907'
