"""The file-restore appliance: a throw-away VM that reads a backup's disks, so that an untrusted
guest filesystem is never mounted on the host (as Proxmox Backup Server's file restore does it).

The appliance is Debian's kernel with a busybox initramfs holding LVM's ``lvm`` and
util-linux's ``blkid`` (images/debian_image.py builds it once per package versions, into
``GUESTVAULT_APPLIANCE_CACHE`` or /var/cache/guestvault/appliance). Each request is one boot:

- every backup disk is attached behind a new qcow2 overlay in the work directory, whose backing
  is the backup (a qcow2 chain's image, or an export of the datastore's NBD server). QEMU opens
  the backing read-only; a journal replay at mount time lands in the overlay, which is removed;
- the request goes in over fw_cfg, the status comes back on a small raw disk and the payload (a
  listing, or a tar stream of the extracted files) on a sparse raw disk of the size the caller
  allows, with ``werror=report`` so that a full host disk fails the write instead of pausing;
- the appliance powers off when done (restore/appliance_init.py says what it does).

KVM is used where a probe boot shows that it works (a paravirtual KVM may hang a real kernel:
the verdict is kept next to the image); else TCG. ``GUESTVAULT_APPLIANCE_ACCEL`` forces one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import time

from ..errors import GuestvaultError
from ..format import qemu_img
from ..paths import appliance_cache
from ..images import debian_image
from .appliance_init import INIT

# qemu_fw_cfg carries the request; dm_mod is LVM's; the nls modules are vfat's code pages
# (Debian's kernel mounts vfat with iocharset ascii unless told otherwise).
MODULES = ('virtio_pci', 'virtio_blk', 'qemu_fw_cfg', 'crc32c_generic', 'ext4', 'xfs',
           'dm_mod', 'vfat', 'nls_cp437', 'nls_ascii', 'nls_utf8', 'nls_iso8859_1')
MEMORY_MIB = 512
STATUS_BYTES = 4 << 20
UP_MARKER = 'GUESTVAULT-APPLIANCE-UP'
KVM_FIRST_WORDS_SECONDS = 5.0
KVM_PROBE_SECONDS = 30.0
KERNEL_APPEND = 'console=ttyS0 quiet panic=-1 rdinit=/init'


class ApplianceError(GuestvaultError):
    """The appliance did not start, did not finish, or did not say what it did."""


def spec():
    return debian_image.ImageSpec(
        name='file-restore appliance', packages=('busybox-static',),
        binaries=(('lvm2', 'sbin/lvm'), ('util-linux', 'sbin/blkid')),
        modules=MODULES, files={'init': (INIT.encode(), 0o755)})


def image(log=None):
    """The appliance image, built on first use (about 10 s, and a Debian mirror)."""
    return debian_image.build(spec(), appliance_cache(), log)


@dataclasses.dataclass
class Source:
    """A backup disk as the appliance sees it: read through ``backing`` (of ``backing_format``)."""
    disk_id: str
    backing: str
    backing_format: str
    size: int


@dataclasses.dataclass
class Outcome:
    """What the appliance said (see appliance_init for the status lines)."""
    filesystems: list
    chosen: dict | None
    warnings: list
    result: list
    error: tuple | None
    seconds: float
    accel: str


def qemu_system():
    return shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'


class Appliance:
    """One boot of the appliance over ``sources``; ``payload`` is the output disk's file."""

    def __init__(self, built, workdir, sources, payload, payload_bytes, timeout=1800.0,
                 log=None):
        self.image = built
        self.workdir = workdir
        self.sources = sources
        self.payload = payload
        self.payload_bytes = int(payload_bytes)
        self.timeout = float(timeout)
        self.log = log or (lambda message: None)
        self.console = os.path.join(workdir, 'appliance-console.log')
        self.status = os.path.join(workdir, 'appliance-status.raw')
        self.request = os.path.join(workdir, 'appliance-request')

    def run(self, op, paths=(), filesystem=None, max_bytes=0):
        lines = [f"op {op}", f"filesystem {filesystem or ''}", f"disks {len(self.sources)}",
                 f"max_bytes {int(max_bytes)}"] + [f"path {path}" for path in paths]
        for line in lines:
            if '\n' in line or '\0' in line:
                raise ApplianceError(f"a path or name holds a newline or NUL ({line!r}); "
                                     "the appliance cannot be asked for it")
        with open(self.request, 'w', encoding='utf-8') as handle:
            handle.write('\n'.join(lines) + '\n')
        for index, source in enumerate(self.sources):
            qemu_img.create_qcow2(self._overlay(index), source.size, backing=source.backing,
                                  backing_format=source.backing_format)
        for path, size in ((self.status, STATUS_BYTES), (self.payload, self.payload_bytes)):
            with open(path, 'wb') as handle:
                handle.truncate(size)
        started = time.monotonic()
        accel = self._boot()
        return self._outcome(time.monotonic() - started, accel)

    def _overlay(self, index):
        return os.path.join(self.workdir, f'appliance-overlay{index}.qcow2')

    def command(self, accel, append=KERNEL_APPEND):
        args = [qemu_system(), '-nodefaults', '-display', 'none', '-no-user-config',
                '-machine', f'q35,accel={accel}', '-m', str(MEMORY_MIB), '-no-reboot',
                # TCG's max CPU has RDRAND, so the kernel's random pool is ready at once (blkid
                # and lvm otherwise wait ~1 s for it); under KVM the default model is kept
                *(['-cpu', 'max'] if accel == 'tcg' else []),
                '-kernel', self.image.kernel, '-initrd', self.image.initrd,
                '-append', append,
                '-chardev', f'file,id=console0,path={self.console}', '-serial', 'chardev:console0',
                '-fw_cfg', f'name=opt/guestvault/request,file={self.request}']
        for index, source in enumerate(self.sources):
            args += ['-blockdev', f'driver=qcow2,node-name=src{index},file.driver=file,'
                                  f'file.filename={_escape(self._overlay(index))}',
                     '-device', f'virtio-blk-pci,drive=src{index},serial=gvdisk-{source.disk_id}']
        for name, path in (('gvout', self.payload), ('gvstatus', self.status)):
            args += ['-blockdev', f'driver=raw,node-name={name},file.driver=file,'
                                  f'file.filename={_escape(path)}',
                     '-device', f'virtio-blk-pci,drive={name},serial={name},werror=report']
        return args

    def _boot(self):
        """Run the appliance to its end; the accelerator it ran on."""
        verdict = _kvm_verdict(self.image)
        accel = 'kvm' if verdict else 'tcg'
        if verdict is None:        # not probed yet on this host: this boot is the probe
            # kernel messages on: a kernel that hangs in early boot prints nothing at all, so
            # silence after a few seconds is a verdict without waiting for the whole timeout
            proc = self._start('kvm', KERNEL_APPEND.replace('quiet', 'loglevel=7'))
            if self._wait_for(proc, 'Linux version', KVM_FIRST_WORDS_SECONDS) \
                    and self._wait_for(proc, UP_MARKER, KVM_PROBE_SECONDS):
                _keep_kvm_verdict(self.image, True)
                self._wait(proc, 'kvm')
                return 'kvm'
            _stop(proc)
            _keep_kvm_verdict(self.image, False)
            self.log("KVM does not boot the appliance on this host; using TCG (slower)")
            accel = 'tcg'
        proc = self._start(accel)
        self._wait(proc, accel)
        return accel

    def _start(self, accel, append=KERNEL_APPEND):
        if os.path.exists(self.console):
            os.unlink(self.console)
        log = open(os.path.join(self.workdir, 'appliance-qemu.log'), 'ab')
        with log:
            return subprocess.Popen(self.command(accel, append), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, start_new_session=True)

    def _wait_for(self, proc, marker, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if marker in self._console_tail(1 << 20):
                return True
            if proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def _wait(self, proc, accel):
        try:
            proc.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise ApplianceError(
                f"the file-restore appliance ({accel}) did not finish within {self.timeout:.0f} s; "
                f"raise timeout for large extractions. Its console ended with: "
                f"{self._console_tail()!r}") from None
        if proc.returncode != 0:
            with open(os.path.join(self.workdir, 'appliance-qemu.log'), 'rb') as handle:
                tail = handle.read()[-1500:].decode('utf-8', 'replace').strip()
            raise ApplianceError(f"QEMU running the file-restore appliance failed "
                                 f"(exit {proc.returncode}): {tail}")

    def _console_tail(self, size=1500):
        try:
            with open(self.console, 'rb') as handle:
                handle.seek(max(0, os.path.getsize(self.console) - size))
                return handle.read().decode('utf-8', 'replace').strip()
        except OSError:
            return ''

    def _outcome(self, seconds, accel):
        with open(self.status, 'rb') as handle:
            text = handle.read(STATUS_BYTES).split(b'\0', 1)[0].decode('utf-8', 'replace')
        lines = text.split('\n')
        if 'end' not in lines:
            raise ApplianceError("the file-restore appliance stopped before it said what it did; "
                                 f"its console ended with: {self._console_tail()!r}")
        outcome = Outcome([], None, [], [], None, round(seconds, 2), accel)
        for line in lines:
            word, _sep, rest = line.partition(' ')
            if word == 'fs':
                name, kind, size, uuid, label = (rest.split(' ', 4) + [''] * 5)[:5]
                outcome.filesystems.append({
                    'name': name, 'type': None if kind == '-' else kind,
                    'size': int(size) if size.isdigit() else 0,
                    'uuid': None if uuid in ('-', '') else uuid, 'label': label or None})
            elif word == 'chosen':
                name, _sep, kind = rest.partition(' ')
                outcome.chosen = {'name': name, 'type': kind}
            elif word == 'warning':
                outcome.warnings.append(rest)
            elif word == 'result':
                outcome.result = rest.split()
            elif word == 'error':
                kind, _sep, message = rest.partition(' ')
                outcome.error = (kind, message)
        return outcome


def _escape(path):
    """A path inside a -blockdev option string: commas are doubled."""
    return path.replace(',', ',,')


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def _verdict_path(built):
    qemu = qemu_system()
    host = os.uname().release + ':' + str(os.stat(qemu).st_mtime_ns if os.path.exists(qemu) else 0)
    return os.path.join(built.directory, f'kvm-{hashlib.sha256(host.encode()).hexdigest()[:12]}.json')


def _kvm_verdict(built):
    """True/False once probed on this host (kernel + QEMU), None before; forced by the env."""
    forced = os.environ.get('GUESTVAULT_APPLIANCE_ACCEL', '').strip().lower()
    if forced in ('kvm', 'tcg'):
        return forced == 'kvm'
    try:
        os.close(os.open('/dev/kvm', os.O_RDWR))
    except OSError:
        return False
    try:
        with open(_verdict_path(built), encoding='utf-8') as handle:
            return bool(json.load(handle)['kvm'])
    except (OSError, ValueError, KeyError):
        return None


def _keep_kvm_verdict(built, verdict):
    path = _verdict_path(built)
    try:
        with open(path + '.tmp', 'w', encoding='utf-8') as handle:
            json.dump({'kvm': verdict, 'host': os.uname().release}, handle)
        os.replace(path + '.tmp', path)
    except OSError:
        pass        # a read-only cache: probe again next time
