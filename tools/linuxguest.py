#!/usr/bin/env python
"""A real small Linux guest for tests of backup consistency (fsfreeze, suspend, stop).

The guest is Debian's own kernel booted straight into a busybox initramfs that also holds
qemu-ga; its only disk (``vd0``) is an ext4 data disk on which a workload keeps writing files
and a journal of their checksums. Everything comes from Debian packages (``apt-get download``
+ ``dpkg -x``, nothing is installed) and is cached under ``.build/linuxguest/<key>/``.

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
import fcntl
import gzip
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

from labguest import ControlMonitor

QEMU = shutil.which('qemu-system-x86_64') or '/usr/bin/qemu-system-x86_64'
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST_FILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'linuxguest')
DEFAULT_CACHE = os.path.join(ROOT, '.build', 'linuxguest')

# What the initramfs needs from Debian; the libraries qemu-ga needs are found from its ELF
# NEEDED entries and the Depends of the packages that hold the binaries.
BASE_PACKAGES = ('busybox-static', 'qemu-guest-agent')
AGENT_BINARY = 'usr/sbin/qemu-ga'
LIB_DIRS = ('lib/x86_64-linux-gnu', 'usr/lib/x86_64-linux-gnu', 'lib64', 'lib', 'usr/lib')
LOADER = 'lib64/ld-linux-x86-64.so.2'
# Modules the guest loads; their own dependencies are added from .modinfo. crc32c_generic is
# only a soft dependency of ext4 (through the crypto API), so it has to be named.
WANTED_MODULES = ('virtio_pci', 'virtio_blk', 'virtio_console', 'crc32c_generic', 'ext4',
                  'button', 'evdev')
# No panic=-1 / -no-reboot: stop mode restarts a powered-off guest with system_reset, which
# -no-reboot would turn into another shutdown.
KERNEL_APPEND = 'console=ttyS0 quiet edd=off rdinit=/init'
READY_MARKER = 'GUESTVAULT-READY'


class BuildError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- ELF reading

def _elf_sections(data):
    """{name: (offset, size, offset of the linked section)} of an ELF64 little-endian file."""
    if data[:4] != b'\x7fELF' or data[4] != 2:
        return {}
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    # (name index, offset, size, link) of each section header
    headers = [struct.unpack_from('<I20xQQI', data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][1]
    sections = {}
    for name_index, offset, size, link in headers:
        start = names_offset + name_index
        name = data[start:data.index(b'\0', start)].decode()
        sections[name] = (offset, size, headers[link][1] if link < shnum else 0)
    return sections


def elf_needed(path):
    """The DT_NEEDED sonames of a shared object or executable ([] for a non-ELF file)."""
    with open(path, 'rb') as handle:
        data = handle.read()
    sections = _elf_sections(data)
    if '.dynamic' not in sections:
        return []
    offset, size, strtab = sections['.dynamic']
    needed = []
    for index in range(0, size, 16):
        tag, value = struct.unpack_from('<qQ', data, offset + index)
        if tag == 0:
            break
        if tag == 1:  # DT_NEEDED
            start = strtab + value
            needed.append(data[start:data.index(b'\0', start)].decode())
    return needed


def module_depends(path):
    """A kernel module's hard dependencies, from its .modinfo (there is no modules.dep)."""
    with open(path, 'rb') as handle:
        data = handle.read()
    sections = _elf_sections(data)
    if '.modinfo' not in sections:
        return []
    offset, size, _link = sections['.modinfo']
    for entry in data[offset:offset + size].split(b'\0'):
        if entry.startswith(b'depends='):
            return [name for name in entry[8:].decode().split(',') if name]
    return []


# ----------------------------------------------------------------------------- Debian packages

def _apt_env():
    return dict(os.environ, DEBIAN_FRONTEND='noninteractive', LC_ALL='C')


def _candidate_versions(packages):
    """{package: candidate version} from apt's lists; packages apt doesn't know are left out."""
    result = subprocess.run(['apt-cache', 'policy', *packages], capture_output=True, text=True,
                            check=False, env=_apt_env())
    versions = {}
    current = None
    for line in result.stdout.splitlines():
        if line and not line.startswith(' ') and line.endswith(':'):
            current = line[:-1]
        elif line.strip().startswith('Candidate:') and current:
            version = line.split(':', 1)[1].strip()
            if version != '(none)':
                versions[current] = version
    return versions


