"""The chunk store of a datastore: ``<base>/.chunks/XXXX/<digest hex>`` (chunk_store.rs).

Each chunk is one DataBlob named by the lower-case hex of its 32-byte digest, in one of 65536
subdirectories named by the first two digest bytes in hex (``0000`` .. ``ffff``), all created with
the store, beside an empty ``<base>/.lock``. Rules kept from PBS:

- inserting a chunk that exists with the same size only touches it; an empty file is replaced;
  an encrypted chunk never replaces an unencrypted one of the same digest (the keyed digest makes
  that impossible unless something is wrong), nor two uncompressed encrypted copies each other;
  otherwise the smaller copy is kept (two zstd versions may compress the same data differently);
- a new chunk is written under a hidden temporary name and renamed into place, so a reader or a
  crash never sees half a chunk (PBS's own iterator skips any name that is not a digest);
- garbage collection marks a chunk by setting its access time (``touch``) and sweeps chunks whose
  atime is older than the cutoff; mtime is left alone;
- verify renames a corrupt chunk to ``<digest>.<n>.bad`` (n = 0..9, the first free one), so the
  next backup writes a fresh copy while the bad one stays for inspection until GC.

The digest of a 4 MiB chunk of zeroes (unencrypted) is ``ZERO_CHUNK_DIGEST``: a hole or a zero
run in an image maps to it without reading or hashing anything.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptData, StorageError
from ..storage.files import (DirectFiles, fsync_path, sync_filesystem, touch_atime,
                             write_file_hidden)
from .blob import blob_kind, encode_chunk
from .file_formats import (COMPRESSED_BLOB_MAGIC, DEFAULT_CHUNK_SIZE, DIGEST_SIZE,
                           ENCRYPTED_BLOB_MAGIC, UNCOMPRESSED_BLOB_MAGIC)

CHUNK_DIR = '.chunks'
LOCK_FILE = '.lock'
SUBDIR_COUNT = 1 << 16
MAX_BAD_COPIES = 10
REMOVE_THREADS = 8

# sha256 of 4 MiB of zero bytes: every all-zero chunk of an unencrypted backup has this name
ZERO_CHUNK_DIGEST = bytes.fromhex(
    'bb9f8df61474d25e71fa00722318cd387396ca1736605e1248821cc0de3d3af8')

_CHUNK_NAME = re.compile(r'[0-9a-fA-F]{64}(\.[0-9]\.bad)?\Z')


def digest_hex(digest):
    """The file name of a digest (32 bytes, or its 64-character hex)."""
    if isinstance(digest, str):
        text = digest.lower()
        if len(text) != 2 * DIGEST_SIZE or not all(c in '0123456789abcdef' for c in text):
            raise ValueError(f"not a chunk digest: {digest!r}")
        return text
    if len(digest) != DIGEST_SIZE:
        raise ValueError(f"a chunk digest has {DIGEST_SIZE} bytes, not {len(digest)}")
    return bytes(digest).hex()


def chunk_relpath(digest):
    """``.chunks/XXXX/<hex>`` relative to the datastore's base."""
    name = digest_hex(digest)
    return os.path.join(CHUNK_DIR, name[:4], name)


def is_chunk_name(name):
    """Whether a file name in a chunk subdirectory is a chunk (or a chunk marked bad), as PBS's
    iterator decides: 64 hex digits, optionally ``.<n>.bad``."""
    return _CHUNK_NAME.match(name) is not None


def zero_chunk(chunk_size=DEFAULT_CHUNK_SIZE, crypt=None):
    """``(blob, digest)`` of a chunk of zeroes. Encrypted, the blob differs per call (a fresh IV)
    but the digest does not; a store writes it once and refers to it by digest."""
    return encode_chunk(bytes(chunk_size), crypt)


