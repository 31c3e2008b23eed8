"""The guest-kind seam: what kind of guest a registry entry names, and how that kind is captured
(docs/architecture.md, "The guest-kind seam").

The run layer does not know how a guest is reached or frozen: it asks the guest's kind, chosen
by the ``type`` of its registry entry (guest/registry.py; ``qemu`` by default), for a session,
for the capture at one point in time, and for the consistency mode around it. What a capture
yields is typed (format/capture.py): a ``BlockCapture`` for a VM, a ``TreeCapture`` for a
container; the format takes it, or refuses a shape it cannot store before anything changes.

Kinds: ``qemu`` (``QemuKind``: a QEMU process over QMP; capture.py pushes, pull.py pulls,
consistency.py's three modes) and ``lxc`` (``LxcKind``: an LXC container, stopped, frozen
around a copy or snapshotted, whose capture is its root file system and included volumes with
the id map, a ``TreeCapture``; guest/lxc/).

Every kind is a ``GuestKind`` (name, yields, connect). What the run layer asks next depends on
the shape it yields: a ``BlockKind`` (yields BLOCK) gives a capture of disks and a consistency
mode around its point in time; a ``TreeKind`` (yields TREE) gives one context manager that
stops, freezes or snapshots the container and yields its tree, and the texts that describe
the guest in an archive.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ContextManager, List, Protocol, Tuple, runtime_checkable

from ..errors import ConfigError
from ..config.files import read_text
from ..format.capture import BLOCK, TREE, TreeCapture
from ..vocabulary import GUEST_TYPES
from .capture import PushCapture
from .consistency import StopMode, snapshot_mode, suspend_mode
from .disks import discover_disks
from .lxc.config import DEFAULT_LXCPATH, LxcConfig, config_path, parse_lxc_config
from .lxc.container import Container
from .lxc.modes import temp_dir_for, tree_capture
from .lxc.pct_conf import detect_ostype, pct_conf, tree_bytes
from .pull import PullCapture
from .qmp import QmpSession
from .registry import TYPE_HELP


@runtime_checkable
class GuestKind(Protocol):
    """How one kind of guest is reached; ``yields`` says which protocol it also follows."""

    name: str           # the registry's ``type``, and vzdump's VMTYPE for hook scripts
    yields: str         # the shape of its capture (format/capture.py): BLOCK or TREE

    def connect(self, entry) -> ContextManager:
        """A session with the guest of registry entry ``entry``."""


@runtime_checkable
class BlockKind(GuestKind, Protocol):
    """A guest whose capture is its disks (a VM)."""

    def capture(self, session, vmid: int, jobs: list, how: str, log: Callable,
                socket_path: str = None):
        """The capture of the guest's point in time, as the format reads it (``how``: the
        format's ``capture``, 'push' or 'pull'); a BlockCapture or a TreeCapture."""

    def consistency(self, mode: str, capture, entry, options: dict, disks: list,
                    hook: Callable, log: Callable, on_reconnect: Callable) -> ContextManager:
        """The context manager of consistency mode ``mode``, entered around the point in time;
        it yields the mode's report. ``on_reconnect()`` runs after the guest was restarted."""


@runtime_checkable
class TreeKind(GuestKind, Protocol):
    """A guest whose capture is a file tree (a container)."""

    def tree_capture(self, entry, guest, mode: str, options: dict, hook: Callable,
                     log: Callable) -> ContextManager:
        """The context manager of consistency mode ``mode`` for the guest ``connect`` gave: it
        yields ``(TreeCapture, report)`` and undoes the mode on leaving (after archiving)."""

    def pct_conf_text(self, entry, guest, capture) -> Tuple[str, List[str]]:
        """The guest's pct.conf for an archive of ``capture``, and warnings."""

    def lxc_config_text(self, guest) -> str:
        """The guest's own config file, kept in an archive so a restore recreates it."""


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
        return PushCapture(session, vmid, jobs, log, socket_path=socket_path)

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


@dataclass(frozen=True)
class LxcGuest:
    """A connected container: the lxc-* handle, its config as read, and the config's text."""

    container: Container
    config: LxcConfig
    config_text: str


class LxcKind:
    """An LXC container; its capture is its rootfs and included volumes (a TreeCapture)."""

    name = 'lxc'
    yields = TREE

    @contextmanager
    def connect(self, entry):
        """The container of ``entry`` (its config read, and known to lxc-info); nothing is
        held open, so leaving changes nothing."""
        lxcpath = entry.lxcpath or DEFAULT_LXCPATH
        container = Container(entry.lxc, lxcpath)
        path = config_path(lxcpath, entry.lxc)
        text = read_text(path)
        if text is None:
            raise container.not_found()
        config = parse_lxc_config(text, path)
        container.state()            # GuestNotFound when LXC does not know it either
        yield LxcGuest(container, config, text)

    def tree_capture(self, entry, guest, mode, options, hook, log):
        """``options``: vzdump's ``stopwait`` (minutes), ``tmpdir``, ``dumpdir``, ``bwlimit``
        (KiB/s), and ``basename`` (the archive's name without extension) for the temporary
        directory vzdump would pick; or ``temp_dir`` to name it outright."""
        temp_dir = options.get('temp_dir') or temp_dir_for(
            entry.vmid, options.get('tmpdir'), options.get('dumpdir'), options.get('basename'))
        return tree_capture(guest.container, guest.config, entry.included_volumes, mode,
                            vmid=entry.vmid, temp_dir=temp_dir,
                            stopwait=float(options.get('stopwait', 10)) * 60, hook=hook,
                            log=log, bwlimit=int(options.get('bwlimit') or 0))

    def pct_conf_text(self, entry, guest, capture: TreeCapture):
        keys = {m.path: m.key for m in entry.mountpoints}
        volumes = [(keys[mp], mp, tree_bytes(host)) for mp, host in capture.volumes]
        return pct_conf(guest.config, entry.vmid, tree_bytes(capture.root), volumes,
                        ostype=detect_ostype(capture.root))

    def lxc_config_text(self, guest):
        return guest.config_text


KINDS = {'qemu': QemuKind, 'lxc': LxcKind}


def guest_kind(entry):
    """The kind of the guest of registry entry ``entry``; ConfigError for a type no kind has."""
    kind = KINDS.get(entry.type)
    if kind is None:
        raise ConfigError(f"guest {entry.vmid} has type {entry.type!r}, which guestvault does "
                          f"not know; known types: {', '.join(GUEST_TYPES)}; {TYPE_HELP}. Fix the "
                          "'type' line of its registry entry")
    return kind()


def require_vm(entry, what, instead):
    """ConfigError, before anything is done, when ``what`` (something only a VM has: disks,
    dirty bitmaps, a QMP socket) is asked of a guest whose capture is a file tree (a
    container); ``instead`` says what to do for that guest."""
    if guest_kind(entry).yields != BLOCK:
        raise ConfigError(f"guest {entry.vmid} is a container (type {entry.type}), and {what}; "
                          f"{instead}")
