"""The writer registry of a datastore: who writes into it now, so garbage collection spares
what they may still name. One interface (``WriterRegistry``), two implementations, as PBS 4
matches ``DatastoreBackend::{Filesystem, S3}``:

- ``LocalWriters``: one locked file per running backup (or live restore's server) in
  ``<datastore>/.writers/``, naming its start; the kernel drops the lock when the process dies,
  so a file nobody holds is a killed run's. GC's cutoff is the oldest start.
- ``LeaseWriters``: on an object store, where nodes share the chunks, each running backup and
  each GC holds a *lease*, an object under ``.leases/`` refreshed every minute; a GC sweeps only
  when it sees no live writer lease after putting its own, and a backup starts only when it sees
  no live GC lease after putting its own, so of two that start at once at least one sees the
  other (the backend is strongly consistent). A lease of a run on this node that has ended (its
  process is gone, or it released the lease while the backend failed) is stale at once and
  removed; any other lapses after LEASE_TTL. A backup holds a local writer file too (the cache's
  chunk markers), and a GC writes a new ``.gc-generation`` for every node's cache.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import ContextManager, Optional, Protocol, Tuple

from ..errors import GuestvaultError, StorageError
from ..storage.directory import report_wait
from ..times import format_time
from .object_chunks import GC_GENERATION

WRITERS = '.writers'
LEASES = '.leases/'
# A lease not refreshed for this long belongs to a run that died (it refreshes every minute).
LEASE_TTL = 600
LEASE_REFRESH = 60
GC_WAIT_POLL = 2.0


class WriterRegistry(Protocol):
    """Running backups and garbage collections of one datastore."""

    def writer(self, wait_seconds: float) -> ContextManager[None]:
        """Held by a running backup or a live restore's NBD server."""

    def collecting_garbage(self, check_mode: bool = False
                           ) -> ContextManager[Tuple[float, Optional[float]]]:
        """Held by a GC: ``(now, start of the oldest running writer or None)``, from which the
        sweep's cutoff follows; refuses (StorageError) when the registry cannot keep writers
        safe from the sweep."""


class LocalWriters:
    """Writers of a datastore on a file system: locked files in ``.writers/``."""

    def __init__(self, path):
        self.folder = os.path.join(path, WRITERS)

    @contextmanager
    def collecting_garbage(self, check_mode=False):
        yield time.time(), self.oldest_start()

    @contextmanager
    def writer(self, wait_seconds=0):
        """A file in ``.writers`` holding the run's start, locked while it runs (the kernel
        drops the lock if the process dies)."""
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        path = os.path.join(self.folder, f"{os.getpid()}-{uuid.uuid4().hex[:12]}")
        handle = open(path, 'w')
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
            # The start on the file system's clock, which also stamps the atimes of the chunks
            # this writer touches next; it lags time.time() by up to a tick, and a touch a tick
            # after a time.time() start could otherwise fall before the cutoff with grace 0.
            started = min(time.time(), os.fstat(handle.fileno()).st_mtime)
            handle.write(f"{started:.6f}\n")
            handle.flush()
            yield
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
            handle.close()

    def oldest_start(self):
        """The start (epoch) of the oldest backup still writing here, or None. A writer file
        nobody holds is a killed run's and is removed."""
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return None
        oldest = None
        for name in names:
            path = os.path.join(self.folder, name)
            try:
                handle = open(path, 'r+')
            except OSError:
                continue
            with handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    try:
                        started = float(handle.readline().strip() or time.time())
                    except ValueError:
                        started = os.fstat(handle.fileno()).st_mtime
                    oldest = started if oldest is None else min(oldest, started)
                    continue
                os.unlink(path)  # nobody holds it: the run that made it is gone
        return oldest


