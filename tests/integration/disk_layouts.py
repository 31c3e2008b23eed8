"""Guest disks with real layouts for file-restore tests: an MBR partition table, an ext4
partition made on the host (``mkfs.ext4 -d``), and an LVM physical volume whose logical volume
holds xfs, made inside a small maker VM (the host has neither LVM nor xfsprogs; the maker is
built from Debian's packages by the engine's own image builder, like the appliance).
"""
import hashlib
import os
import shutil
import struct
import subprocess
import uuid
import zlib

from guestvault_engine.restore import appliance
from guestvault_engine.images.debian_image import ImageSpec, build
from labguest import LabGuest

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.path.join(ROOT, '.build', 'disk-maker')
VG, LV = 'gvtest', 'data'

# Copies /dev/vdb's ext4 (the files: xfs/ and esp/) into a new xfs on an LV of a PV on
# /dev/vda2, and into a new FAT32 on /dev/vda3.
MAKER_INIT = r'''#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /run /tmp /mnt/src /mnt/dst; mount -t tmpfs tmpfs /run
mkdir -p /run/lock/lvm
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /etc/guestvault/modules
n=0; while [ ! -e /dev/vda3 ] || [ ! -e /dev/vdb ]; do usleep 100000; n=$((n+1)); [ $n -gt 100 ] && break; done
C='devices { obtain_device_list_from_udev = 0 } activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }'
set -e
lvm pvcreate --config "$C" -y /dev/vda2
lvm vgcreate --config "$C" VGNAME /dev/vda2
lvm lvcreate --config "$C" -y -n LVNAME -L 320m VGNAME
# xfsprogs refuses filesystems under 300 MB; 320 MiB it takes
mkfs.xfs -q /dev/mapper/VGNAME-LVNAME
mount -t ext4 -o ro /dev/vdb /mnt/src
mount -t xfs /dev/mapper/VGNAME-LVNAME /mnt/dst
cp -a /mnt/src/xfs/. /mnt/dst/
umount /mnt/dst
# an EFI system partition, as a real guest has one
mkdosfs -n GVESP /dev/vda3
mount -t vfat /dev/vda3 /mnt/dst
cp -r /mnt/src/esp/. /mnt/dst/
umount /mnt/dst; umount /mnt/src
lvm vgchange --config "$C" -an VGNAME
sync
echo MAKER-DONE
poweroff -f
'''.replace('VGNAME', VG).replace('LVNAME', LV)


def maker_image():
    spec = ImageSpec(name='test disk maker', packages=('busybox-static',),
                     binaries=(('lvm2', 'sbin/lvm'), ('xfsprogs', 'sbin/mkfs.xfs')),
                     modules=('virtio_pci', 'virtio_blk', 'crc32c_generic', 'ext4', 'xfs',
                              'dm_mod', 'vfat', 'nls_cp437', 'nls_ascii', 'nls_utf8', 'nls_iso8859_1'),
                     files={'init': (MAKER_INIT.encode(), 0o755)})
    return build(spec, CACHE)


def write_tree(root, files):
    """files: {relative path: bytes}; returns {relative path: sha256}."""
    sums = {}
    for relative, data in files.items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as handle:
            handle.write(data)
        sums[relative] = hashlib.sha256(data).hexdigest()
    return sums


def ext4_image(path, source_dir, size):
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', path, str(size)], check=True)
    subprocess.run(['mkfs.ext4', '-q', '-F', '-d', source_dir, path], check=True,
                   capture_output=True)


def mbr(partitions):
    """An MBR sector: partitions = [(first sector, sectors, type byte)]."""
    sector = bytearray(512)
    for index, (first, count, kind) in enumerate(partitions):
        entry = 446 + 16 * index
        sector[entry + 4] = kind
        struct.pack_into('<II', sector, entry + 8, first, count)
    sector[510:512] = b'\x55\xaa'
    return bytes(sector)


LINUX_DATA = uuid.UUID('0fc63daf-8483-4772-8e79-3d69d8477de4')


def gpt(disk_sectors, partitions):
    """A protective MBR, a GPT header and its 128 entries (LBA 0-33): partitions = [(first
    sector, last sector)] of Linux data. No backup header: Linux warns and uses the primary."""
    entries = bytearray(128 * 128)
    for index, (first, last) in enumerate(partitions):
        struct.pack_into('<16s16sQQQ', entries, index * 128, LINUX_DATA.bytes_le,
                         uuid.uuid4().bytes_le, first, last, 0)
    header = bytearray(92)
    struct.pack_into('<8sIIIIQQQQ16sQIII', header, 0, b'EFI PART', 0x00010000, 92, 0, 0, 1,
                     disk_sectors - 1, 34, disk_sectors - 34, uuid.uuid4().bytes_le, 2, 128, 128,
                     zlib.crc32(entries))
    struct.pack_into('<I', header, 16, zlib.crc32(header))
    return mbr([(1, disk_sectors - 1, 0xEE)]) + bytes(header).ljust(512, b'\0') + bytes(entries)


