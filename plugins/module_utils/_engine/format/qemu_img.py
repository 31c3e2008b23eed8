"""The few ``qemu-img`` calls the engine makes; qemu-img is the reference tool for image work."""
from __future__ import annotations

import json
import shutil
import subprocess

from ..errors import GuestvaultError, StorageError


def qemu_img_binary():
    binary = shutil.which('qemu-img')
    if binary is None:
        raise GuestvaultError("qemu-img is not installed; install Debian's qemu-utils")
    return binary


def _qemu_img(*args):
    proc = subprocess.run([qemu_img_binary(), *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise StorageError(f"qemu-img {args[0]} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def create_qcow2(path, size, backing=None, compression=None):
    """A new qcow2 image; ``backing`` is stored as given (a relative path stays relative)."""
    args = ['create', '-q', '-f', 'qcow2']
    options = []
    if compression:
        options.append(f'compression_type={compression}')
    if options:
        args += ['-o', ','.join(options)]
    if backing:
        # -u: the backing file's size is known (same disk), no need to open the whole chain.
        args += ['-u', '-b', backing, '-F', 'qcow2']
    _qemu_img(*args, path, str(size))


def info(path, chain=False, fmt=None):
    args = ['info', '--output=json', '-U'] + (['-f', fmt] if fmt else [])
    if chain:
        args.append('--backing-chain')
    return json.loads(_qemu_img(*args, path))


def allocated_bytes(path):
    """Bytes of guest data stored in this image itself (not in its backing files)."""
    extents = json.loads(_qemu_img('map', '-U', '--output=json', path))
    return sum(e['length'] for e in extents if e.get('data') and e.get('depth', 0) == 0)


def check(path, fmt=None):
    """Run ``qemu-img check``; return (ok, message)."""
    proc = subprocess.run([qemu_img_binary(), 'check', '-U'] + (['-f', fmt] if fmt else [])
                          + [path], capture_output=True, text=True, check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()
