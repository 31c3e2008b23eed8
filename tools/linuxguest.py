#!/usr/bin/env python
"""A real small Linux guest for tests of backup consistency (fsfreeze, suspend, stop).

The guest is Debian's own kernel booted straight into a busybox initramfs that also holds
qemu-ga; its only disk (``vd0``) is an ext4 data disk on which a workload keeps writing files
and a journal of their checksums. Everything comes from Debian packages (``apt-get download``
+ ``dpkg -x``, nothing is installed): ``linuxguest_build.py`` builds the image and caches it
under ``.build/linuxguest/<key>/``. This file runs it: QEMU, the agent, and checks of images.

Guest-side files are in ``tools/linuxguest/`` (see ``rc`` there for the kernel command-line
switches). Markers on the serial console: ``GUESTVAULT-READY``, ``GUESTVAULT-POWEROFF``, ...

Command line (manual use)::

    linuxguest.py build [DIR]                    build (or find) the image; prints its paths
    linuxguest.py boot DIR [--no-workload] [--no-agent] [--ignore-shutdown] [--accel tcg|kvm]
    linuxguest.py inspect IMAGE                  check an ext4 data disk image (qcow2 or raw)

Python use::

    image = build_image()
    guest = LinuxGuest(workdir, image).start().wait_ready()
    agent_call(guest.agent_socket, 'guest-fsfreeze-freeze')
    report = inspect_ext4(copy_of_data_disk, scratch_dir)
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from labguest import ControlMonitor, wait_listening
from linuxguest_build import DEFAULT_CACHE, GuestImage, build_image

QEMU = shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'
# No panic=-1 / -no-reboot: stop mode restarts a powered-off guest with system_reset, which
# -no-reboot would turn into another shutdown.
KERNEL_APPEND = 'console=ttyS0 quiet edd=off rdinit=/init'
READY_MARKER = 'GUESTVAULT-READY'


# ----------------------------------------------------------------------------- data disk

def make_data_disk(path, size='64M'):
    """An empty ext4 data disk as qcow2: formatted on the host (a raw file), then converted."""
    raw = path + '.raw'
    try:
        subprocess.run(['qemu-img', 'create', '-q', '-f', 'raw', raw, str(size)], check=True)
        # No lazy init: the guest must not be busy zeroing inode tables in the background.
        subprocess.run(['mkfs.ext4', '-q', '-F', '-L', 'gvdata', '-E', 'lazy_itable_init=0,lazy_journal_init=0',
                        raw], check=True, capture_output=True)
        subprocess.run(['qemu-img', 'convert', '-q', '-O', 'qcow2', raw, path], check=True)
    finally:
        if os.path.exists(raw):
            os.unlink(raw)
    return path


# ----------------------------------------------------------------------------- accelerator

def _kvm_verdict_path(image):
    """Where a probe's verdict is kept: per image, host kernel and QEMU binary."""
    host = os.uname().release + ':' + str(os.stat(QEMU).st_mtime_ns if os.path.exists(QEMU) else 0)
    return os.path.join(image.directory, f'kvm-{hashlib.sha256(host.encode()).hexdigest()[:12]}.json')


def kvm_boots(image, timeout=15.0):
    """Whether this guest's kernel really boots under KVM here (FACTS.md: /dev/kvm may be a
    paravirtual KVM under which Linux hangs): one probe boot, its verdict kept on disk."""
    try:
        fd = os.open('/dev/kvm', os.O_RDWR)
        os.close(fd)
    except OSError:
        return False
    path = _kvm_verdict_path(image)
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)['kvm']
    verdict = False
    with tempfile.TemporaryDirectory(prefix='kvm-probe-') as scratch:
        # Kernel messages on: a kernel that hangs in early boot prints nothing at all, so
        # silence after a few seconds is a verdict without waiting for the full timeout.
        guest = LinuxGuest(scratch, image, agent=False, workload=False, accel='kvm', data_disk=False,
                           extra_append='loglevel=7')
        try:
            guest.start()
            guest.wait_console('Linux version', 5)
            guest.wait_ready(timeout)
            verdict = True
        except Exception:
            verdict = False
        finally:
            guest.stop()
    with open(path + '.tmp', 'w') as handle:
        json.dump({'kvm': verdict, 'host': os.uname().release}, handle)
    os.replace(path + '.tmp', path)
    return verdict


def choose_accel(image):
    """GUESTVAULT_TEST_ACCEL=tcg|kvm forces a choice; otherwise KVM if a probe boot works."""
    forced = os.environ.get('GUESTVAULT_TEST_ACCEL', '').strip().lower()
    if forced in ('tcg', 'kvm'):
        return forced
    return 'kvm' if kvm_boots(image) else 'tcg'