def gpt_ext4_disk(workdir, files, qcow2_path, size=48 * MiB):
    """A qcow2 disk with a GPT whose one partition (sector 2048 on) is an ext4 holding files."""
    os.makedirs(workdir, exist_ok=True)
    source = os.path.join(workdir, 'gpt-src')
    sums = write_tree(source, files)
    part = os.path.join(workdir, 'gpt-part.raw')
    ext4_image(part, source, size - 2 * MiB)
    disk = os.path.join(workdir, 'gpt-disk.raw')
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', disk, str(size)], check=True)
    with open(disk, 'r+b') as out:
        out.write(gpt(size // 512, [(2048, 2048 + (size - 2 * MiB) // 512 - 1)]))
        out.seek(2048 * 512)
        with open(part, 'rb') as handle:
            shutil.copyfileobj(handle, out)
    subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', disk, qcow2_path], check=True)
    os.unlink(disk)
    os.unlink(part)
    return sums


def partitioned_lvm_disk(workdir, ext4_files, xfs_files, qcow2_path, esp_files=None,
                         timeout=600):
    """A qcow2 disk with an MBR: partition 1 ext4 holding ext4_files, partition 2 (at the end)
    an LVM PV whose LV gvtest/data is xfs holding xfs_files, partition 3 a FAT32 (an EFI system
    partition) holding esp_files. Returns ({path: sha256} of each)."""
    os.makedirs(workdir, exist_ok=True)
    ext4_src, carrier_src = os.path.join(workdir, 'ext4-src'), os.path.join(workdir, 'carrier')
    ext4_sums = write_tree(ext4_src, ext4_files)
    xfs_sums = write_tree(os.path.join(carrier_src, 'xfs'), xfs_files)
    esp_sums = write_tree(os.path.join(carrier_src, 'esp'), esp_files or {'README': b'esp\n'})
    part1 = os.path.join(workdir, 'part1.raw')
    ext4_image(part1, ext4_src, 32 * MiB)
    carrier = os.path.join(workdir, 'carrier.raw')
    ext4_image(carrier, carrier_src, 48 * MiB)
    disk = os.path.join(workdir, 'disk.raw')
    size = 460 * MiB
    subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', disk, str(size)], check=True)
    first1, count1 = 2048, 32 * MiB // 512
    first3, count3 = first1 + count1, 64 * MiB // 512
    first2 = first3 + count3
    with open(disk, 'r+b') as out:
        out.write(mbr([(first1, count1, 0x83), (first2, size // 512 - first2, 0x8e),
                       (first3, count3, 0xef)]))
        out.seek(first1 * 512)
        with open(part1, 'rb') as handle:
            shutil.copyfileobj(handle, out)
    image = maker_image()
    console = os.path.join(workdir, 'maker-console.log')
    accel = 'kvm' if appliance._kvm_verdict(image) else 'tcg'
    subprocess.run([appliance.qemu_system(), '-nodefaults', '-display', 'none',
                    '-machine', f'q35,accel={accel}', '-m', '512', '-no-reboot',
                    '-kernel', image.kernel, '-initrd', image.initrd,
                    '-append', 'console=ttyS0 quiet panic=-1 rdinit=/init',
                    '-chardev', f'file,id=c0,path={console}', '-serial', 'chardev:c0',
                    '-drive', f'file={disk},format=raw,if=virtio',
                    '-drive', f'file={carrier},format=raw,if=virtio,readonly=on'],
                   check=True, timeout=timeout, capture_output=True)
    with open(console, encoding='utf-8', errors='replace') as handle:
        text = handle.read()
    assert 'MAKER-DONE' in text, text[-3000:]
    subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', disk, qcow2_path], check=True)
    for path in (disk, part1, carrier):
        os.unlink(path)
    return ext4_sums, xfs_sums, esp_sums


class LayoutGuest(LabGuest):
    """A lab guest on a prepared disk."""

    def __init__(self, workdir, disk, vmid):
        super().__init__(workdir, disks=[('qcow2', 0)], vmid=vmid)
        self.disk = disk

    def disk_path(self, index):
        return self.disk
