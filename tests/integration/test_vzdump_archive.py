"""The vzdump container archive on real parts: GNU tar, zstd, gzip/pigz, lzop and
lxc-usernsexec. A tree with every kind of file is archived and extracted with plain GNU tar
and pct restore's flags, privileged and unprivileged; each compression; the stream form;
failures leave nothing; an archive built the way Proxmox VE builds one is listed, read and
restored; hostile archives write nothing outside their destination."""
import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
import tempfile

import pytest

from guestvault_engine.errors import ArchiveError, ConfigError, CorruptData, StorageError
from guestvault_engine.format.capture import TreeCapture
from guestvault_engine.format.vzdump_archive import reader
from guestvault_engine.format.vzdump_archive.pipes import COMMON_TAR_FLAGS
from guestvault_engine.format.vzdump_archive.writer import write_archive
from guestvault_engine.restore import archive_files
from guestvault_engine.restore.file_restore import SizeLimitExceeded
from guestvault_engine.restore.untrusted_tar import UnsafeMember
from guestvault_engine.run.verify import VerifyRequest, run_verify
from guestvault_engine.storage.directory import DirStorage

MTIME = 1_700_000_000
NAME = 'vzdump-lxc-777-2024_07_01-12_30_05.tar'
PCT = 'arch: amd64\nhostname: ct777\nrootfs: local:777/vm-777-disk-0.raw,size=1G\n'
LXC = 'lxc.uts.name = ct777\nlxc.rootfs.path = dir:/var/lib/lxc/ct777/rootfs\n'
# file capability cap_net_bind_service=ep (vfs_cap_data revision 2)
CAPABILITY = struct.pack('<IIIII', 0x02000001, 1 << 10, 0, 0, 0)
EXCLUDED = {'tmp/x', 'var/tmp/y', 'var/run/a.pid', 'var/cache/big', 'home/u/old.bak'}
# pct restore's extraction (pve-container src/PVE/LXC/Create.pm), with the archive's own flag
PCT_RESTORE = ['tar', 'xpf', '-', '--totals', *COMMON_TAR_FLAGS, '--skip-old-files',
               '--anchored', '--exclude', './dev/*']
TAR_FLAG = {'zst': '--zstd', 'gz': '-z', 'lzo': '--lzop', None: None}


@pytest.fixture
def work():
    """A directory every uid can pass through (pytest's tmp_path is 0700 under root, which a
    mapped container root cannot enter)."""
    path = tempfile.mkdtemp(prefix='gv-vzdump.', dir='/var/tmp')
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_tree(root, uid=0, gid=0):
    """Files, a hardlink, a symlink, a sparse file, xattrs and a capability, a fifo, owners,
    modes and mtimes; plus what stdexcludes and the test's exclude-path drop."""
    files = {'etc/hostname': b'ct777\n', 'bin/tool': b'\x7fELF' + bytes(range(256)) * 40,
             'home/u/notes.txt': b'hello\n', 'home/u/old.bak': b'old',
             'tmp/x': b'scratch', 'var/tmp/y': b'y', 'var/run/a.pid': b'42',
             'var/run/keep.sock.txt': b'kept', 'var/cache/big': b'c' * 5000,
             'srv/setuid': b'#!/bin/sh\n'}
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'wb') as handle:
            handle.write(data)
    os.chmod(os.path.join(root, 'bin/tool'), 0o755)
    os.chmod(os.path.join(root, 'srv/setuid'), 0o4755)
    os.link(os.path.join(root, 'home/u/notes.txt'), os.path.join(root, 'home/u/hardlink'))
    os.symlink('../etc/hostname', os.path.join(root, 'home/u/link'))
    with open(os.path.join(root, 'srv/sparse'), 'wb') as handle:
        handle.truncate(64 << 20)
        handle.seek(32 << 20)
        handle.write(b'middle')
    os.mkfifo(os.path.join(root, 'srv/fifo'))
    os.setxattr(os.path.join(root, 'home/u/notes.txt'), 'user.origin', b'guest')
    os.setxattr(os.path.join(root, 'bin/tool'), 'security.capability', CAPABILITY)
    for folder, dirs, names in os.walk(root):
        for path in [folder] + [os.path.join(folder, n) for n in dirs + names]:
            owner = (uid + 1000, gid + 1000) if '/home/u' in path else (uid, gid)
            os.lchown(path, *owner)
    for folder, dirs, names in os.walk(root, topdown=False):
        for path in [os.path.join(folder, n) for n in names + dirs] + [folder]:
            os.utime(path, (MTIME, MTIME), follow_symlinks=False)
    # chown dropped the setuid bit and the capability: set them again, times after
    os.chmod(os.path.join(root, 'srv/setuid'), 0o4755)
    os.setxattr(os.path.join(root, 'bin/tool'), 'security.capability', CAPABILITY)
    for rel in ('srv/setuid', 'bin/tool', 'srv', 'bin'):
        os.utime(os.path.join(root, rel), (MTIME, MTIME))


