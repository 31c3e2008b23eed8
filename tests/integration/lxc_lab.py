"""Real LXC containers for the integration tests (FACTS.md, "LXC containers here"): busybox
containers made by ``lxc-create -t busybox``, privileged or unprivileged, in a directory of
their own or on a btrfs on a loop device; a writer inside a container that keeps writing
checksummed files and a journal of them; and the check that a captured tree holds every file
the journal lists, whole.

Shared by the tests of the lxc guest kind, of container archives and of their restore. Each
context manager removes what it made (containers, mounts, loop devices) also when the test
fails.
"""
import hashlib
import os
import shutil
import tempfile
import time
from contextlib import contextmanager

import pytest

from procs import run_bounded

LXC_TIMEOUT = 180          # lxc-create, -start, -stop, -destroy: seconds on a quiet machine
IDMAP = ('lxc.idmap = u 0 100000 65536', 'lxc.idmap = g 0 100000 65536')
# The writer: file w<n> gets random data, is fsync'd, then its sha256 is appended to the journal
# and the journal fsync'd; it ends when <dir>.stop exists.
WRITER = ('mkdir -p {dir}; i=0; while [ ! -e {dir}.stop ]; do i=$((i+1)); '
          'dd if=/dev/urandom of={dir}/w$i bs=1024 count=$((RANDOM % 48 + 1)) 2>/dev/null; '
          'sync {dir}/w$i; echo "w$i $(sha256sum {dir}/w$i | cut -d" " -f1)" >> {dir}.journal; '
          'sync {dir}.journal; usleep 20000; done')


def needs_lxc():
    """Skip where LXC cannot run containers (not root, lxc not installed: make deps)."""
    missing = [tool for tool in ('lxc-create', 'rsync') if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"needs root and {', '.join(missing) or 'lxc'} (make deps)")


def run(argv, timeout=LXC_TIMEOUT, check=True):
    proc = run_bounded(argv, timeout, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc


@contextmanager
def lxc_directory(parent='/var/tmp'):
    """A new lxcpath; every container in it is destroyed at the end. World-traversable, as an
    unprivileged container's mapped root must reach its rootfs."""
    path = tempfile.mkdtemp(prefix='gv-lxc-', dir=parent)
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for name in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, name, 'config')):
                destroy(path, name)
        shutil.rmtree(path, ignore_errors=True)


def create(lxcpath, name, unprivileged=False, backing=None, start=True, extra=()):
    """A busybox container ``name`` in ``lxcpath`` (``backing``: lxc-create's -B, e.g. btrfs),
    started unless ``start`` is False. Returns the engine's Container for it."""
    from guestvault_engine.guest.lxc.container import Container
    conf = os.path.join(lxcpath, f".{name}.create.conf")
    lines = ['lxc.net.0.type = empty', 'lxc.apparmor.profile = unconfined', *extra]
    lines += IDMAP if unprivileged else ()
    with open(conf, 'w') as handle:
        handle.write('\n'.join(lines) + '\n')
    run(['lxc-create', '-P', lxcpath, '-n', name, '-t', 'busybox', '-f', conf]
        + (['-B', backing] if backing else []))
    container = Container(name, lxcpath)
    if start:
        container.start()
    return container


def destroy(lxcpath, name):
    run(['lxc-unfreeze', '-P', lxcpath, '-n', name], check=False)
    run(['lxc-stop', '-k', '-P', lxcpath, '-n', name], check=False)
    run(['lxc-destroy', '-f', '-P', lxcpath, '-n', name], check=False)


def attach(container, script, timeout=300):
    return run(['lxc-attach', '-P', container.lxcpath, '-n', container.name, '--',
                '/bin/sh', '-c', script], timeout=timeout).stdout


def rootfs(container):
    """The host directory of the container's rootfs (from its config, as the engine reads)."""
    from guestvault_engine.guest.lxc.config import read_lxc_config
    return read_lxc_config(container.lxcpath, container.name).rootfs


def start_writer(container, directory):
    """Start the writer in the container, writing into ``directory`` (a path inside it), in
    the background (busybox has no nohup)."""
    attach(container, f"({WRITER.format(dir=directory)}) </dev/null >/dev/null 2>&1 &")


def stop_writer(container, directory):
    attach(container, f"touch {directory}.stop")


def wait_for_journal(container, directory, lines, timeout=600):
    """Wait until the writer's journal (read on the host, through the rootfs) has ``lines``."""
    path = os.path.join(rootfs(container), directory.lstrip('/') + '.journal')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path) and len(open(path).read().splitlines()) >= lines:
            return
        time.sleep(0.2)
    raise AssertionError(f"the writer wrote fewer than {lines} journal lines in {timeout} s")


def check_journal(tree, directory):
    """Every file the journal in ``tree`` lists is in ``tree`` with its sha256; returns how many.
    A last line cut short (written as the freeze came) is not a finished file."""
    with open(os.path.join(tree, directory.lstrip('/') + '.journal')) as handle:
        lines = [line.split() for line in handle.read().splitlines()]
    checked = 0
    for fields in lines:
        if len(fields) != 2 or len(fields[1]) != 64:
            continue
        path = os.path.join(tree, directory.lstrip('/'), fields[0])
        with open(path, 'rb') as handle:
            assert hashlib.sha256(handle.read()).hexdigest() == fields[1], path
        checked += 1
    return checked


@contextmanager
def btrfs_mount(size='2G', parent='/var/tmp'):
    """A btrfs on a loop device over a sparse file under ``parent``, mounted; unmounted, the
    loop device detached and the file removed at the end. Skips where it cannot be made."""
    if shutil.which('mkfs.btrfs') is None:
        pytest.skip('needs btrfs-progs (make deps)')
    work = tempfile.mkdtemp(prefix='gv-btrfs-', dir=parent)
    image, mount = os.path.join(work, 'fs.img'), os.path.join(work, 'mnt')
    os.mkdir(mount)
    os.chmod(work, 0o755)
    with open(image, 'wb') as handle:
        handle.truncate(int(size[:-1]) * 1024 ** 3)
    device = None
    try:
        proc = run(['losetup', '-f', '--show', image], check=False)
        if proc.returncode != 0:
            pytest.skip(f"no loop device here: {proc.stderr.strip()}")
        device = proc.stdout.strip()
        run(['mkfs.btrfs', '-q', device])
        run(['mount', device, mount])
        os.chmod(mount, 0o755)
        yield mount
    finally:
        if os.path.ismount(mount):
            run(['umount', mount], check=False)
            if os.path.ismount(mount):
                run(['umount', '-l', mount], check=False)
        if device:
            run(['losetup', '-d', device], check=False)
        shutil.rmtree(work, ignore_errors=True)


def host_library_file():
    """A file under the host's /usr/lib that the busybox template bind-mounts into the
    container, as a path relative to the root: it must never be in a captured tree."""
    for name in ('os-release', 'x86_64-linux-gnu/libc.so.6'):
        if os.path.isfile(os.path.join('/usr/lib', name)):
            return os.path.join('usr/lib', name)
    raise AssertionError('no known file under /usr/lib')


def host_ids(tree, relative):
    stat = os.lstat(os.path.join(tree, relative))
    return stat.st_uid, stat.st_gid


def ensure_running(container):
    """Leave a shared container running and thawed for the next test, whatever this one did."""
    from guestvault_engine.guest.lxc.container import FROZEN, RUNNING
    state = container.state()
    if state == FROZEN:
        container.thaw()
    elif state != RUNNING:
        container.start()
