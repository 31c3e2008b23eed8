"""Every ``qemu-img`` call the engine makes; qemu-img is the reference tool for image work.

Nothing outside ``format/`` builds a qemu-img argument list.
"""
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


def _qemu_img(*args, what=None):
    proc = subprocess.run([qemu_img_binary(), *args], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise StorageError(f"{what or 'qemu-img ' + args[0]} failed: "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def create_qcow2(path, size, backing=None, compression=None, backing_format='qcow2'):
    """A new qcow2 image; ``backing`` is stored as given (a relative path stays relative)."""
    args = ['create', '-q', '-f', 'qcow2']
    if compression:
        args += ['-o', f'compression_type={compression}']
    if backing:
        # -u: the backing file's size is known (same disk), no need to open the whole chain.
        args += ['-u', '-b', backing, '-F', backing_format]
    _qemu_img(*args, path, str(size))


def info(path, chain=False, fmt=None):
    args = ['info', '--output=json', '-U'] + (['-f', fmt] if fmt else [])
    if chain:
        args.append('--backing-chain')
    return json.loads(_qemu_img(*args, path))


def in_use(path):
    """True if a running QEMU (or another tool) holds a write lock on the image."""
    proc = subprocess.run([qemu_img_binary(), 'info', '--output=json', path],
                          capture_output=True, text=True, check=False)
    return proc.returncode != 0 and 'lock' in proc.stderr


def allocated_bytes(path):
    """Bytes of guest data stored in this image itself (not in its backing files)."""
    extents = json.loads(_qemu_img('map', '-U', '--output=json', path))
    return sum(e['length'] for e in extents if e.get('data') and e.get('depth', 0) == 0)


def check(path, fmt=None):
    """Run ``qemu-img check``; return (ok, message)."""
    proc = subprocess.run([qemu_img_binary(), 'check', '-U'] + (['-f', fmt] if fmt else [])
                          + [path], capture_output=True, text=True, check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()


def start_convert(source, target, fmt, bwlimit_kib=0):
    """``qemu-img convert`` of ``source`` (read through its backing chain) as a running process.

    Raw targets keep their holes (thin); ``bwlimit_kib`` limits the read rate.
    """
    args = [qemu_img_binary(), 'convert', '-q', '-O', fmt]
    if fmt == 'raw':
        args += ['-S', '4k']
    if bwlimit_kib:
        args += ['-r', str(int(bwlimit_kib) * 1024)]
    return subprocess.Popen(args + [source, target], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def convert(source, target, fmt='qcow2'):
    _qemu_img('convert', '-q', '-O', fmt, source, target)


def rebase(path, backing, safe=True):
    """Make ``path`` read through ``backing`` ('' for none). Safe mode writes in every cluster
    whose content would otherwise change, so the image keeps its content."""
    args = ['rebase', '-q', '-f', 'qcow2'] + ([] if safe else ['-u']) + ['-b', backing]
    if backing:
        args += ['-F', 'qcow2']
    _qemu_img(*args, path, what=f"qemu-img rebase of {path}")


def commit(path):
    """Write ``path``'s own clusters into its backing file; ``path`` is dropped."""
    _qemu_img('commit', '-q', '-d', path)


def create_snapshot(path, name):
    _qemu_img('snapshot', '-c', name, path)


def convert_raw(source, target, fmt='qcow2', direct=False):
    """``qemu-img convert`` of a (sparse) raw file into a new ``fmt`` image: holes stay
    unallocated, writes go out of order on several coroutines (the fastest way to fill a new
    qcow2 from a file). ``direct``: both files bypass the page cache (``O_DIRECT``; the file
    system of both must take it)."""
    cache = ('-T', 'none', '-t', 'none') if direct else ()
    _qemu_img('convert', '-q', *cache, '-f', 'raw', '-O', fmt, '-W', '-m', '8', source, target,
              what=f"qemu-img convert of {source} to {fmt}")


def compare(first, second):
    """``qemu-img compare`` of two images (any formats): (identical, message)."""
    proc = subprocess.run([qemu_img_binary(), 'compare', '-q', first, second],
                          capture_output=True, text=True, check=False)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip()
