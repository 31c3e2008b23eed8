"""What a guest kind's capture yields, the input every Format takes (docs/architecture.md,
"The guest-kind seam"). The guest kind (guest/kind.py) decides how to capture; the format
decides how to store what was captured. There are two shapes:

- ``BlockCapture``: the block devices of a VM at one point in time. Per disk, QEMU either writes
  the format's target image itself (``push``: the qcow2 chain) or exports the point in time over
  NBD for the engine to read (``pull``: the datastore). guest/capture.py's ``PushCapture`` and
  guest/pull.py's ``PullCapture`` are its implementations.
- ``TreeCapture``: the file tree of a container at one point in time: its root directory, the
  volumes mounted into it, and the id map that turns the container's uids and gids into the
  host's. A datastore will store it as a pxar archive in a dynamic index, a vzdump directory as
  a tar archive. No guest kind yields one yet.

A format names the shapes it takes (``Format.captures``) and refuses any other before anything
changes (``format.base.accept_capture``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Protocol, Tuple, runtime_checkable

BLOCK = 'block'
TREE = 'tree'


@runtime_checkable
class BlockCapture(Protocol):
    """A VM's disks at one point in time (guest/capture.py, guest/pull.py)."""

    kind: str                   # BLOCK
    disk_jobs: list             # one per disk: the disk, its target, its bitmaps

    def open_targets(self) -> None:
        """Open the targets in QEMU (again, after stop mode restarted it)."""

    def start(self, speed_per_disk: int = 0, max_workers=None, compress: bool = False) -> None:
        """Fix the point in time for every disk at once (one transaction)."""

    def close_targets(self) -> None:
        """After the copy: close what QEMU held open."""

    def abort(self) -> None:
        """A failed run: cancel, close and remove what the capture added."""

    def journal_entries(self) -> Dict[str, list]:
        """What a kill would leave in QEMU, for the next run to clear."""


@dataclass
class TreeCapture:
    """A container's file tree at one point in time (the next guest kind, LXC)."""

    root: str                                     # the root file system, mounted read-only
    volumes: List[Tuple[str, str]] = field(default_factory=list)   # (mount point, host path)
    id_map: List[Tuple[str, int, int, int]] = field(default_factory=list)
    # ('u' or 'g', first id in the container, first id on the host, count), as lxc.idmap
    kind: str = TREE
