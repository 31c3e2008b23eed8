"""Garbage collection of a datastore (the garbage_collect module): mark, then sweep.

Placeholder for the request shape the module builds; the lead wires :func:`run_gc` to the
datastore (``format/datastore/gc.py``'s ``collect_garbage``) and the storage's writers.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..times import parse_age

# Proxmox Backup Server keeps chunks whose atime is within 24 h 5 min of the mark's start: a
# relatime mount updates atime only once a day, so a touched chunk may look a day old.
DEFAULT_GRACE = '24h5m'


@dataclass
class GcRequest:
    storage: str
    grace: str = DEFAULT_GRACE
    config_dir: str = '/etc/guestvault'
    check_mode: bool = False


def grace_seconds(grace) -> float:
    """Seconds of ``grace`` (``24h5m``, ``0s``, ...); ConfigError naming the option otherwise."""
    return parse_age(grace, 'grace', allow_zero=True)


def run_gc(request: GcRequest, log=None):
    """Collect the garbage of the datastore ``request.storage``; returns the module's result."""
    raise NotImplementedError("lead wires this")
