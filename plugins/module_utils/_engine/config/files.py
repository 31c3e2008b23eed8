"""The node's configuration files (storage.cfg, vzdump.conf, jobs.cfg, guests.d/<vmid>.conf and
the job units): one reader and one writer of a declared file.

The parsers and renderers of each file's syntax live with their file (policy/config.py,
policy/jobs_cfg.py, guest/registry.py); this is how every one of them reads a file and how a
module that declares one makes it so.
"""
from __future__ import annotations

import os

from ..errors import ConfigError
from ..storage.files import write_file_atomic


def read_text(path):
    """The text of ``path``, or None when there is no such file; ConfigError naming the file
    when it cannot be read (a directory, no permission)."""
    try:
        with open(path, encoding='utf-8') as handle:
            return handle.read()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise ConfigError(f"cannot read {path}: {err.strerror}") from None


def declare_file(path, text, mode=None, dir_mode=0o777):
    """Make ``path`` hold ``text`` (written under a hidden name, fsync'd and renamed, so a
    reader never sees half a file) or, with ``text`` None, not exist. A missing directory is
    created (``dir_mode``, less the umask); ``mode`` sets the file's permissions (else the umask
    does)."""
    if text is None:
        if os.path.lexists(path):
            os.unlink(path)
        return
    os.makedirs(os.path.dirname(path) or '.', mode=dir_mode, exist_ok=True)
    write_file_atomic(path, text, mode=mode)
