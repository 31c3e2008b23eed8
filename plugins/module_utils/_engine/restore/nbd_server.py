"""A read-only NBD server over any set of block exports, on a unix socket.

Live restore's images and file restore's appliance read through it the disks of a backup that
QEMU cannot open as a file (a datastore snapshot: datastore/snapshot_export.py). An export is
any object with ``name``, ``size`` and ``read(offset, length)`` -> bytes or a buffer of them
(raising a GuestvaultError when it cannot read); a server that ``holds`` its exports also calls
``keep_chunks()`` (spare what it reads from a garbage collection) and reads one byte at
``first_data_offset()`` (None: no data) before it listens; ``ThreadServer`` calls an export's
``close()``, where it has one, once it stopped serving. An export that has
``extents(offset, length)`` (``(length, zero)`` runs from ``offset``) tells where its holes are;
any other export is all data. An export that has ``cached(offset, length)`` (True: the read
returns at once) has such reads served on the connection's own thread, with no thread handoff
in a sequential client's way (QEMU's stream asks for one piece at a time). It speaks the NBD
protocol's fixed newstyle handshake (``NBD_OPT_GO``/``NBD_OPT_EXPORT_NAME``) on a unix socket,
one thread per connection, with simple replies or, when the client asks, structured replies and
the ``base:allocation`` meta context: ``NBD_CMD_BLOCK_STATUS`` reports the holes (as holes QEMU
counts unallocated, see ``STATE_HOLE``) and reads answer them with ``OFFSET_HOLE``, so QEMU
copying an export (a live restore's stream) neither asks for them, moves nor decodes them.

Its life follows the copies: it stops once every client that connected has gone (QEMU drops
the backing when a stream completes), or when nobody connected within ``idle_timeout``. A read
that fails (a missing or damaged chunk) is answered with EIO and reported once to ``on_error``,
which a live restore uses to stop the guest.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from ..errors import GuestvaultError

NBDMAGIC = 0x4e42444d41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3e889045565a9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668e33ef

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO = 1, 2, 3, 6, 7
OPT_STRUCTURED_REPLY, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR_UNSUP, REP_ERR_INVALID, REP_ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_BLOCK_SIZE = 0, 3
# has flags, read only, can serve several connections at once
TRANSMISSION_FLAGS = 1 | 2 | (1 << 8)
CMD_READ, CMD_DISC, CMD_FLUSH, CMD_CACHE, CMD_BLOCK_STATUS = 0, 2, 3, 5, 7
CMD_FLAG_REQ_ONE = 1 << 3
REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
ALLOCATION = b'base:allocation'     # the one meta context, with the id below
ALLOCATION_ID = 1
# A zero run is reported as NBD_STATE_HOLE alone, without NBD_STATE_ZERO (which the spec lets a
# server leave out): QEMU counts an extent flagged zero as allocated, so its block-stream would
# read every hole and write it into the new image as zeroes, a round trip per 512 KiB; a bare
# hole at the bottom of the chain is unallocated, and the stream skips it: the new image, standing
# alone once the copy is done, reads it as zeroes, what the backup holds there. Data is 0.
STATE_HOLE = 1
MAX_REQUEST = 32 << 20
READERS = 4          # threads serving one connection's reads (decoding releases the GIL)


class _Closed(Exception):
    pass


class NbdServer:
    """Serve ``exports`` ({name: export}) on the unix socket ``path``."""

    def __init__(self, path, exports, on_error=None, idle_timeout=600.0, until_clients_gone=True):
        self.path = path
        # False: serve on after the last client left (a client that comes back), until shutdown
        self.until_clients_gone = until_clients_gone
        self.exports = exports
        self.on_error = on_error
        self.idle_timeout = idle_timeout
        self._listener = None
        self._clients = 0
        self._served = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._reported = False
        self._reporters = []

    def listen(self):
        if os.path.exists(self.path):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        os.chmod(self.path, 0o600)
        self._listener.listen(16)
        return self

    def serve_forever(self):
        """Until every client that came has gone (or none came within the idle timeout)."""
        self._listener.settimeout(1.0)
        waited = 0.0
        try:
            while not self._done.is_set():
                try:
                    conn, _addr = self._listener.accept()
                except socket.timeout:
                    with self._lock:
                        idle = self._served == 0
                    waited += 1.0
                    if idle and waited >= self.idle_timeout:
                        return
                    continue
                with self._lock:
                    self._clients += 1
                    self._served += 1
                threading.Thread(target=self._client, args=(conn,), daemon=True).start()
        finally:
            self._listener.close()
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            for reporter in self._reporters:
                reporter.join(timeout=60)

    def shutdown(self):
        """Stop accepting; serve_forever returns within a second."""
        self._done.set()

    def _client(self, conn):
        try:
            with conn:
                chosen = self._handshake(conn)
                if chosen is not None:
                    self._transmit(conn, *chosen)
        except (_Closed, OSError):
            pass
        finally:
            with self._lock:
                self._clients -= 1
                if self._clients == 0 and self.until_clients_gone:
                    self._done.set()

    # -- handshake -----------------------------------------------------------------------------
    def _handshake(self, conn):
        """``(export, structured, allocation)`` once the client chose an export: whether it
        negotiated structured replies, and ``base:allocation`` for that export."""
        conn.sendall(struct.pack('>QQH', NBDMAGIC, IHAVEOPT,
                                 FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        client_flags, = struct.unpack('>I', _recv(conn, 4))
        no_zeroes = bool(client_flags & FLAG_NO_ZEROES)
        structured = False
        allocation_for = None       # the export name base:allocation was set for
        while True:
            magic, option, length = struct.unpack('>QII', _recv(conn, 16))
            if magic != IHAVEOPT:
                raise _Closed()
            data = _recv(conn, length) if length else b''
            if option == OPT_EXPORT_NAME:
                name = data.decode('utf-8', 'replace')
                export = self.exports.get(name)
                if export is None:
                    raise _Closed()
                conn.sendall(struct.pack('>QH', export.size, TRANSMISSION_FLAGS)
                             + (b'' if no_zeroes else bytes(124)))
                return export, structured, structured and allocation_for == name
            if option == OPT_ABORT:
                _reply(conn, option, REP_ACK)
                raise _Closed()
            if option == OPT_LIST:
                for name in self.exports:
                    encoded = name.encode()
                    _reply(conn, option, REP_SERVER, struct.pack('>I', len(encoded)) + encoded)
                _reply(conn, option, REP_ACK)
                continue
            if option == OPT_STRUCTURED_REPLY:
                structured = structured or not data     # (no data is the valid form)
                _reply(conn, option, REP_ERR_INVALID if data else REP_ACK)
                continue
            if option in (OPT_INFO, OPT_GO, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT):
                try:
                    name, queries = _parse_option(data, option)
                except (struct.error, ValueError):
                    _reply(conn, option, REP_ERR_INVALID)
                    continue
                export = self.exports.get(name)
                if export is None:
                    _reply(conn, option, REP_ERR_UNKNOWN)
                    continue
                if option in (OPT_INFO, OPT_GO):
                    _reply(conn, option, REP_INFO,
                           struct.pack('>HQH', INFO_EXPORT, export.size, TRANSMISSION_FLAGS))
                    _reply(conn, option, REP_INFO,
                           struct.pack('>HIII', INFO_BLOCK_SIZE, 1, 4096, MAX_REQUEST))
                    _reply(conn, option, REP_ACK)
                    if option == OPT_GO:
                        return export, structured, structured and allocation_for == name
                    continue
                if not structured:      # meta contexts need structured replies (the spec)
                    _reply(conn, option, REP_ERR_INVALID)
                    continue
                listing = option == OPT_LIST_META_CONTEXT
                # LIST with no query, or with the namespace, names it too; SET only by name
                wanted = ((listing and not queries)
                          or any(query == ALLOCATION or (listing and query == b'base:')
                                 for query in queries))
                if not listing:
                    allocation_for = name if wanted else None
                if wanted:
                    _reply(conn, option, REP_META_CONTEXT,
                           struct.pack('>I', 0 if listing else ALLOCATION_ID) + ALLOCATION)
                _reply(conn, option, REP_ACK)
                continue
            _reply(conn, option, REP_ERR_UNSUP)   # TLS, extended headers, ...

    # -- transmission --------------------------------------------------------------------------
    def _transmit(self, conn, export, structured, allocation):
        """Requests are read in order and served on ``READERS`` threads: QEMU keeps several in
        flight (the guest's reads beside the stream's), and NBD lets replies come in any order,
        each naming its request's handle. With structured replies every answer to a read is
        structured (the spec), and errors are structured error chunks."""
        sending = threading.Lock()
        extents = getattr(export, 'extents', None) or (lambda offset, length: [(length, False)])
        cached = getattr(export, 'cached', None) or (lambda offset, length: False)

        def send(*parts):
            with sending:
                _send_parts(conn, parts)

        def reply(handle, error=0, message=''):
            """A reply without data: success, or an errno (with ``message`` for the client's
            log when structured)."""
            if not structured:
                send(struct.pack('>IIQ', SIMPLE_REPLY_MAGIC, error, handle))
            elif error:
                text = message.encode('utf-8', 'replace')[:4096]
                send(_chunk(handle, REPLY_TYPE_ERROR,
                            struct.pack('>IH', error, len(text)) + text))
            else:
                send(struct.pack('>IIQ', SIMPLE_REPLY_MAGIC, 0, handle))   # allowed: no data

        def read(handle, offset, length):
            try:
                if structured:
                    parts = _structured_read(handle, export, extents, offset, length)
                else:
                    parts = (struct.pack('>IIQ', SIMPLE_REPLY_MAGIC, 0, handle),
                             export.read(offset, length))
            except GuestvaultError as exc:
                reply(handle, errno.EIO, str(exc))
                # Reported on a thread of its own, after the reply: pausing the guest drains
                # its I/O, which waits for this very request.
                reporter = threading.Thread(target=self._report, args=(exc, export, offset),
                                            daemon=True)
                reporter.start()
                self._reporters.append(reporter)
                return
            send(*parts)

        def block_status(handle, flags, offset, length):
            runs = _merged(extents(offset, length))
            if flags & CMD_FLAG_REQ_ONE:
                runs = runs[:1]
            send(_chunk(handle, REPLY_TYPE_BLOCK_STATUS,
                        struct.pack('>I', ALLOCATION_ID)
                        + b''.join(struct.pack('>II', size, STATE_HOLE if zero else 0)
                                   for size, zero in runs),
                        REPLY_FLAG_DONE))

        with ThreadPoolExecutor(READERS, 'nbd-read') as pool:
            while True:
                magic, flags, kind, handle, offset, length = struct.unpack(
                    '>IHHQQI', _recv(conn, 28))
                if magic != REQUEST_MAGIC or kind == CMD_DISC:
                    return                          # the pool finishes what is in flight
                if kind == CMD_READ:
                    if length > MAX_REQUEST or offset + length > export.size:
                        reply(handle, errno.EINVAL)
                        continue
                    if cached(offset, length):
                        read(handle, offset, length)    # at once: no thread to wake
                    else:
                        pool.submit(read, handle, offset, length)
                elif kind == CMD_BLOCK_STATUS:
                    if not allocation or not length or offset + length > export.size:
                        reply(handle, errno.EINVAL)
                        continue
                    block_status(handle, flags, offset, length)
                elif kind in (CMD_FLUSH, CMD_CACHE):
                    reply(handle)
                else:                               # writes, trims: a read-only export
                    reply(handle, errno.EPERM)

    def _report(self, exc, export, offset):
        with self._lock:
            if self._reported:
                return
            self._reported = True
        if self.on_error is not None:
            self.on_error(exc, export, offset)


class ThreadServer:
    """A server for ``Format.open_block_exports``: the exports served by an ``NbdServer`` in a
    thread of this process while the context is open (file restore; and the live-restore
    server's process, which ``wait``s for it). ``hold``: touch every chunk served and read
    each export's first data before listening (see the module docstring)."""

    def __init__(self, path, on_error=None, idle_timeout=600.0, until_clients_gone=True,
                 hold=False):
        self.path = path
        self.options = {'on_error': on_error, 'idle_timeout': idle_timeout,
                        'until_clients_gone': until_clients_gone}
        self.hold = hold
        self._thread = None

    @contextmanager
    def serve(self, make_exports):
        """Serve ``make_exports()`` ({name: export}); yields the socket's path."""
        exports = make_exports()
        if self.hold:
            for export in exports.values():
                export.keep_chunks()
                offset = export.first_data_offset()
                if offset is not None:
                    export.read(offset, 1)
        server = NbdServer(self.path, exports, **self.options).listen()
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        try:
            yield self.path
        finally:
            server.shutdown()
            self._thread.join(timeout=30)
            for export in exports.values():
                if hasattr(export, 'close'):
                    export.close()

    def wait(self):
        """Until the server ends by itself: every client gone, or none within the idle timeout."""
        self._thread.join()


def _recv(conn, size):
    parts, left = [], size
    while left:
        data = conn.recv(left)
        if not data:
            raise _Closed()
        parts.append(data)
        left -= len(data)
    return b''.join(parts)


def _reply(conn, option, kind, data=b''):
    conn.sendall(struct.pack('>QIII', OPTION_REPLY_MAGIC, option, kind, len(data)) + data)


def _parse_option(data, option):
    """``(export name, [queries])`` of NBD_OPT_INFO/GO (queries: none; their information
    requests are optional and ignored) or NBD_OPT_{LIST,SET}_META_CONTEXT."""
    name_length, = struct.unpack_from('>I', data, 0)
    end = 4 + name_length
    if end > len(data):
        raise ValueError('short option')
    name = data[4:end].decode('utf-8', 'replace')
    if option in (OPT_INFO, OPT_GO):
        return name, []
    count, = struct.unpack_from('>I', data, end)
    position, queries = end + 4, []
    for _query in range(count):
        size, = struct.unpack_from('>I', data, position)
        queries.append(data[position + 4:position + 4 + size])
        position += 4 + size
    if position != len(data):
        raise ValueError('option length does not match its queries')
    return name, queries


def _merged(runs):
    """``[(length, zero)]`` with neighbours of the same kind joined (one descriptor each)."""
    merged = []
    for size, zero in runs:
        if merged and merged[-1][1] == zero:
            merged[-1] = (merged[-1][0] + size, zero)
        elif size:
            merged.append((size, zero))
    return merged


def _chunk(handle, kind, payload, flags=REPLY_FLAG_DONE):
    return _chunk_header(handle, kind, len(payload), flags) + payload


def _chunk_header(handle, kind, length, flags):
    return struct.pack('>IHHQI', STRUCTURED_REPLY_MAGIC, flags, kind, handle, length)


def _send_parts(conn, parts):
    """Send the buffers ``parts`` in order, as one message where the socket takes it: a read's
    data goes out as the export returned it, never copied into a reply first."""
    views = [memoryview(part).cast('B') for part in parts if len(part)]
    while views:
        sent = conn.sendmsg(views)
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


def _structured_read(handle, export, extents, offset, length):
    """The parts of the whole structured reply to a read: ``OFFSET_HOLE`` for each zero run
    (nothing read or sent), ``OFFSET_DATA`` for each data run; the last chunk flagged done.
    Every run is read before anything is sent, so a failed read is answered by one error chunk
    alone."""
    runs = _merged(extents(offset, length))
    parts = []
    for number, (size, zero) in enumerate(runs):
        flags = REPLY_FLAG_DONE if number == len(runs) - 1 else 0
        if zero:
            parts.append(_chunk(handle, REPLY_TYPE_OFFSET_HOLE,
                                struct.pack('>QI', offset, size), flags))
        else:
            data = export.read(offset, size)
            parts += (_chunk_header(handle, REPLY_TYPE_OFFSET_DATA, 8 + size, flags)
                      + struct.pack('>Q', offset), data)
        offset += size
    return parts or [_chunk(handle, REPLY_TYPE_NONE, b'')]    # a read of 0 bytes
