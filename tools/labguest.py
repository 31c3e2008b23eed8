#!/usr/bin/env python
"""Throwaway QEMU guests for the demo, the tests and the benchmarks.

A lab guest is a real QEMU process in prelaunch mode (``-S``: no guest OS runs) with real qcow2
(and optionally raw) disks. Its disk data is changed through QMP, with ``human-monitor-command``
running ``qemu-io`` against the device's backend, exactly as a guest's own writes would arrive:
they go through the block layer, so dirty bitmaps see them.

Command line (used by ``make demo``)::

    labguest.py start DIR [--disks N] [--size 256M] [--vmid 9001] [--fill]
    labguest.py write DIR DISK PATTERN OFFSET LENGTH
    labguest.py pause DIR
    labguest.py stop DIR
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from qemu.qmp.legacy import QEMUMonitorProtocol

QEMU = shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'


def kvm_usable():
    """FACTS.md: /dev/kvm may open yet be a paravirtual KVM; a no-OS guest runs under it fine."""
    try:
        fd = os.open('/dev/kvm', os.O_RDWR)
    except OSError:
        return False
    os.close(fd)
    return True


def parse_size(text):
    units = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    text = str(text).upper().rstrip('B')
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def wait_listening(proc, sockets, log_path, timeout=120):
    """Wait until QEMU accepts connections on each of its unix ``sockets``.

    A socket's file appears at bind(), a moment before listen(): on a loaded machine a client
    that connects in between is refused, so the file's existence is not enough."""
    deadline = time.monotonic() + timeout
    for path in sockets:
        while True:
            if proc.poll() is not None:
                with open(log_path, errors='replace') as handle:
                    raise RuntimeError(f"QEMU exited: {handle.read()[-2000:]}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"QEMU did not listen on {path} within {timeout} s") \
                        from None
                time.sleep(0.05)


class ControlMonitor:
    """The lab's own QMP connection to a guest's ``control_socket`` (QEMU serves one client per
    QMP socket, so guestvault keeps ``qmp_socket`` for itself)."""

    control_socket = None
    _qmp = None

    def qmp(self):
        if self._qmp is None:
            self._qmp = QEMUMonitorProtocol(self.control_socket)
            self._qmp.connect()
        return self._qmp

    def execute(self, command, **arguments):
        return self.qmp().cmd(command, **arguments)

    def _close_qmp(self):
        if self._qmp is not None:
            try:
                self._qmp.close()
            except Exception:
                pass
            self._qmp = None


class LabGuest(ControlMonitor):
    """A prelaunch QEMU guest whose disks are ``vd0``, ``vd1``, ... (device ids)."""

    def __init__(self, workdir, disks=(('qcow2', '256M'),), vmid=9001, name='labguest',
                 extra_args=(), no_shutdown=True):
        self.workdir = os.path.abspath(workdir)
        self.vmid = vmid
        self.name = name
        self.disk_specs = list(disks)
        self.extra_args = list(extra_args)
        self.no_shutdown = no_shutdown
        # Two monitors: QEMU serves one client per QMP socket, and the lab's own connection
        # (writes, pauses) must not lock guestvault out of the guest's socket.
        self.qmp_socket = os.path.join(self.workdir, 'qmp.sock')
        self.control_socket = os.path.join(self.workdir, 'control.sock')
        self.pidfile = os.path.join(self.workdir, 'qemu.pid')
        self.proc = None
        self._qmp = None

    def disk_path(self, index):
        fmt = self.disk_specs[index][0]
        return os.path.join(self.workdir, f"disk{index}.{fmt}")

    @property
    def disk_ids(self):
        return [f"vd{i}" for i in range(len(self.disk_specs))]

    def create_disks(self):
        os.makedirs(self.workdir, exist_ok=True)
        for index, (fmt, size) in enumerate(self.disk_specs):
            path = self.disk_path(index)
            if not os.path.exists(path):
                subprocess.run(['qemu-img', 'create', '-q', '-f', fmt, path, str(size)],
                               check=True)

    def command(self):
        args = [QEMU, '-S', '-nodefaults', '-display', 'none', '-name', self.name,
                '-machine', 'q35,accel=' + ('kvm' if kvm_usable() else 'tcg'), '-m', '128',
                '-qmp', f'unix:{self.qmp_socket},server=on,wait=off',
                '-qmp', f'unix:{self.control_socket},server=on,wait=off',
                '-pidfile', self.pidfile]
        if self.no_shutdown:
            args.append('-no-shutdown')
        for index, (fmt, _size) in enumerate(self.disk_specs):
            args += ['-blockdev', f'driver={fmt},node-name=disk{index},file.driver=file,'
                                  f'file.filename={self.disk_path(index)}',
                     '-device', f'virtio-blk-pci,drive=disk{index},id=vd{index}']
        return args + self.extra_args

    def start(self):
        self.create_disks()
        for sock in (self.qmp_socket, self.control_socket):
            if os.path.exists(sock):
                os.unlink(sock)
        log = open(os.path.join(self.workdir, 'qemu.log'), 'ab')
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log,
                                     start_new_session=True)
        wait_listening(self.proc, (self.qmp_socket, self.control_socket), log.name)
        return self

    def write(self, disk, pattern, offset, length):
        """Write ``pattern`` (a byte) to a disk through the guest's block device."""
        self.qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")

    def write_file(self, disk, path, offset, length):
        self.qemu_io(disk, f"write -s {path} {offset} {length}")

    def discard(self, disk, offset, length):
        self.qemu_io(disk, f"write -z {offset} {length}")

    def qemu_io(self, disk, command):
        # qemu-io's own errors go to QEMU's stdout, never into the reply: check effects
        # separately (the tests read the images back).
        self.execute('human-monitor-command', **{
            'command-line': f'qemu-io -d /machine/peripheral/{disk}/virtio-backend "{command}"'})

    def pause(self):
        self.execute('stop')

    def pid(self):
        with open(self.pidfile) as handle:
            return int(handle.read().strip())

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid(), sig)
        self.wait_exit()

    def wait_exit(self, timeout=20):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None:
                if self.proc.poll() is not None:
                    break
            else:
                try:
                    os.kill(self.pid(), 0)
                except (OSError, ValueError):
                    break
            time.sleep(0.05)
        self._close_qmp()

    def stop(self):
        """Quit QEMU cleanly, so persistent bitmaps are written to the qcow2 images."""
        try:
            self.execute('quit')
        except Exception:
            pass
        self._close_qmp()
        try:
            self.wait_exit()
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def snapshot_disk(self, disk_index, dest):
        """What the guest's disk holds now, as a standalone image (guest must be paused or
        not writing): a point-in-time reference for comparisons."""
        # QEMU caches qcow2 metadata; flush it into the file before reading the file from outside.
        self.qemu_io(self.disk_ids[disk_index], 'flush')
        subprocess.run(['qemu-img', 'convert', '-U', '-O', 'qcow2', self.disk_path(disk_index),
                        dest], check=True)
        return dest