def _apt_depends(packages):
    """{package: [Depends names]} from apt's lists (one apt-cache call: each costs ~0.4 s)."""
    result = subprocess.run(['apt-cache', 'depends', '--important', *packages], capture_output=True,
                            text=True, check=False, env=_apt_env())
    depends, current = {}, None
    for line in result.stdout.splitlines():
        if line and not line.startswith(' '):
            current = depends.setdefault(line.strip(), [])
        elif current is not None:
            match = re.match(r'\s*\|?Depends:\s*([^\s<>]+)', line)
            if match:
                current.append(match.group(1))
    return depends if result.returncode == 0 else {}


def _root_depends():
    """Depends of linux-image-amd64 and qemu-guest-agent; a clean CI machine may have no apt
    lists yet: then they are fetched once (needs root)."""
    wanted = ['linux-image-amd64', 'qemu-guest-agent']
    depends = _apt_depends(wanted)
    if set(wanted) <= set(depends):
        return depends
    if os.geteuid() != 0:
        raise BuildError("apt knows no linux-image-amd64 or qemu-guest-agent and we are not root: run 'apt-get update'")
    subprocess.run(['apt-get', 'update', '-qq'], capture_output=True, check=True, env=_apt_env())
    depends = _apt_depends(wanted)
    if not set(wanted) <= set(depends):
        raise BuildError("apt knows no linux-image-amd64 or qemu-guest-agent even after apt-get update")
    return depends


def kernel_package(depends=None):
    """The versioned kernel package that Debian's linux-image-amd64 depends on."""
    depends = depends or _root_depends()
    for name in depends['linux-image-amd64']:
        if re.match(r'linux-image-[0-9].*-amd64$', name):
            return name
    raise BuildError(f"no linux-image-*-amd64 among the Depends of linux-image-amd64: {depends}")


def _package_depends(deb):
    """Names of a .deb's Depends (first alternative of each, no version constraints)."""
    result = subprocess.run(['dpkg-deb', '-f', deb, 'Depends'], capture_output=True, text=True,
                            check=True)
    names = []
    for item in result.stdout.split(','):
        name = item.split('|')[0].strip().split(' ')[0].split(':')[0]
        if name:
            names.append(name)
    return names


def _download(packages, debdir):
    """apt-get download into debdir: {package: deb path}."""
    before = set(os.listdir(debdir))
    # The sandbox user _apt cannot write into our private temp dir; download as root quietly.
    subprocess.run(['apt-get', 'download', '-q=2', '-o', 'APT::Sandbox::User=root', *packages],
                   cwd=debdir, capture_output=True, check=True, env=_apt_env())
    debs = {}
    for name in sorted(set(os.listdir(debdir)) - before):
        debs[name.split('_', 1)[0]] = os.path.join(debdir, name)
    missing = set(packages) - set(debs)
    if missing:
        raise BuildError(f"apt-get download did not fetch {sorted(missing)}")
    return debs


def _download_some(packages, debdir):
    """Like _download, but a Depends that cannot be downloaded (a virtual package) is skipped."""
    try:
        return _download(packages, debdir)
    except (subprocess.CalledProcessError, BuildError):
        debs = {}
        for package in packages:
            try:
                debs.update(_download([package], debdir))
            except (subprocess.CalledProcessError, BuildError):
                pass
        return debs


# ----------------------------------------------------------------------------- the build

@dataclasses.dataclass
class GuestImage:
    """A built guest: a kernel and an initramfs (gzip'd newc cpio)."""
    directory: str
    kernel: str      # vmlinux (ELF, PVH boot); vmlinuz, Debian's bzImage, is next to it
    initrd: str
    key: str
    manifest: dict

    @classmethod
    def load(cls, directory):
        with open(os.path.join(directory, 'manifest.json')) as handle:
            manifest = json.load(handle)
        return cls(directory, os.path.join(directory, 'vmlinux'),
                   os.path.join(directory, 'initrd.gz'), manifest['key'], manifest)


def _guest_file_digest():
    digest = hashlib.sha256()
    for name in sorted(os.listdir(GUEST_FILES)):
        path = os.path.join(GUEST_FILES, name)
        if os.path.isfile(path):
            with open(path, 'rb') as handle:
                digest.update(name.encode() + b'\0' + handle.read() + b'\0')
    with open(os.path.abspath(__file__), 'rb') as handle:
        digest.update(handle.read())
    return digest.hexdigest()