class FileChunkStore:
    """The ``.chunks`` directory of one datastore on a local (or mounted) file system."""

    def __init__(self, base):
        self.base = os.fspath(base)
        self.chunk_dir = os.path.join(self.base, CHUNK_DIR)
        # chunks are written once and read back rarely (restore, verify): past the page cache
        self._files = DirectFiles()

    def __repr__(self):
        return f"FileChunkStore({self.base!r})"

    @property
    def where(self):
        """How messages name the place chunks are kept."""
        return self.chunk_dir

    # -- the store -----------------------------------------------------------------------------

    def exists(self):
        return os.path.isdir(self.chunk_dir)

    def create(self):
        """Make ``.chunks`` with its 65536 subdirectories and ``.lock``, as PBS does. Finishes a
        creation that was interrupted; the directories are not fsynced one by one (they hold
        nothing yet), the parent is once at the end."""
        try:
            os.makedirs(self.chunk_dir, exist_ok=True)
            present = set(os.listdir(self.chunk_dir))
            for number in range(SUBDIR_COUNT):
                name = f"{number:04x}"
                if name not in present:
                    os.mkdir(os.path.join(self.chunk_dir, name))
            lock = os.path.join(self.base, LOCK_FILE)
            if not os.path.exists(lock):
                write_file_hidden(lock, b'')
            fsync_path(self.chunk_dir)
            fsync_path(self.base)
        except OSError as exc:
            raise StorageError(f"cannot create the chunk store in {self.base}: "
                               f"{exc.strerror or exc}") from None

    def check(self):
        if not self.exists():
            raise StorageError(f"{self.base} is not a datastore: {CHUNK_DIR} is missing")

    def prepare(self):
        """Before a backup writes: the store exists (made on the first backup)."""
        if not self.exists():
            self.create()

    def sync(self):
        """Make every chunk inserted with ``durable=False`` durable (one sync of the file
        system, before an index names them)."""
        sync_filesystem(self.base)

    def missing(self, digests):
        """The digests of ``digests`` that have no chunk in the store."""
        return [digest for digest in digests if not self.contains(digest)]

    # -- garbage collection (gc.collect_garbage runs it) --------------------------------------

    def gc_check(self):
        self.check()

    def gc_mark(self, referenced):
        """Touch every referenced chunk (hex digests); the ones that are missing. A missing
        chunk has its ``.bad`` copies touched instead, so they stay while something needs them."""
        missing = set()
        for name in referenced:
            path = os.path.join(self.chunk_dir, name[:4], name)
            if self.touch_path(path):
                continue
            missing.add(name)
            for counter in range(MAX_BAD_COPIES):
                self.touch_path(f"{path}.{counter}.bad")
        return missing

    def gc_sweep(self, referenced, cutoff, protect_from, check_mode, result, progress):
        """Scan ``.chunks/XXXX`` one prefix directory at a time (``os.scandir``, one ``lstat``
        per entry) and remove every chunk and ``.bad`` copy whose atime is older than ``cutoff``
        and that no index needs, and crashed writers' temporaries; the chunk names present."""
        present = set()
        folders = _prefix_folders(self.chunk_dir)
        total = len(folders)
        cutoff_ns = int(cutoff * 1e9)
        protect_ns = int(protect_from * 1e9)
        if progress is not None:
            progress('sweep', 0, total)
        remover = _Remover(check_mode, result)
        try:
            for number, folder in enumerate(folders):
                _sweep_folder(folder, referenced, cutoff_ns, protect_ns, result, present,
                              remover.remove)
                if progress is not None and (number & 0xfff == 0xfff or number == total - 1):
                    progress('sweep', number + 1, total)
        finally:
            remover.finish()
        return present

    # -- one chunk -----------------------------------------------------------------------------

    def chunk_path(self, digest):
        return os.path.join(self.base, chunk_relpath(digest))

    def contains(self, digest):
        return os.path.isfile(self.chunk_path(digest))

    def read(self, digest):
        """The raw blob of a chunk; ``CorruptData`` when it is missing (an index names it)."""
        return bytes(self.read_view(digest))

    def read_view(self, digest):
        """``read`` without a copy: a view valid until this thread's next ``read_view`` (restore
        and verify decode it at once)."""
        try:
            return self._files.read_view(self.chunk_path(digest))
        except FileNotFoundError:
            raise CorruptData(f"chunk {digest_hex(digest)} is missing from {self.where}") \
                from None

    def read_into(self, digest, buffer):
        """The raw blob of a chunk read into ``buffer`` (page-aligned and writable, such as an
        ``mmap``), as a view of it: a restore's reader fills buffers that outlive the call
        without a copy. ``CorruptData`` when it is missing, or larger than ``buffer``: no chunk
        blob is larger than its data and a header."""
        try:
            return self._files.read_into(self.chunk_path(digest), buffer)
        except FileNotFoundError:
            raise CorruptData(f"chunk {digest_hex(digest)} is missing from {self.where}") \
                from None
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            raise CorruptData(f"chunk {digest_hex(digest)}: {exc.strerror}, more than a blob of "
                              "its chunk can have") from None

    def insert(self, digest, blob, durable=True):
        """Store a chunk unless it is there already: ``(duplicate, size on disk)``.

        ``durable`` fsyncs the chunk and its directory; without it the caller makes the store
        durable at once (a sync of the file system) before writing an index that names it.
        """
        path = self.chunk_path(digest)
        try:
            old = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            old = None
        if old is not None:
            if not stat.S_ISREG(old.st_mode):
                raise StorageError(f"{path} is not a regular file; the chunk store is damaged")
            if self._keep_existing(path, digest, blob, old.st_size):
                self.touch(digest)
                return True, old.st_size
        try:
            try:
                self._files.write_hidden(path, blob, durable=durable)
            except FileNotFoundError:
                # a prefix directory removed by hand (or a store created without them)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._files.write_hidden(path, blob, durable=durable)
        except OSError as exc:
            raise StorageError(f"cannot store chunk {digest_hex(digest)} in {self.chunk_dir}: "
                               f"{exc.strerror or exc}") from None
        return False, len(blob)

    def _keep_existing(self, path, digest, blob, old_size):
        """Whether the chunk on disk stays (True) or the new copy replaces it (False)."""
        if old_size == len(blob):
            return True
        if old_size == 0:
            return False
        encrypted, compressed = blob_kind(blob, f"chunk {digest_hex(digest)}")
        if encrypted:
            with open(path, 'rb') as handle:
                old_magic = handle.read(8)
            if old_magic in (UNCOMPRESSED_BLOB_MAGIC, COMPRESSED_BLOB_MAGIC):
                raise StorageError(
                    f"chunk {digest_hex(digest)}: an encrypted chunk would replace an "
                    "unencrypted one of the same digest; refused (keyed digests cannot collide "
                    "with plain ones unless a chunk is forged or damaged)")
            if old_magic == ENCRYPTED_BLOB_MAGIC and not compressed:
                raise StorageError(
                    f"chunk {digest_hex(digest)}: two uncompressed encrypted copies of different "
                    "sizes; one of them is invalid, the stored one is kept and the new refused")
            return True
        return old_size < len(blob)

    def touch(self, digest, must_exist=True):
        """Set a chunk's access time to now (GC's mark), leaving mtime; False if it is missing
        and ``must_exist`` is false."""
        if touch_atime(self.chunk_path(digest)):
            return True
        if must_exist:
            raise CorruptData(f"chunk {digest_hex(digest)} is missing from {self.where}")
        return False

    @staticmethod
    def touch_path(path):
        """``touch`` by path (a chunk's ``.bad`` copy, or GC's mark); False if it is missing."""
        return touch_atime(path)

    def touch_if_present(self, digest):
        """Whether a usable copy of the chunk is in the store (a non-empty regular file, so not
        one renamed ``.bad``), touching it when it is: what a backup does before it refers to a
        chunk it did not write, so a garbage collection running meanwhile keeps it."""
        path = self.chunk_path(digest)
        try:
            found = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(found.st_mode) or found.st_size == 0:
            return False
        return touch_atime(path)

    def mark_bad(self, digest):
        """Rename a corrupt chunk to ``<hex>.<n>.bad`` as PBS's verify does; the new path, or
        None if the chunk is not there."""
        path = self.chunk_path(digest)
        if not os.path.lexists(path):
            return None
        for counter in range(MAX_BAD_COPIES):
            target = f"{path}.{counter}.bad"
            if not os.path.lexists(target) or counter == MAX_BAD_COPIES - 1:
                break
        os.replace(path, target)
        return target

    # -- every chunk ---------------------------------------------------------------------------

    def chunk_files(self):
        """``(path, name, bad)`` for every chunk file, subdirectory by subdirectory (what GC
        sweeps); names that are not chunks, such as hidden temporary files, are skipped."""
        for number in range(SUBDIR_COUNT):
            folder = os.path.join(self.chunk_dir, f"{number:04x}")
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                if is_chunk_name(name):
                    yield os.path.join(folder, name), name, name.endswith('.bad')