def fill_mixed(guest, disk, size, seed=1):
    """Fill a disk with mixed data: random, compressible text and patterns, with holes."""
    import random
    rng = random.Random(seed)
    scratch = os.path.join(guest.workdir, f'fill-{disk}.bin')
    chunk = 4 << 20
    offset = 0
    kind = 0
    while offset + chunk <= size:
        if kind % 4 == 0:
            data = rng.randbytes(chunk)
        elif kind % 4 == 1:
            words = b'guestvault backs up qemu guests over qmp with dirty bitmaps '
            data = (words * (chunk // len(words) + 1))[:chunk]
        elif kind % 4 == 2:
            data = bytes([kind % 251]) * chunk
        else:
            data = None  # a hole
        if data is not None:
            with open(scratch, 'wb') as handle:
                handle.write(data)
            guest.write_file(disk, scratch, offset, chunk)
        offset += chunk
        kind += 1
    if os.path.exists(scratch):
        os.unlink(scratch)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    sub = parser.add_subparsers(dest='action', required=True)
    start = sub.add_parser('start')
    start.add_argument('dir')
    start.add_argument('--disks', type=int, default=2)
    start.add_argument('--size', default='256M')
    start.add_argument('--vmid', type=int, default=9001)
    start.add_argument('--fill', action='store_true', help='fill the disks with mixed data')
    write = sub.add_parser('write')
    write.add_argument('dir')
    write.add_argument('disk')
    write.add_argument('pattern', type=lambda s: int(s, 0))
    write.add_argument('offset')
    write.add_argument('length')
    stop = sub.add_parser('stop')
    stop.add_argument('dir')
    pause = sub.add_parser('pause', help='pause the vCPUs and flush the disks to their files')
    pause.add_argument('dir')
    args = parser.parse_args(argv)
    state_file = os.path.join(os.path.abspath(args.dir), 'labguest.json')
    if args.action == 'start':
        guest = LabGuest(args.dir, disks=[('qcow2', args.size)] * args.disks, vmid=args.vmid,
                         name=f'demo{args.vmid}').start()
        if args.fill:
            for disk in guest.disk_ids:
                fill_mixed(guest, disk, parse_size(args.size))
        with open(state_file, 'w') as handle:
            json.dump({'disks': guest.disk_specs, 'vmid': guest.vmid, 'name': guest.name}, handle)
        print(json.dumps({'qmp_socket': guest.qmp_socket, 'pid': guest.pid(),
                          'disks': guest.disk_ids}))
        return 0
    with open(state_file) as handle:
        state = json.load(handle)
    guest = LabGuest(args.dir, disks=[tuple(d) for d in state['disks']], vmid=state['vmid'])
    if args.action == 'write':
        guest.write(args.disk, args.pattern, parse_size(args.offset), parse_size(args.length))
    elif args.action == 'pause':
        guest.pause()
        for disk in guest.disk_ids:
            guest.qemu_io(disk, 'flush')
    else:
        guest.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