def snapshot(root, id_shift=0):
    """Every path below ``root`` -> what must survive: type, mode, owner (less ``id_shift``),
    mtime, content or link, xattrs, hardlink group; sparse files' allocation."""
    seen, tree = {}, {}
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            info = os.lstat(path)
            entry = {'mode': info.st_mode, 'uid': info.st_uid - id_shift,
                     'gid': info.st_gid - id_shift, 'mtime': int(info.st_mtime),
                     'xattrs': {k: os.getxattr(path, k, follow_symlinks=False)
                                for k in sorted(os.listxattr(path, follow_symlinks=False))}}
            if stat.S_ISREG(info.st_mode):
                with open(path, 'rb') as handle:
                    entry['data'] = handle.read()
                entry['sparse'] = info.st_blocks * 512 < info.st_size // 2
                entry['link_group'] = seen.setdefault(info.st_ino, rel) \
                    if info.st_nlink > 1 else None
            elif stat.S_ISLNK(info.st_mode):
                entry['target'] = os.readlink(path)
            tree[rel] = entry
    return tree


def expected(source, id_shift=0):
    tree = snapshot(source, id_shift)
    return {rel: entry for rel, entry in tree.items() if rel not in EXCLUDED}


def pct_restore(archive, dest, compression):
    flag = TAR_FLAG[compression]
    argv = PCT_RESTORE[:3] + ([flag] if flag else []) + PCT_RESTORE[3:] + ['-C', dest]
    with open(archive, 'rb') as handle:
        subprocess.run(argv, stdin=handle, check=True, capture_output=True, timeout=300)


def first_member(archive):
    listing = subprocess.run(['tar', 'tf', archive], check=True, capture_output=True,
                             timeout=300).stdout.decode().splitlines()
    return listing[0], listing


def test_archive_extracts_with_pct_restores_flags_into_the_same_tree(work):
    root, out, dest = (os.path.join(work, n) for n in ('root', 'out', 'dest'))
    for folder in (root, out, dest):
        os.mkdir(folder)
    make_tree(root)
    archive = os.path.join(out, NAME + '.zst')
    warnings = []
    result = write_archive(TreeCapture(root), archive, pct_conf=PCT, lxc_config=LXC,
                           excludes=['/var/cache/*', '*.bak', '/srv/'], log=warnings.append)
    assert os.listdir(out) == [NAME + '.zst']
    assert result.bytes_written == os.path.getsize(archive) and result.tar_bytes > 10 << 10
    assert [w for w in warnings if w.startswith('WARN')] == [
        "WARN: tar does not match exclusion with a trailing slash '/srv/'"]
    first, listing = first_member(archive)
    assert first == './etc/vzdump/pct.conf' and listing[1:3] == ['./etc/vzdump/pct.fw',
                                                                 './etc/vzdump/lxc.conf']
    pct_restore(archive, dest, 'zst')
    restored = snapshot(dest)
    for rel in ('etc/vzdump', 'etc/vzdump/pct.conf', 'etc/vzdump/pct.fw',
                'etc/vzdump/lxc.conf'):
        restored.pop(rel)
    want = expected(root)
    # tar made etc/ for pct.conf, the first member; --skip-old-files then leaves the existing
    # directory's own mtime alone (pct restore's etc/ is changed by removing pct.conf anyway)
    restored['etc']['mtime'] = want['etc']['mtime'] = None
    assert restored == want
    assert restored['srv/sparse']['sparse'] and restored['srv/setuid']['mode'] & stat.S_ISUID
    assert restored['bin/tool']['xattrs']['security.capability'] == CAPABILITY
    assert restored['home/u/hardlink']['link_group'] == 'home/u/notes.txt' or \
        restored['home/u/notes.txt']['link_group'] == 'home/u/hardlink'
    assert stat.S_ISFIFO(restored['srv/fifo']['mode'])
    config = reader.read_config(archive)
    assert (config.pct_conf, config.lxc_config) == (PCT, LXC)


