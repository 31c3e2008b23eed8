"""The processes an archive passes through: tar, a compressor or decompressor, and a Python
pump where a stream must be counted, throttled (bwlimit, where vzdump puts ``cstream``) or
given back the bytes read to tell its compression.

A ``Pipeline`` starts processes connected stdout to stdin, runs pumps in threads, and at the
end waits for all of them; the first failure (a tool's exit status with its stderr tail, a
pump's OSError) is raised, after every other part was stopped.
"""
from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import threading
import time

from ...errors import ArchiveError, CorruptData, StorageError

CHUNK = 1 << 20
# pve-storage's COMMON_TAR_FLAGS (PVE/Storage/Plugin.pm): create and extract both use them.
COMMON_TAR_FLAGS = ('--one-file-system', '-p', '--sparse', '--numeric-owner', '--acls',
                    '--xattrs', '--xattrs-include=user.*',
                    '--xattrs-include=security.capability', '--warning=no-file-ignored',
                    '--warning=no-xattr-write')
# The magic bytes each compression starts with; a plain tar has 'ustar' at offset 257.
MAGIC = ((b'\x28\xb5\x2f\xfd', 'zst'), (b'\x1f\x8b', 'gz'),
         (b'\x89LZO\x00\r\n\x1a\n', 'lzo'), (b'BZh', 'bz2'))
SNIFF_BYTES = 512
TOOLS = {'zst': 'zstd', 'gz': 'gzip', 'lzo': 'lzop', 'bz2': 'bzip2'}