# ----------------------------------------------------------------------------- the runner

class LinuxGuest(ControlMonitor):
    """A QEMU process booting the guest image, with its ext4 data disk as device ``vd0``.

    Sockets: ``qmp_socket`` for guestvault (one client), ``control_socket`` for the test's own
    QMP connection, ``agent_socket`` for qemu-ga (one client at a time: close yours before
    guestvault uses it). Console output goes to ``console_log``."""

    def __init__(self, workdir, image, data_disk=None, vmid=9101, agent=True, workload=True,
                 ignore_shutdown=False, accel=None, memory=256, name=None, data_size='64M',
                 pause_ms=100, extra_append='', extra_args=()):
        self.workdir = os.path.abspath(workdir)
        self.image = image if isinstance(image, GuestImage) else GuestImage.load(image)
        # data_disk: None = create workdir/data.qcow2 if missing; a path = use that disk;
        # False = no disk (the KVM probe).
        self.data_disk = os.path.join(self.workdir, 'data.qcow2') if data_disk is None else data_disk
        self.vmid = vmid
        self.name = name or f'linux{vmid}'
        self.agent = agent
        self.workload = workload
        self.ignore_shutdown = ignore_shutdown
        self.accel = accel
        self.memory = memory
        self.data_size = data_size
        self.pause_ms = pause_ms
        self.extra_append = extra_append
        self.extra_args = list(extra_args)
        self.qmp_socket = os.path.join(self.workdir, 'qmp.sock')
        self.control_socket = os.path.join(self.workdir, 'control.sock')
        self.agent_socket = os.path.join(self.workdir, 'agent.sock')
        self.console_log = os.path.join(self.workdir, 'console.log')
        self.qemu_log = os.path.join(self.workdir, 'qemu.log')
        self.pidfile = os.path.join(self.workdir, 'qemu.pid')
        self.proc = None
        self.started_at = None
        self.ready_seconds = None
        self._qmp = None

    disk_ids = ['vd0']

    def kernel_append(self):
        switches = {'agent': int(bool(self.agent)), 'data': int(bool(self.data_disk)), 'workload': int(bool(self.workload)),
                    'ignore_shutdown': int(bool(self.ignore_shutdown)), 'pause_ms': int(self.pause_ms)}
        words = [KERNEL_APPEND] + [f'guestvault.{key}={value}' for key, value in switches.items()]
        return ' '.join(words + ([self.extra_append] if self.extra_append else []))

    def command(self):
        args = [QEMU, '-nodefaults', '-display', 'none', '-name', self.name,
                '-machine', f'q35,accel={self.accel}', '-m', str(self.memory),
                '-kernel', self.image.kernel, '-initrd', self.image.initrd,
                '-append', self.kernel_append(),
                '-chardev', f'file,id=console0,path={self.console_log}', '-serial', 'chardev:console0',
                '-qmp', f'unix:{self.qmp_socket},server=on,wait=off',
                '-qmp', f'unix:{self.control_socket},server=on,wait=off',
                '-pidfile', self.pidfile, '-no-shutdown']
        if self.data_disk:
            args += ['-blockdev', f'driver=qcow2,node-name=disk0,file.driver=file,file.filename={self.data_disk}',
                     '-device', 'virtio-blk-pci,drive=disk0,id=vd0']
        args += ['-chardev', f'socket,id=qga0,path={self.agent_socket},server=on,wait=off',
                 '-device', 'virtio-serial-pci,id=vser0',
                 '-device', 'virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0']
        return args + self.extra_args

    def start(self):
        os.makedirs(self.workdir, exist_ok=True)
        if self.data_disk and not os.path.exists(self.data_disk):
            make_data_disk(self.data_disk, self.data_size)
        if self.accel is None:
            self.accel = choose_accel(self.image)
        for path in (self.qmp_socket, self.control_socket, self.agent_socket, self.console_log):
            if os.path.exists(path):
                os.unlink(path)
        with open(self.qemu_log, 'ab') as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log, start_new_session=True)
        self.started_at = time.monotonic()
        wait_listening(self.proc, (self.qmp_socket, self.control_socket, self.agent_socket),
                       self.qemu_log)
        return self

    def console(self):
        try:
            with open(self.console_log, errors='replace') as handle:
                return handle.read()
        except FileNotFoundError:
            return ''

    @staticmethod
    def _tail(path, size=3000):
        try:
            with open(path, errors='replace') as handle:
                return handle.read()[-size:]
        except FileNotFoundError:
            return ''

    def wait_console(self, marker, timeout=60.0):
        """Wait for a line of the serial console to contain ``marker``; returns that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.console().splitlines():
                if marker in line:
                    return line
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited before {marker!r}; console:\n{self._tail(self.console_log)}"
                                   f"\nqemu:\n{self._tail(self.qemu_log)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {marker!r} on the console within {timeout} s ({self.accel}); "
                                   f"console:\n{self._tail(self.console_log)}")
            time.sleep(0.1)

    def wait_ready(self, timeout=90.0):
        self.wait_console(READY_MARKER, timeout)
        errors = [entry for entry in self.console().splitlines() if 'GUESTVAULT-ERROR' in entry]
        if errors:
            raise RuntimeError(f"guest set-up failed: {errors}")
        if self.ready_seconds is None:
            self.ready_seconds = time.monotonic() - self.started_at
        if self.agent:
            self.wait_agent(timeout)
        return self

    def wait_agent(self, timeout=30.0):
        """qemu-ga answers guest-ping (it starts a moment after the READY marker's fork)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return agent_call(self.agent_socket, 'guest-ping', timeout=5)
            except (OSError, TimeoutError, AgentError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    # --- QMP (control socket)

    def status(self):
        return self.execute('query-status')['status']

    def wait_status(self, wanted, timeout=60.0):
        deadline = time.monotonic() + timeout
        while True:
            current = self.status()
            if current == wanted:
                return current
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest status {current!r}, not {wanted!r}, after {timeout} s")
            time.sleep(0.2)

    def powerdown(self):
        """The ACPI power button."""
        return self.execute('system_powerdown')

    def flush_disk(self):
        """Write QEMU's cached qcow2 metadata into the file, so an outside reader sees it all."""
        self.execute('human-monitor-command',
                     **{'command-line': 'qemu-io -d /machine/peripheral/vd0/virtio-backend "flush"'})

    def snapshot_data(self, dest):
        """Copy what the data disk holds now (qemu-img convert -U, after a flush of QEMU's
        metadata cache). Consistent only if the guest's fs is frozen or the guest is stopped."""
        self.flush_disk()
        subprocess.run(['qemu-img', 'convert', '-U', '-O', 'qcow2', self.data_disk, dest], check=True)
        return dest

    # --- the agent

    def agent_call(self, command, arguments=None, timeout=30.0, reply=True):
        return agent_call(self.agent_socket, command, arguments, timeout=timeout, reply=reply)

    def guest_exec(self, argv, timeout=30.0):
        return guest_exec(self.agent_socket, argv, timeout=timeout)

    def read_file(self, path, timeout=30.0):
        return guest_read_file(self.agent_socket, path, timeout=timeout)

    def journal(self):
        """The live /data/journal, parsed (see parse_journal)."""
        return parse_journal(self.read_file('/data/journal'))

    # --- process

    def pid(self):
        with open(self.pidfile) as handle:
            return int(handle.read().strip())

    def kill(self):
        """SIGKILL QEMU: the guest's disk is left as a crash leaves it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_qmp()

    def stop(self):
        """End QEMU (quit, then kill) without waiting for the guest: a test's clean-up."""
        if self.proc is None:
            return
        try:
            if self.proc.poll() is None:
                self.execute('quit')
        except Exception:
            pass
        self._close_qmp()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ----------------------------------------------------------------------------- agent client

class AgentError(RuntimeError):
    """qemu-ga answered with an error."""


def _read_json(sock, buffer, deadline):
    """One JSON document from the stream (qemu-ga ends each with a newline); (doc, rest)."""
    decoder = json.JSONDecoder()
    while True:
        text = buffer.lstrip(b'\xff \r\n')
        if text:
            try:
                doc, end = decoder.raw_decode(text.decode())
                return doc, text.decode()[end:].encode()
            except (ValueError, UnicodeDecodeError):
                pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no reply from qemu-ga (have {buffer[:200]!r})")
        sock.settimeout(remaining)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("qemu-ga socket closed")
        buffer += chunk


def agent_call(socket_path, command, arguments=None, timeout=30.0, reply=True):
    """Run one qemu-ga command over its chardev socket; returns its 'return' value.

    guest-sync-delimited first: the agent answers it after a 0xFF byte, so anything left in
    the channel by an earlier client is skipped. reply=False for commands that never answer
    (guest-shutdown, guest-suspend-*): returns None once the command is sent."""
    deadline = time.monotonic() + timeout
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(socket_path)
        token = random.randrange(1, 2 ** 31)
        sock.sendall(json.dumps({'execute': 'guest-sync-delimited', 'arguments': {'id': token}}).encode() + b'\n')
        buffer = b''
        while True:
            # Up to the 0xFF that precedes the sync answer; stale bytes before it are dropped.
            while b'\xff' not in buffer:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("qemu-ga did not answer guest-sync-delimited")
                sock.settimeout(remaining)
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("qemu-ga socket closed")
                buffer += chunk
            buffer = buffer[buffer.index(b'\xff') + 1:]
            doc, buffer = _read_json(sock, buffer, deadline)
            if doc.get('return') == token:
                break
        message = {'execute': command}
        if arguments:
            message['arguments'] = arguments
        sock.sendall(json.dumps(message).encode() + b'\n')
        if not reply:
            return None
        doc, _rest = _read_json(sock, buffer, deadline)
        if 'error' in doc:
            raise AgentError(f"{command}: {doc['error'].get('class')}: {doc['error'].get('desc')}")
        return doc.get('return')
    finally:
        sock.close()


def guest_exec(socket_path, argv, timeout=30.0):
    """Run a program in the guest through qemu-ga: (exit code, stdout bytes, stderr bytes)."""
    import base64
    started = agent_call(socket_path, 'guest-exec', {'path': argv[0], 'arg': list(argv[1:]),
                                                     'capture-output': True}, timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        status = agent_call(socket_path, 'guest-exec-status', {'pid': started['pid']}, timeout=timeout)
        if status.get('exited'):
            return (status.get('exitcode', -1), base64.b64decode(status.get('out-data', '')),
                    base64.b64decode(status.get('err-data', '')))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{argv} still running in the guest after {timeout} s")
        time.sleep(0.1)


def guest_read_file(socket_path, path, timeout=30.0):
    """A file's bytes, read in the guest through guest-file-open/read/close."""
    import base64
    handle = agent_call(socket_path, 'guest-file-open', {'path': path, 'mode': 'r'}, timeout=timeout)
    data = io.BytesIO()
    try:
        while True:
            chunk = agent_call(socket_path, 'guest-file-read', {'handle': handle, 'count': 48 * 1024},
                               timeout=timeout)
            data.write(base64.b64decode(chunk.get('buf-b64', '')))
            if chunk.get('eof') or not chunk.get('count'):
                break
    finally:
        agent_call(socket_path, 'guest-file-close', {'handle': handle}, timeout=timeout)
    return data.getvalue()


# ----------------------------------------------------------------------------- image checks

@dataclasses.dataclass
class Journal:
    """The workload's journal: live entries {seq: (sha256, size)}, removed seqs, torn tail."""
    entries: dict
    removed: set
    torn_tail: bool
    lines: int


def parse_journal(data):
    """Lines '<seq> <sha256> <size>' and 'rm <seq>'. A last line without its newline is a
    write the snapshot caught half-way (never after a freeze: one write() per line)."""
    text = data.decode(errors='replace')
    lines = text.split('\n')
    torn = lines[-1] != ''
    entries, removed = {}, set()
    for line in lines[:-1]:
        fields = line.split()
        if len(fields) == 2 and fields[0] == 'rm':
            removed.add(int(fields[1]))
            entries.pop(int(fields[1]), None)
        elif len(fields) == 3:
            entries[int(fields[0])] = (fields[1], int(fields[2]))
    return Journal(entries, removed, torn, len(lines) - 1)


@dataclasses.dataclass
class Ext4Report:
    """What inspect_ext4 found. ``clean``: no needs_recovery, e2fsck -fn happy, all files good."""
    needs_recovery: bool
    fsck_exit: int
    fsck_output: str
    entries: int
    bad_files: list
    torn_tail: bool
    last_seq: int = 0          # the newest file the journal lists (0: none)
    after_replay: 'Ext4Report | None' = None

    @property
    def clean(self):
        return not self.needs_recovery and self.fsck_exit == 0 and not self.bad_files and not self.torn_tail


def _read_bytes(path):
    with open(path, 'rb') as handle:
        return handle.read()


def _raw_copy(image_path, workdir):
    info = json.loads(subprocess.run(['qemu-img', 'info', '-U', '--output=json', image_path],
                                     capture_output=True, text=True, check=True).stdout)
    raw = os.path.join(workdir, 'inspect.raw')
    if info['format'] == 'raw':
        shutil.copyfile(image_path, raw)
    else:
        subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw', image_path, raw], check=True)
    return raw


def needs_recovery(raw):
    result = subprocess.run(['dumpe2fs', '-h', raw], capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        if line.startswith('Filesystem features:'):
            return 'needs_recovery' in line.split(':', 1)[1].split()
    raise RuntimeError(f"dumpe2fs printed no features for {raw}")


def _check_raw(raw, workdir):
    recovery = needs_recovery(raw)
    fsck = subprocess.run(['e2fsck', '-fn', raw], capture_output=True, text=True, check=False)
    extract = os.path.join(workdir, 'extract')
    shutil.rmtree(extract, ignore_errors=True)
    os.makedirs(extract)
    # debugfs reads the image as it is (no journal replay, no mount): what a naive reader sees.
    subprocess.run(['debugfs', '-R', f'dump /journal {extract}/journal', raw], capture_output=True, check=False)
    subprocess.run(['debugfs', '-R', f'rdump /w {extract}', raw], capture_output=True, check=False)
    journal_path = os.path.join(extract, 'journal')
    data = _read_bytes(journal_path) if os.path.exists(journal_path) else b''
    journal = parse_journal(data)
    bad = []
    for seq, (digest, size) in sorted(journal.entries.items()):
        path = os.path.join(extract, 'w', str(seq))
        if not os.path.exists(path):
            bad.append((seq, 'missing'))
            continue
        content = _read_bytes(path)
        if len(content) != size:
            bad.append((seq, f'size {len(content)} != {size}'))
        elif hashlib.sha256(content).hexdigest() != digest:
            bad.append((seq, 'sha256 differs'))
    shutil.rmtree(extract, ignore_errors=True)
    return Ext4Report(recovery, fsck.returncode, fsck.stdout + fsck.stderr, len(journal.entries), bad,
                      journal.torn_tail, max(journal.entries, default=0))


def inspect_ext4(image_path, workdir, replay=True):
    """Check an ext4 data disk image (qcow2 or raw) from outside, without mounting it.

    Reads needs_recovery (dumpe2fs -h: a copy of a mounted, unfrozen fs has it, and e2fsck -fn
    still exits 0 on it), runs e2fsck -fn, and checks every journal entry's file (exists, size,
    sha256). With replay and needs_recovery, the same checks again on a copy after e2fsck -fy
    (journal replayed) go into ``after_replay``."""
    os.makedirs(workdir, exist_ok=True)
    raw = _raw_copy(image_path, workdir)
    try:
        report = _check_raw(raw, workdir)
        if replay and report.needs_recovery:
            subprocess.run(['e2fsck', '-fy', raw], capture_output=True, check=False)
            report.after_replay = _check_raw(raw, workdir)
        return report
    finally:
        os.unlink(raw)


# ----------------------------------------------------------------------------- CLI

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
    sub = parser.add_subparsers(dest='action', required=True)
    build = sub.add_parser('build', help='build the image (cached); prints its paths')
    build.add_argument('dir', nargs='?', help=f'cache directory [{DEFAULT_CACHE}]')
    boot = sub.add_parser('boot', help='boot the guest in DIR until Ctrl-C')
    boot.add_argument('dir')
    boot.add_argument('--no-workload', action='store_true')
    boot.add_argument('--no-agent', action='store_true')
    boot.add_argument('--ignore-shutdown', action='store_true')
    boot.add_argument('--accel', choices=('tcg', 'kvm'))
    inspect = sub.add_parser('inspect', help='check an ext4 data disk image')
    inspect.add_argument('image')
    args = parser.parse_args(argv)
    if args.action == 'build':
        started = time.monotonic()
        image = build_image(args.dir)
        print(json.dumps({'kernel': image.kernel, 'initrd': image.initrd, 'key': image.key,
                          'seconds': round(time.monotonic() - started, 1)}))
        return 0
    if args.action == 'inspect':
        with tempfile.TemporaryDirectory() as scratch:
            report = inspect_ext4(args.image, scratch)
        print(json.dumps(dataclasses.asdict(report) | {'clean': report.clean}, indent=1, default=str))
        return 0 if report.clean else 1
    guest = LinuxGuest(args.dir, build_image(), agent=not args.no_agent, workload=not args.no_workload,
                       ignore_shutdown=args.ignore_shutdown, accel=args.accel).start()
    try:
        guest.wait_ready()
        print(json.dumps({'accel': guest.accel, 'ready_seconds': round(guest.ready_seconds, 1),
                          'qmp_socket': guest.qmp_socket, 'control_socket': guest.control_socket,
                          'agent_socket': guest.agent_socket, 'console_log': guest.console_log,
                          'data_disk': guest.data_disk, 'pid': guest.pid()}))
        while guest.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        guest.stop()
    return 0


if __name__ == '__main__':
    sys.exit(main())
