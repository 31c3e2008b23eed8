"""Small Linux images (a kernel and an initramfs) built from Debian's own packages.

``apt-get download`` + ``dpkg -x``, nothing is installed: Debian's kernel, busybox-static, the
binaries an image names together with the libraries they need (found from their ELF NEEDED
entries and the Depends of the packages that hold them), the kernel modules it loads (in the
order their ``.modinfo`` dependencies give: the package has no modules.dep), and its own files,
written as a gzip'd newc cpio by Python (the host has no cpio). Each image is cached under
``<cache>/<key>/``; the key hashes the packages' versions, the image's own files and this
builder, so any change rebuilds. The file-restore appliance (restore/appliance.py) and the test
suite's Linux guest are both built here.

QEMU boots the uncompressed kernel (``vmlinux``) through its PVH entry: no real-mode set-up and
no decompression, about 2 s less under TCG.
"""
from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time

from ..errors import GuestvaultError

LIB_DIRS = ('lib/x86_64-linux-gnu', 'usr/lib/x86_64-linux-gnu', 'lib64', 'lib', 'usr/lib')
LOADER = 'lib64/ld-linux-x86-64.so.2'
KERNEL_META = 'linux-image-amd64'


class ImageBuildError(GuestvaultError):
    """An image could not be built from Debian's packages; the message says what was missing."""


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """What goes into an image.

    ``binaries``: (package, path in it) of dynamically linked programs, installed at that path
    with their libraries. ``files``: {path in the image: (bytes or a host path, mode)}.
    ``modules``: kernel modules; their hard dependencies are added. ``links``: {path: target}
    besides busybox's applets (which never shadow ``files``)."""
    name: str
    packages: tuple = ('busybox-static',)
    binaries: tuple = ()
    modules: tuple = ()
    files: dict = dataclasses.field(default_factory=dict)
    links: dict = dataclasses.field(default_factory=dict)

    def digest(self):
        """A hash of everything in the spec that is not a package version."""
        digest = hashlib.sha256(repr((self.name, self.packages, self.binaries, self.modules,
                                      sorted(self.links.items()))).encode())
        for path, (source, mode) in sorted(self.files.items()):
            data = source if isinstance(source, bytes) else _read(source)
            digest.update(f"{path}\0{mode}\0".encode() + data + b'\0')
        return digest.hexdigest()


@dataclasses.dataclass
class BuiltImage:
    """A built image: ``kernel`` (vmlinux, ELF for PVH boot) and ``initrd`` (gzip'd newc)."""
    directory: str
    kernel: str
    initrd: str
    key: str
    manifest: dict

    @classmethod
    def load(cls, directory):
        with open(os.path.join(directory, 'manifest.json'), encoding='utf-8') as handle:
            manifest = json.load(handle)
        return cls(directory, os.path.join(directory, 'vmlinux'),
                   os.path.join(directory, 'initrd.gz'), manifest['key'], manifest)


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
    data = _read(path)
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
    data = _read(path)
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


def candidate_versions(packages):
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
    result = subprocess.run(['apt-cache', 'depends', '--important', *packages],
                            capture_output=True, text=True, check=False, env=_apt_env())
    depends, current = {}, None
    for line in result.stdout.splitlines():
        if line and not line.startswith(' '):
            current = depends.setdefault(line.strip(), [])
        elif current is not None:
            match = re.match(r'\s*\|?(?:Pre)?Depends:\s*([^\s<>]+)', line)
            if match:
                current.append(match.group(1))
    return depends if result.returncode == 0 else {}


def apt_depends(packages):
    """Depends of ``packages``; a clean machine may have no apt lists yet: then they are
    fetched once (needs root)."""
    wanted = list(packages)
    depends = _apt_depends(wanted)
    if set(wanted) <= set(depends):
        return depends
    if os.geteuid() != 0:
        raise ImageBuildError(f"apt knows no {', '.join(sorted(set(wanted) - set(depends)))} "
                              "and this is not root: run 'apt-get update'")
    subprocess.run(['apt-get', 'update', '-qq'], capture_output=True, check=True, env=_apt_env())
    depends = _apt_depends(wanted)
    if not set(wanted) <= set(depends):
        raise ImageBuildError(f"apt knows no {', '.join(sorted(set(wanted) - set(depends)))} "
                              "even after apt-get update; is a Debian mirror configured?")
    return depends


