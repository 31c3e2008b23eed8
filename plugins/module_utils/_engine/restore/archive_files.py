"""Single files out of a vzdump container archive (file_restore without the appliance).

The archive is untrusted: its tar stream (decompressed by format/vzdump_archive) goes through
``untrusted_tar.extract``, which reaches every name by file descriptor from the destination,
refuses ``..``, absolute names and writes through links, leaves devices and FIFOs out, drops
setuid/setgid/sticky bits and stops at ``max_bytes``. Nothing is mounted. Listing reads only
the headers' fields (format/vzdump_archive/reader.list_members).
"""
from __future__ import annotations

from ..format.vzdump_archive.reader import list_members, tar_stream
from . import untrusted_tar

__all__ = ['extract_paths', 'list_members']


def _selector(paths):
    """Accepts a member's relative path when it is one of ``paths`` (container paths, ``/``
    for everything) or lies below one."""
    wanted = [p.strip('/') for p in paths]
    if '' in wanted:
        return None

    def select(relative):
        return any(relative == p or relative.startswith(p + '/') for p in wanted)
    return select


def extract_paths(source, paths, dest, max_bytes, bwlimit_kib=0):
    """Extract ``paths`` of the archive ``source`` (a path or a binary stream) into ``dest``,
    an empty directory (a caller's staging directory, merged into place afterwards with
    ``untrusted_tar.merge``); at most ``max_bytes`` of file data. Returns untrusted_tar's
    counts; on any error ``dest`` is empty again."""
    with tar_stream(source, bwlimit_kib) as stream:
        return untrusted_tar.extract(stream, dest, max_bytes, select=_selector(paths))
