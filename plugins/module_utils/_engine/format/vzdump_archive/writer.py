"""Writing a container's vzdump archive from a ``TreeCapture``, as pve-container's
``PVE::VZDump::LXC::archive`` does.

GNU tar with PVE's flags; the configuration first (``./etc/vzdump/pct.conf``, which
pve-storage's ``extract_vzdump_config_tar`` finds by stopping at the first match, an empty
``./etc/vzdump/pct.fw``, and the original LXC config as ``./etc/vzdump/lxc.conf``, which
``pct restore`` leaves alone: it reads and deletes only pct.conf, pct.fw and vps.conf), then
the root file system with vzdump's exclusions, then each volume at its mount point. For an
unprivileged container tar runs under ``lxc-usernsexec`` with the id map, so the archive holds
the container's own ids. The stream is throttled (bwlimit, before compression, where vzdump
puts cstream), compressed, and written as ``<name>.dat`` that is fsynced and renamed when
complete, or to a stream (``--stdout``: nothing else).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from ...errors import ArchiveError, ConfigError, StorageError
from ...storage import vzdump_names
from ...storage.files import fsync_path
from .pipes import COMMON_TAR_FLAGS, Pipeline, compressor, mapped_root, totals, userns_command

CONF_DIR = './etc/vzdump'
PCT_CONF = f'{CONF_DIR}/pct.conf'
PCT_FW = f'{CONF_DIR}/pct.fw'
LXC_CONF = f'{CONF_DIR}/lxc.conf'
# vzdump's stdexcludes, as PVE/VZDump.pm has them (its docs say '?*pid', the code '?*.pid')
STD_EXCLUDES = ('/tmp/?*', '/var/tmp/?*', '/var/run/?*.pid')
# Top-level names a pattern must not match all of: one that does excludes everything.
_PROBES = ('bin', 'etc', 'x', 'Zq9_-.v')


@dataclass
class WrittenArchive:
    path: str               # the archive (None when written to a stream)
    bytes_written: int      # the archive's size
    tar_bytes: int          # the uncompressed tar stream's size
    warnings: list


def exclusions(excludes, stdexcludes=True):
    """``(patterns, warnings)``: vzdump's exclusion list (``exclude-path`` then stdexcludes);
    ConfigError, before anything is written, for a pattern that would exclude everything."""
    patterns, warnings = [], []
    for pattern in list(excludes or ()):
        pattern = str(pattern)
        if not pattern.strip('/ '):
            raise ConfigError(f"exclude-path {pattern!r} excludes the whole container; give "
                              "a path inside it, e.g. '/var/cache/*'")
        if _matches_everything(pattern):
            raise ConfigError(f"exclude-path {pattern!r} matches every file of the container, "
                              "so the backup would be empty; give a narrower pattern, e.g. "
                              "'/var/cache/*' (anchored at the container's root) or '*.tmp' "
                              "(in every directory)")
        if pattern.endswith('/'):
            # As vzdump warns: tar matches no file with a trailing slash (rsync and PBS do).
            warnings.append(f"tar does not match exclusion with a trailing slash '{pattern}'")
        patterns.append(pattern)
    if stdexcludes:
        patterns += STD_EXCLUDES
    return patterns, warnings


def _matches_everything(pattern):
    """tar's matching: an anchored pattern (``/...``) against ``./<name>``, another against
    any trailing part of a name (``*`` matches ``/`` too, as tar's exclusions do)."""
    if pattern.startswith('/'):
        return all(fnmatch.fnmatchcase(f'./{name}', f'.{pattern}') for name in _PROBES)
    return all(fnmatch.fnmatchcase(name, pattern.rstrip('/')) for name in _PROBES)


def _volume_source(host_path):
    """How tar names a volume's host path below ``-C /`` (no leading ``./``: never the name
    of a rootfs member, which all start with ``./``)."""
    return os.path.normpath(host_path).lstrip('/')


def _transform(source, mount_point):
    """A tar ``--transform`` that renames the volume's members to its mount point (not
    symbolic links' targets: ``S``)."""
    escaped = re.sub(r'([\\.\[\]*^$|])', r'\\\1', source)
    target = '.' + mount_point.rstrip('/').replace('\\', '\\\\').replace('|', '\\|') \
        .replace('&', '\\&')
    return f'--transform=s|^{escaped}\\(/\\|$\\)|{target}\\1|S'


def tar_command(capture, conf_dir, patterns):
    """The tar command line of PVE's LXC.pm: configuration first, then the rootfs, excludes
    unanchored then anchored, then each volume at its mount point."""
    argv = userns_command(capture.id_map) + [
        'tar', 'cpf', '-', '--totals', *COMMON_TAR_FLAGS, f'--directory={conf_dir}',
        PCT_CONF, PCT_FW]
    if os.path.exists(os.path.join(conf_dir, LXC_CONF)):
        argv.append(LXC_CONF)
    argv.append(f'--directory={capture.root}')
    argv.append('--no-anchored')
    if capture.id_map:
        argv.append('--exclude=lost+found')
    argv += [f'--exclude={p}' for p in patterns if not p.startswith('/')]
    argv.append('--anchored')
    anchored = [p for p in patterns if p.startswith('/')]
    argv += [f'--exclude=.{p}' for p in anchored]
    volumes = [(mp, _volume_source(host)) for mp, host in capture.volumes]
    for mount_point, source in volumes:
        # tar matches exclusions on the names it reads (before --transform): a pattern below
        # the mount point is given again for the volume's own names
        prefix = mount_point.rstrip('/') + '/'
        argv += [f'--exclude={source}/{p[len(prefix):]}' for p in anchored
                 if p.startswith(prefix)]
    argv += [_transform(source, mp) for mp, source in volumes]
    argv.append('.')
    if volumes:
        argv += ['--directory=/'] + [source for _mount, source in volumes]
    return argv


def _write_conf_dir(conf_dir, pct_conf, lxc_config, id_map):
    """The files tar takes first; owned by the container's root when tar runs mapped (tar must
    read them there, and the archive then holds them as 0:0, as a privileged one does)."""
    etc = os.path.join(conf_dir, 'etc', 'vzdump')
    os.makedirs(etc)
    files = {PCT_CONF: pct_conf, PCT_FW: ''}
    if lxc_config is not None:
        files[LXC_CONF] = lxc_config
    for name, text in files.items():
        with open(os.path.join(conf_dir, name), 'w') as handle:
            handle.write(text)
    uid, gid = mapped_root(id_map)
    if uid is not None:
        for folder, _dirs, names in os.walk(conf_dir):
            for path in [folder] + [os.path.join(folder, n) for n in names]:
                os.chown(path, uid, gid if gid is not None else uid)


def _check_reachable(capture):
    """The tree exists, and under an id map its root's parents let the mapped root through
    (a host-only 0700 directory above it would fail tar half-way)."""
    uid, _gid = mapped_root(capture.id_map)
    for path in [capture.root] + [host for _mount, host in capture.volumes]:
        if not os.path.isdir(path):
            raise ArchiveError(f"the container's tree {path} is missing or not a directory; "
                               "nothing was written")
        if uid is None:
            continue
        probe = os.path.dirname(os.path.abspath(path))
        while True:
            info = os.stat(probe)
            if not info.st_mode & 0o001 and info.st_uid != uid:
                raise ArchiveError(
                    f"tar runs as the container's root (host uid {uid}), which cannot enter "
                    f"{probe} (mode {info.st_mode & 0o777:o}, owner {info.st_uid}) above "
                    f"{path}; make it searchable (chmod o+x) or use a directory that is")
            if probe == '/':
                break
            probe = os.path.dirname(probe)


def write_archive(capture, out, *, pct_conf, lxc_config=None, excludes=(), stdexcludes=True,
                  compress='zstd', zstd_threads=1, pigz=0, bwlimit_kib=0, log=None):
    """Write ``capture`` (a format.capture.TreeCapture) as a vzdump archive to ``out``: a path
    (its compression from its name; written as vzdump's ``.dat``, fsynced, renamed, the
    directory fsynced) or a binary stream (``compress`` decides; nothing else is done).
    ``pct_conf`` and ``lxc_config`` are texts. Bad input raises before anything is written; on
    any failure no ``.dat`` and no archive remain. Returns a ``WrittenArchive``."""
    log = log or (lambda line: None)
    patterns, warnings = exclusions(excludes, stdexcludes)
    for line in warnings:
        log(f"WARN: {line}")
    if isinstance(out, str):
        parsed = vzdump_names.parse(os.path.basename(out))
        if parsed is None or parsed.format != 'tar':
            raise ConfigError(f"{out} is not a vzdump container archive name "
                              "(vzdump-lxc-<vmid>-<YYYY_MM_DD-HH_MM_SS>.tar[.zst|.gz|.lzo])")
        compression = parsed.compression
    else:
        if compress not in vzdump_names.COMPRESS_EXT:
            raise ConfigError(f"compress {compress!r} is not one of 0, 1, gzip, lzo, zstd")
        compression = vzdump_names.COMPRESS_EXT[compress]
    compress_cmd = compressor(compression, zstd_threads, pigz)
    _check_reachable(capture)
    conf_dir = tempfile.mkdtemp(prefix='guestvault-vzdump-conf.')
    dat = None
    try:
        _write_conf_dir(conf_dir, pct_conf, lxc_config, capture.id_map)
        if isinstance(out, str):
            if os.path.exists(out):
                raise StorageError(f"{out} already exists; it is not overwritten")
            dat = os.path.join(os.path.dirname(out), vzdump_names.dat_name(os.path.basename(out)))
            out_fd = os.open(dat, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        else:
            out_fd = None
        try:
            written, tar_bytes = _run(capture, conf_dir, patterns, compress_cmd, bwlimit_kib,
                                      out_fd, out)
            if out_fd is not None:
                os.fsync(out_fd)
                written = os.fstat(out_fd).st_size
        finally:
            if out_fd is not None:
                os.close(out_fd)
        if dat is not None:
            os.rename(dat, out)
            fsync_path(os.path.dirname(out) or '.')
            dat = None
        log(f"archive {out if isinstance(out, str) else 'to the stream'}: {written} bytes "
            f"({tar_bytes} uncompressed)")
        return WrittenArchive(out if isinstance(out, str) else None, written, tar_bytes,
                              warnings)
    finally:
        if dat is not None and os.path.exists(dat):
            os.unlink(dat)
        shutil.rmtree(conf_dir, ignore_errors=True)


def _run(capture, conf_dir, patterns, compress_cmd, bwlimit_kib, out_fd, stream):
    """tar [-> throttle] [-> compressor] -> ``out_fd``, or through a pipe into ``stream``:
    ``(bytes written to the stream, tar's byte count)``."""
    pipeline = Pipeline()
    final_read = None
    if out_fd is None:
        final_read, sink = os.pipe()
    else:
        sink = out_fd
    try:
        direct = not (bwlimit_kib or compress_cmd)
        tar = pipeline.start('tar', tar_command(capture, conf_dir, patterns),
                             subprocess.DEVNULL, sink if direct else subprocess.PIPE)
        upstream = tar.stdout
        if bwlimit_kib:
            # vzdump throttles the tar stream before compressing it (cstream -t)
            into = os.pipe() if compress_cmd else (None, sink)
            pipeline.pump(lambda n: os.read(tar.stdout.fileno(), n), into[1], bwlimit_kib,
                          close=bool(compress_cmd))
            upstream = into[0]
        if compress_cmd:
            pipeline.start(compress_cmd[0], compress_cmd, upstream, sink)
            if isinstance(upstream, int):
                os.close(upstream)
        if tar.stdout is not None and not bwlimit_kib:
            tar.stdout.close()
        written = 0
        if final_read is not None:
            os.close(sink)
            sink = None
            with os.fdopen(final_read, 'rb', buffering=0) as reader:
                final_read = None
                for data in iter(lambda: reader.read(1 << 20), b''):
                    stream.write(data)
                    written += len(data)
            stream.flush()
        pipeline.finish()
        return written, totals(pipeline.tar_stderr) or 0
    except BaseException:
        pipeline.abort()
        raise
    finally:
        for fd in (final_read, sink if out_fd is None else None):
            if fd is not None:
                os.close(fd)
