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


@contextmanager
def small_tmpfs(path, size):
    """A tmpfs of ``size`` mounted on ``path`` (a disk that fills up); skips where mounting fails."""
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(['umount', '-l', str(path)], check=False)