def _prefix_folders(chunk_dir):
    """The ``XXXX`` directories of ``.chunks`` (all 65536 in a store PBS or ``create`` made)."""
    try:
        names = os.listdir(chunk_dir)
    except OSError as exc:
        raise StorageError(f"cannot list {chunk_dir}: {exc.strerror or exc}") from None
    return [os.path.join(chunk_dir, name) for name in sorted(names)
            if len(name) == 4 and all(c in '0123456789abcdef' for c in name)]


def _sweep_folder(folder, referenced, cutoff_ns, protect_ns, result, present, remove):
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    bad = []
    for entry in entries:
        name = entry.name
        if name.startswith('.'):
            _sweep_temporary(entry, cutoff_ns, remove)
            continue
        if not is_chunk_name(name):
            continue
        if len(name) > 64:
            bad.append(entry)
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        name = name.lower()
        present.add(name)
        if name in referenced or info.st_atime_ns >= cutoff_ns:
            result['kept_chunks'] += 1
            result['kept_bytes'] += info.st_size
            if name in referenced:
                result['referenced_bytes'] += info.st_size
            elif info.st_atime_ns < protect_ns:
                result['pending_chunks'] += 1
            continue
        remove(entry.path, 'removed_chunks', info.st_size)
    for entry in bad:
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(info.st_mode):
            continue
        digest = entry.name[:64].lower()
        needed = digest in referenced and digest not in present
        if needed or info.st_atime_ns >= cutoff_ns:
            result['bad_chunks_kept'] += 1
            continue
        remove(entry.path, 'bad_chunks_removed', info.st_size)


