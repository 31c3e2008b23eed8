"""A minimal QEMU guest agent (qemu-ga) client over its host-side unix socket.

qemu-ga has no greeting and serves one client at a time; a client must first resynchronise the
stream with ``guest-sync-delimited`` (whose answer starts with a 0xFF byte) because a previous
client may have left a half-read reply behind.
"""
from __future__ import annotations

import json
import random
import socket
import time

from ..errors import AgentError


class GuestAgent:
    def __init__(self, socket_path, timeout=10.0):
        self.socket_path = socket_path
        self.timeout = timeout
        self._sock = None
        self._buffer = b''

    def __enter__(self):
        self.connect()
        return self

    def __exit__(self, *exc):
        self.close()

    def connect(self):
        try:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(self.timeout)
            self._sock.connect(self.socket_path)
        except OSError as exc:
            self.close()
            raise AgentError(f"cannot connect to the guest agent socket {self.socket_path}: "
                             f"{exc}") from exc
        self._sync()

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, command, arguments=None):
        message = {'execute': command}
        if arguments:
            message['arguments'] = arguments
        try:
            self._sock.sendall(json.dumps(message).encode() + b'\n')
        except OSError as exc:
            raise AgentError(f"guest agent {self.socket_path}: sending {command} failed: "
                             f"{exc}") from exc

    def _read_line(self, deadline):
        while b'\n' not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AgentError(f"the guest agent on {self.socket_path} did not answer within "
                                 f"{self.timeout:g} s: is qemu-ga running in the guest?")
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise AgentError(f"guest agent {self.socket_path}: {exc}") from exc
            if not chunk:
                raise AgentError(f"the guest agent on {self.socket_path} closed the connection")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b'\n', 1)
        return line

    def _sync(self):
        token = random.randint(1, 2 ** 31 - 1)
        self._send('guest-sync-delimited', {'id': token})
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._read_line(deadline)
            # Drop everything up to the 0xFF sentinel: leftovers of an earlier client.
            if b'\xff' in line:
                line = line.rsplit(b'\xff', 1)[1]
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if reply.get('return') == token:
                return

    def execute(self, command, arguments=None, expect_reply=True):
        self._send(command, arguments)
        if not expect_reply:
            return None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                reply = json.loads(self._read_line(deadline))
            except ValueError:
                continue
            if 'error' in reply:
                raise AgentError(f"the guest agent refused {command}: "
                                 f"{reply['error'].get('desc', reply['error'])}")
            if 'return' in reply:
                return reply['return']

    def ping(self):
        self.execute('guest-ping')

    def freeze(self):
        """Freeze the guest's filesystems; returns how many were frozen."""
        return self.execute('guest-fsfreeze-freeze')

    def thaw(self):
        return self.execute('guest-fsfreeze-thaw')

    def shutdown(self):
        # qemu-ga answers guest-shutdown with nothing: the caller watches QEMU's status instead.
        self._send('guest-shutdown', {'mode': 'powerdown'})
