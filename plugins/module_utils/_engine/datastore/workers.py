"""Threads for the chunk pipelines (backup, restore, verify), and the bandwidth limit they share.

The work per chunk (pread/pwrite, SHA-256, CRC32, zstd, AES-GCM) runs in C with the GIL released,
so plain threads use every core. ``run_parallel``: each thread gets its own state (a reader on the
source, a zstd compressor) from ``setup``; items are handed out in order from one shared
iterator, so a slow chunk never holds the others back. ``Stages``: threads of different kinds
(read, compute, write) joined by bounded queues, so no core waits for another's I/O. Either way
the first error stops every thread and is raised.
"""
from __future__ import annotations

import contextlib
import queue
import threading
import time


class RateLimiter:
    """A token bucket over bytes, shared by threads: ``take(n)`` sleeps until ``n`` more bytes
    fit in ``kib_per_second`` (0: no limit). Bursts are at most one request per thread."""

    def __init__(self, kib_per_second):
        self.rate = float(kib_per_second or 0) * 1024
        self._lock = threading.Lock()
        self._free_at = time.monotonic()

    def take(self, amount):
        if self.rate <= 0:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._free_at)
            self._free_at = start + amount / self.rate
        if start > now:
            time.sleep(start - now)


class _Stop(Exception):
    """Raised in a worker when another one failed."""


class Stages:
    """Threads joined by bounded queues: ``start(name, function)`` each, then ``join()``.

    ``get``/``put`` block on a queue until it has an item/room, or raise ``_Stop`` once any
    thread failed (they look every ``POLL`` seconds), so one error ends every stage; ``join``
    raises the first error. A stage that ends by ``_Stop`` is no error of its own."""

    POLL = 0.1

    def __init__(self):
        self._errors = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = []

    def get(self, source):
        while True:
            try:
                return source.get(timeout=self.POLL)
            except queue.Empty:
                if self._stopped.is_set():
                    raise _Stop() from None

    def put(self, target, item):
        while not self._stopped.is_set():
            try:
                target.put(item, timeout=self.POLL)
                return
            except queue.Full:
                continue
        raise _Stop()

    def start(self, name, function):
        def main():
            try:
                function()
            except _Stop:
                pass
            except BaseException as exc:  # pylint: disable=broad-except
                with self._lock:
                    self._errors.append(exc)
                self._stopped.set()
        thread = threading.Thread(target=main, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def start_many(self, name, count, function, then=None):
        """``start`` ``count`` threads ``<name>-<n>`` of ``function``. ``then``: ``(queue,
        ends)``, the next stage's queue and its number of threads; once the last of these
        ``count`` has returned (not failed: then every stage stops anyway), ``queue`` gets
        ``ends`` Nones, so each thread of the next stage ends after the last item."""
        left = [count]

        def run():
            function()
            with self._lock:
                left[0] -= 1
                last = left[0] == 0
            if last and then is not None:
                target, ends = then
                for _number in range(ends):
                    self.put(target, None)

        for number in range(count):
            self.start(f'{name}-{number}', run)

    def join(self):
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]


def run_parallel(items, workers, work, setup=None):
    """Call ``work(state, item)`` for every item on ``workers`` threads; ``state`` is what the
    context manager ``setup()`` gives each thread (None without one). Returns when all are done;
    raises the first exception any call raised (the other threads stop at their next item)."""
    iterator = iter(items)
    lock = threading.Lock()
    errors = []

    def next_item():
        with lock:
            if errors:
                raise _Stop()
            return next(iterator)

    def thread_main():
        try:
            with (setup() if setup is not None else contextlib.nullcontext()) as state:
                while True:
                    try:
                        item = next_item()
                    except StopIteration:
                        return
                    work(state, item)
        except _Stop:
            return
        except BaseException as exc:  # pylint: disable=broad-except
            with lock:
                errors.append(exc)

    count = max(1, int(workers or 1))
    if count == 1:
        thread_main()
    else:
        threads = [threading.Thread(target=thread_main, name=f"chunk-worker-{number}",
                                    daemon=True) for number in range(count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise errors[0]
