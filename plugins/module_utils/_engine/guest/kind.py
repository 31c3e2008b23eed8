"""The guest-kind seam: what kind of guest a registry entry names, and how that kind is captured
(docs/architecture.md, "The guest-kind seam").

The run layer does not know how a guest is reached or frozen: it asks the guest's kind, chosen
by the ``type`` of its registry entry (guest/registry.py; ``qemu`` by default), for a session,
for the capture at one point in time, and for the consistency mode around it. What a capture
yields is typed (format/capture.py): a ``BlockCapture`` for a VM, a ``TreeCapture`` for a
container; the format takes it, or refuses a shape it cannot store before anything changes.

Kinds: ``qemu`` (``QemuKind``: a QEMU process over QMP; capture.py pushes, pull.py pulls,
consistency.py's three modes). The next is ``lxc``: an LXC container, frozen or snapshotted,
whose capture is its root file system and volumes with the id map (a ``TreeCapture``).
"""
from __future__ import annotations

from typing import Callable, ContextManager, Protocol, runtime_checkable

from ..errors import ConfigError
from ..format.capture import BLOCK
from ..vocabulary import GUEST_TYPES
from .capture import PushCapture
from .consistency import StopMode, snapshot_mode, suspend_mode
from .disks import discover_disks
from .pull import PullCapture
from .qmp import QmpSession


@runtime_checkable
class GuestKind(Protocol):
    """How one kind of guest is reached and captured."""

    name: str           # the registry's ``type``, and vzdump's VMTYPE for hook scripts
    yields: str         # the shape of its capture (format/capture.py): BLOCK or TREE

    def connect(self, entry) -> ContextManager:
        """A session with the running guest of registry entry ``entry``."""

    def capture(self, session, vmid: int, jobs: list, how: str, log: Callable,
                socket_path: str = None):
        """The capture of the guest's point in time, as the format reads it (``how``: the
        format's ``capture``, 'push' or 'pull'); a BlockCapture or a TreeCapture."""

    def consistency(self, mode: str, capture, entry, options: dict, disks: list,
                    hook: Callable, log: Callable, on_reconnect: Callable) -> ContextManager:
        """The context manager of consistency mode ``mode``, entered around the point in time;
        it yields the mode's report. ``on_reconnect()`` runs after the guest was restarted."""


class QemuKind:
    """A QEMU VM reached over its QMP socket; its capture is its disks (a BlockCapture)."""

    name = 'qemu'
    yields = BLOCK

    def connect(self, entry):
        return QmpSession(entry.qmp_socket)

    def capture(self, session, vmid, jobs, how, log, socket_path=None):
        """QEMU writes the targets (push), or exports the point in time over NBD on
        ``socket_path`` for the engine to read (pull)."""
        if how == 'pull':
            return PullCapture(session, vmid, jobs, log, socket_path=socket_path)
        return PushCapture(session, vmid, jobs, log)

    def consistency(self, mode, capture, entry, options, disks, hook, log, on_reconnect):
        if mode == 'snapshot':
            return snapshot_mode(capture.qmp, entry.agent_socket,
                                 float(options['freeze_timeout']), log)
        if mode == 'suspend':
            return suspend_mode(capture.qmp, log)

        def reconnected(session):
            # QEMU exited on shutdown and was started again: node names may differ, and the
            # target nodes opened in the old process are gone.
            capture.qmp = session
            current = {d.id: d.node for d in discover_disks(session)}
            for disk in disks:
                disk.node = current[disk.id]
            on_reconnect()
        return StopMode(capture.qmp, entry.agent_socket, float(options['stopwait']) * 60,
                        entry.start_command, hook, log,
                        on_reconnect=reconnected).around_point_in_time()


KINDS = {'qemu': QemuKind}


def guest_kind(entry):
    """The kind of the guest of registry entry ``entry``; ConfigError for a type no kind has."""
    kind = KINDS.get(entry.type)
    if kind is None:
        raise ConfigError(f"guest {entry.vmid} has type {entry.type!r}, which guestvault does "
                          f"not know; known types: {', '.join(GUEST_TYPES)} (a QEMU VM reached "
                          "over QMP). Fix the 'type' line of its registry entry")
    return kind()