def kernel_package(depends):
    """The versioned kernel package that Debian's linux-image-amd64 depends on."""
    for name in depends[KERNEL_META]:
        if re.match(r'linux-image-[0-9].*-amd64$', name):
            return name
    raise ImageBuildError(f"no linux-image-*-amd64 among the Depends of {KERNEL_META}")


def _package_depends(deb):
    """Names of a .deb's Pre-Depends and Depends (first alternative of each, no versions)."""
    result = subprocess.run(['dpkg-deb', '-f', deb, 'Pre-Depends', 'Depends'],
                            capture_output=True, text=True, check=True)
    # with two fields asked for, each line starts with its field's name
    text = re.sub(r'^(?:Pre-)?Depends:', ',', result.stdout, flags=re.M)
    names = []
    for item in text.split(','):
        name = item.split('|')[0].strip().split(' ')[0].split(':')[0]
        if name:
            names.append(name)
    return names


def _download(packages, debdir):
    """apt-get download into debdir: {package: deb path}."""
    before = set(os.listdir(debdir))
    # The sandbox user _apt cannot write into our private temp dir; download as root quietly.
    result = subprocess.run(['apt-get', 'download', '-q=2', '-o', 'APT::Sandbox::User=root',
                             *packages], cwd=debdir, capture_output=True, text=True,
                            check=False, env=_apt_env())
    if result.returncode != 0:
        raise ImageBuildError(f"apt-get download {' '.join(packages)} failed: "
                              f"{result.stderr.strip()[-500:]}; is a Debian mirror reachable?")
    debs = {}
    for name in sorted(set(os.listdir(debdir)) - before):
        debs[name.split('_', 1)[0]] = os.path.join(debdir, name)
    missing = set(packages) - set(debs)
    if missing:
        raise ImageBuildError(f"apt-get download did not fetch {sorted(missing)}")
    return debs


def _download_some(packages, debdir):
    """Like _download, but a Depends that cannot be downloaded (a virtual package) is skipped."""
    try:
        return _download(packages, debdir)
    except ImageBuildError:
        debs = {}
        for package in packages:
            try:
                debs.update(_download([package], debdir))
            except ImageBuildError:
                pass
        return debs


def _extract(deb, work):
    target = os.path.join(work, 'tree', os.path.basename(deb).split('_', 1)[0])
    os.makedirs(target, exist_ok=True)
    subprocess.run(['dpkg-deb', '-x', deb, target], check=True)
    return target


# ----------------------------------------------------------------------------- the build

def cache_key(spec):
    """(key, versions): a hash of the packages' candidate versions, the spec and this builder.
    The direct library packages of each binary's package count too: a libc update changes the
    image."""
    binary_packages = sorted({package for package, _path in spec.binaries})
    depends = apt_depends([KERNEL_META, *binary_packages])
    kernel = kernel_package(depends)
    names = [kernel, *spec.packages, *binary_packages]
    library_packages = [name for package in binary_packages for name in depends[package]]
    versions = candidate_versions(sorted(set(names + library_packages)))
    missing = [name for name in names if name not in versions]
    if missing:
        raise ImageBuildError(f"apt has no candidate for {missing}")
    text = json.dumps(versions, sort_keys=True) + spec.digest() + _builder_source()
    return hashlib.sha256(text.encode()).hexdigest()[:16], versions


def _builder_source():
    """This file's text; under Ansible the engine runs from a zip, so ask the loader."""
    return __loader__.get_source(__name__) or ''


def build(spec, cache_dir, log=None):
    """The image, built once per key into ``cache_dir``; parallel builders wait for the first."""
    log = log or (lambda message: None)
    cache_dir = os.path.abspath(cache_dir)
    known = _known_key(spec, cache_dir)
    if known:
        return BuiltImage.load(os.path.join(cache_dir, known))
    key, versions = cache_key(spec)
    final = os.path.join(cache_dir, key)
    if os.path.exists(os.path.join(final, 'manifest.json')):
        _remember_key(spec, cache_dir, key)
        return BuiltImage.load(final)
    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, '.lock'), 'w', encoding='utf-8') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, 'manifest.json')):
            return BuiltImage.load(final)
        log(f"building the {spec.name} image from Debian packages into {final}")
        scratch = tempfile.mkdtemp(prefix=f'.build-{key}-', dir=cache_dir)
        try:
            _build_into(spec, scratch, key, versions)
            os.chmod(scratch, 0o755)
            os.rename(scratch, final)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        _prune_old_builds(cache_dir, keep=key)
    _remember_key(spec, cache_dir, key)
    return BuiltImage.load(final)