def cache_key():
    """(key, versions): a hash of the packages' candidate versions, guest files and this builder.
    qemu-ga's direct library packages count too: a libc or glib update changes the image."""
    depends = _root_depends()
    kernel = kernel_package(depends)
    names = [kernel, *BASE_PACKAGES]
    versions = _candidate_versions(sorted(set(names + depends['qemu-guest-agent'])))
    missing = [name for name in names if name not in versions]
    if missing:
        raise BuildError(f"apt has no candidate for {missing}")
    text = json.dumps(versions, sort_keys=True) + _guest_file_digest()
    return hashlib.sha256(text.encode()).hexdigest()[:16], versions


def build_image(cache_dir=None):
    """The guest image, built once per key (package versions, guest files, this builder)."""
    cache_dir = os.path.abspath(cache_dir or os.environ.get('GUESTVAULT_LINUXGUEST_CACHE', DEFAULT_CACHE))
    key, versions = cache_key()
    final = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(final, 'manifest.json')):
        return GuestImage.load(final)
    os.makedirs(cache_dir, exist_ok=True)
    # One builder at a time (parallel test runs): the second one finds the first one's result.
    with open(os.path.join(cache_dir, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, 'manifest.json')):
            return GuestImage.load(final)
        scratch = tempfile.mkdtemp(prefix=f'.build-{key}-', dir=cache_dir)
        try:
            _build_into(scratch, key, versions)
            os.chmod(scratch, 0o755)
            os.rename(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        _prune_old_builds(cache_dir, keep=key)
    return GuestImage.load(final)


def _prune_old_builds(cache_dir, keep):
    """Builds of older keys are ~80 MB each and never used again."""
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name != keep and re.fullmatch(r'[0-9a-f]{16}', name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _build_into(outdir, key, versions):
    started = time.monotonic()
    work = os.path.join(outdir, 'work')
    debdir = os.path.join(work, 'debs')
    os.makedirs(debdir)
    kernel = next(name for name in versions if name.startswith('linux-image-'))
    debs = _download([kernel, *BASE_PACKAGES], debdir)
    trees = {name: _extract(deb, work) for name, deb in debs.items()}
    files = {}   # path in the initramfs -> (host path or bytes, mode)
    kernel_tree = trees[kernel]
    release, vmlinuz = _kernel_release(kernel_tree)
    shutil.copyfile(vmlinuz, os.path.join(outdir, 'vmlinuz'))
    _write_vmlinux(vmlinuz, os.path.join(outdir, 'vmlinux'))
    modules = _module_order(kernel_tree, release)
    for relpath in modules:
        files[f'lib/modules/{os.path.basename(relpath)}'] = (os.path.join(kernel_tree, relpath), 0o644)
    files['etc/guestvault/modules'] = (''.join(os.path.basename(p) + '\n' for p in modules).encode(), 0o644)
    libraries, host_copies = _resolve_libraries(trees, debs, debdir, work)
    files[AGENT_BINARY] = (os.path.join(trees['qemu-guest-agent'], AGENT_BINARY), 0o755)
    for guest_path, host_path in libraries.items():
        files[guest_path] = (host_path, 0o755)
    busybox = os.path.join(trees['busybox-static'], 'bin', 'busybox')
    files['bin/busybox'] = (busybox, 0o755)
    _add_guest_files(files)
    symlinks = _busybox_links(busybox, files)
    with gzip.open(os.path.join(outdir, 'initrd.gz'), 'wb', compresslevel=6) as out:
        write_newc(out, files, symlinks)
    manifest = {'key': key, 'versions': versions, 'kernel_release': release, 'modules': modules,
                'libraries': sorted(libraries), 'host_library_copies': host_copies,
                'packages': sorted(os.path.basename(deb) for deb in os.listdir(debdir)),
                'build_seconds': round(time.monotonic() - started, 1)}
    shutil.rmtree(work)
    with open(os.path.join(outdir, 'manifest.json'), 'w') as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)


def _write_vmlinux(vmlinuz, target):
    """The uncompressed ELF kernel out of the bzImage. QEMU boots it through its PVH entry
    (CONFIG_PVH): no real-mode set-up and no decompression, ~2 s less under TCG."""
    import lzma
    data = _read(vmlinuz)
    start = data.find(b'\xfd7zXZ\x00')
    if start < 0:
        raise BuildError("the kernel image is not xz-compressed (CONFIG_KERNEL_XZ); cannot unpack vmlinux")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if elf[:4] != b'\x7fELF':
        raise BuildError("the xz payload of the kernel image is not an ELF file")
    with open(target, 'wb') as handle:
        handle.write(elf)


def _extract(deb, work):
    target = os.path.join(work, 'tree', os.path.basename(deb).split('_', 1)[0])
    os.makedirs(target, exist_ok=True)
    subprocess.run(['dpkg-deb', '-x', deb, target], check=True)
    return target


def _kernel_release(tree):
    releases = os.listdir(os.path.join(tree, 'lib', 'modules'))
    if len(releases) != 1:
        raise BuildError(f"expected one kernel release in the package, found {releases}")
    return releases[0], os.path.join(tree, 'boot', f'vmlinuz-{releases[0]}')


def _module_order(tree, release):
    """Paths (relative to the tree) of the wanted modules and their dependencies, dependencies
    first, for insmod in that order. Built-in options need no module: none of these is
    built into Debian's 6.1 kernel, but the order is computed rather than assumed."""
    base = os.path.join('lib', 'modules', release)
    index = {}
    for directory, _dirs, names in os.walk(os.path.join(tree, base)):
        for name in names:
            if name.endswith('.ko'):
                index[name[:-3].replace('-', '_')] = os.path.relpath(os.path.join(directory, name), tree)
    builtin = _builtin_modules(tree, release)
    order = []

    def visit(name, chain):
        name = name.replace('-', '_')
        if name in chain:
            raise BuildError(f"module dependency loop: {chain + [name]}")
        if index.get(name) in order or (name not in index and name in builtin):
            return
        if name not in index:
            raise BuildError(f"kernel module {name} is neither a module nor built in")
        for dependency in module_depends(os.path.join(tree, index[name])):
            visit(dependency, chain + [name])
        order.append(index[name])

    for wanted in WANTED_MODULES:
        visit(wanted, [])
    return order


def _builtin_modules(tree, release):
    path = os.path.join(tree, 'lib', 'modules', release, 'modules.builtin')
    if not os.path.exists(path):
        return set()
    with open(path) as handle:
        return {os.path.basename(line.strip())[:-3].replace('-', '_') for line in handle if line.strip()}


def _soname_index(trees):
    """{soname: host path} over the unpacked packages' library directories."""
    index = {}
    for tree in trees.values():
        for libdir in LIB_DIRS:
            directory = os.path.join(tree, libdir)
            if not os.path.isdir(directory):
                continue
            for name in os.listdir(directory):
                path = os.path.join(directory, name)
                if '.so' in name and os.path.isfile(path):
                    index.setdefault(name, (path, libdir))
    return index


def _owner(path, trees):
    for name, tree in trees.items():
        if path.startswith(tree + os.sep):
            return name
    return None


def _needed_closure(binary, index):
    """({soname: (path, libdir)} found, {soname: binary that needs it} missing) for a binary
    and, transitively, the libraries it loads."""
    wanted, missing = {}, {}
    pending, seen = [binary], set()
    while pending:
        current = pending.pop()
        for soname in elf_needed(current):
            if soname in seen:
                continue
            seen.add(soname)
            if soname in index:
                wanted[soname] = index[soname]
                pending.append(index[soname][0])
            else:
                missing[soname] = current
    return wanted, missing


def _resolve_libraries(trees, debs, debdir, work):
    """{guest path: host file} of qemu-ga's shared libraries (and the dynamic loader).

    A missing soname is looked for in the Depends of the package that holds the binary that
    needs it; only if no package has it, the host's own copy is taken (and recorded)."""
    agent = os.path.join(trees['qemu-guest-agent'], AGENT_BINARY)
    host_copies = []
    tried = set()
    while True:
        wanted, missing = _needed_closure(agent, _soname_index(trees))
        if not missing:
            break
        candidates = set()
        for binary in missing.values():
            owner = _owner(binary, trees)
            if owner in debs:
                candidates.update(name for name in _package_depends(debs[owner]) if name not in debs and name not in tried)
        tried.update(candidates)
        new = _download_some(sorted(candidates), debdir) if candidates else {}
        if new:
            debs.update(new)
            trees.update({name: _extract(deb, work) for name, deb in new.items()})
            continue
        for soname in missing:
            host = _host_library(soname)
            trees.setdefault('host', os.path.join(work, 'host'))
            target = os.path.join(trees['host'], 'lib', 'x86_64-linux-gnu')
            os.makedirs(target, exist_ok=True)
            shutil.copyfile(host, os.path.join(target, soname))
            host_copies.append(host)
    libraries = {os.path.join(libdir, soname): path for soname, (path, libdir) in wanted.items()}
    loader = os.path.join(trees['libc6'], LOADER) if 'libc6' in trees else None
    if not loader or not os.path.exists(loader):
        raise BuildError("no dynamic loader (libc6) among the fetched packages")
    libraries[LOADER] = os.path.realpath(loader)
    return libraries, host_copies


def _host_library(soname):
    for libdir in ('/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64', '/usr/lib64'):
        path = os.path.join(libdir, soname)
        if os.path.exists(path):
            return os.path.realpath(path)
    raise BuildError(f"no package and no host file provides {soname}")


def _add_guest_files(files):
    def guest_file(name):
        return os.path.join(GUEST_FILES, name)
    files['etc/inittab'] = (guest_file('inittab'), 0o644)
    files['etc/guestvault/rc'] = (guest_file('rc'), 0o755)
    files['etc/guestvault/stop'] = (guest_file('stop'), 0o755)
    files['etc/guestvault/workload'] = (guest_file('workload'), 0o755)
    files['etc/guestvault/fsfreeze-hook'] = (guest_file('fsfreeze-hook'), 0o755)
    files['sbin/shutdown'] = (guest_file('shutdown'), 0o755)
    # busybox acpid's default action for the power button (PWRF) is this path.
    files['etc/acpi/PWRF/00000080'] = (guest_file('power-button'), 0o755)


def _busybox_links(busybox, files):
    """{link: target} for each busybox applet (not where a guest file takes the name)."""
    result = subprocess.run([busybox, '--list-full'], capture_output=True, text=True, check=True)
    links = {'init': 'bin/busybox'}
    for applet in result.stdout.split():
        if applet not in files and applet != 'bin/busybox':
            links[applet] = 'bin/busybox'
    return links


# ----------------------------------------------------------------------------- newc cpio

def write_newc(out, files, symlinks):
    """A newc cpio archive (what the kernel unpacks as initramfs), made without a cpio tool.

    ``files``: {path: (host path | bytes, mode)}; ``symlinks``: {path: target path}, made
    relative. Directories are implied; /dev/console is a device node so that init has a
    console before devtmpfs is mounted. Owner root, mtime 0: the same input, the same bytes."""
    entries = {}
    for path, (source, mode) in files.items():
        entries[path] = ('file', source, mode)
    for path, target in symlinks.items():
        relative = os.path.relpath(target, os.path.dirname(path) or '.')
        entries.setdefault(path, ('link', relative, 0o777))
    entries['dev/console'] = ('char', (5, 1), 0o600)
    directories = {'proc', 'sys', 'dev', 'run', 'tmp', 'data', 'root'}
    for path in entries:
        parent = os.path.dirname(path)
        while parent:
            directories.add(parent)
            parent = os.path.dirname(parent)
    inode = 1
    for path in sorted(directories):
        _newc_entry(out, inode, path, stat.S_IFDIR | 0o755, b'')
        inode += 1
    for path in sorted(entries):
        kind, source, mode = entries[path]
        if kind == 'file':
            data = source if isinstance(source, bytes) else _read(source)
            _newc_entry(out, inode, path, stat.S_IFREG | mode, data)
        elif kind == 'link':
            _newc_entry(out, inode, path, stat.S_IFLNK | mode, source.encode())
        else:
            _newc_entry(out, inode, path, stat.S_IFCHR | mode, b'', rdev=source)
        inode += 1
    _newc_entry(out, 0, 'TRAILER!!!', 0, b'')


def _read(path):
    with open(path, 'rb') as handle:
        return handle.read()


def _newc_entry(out, inode, name, mode, data, rdev=(0, 0)):
    encoded = name.encode() + b'\0'
    fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b'070701' + b''.join(b'%08X' % value for value in fields)
    out.write(header + encoded + b'\0' * (-(len(header) + len(encoded)) % 4))
    out.write(data + b'\0' * (-len(data) % 4))


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
        deadline = self.started_at + 20
        while not all(os.path.exists(p) for p in (self.qmp_socket, self.control_socket, self.agent_socket)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {self._tail(self.qemu_log)}")
            if time.monotonic() > deadline:
                raise RuntimeError("QEMU did not create its sockets within 20 s")
            time.sleep(0.05)
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
    data = _read(journal_path) if os.path.exists(journal_path) else b''
    journal = parse_journal(data)
    bad = []
    for seq, (digest, size) in sorted(journal.entries.items()):
        path = os.path.join(extract, 'w', str(seq))
        if not os.path.exists(path):
            bad.append((seq, 'missing'))
            continue
        content = _read(path)
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
