"""Build the real Linux test guest's image (see linuxguest.py) from Debian packages only.

The engine's image builder (images/debian_image.py, which also builds the file-restore
appliance) does the work: Debian's kernel, busybox-static and qemu-guest-agent with the
libraries it needs, the kernel modules the guest loads, and the guest-side files of
``tools/linuxguest/``. Cached under ``.build/linuxguest/<key>/``; the key hashes the packages'
versions, the guest-side files and the builder, so any change rebuilds.
"""
from __future__ import annotations

import os

from engine_loader import load_engine

load_engine()
from guestvault_engine.images.debian_image import BuiltImage, ImageSpec, build  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'linuxguest')
DEFAULT_CACHE = os.path.join(ROOT, '.build', 'linuxguest')
# crc32c_generic is only a soft dependency of ext4 (through the crypto API), so it is named.
WANTED_MODULES = ('virtio_pci', 'virtio_blk', 'virtio_console', 'crc32c_generic', 'ext4',
                  'button', 'evdev')

GuestImage = BuiltImage


def guest_spec():
    def guest_file(name):
        return os.path.join(GUEST_FILES, name)
    files = {
        'etc/inittab': (guest_file('inittab'), 0o644),
        'etc/guestvault/rc': (guest_file('rc'), 0o755),
        'etc/guestvault/stop': (guest_file('stop'), 0o755),
        'etc/guestvault/workload': (guest_file('workload'), 0o755),
        'etc/guestvault/fsfreeze-hook': (guest_file('fsfreeze-hook'), 0o755),
        'sbin/shutdown': (guest_file('shutdown'), 0o755),
        # busybox acpid's default action for the power button (PWRF) is this path.
        'etc/acpi/PWRF/00000080': (guest_file('power-button'), 0o755),
    }
    return ImageSpec(name='linux test guest', packages=('busybox-static',),
                     binaries=(('qemu-guest-agent', 'usr/sbin/qemu-ga'),),
                     modules=WANTED_MODULES, files=files)


def build_image(cache_dir=None):
    """The guest image, built once per key (package versions, guest files, the builder)."""
    cache_dir = cache_dir or os.environ.get('GUESTVAULT_LINUXGUEST_CACHE', DEFAULT_CACHE)
    return build(guest_spec(), cache_dir)