def compressor(compression, zstd_threads=1, pigz=0):
    """The command that compresses to ``compression`` (an archive extension) as vzdump runs
    it, or None: zstd with ``--threads`` (vzdump's ``zstd`` option: 0 means half the cores),
    pigz instead of gzip when ``pigz`` > 0, lzop."""
    if compression is None:
        return None
    if compression == 'zst':
        threads = int(zstd_threads)
        if threads == 0:
            threads = max(1, (os.cpu_count() or 2) // 2)
        return ['zstd', '-q', '-c', f'--threads={threads}']
    if compression == 'gz':
        if int(pigz) > 0:
            # vzdump's pigz: 1 means half the cores, N > 1 means N threads
            threads = max(1, (os.cpu_count() or 2) // 2) if int(pigz) == 1 else int(pigz)
            return ['pigz', '-c', '-p', str(threads)]
        return ['gzip', '-c']
    if compression == 'lzo':
        return ['lzop', '-c']
    raise ArchiveError(f"vzdump archives are not written with {compression} compression; use "
                       "compress zstd, gzip or lzo")


def decompressor(compression):
    """The command that decompresses ``compression`` to stdout, or None for a plain tar."""
    if compression is None:
        return None
    return [TOOLS[compression], '-d', '-c', '-q']


def sniff(head):
    """The compression the first bytes of an archive show, None for a plain tar; CorruptData
    when they are neither."""
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    if head[257:262] == b'ustar':
        return None
    raise CorruptData("the archive is neither a tar nor zstd, gzip, lzo or bzip2 compressed "
                      "(unknown first bytes); it is not a vzdump archive, or it is damaged")


class Pipeline:
    """Processes and pumps of one archive read or write; ``finish()`` waits and raises."""

    def __init__(self):
        self.steps = []           # (name, Popen, stderr file)
        self.pumps = []           # (thread, result dict)

    def start(self, name, argv, stdin, stdout, umask=-1):
        """Start ``argv`` (with ``umask`` when given); its stderr is kept in a file (it may be
        long), for the message."""
        err = tempfile.TemporaryFile()
        try:
            proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=err,
                                    close_fds=True, umask=umask)
        except FileNotFoundError:
            err.close()
            self.kill()
            raise ArchiveError(f"{argv[0]} is not installed; install it (apt-get install "
                               f"{argv[0]}) for vzdump archives") from None
        self.steps.append((name, proc, err))
        return proc

    def pump(self, read, write_fd, bwlimit_kib=0, head=b'', close=True):
        """Copy ``read(n)`` (until b'') to ``write_fd`` in a thread, ``head`` first, at most
        ``bwlimit_kib`` KiB/s; its byte count is ``result['bytes']``."""
        result = {'bytes': 0, 'error': None}

        def run():
            try:
                _copy(read, write_fd, bwlimit_kib, head, result)
            except OSError as exc:
                result['error'] = exc
            finally:
                if close:
                    try:
                        os.close(write_fd)
                    except OSError:
                        pass
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.pumps.append((thread, result))
        return result

    def kill(self):
        for _name, proc, _copier in self.steps:
            if proc.poll() is None:
                proc.kill()

    def abort(self):
        """After a failure elsewhere: kill every part and reap it; that first failure is the
        one reported, so what the parts say about being killed is not."""
        self.kill()
        try:
            self.finish()
        except Exception:       # pylint: disable=broad-except
            pass

    def finish(self, ignore=()):
        """Wait for every part; raise the first failure (``ignore``: names of steps whose exit
        status does not matter, as when a reader stopped early; ``'pump'`` for the pumps)."""
        failure = None
        self.tar_stderr = ''
        for thread, result in self.pumps:
            thread.join()
            if result['error'] is not None and failure is None and 'pump' not in ignore:
                failure = _write_error(result['error'])
                self.kill()
        for name, proc, err in self.steps:
            proc.wait()
            err.seek(0)
            text = err.read().decode('utf-8', 'replace')
            err.close()
            if failure is None and proc.returncode and name not in ignore:
                failure = _tool_error(name, proc.returncode, text)
                self.kill()
            if name == 'tar':
                self.tar_stderr = text
        if failure is not None:
            raise failure


def _copy(read, write_fd, bwlimit_kib, head, result):
    rate = bwlimit_kib * 1024 if bwlimit_kib else 0
    start = time.monotonic()
    data = head
    while True:
        if data:
            view = memoryview(data)
            while view:
                written = os.write(write_fd, view)
                view = view[written:]
            result['bytes'] += len(data)
            if rate:
                # ahead of the limit: wait until the bytes sent are what the rate allows
                ahead = result['bytes'] / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        data = read(min(CHUNK, max(4096, rate // 8)) if rate else CHUNK)
        if not data:
            return


def _write_error(exc):
    if exc.errno == errno.ENOSPC:
        return StorageError("writing the archive failed: no space left on the device; free "
                            "space there or choose another storage")
    if exc.errno == errno.EPIPE:
        return ArchiveError("the archive's reader stopped reading (broken pipe)")
    return StorageError(f"writing the archive failed: {exc}")


def _tool_error(name, code, stderr):
    tail = ' | '.join(line for line in stderr.strip().splitlines()[-5:] if line.strip())
    # tar says only 'Wrote only N of M bytes' when the archive's file system is full
    if 'No space left on device' in stderr or 'Wrote only' in stderr:
        return StorageError(f"{name} failed: no space left on the device ({tail}); free space "
                            "there or choose another storage")
    return ArchiveError(f"{name} exited with status {code}: {tail or 'no message'}")


def totals(tar_stderr):
    """The byte count tar's ``--totals`` printed (the uncompressed archive's size), or None."""
    for line in tar_stderr.splitlines():
        if line.startswith(('Total bytes written:', 'Total bytes read:')):
            return int(line.split(':', 1)[1].split()[0])
    return None


def userns_command(id_map):
    """``lxc-usernsexec -m u:0:100000:65536 -m g:… --`` for an id map (PVE's
    ``PVE::LXC::userns_command``), ``[]`` for a privileged container."""
    if not id_map:
        return []
    return ['lxc-usernsexec'] + [arg for entry in id_map
                                 for arg in ('-m', ':'.join(str(v) for v in entry))] + ['--']


def mapped_root(id_map):
    """The host uid and gid of the container's root under ``id_map`` (None, None: none)."""
    def host(kind):
        for which, inside, outside, count in id_map:
            if which in (kind, 'b') and inside <= 0 < inside + count:
                return outside - inside
        return None
    return host('u'), host('g')