def test_an_unprivileged_container_is_archived_with_its_own_ids(work):
    id_map = [('u', 0, 100000, 65536), ('g', 0, 100000, 65536)]
    root, dest, plain = (os.path.join(work, n) for n in ('root', 'dest', 'plain'))
    for folder in (root, dest, plain):
        os.mkdir(folder)
    make_tree(root, 100000, 100000)
    os.chown(root, 100000, 100000)
    os.utime(root, (MTIME, MTIME))
    archive = os.path.join(work, NAME + '.zst')
    write_archive(TreeCapture(root, id_map=id_map), archive, pct_conf=PCT,
                  excludes=['/var/cache/*', '*.bak'])
    by_path = {m['path']: m for m in reader.list_members(archive, '/', recursive=True)}
    assert (by_path['/etc/hostname']['uid'], by_path['/home/u/notes.txt']['uid'],
            by_path['/etc/vzdump/pct.conf']['gid']) == (0, 1000, 0)
    # plain tar as a privileged restore would: container ids on the host
    pct_restore(archive, plain, 'zst')
    assert os.stat(os.path.join(plain, 'home/u/notes.txt')).st_uid == 1000
    # the engine's restore under the same map: host ids again, and etc/vzdump removed
    reader.extract_rootfs(archive, dest, id_map=id_map)
    assert not os.path.exists(os.path.join(dest, 'etc/vzdump'))
    restored = snapshot(dest, 100000)
    want = expected(root, 100000)
    # the mapped root cannot set security.* xattrs of the host: PVE's flags warn and go on
    for tree in (restored, want):
        tree['bin/tool']['xattrs'].pop('security.capability', None)
        tree['etc']['mtime'] = None         # etc/vzdump was removed from it
    assert restored == want
    assert os.stat(dest).st_uid == 100000


def test_the_mapped_root_must_reach_the_tree(work):
    hidden = os.path.join(work, 'hidden')
    os.makedirs(os.path.join(hidden, 'root'))
    os.chmod(hidden, 0o700)
    with pytest.raises(ArchiveError, match='cannot enter .*chmod o\\+x'):
        write_archive(TreeCapture(os.path.join(hidden, 'root'),
                                  id_map=[('u', 0, 100000, 65536), ('g', 0, 100000, 65536)]),
                      os.path.join(work, NAME), pct_conf=PCT)
    assert os.listdir(work) == ['hidden']


@pytest.mark.parametrize('compress,pigz,ext', [('gzip', 0, 'gz'), ('gzip', 2, 'gz'),
                                               ('lzo', 0, 'lzo'), ('0', 0, None),
                                               ('zstd', 0, 'zst')])
def test_each_compression_extracts_with_plain_tar(work, compress, pigz, ext):
    root, dest = os.path.join(work, 'root'), os.path.join(work, 'dest')
    os.mkdir(root)
    os.mkdir(dest)
    make_tree(root)
    archive = os.path.join(work, NAME + (f'.{ext}' if ext else ''))
    write_archive(TreeCapture(root), archive, pct_conf=PCT, compress=compress, pigz=pigz,
                  zstd_threads=0, excludes=['/var/cache/*', '*.bak'], bwlimit_kib=1 << 20)
    pct_restore(archive, dest, ext)
    assert snapshot(dest)['bin/tool'] == expected(root)['bin/tool']
    assert reader.verify_archive(archive) == []


