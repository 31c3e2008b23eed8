"""Find what a request names: the guest (registry entry and sockets), the storage and its format.

This is where a storage id from ``storage.cfg`` becomes a Storage with the Format it holds, so
the verbs above never branch on the kind of storage.
"""
from __future__ import annotations

import os
import socket
from dataclasses import replace

from ..datastore.backends.s3 import S3Bucket
from ..datastore.build import build_datastore
from ..errors import ConfigError, GuestNotFound
from ..format.qcow2 import Qcow2Chain
from ..format.vzdump_archive.archives import VzdumpArchives
from ..guest.kind import require_vm
from ..guest.registry import GuestEntry, load_guest, validate_vmid
from ..paths import CONFIG_DIR
from ..policy.config import load_s3_endpoint, load_storage
from ..storage.directory import DirStorage
from .encryption_key import load_crypt

# Storage kind -> the format of the backups it holds (dir, nfs and cifs storages are all
# directories of qcow2 chains).
_FORMATS = {'dir': Qcow2Chain}


def resolve_guest(vmid, qmp_socket=None, agent_socket=None, config_dir=CONFIG_DIR):
    """The guest's registry entry, with sockets given by the caller taking precedence (a
    container's entry takes none)."""
    vmid = validate_vmid(vmid)
    if qmp_socket:
        try:
            entry = load_guest(config_dir, vmid)
        except GuestNotFound:
            entry = GuestEntry(vmid=vmid)
    else:
        entry = load_guest(config_dir, vmid)
    if qmp_socket or agent_socket:
        require_vm(entry, "qmp_socket and agent_socket name a VM's sockets",
                   "leave them out: its registry entry says how to reach it")
    if qmp_socket:
        entry = replace(entry, qmp_socket=qmp_socket)
    if agent_socket:
        entry = replace(entry, agent_socket=agent_socket)
    return entry


def open_storage(config_dir, storage=None, dumpdir=None, node=None):
    """The storage a request names (None when it names none).

    A storage restricted to some nodes (``nodes`` in storage.cfg) is refused on any other node,
    as Proxmox does; ``node`` defaults to this host's name.
    """
    if storage and dumpdir:
        raise ConfigError("storage and dumpdir are mutually exclusive; give one")
    if storage:
        cfg = load_storage(config_dir, storage, node=node or socket.gethostname())
        if cfg.type == 'datastore':
            return open_datastore(cfg, config_dir)
        # vzdump writes a dir: storage's archives into <path>/dump, as Proxmox VE does
        return DirStorage(cfg.path, cfg.id, archive_dir=os.path.join(cfg.path, 'dump'))
    if dumpdir:
        if not str(dumpdir).startswith('/'):
            raise ConfigError(f"dumpdir {dumpdir!r} is a relative path; give an absolute path")
        return DirStorage(dumpdir)
    return None


def open_datastore(cfg, config_dir):
    """A ``datastore:`` storage with its format, holding the key when storage.cfg names one; on
    an S3 backend, the bucket with ``path`` as its cache."""
    crypt = None
    if cfg.encryption_key:
        crypt = load_crypt(cfg.encryption_key, passphrase_file=cfg.encryption_passphrase_file)
    bucket = None
    if cfg.s3_backend:
        bucket = S3Bucket(load_s3_endpoint(config_dir, cfg), cfg.s3_backend['bucket'])
    return build_datastore(cfg.path, cfg.id, crypt, bucket)


def require_storage(config_dir, storage=None, dumpdir=None, node=None):
    """The storage a request names; ConfigError when it names none."""
    store = open_storage(config_dir, storage, dumpdir, node)
    if store is None:
        raise ConfigError("no storage given: set storage (an id from storage.cfg) or dumpdir "
                          "(a backup using the defaults of vzdump.conf may also set them there)")
    return store


def format_of(storage, record=None):
    """The Format of the backups on ``storage`` (a datastore carries its own: it holds the key);
    of ``record`` when given, which on a directory storage may be a vzdump archive."""
    if record is not None and record.archive is not None:
        return VzdumpArchives()
    return getattr(storage, 'format', None) or _FORMATS[storage.kind]()
