"""What the integration tests share: image content, the storage's visible state, a small disk."""
import os
import subprocess
from contextlib import contextmanager

import pytest


def same_content(a, b):
    """qemu-img compare: guest-visible content equal (image format and holes aside)."""
    proc = subprocess.run(['qemu-img', 'compare', '-U', a, b], capture_output=True, text=True,
                          check=False)
    return proc.returncode == 0, proc.stdout + proc.stderr


def backups_in(store, vmid):
    gdir = os.path.join(store, 'vm', str(vmid))
    return sorted(n for n in os.listdir(gdir) if not n.startswith('.')) if os.path.isdir(gdir) else []


def hidden_in(store, vmid):
    gdir = os.path.join(store, 'vm', str(vmid))
    return sorted(n for n in os.listdir(gdir)
                  if n.startswith('.') and n != '.lock') if os.path.isdir(gdir) else []


def _mount_tmpfs(path, size):
    """Mount a tmpfs of ``size`` on ``path``: ``None``, or why it could not be mounted."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True, check=False)
    return None if proc.returncode == 0 else proc.stderr.strip()


@contextmanager
def small_tmpfs(path, size):
    """A tmpfs of ``size`` mounted on ``path`` (a disk that fills up); skips where mounting fails."""
    error = _mount_tmpfs(path, size)
    if error:
        pytest.skip(f"cannot mount a tmpfs here: {error}")
    try:
        yield str(path)
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False)


@contextmanager
def datastore_directory(path):
    """A directory for a datastore, on a tmpfs of its own where one can be mounted.

    A new datastore is 65536 empty chunk directories, as PBS makes them. On ext4 that writes
    256 MiB of directory blocks per test and costs seconds of system time (a dozen datastore
    tests wrote 3.9 GiB and took 4x as long); on a tmpfs nothing of it reaches the disk. Where
    no tmpfs can be mounted it is a plain directory: the same tests, only slower."""
    mounted = _mount_tmpfs(path, '4g') is None
    try:
        yield str(path)
    finally:
        if mounted:
            subprocess.run(['umount', '-l', str(path)], check=False)


def backup_location(kind, request, config_dir, tmp_path, monkeypatch):
    """Where backups go, as backup and restore options: a dumpdir of qcow2 chains, or a
    datastore ``ds`` (on the ``datastore_path`` fixture's directory)."""
    if kind == 'datastore':
        monkeypatch.setenv('GUESTVAULT_FLEECING_DIR', str(tmp_path / 'fleecing'))
        path = request.getfixturevalue('datastore_path')
        with open(os.path.join(config_dir, 'storage.cfg'), 'w') as handle:
            handle.write(f"datastore: ds\n\tpath {path}\n")
        return {'storage': 'ds'}
    (tmp_path / 'dump').mkdir()
    return {'dumpdir': str(tmp_path / 'dump')}