def test_the_stream_form_writes_only_the_stream_and_reads_back_from_one(work):
    root, dest = os.path.join(work, 'root'), os.path.join(work, 'dest')
    os.mkdir(root)
    os.mkdir(dest)
    make_tree(root)
    before = set(os.listdir(work))
    stream = io.BytesIO()
    result = write_archive(TreeCapture(root), stream, pct_conf=PCT, compress='zstd',
                           excludes=['/var/cache/*', '*.bak'])
    assert result.path is None and result.bytes_written == len(stream.getvalue())
    assert stream.getvalue()[:4] == b'\x28\xb5\x2f\xfd' and set(os.listdir(work)) == before
    assert reader.read_config(io.BytesIO(stream.getvalue())).pct_conf == PCT
    stream.seek(0)
    reader.extract_rootfs(stream, dest)
    restored = snapshot(dest)
    assert restored == dict(expected(root)) | \
        {'etc': restored['etc']} and 'etc/vzdump' not in restored


def test_failures_leave_no_dat_and_no_archive(work):
    out = os.path.join(work, 'out')
    os.mkdir(out)
    with pytest.raises(ArchiveError, match='missing'):
        write_archive(TreeCapture(os.path.join(work, 'nothing')), os.path.join(out, NAME),
                      pct_conf=PCT)
    for pattern in ('/*', '*', '/', '?*'):
        with pytest.raises(ConfigError, match='exclude'):
            write_archive(TreeCapture(work), os.path.join(out, NAME), pct_conf=PCT,
                          excludes=[pattern])
    assert os.listdir(out) == []
    root = os.path.join(work, 'root')
    os.mkdir(root)
    with open(os.path.join(root, 'random'), 'wb') as handle:
        handle.write(os.urandom(2 << 20))
    small = os.path.join(work, 'small')
    os.mkdir(small)
    subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', small], check=True)
    try:
        for name in (NAME, NAME + '.zst'):
            with pytest.raises(StorageError, match='no space left'):
                write_archive(TreeCapture(root), os.path.join(small, name), pct_conf=PCT)
            assert os.listdir(small) == []
    finally:
        subprocess.run(['umount', small], check=True)


