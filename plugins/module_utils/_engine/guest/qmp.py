"""A synchronous session with one QEMU process over QMP, built on ``qemu.qmp``.

The engine is synchronous (Ansible modules and the node command run one step after another), so
this wraps the asyncio ``QMPClient`` in a private event loop. Nothing above this layer sees QMP's
wire format: callers get Python values back and ``GuestvaultError`` subclasses on failure.
"""
from __future__ import annotations

import asyncio
import os
import time

from ..errors import BackupFailed, GuestUnreachable, QmpCommandFailed

try:
    from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient, QMPError
    HAS_QEMU_QMP = True
    QEMU_QMP_IMPORT_ERROR = None
except ImportError as exc:  # reported by the caller with a hint to install it
    HAS_QEMU_QMP = False
    QEMU_QMP_IMPORT_ERROR = exc

JOB_EVENTS = ('BLOCK_JOB_COMPLETED', 'BLOCK_JOB_CANCELLED', 'BLOCK_JOB_ERROR')


class JobOutcome:
    """How one block job ended, as QEMU reported it."""

    def __init__(self, job_id, ok, error=None, length=0, offset=0):
        self.job_id = job_id
        self.ok = ok
        self.error = error
        self.length = length
        self.offset = offset

    def __repr__(self):
        return f"JobOutcome({self.job_id!r}, ok={self.ok}, error={self.error!r})"


