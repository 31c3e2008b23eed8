"""An archive as the run layer's verbs see it on a directory storage: verify reads it through.

A vzdump archive is one self-contained file: no chain (``dependencies`` is the record alone),
nothing to fold when another backup goes, nothing shared to collect.
"""
from __future__ import annotations

from ..capture import TREE
from .reader import verify_archive


class VzdumpArchives:
    """The reading side of the vzdump archive format for ``ArchiveRecord``s (run/locate.py's
    ``format_of(storage, record)`` gives it for them)."""

    name = 'vzdump'
    captures = (TREE,)

    def dependencies(self, storage, record):
        return [record]

    def verify(self, storage, record, check_mode=False):
        """``([record], problems)``: decompressed and every tar header and block read."""
        return [record], verify_archive(storage.file(record, None))
