"""The log of one backup (a VM's ``client.log``, a container archive's ``<stem>.log``): each
line stamped and kept for the file, and passed on to the caller's log function."""
from __future__ import annotations

from datetime import datetime, timezone


class BackupLog:
    """Call it with a message; ``text()`` is the file's content."""

    def __init__(self, sink):
        self.sink = sink
        self.lines = []

    def __call__(self, message):
        self.lines.append(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} INFO: {message}")
        if self.sink:
            self.sink(message)

    def text(self):
        return '\n'.join(self.lines) + '\n'