def _sweep_temporary(entry, cutoff_ns, remove):
    """A writer's hidden temporary (``.<digest>.<pid>.<random>.tmp``) left by a crash."""
    if not entry.name.endswith('.tmp'):
        return
    try:
        info = entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_mtime_ns < cutoff_ns:
        remove(entry.path, 'removed_temporaries', 0)


class _Remover:
    """Counts what the sweep removes and, unless in check mode, unlinks it on a few threads: an
    unlink waits on the file system's journal (and on discard, where it is mounted so), and
    threads overlap those waits."""

    BATCH = 256

    def __init__(self, check_mode, result, threads=REMOVE_THREADS):
        self.check_mode = check_mode
        self.result = result
        self.batch = []
        self.futures = []
        self.pool = None if check_mode else ThreadPoolExecutor(threads, 'gc-unlink')

    def remove(self, path, counter, size):
        if self.check_mode:
            self._count(counter, size)
            return
        self.batch.append((path, counter, size))
        if len(self.batch) >= self.BATCH:
            self.futures.append(self.pool.submit(_unlink_all, self.batch))
            self.batch = []

    def _count(self, counter, size):
        self.result[counter] += 1
        if counter != 'removed_temporaries':
            self.result['removed_bytes'] += size

    def finish(self):
        if self.pool is None:
            return
        if self.batch:
            self.futures.append(self.pool.submit(_unlink_all, self.batch))
            self.batch = []
        self.pool.shutdown(wait=True)
        errors = []
        for future in self.futures:
            error = future.exception()
            if error is not None:
                errors.append(error)
                continue
            for counter, size in future.result():
                self._count(counter, size)
        if errors:
            raise errors[0]


def _unlink_all(batch):
    """Unlink every ``(path, counter, size)``; those removed (a file gone meanwhile is not)."""
    removed = []
    for path, counter, size in batch:
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot remove the chunk {path}: {exc.strerror or exc}") \
                from None
        removed.append((counter, size))
    return removed