class LeaseWriters:
    """Writers of a datastore on an object store, across nodes: leases in the bucket (and a
    local writer file for each backup, as on a file system). ``label`` names the datastore in
    messages."""

    def __init__(self, bucket, local, label):
        self.bucket = bucket
        self.local = local
        self.label = label

    @contextmanager
    def writer(self, wait_seconds=180 * 60):
        """A backup's lease; waits while a garbage collection sweeps (up to ``wait_seconds``)."""
        with self.local.writer(), _Lease(self.bucket, 'writer') as lease:
            deadline = time.monotonic() + wait_seconds
            waited_since = seen = None
            while True:
                collecting = self._live_leases('gc', lease.server_time())
                if not collecting:
                    break
                waited_since, seen = waited_since or time.monotonic(), collecting
                if time.monotonic() >= deadline:
                    raise StorageError(
                        f"a garbage collection of {self.label} is running "
                        f"({_describe(collecting)}) and did not end within "
                        f"{wait_seconds / 60:g} min; wait for it or raise lockwait")
                time.sleep(GC_WAIT_POLL)
            if waited_since is not None:
                report_wait(f"waited {time.monotonic() - waited_since:.1f} s for a garbage "
                            f"collection of {self.label} ({_describe(seen)})")
            yield

    @contextmanager
    def collecting_garbage(self, check_mode=False):
        """Held by a garbage collection: ``(server time now, None)`` for its cutoff; refuses while
        a backup writes anywhere. A GC that ran writes a new generation for the caches."""
        if check_mode:
            yield time.time(), None
            return
        with _Lease(self.bucket, 'gc') as lease:
            now = lease.server_time()
            writing = self._live_leases('writer', now)
            if writing:
                raise StorageError(
                    f"garbage collection of {self.label} does not sweep while backups write "
                    f"into it ({_describe(writing)}); run it again when they have finished")
            try:
                yield now, None
            finally:
                self.bucket.put(GC_GENERATION, uuid.uuid4().hex.encode())

    def _live_leases(self, kind, now):
        """The leases of ``kind`` that are live: refreshed within LEASE_TTL, and not of a run on
        this node that has ended (those are removed), each with its ``expires`` (epoch)."""
        live, ended = [], []
        for key, _size, _etag, modified in self.bucket.objects(f"{LEASES}{kind}-"):
            if modified < now - LEASE_TTL:
                continue
            try:
                lease = json.loads(self.bucket.get(key) or b'{}')
            except ValueError:
                lease = {}
            if _ended_here(key, lease):
                ended.append(key)
                continue
            live.append(dict(lease, expires=modified + LEASE_TTL))
        if ended:
            try:
                self.bucket.delete(ended)
            except GuestvaultError:
                pass  # ignored all the same; the next look tries again
        return live


# Keys of the leases this process holds now: a lease naming this process that is not here was
# released while its delete failed (an S3 outage), and is stale.
_HELD = set()


def _process_start(pid):
    """When process ``pid`` started (clock ticks since boot), or None if there is no such
    process: with the pid it names one process, as a pid is reused and its start time is not."""
    try:
        with open(f"/proc/{int(pid)}/stat", 'rb') as handle:
            return int(handle.read().rsplit(b')', 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _ended_here(key, lease):
    """Whether ``lease`` belongs to a run on this node that has ended: its process is gone (or
    its pid names another process now), or it is this process and no longer holds the lease."""
    pid = lease.get('pid')
    if lease.get('node') != socket.gethostname() or not isinstance(pid, int):
        return False
    started = _process_start(pid)
    if started is None or lease.get('pid_start', started) != started:
        return True
    return pid == os.getpid() and key not in _HELD


class _Lease:
    """An object ``.leases/<kind>-<id>`` naming its holder, refreshed on a thread until released."""

    def __init__(self, bucket, kind):
        self.bucket = bucket
        self.key = f"{LEASES}{kind}-{uuid.uuid4().hex}"
        self.body = json.dumps({'kind': kind, 'node': socket.gethostname(),
                                'pid': os.getpid(), 'pid_start': _process_start(os.getpid()),
                                'started': time.time()}).encode()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None

    def __enter__(self):
        self.bucket.put(self.key, self.body)
        _HELD.add(self.key)
        self._thread = threading.Thread(target=self._refresh, daemon=True,
                                        name='guestvault-lease')
        self._thread.start()
        return self

    def _refresh(self):
        while not self._stop.wait(LEASE_REFRESH):
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self.bucket.put(self.key, self.body)
                except GuestvaultError:
                    pass  # retried next minute; a lease lapses only after LEASE_TTL

    def server_time(self):
        """The bucket's clock (the lease's own modification time), so nodes' clocks never
        decide whether a lease is live."""
        found = self.bucket.head(self.key)
        return found['modified'] if found else time.time()

    def __exit__(self, *exc_info):
        self._stop.set()
        # A refresh in flight ends before the delete, so it cannot put the lease back after it.
        with self._lock:
            _HELD.discard(self.key)
            try:
                self.bucket.delete([self.key])
            except GuestvaultError:
                pass  # S3 is failing: the lease is stale now (see _ended_here), and lapses
        if self._thread is not None:
            self._thread.join(timeout=5)


def _describe(leases):
    shown = [f"node {lease.get('node', '?')} pid {lease.get('pid', '?')}, "
             f"{lease.get('kind', 'lease')} lease until "
             f"{format_time(datetime.fromtimestamp(lease['expires'], timezone.utc))} "
             "unless renewed" for lease in leases[:3]]
    more = f" and {len(leases) - 3} more" if len(leases) > 3 else ''
    return '; '.join(shown) + more