# apt's lists (apt-get update renames its files into them) and dpkg's status (an installed
# package can be apt's candidate)
APT_STATE = ('/var/lib/apt/lists', '/var/lib/dpkg/status')


def _stamp(spec):
    """What the key depends on besides the versions apt offers, plus when apt's state last
    changed."""
    try:
        lists = [os.stat(path).st_mtime_ns for path in APT_STATE]
    except OSError:
        lists = None
    return {'spec': spec.digest(), 'builder': hashlib.sha256(_builder_source().encode())
            .hexdigest(), 'apt_lists': lists}


def _pointer(spec, cache_dir):
    return os.path.join(cache_dir, f"current-{hashlib.sha256(spec.name.encode()).hexdigest()[:12]}.json")


def _known_key(spec, cache_dir):
    """The key of the last build, if nothing it depends on changed: asking apt for the
    versions costs ~1 s, which every file restore would pay."""
    try:
        with open(_pointer(spec, cache_dir), encoding='utf-8') as handle:
            pointer = json.load(handle)
    except (OSError, ValueError):
        return None
    key = pointer.get('key', '')
    if pointer.get('stamp') != _stamp(spec) or pointer.get('stamp', {}).get('apt_lists') is None \
            or not os.path.exists(os.path.join(cache_dir, key, 'manifest.json')):
        return None
    return key


def _remember_key(spec, cache_dir, key):
    path = _pointer(spec, cache_dir)
    try:
        with open(path + '.tmp', 'w', encoding='utf-8') as handle:
            json.dump({'key': key, 'stamp': _stamp(spec)}, handle)
        os.replace(path + '.tmp', path)
    except OSError:
        pass        # a read-only cache: ask apt each time


def _prune_old_builds(cache_dir, keep):
    """Builds of older keys are tens of MB each and never used again."""
    for name in os.listdir(cache_dir):
        path = os.path.join(cache_dir, name)
        if name != keep and re.fullmatch(r'[0-9a-f]{16}', name) and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)


def _build_into(spec, outdir, key, versions):
    started = time.monotonic()
    work = os.path.join(outdir, 'work')
    debdir = os.path.join(work, 'debs')
    os.makedirs(debdir)
    kernel = next(name for name in versions if name.startswith('linux-image-'))
    binary_packages = sorted({package for package, _path in spec.binaries})
    debs = _download(sorted({kernel, *spec.packages, *binary_packages}), debdir)
    trees = {name: _extract(deb, work) for name, deb in debs.items()}
    files = {}   # path in the initramfs -> (host path or bytes, mode)
    release, vmlinuz = _kernel_release(trees[kernel])
    shutil.copyfile(vmlinuz, os.path.join(outdir, 'vmlinuz'))
    _write_vmlinux(vmlinuz, os.path.join(outdir, 'vmlinux'))
    modules = module_order(trees[kernel], release, spec.modules)
    for relpath in modules:
        source = os.path.join(trees[kernel], relpath)
        files[f'lib/modules/{os.path.basename(relpath)}'] = (source, 0o644)
    order = ''.join(os.path.basename(p) + '\n' for p in modules)
    files['etc/guestvault/modules'] = (order.encode(), 0o644)
    binaries = []
    for package, path in spec.binaries:
        binaries.append(os.path.join(trees[package], path))
        files[path] = (binaries[-1], 0o755)
    libraries, host_copies = _resolve_libraries(binaries, trees, debs, debdir, work)
    for guest_path, host_path in libraries.items():
        files[guest_path] = (host_path, 0o755)
    busybox = os.path.join(trees['busybox-static'], 'bin', 'busybox')
    files['bin/busybox'] = (busybox, 0o755)
    files.update(spec.files)
    symlinks = busybox_links(busybox, files)
    symlinks.update(spec.links)
    with gzip.open(os.path.join(outdir, 'initrd.gz'), 'wb', compresslevel=6) as out:
        write_newc(out, files, symlinks)
    manifest = {'key': key, 'name': spec.name, 'versions': versions, 'kernel_release': release,
                'modules': modules, 'libraries': sorted(libraries),
                'host_library_copies': host_copies,
                'packages': sorted(os.path.basename(deb) for deb in os.listdir(debdir)),
                'build_seconds': round(time.monotonic() - started, 1)}
    shutil.rmtree(work)
    with open(os.path.join(outdir, 'manifest.json'), 'w', encoding='utf-8') as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)


