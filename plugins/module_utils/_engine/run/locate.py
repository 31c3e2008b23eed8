"""Find what a request names: the guest (registry entry and sockets) and the storage."""
from __future__ import annotations

from dataclasses import replace

from ..policy.config import load_storage
from ..errors import ConfigError, GuestNotFound
from ..guest.registry import GuestEntry, load_guest, validate_vmid
from ..storage.directory import DirStorage


def resolve_guest(vmid, qmp_socket=None, agent_socket=None, config_dir='/etc/guestvault'):
    """The guest's registry entry, with sockets given by the caller taking precedence."""
    vmid = validate_vmid(vmid)
    if qmp_socket:
        try:
            entry = load_guest(config_dir, vmid)
        except GuestNotFound:
            entry = GuestEntry(vmid=vmid)
        entry = replace(entry, qmp_socket=qmp_socket)
    else:
        entry = load_guest(config_dir, vmid)
    if agent_socket:
        entry = replace(entry, agent_socket=agent_socket)
    return entry


def open_storage(config_dir, storage=None, dumpdir=None):
    if storage and dumpdir:
        raise ConfigError("storage and dumpdir are mutually exclusive; give one")
    if storage:
        cfg = load_storage(config_dir, storage)
        return DirStorage(cfg.path, cfg.id)
    if dumpdir:
        return DirStorage(dumpdir)
    return None


def require_storage(config_dir, storage=None, dumpdir=None):
    """The storage a request names; ConfigError when it names none."""
    store = open_storage(config_dir, storage, dumpdir)
    if store is None:
        raise ConfigError("no storage given: set storage (an id from storage.cfg) or dumpdir "
                          "(a backup using the defaults of vzdump.conf may also set them there)")
    return store