def pve_archive(work, root, vmid=600, pct=PCT):
    """An archive as PVE's LXC.pm builds one: its tar command, pct.conf (and no LXC config)
    from a temporary directory first, zstd."""
    conf = os.path.join(work, 'pve-tmp')
    os.makedirs(os.path.join(conf, 'etc/vzdump'))
    with open(os.path.join(conf, 'etc/vzdump/pct.conf'), 'w') as handle:
        handle.write(pct)
    archive = os.path.join(work, f'vzdump-lxc-{vmid}-2024_07_01-12_30_05.tar.zst')
    tar = ['tar', 'cpf', '-', '--totals', *COMMON_TAR_FLAGS, '--one-file-system',
           '--warning=no-file-ignored', f'--directory={conf}', './etc/vzdump/pct.conf',
           f'--directory={root}', '--no-anchored', '--exclude=*.bak', '--anchored',
           '--exclude=./tmp/?*', '--exclude=./var/tmp/?*', '--exclude=./var/run/?*.pid',
           '--exclude=./var/cache/*', '.']
    with open(archive, 'wb') as out:
        producer = subprocess.Popen(tar, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        subprocess.run(['zstd', '-q', '--threads=1'], stdin=producer.stdout, stdout=out,
                       check=True, timeout=300)
        assert producer.wait(timeout=300) == 0
    return archive


def test_an_archive_made_by_proxmox_is_listed_read_and_restored(work):
    root, dest = os.path.join(work, 'root'), os.path.join(work, 'dest')
    os.mkdir(root)
    os.mkdir(dest)
    make_tree(root)
    archive = pve_archive(work, root)
    [record] = DirStorage(work).backups(600)
    assert record.id == os.path.basename(archive)
    config = reader.read_config(archive)
    assert (config.pct_conf, config.lxc_config) == (PCT, None)
    reader.extract_rootfs(archive, dest)
    restored = snapshot(dest)
    restored.pop('etc')
    assert restored == {k: v for k, v in expected(root).items() if k != 'etc'}
    assert run_verify(VerifyRequest(vmid=600, dumpdir=work))['verify_state'] == 'ok'
    with open(archive, 'r+b') as handle:
        handle.truncate(os.path.getsize(archive) // 2)
    result = run_verify(VerifyRequest(vmid=600, dumpdir=work))
    assert result['verify_state'] == 'failed' and 'zstd' in result['problems'][0]


def hostile(path, members):
    """A zstd tar of ``members``: (TarInfo fields, data)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.GNU_FORMAT) as archive:
        for fields, data in members:
            fields = dict(fields)
            info = tarfile.TarInfo(fields.pop('name'))
            for key, value in fields.items():
                setattr(info, key, value)
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buffer.getvalue()
    with open(path, 'wb') as out:
        subprocess.run(['zstd', '-q', '-c'], input=raw, stdout=out, check=True, timeout=60)
    return path


CONF = ({'name': './etc/vzdump/pct.conf'}, PCT.encode())


@pytest.mark.parametrize('evil', [
    [({'name': '../escaped'}, b'x')],
    [({'name': '/escaped'}, b'x')],
    [({'name': './link', 'type': tarfile.SYMTYPE, 'linkname': '..'}, None),
     ({'name': './link/escaped'}, b'x')],
], ids=['dotdot', 'absolute', 'through-a-symlink'])
def test_hostile_archives_write_nothing_outside(work, evil):
    archive = hostile(os.path.join(work, NAME + '.zst'), [CONF] + evil)
    dest = os.path.join(work, 'dest')
    os.mkdir(dest)
    with pytest.raises(UnsafeMember):
        archive_files.extract_paths(archive, ['/'], dest, max_bytes=1 << 20)
    assert os.listdir(dest) == [] and sorted(os.listdir(work)) == ['dest', NAME + '.zst']


def test_devices_are_left_out_setuid_dropped_and_sizes_limited(work):
    archive = hostile(os.path.join(work, NAME + '.zst'), [
        CONF, ({'name': './dev/sda', 'type': tarfile.BLKTYPE, 'devmajor': 8}, None),
        ({'name': './bin/su', 'mode': 0o4755}, b'#!/bin/sh\n'),
        ({'name': './big'}, b'b' * 4096)])
    dest = os.path.join(work, 'dest')
    os.mkdir(dest)
    with pytest.raises(SizeLimitExceeded, match='more than 1000 bytes'):
        archive_files.extract_paths(archive, ['/'], dest, max_bytes=1000)
    assert os.listdir(dest) == []
    counts = archive_files.extract_paths(archive, ['/bin', '/dev'], dest, max_bytes=1000)
    assert counts['not_extracted'] == ['dev/sda'] and sorted(os.listdir(dest)) == ['bin']
    assert os.stat(os.path.join(dest, 'bin/su')).st_mode & 0o7777 == 0o755
    assert [m['path'] for m in reader.list_members(archive, '/bin')] == ['/bin/su']


def test_a_hostile_configuration_is_refused(work):
    huge = hostile(os.path.join(work, 'a.tar.zst'),
                   [({'name': './etc/vzdump/pct.conf'}, b'x' * (2 << 20))])
    with pytest.raises(CorruptData, match='claims 2097152 bytes'):
        reader.read_config(huge)
    linked = hostile(os.path.join(work, 'b.tar.zst'), [(
        {'name': './etc/vzdump/pct.conf', 'type': tarfile.SYMTYPE,
         'linkname': '/etc/shadow'}, None)])
    with pytest.raises(CorruptData, match='not a regular file'):
        reader.read_config(linked)
    none = hostile(os.path.join(work, 'c.tar.zst'), [({'name': './etc/hostname'}, b'x')])
    with pytest.raises(CorruptData, match='no ./etc/vzdump/pct.conf'):
        reader.read_config(none)