def _write_vmlinux(vmlinuz, target):
    """The uncompressed ELF kernel out of the bzImage (Debian's is xz-compressed)."""
    data = _read(vmlinuz)
    start = data.find(b'\xfd7zXZ\x00')
    if start < 0:
        raise ImageBuildError("the kernel image is not xz-compressed (CONFIG_KERNEL_XZ); "
                              "cannot unpack vmlinux")
    elf = lzma.LZMADecompressor().decompress(data[start:])
    if elf[:4] != b'\x7fELF':
        raise ImageBuildError("the xz payload of the kernel image is not an ELF file")
    with open(target, 'wb') as handle:
        handle.write(elf)


def _kernel_release(tree):
    releases = os.listdir(os.path.join(tree, 'lib', 'modules'))
    if len(releases) != 1:
        raise ImageBuildError(f"expected one kernel release in the package, found {releases}")
    return releases[0], os.path.join(tree, 'boot', f'vmlinuz-{releases[0]}')


def module_order(tree, release, wanted):
    """Paths (relative to the tree) of the wanted modules and their dependencies, dependencies
    first, for insmod in that order. A built-in one needs no module: the order is computed
    from the package rather than assumed."""
    base = os.path.join('lib', 'modules', release)
    index = {}
    for directory, _dirs, names in os.walk(os.path.join(tree, base)):
        for name in names:
            if name.endswith('.ko'):
                index[name[:-3].replace('-', '_')] = os.path.relpath(os.path.join(directory, name),
                                                                     tree)
    builtin = _builtin_modules(tree, release)
    order = []

    def visit(name, chain):
        name = name.replace('-', '_')
        if name in chain:
            raise ImageBuildError(f"module dependency loop: {chain + [name]}")
        if index.get(name) in order or (name not in index and name in builtin):
            return
        if name not in index:
            raise ImageBuildError(f"kernel module {name} is neither a module nor built in")
        for dependency in module_depends(os.path.join(tree, index[name])):
            visit(dependency, chain + [name])
        order.append(index[name])

    for name in wanted:
        visit(name, [])
    return order


def _builtin_modules(tree, release):
    path = os.path.join(tree, 'lib', 'modules', release, 'modules.builtin')
    if not os.path.exists(path):
        return set()
    with open(path, encoding='utf-8') as handle:
        return {os.path.basename(line.strip())[:-3].replace('-', '_')
                for line in handle if line.strip()}


def _soname_index(trees):
    """{soname: (host path, libdir)} over the unpacked packages' library directories."""
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


def _needed_closure(binaries, index):
    """({soname: (path, libdir)} found, {soname: binary that needs it} missing) for the
    binaries and, transitively, the libraries they load."""
    wanted, missing = {}, {}
    pending, seen = list(binaries), set()
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


def _resolve_libraries(binaries, trees, debs, debdir, work):
    """{image path: host file} of the binaries' shared libraries (and the dynamic loader).

    A missing soname is looked for in the Depends of the package that holds the binary that
    needs it; only if no package has it, the host's own copy is taken (and recorded)."""
    host_copies = []
    if not binaries:
        return {}, host_copies
    tried = set()
    while True:
        wanted, missing = _needed_closure(binaries, _soname_index(trees))
        if not missing:
            break
        candidates = set()
        for binary in missing.values():
            owner = _owner(binary, trees)
            if owner in debs:
                candidates.update(name for name in _package_depends(debs[owner])
                                  if name not in debs and name not in tried)
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
        raise ImageBuildError("no dynamic loader (libc6) among the fetched packages")
    libraries[LOADER] = os.path.realpath(loader)
    return libraries, host_copies


def _host_library(soname):
    for libdir in ('/lib/x86_64-linux-gnu', '/usr/lib/x86_64-linux-gnu', '/lib64', '/usr/lib64'):
        path = os.path.join(libdir, soname)
        if os.path.exists(path):
            return os.path.realpath(path)
    raise ImageBuildError(f"no package and no host file provides {soname}")


def busybox_links(busybox, files):
    """{link: target} for each busybox applet (not where a file of the image takes the name)."""
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
    directories = {'proc', 'sys', 'dev', 'run', 'tmp', 'data', 'root', 'mnt'}
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
