"""guestvault-pct: the restore side of Proxmox VE's ``pct``, for the node's shell and pipes.

``guestvault-pct restore <vmid> <archive|-> [--lxcpath DIR] [--name NAME] [--start 0|1]
[--force 0|1] [--bwlimit KIB] [--storage ID] [--config-dir DIR]`` restores a vzdump container
archive into a new LXC container registered as guest ``vmid``. The archive is a file's path, an
archive's file name on ``--storage`` (or PVE's volid, ``<storage>:backup/<file name>``), or
``-`` for standard input, as in ``guestvault-dump 101 --stdout | guestvault-pct restore 300 -``.
An archive on a storage is restored as the restore module does (under its guest's shared lock,
so a prune waits); a file or a stream is read as it is.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, GuestvaultError
from ..paths import default_config_dir
from ..storage import vzdump_names
from .restore import RestoreRequest, restore_archive, run_restore


def build_parser():
    parser = argparse.ArgumentParser(
        prog='guestvault-pct',
        description="Restore LXC containers from vzdump archives, as Proxmox's pct does.")
    commands = parser.add_subparsers(dest='command', required=True, metavar='command')
    restore = commands.add_parser(
        'restore', help='restore a container archive into a new container',
        description="Restore a vzdump container archive into a new LXC container, registered "
                    "as guest VMID.")
    restore.add_argument('vmid', type=int, help='the new guest')
    restore.add_argument('archive', help="a file, an archive's name on --storage "
                                         "(or <storage>:backup/<name>), or - for stdin")
    restore.add_argument('--lxcpath', help='the directory of the new container (default: the '
                                           "backed-up guest's, else /var/lib/lxc)")
    restore.add_argument('--name', help='the new container (default: VMID)')
    restore.add_argument('--start', type=int, choices=(0, 1), default=0)
    restore.add_argument('--force', type=int, choices=(0, 1), default=0,
                         help='replace an existing container and registry entry')
    restore.add_argument('--bwlimit', type=int, default=0, help='KiB/s')
    restore.add_argument('--storage', help='the storage the archive is on')
    restore.add_argument('--config-dir', default=default_config_dir())
    return parser


def _say(message):
    sys.stdout.write(message + '\n')
    sys.stdout.flush()


def _on_storage(args):
    """``(storage id, file name)`` when the archive names one on a storage, else None."""
    storage, sep, rest = args.archive.partition(':')
    if sep and '/' not in storage:
        name = rest[len('backup/'):] if rest.startswith('backup/') else rest
        if args.storage and args.storage != storage:
            raise ConfigError(f"{args.archive} names storage {storage}, but --storage is "
                              f"{args.storage}; give one of them")
        return storage, name
    if args.storage:
        return args.storage, args.archive
    return None


def run(argv=None):
    args = build_parser().parse_args(argv)
    options = dict(new_vmid=args.vmid, lxc_name=args.name, lxcpath=args.lxcpath,
                   start=bool(args.start), force=bool(args.force), bwlimit=args.bwlimit,
                   config_dir=args.config_dir)
    on_storage = _on_storage(args)
    if on_storage:
        storage, name = on_storage
        parsed = vzdump_names.parse(os.path.basename(name))
        if parsed is None or name != parsed.name:
            raise ConfigError(f"{name} is not a vzdump archive's file name (vzdump-lxc-<vmid>-"
                              "<YYYY_MM_DD-HH_MM_SS>.tar[.zst|.gz|.lzo]) on storage "
                              f"{storage}; list them with guestvault.backup.backup_info")
        result = run_restore(RestoreRequest(vmid=parsed.vmid, storage=storage, backup=name,
                                            **options), log=_say)
    elif args.archive == '-':
        result = restore_archive(RestoreRequest(vmid=None, **options), sys.stdin.buffer,
                                 'the archive on standard input', log=_say)
    else:
        if not os.path.isfile(args.archive):
            raise ConfigError(f"there is no archive {args.archive}; give a file, an archive "
                              "on --storage, or - for standard input")
        parsed = vzdump_names.parse(os.path.basename(args.archive))
        result = restore_archive(RestoreRequest(vmid=parsed.vmid if parsed else None,
                                                **options),
                                 os.path.abspath(args.archive), args.archive, log=_say)
    for warning in result['warnings']:
        _say(f"WARNING: {warning}")
    _say(f"container {result['lxc_name']} ({result['rootfs']}) is guest {result['new_vmid']}"
         + (', started' if result['started'] else ''))
    return 0


def main(argv=None):
    """Entry point: one line on stderr and exit 2 for any error guestvault reports."""
    try:
        return run(argv)
    except GuestvaultError as exc:
        sys.stderr.write(f"guestvault-pct: {exc}\n")
        return 2
