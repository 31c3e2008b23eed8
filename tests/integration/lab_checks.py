"""Assertions the integration tests share: image content and the storage's visible state."""
import os
import subprocess


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