class QmpSession:
    """One connection to a guest's QMP socket.

    Use as a context manager. Job events are recorded from the moment of connection, so a job that
    finishes before ``wait_for_jobs`` is called is not missed.
    """

    def __init__(self, socket_path, timeout=10.0, name='guestvault'):
        if not HAS_QEMU_QMP:
            raise GuestUnreachable(
                f"the Python library qemu.qmp is not installed ({QEMU_QMP_IMPORT_ERROR}); "
                "install it with 'pip install qemu.qmp' for the interpreter that runs guestvault")
        self.socket_path = socket_path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._jobs = EventListener(JOB_EVENTS)
        self._client.register_listener(self._jobs)
        self._finished = {}

    # -- connection ---------------------------------------------------------------------------
    def connect(self):
        if not os.path.exists(self.socket_path):
            raise GuestUnreachable(
                f"QMP socket {self.socket_path} does not exist: is the guest running, and is the "
                "socket path in its registry entry (qmp:) right?")
        try:
            self._run(self._client.connect(self.socket_path), self.timeout)
        except (ConnectError, OSError, asyncio.TimeoutError) as exc:
            raise GuestUnreachable(
                f"cannot connect to the QMP socket {self.socket_path}: {_cause(exc)}. A QEMU "
                "process must serve it (-qmp unix:PATH,server=on,wait=off), and QEMU serves one "
                "QMP client at a time: check that no other tool is connected to it") from exc
        return self

    def close(self):
        try:
            if self._client.runstate.name != 'IDLE':
                self._run(self._client.disconnect(), self.timeout)
        except Exception:  # closing a dead connection must not hide the original error
            pass
        finally:
            # A connection that died leaves the client's reader tasks behind: end them here,
            # or they complain when the loop is garbage-collected.
            pending = asyncio.all_tasks(self._loop)
            for task in pending:
                task.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def __enter__(self):
        return self.connect()

    def __exit__(self, *exc):
        self.close()

    def _run(self, coro, timeout):
        return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))

    # -- commands -----------------------------------------------------------------------------
    def execute(self, command, arguments=None, timeout=None):
        """Run one QMP command and return its result."""
        try:
            return self._run(self._client.execute(command, arguments or None),
                             timeout or self.timeout)
        except ExecuteError as exc:
            raise QmpCommandFailed(command, exc.error_class, str(exc)) from exc
        except asyncio.TimeoutError as exc:
            raise GuestUnreachable(
                f"QEMU on {self.socket_path} did not answer {command} within "
                f"{timeout or self.timeout:.0f} s") from exc
        except (QMPError, OSError, EOFError) as exc:
            raise GuestUnreachable(
                f"QEMU went away: the QMP connection {self.socket_path} closed during {command}. "
                "Did QEMU exit or crash? Check that the guest is still running") from exc

    def transaction(self, actions):
        """Run QMP actions atomically: all take effect at one point in time, or none does.

        (QEMU 7.2 refuses ``completion-mode: grouped`` together with bitmap actions, so jobs end
        one by one; ``wait_for_jobs`` returns at the first failure and the caller aborts all.)
        """
        actions = [{'type': kind, 'data': data} for kind, data in actions]
        return self.execute('transaction', {'actions': actions})

    def status(self):
        return self.execute('query-status')['status']

    def guest_name(self):
        """The name QEMU was started with (-name), or '' when it has none."""
        try:
            return self.execute('query-name').get('name', '')
        except QmpCommandFailed:
            return ''

    def describe(self):
        """QEMU's version and the guest's run state, as a backup records them."""
        return {'qemu': self.execute('query-version'), 'status': self.execute('query-status')}

    def remove_bitmap(self, node, name, missing_ok=True):
        """Remove a dirty bitmap; one that is already gone is fine unless ``missing_ok`` is
        False."""
        try:
            self.execute('block-dirty-bitmap-remove', {'node': node, 'name': name})
        except QmpCommandFailed:
            if not missing_ok:
                raise

    def start_nbd_server(self, socket_path):
        """Start QEMU's NBD server on the unix socket ``socket_path``; QmpCommandFailed when it
        cannot (QEMU runs one NBD server at a time: another tool may hold it)."""
        if os.path.exists(socket_path):
            os.unlink(socket_path)  # a killed run's; QEMU cannot bind over it
        self.execute('nbd-server-start', {'addr': {'type': 'unix', 'data': {'path': socket_path}}})

    # -- jobs ---------------------------------------------------------------------------------
    def _drain_job_events(self, wait):
        """Record job events; wait up to ``wait`` seconds for the first one."""
        async def pull():
            try:
                self._record(await asyncio.wait_for(self._jobs.get(), wait))
            except asyncio.TimeoutError:
                return
        self._loop.run_until_complete(pull())
        for event in self._jobs.clear():
            self._record(event)

    def _record(self, event):
        data = event.get('data', {})
        job_id = data.get('device')
        name = event.get('event')
        if name == 'BLOCK_JOB_ERROR':
            # An I/O error inside a job with on-*-error=report is followed by COMPLETED with
            # the error text; keep the operation for a more helpful message.
            self._finished.setdefault(('error-op', job_id), data.get('operation'))
            return
        if name == 'BLOCK_JOB_CANCELLED':
            outcome = JobOutcome(job_id, False, 'cancelled', data.get('len', 0),
                                 data.get('offset', 0))
        else:
            error = data.get('error')
            outcome = JobOutcome(job_id, error is None, error, data.get('len', 0),
                                 data.get('offset', 0))
        self._finished[job_id] = outcome

    def wait_for_jobs(self, job_ids, timeout=None, progress=None, interval=1.0):
        """Wait until every job in ``job_ids`` has ended, or one has failed.

        Returns {job_id: JobOutcome} for the jobs that ended.

        QEMU's liveness is checked every ``interval`` seconds with ``query-block-jobs`` (which
        also feeds ``progress(done_bytes, total_bytes)``), so a QEMU that dies mid-backup is noticed at once
        instead of waiting forever for an event that will never come.
        """
        pending = set(job_ids)
        deadline = None if timeout is None else time.monotonic() + timeout
        sizes = {}   # job -> its length, so a job that has ended still counts as done
        while True:
            self._drain_job_events(0.0)
            pending -= set(self._finished)
            ended = {j: self._finished[j] for j in job_ids if j in self._finished}
            if not pending or any(not o.ok for o in ended.values()):
                if progress is not None and sizes and all(o.ok for o in ended.values()):
                    progress(sum(sizes.values()), sum(sizes.values()))
                return ended
            if deadline is not None and time.monotonic() > deadline:
                raise BackupFailed(f"block jobs {sorted(pending)} did not finish within {timeout} s")
            running = {j['device']: j for j in self.execute('query-block-jobs')}
            if progress is not None:
                sizes.update({j: running[j]['len'] for j in job_ids if j in running})
                done = sum(running[j]['offset'] if j in running else sizes.get(j, 0)
                           for j in job_ids)
                progress(done, sum(sizes.values()))
            self._drain_job_events(interval)

    def cancel_job(self, job_id):
        try:
            self.execute('block-job-cancel', {'device': job_id, 'force': True})
        except QmpCommandFailed:
            pass  # already gone


def _cause(exc):
    """What went wrong connecting, in words (qemu.qmp's ConnectError often has no text)."""
    inner = getattr(exc, 'exc', None) or exc.__cause__ or exc
    if isinstance(inner, asyncio.TimeoutError):
        return "no answer (QEMU is busy, or another client holds the socket)"
    if isinstance(inner, ConnectionRefusedError):
        return "connection refused (no QEMU listens on it: the guest is not running)"
    text = getattr(inner, 'strerror', None) or str(inner)
    return text or f"{type(inner).__name__} (the connection was closed at once)"


def wait_for_socket(path, timeout=10.0):
    """Wait until a QMP socket file appears (used after starting QEMU)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise GuestUnreachable(f"QMP socket {path} did not appear within {timeout:.0f} s")
        time.sleep(0.05)
